"""The README's five-minute tour, run as written against the real (shared) server.

The tour's blocks are found by their markers (``<!-- tour:cli -->`` and so on), so the
README cannot drift from what works: every ``$ command`` of the CLI block runs in bash
(``gactor`` on the PATH, ``GACTOR_TARGET`` naming the test server, a temporary
directory as the working directory) and must print the
lines shown under it, where ``…`` matches anything on its line and runs of blanks match
any run of blanks. The Python block runs as a script and must print its output block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import E2E_MARKS
from .servers import ServerProcess

pytestmark = E2E_MARKS
README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT = 60.0
TOUR_HANDLE = "tour"


def block(marker: str) -> str:
    """The fenced block right after ``<!-- marker -->`` in the README."""
    text = README.read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\n```\w*\n(.*?)\n```", text, re.DOTALL)
    assert found is not None, f"no {marker} block in {README}"
    return found.group(1)


def steps(console: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` for each ``$ `` line of a console block."""
    parsed: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            parsed.append((line[2:], []))
        else:
            assert parsed, f"output before the first command: {line!r}"
            parsed[-1][1].append(line)
    return parsed


def pattern(expected: str) -> re.Pattern[str]:
    parts = [r"\s+" if part.isspace() else (".*?" if part == "…" else re.escape(part))
             for part in re.split(r"(\s+|…)", expected.strip()) if part]
    return re.compile("".join(parts))


def assert_prints(command: str, out: str, expected: list[str]) -> None:
    lines = out.rstrip("\n").splitlines() if out.strip() else []
    assert len(lines) == len(expected), f"{command!r} printed:\n{out}\nexpected:\n" + "\n".join(expected)
    for line, wanted in zip(lines, expected, strict=True):
        assert pattern(wanted).fullmatch(line.strip()), f"{command!r}: {line!r} is not like {wanted!r}"


@pytest.fixture
def tour_env(gactor_server: ServerProcess) -> Iterator[dict[str, str]]:
    """The environment a reader has: ``gactor`` on the PATH, the server as the target;
    the tour's container destroyed before (a crashed run's) and after."""
    env = {**os.environ, "GACTOR_TARGET": gactor_server.url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    destroy = [sys.executable, "-m", "gactor", "--target", gactor_server.url, "destroy", TOUR_HANDLE]
    subprocess.run(destroy, capture_output=True, timeout=TIMEOUT, check=False)
    try:
        yield env
    finally:
        subprocess.run(destroy, capture_output=True, timeout=TIMEOUT, check=False)


def test_the_cli_tour(tour_env: dict[str, str], tmp_path: Path) -> None:
    tour = steps(block("tour:cli"))
    assert len(tour) >= 10
    assert tour[-1][0] == f"gactor destroy {TOUR_HANDLE}"
    for command, expected in tour:
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=tour_env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert result.returncode == 0, f"{command!r} exited {result.returncode}: {result.stderr}"
        assert "error:" not in result.stderr, (command, result.stderr)
        assert_prints(command, result.stdout, expected)


def test_the_python_tour(tour_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-c", block("tour:python")], env=tour_env, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr
    assert_prints("the Python tour", result.stdout, block("tour:python-output").splitlines())


def test_the_matcher_is_strict() -> None:
    """``…`` spans one line's differences only; everything else must match as written."""
    assert pattern("memory        … / 64 MiB (…%)").fullmatch("memory  1.2 MiB / 64 MiB (2%)")
    assert not pattern("memory        … / 64 MiB (…%)").fullmatch("memory  1.2 MiB / 32 MiB (2%)")
    assert not pattern("exit 3").fullmatch("exit 33")
    with pytest.raises(AssertionError):
        assert_prints("x", "a\nb\n", ["a"])
