"""``python -m bench``: start a server, run every scenario, report, leave the host clean.

Order: the kernel primitive (before any server exists), then the server's idle memory,
serial create/destroy, run and stdout in one long-lived container, and the concurrent
create/destroy rounds with the memory snapshot taken while the containers are alive.
A failing scenario is reported as an ERROR row and the others still run; cleanup
(destroy through the API, stop by pid, leak check, remove the temp depot) always runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import trio

import gactor

from . import procmem
from . import server as srv
from .metrics import metrics_cost
from .report import REFERENCE_LABEL, Series, table, write_json
from .scenarios import (
    Handles,
    concurrent,
    create,
    create_destroy,
    destroy,
    run_true,
    stdout_throughput,
    stream_throughput,
)

RESULTS_DIR = Path(__file__).parent / "results"
NET_CLASS = "/sys/class/net"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="repetitions of each latency scenario [20]")
    p.add_argument(
        "--throughput-runs",
        type=int,
        default=3,
        help="repetitions of stdout and concurrent rounds [3]",
    )
    p.add_argument(
        "--concurrency", type=int, default=50, help="containers per concurrent round [50]"
    )
    p.add_argument(
        "--mib", type=int, default=100, help="MiB written by dd in the stdout scenario [100]"
    )
    p.add_argument(
        "--only", type=lambda v: set(v.split(",")), default=set(), metavar="NAMES",
        help="run only these scenarios, comma-separated: create/destroy, run, stdout, streams, "
             "concurrent, metrics [all]",
    )
    p.add_argument(
        "--stream-runs", type=int, default=5, help="repetitions of the StreamIn/StreamOut round [5]"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 runs, 1 round of 10, 20 MiB")
    p.add_argument(
        "--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]"
    )
    p.add_argument(
        "--network-pool", default="10.250.0.0/22", help="server --network-pool [10.250.0.0/22]"
    )
    p.add_argument("--server-log-level", default="info", help="server --log-level [info]")
    p.add_argument("--server-tree", help="run the server from this checkout, e.g. a git worktree of an older commit (the client is always this one)")
    p.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes [bench/results]"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.throughput_runs, args.concurrency, args.mib, args.stream_runs = 3, 1, 10, 20, 1
    return args


def primitive_unshare(runs: int) -> Series:
    """Kernel cost of fresh mount/pid/net/uts/ipc namespaces, as a live peer baseline."""
    series = Series("primitive_unshare", "primitive: `unshare -mpnui --fork true`", "ms")
    for i in range(runs + 1):
        start = perf_counter()
        subprocess.run(["unshare", "-mpnui", "--fork", "true"], check=True)
        if i:  # the first run warms the page cache
            series.samples.append((perf_counter() - start) * 1e3)
    return series


class MemoryProbe:
    """Snapshots of the server and its helpers, in MiB, appended to one series per figure."""

    def __init__(self, server: srv.BenchServer, alive: int) -> None:
        self.server = server
        self.alive = alive
        self.idle = Series("server_pss_idle", "server PSS, idle (before)", "MiB")
        self.after = Series("server_pss_after", "server PSS, idle (after all)", "MiB")
        label = f"{alive} alive"
        self.series = {
            "server_pss": Series("server_pss", f"server PSS, {label}", "MiB"),
            "server_private": Series("server_private", f"server private, {label}", "MiB"),
            "spawner_pss": Series("spawner_pss", f"spawner PSS, {label}", "MiB"),
            "server_total_pss": Series("server_total_pss", f"server+spawner PSS, {label}", "MiB"),
            "shim_pss": Series("shim_pss", "per shim PSS", "MiB"),
            "shim_private": Series("shim_private", "per shim private", "MiB"),
            "init_pss": Series("init_pss", "per init PSS", "MiB"),
            "init_private": Series("init_private", "per init private", "MiB"),
            "helper_private": Series("helper_private", "per container shim+init private", "MiB"),
        }

    async def sample_idle(self, series: Series) -> None:
        snap = await trio.to_thread.run_sync(procmem.snapshot, self.server.pid, self.server.depot)
        series.samples.append(snap.server.pss / procmem.MIB)

    async def sample_alive(self) -> None:
        # A shim writes shim.pid (how the sample finds it) just after the server's COMMIT,
        # so a sample taken right after the last create may miss one: retry, bounded.
        for _ in range(20):
            snap = await trio.to_thread.run_sync(procmem.snapshot, self.server.pid, self.server.depot)
            if len(snap.shims) == self.alive and len(snap.inits) == self.alive:
                break
            await trio.sleep(0.1)
        self.server.note_shims()
        if len(snap.shims) != self.alive or len(snap.inits) != self.alive:
            raise RuntimeError(
                f"found {len(snap.shims)} shims and {len(snap.inits)} inits for {self.alive} containers"
            )
        s, mib = self.series, procmem.MIB
        s["server_pss"].samples.append(snap.server.pss / mib)
        s["server_private"].samples.append(snap.server.private / mib)
        spawners_pss = sum(m.pss for m in snap.spawners)
        s["spawner_pss"].samples.append(spawners_pss / mib)
        s["server_total_pss"].samples.append((snap.server.pss + spawners_pss) / mib)
        shim_private = statistics.mean(m.private for m in snap.shims) / mib
        init_private = statistics.mean(m.private for m in snap.inits) / mib
        s["shim_pss"].samples.append(statistics.mean(m.pss for m in snap.shims) / mib)
        s["shim_private"].samples.append(shim_private)
        s["init_pss"].samples.append(statistics.mean(m.pss for m in snap.inits) / mib)
        s["init_private"].samples.append(init_private)
        s["helper_private"].samples.append(shim_private + init_private)


async def _attempt(
    out: list[Series], name: str, scenario: Callable[[], Awaitable[Series | list[Series]]]
) -> None:
    """Run one scenario; a failure becomes an ERROR row instead of ending the run."""
    try:
        result = await scenario()
    except Exception as err:  # report any failure and carry on; cleanup still runs
        out.append(Series(name, name, "", error=f"{type(err).__name__}: {err}"))
        return
    out.extend(result if isinstance(result, list) else [result])


async def run_scenarios(
    server: srv.BenchServer, handles: Handles, args: argparse.Namespace, out: list[Series]
) -> None:
    """Append each scenario's series to ``out`` as it finishes (partial results survive ^C)."""
    probe = MemoryProbe(server, args.concurrency)
    try:
        await _scenarios(server, handles, args, out, probe)
    finally:
        memory = [probe.idle, probe.after, *probe.series.values()]
        out += [s for s in memory if s.samples]


async def _scenarios(
    server: srv.BenchServer,
    handles: Handles,
    args: argparse.Namespace,
    out: list[Series],
    probe: MemoryProbe,
) -> None:
    async with gactor.connect(server.url) as client:
        await probe.sample_idle(probe.idle)

        async def attempt(name: str, scenario: Callable[[], Awaitable[Series | list[Series]]]) -> None:
            if not args.only or name in args.only:
                await _attempt(out, name, scenario)

        await attempt("create/destroy", lambda: create_destroy(client, handles, args.runs))

        async def in_one_container() -> list[Series]:
            container, _ = await create(client, handles, "run")
            await attempt("run", lambda: run_true(container, args.runs))
            await attempt("stdout", lambda: stdout_throughput(container, args.throughput_runs, args.mib))
            await attempt("streams", lambda: stream_throughput(container, args.stream_runs, args.mib))
            await destroy(client, handles, container.handle)
            return []

        await _attempt(out, "long-lived container", in_one_container)
        await attempt(
            "concurrent",
            lambda: concurrent(client, handles, args.concurrency, args.throughput_runs, probe.sample_alive),
        )  # fmt: skip
        sizes = (args.concurrency,) if args.quick else (50, 250)
        await attempt("metrics", lambda: metrics_cost(client, handles, args.runs, sizes))
        await probe.sample_idle(probe.after)  # growth since "before" hints at a leak


def _git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: the gactor server needs root", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%S")
    meta: dict[str, Any] = {
        "timestamp": stamp, "commit": _git_commit(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "loadavg_start": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    print(f"gactor bench {stamp}: commit {meta['commit']}, {meta['cpus']} CPUs, kernel {meta['kernel']}, "
          f"loadavg {' '.join(f'{x:.2f}' for x in meta['loadavg_start'])}", flush=True)  # fmt: skip
    series = [primitive_unshare(args.runs)]
    handles = Handles(f"bench-{secrets.token_hex(3)}")
    links_before = set(os.listdir(NET_CLASS))
    server = srv.start(args.rootfs, args.network_pool, args.server_log_level, args.server_tree)
    print(f"server pid {server.pid} on {server.url}, depot {server.depot}", flush=True)
    failures: list[str] = []
    interrupted = False
    try:
        trio.run(run_scenarios, server, handles, args, series)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if server.proc.poll() is None:
            server.note_shims()
            failures = trio.run(srv.destroy_all, server.url, handles.live)
        else:
            failures = [f"server exited early with {server.proc.returncode}:\n{server.log_tail()}"]
        log_tail = server.log_tail()
        srv.stop(server)
        left = srv.leftovers(server, handles.prefix)
        new_links = sorted(set(os.listdir(NET_CLASS)) - links_before)
        removed = srv.remove_base(server)
    meta |= {"loadavg_end": os.getloadavg(), "cleanup_failures": failures, "leftovers": left,
             "temp_dir_removed": removed, "new_network_links": new_links}  # fmt: skip
    print(table(series))
    if interrupted:
        print("INTERRUPTED: the table holds the scenarios finished so far")
    print(f"guardian ref = {REFERENCE_LABEL}; MB/s is decimal (10^6 bytes/s); MiB = 2^20 bytes")
    print(f"loadavg at end {' '.join(f'{x:.2f}' for x in meta['loadavg_end'])}")
    for problem in failures + left + ([] if removed else [f"temp dir {server.base} not removed"]):
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    if new_links:  # not counted as a leak: another server on this host may have made them
        print(f"note: network links that appeared during the run: {' '.join(new_links)}")
    if any(s.error for s in series):
        print("server log tail:\n" + log_tail)
    if interrupted:
        return 130  # no result file: a partial run would read as a full one
    out = args.results_dir / f"{stamp}.json"
    write_json(out, series, meta)
    print(f"wrote {out}")
    return 1 if failures or left or not removed or any(s.error for s in series) else 0
