"""``python -m bench.burst``: 50 concurrent creates and destroys, with the CPU they cost.

A round of 50 creates saturates this 2-core host, so its wall time follows the CPU that
everything it starts spends, and that CPU is the figure that says where a slower round
went. The server and its spawner are put into cpuacct cgroups of their own (cgroup v1:
the spawner with every process it forks, which the shims and the warm pool are), and the
containers' processes are in the server's container cgroups already. Per round (``-n``
creates at once, then ``-n`` destroys at once, on one connection, ``--pause`` seconds
apart) it reports the wall time and the user+system CPU of: the server (every thread),
the helpers (spawner, shims, warm shims) and the containers (pid 1 and what it started).
CPU the kernel spends in its own threads (RCU, the netns clean-up) is in none of them.

``--server-tree DIR`` runs another checkout's server (the client is this one); comparing
two commits means alternating invocations, as for ``python -m bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import trio

from gactor import ContainerSpec
from gactor.server import ServerConfig, cgroup_parent_for

from . import server as srv
from .report import Series
from .scenarios import _all_at_once

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
POOL = "10.250.0.0/22"
CPUACCT = "/sys/fs/cgroup/cpuacct"
PARTS = ("server", "helpers", "containers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of creates and destroys [3]")
    p.add_argument("-n", "--concurrency", type=int, default=50, help="containers per round [50]")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between rounds and phases [1]")
    p.add_argument("--server-tree", help="run the server from this checkout (default: this one)")
    p.add_argument("--rootfs", default=DEFAULT_ROOTFS, help=f"server --default-rootfs [{DEFAULT_ROOTFS}]")
    p.add_argument("--network-pool", default=POOL, help=f"server --network-pool [{POOL}]")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    return p.parse_args(argv)


def _descendants(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                for child in f.read().split():
                    found += [int(child), *_descendants(int(child))]
    return found


def _move(pid: int, cgroup: str) -> None:
    with contextlib.suppress(ProcessLookupError), open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _usage(cgroup: str) -> float:
    """User+system seconds of ``cgroup`` and its children (0 once it is gone)."""
    try:
        with open(os.path.join(cgroup, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9
    except OSError:
        return 0.0


@contextlib.contextmanager
def _accounted(server: srv.BenchServer) -> Iterator[dict[str, str]]:
    """The server and its helpers in cgroups of their own until the block ends (then
    back where they were: the host's root cpuacct group)."""
    base = os.path.join(CPUACCT, f"gactor-bench-burst-{os.getpid()}")
    groups = {"server": os.path.join(base, "server"), "helpers": os.path.join(base, "helpers"),
              "containers": os.path.join(CPUACCT, cgroup_parent_for(ServerConfig(depot=server.depot)))}
    for part in ("server", "helpers"):
        os.makedirs(groups[part])
    try:
        _move(server.pid, groups["server"])
        for pid in _descendants(server.pid):
            _move(pid, groups["helpers"])
        yield groups
    finally:
        for part in ("server", "helpers"):
            with open(os.path.join(groups[part], "cgroup.procs")) as f:
                for pid in f.read().split():
                    _move(int(pid), CPUACCT)
            os.rmdir(groups[part])
        os.rmdir(base)


async def _scenario(server: srv.BenchServer, args: argparse.Namespace, prefix: str, live: set[str],
                    series: list[Series]) -> None:
    import gactor

    n = args.concurrency
    rows: dict[str, Series] = {}
    for phase in ("create", "destroy"):
        rows[phase] = Series(f"burst_{phase}", f"{n} concurrent {phase}s", "s")
        for part in PARTS:
            rows[f"{phase}_{part}"] = Series(f"burst_{phase}_cpu_{part}", f"{n} {phase}s: {part} CPU", "s")
    series.extend(rows.values())
    async with gactor.connect(server.url) as client:
        warm = f"{prefix}-warm"
        live.add(warm)
        await client.create(ContainerSpec(handle=warm))  # imports the image: not a round's work
        await client.destroy(warm)
        live.discard(warm)
        with _accounted(server) as groups:
            for r in range(args.rounds):
                names = [f"{prefix}-{r}-{i}" for i in range(n)]
                live.update(names)
                for phase, call in (("create", lambda h: client.create(ContainerSpec(handle=h))),
                                    ("destroy", client.destroy)):
                    await trio.sleep(args.pause)
                    before = {part: _usage(groups[part]) for part in PARTS}
                    rows[phase].samples.append(await _all_at_once(call, names))
                    for part in PARTS:
                        rows[f"{phase}_{part}"].samples.append(_usage(groups[part]) - before[part])
                live.difference_update(names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(CPUACCT, "cpuacct.usage")):
        print(f"bench.burst: needs cgroup v1's cpuacct hierarchy at {CPUACCT}", file=sys.stderr)
        return 2
    return srv.run_scenario("burst", _scenario, args)


if __name__ == "__main__":
    sys.exit(main())
