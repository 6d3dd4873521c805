"""A create/run/destroy loop leaves nothing behind: no cgroup, mount, depot entry,
server fd or process. Everything is counted from outside the server.
"""

from __future__ import annotations

import uuid

import pytest
import trio

from gactor import ContainerSpec

from .helpers import (
    E2E_MARKS,
    host_snapshot,
    run,
    wait_until_nothing_left,
)

pytestmark = E2E_MARKS

ROUNDS = 10


async def test_create_run_destroy_loop_leaves_nothing(gactor_server, client):
    prefix = f"leak-{uuid.uuid4().hex[:8]}"
    # Warm up once: the first container may build caches (the uid-shifted image).
    warm = await client.create(ContainerSpec(handle=f"{prefix}-warm"))
    assert (await run(warm, "echo", ["hi"]))[0] == 0
    await client.destroy(warm.handle)

    before = host_snapshot(gactor_server)
    for i in range(ROUNDS):
        with trio.fail_after(60):
            container = await client.create(ContainerSpec(handle=f"{prefix}-{i}"))
            code, out, _ = await run(container, "echo", ["hi"])
            assert (code, out) == (0, b"hi\n")
            await client.destroy(container.handle)
    await wait_until_nothing_left(gactor_server, before)


async def test_failed_creates_leave_nothing(gactor_server, client):
    """A create that fails once its cgroup, OOM notification fd, veth and shim exist (pid 1
    finds no bind mount source in the container) rolls all of them back: the server holds
    no more fds."""
    from gactor import BindMount, BindMountOrigin, GardenError

    prefix = f"leak-{uuid.uuid4().hex[:8]}"
    await client.destroy((await client.create(ContainerSpec(handle=f"{prefix}-warm"))).handle)
    before = host_snapshot(gactor_server)
    missing = BindMount(src_path=f"/nonexistent-{prefix}", dst_path="/mnt/x", origin=BindMountOrigin.CONTAINER)
    for i in range(ROUNDS):
        with trio.fail_after(60), pytest.raises(GardenError, match="does not exist in the container"):
            await client.create(ContainerSpec(handle=f"{prefix}-{i}", bind_mounts=[missing]))
    await wait_until_nothing_left(gactor_server, before)


async def test_failed_runs_leave_nothing(gactor_server, client):
    """Errors on the run path (unknown user, missing binary) release what they took."""
    from gactor import GardenError, ProcessIO, ProcessSpec

    prefix = f"leak-{uuid.uuid4().hex[:8]}"
    container = await client.create(ContainerSpec(handle=f"{prefix}-bad"))
    try:
        assert (await run(container, "true"))[0] == 0
        before = host_snapshot(gactor_server)
        for _ in range(ROUNDS):
            with pytest.raises(GardenError):
                await container.run(ProcessSpec(path="potato-nope"), ProcessIO())
            with pytest.raises(GardenError):
                await container.run(ProcessSpec(path="true", user="bob-nope"), ProcessIO())
        await wait_until_nothing_left(gactor_server, before)
    finally:
        await client.destroy(container.handle)
