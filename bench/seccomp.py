"""``python -m bench.seccomp``: create, run and destroy latency with seccomp on and off.

Two servers run side by side, one started with ``GACTOR_SECCOMP=off`` (which builds no
filter; docs/security.md). Each round creates a container, runs ``true`` in it and
destroys it on one server, then on the other, alternating which goes first, so both
see the same load on a shared host. Prints medians with p25-p75 per server; every
container is destroyed, both servers stopped by pid and the host checked for leftovers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import trio

import gactor

from . import server as srv

DEFAULT_ROOTFS = "/var/lib/gactor/images/busybox"
POOLS = {"on": "10.250.8.0/24", "off": "10.250.9.0/24"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.seccomp", description=__doc__)
    p.add_argument("--rounds", type=int, default=40, help="create+run+destroy per server [40]")
    p.add_argument(
        "--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]"
    )
    return p.parse_args(argv)


async def _measure(
    servers: dict[str, srv.BenchServer], rounds: int, prefix: str, live: set[str]
) -> dict[str, dict[str, list[float]]]:
    samples = {mode: {"create": [], "run": [], "destroy": []} for mode in servers}
    async with gactor.connect(servers["on"].url) as on, gactor.connect(servers["off"].url) as off:
        clients = {"on": on, "off": off}
        for i in range(rounds):
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                client, handle = clients[mode], f"{prefix}-{mode}-{i}"
                live.add(f"{mode}:{handle}")
                t = time.perf_counter()
                container = await client.create(gactor.ContainerSpec(handle=handle))
                samples[mode]["create"].append(time.perf_counter() - t)
                t = time.perf_counter()
                process = await container.run(gactor.ProcessSpec(path="true"), gactor.ProcessIO())
                await process.wait()
                samples[mode]["run"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await client.destroy(handle)
                samples[mode]["destroy"].append(time.perf_counter() - t)
                live.discard(f"{mode}:{handle}")
    return samples


def _summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"{statistics.median(ms):.1f} ms ({ms[len(ms) // 4]:.1f}-{ms[3 * len(ms) // 4]:.1f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.seccomp: the gactor server needs root", file=sys.stderr)
        return 2
    prefix = f"seccomp-{os.urandom(3).hex()}"
    servers: dict[str, srv.BenchServer] = {}
    live: set[str] = set()
    problems: list[str] = []
    load_before = os.getloadavg()
    try:
        for mode in ("on", "off"):
            os.environ["GACTOR_SECCOMP"] = mode
            servers[mode] = srv.start(args.rootfs, POOLS[mode], "info")
        os.environ.pop("GACTOR_SECCOMP")
        samples = trio.run(_measure, servers, args.rounds, prefix, live)
    finally:
        for mode, server in servers.items():
            if server.proc.poll() is None:
                server.note_shims()
                mine = {h.split(":", 1)[1] for h in live if h.startswith(f"{mode}:")}
                problems += trio.run(srv.destroy_all, server.url, mine)
            srv.stop(server)
            problems += srv.leftovers(server, prefix)
            if not srv.remove_base(server):
                problems.append(f"temp dir {server.base} not removed")
    print(
        f"loadavg before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"{args.rounds} rounds each, medians (p25-p75)"
    )
    print("| | seccomp on | seccomp off |\n|---|---|---|")
    for what in ("create", "run", "destroy"):
        print(f"| {what} | {_summary(samples['on'][what])} | {_summary(samples['off'][what])} |")
    for problem in problems:
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
