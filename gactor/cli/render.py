"""How the CLI shows things to people: human units, tables (rich), progress bars.

Pure functions of their inputs, apart from the console they print to: a terminal gets
bold headers and its own width; a pipe gets plain text, lines never wrapped or cut (a
long property stays whole for ``grep``), trailing blanks stripped.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Sequence
from typing import IO, Any

import click

PIPE_WIDTH = 4096  # a pipe has no width; wide enough that rich never folds a cell

_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
# Garden reports "no memory limit" as the largest cgroup value rounded to pages.
NO_LIMIT = 1 << 62


def size(n: int | float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``64 MiB``."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``1.5G``, ``1048576`` → bytes (binary multiples, as docker's -m).

    Raises ValueError naming the text when it is not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (try 1048576, 512K, 64M or 2G)")
    number, prefix, _ = match.groups()
    scale = 1024 ** ("kmgtpe".index(prefix.lower()) + 1) if prefix else 1
    return int(float(number) * scale)


def duration(seconds: float) -> str:
    """``850ms``, ``42s``, ``3m12s``, ``5h03m``, ``2d04h``: two units at most."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cpu_time(ns: int) -> str:
    """CPU nanoseconds (Garden's unit) as seconds: ``0.012s``, ``3.40s``, ``1m05s``."""
    seconds = ns / 1e9
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.2f}s"
    return duration(seconds)


def usage_of(used: int, limit: int) -> str:
    """``12 MiB / 64 MiB (19%)``, or ``12 MiB (no limit)``."""
    if limit <= 0 or limit >= NO_LIMIT:
        return f"{size(used)} (no limit)"
    return f"{size(used)} / {size(limit)} ({100 * used / limit:.0f}%)"


def console(file: IO[str] | None = None) -> Any:
    """A rich Console on ``file`` (stdout): styled for a terminal, plain for a pipe."""
    from rich.console import Console

    out = file if file is not None else sys.stdout
    if out.isatty():
        return Console(file=out, highlight=False)
    return Console(file=out, width=PIPE_WIDTH, no_color=True, highlight=False,
                   force_terminal=False, force_interactive=False, emoji=False, markup=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns with upper-case headers and no borders, as ``docker ps`` prints them."""
    from rich import box
    from rich.table import Table

    grid = Table(box=box.SIMPLE_HEAD if sys.stdout.isatty() else None, pad_edge=False,
                 show_edge=False, header_style="bold", expand=False)
    for header in headers:
        grid.add_column(header.upper(), no_wrap=not sys.stdout.isatty(), overflow="fold")
    for row in rows:
        grid.add_row(*row)
    _print(grid)


def fields(rows: Sequence[tuple[str, str]], title: str | None = None) -> None:
    """A two-column ``NAME  value`` table for one object (``info``, ``metrics``)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    if title is not None:
        grid.add_row(title, "")
    for name, value in rows:
        grid.add_row(name, value)
    _print(grid)


def _print(renderable: Any) -> None:
    if sys.stdout.isatty():
        console().print(renderable)
        return
    buffer = io.StringIO()
    console(buffer).print(renderable)
    for line in buffer.getvalue().splitlines():
        click.echo(line.rstrip())


class Progress:
    """A transfer's progress bar on ``file`` when it is a terminal, else nothing.

    ``with Progress("stream-in", total, sys.stdout) as bar: bar.advance(n)``. ``total``
    None (a pipe's length is unknown) pulses the bar and shows bytes and rate;
    ``counts_bytes=False`` (nothing reports progress) shows a spinner and the time taken. The bar is
    removed from the terminal when the block ends, whichever way it ends.
    """

    def __init__(self, description: str, total: int | None, file: IO[str], counts_bytes: bool = True) -> None:
        self._counts_bytes = counts_bytes
        self._description = description
        self._total = total
        self._file = file
        self._progress: Any = None
        self._task: Any = None
        self.transferred = 0

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def __enter__(self) -> Progress:
        if not self._file.isatty():
            return self
        from rich import progress as p

        # Without a total the bar pulses and the size column shows what has gone so far.
        columns: list[Any] = [p.TextColumn("{task.description}"), p.BarColumn(),
                              p.DownloadColumn(binary_units=True), p.TransferSpeedColumn(),
                              p.TimeRemainingColumn()]
        if not self._counts_bytes:  # work whose progress nobody reports: show that it runs
            columns = [p.SpinnerColumn(), p.TextColumn("{task.description}"), p.TimeElapsedColumn()]
        self._progress = p.Progress(*columns, console=console(self._file), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def set_total(self, total: int) -> None:
        """The size, once it is known (a pull learns it from the manifest)."""
        self._total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def advance(self, n: int) -> None:
        self.transferred += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class PullProgress:
    """A pull's progress, fed ``update(LayerProgress)`` for each report of the server.

    On a terminal ``file``: a bar for the whole image and one per layer (short digest,
    bytes done of its size, rate), removed when the block ends. Elsewhere: one plain line
    on ``log`` per layer once it is done, ``LAYER  SIZE  pulled`` (or ``in the store``
    for a layer the server had already), so a log shows the pull without a terminal's
    control codes.
    """

    def __init__(self, description: str, file: IO[str], log: IO[str]) -> None:
        self._description = description
        self._file = file
        self._log = log
        self._progress: Any = None
        self._whole: Any = None
        self._tasks: dict[str, Any] = {}
        self._layers: dict[str, tuple[int, int]] = {}  # digest -> (done, total)
        self._finished: set[str] = set()

    @property
    def shown(self) -> bool:
        """Whether the bars are on a terminal."""
        return self._progress is not None

    def __enter__(self) -> PullProgress:
        if not self._file.isatty():
            return self
        from rich import progress as p

        self._progress = p.Progress(p.TextColumn("{task.description}"), p.BarColumn(),
                                    p.DownloadColumn(binary_units=True), p.TransferSpeedColumn(),
                                    console=console(self._file), transient=True)
        self._progress.start()
        self._whole = self._progress.add_task(self._description, total=None)
        return self

    def update(self, layer: Any) -> None:
        """One report: ``layer.digest`` has ``done`` of ``total`` bytes (-1: unknown)."""
        first = layer.digest not in self._layers
        total = layer.total if layer.total >= 0 else None
        self._layers[layer.digest] = (layer.done, layer.total)
        if self._progress is not None:
            if first:
                self._tasks[layer.digest] = self._progress.add_task(f"  {_short(layer.digest)}", total=total)
            self._progress.update(self._tasks[layer.digest], completed=layer.done, total=total)
            known = [t for _, t in self._layers.values()]
            self._progress.update(self._whole, completed=sum(d for d, _ in self._layers.values()),
                                  total=sum(known) if all(t >= 0 for t in known) else None)
        done = total is not None and layer.done >= total
        if done and layer.digest not in self._finished:
            self._finished.add(layer.digest)
            if self._progress is None:
                how = "in the store" if layer.cached else "pulled"
                self._log.write(f"{_short(layer.digest)}  {size(layer.done)}  {how}\n")
                self._log.flush()

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _short(digest: str) -> str:
    """``sha256:0123456789ab``: enough of a digest to tell layers apart."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest
