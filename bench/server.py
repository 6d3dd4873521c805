"""The bench's own ``gactor server``: start it, stop it by pid, check what it left behind.

The server runs as ``python -m gactor server`` in a new session with a temp depot
under /tmp and its own network pool, so nothing is shared with another server.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import gactor
from gactor.kernel.firewall import table_name
from gactor.kernel.netmodel import link_prefix, server_tag
from gactor.server import ServerConfig, cgroup_parent_for

from . import procmem

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass
class BenchServer:
    url: str
    base: str  # temp dir holding the depot and the server log
    depot: str
    proc: subprocess.Popen[bytes]
    spawners: list[int] = field(default_factory=list)
    shims_seen: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(os.path.join(self.base, "server.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def note_shims(self) -> None:
        """Remember the shims alive now, to check after the stop that none survived."""
        self.shims_seen.update(procmem.shim_pids(self.depot))


def start(rootfs: str, network_pool: str, log_level: str, tree: str | None = None,
          extra_args: Sequence[str] = (), launcher: Sequence[str] = ("-m", "gactor"),
          extra_env: dict[str, str] | None = None) -> BenchServer:
    """Start a server and wait until it answers ``ping``; stop it again if it does not.
    ``tree``: a checkout whose ``gactor`` package the server runs instead of this one
    (to compare two commits in one run; the client is always this checkout's).
    ``extra_args``: more server flags (``--metrics-listen``, say). ``launcher``: what
    the interpreter runs (``bench/profiled_server.py``, say), with ``extra_env``."""
    base = tempfile.mkdtemp(prefix="gactor-bench-", dir="/tmp")
    # Unprivileged container roots must be able to traverse every ancestor of the depot.
    os.chmod(base, 0o711)
    depot = os.path.join(base, "depot")
    os.makedirs(depot)
    port = _free_port()
    cmd = [
        sys.executable, *launcher, "server",
        "--listen", f"127.0.0.1:{port}", "--depot", depot, "--default-rootfs", rootfs,
        "--network-pool", network_pool, "--log-level", log_level,
        *(_OPS_DEFAULTS if _knows_ops_flags(tree) else ()), *extra_args,
    ]  # fmt: skip
    with open(os.path.join(base, "server.log"), "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **({"PYTHONPATH": tree} if tree else {}), **(extra_env or {})},
            cwd=tree,
        )
    server = BenchServer(f"ws://127.0.0.1:{port}", base, depot, proc)
    try:
        _wait_ready(server)
    except BaseException:
        stop(server)
        remove_base(server)
        raise
    server.spawners = procmem.children_named(server.pid, "gactor-spawner")
    return server


# No metrics listener (the default port is shared by every server on the host) and logs
# for people, for servers whose checkout has these flags (one from before them has neither).
_OPS_DEFAULTS = ("--metrics-listen", "off", "--log-format", "console")


def _knows_ops_flags(tree: str | None) -> bool:
    return tree is None or os.path.isdir(os.path.join(tree, "gactor", "ops"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(server: BenchServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"gactor server exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        if trio.run(_ping, server.url):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"gactor server did not answer ping within {STARTUP_TIMEOUT}s:\n{server.log_tail()}"
    )


async def _ping(url: str) -> bool:
    with trio.move_on_after(2):
        try:
            async with gactor.connect(url) as client:
                await client.ping()
            return True
        except (gactor.GardenError, OSError):
            return False
    return False


async def destroy_all(url: str, handles: set[str]) -> list[str]:
    """Destroy ``handles`` and anything else the server still lists; return the failures."""
    failures = []
    with trio.move_on_after(120) as scope:
        async with gactor.connect(url) as client:
            listed = {c.handle for c in await client.containers()}
            for handle in sorted(handles | listed):
                try:
                    await client.destroy(handle)
                except gactor.ContainerNotFoundError:
                    pass
                except gactor.GardenError as err:
                    failures.append(f"{handle}: {err}")
                handles.discard(handle)
    if scope.cancelled_caught:
        failures.append("destroying leftovers timed out after 120 s")
    return failures


def stop(server: BenchServer) -> None:
    """SIGTERM, a bounded wait, then SIGKILL; by pid only."""
    if server.proc.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.proc.wait(timeout=STOP_TIMEOUT)


def mounts_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(prefix)]


def leftovers(server: BenchServer, handle_prefix: str) -> list[str]:
    """What the bench left on the host after the server stopped (empty = clean)."""
    # Containers live under "gactor" or a per-depot "gactor-<hash>" parent (v1: in every hierarchy).
    patterns = [
        f"{CGROUP_ROOT}/*/gactor*/{handle_prefix}*",
        f"{CGROUP_ROOT}/gactor*/{handle_prefix}*",
    ]
    parent = cgroup_parent_for(ServerConfig(depot=server.depot))
    if parent != "gactor":  # our own parent should be gone too; the shared one stays
        patterns += [f"{CGROUP_ROOT}/*/{parent}", f"{CGROUP_ROOT}/{parent}"]
    found = [f"cgroup {p}" for pattern in patterns for p in glob.glob(pattern)]
    found += [f"mount {p}" for p in mounts_under(server.base)]
    tag = server_tag(os.path.realpath(server.depot))
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(link_prefix(tag))]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    found += [f"nft table {line.strip()}" for line in tables.splitlines() if table_name(tag) in line]
    watched = sorted(server.shims_seen | set(server.spawners))
    deadline = time.monotonic() + 5.0  # the spawner exits on its own once the server is gone
    while (alive := _named_helpers(watched)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found + [f"process {pid} ({name})" for pid, name in alive]


def _named_helpers(pids: list[int]) -> list[tuple[int, str]]:
    names = [(pid, procmem.process_name(pid)) for pid in pids]
    return [(pid, name) for pid, name in names if name in ("gactor-shim", "gactor-spawner")]


def remove_base(server: BenchServer) -> bool:
    """Remove the temp dir unless something is still mounted in it (never delete through a mount)."""
    if mounts_under(server.base):
        return False
    shutil.rmtree(server.base, ignore_errors=True)
    return not os.path.exists(server.base)


def run_scenario(name: str, scenario: Any, args: Any) -> int:
    """Start a server, run ``scenario(server, args, prefix, live, series)`` (async), then
    destroy every container in ``live``, stop the server, check the host for leftovers,
    print the table and write ``<results_dir>/<name>-<stamp>.json``. The exit code: 0
    only when every series measured and nothing was left behind."""
    from .report import Series, table, write_json

    if os.geteuid() != 0:
        print(f"bench.{name}: the gactor server needs root", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%dT%H%M%S")
    prefix = f"{name}-{os.urandom(3).hex()}"
    server = start(args.rootfs, args.network_pool, "info", getattr(args, "server_tree", None),
                   getattr(args, "server_args", ()))
    print(f"server pid {server.pid} on {server.url}, depot {server.depot}", flush=True)
    live: set[str] = set()
    series: list[Series] = []
    failures: list[str] = []
    try:
        trio.run(scenario, server, args, prefix, live, series)
    except Exception as err:  # report, then clean up all the same
        series.append(Series(name, f"{name} scenario", "", error=f"{type(err).__name__}: {err}"))
    finally:
        if server.proc.poll() is None:
            server.note_shims()
            failures = trio.run(destroy_all, server.url, live)
        else:
            failures = [f"server exited early with {server.proc.returncode}:\n{server.log_tail()}"]
        stop(server)
        left = leftovers(server, prefix)
        removed = remove_base(server)
    print(table(series))
    for problem in failures + left + ([] if removed else [f"temp dir {server.base} not removed"]):
        print(f"LEFT BEHIND / CLEANUP: {problem}")
    meta: dict[str, Any] = {
        "timestamp": stamp, "scenario": name, "cpus": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "cleanup_failures": failures, "leftovers": left, "temp_dir_removed": removed,
    }  # fmt: skip
    out = args.results_dir / f"{name}-{stamp}.json"
    write_json(out, series, meta)
    print(f"wrote {out}")
    return 1 if failures or left or not removed or any(s.error for s in series) else 0
