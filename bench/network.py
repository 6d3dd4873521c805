"""``python -m bench.network``: create and destroy with networking while 1, 50 and 250
containers are alive (is it flat?), NetIn, and BulkNetOut of 3,000 rules.

It starts its own server (temp depot, network pool 10.248.240.0/21), then for each
population N: brings the number of live containers up to N, and times ``--runs`` creates,
each followed by a destroy, of one more container. Every container gets a veth, an
address and firewall state, so these are the network set-up and tear-down costs on top of
the rest of a create. Then one ``net_in`` and one ``bulk_net_out`` of 3,000 rules
(Garden's performance suite; the reference server takes 98 ms) per run. Everything is
destroyed through the API at the end and the host is checked for leftovers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from time import perf_counter

import trio

import gactor
from gactor import ContainerSpec
from gactor.types import IPRange, NetOutRule, PortRange, Protocol

from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.248.240.0/21"  # 512 /30s, inside the e2e range 10.248/16, clear of the tests' /24s
POPULATIONS = (1, 50, 250)
FILL_CONCURRENCY = 10
# After a fill, before timing: the burst's background work (warm-pool refills, veth and
# nft work queued behind it) settles, so the rows compare populations, not a fill's wake.
SETTLE = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="creates+destroys per population [15]")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--server-tree", help="run the server from this checkout (a git worktree of another commit)")
    return p.parse_args(argv)


def bulk_rules(n: int) -> list[NetOutRule]:
    return [NetOutRule(protocol=Protocol.TCP, networks=[IPRange(f"10.1.{i // 250}.{i % 250}", "")],
                       ports=[PortRange(1000 + i % 60000, 0)]) for i in range(n)]


async def _scenario(server: srv.BenchServer, args: argparse.Namespace, prefix: str,
                    live: set[str], series: list[Series]) -> None:
    counter = iter(range(1 << 30))
    async with gactor.connect(server.url) as client:
        async def one_more() -> None:
            handle = f"{prefix}-bg-{next(counter)}"
            live.add(handle)
            await client.create(ContainerSpec(handle=handle))

        for n in POPULATIONS:
            filled = False
            while len(live) < n:
                filled = True
                async with trio.open_nursery() as nursery:
                    for _ in range(min(FILL_CONCURRENCY, n - len(live))):
                        nursery.start_soon(one_more)
            if filled:
                await trio.sleep(SETTLE)
            created = Series(f"net_create_{n}", f"create with networking, {n} alive", "ms")
            destroyed = Series(f"net_destroy_{n}", f"destroy with networking, {n} alive", "ms")
            for _ in range(args.runs):
                handle = f"{prefix}-t-{next(counter)}"
                live.add(handle)
                start = perf_counter()
                await client.create(ContainerSpec(handle=handle))
                created.samples.append((perf_counter() - start) * 1e3)
                start = perf_counter()
                await client.destroy(handle)
                destroyed.samples.append((perf_counter() - start) * 1e3)
                live.discard(handle)
            series += [created, destroyed]
        net_in = Series("net_in", "net_in (host port from the pool)", "ms")
        bulk = Series("bulk_net_out_3000", "bulk_net_out of 3,000 rules", "ms")
        rules = bulk_rules(3000)
        for _ in range(max(3, args.runs // 3)):
            handle = f"{prefix}-n-{next(counter)}"
            live.add(handle)
            container = await client.create(ContainerSpec(handle=handle))
            start = perf_counter()
            await container.net_in(0, 8080)
            net_in.samples.append((perf_counter() - start) * 1e3)
            start = perf_counter()
            await container.bulk_net_out(rules)
            bulk.samples.append((perf_counter() - start) * 1e3)
            await client.destroy(handle)
            live.discard(handle)
        series += [net_in, bulk]


def main(argv: list[str] | None = None) -> int:
    return srv.run_scenario("network", _scenario, parse_args(argv))

if __name__ == "__main__":
    raise SystemExit(main())
