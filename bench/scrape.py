"""``python -m bench.scrape``: the time of one ``/metrics`` scrape while 1, 50 and 250
containers are alive.

It starts its own server (temp depot, network pool 10.251.0.0/21) with the operations
listener on a free loopback port, brings the number of live containers up to N (each
with its init and one ``sleep``, so there are processes to count), then times
``--runs`` scrapes: an HTTP GET of ``/metrics`` from the first byte sent to the last byte
read, over a fresh connection each time, as Prometheus does. Also recorded: the size of
the exposition and the server's own ``gactor_metrics_gather_seconds`` (its reading of the
registry census and the cgroups, without rendering and transfer). Everything is destroyed
through the API at the end and the host is checked for leftovers.
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from pathlib import Path
from time import perf_counter

import trio

import gactor
from gactor import ContainerSpec, ProcessSpec

from . import server as srv
from .report import Series

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.251.0.0/21"  # 512 /30s, clear of the tests' and the other benches' pools
POPULATIONS = (1, 50, 250)
FILL_CONCURRENCY = 10
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="scrapes per population [20]")
    p.add_argument(
        "--populations",
        type=int,
        nargs="+",
        default=list(POPULATIONS),
        help="live containers to scrape at [1 50 250]",
    )
    p.add_argument(
        "--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]"
    )
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    args = p.parse_args(argv)
    args.metrics_port = srv._free_port()
    args.server_args = ["--metrics-listen", f"127.0.0.1:{args.metrics_port}"]
    return args


def _scrape(url: str) -> tuple[float, bytes]:
    start = perf_counter()
    with _OPENER.open(url, timeout=30) as response:
        body = response.read()
    return (perf_counter() - start) * 1e3, body


def _gather_seconds(body: bytes) -> float:
    for line in body.decode().splitlines():
        if line.startswith("gactor_metrics_gather_seconds "):
            return float(line.split()[1])
    raise RuntimeError("the exposition has no gactor_metrics_gather_seconds")


def _container_series(body: bytes, handle: str) -> int:
    return sum(1 for line in body.decode().splitlines() if f'handle="{handle}"' in line)


async def _scenario(
    server: srv.BenchServer,
    args: argparse.Namespace,
    prefix: str,
    live: set[str],
    series: list[Series],
) -> None:
    url = f"http://127.0.0.1:{args.metrics_port}/metrics"
    counter = iter(range(1 << 30))
    async with gactor.connect(server.url) as client:

        async def one_more() -> None:
            handle = f"{prefix}-{next(counter)}"
            live.add(handle)
            container = await client.create(ContainerSpec(handle=handle))
            await container.run(ProcessSpec(path="sleep", args=["3600"]), gactor.ProcessIO())

        for n in sorted(args.populations):
            while len(live) < n:
                async with trio.open_nursery() as nursery:
                    for _ in range(min(FILL_CONCURRENCY, n - len(live))):
                        nursery.start_soon(one_more)
            scrape = Series(f"scrape_{n}", f"GET /metrics, {n} alive", "ms")
            gather = Series(
                f"scrape_gather_{n}", f"  of which gathering (server side), {n} alive", "ms"
            )
            size = Series(f"scrape_bytes_{n}", f"  exposition size, {n} alive", "KiB")
            for _ in range(args.runs):
                elapsed, body = await trio.to_thread.run_sync(_scrape, url)
                scrape.samples.append(elapsed)
                gather.samples.append(_gather_seconds(body) * 1e3)
                size.samples.append(len(body) / 1024)
            some = next(iter(live))
            if _container_series(body, some) == 0:
                raise RuntimeError(f"the scrape has no series for the live container {some}")
            series += [scrape, gather, size]


def main(argv: list[str] | None = None) -> int:
    return srv.run_scenario("scrape", _scenario, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
