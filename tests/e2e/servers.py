"""The ``gactor server`` processes the e2e suite starts: the shared session server
(``conftest.py``) and the servers single tests own (restart, registry, limits, auth).

Each ``ServerProcess`` runs ``python -m gactor server`` in a new session on a free
loopback port, with its own depot under /tmp and its own network pool, so it never
touches another server's state; every start on the same depot appends to one log. It is
signalled and stopped by pid only, never by name. The methods are async; a sync fixture
uses ``running_server``, which drives them with ``trio.run``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import trio

import gactor
from gactor.kernel import depot, shims
from gactor.kernel import linux as L
from gactor.kernel.firewall import table_name
from gactor.kernel.netmodel import link_prefix, server_tag
from gactor.server import ServerConfig, cgroup_parent_for

from .helpers import (
    ROOTFS,
    cgroup_hierarchies,
    mounts_containing,
    proc_name,
    server_cgroup_dirs,
    server_forkers,
    server_inits,
    server_shims,
    wait_until_equal,
)
from .tls import TlsFiles

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TEARDOWN_TIMEOUT = 60.0
LEFTOVER_KINDS = ("cgroups", "mounts", "container dirs", "half-built images", "shims", "forkers", "inits", "links",
                  "nft tables")

# What a failed start or cleanup may raise: pytest.fail's exception is a BaseException.
_CLEANUP_ERRORS = (Exception, pytest.fail.Exception)


def nft_tables() -> list[str]:
    """``family name`` of every nftables table on the host."""
    out = subprocess.run(["nft", "-j", "list", "tables"], check=True, capture_output=True, text=True).stdout
    return [f"{t['table']['family']} {t['table']['name']}" for t in json.loads(out)["nftables"] if "table" in t]


def gactor_command(*args: str) -> list[str]:
    """``python -m gactor ARGS...`` with the interpreter running the tests."""
    return [sys.executable, "-m", "gactor", *args]


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``gactor server`` subprocess on its own depot; restartable on that depot.

    ``args`` are extra server flags for every start (``--max-containers 3``,
    ``--cpu-quota-per-share 100``...); ``token`` is passed as ``--token`` and used by
    every client this object connects. Each start listens on a fresh free port, or with
    ``unix_socket`` on ``api.sock`` in the server's temp dir; ``tls`` (a ``TlsFiles``)
    serves ``wss://`` and makes ``connect`` verify the server with its certificate.
    """

    def __init__(
        self, name: str, pool: str, args: Sequence[str] = (), *, token: str | None = None,
        unix_socket: bool = False, tls: TlsFiles | None = None,
    ) -> None:
        self.name = name
        # A short path: unix sockets and overlay options under the depot have length limits.
        # mkdtemp makes 0700: unprivileged container roots (host uid 4294967294) must be
        # able to traverse every ancestor of the depot to reach their rootfs.
        self.base = tempfile.mkdtemp(prefix=f"gactor-{name}-", dir="/tmp")
        os.chmod(self.base, 0o711)
        self.depot = os.path.join(self.base, "depot")
        os.mkdir(self.depot, 0o711)
        self.pool = pool
        self.args = list(args)
        self.allow_host_access = True  # False: Garden's default, containers reach no host service
        self.token = token
        self.tls = tls
        self.socket_path = os.path.join(self.base, "api.sock") if unix_socket else None
        self.log_path = os.path.join(self.base, "server.log")
        self.cgroup_parent = cgroup_parent_for(ServerConfig(depot=self.depot))
        self.tag = server_tag(os.path.realpath(self.depot))
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.finished = False

    @property
    def pid(self) -> int:
        assert self.proc is not None, "never started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def container_dir(self, handle: str) -> str:
        return os.path.join(self.depot, "containers", depot.dir_name(handle))

    def shim_pid(self, handle: str) -> int:
        """The pid of ``handle``'s shim, found by its title from outside (as reconcile does)."""
        found = shims.find(os.path.join(self.depot, depot.CONTAINERS))
        name = depot.dir_name(handle)
        assert name in found, f"no shim for {handle!r} among {sorted(found)}"
        return found[name]

    def container_root(self, handle: str) -> str:
        """``handle``'s root file system from the host: its pid 1's root (the overlay is
        mounted in the container's mount namespace only)."""
        shim = self.shim_pid(handle)
        with open(f"/proc/{shim}/task/{shim}/children") as f:
            children = [int(p) for p in f.read().split()]
        inits = [p for p in children if proc_name(p) == "garden-init"]
        assert len(inits) == 1, f"{handle!r}: shim {shim} has children {children}, garden-init among them {inits}"
        return f"/proc/{inits[0]}/root"

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no log)"

    def log_tail(self, lines: int = 60) -> str:
        return "".join(self.log_text().splitlines(keepends=True)[-lines:])

    def note(self, text: str) -> None:
        """A line in the server log, to find a test's steps among the server's (the token
        shown as ``<token>``: tests check that the server itself never logs it)."""
        if self.token:
            text = text.replace(self.token, "<token>")
        with open(self.log_path, "a") as log:
            log.write(f"==== {text}\n")

    # ---- the process -----------------------------------------------------------------

    def spawn(self, *extra: str, host: str = "127.0.0.1") -> None:
        """Start the process without waiting for it to answer."""
        assert not self.running, "already running"
        port = free_port()
        token = ["--token", self.token] if self.token else []
        tls = ["--tls-cert", self.tls.cert, "--tls-key", self.tls.key] if self.tls else []
        listen = f"unix://{self.socket_path}" if self.socket_path else f"{host}:{port}"
        cmd = gactor_command(
            "server", "--listen", listen, "--depot", self.depot,
            "--default-rootfs", ROOTFS, "--network-pool", self.pool, "--log-level", "info",
            # No metrics listener unless a test asks for one (the default port is shared),
            # and logs for people: tests read them. Later flags override these.
            "--metrics-listen", "off", "--log-format", "console",
            # The networking tests measure and ping through the gateway; Garden's default
            # (no host access) has a test of its own (test_net_outside).
            *(["--allow-host-access"] if self.allow_host_access else []),
            *token, *tls, *self.args, *extra,
        )  # fmt: skip
        self.note(" ".join(cmd))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        if self.socket_path:
            self.url = f"unix://{self.socket_path}"
        else:
            self.url = f"{'wss' if self.tls else 'ws'}://127.0.0.1:{port}"

    async def pings(self) -> bool:
        """Whether the server answers ping within 2 s."""
        with trio.move_on_after(2):
            try:
                async with self.connect() as client:
                    await client.ping()
                return True
            except gactor.GardenError:  # not up yet: refused, reset, handshake failure
                return False
        return False

    async def wait_ready(self) -> None:
        """Poll ping until it answers; fail with the log tail on an early exit or timeout."""
        deadline = trio.current_time() + STARTUP_TIMEOUT
        while trio.current_time() < deadline:
            if not self.running:
                pytest.fail(
                    f"{self.name} server exited with {self.returncode} at startup:\n"
                    + self.log_tail()
                )
            if await self.pings():
                return
            await trio.sleep(0.02)
        pytest.fail(
            f"{self.name} server did not answer ping within {STARTUP_TIMEOUT}s:\n" + self.log_tail()
        )

    async def start(self, *extra: str) -> None:
        self.spawn(*extra)
        await self.wait_ready()

    async def wait_exit(self, within: float) -> bool:
        """Whether the process exited within ``within`` seconds."""
        proc = self.proc
        assert proc is not None, "never started"
        deadline = trio.current_time() + within
        while True:
            if proc.poll() is not None:
                return True
            if trio.current_time() >= deadline:
                return False
            await trio.sleep(0.01)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the server (by pid) and wait until it has exited."""
        assert self.running
        os.kill(self.pid, sig)
        if not await self.wait_exit(STOP_TIMEOUT):
            os.kill(self.pid, signal.SIGKILL)
            await self.wait_exit(STOP_TIMEOUT)
            pytest.fail(f"server ignored signal {sig} for {STOP_TIMEOUT}s:\n{self.log_tail()}")

    async def stop(self) -> None:
        """Graceful stop (SIGTERM), SIGKILL after a bounded wait; by pid only."""
        if self.running:
            os.kill(self.pid, signal.SIGTERM)
            if not await self.wait_exit(STOP_TIMEOUT):
                os.kill(self.pid, signal.SIGKILL)
                await self.wait_exit(STOP_TIMEOUT)

    def connect(self) -> Any:
        """``gactor.connect`` to this server (with its token): an async context manager."""
        return gactor.connect(self.url, token=self.token,
                              ssl=self.tls.client_context() if self.tls else None)

    # ---- what is on the host -----------------------------------------------------------

    def cgroup_parents(self) -> list[str]:
        return sorted(
            p for h in cgroup_hierarchies() for p in glob.glob(os.path.join(h, self.cgroup_parent))
        )

    def snapshot(self) -> dict[str, Any]:
        """What this server's containers hold on the host; all empty when nothing is left."""
        containers = os.path.join(self.depot, "containers")
        images = os.path.join(self.depot, "images")
        return {
            "cgroups": sorted(server_cgroup_dirs(self.depot)),
            "mounts": mounts_containing(self.depot),
            "container dirs": sorted(os.listdir(containers)) if os.path.isdir(containers) else [],
            "half-built images": sorted(
                n
                for n in (os.listdir(images) if os.path.isdir(images) else [])
                if ".tmp-" in n or ".old-" in n
            ),
            "shims": sorted(server_shims(self.depot)),
            "forkers": sorted(server_forkers(self.depot)),
            "inits": sorted(server_inits(self.depot)),
            "links": sorted(n for n in os.listdir("/sys/class/net") if n.startswith(link_prefix(self.tag))),
            # A running server owns its table; a stopped one with no containers leaves none.
            "nft tables": [] if self.running else [t for t in nft_tables() if t == f"ip {table_name(self.tag)}"],
        }

    @staticmethod
    def empty() -> dict[str, Any]:
        return {kind: [] for kind in LEFTOVER_KINDS}

    # ---- cleaning up -------------------------------------------------------------------

    async def destroy_all(self) -> list[str]:
        """Destroy everything the server lists; every destroy must succeed."""
        async with self.connect() as client:
            handles = [c.handle for c in await client.containers()]
            for handle in handles:
                with trio.fail_after(60):
                    await client.destroy(handle)
            assert await client.containers() == []
        return handles

    async def finish(self) -> None:
        """Destroy all through the API, stop by pid, and assert nothing is left."""
        if not self.running:
            await self.start()
        await self.destroy_all()
        await self.stop()
        # Processes and cgroups go away asynchronously: wait on the condition.
        await wait_until_equal(self.snapshot, self.empty(), within=10)
        assert self.cgroup_parents() == [], "the server's cgroup parent survived its graceful stop"
        self.finished = True

    async def teardown(self) -> None:
        """Clean up whatever happened (a failed test, a crashed server), asserting nothing.

        Unless ``finish`` succeeded: destroy through the API, stop; if anything is left
        (containers outlive a server that dies, by design), a fresh start with
        --destroy-containers-on-startup removes it; then SIGKILL any helper of this depot
        that still runs. Keeps a copy of the log in /tmp; removes the temp dir unless
        something is still mounted in it (never delete through a mount).
        """
        with trio.CancelScope(shield=True):
            if not self.finished:
                await self._clean_up()
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, f"/tmp/gactor-e2e-last-{self.name}.log")
            if mounts_containing(self.base):
                print(f"\nleaving {self.base}: mounts remain under it", file=sys.stderr)
            else:
                shutil.rmtree(self.base, ignore_errors=True)

    async def _clean_up(self) -> None:
        if self.running:
            with contextlib.suppress(*_CLEANUP_ERRORS), trio.move_on_after(TEARDOWN_TIMEOUT):
                await self.destroy_all()
        await self.stop()
        if self.snapshot() != self.empty():
            self.note("teardown: restarting the server to clean up")
            with contextlib.suppress(*_CLEANUP_ERRORS), trio.move_on_after(TEARDOWN_TIMEOUT):
                await self.start("--destroy-containers-on-startup")
            await self.stop()
        self._kill_leftover_helpers()
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Last resort, when not even a fresh server could clean up (a test driving old or
        broken code, say): detach this depot's mounts and remove its cgroups, so a failed
        test never leaves the host changed. Noted in the log."""
        mount_points = [line.split()[4] for line in mounts_containing(self.base)]
        for point in sorted(mount_points, key=len, reverse=True):
            self.note(f"teardown: detaching leftover mount {point}")
            with contextlib.suppress(OSError):
                L.umount(point, L.MNT_DETACH)
        for link in self.snapshot()["links"]:
            self.note(f"teardown: deleting leftover link {link}")
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        if self.snapshot()["nft tables"]:
            self.note(f"teardown: deleting leftover nft table {table_name(self.tag)}")
            subprocess.run(["nft", "delete", "table", "ip", table_name(self.tag)], check=False, capture_output=True)
        for path in sorted(server_cgroup_dirs(self.depot) | set(self.cgroup_parents()),
                           key=lambda d: d.count(os.sep), reverse=True):
            self.note(f"teardown: removing leftover cgroup {path}")
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _kill_leftover_helpers(self) -> None:
        """Last resort: SIGKILL (by pid) the shims and inits of this depot that even a
        --destroy-containers-on-startup server left running."""
        for pid in sorted(server_shims(self.depot) | server_forkers(self.depot) | server_inits(self.depot)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a test may have stopped it
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def own_server_factory() -> AsyncIterator[Callable[..., ServerProcess]]:
    """A factory ``make(name, pool, *args, token=None, **options)`` (not started; options
    as ServerProcess takes them); every server it made is torn down on exit."""
    made: list[ServerProcess] = []

    def make(name: str, pool: str, *args: str, token: str | None = None,
             **options: Any) -> ServerProcess:
        server = ServerProcess(name, pool, args, token=token, **options)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            await server.teardown()


@contextlib.contextmanager
def running_server(
    name: str, pool: str, *args: str, token: str | None = None, **options: Any
) -> Iterator[ServerProcess]:
    """For sync fixtures: a started server, torn down on exit (each step its own trio.run)."""
    server = ServerProcess(name, pool, args, token=token, **options)
    try:
        trio.run(server.start)
        yield server
    finally:
        trio.run(server.teardown)


class NetSlot:
    """The networking tests' server number ``n`` (0-49): its own dynamic pool
    10.240.N.0/24, static subnets 10.240.(100+2N+k).0/24 (k = 0, 1) outside every pool,
    and host ports 20000+100N.. (below the ephemeral range), so no two servers collide."""

    def __init__(self, n: int, port_pool_size: int = 100) -> None:
        assert 0 <= n < 50
        assert 0 < port_pool_size <= 100
        self.n = n
        self.pool = f"10.240.{n}.0/24"
        self.port_start = 20000 + 100 * n
        self.port_size = port_pool_size

    def static_subnet(self, k: int = 0) -> str:
        return f"10.240.{100 + 2 * self.n + k}.0/24"

    @property
    def args(self) -> list[str]:
        return ["--port-pool-start", str(self.port_start), "--port-pool-size", str(self.port_size)]
