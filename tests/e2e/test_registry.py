"""The registry against a real server: --max-containers, the grace-time reaper
(GARDEN_REFERENCE.md §3.8), concurrency, and concurrent destroys of one handle.

Each test runs its own small server (the ``own_servers`` fixture, ``servers.ServerProcess``)
with its own depot and /24 in 10.248.0.0/16, and ends with nothing left on the host.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

import gactor
from gactor import ContainerNotFoundError, ContainerSpec, GardenError, ProcessIO, ProcessSpec

from .helpers import (
    E2E_MARKS,
    Sink,
    cgroup_dirs,
    mounts_containing,
    server_fds,
    sh_ok,
    wait_for,
)
from .servers import ServerProcess

pytestmark = E2E_MARKS


async def _listed(client: Any, handle: str) -> bool:
    """Whether the server lists ``handle``. List does not pause grace timers."""
    return handle in {c.handle for c in await client.containers()}


async def _gone(client: Any, handle: str) -> bool:
    try:
        await client.lookup(handle)
    except ContainerNotFoundError:
        return True
    return False


def _traces(server: ServerProcess, handle: str) -> dict[str, Any]:
    return {
        "cgroups": cgroup_dirs(handle, max_depth=5),
        "mounts": mounts_containing(server.container_dir(handle)),
        "depot dir": os.path.exists(server.container_dir(handle)),
    }


NO_TRACES = {"cgroups": [], "mounts": [], "depot dir": False}


# ---- --max-containers -------------------------------------------------------------------------


async def test_max_containers(own_servers):
    server = own_servers("max", "10.248.20.0/24", "--max-containers", "3")
    await server.start()
    async with server.connect() as client:
        assert (await client.capacity()).max_containers == 3
        for i in range(3):
            await client.create(ContainerSpec(handle=f"m{i}"))
        with pytest.raises(GardenError, match="max containers reached"):
            await client.create(ContainerSpec(handle="m3"))
        assert not await _listed(client, "m3")
        assert not os.path.exists(server.container_dir("m3"))
        # A freed slot can be used again.
        await client.destroy("m0")
        await client.create(ContainerSpec(handle="m3"))
        with pytest.raises(GardenError, match="max containers reached"):
            await client.create(ContainerSpec(handle="m4"))
        assert (await client.capacity()).max_containers == 3
    await server.finish()


async def test_max_containers_counts_creates_in_flight(own_servers):
    server = own_servers("maxc", "10.248.21.0/24", "--max-containers", "3")
    await server.start()
    outcomes: list[str] = []

    async def create(client: Any, handle: str) -> None:
        try:
            await client.create(ContainerSpec(handle=handle))
            outcomes.append("ok")
        except GardenError as err:
            outcomes.append(str(err))

    async with server.connect() as client:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(create, client, f"r{i}")
        assert sorted(outcomes) == ["max containers reached"] * 5 + ["ok"] * 3
        assert len(await client.containers()) == 3
    await server.finish()


# ---- grace time ---------------------------------------------------------------------------


async def test_idle_container_is_reaped_after_its_grace_time(own_servers):
    server = own_servers("reap", "10.248.22.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="brief", grace_time=1.0))
        created = trio.current_time()
        await client.lookup("brief")  # a client-side lookup does not pause the timer
        await wait_for(lambda: _gone(client, "brief"), within=10, interval=0.05, what="the reap")
        elapsed = trio.current_time() - created
        assert 0.8 <= elapsed < 5, elapsed
        await wait_for(lambda: _traces(server, "brief") == NO_TRACES, within=5, what="no traces")
        with pytest.raises(ContainerNotFoundError):
            await client.destroy("brief")
    await server.finish()


async def test_default_grace_time_applies_when_the_spec_has_none(own_servers):
    server = own_servers("dflt", "10.248.23.0/24", "--default-grace-time", "1")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="defaulted"))
        await client.create(ContainerSpec(handle="explicit", grace_time=3600))
        created = trio.current_time()
        await wait_for(
            lambda: _gone(client, "defaulted"), within=10, interval=0.05, what="the reap"
        )
        assert trio.current_time() - created >= 0.8
        assert await _listed(client, "explicit")
    await server.finish()


async def test_attached_process_holds_off_the_reaper(own_servers):
    """GATS: an open Run connection counts as a reference."""
    server = own_servers("held", "10.248.24.0/24")
    await server.start()
    async with server.connect() as client, server.connect() as watcher:
        c = await client.create(ContainerSpec(handle="held", grace_time=1.0))
        proc = await c.run(ProcessSpec(path="sleep", args=["3"]), ProcessIO(stdout=Sink()))
        started = trio.current_time()
        with trio.fail_after(15):
            assert await proc.wait() == 0
        exited = trio.current_time()
        assert exited - started >= 2.5
        # The container outlived its 1 s grace time while the run was attached ...
        assert await _listed(watcher, "held")
        # ... and is reaped a full grace time after the stream ended.
        await wait_for(lambda: _gone(watcher, "held"), within=10, interval=0.05, what="the reap")
        assert trio.current_time() - exited >= 0.7
    await server.finish()


async def test_requests_restart_the_countdown(own_servers):
    server = own_servers("busy", "10.248.25.0/24")
    await server.start()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="busy", grace_time=1.0))
        start = trio.current_time()
        while trio.current_time() - start < 2.5:  # well past 1 s, but never idle for 1 s
            await c.info()
            await trio.sleep(0.3)
        assert await _listed(client, "busy")
        last = trio.current_time()
        await wait_for(lambda: _gone(client, "busy"), within=10, interval=0.05, what="the reap")
        assert trio.current_time() - last >= 0.7
    await server.finish()


async def test_set_grace_time_restarts_the_countdown(own_servers):
    server = own_servers("setg", "10.248.26.0/24")
    await server.start()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="later", grace_time=3600))
        keep = await client.create(ContainerSpec(handle="never", grace_time=1.0))
        await keep.set_grace_time(0)  # 0 = never reap (not Garden's "reap now" quirk)
        await c.set_grace_time(1.0)
        set_at = trio.current_time()
        assert await _listed(client, "later")  # still there right after (GATS)
        await wait_for(lambda: _gone(client, "later"), within=10, interval=0.05, what="the reap")
        assert trio.current_time() - set_at >= 0.8
        assert await _listed(client, "never")
    await server.finish()


async def test_destroy_defuses_the_timer(own_servers):
    server = own_servers("defuse", "10.248.27.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="reused", grace_time=1.0))
        await client.destroy("reused")
        # Same handle, no grace time: the old timer must not reap the new container.
        await client.create(ContainerSpec(handle="reused"))
        await client.create(ContainerSpec(handle="canary", grace_time=1.0))
        await wait_for(
            lambda: _gone(client, "canary"), within=10, interval=0.05, what="canary reap"
        )
        assert await _listed(client, "reused")
    await server.finish()


# ---- concurrency ------------------------------------------------------------------------------


async def test_fifty_clients_create_and_destroy_at_once(own_servers):
    server = own_servers("fifty", "10.248.28.0/24")
    await server.start()
    async with server.connect() as client:  # warm up: the first create builds the image copy
        await client.create(ContainerSpec(handle="warm"))
        await client.destroy("warm")
    baseline_fds = server_fds(server.pid)
    done: list[str] = []

    async def one(i: int) -> None:
        async with gactor.connect(server.url) as client:
            c = await client.create(ContainerSpec(handle=f"client-{i:02d}"))
            assert await sh_ok(c, f"echo {i}") == f"{i}\n"
            await client.destroy(c.handle)
            done.append(c.handle)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert len(done) == 50
    async with server.connect() as client:
        assert await client.containers() == []
    await wait_for(lambda: server.snapshot() == server.empty(), within=10, what="nothing left")
    await wait_for(
        lambda: server_fds(server.pid) <= baseline_fds, within=10, what="server fds back"
    )
    await server.finish()


async def test_concurrent_destroys_of_one_handle(own_servers):
    server = own_servers("twice", "10.248.29.0/24")
    await server.start()
    async with server.connect() as a, server.connect() as b:
        c = await a.create(ContainerSpec(handle="twice"))
        await c.run(ProcessSpec(path="sleep", args=["1000"]), ProcessIO())
        results: list[str] = []

        async def destroy(client: Any) -> None:
            try:
                await client.destroy("twice")
                results.append("ok")
            except GardenError as err:
                results.append(str(err))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(destroy, a)
            nursery.start_soon(destroy, b)
        assert results.count("ok") == 1, results
        (other,) = [r for r in results if r != "ok"]
        assert other in ("container already being destroyed", "unknown handle: twice")
        with pytest.raises(ContainerNotFoundError):
            await a.lookup("twice")
        assert _traces(server, "twice") == NO_TRACES
    await server.finish()
