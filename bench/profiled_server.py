"""``python bench/profiled_server.py server ...``: ``gactor server ...`` with counters that
``bench.calls`` switches around the operations it counts, one phase at a time so that
neither counts the other: the first SIGUSR1 starts cProfile, the second stops it and
starts a trio instrument counting task steps, SIGUSR2 stops that and writes
``$GACTOR_PROFILE_OUT`` (JSON): ``calls``, the function calls cProfile saw in the
event-loop thread (built-ins included), and ``steps``, the task steps by task name.
Both are deterministic for a given workload, unlike CPU time on a loaded host. For
measuring only: it is never how the server runs.
"""

from __future__ import annotations

import collections
import cProfile
import json
import os
import pstats
import runpy
import signal
import sys
from types import FrameType
from typing import Any

import trio


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] += 1


_on: dict[str, Any] = {}


def _next_phase(signum: int, frame: FrameType | None) -> None:
    # Signal handlers run in the main thread, inside trio.run: the profile and the
    # instrument both attach to the event loop.
    if "profile" not in _on and "calls" not in _on:
        _on["profile"] = cProfile.Profile()
        _on["profile"].enable()
    elif "profile" in _on:
        _on["profile"].disable()
        _on["calls"] = pstats.Stats(_on.pop("profile")).total_calls  # type: ignore[attr-defined]
        _on["steps"] = _Steps()
        trio.lowlevel.add_instrument(_on["steps"])


def _write(signum: int, frame: FrameType | None) -> None:
    if "steps" not in _on:
        return
    steps = _on.pop("steps")
    trio.lowlevel.remove_instrument(steps)
    with open(os.environ["GACTOR_PROFILE_OUT"], "w") as f:
        json.dump({"calls": _on.pop("calls"), "steps": dict(steps.steps)}, f)


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _next_phase)
    signal.signal(signal.SIGUSR2, _write)
    sys.argv = ["gactor", *sys.argv[1:]]
    runpy.run_module("gactor", run_name="__main__")
