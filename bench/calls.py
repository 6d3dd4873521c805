"""``python -m bench.calls``: the server's Python function calls and trio task steps per
``run true`` + wait, deterministic where CPU time on a loaded host is not.

Starts a server under ``bench/profiled_server.py`` (and, with ``--compare DIR``, one from
that checkout too), warms the path up, then profiles ``--runs`` runs on one connection
and prints, per server, the calls (cProfile, event-loop thread; a ping included) and,
over as many runs again, the task steps by task per run. Profiling slows the server several-fold: compare these counts, never its
time, with ``bench.cpu``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import trio

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec

from . import server as srv
from .cpu import COMPARE_POOL, DEFAULT_ROOTFS, POOL

PROFILED = str(Path(__file__).with_name("profiled_server.py"))
WARM_UP = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="profiled runs per server [200]")
    p.add_argument("--compare", metavar="DIR", help="also count a server from checkout DIR")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    return p.parse_args(argv)


async def _count(server: srv.BenchServer, out: str, runs: int) -> dict[str, object]:
    async with gactor.connect(server.url) as client:
        container = await client.create(ContainerSpec(handle="calls-run"))
        try:
            for n in range(WARM_UP + 2 * runs):
                if n in (WARM_UP, WARM_UP + runs):  # calls, then steps
                    os.kill(server.pid, signal.SIGUSR1)
                    await client.ping()  # the handler (event-loop thread) has run once it answers
                await (await container.run(ProcessSpec(path="true"), ProcessIO())).wait()
            os.kill(server.pid, signal.SIGUSR2)
            await client.ping()
        finally:
            await client.destroy("calls-run")
    with open(out) as f:
        result: dict[str, object] = json.load(f)
    return result


def _one(tree: str | None, pool: str, args: argparse.Namespace) -> tuple[dict[str, object], list[str]]:
    out = tempfile.mktemp(prefix="gactor-calls-", suffix=".json", dir="/tmp")
    server = srv.start(args.rootfs, pool, "info", tree, launcher=(PROFILED,),
                       extra_env={"GACTOR_PROFILE_OUT": out})
    try:
        result = trio.run(_count, server, out, args.runs)
    finally:
        srv.stop(server)
        left = srv.leftovers(server, "calls-")
        if not srv.remove_base(server):
            left.append(f"temp dir {server.base} not removed")
        if os.path.exists(out):
            os.unlink(out)
    return result, left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.calls: the gactor server needs root", file=sys.stderr)
        return 2
    trees = [("this checkout", None, POOL)] + ([(args.compare, args.compare, COMPARE_POOL)] if args.compare else [])
    problems: list[str] = []
    for label, tree, pool in trees:
        result, left = _one(tree, pool, args)
        problems += left
        steps: dict[str, int] = result["steps"]  # type: ignore[assignment]
        calls: int = result["calls"]  # type: ignore[assignment]
        print(f"{label}: {calls / args.runs:.0f} calls and "
              f"{sum(steps.values()) / args.runs:.1f} task steps per run")
        for name, n in sorted(steps.items(), key=lambda kv: -kv[1]):
            if n >= args.runs / 2:
                print(f"  {n / args.runs:5.1f}  {name}")
    for problem in problems:
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
