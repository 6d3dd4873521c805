"""``python -m bench.cpu``: the server's own CPU time per operation.

Wall-clock latency on this 2-core host swings with whatever else runs; the CPU the server
process spends per operation hardly does, so this is the figure to compare two commits
by (``--server-tree`` runs another checkout's server against the same client, e.g. a
``git worktree`` of an older commit). Per round it times, on one connection:
``--pairs`` create+destroy pairs, ``--runs`` ``run true`` + wait in one container and
``--pings`` pings, and reads the server's CPU before and after each batch:

* whole process: utime+stime of every thread, exited ones included (``/proc/PID/stat``,
  10 ms ticks, so ±10 ms over the batch);
* event-loop thread: the main thread's time on CPU (``/proc/PID/task/PID/schedstat``, ns).

Shims, the spawner and container processes are not the server and are not counted.

``--compare DIR`` starts a second server from checkout DIR next to the first and
alternates the two round by round (same client, same host load), so two commits are
compared in one invocation: its series are the same keys with ``@compare`` appended.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec

from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.248.248.0/22"
COMPARE_POOL = "10.248.244.0/22"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="batches of each operation [3]")
    p.add_argument("--pairs", type=int, default=40, help="create+destroy pairs per round [40]")
    p.add_argument("--runs", type=int, default=120, help="run true + wait per round [120]")
    p.add_argument("--pings", type=int, default=400, help="pings per round [400]")
    p.add_argument("--server-tree", help="run the server from this checkout (default: this one)")
    p.add_argument("--compare", metavar="DIR", help="also run a server from checkout DIR, alternating rounds")
    p.add_argument("--compare-pool", default=COMPARE_POOL, help=f"--network-pool of that server [{COMPARE_POOL}]")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    return p.parse_args(argv)


def cpu_ms(pid: int) -> tuple[float, float]:
    """(whole process, main thread) CPU time so far, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    whole = (int(fields[11]) + int(fields[12])) * TICK_MS  # utime, stime
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        main = int(f.read().split()[0]) / 1e6
    return whole, main


async def _scenario(server: srv.BenchServer, args: argparse.Namespace, prefix: str,
                    live: set[str], series: list[Series]) -> None:
    servers = [(server, "", live, prefix)]
    if args.compare_server is not None:  # its own handles: each server's leftovers are checked apart
        servers.append((args.compare_server, "@compare", args.compare_live, compare_prefix(prefix)))
    names = ("create_destroy", "create + destroy"), ("run", "run `true` + wait"), ("ping", "ping")
    out: dict[str, tuple[Series, Series]] = {}
    async with contextlib.AsyncExitStack() as stack:
        plans = []
        for one, suffix, handles, handle_prefix in servers:
            client = await stack.enter_async_context(gactor.connect(one.url))
            batches = await _batches(client, args, handle_prefix, handles)
            label = f" ({args.compare})" if suffix else ""
            for key, text in names:
                out[key + suffix] = (Series(f"cpu_{key}{suffix}", f"{text}, whole process{label}", "ms"),
                                     Series(f"cpu_{key}_loop{suffix}", f"{text}, event-loop thread{label}", "ms"))
            plans.append((one, suffix, batches))
        for _, _, batches in plans:  # warm up every path once
            for _, op, _ in batches:
                await op()
        for _ in range(args.rounds):
            for one, suffix, batches in plans:  # the servers alternate, round by round
                for key, op, count in batches:
                    whole0, main0 = cpu_ms(one.pid)
                    for _ in range(count):
                        await op()
                    whole1, main1 = cpu_ms(one.pid)
                    out[key + suffix][0].samples.append((whole1 - whole0) / count)
                    out[key + suffix][1].samples.append((main1 - main0) / count)
    series += [s for pair_ in out.values() for s in pair_]


def compare_prefix(prefix: str) -> str:
    """The compare server's handle prefix: not one the first server's prefix matches."""
    return prefix.replace("cpu-", "cpucmp-", 1)


async def _batches(client: gactor.Client, args: argparse.Namespace, prefix: str,
                   live: set[str]) -> list[tuple[str, Callable[[], Awaitable[Any]], int]]:
    counter = iter(range(1 << 30))
    box = f"{prefix}-run"
    live.add(box)
    container = await client.create(ContainerSpec(handle=box))

    async def pair() -> None:
        handle = f"{prefix}-{next(counter)}"
        live.add(handle)
        await client.create(ContainerSpec(handle=handle))
        await client.destroy(handle)
        live.discard(handle)

    async def run() -> None:
        await (await container.run(ProcessSpec(path="true"), ProcessIO())).wait()

    return [("create_destroy", pair, args.pairs), ("run", run, args.runs), ("ping", client.ping, args.pings)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.compare_server, args.compare_live = None, set()
    if args.compare is None:
        return srv.run_scenario("cpu", _scenario, args)
    if os.geteuid() != 0:
        print("bench.cpu: the gactor server needs root", file=sys.stderr)
        return 2
    other = srv.start(args.rootfs, args.compare_pool, "info", args.compare)
    print(f"compare server pid {other.pid} on {other.url} (from {args.compare})", flush=True)
    args.compare_server = other
    try:
        code = srv.run_scenario("cpu", _scenario, args)
    finally:
        problems: list[str] = []
        if other.proc.poll() is None:
            other.note_shims()
            problems = trio.run(srv.destroy_all, other.url, args.compare_live)
        srv.stop(other)
        problems += srv.leftovers(other, "cpucmp-")
        if not srv.remove_base(other):
            problems.append(f"temp dir {other.base} not removed")
        for problem in problems:
            print(f"LEFT BEHIND / CLEANUP (compare server): {problem}")
    return 1 if problems else code


if __name__ == "__main__":
    raise SystemExit(main())
