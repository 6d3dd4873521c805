"""The cost of reading metrics: one ``metrics()`` call, and ``bulk_metrics`` over many
containers (issue 3: "metrics for 250 containers in one bulk call well under a second").

Run by the harness (``python -m bench``) or on its own, with its own server:
``sudo .venv/bin/python -m bench.metrics [--runs N] [--sizes 50,250]``. Containers are
created all at once, each bulk call is timed ``runs`` times (one untimed warm-up),
then they are destroyed all at once; only the awaited client call is inside the timer.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from time import perf_counter
from typing import Any

import trio

import gactor

from . import server as srv
from .report import Series, table
from .scenarios import OP_TIMEOUT, BenchError, Handles, _all_at_once, create, destroy

SIZES = (50, 250)
# A /22 holds 256 containers (one /30 each): room for the 250 and the single one.
NETWORK_POOL = "10.250.0.0/22"


async def metrics_cost(
    client: Any, handles: Handles, runs: int, sizes: tuple[int, ...] = SIZES
) -> list[Series]:
    """One series for a single ``metrics()`` call, one per bulk size, all in ms."""
    out = [await _one(client, handles, runs)]
    for n in sizes:
        out.append(await _bulk(client, handles, runs, n))
    return out


async def _one(client: Any, handles: Handles, runs: int) -> Series:
    series = Series("metrics", "metrics() of one container", "ms")
    container, _ = await create(client, handles, "metrics")
    try:
        for i in range(runs + 1):
            with trio.fail_after(OP_TIMEOUT):
                start = perf_counter()
                await container.metrics()
                elapsed = (perf_counter() - start) * 1e3
            if i:  # the first call warms the path
                series.samples.append(elapsed)
    finally:
        await destroy(client, handles, container.handle)
    return series


async def _bulk(client: Any, handles: Handles, runs: int, n: int) -> Series:
    series = Series(f"bulk_metrics_{n}", f"bulk_metrics, {n} containers", "ms")
    names = [handles.new("mbulk") for _ in range(n)]
    handles.live.update(names)
    try:
        await _all_at_once(lambda h: client.create(gactor.ContainerSpec(handle=h)), names)
        for i in range(runs + 1):
            with trio.fail_after(OP_TIMEOUT):
                start = perf_counter()
                entries = await client.bulk_metrics(names)
                elapsed = (perf_counter() - start) * 1e3
            failed = [h for h in names if h not in entries or entries[h].err is not None]
            if failed:
                raise BenchError(f"bulk_metrics failed for {len(failed)} of {n}, e.g. {failed[0]}")
            if i:
                series.samples.append(elapsed)
    finally:
        with trio.CancelScope(shield=True):
            await _all_at_once(client.destroy, names)
        handles.live.difference_update(names)
    return series


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.metrics", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="timed calls per figure [20]")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="bulk sizes [50,250]")
    p.add_argument(
        "--rootfs", default=os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
    )
    p.add_argument(
        "--network-pool", default=NETWORK_POOL, help=f"server --network-pool [{NETWORK_POOL}]"
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: the gactor server needs root", file=sys.stderr)
        return 2
    sizes = tuple(int(s) for s in args.sizes.split(","))
    handles = Handles(f"bench-{secrets.token_hex(3)}")
    server = srv.start(args.rootfs, args.network_pool, "info")
    print(f"server pid {server.pid} on {server.url}, depot {server.depot}", flush=True)
    series: list[Series] = []
    try:
        series = trio.run(_run, server.url, handles, args.runs, sizes)
    finally:
        failures = (
            trio.run(srv.destroy_all, server.url, handles.live)
            if server.proc.poll() is None
            else []
        )
        srv.stop(server)
        left = srv.leftovers(server, handles.prefix)
        removed = srv.remove_base(server)
    print(table(series))
    for problem in failures + left + ([] if removed else [f"temp dir {server.base} not removed"]):
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    return 1 if failures or left or not removed else 0


async def _run(url: str, handles: Handles, runs: int, sizes: tuple[int, ...]) -> list[Series]:
    async with gactor.connect(url) as client:
        return await metrics_cost(client, handles, runs, sizes)


if __name__ == "__main__":
    raise SystemExit(main())
