"""Summaries, the printed table and the JSON result file.

The reference figures are guardian's, measured on this machine kind and copied from
``/work/shared/PERF_NOTES.md``; they are *not* run here (there is no guardian binary).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_LABEL = "reference (PERF_NOTES, not run here)"

# key -> (guardian's figure, gactor's target), as printed.
REFERENCE: dict[str, tuple[str, str]] = {
    "create": ("110 ms", "<= 30 ms"),
    "destroy": ("273 ms", "<= 30 ms"),
    "run": ("49 ms", "<= 10 ms"),
    "stdout": ("128 MB/s", ">= 300 MB/s"),
    "concurrent_create": ("3.9 s (50)", ""),
    "concurrent_destroy": ("7.1 s (50)", ""),
    "helper_private": ("~10 MiB", ""),
    "primitive_unshare": ("2.5 ms", ""),
}


@dataclass
class Series:
    key: str  # stable name in the JSON and for the reference lookup
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    error: str | None = None


def summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    if len(ordered) > 1:
        deciles = statistics.quantiles(ordered, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = ordered[0]
    return {
        "median": statistics.median(ordered), "p10": p10, "p90": p90,
        "min": ordered[0], "max": ordered[-1], "n": len(ordered),
    }  # fmt: skip


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def table(series: list[Series]) -> str:
    header = (
        "scenario",
        "unit",
        "median",
        "p10",
        "p90",
        "min",
        "max",
        "n",
        "guardian ref",
        "target",
    )
    rows: list[tuple[str, ...]] = []
    for s in series:
        ref, target = REFERENCE.get(s.key, ("", ""))
        stats = summary(s.samples)
        if s.error is not None or not stats:
            rows.append((s.label, s.unit, "ERROR", "", "", "", "", "0", ref, target))
            continue
        numbers = tuple(_num(stats[k]) for k in ("median", "p10", "p90", "min", "max"))
        rows.append((s.label, s.unit, *numbers, str(int(stats["n"])), ref, target))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    left = {0, 1, 8, 9}

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i not in left else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    lines = [line(header), rule, *map(line, rows)]
    errors = [f"  {s.label}: {s.error}" for s in series if s.error is not None]
    return "\n".join(lines + (["errors:", *errors] if errors else []))


def write_json(path: Path, series: list[Series], meta: dict[str, Any]) -> None:
    results = {
        s.key: {**asdict(s), **summary(s.samples), "reference": REFERENCE.get(s.key, ("", ""))[0],
                "target": REFERENCE.get(s.key, ("", ""))[1]}
        for s in series
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({**meta, "reference_source": REFERENCE_LABEL, "results": results}, indent=2)
        + "\n"
    )
