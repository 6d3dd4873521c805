"""One real ``gactor server`` per session, plus a client and a container per test, and
``own_servers`` for the tests that run servers of their own.

The servers (``servers.ServerProcess``) run as subprocesses on free loopback ports with
their own depots and network pools, so the suite never touches another server's state.
pytest-trio runs each test in its own ``trio.run``: only the (sync) server fixture is
shared.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from .helpers import ROOTFS, unique_handle
from .servers import ServerProcess, own_server_factory, running_server

NETWORK_POOL = "10.253.0.0/22"


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


@pytest.fixture(scope="session")
def gactor_server() -> Iterator[ServerProcess]:
    if os.geteuid() != 0:
        pytest.skip("e2e tests run the server as root")
    if not os.path.isdir(ROOTFS):
        pytest.skip(f"no busybox rootfs at {ROOTFS}")
    # Teardown destroys what the session left and stops the server. Containers outlive a
    # server that dies (by design): after a crash, a fresh server on the same depot
    # destroys them, so the host is left clean.
    with running_server("e2e", NETWORK_POOL) as server:
        yield server


@pytest.fixture
async def own_servers() -> AsyncIterator[Callable[..., ServerProcess]]:
    """A factory ``own_servers(name, pool, *flags)`` of servers a test owns (not started
    yet); each is torn down after the test, whatever happened."""
    async with own_server_factory() as make:
        yield make


@pytest.fixture(autouse=True)
def _server_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test during which the shared server died, showing its log once."""
    if "gactor_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("gactor_server")
    if not server.running:
        pytest.fail(f"the gactor server died earlier (exit {server.returncode})", pytrace=False)
    yield
    if not server.running:
        pytest.fail(
            f"the gactor server died (exit {server.returncode}) during this test:\n"
            + server.log_tail(80),
            pytrace=False,
        )


@pytest.fixture
async def client(gactor_server: ServerProcess) -> AsyncIterator[Any]:
    async with gactor_server.connect() as c:
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
