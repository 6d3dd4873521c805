"""One real ``gactor server`` per session, plus a client and a container per test.

The server runs as a subprocess on a free loopback port with its own depot and its
own network pool, so the suite never touches another server's state. pytest-trio
runs each test in its own ``trio.run``: only the (sync) server fixture is shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from .helpers import ROOTFS, mounts_containing, unique_handle

NETWORK_POOL = "10.253.0.0/22"
STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 15.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes 10 s or more (Garden's stop grace period)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="e2e tests run the server as root")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(skip)


@dataclass
class ServerProcess:
    url: str
    depot: str
    proc: subprocess.Popen[bytes]
    log_path: str
    base: str

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _try_ping(url: str) -> bool:
    import gactor

    with trio.move_on_after(2):
        try:
            async with gactor.connect(url) as client:
                await client.ping()
            return True
        except Exception:  # not up yet: refused, reset, handshake failure
            return False
    return False


async def _destroy_leftovers(url: str) -> None:
    import gactor

    with trio.move_on_after(60):
        async with gactor.connect(url) as client:
            for container in await client.containers():
                with contextlib.suppress(gactor.GardenError):
                    await client.destroy(container.handle)


def _ready(server: ServerProcess) -> bool:
    """Poll ping until it answers (True) or the server exits or times out (False)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and server.proc.poll() is None:
        if trio.run(_try_ping, server.url):
            return True
        time.sleep(0.1)  # sync fixture, no trio loop: a short poll interval
    return False


def _wait_ready(server: ServerProcess) -> None:
    if _ready(server):
        return
    if server.proc.poll() is not None:
        pytest.fail(
            f"gactor server exited with {server.proc.returncode} during startup:\n"
            + server.log_tail()
        )
    pytest.fail(
        f"gactor server did not answer ping within {STARTUP_TIMEOUT}s:\n" + server.log_tail()
    )


def _launch(url: str, depot: str, log_path: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "gactor", "server",
        "--listen", url.removeprefix("ws://"),
        "--depot", depot,
        "--default-rootfs", ROOTFS,
        "--network-pool", NETWORK_POOL,
        "--log-level", "info",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _clean_up(server: ServerProcess) -> None:
    """Destroy what the session left, then stop the server.

    Containers outlive a server that dies (by design), so after a crash a fresh server
    on the same depot re-adopts them and destroys them: the host is left clean.
    """
    if server.proc.poll() is not None:
        with open(server.log_path, "ab") as log:
            log.write(b"\n==== e2e teardown: restarting the server to clean up ====\n")
        server.proc = _launch(server.url, server.depot, server.log_path)
        if not _ready(server):
            return
    trio.run(_destroy_leftovers, server.url)


def _stop(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=SHUTDOWN_TIMEOUT)


@pytest.fixture(scope="session")
def gactor_server() -> Iterator[ServerProcess]:
    if os.geteuid() != 0:
        pytest.skip("e2e tests run the server as root")
    if not os.path.isdir(ROOTFS):
        pytest.skip(f"no busybox rootfs at {ROOTFS}")
    # A short path: unix sockets and overlay options under the depot have length limits.
    base = tempfile.mkdtemp(prefix="gactor-e2e-", dir="/tmp")
    # mkdtemp makes it 0700; unprivileged container roots (host uid 4294967294) must be
    # able to traverse every ancestor of the depot to reach their rootfs.
    os.chmod(base, 0o711)
    depot = os.path.join(base, "depot")
    os.makedirs(depot)
    log_path = os.path.join(base, "server.log")
    url = f"ws://127.0.0.1:{_free_port()}"
    server = ServerProcess(url, depot, _launch(url, depot, log_path), log_path, base)
    try:
        _wait_ready(server)
        yield server
        _clean_up(server)
    finally:
        _stop(server)
        # Never delete through a mount: only remove the tree once nothing is mounted in it.
        # Keep the last session's log for post-mortems; the rest goes.
        with contextlib.suppress(OSError):
            shutil.copy(log_path, os.path.join(tempfile.gettempdir(), "gactor-e2e-last.log"))
        if not mounts_containing(base):
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nleaving {base}: mounts remain under it", file=sys.stderr)


@pytest.fixture(autouse=True)
def _server_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test during which the shared server died, showing its log once."""
    if "gactor_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("gactor_server")
    if server.proc.poll() is not None:
        pytest.fail(
            f"the gactor server died earlier (exit {server.proc.returncode})", pytrace=False
        )
    yield
    if server.proc.poll() is not None:
        pytest.fail(
            f"the gactor server died (exit {server.proc.returncode}) during this test:\n"
            + server.log_tail(80),
            pytrace=False,
        )


@pytest.fixture
async def client(gactor_server: ServerProcess) -> AsyncIterator[Any]:
    import gactor

    async with gactor.connect(gactor_server.url) as c:
        yield c


async def _destroy_quietly(client: Any, handle: str) -> None:
    import gactor

    with trio.fail_after(60):
        with contextlib.suppress(gactor.ContainerNotFoundError):
            await client.destroy(handle)


@pytest.fixture
async def container(client: Any) -> AsyncIterator[Any]:
    """A fresh container with a unique handle, destroyed after the test."""
    from gactor import ContainerSpec

    handle = unique_handle()
    with trio.fail_after(60):
        created = await client.create(ContainerSpec(handle=handle))
    try:
        yield created
    finally:
        await _destroy_quietly(client, handle)


@pytest.fixture
async def create_container(client: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A factory: ``await create_container(spec=None, **spec_kwargs)``; all destroyed after."""
    from gactor import ContainerSpec

    made: list[str] = []

    async def create(spec: Any = None, **spec_kwargs: Any) -> Any:
        if spec is None:
            spec_kwargs.setdefault("handle", unique_handle())
            spec = ContainerSpec(**spec_kwargs)
        with trio.fail_after(60):
            created = await client.create(spec)
        made.append(created.handle)
        return created

    try:
        yield create
    finally:
        for handle in made:
            await _destroy_quietly(client, handle)
