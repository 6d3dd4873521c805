"""``python -m bench.ab``: create and destroy latency of two server checkouts, interleaved.

Wall-clock latency on this shared 2-core host swings with whatever else runs, so two
commits are only comparable when measured under the same load: this starts one server
per checkout (``--tree``, default: this checkout, each with its own depot and network
pool) and alternates between them one create+destroy pair at a time, A, B, A, B ...,
on one client connection each. Both rows see the same minutes of load; what differs is
the server. Each create and each destroy is timed on its own, round trip from the
client, as in ``python -m bench``'s serial rows (networking on: every container gets an
address from the pool, a veth and its firewall state).

    python -m bench.ab --tree /tmp/main-checkout --tree . --pairs 60
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import trio

import gactor
from gactor import ContainerSpec

from . import server as srv
from .report import Series, summary, write_json

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOLS = ("10.248.236.0/22", "10.248.232.0/22", "10.248.228.0/22", "10.248.224.0/22")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", default=[], help="a server checkout (repeat; at most 4) [this one]")
    p.add_argument("--pairs", type=int, default=40, help="timed create+destroy pairs per server [40]")
    p.add_argument("--warmup", type=int, default=3, help="untimed pairs per server first [3]")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = p.parse_args(argv)
    args.tree = [os.path.realpath(t) for t in args.tree] or [os.path.realpath(".")]
    if len(args.tree) > len(POOLS):
        p.error(f"at most {len(POOLS)} trees")
    return args


async def _pairs(servers: list[srv.BenchServer], args: argparse.Namespace, prefix: str,
                 live: list[set[str]], series: list[tuple[Series, Series]]) -> None:
    async with trio.open_nursery() as nursery:
        clients = []
        for server in servers:
            send, receive = trio.open_memory_channel[gactor.Client](0)
            nursery.start_soon(_hold, server.url, send)
            clients.append(await receive.receive())
        for n in range(args.warmup + args.pairs):
            order = range(len(servers)) if n % 2 == 0 else reversed(range(len(servers)))
            for i in order:  # alternate who goes first, so neither always follows the other
                handle = f"{prefix}-{i}-{n}"
                live[i].add(handle)
                started = time.perf_counter()
                await clients[i].create(ContainerSpec(handle=handle))
                created = time.perf_counter()
                await clients[i].destroy(handle)
                destroyed = time.perf_counter()
                live[i].discard(handle)
                if n >= args.warmup:
                    series[i][0].samples.append((created - started) * 1000)
                    series[i][1].samples.append((destroyed - created) * 1000)
        nursery.cancel_scope.cancel()


async def _hold(url: str, send: trio.MemorySendChannel[gactor.Client]) -> None:
    async with gactor.connect(url) as client:
        await send.send(client)
        await trio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.ab: the gactor server needs root")
        return 2
    prefix = f"ab-{os.urandom(3).hex()}"
    servers: list[srv.BenchServer] = []
    live: list[set[str]] = [set() for _ in args.tree]
    series = [(Series(f"create_{i}", f"create, {tree}", "ms"), Series(f"destroy_{i}", f"destroy, {tree}", "ms"))
              for i, tree in enumerate(args.tree)]
    problems: list[str] = []
    load = [os.getloadavg()[0]]
    try:
        for tree, pool in zip(args.tree, POOLS, strict=False):
            servers.append(srv.start(args.rootfs, pool, "info", None if tree == os.path.realpath(".") else tree))
        trio.run(_pairs, servers, args, prefix, live, series)
    finally:
        load.append(os.getloadavg()[0])
        for server, handles in zip(servers, live, strict=False):
            if server.proc.poll() is None:
                server.note_shims()
                problems += trio.run(srv.destroy_all, server.url, handles)
            srv.stop(server)
            problems += srv.leftovers(server, prefix)
            if not srv.remove_base(server):
                problems.append(f"temp dir {server.base} not removed")
    print(f"{'server tree':<40} {'create median (p10-p90)':>26} {'destroy median (p10-p90)':>26}")
    for tree, (create, destroy) in zip(args.tree, series, strict=True):
        c, d = summary(create.samples), summary(destroy.samples)
        print(f"{tree:<40} {c['median']:>9.1f} ms ({c['p10']:.1f}-{c['p90']:.1f})"
              f" {d['median']:>11.1f} ms ({d['p10']:.1f}-{d['p90']:.1f})")
    print(f"load average {load[0]:.2f} -> {load[1]:.2f}, {args.pairs} pairs per server")
    for problem in problems:
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    out = args.results_dir / f"ab-{time.strftime('%Y%m%dT%H%M%S')}.json"
    write_json(out, [s for pair in series for s in pair],
               {"trees": args.tree, "load": load, "leftovers": problems, "cpus": os.cpu_count()})
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
