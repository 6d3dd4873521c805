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
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec

from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.248.248.0/22"
TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="batches of each operation [3]")
    p.add_argument("--pairs", type=int, default=40, help="create+destroy pairs per round [40]")
    p.add_argument("--runs", type=int, default=120, help="run true + wait per round [120]")
    p.add_argument("--pings", type=int, default=400, help="pings per round [400]")
    p.add_argument("--server-tree", help="run the server from this checkout (default: this one)")
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
    names = ("create_destroy", "create + destroy"), ("run", "run `true` + wait"), ("ping", "ping")
    out = {key: (Series(f"cpu_{key}", f"{label}, whole process", "ms"),
                 Series(f"cpu_{key}_loop", f"{label}, event-loop thread", "ms"))
           for key, label in names}  # fmt: skip
    counter = iter(range(1 << 30))
    async with gactor.connect(server.url) as client:
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

        batches = ("create_destroy", pair, args.pairs), ("run", run, args.runs), ("ping", client.ping, args.pings)
        for _, op, _ in batches:  # warm up every path once
            await op()
        for _ in range(args.rounds):
            for key, op, count in batches:
                whole0, main0 = cpu_ms(server.pid)
                for _ in range(count):
                    await op()
                whole1, main1 = cpu_ms(server.pid)
                out[key][0].samples.append((whole1 - whole0) / count)
                out[key][1].samples.append((main1 - main0) / count)
    series += [s for pair_ in out.values() for s in pair_]


def main(argv: list[str] | None = None) -> int:
    return srv.run_scenario("cpu", _scenario, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
