"""``python -m bench.restart``: server restart time with N live containers, and memory per container.

It starts its own server (temp depot under /tmp, network pool 10.248.252.0/22), creates
N containers (default 100) each running ``sleep``, samples the memory of the server, the
shims and the container inits, then ``--restarts`` times: SIGKILL the server, start a
new one on the same depot and time

* until ``ping`` answers (the registry re-adopts before the API listens), and
* until ``containers()`` lists all N (and a lookup + info on one of them answers).

Afterwards every container is destroyed through the API, the server is stopped by pid
and the host is checked for leftovers (as ``python -m bench`` does).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

import gactor

from . import procmem
from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.248.252.0/22"  # inside the e2e range 10.248/16, clear of the tests' /24s
CREATE_CONCURRENCY = 10
READY_TIMEOUT = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.splitlines()[0])
    p.add_argument("--containers", type=int, default=100, help="live containers [100]")
    p.add_argument("--restarts", type=int, default=3, help="kill -9 + restart rounds [3]")
    p.add_argument(
        "--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]"
    )
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    return p.parse_args(argv)


def _relaunch(server: srv.BenchServer, rootfs: str, pool: str) -> None:
    """A new server process on the same depot (and a new free port); no waiting."""
    port = srv._free_port()
    cmd = [
        sys.executable, "-m", "gactor", "server",
        "--listen", f"127.0.0.1:{port}", "--depot", server.depot, "--default-rootfs", rootfs,
        "--network-pool", pool, "--log-level", "info",
    ]  # fmt: skip
    with open(os.path.join(server.base, "server.log"), "ab") as log:
        server.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server.url = f"ws://127.0.0.1:{port}"


async def _kill(server: srv.BenchServer) -> None:
    os.kill(server.pid, signal.SIGKILL)
    await trio.to_thread.run_sync(server.proc.wait)


async def _until_ping(server: srv.BenchServer) -> None:
    with trio.fail_after(READY_TIMEOUT):
        while not await srv._ping(server.url):
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {server.proc.returncode}:\n{server.log_tail()}"
                )
            await trio.sleep(0.005)


async def _until_listed(url: str, handles: set[str]) -> None:
    with trio.fail_after(READY_TIMEOUT):
        async with gactor.connect(url) as client:
            while True:
                if {c.handle for c in await client.containers()} == handles:
                    break
                await trio.sleep(0.005)
            one = await client.lookup(min(handles))
            await one.info()


async def _create_all(url: str, prefix: str, n: int, live: set[str]) -> None:
    async with gactor.connect(url) as client:
        limiter = trio.CapacityLimiter(CREATE_CONCURRENCY)

        async def one(i: int) -> None:
            handle = f"{prefix}-{i:03d}"
            async with limiter:
                live.add(handle)  # recorded before the create: cleanup finds it either way
                c = await client.create(gactor.ContainerSpec(handle=handle))
                await c.run(gactor.ProcessSpec(path="sleep", args=["100000"]), gactor.ProcessIO())

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)


def _memory(server: srv.BenchServer, n: int, when: str, out: dict[str, Series]) -> None:
    snap = procmem.snapshot(server.pid, server.depot)
    if len(snap.shims) != n or len(snap.inits) != n:
        raise RuntimeError(
            f"{when}: found {len(snap.shims)} shims and {len(snap.inits)} inits for {n}"
        )
    mib = procmem.MIB
    shim = statistics.mean(m.pss for m in snap.shims)
    init = statistics.mean(m.pss for m in snap.inits)
    spawners = sum(m.pss for m in snap.spawners)

    def add(key: str, label: str, value: float) -> None:
        out.setdefault(key, Series(key, label, "MiB")).samples.append(value / mib)

    add(f"server_pss_{when}", f"server+spawner PSS, {n} alive, {when}", snap.server.pss + spawners)
    add("shim_pss", "per container: shim PSS", shim)
    add("init_pss", "per container: garden-init PSS", init)
    add(
        "per_container_pss",
        "per container: shim+init PSS + server share",
        shim + init + (snap.server.pss + spawners) / n,
    )


async def _scenario(
    server: srv.BenchServer,
    args: argparse.Namespace,
    prefix: str,
    live: set[str],
    series: list[Series],
) -> None:
    n = args.containers
    created = Series(
        "create_all", f"create {n} containers + run sleep (x{CREATE_CONCURRENCY})", "s"
    )
    start = time.perf_counter()
    await _create_all(server.url, prefix, n, live)
    created.samples.append(time.perf_counter() - start)
    series.append(created)
    memory: dict[str, Series] = {}
    await trio.to_thread.run_sync(_memory, server, n, "before", memory)
    ping = Series("restart_ping", f"kill -9 -> restart -> ping answers ({n} containers)", "s")
    listed = Series("restart_listed", f"kill -9 -> restart -> all {n} listed", "s")
    for _ in range(args.restarts):
        await _kill(server)
        start = time.perf_counter()
        _relaunch(server, args.rootfs, args.network_pool)
        await _until_ping(server)
        ping.samples.append(time.perf_counter() - start)
        await _until_listed(server.url, set(live))
        listed.samples.append(time.perf_counter() - start)
    series += [ping, listed]
    await trio.to_thread.run_sync(_memory, server, n, "after", memory)
    series += list(memory.values())


def main(argv: list[str] | None = None) -> int:
    return srv.run_scenario("restart", _scenario, parse_args(argv))

if __name__ == "__main__":
    raise SystemExit(main())
