"""Metrics against a real server (GATS metrics_test.go plus disk and bulk checks).

Counters are compared with what the kernel shows for the container's cgroup, read on
the host, and with their own earlier values (they must grow while a busy loop runs).
"""

from __future__ import annotations

import contextlib
import os
from time import perf_counter

import pytest
import trio

from gactor import (
    ContainerNotFoundError,
    ContainerSpec,
    CPULimits,
    Limits,
    PidLimits,
    ProcessIO,
    ProcessSpec,
)

from .helpers import CGROUP_ROOT, E2E_MARKS, sh_ok, unique_handle, wait_for

pytestmark = E2E_MARKS

MB = 1_000_000
BUSY_LOOP = "while true; do ls -la / >/dev/null; done"
BULK = 50


async def busy(container) -> None:
    await container.run(ProcessSpec(path="sh", args=["-c", BUSY_LOOP]), ProcessIO())


async def test_metrics_grow_while_a_busy_loop_runs(gactor_server, create_container):
    container = await create_container(
        handle=unique_handle("met"), limits=Limits(cpu=CPULimits(limit_in_shares=512))
    )
    await busy(container)
    first = await wait_for(container.metrics, what="metrics")
    await wait_for(lambda: _cpu_usage(container), what="cpu usage > 0")
    await wait_for(lambda: _memory_usage(container), what="memory usage > 0")
    await wait_for(lambda: _pids(container), what="pids > 0")

    async def grown() -> bool:
        now = await container.metrics()
        return now.cpu_stat.usage > first.cpu_stat.usage and now.age > first.age

    await wait_for(grown, what="cpu usage and age to grow")
    metrics = await container.metrics()
    assert metrics.age > 0
    assert metrics.cpu_stat.usage >= metrics.cpu_stat.user
    assert metrics.cpu_entitlement > 0
    assert metrics.pid_stat.max == 0
    assert metrics.network_stat is not None  # its veth's counters; test_networking checks they grow
    # The same counters the kernel shows, read on the host afterwards (so at least as big).
    parent = gactor_server.cgroup_parent
    usage_file = os.path.join(CGROUP_ROOT, "cpuacct", parent, container.handle, "cpuacct.usage")
    if os.path.exists(usage_file):  # cgroup v1 hosts
        with open(usage_file) as f:
            assert int(f.read()) >= metrics.cpu_stat.usage


async def _cpu_usage(container) -> bool:
    return (await container.metrics()).cpu_stat.usage > 0


async def _memory_usage(container) -> bool:
    return (await container.metrics()).memory_stat.total_usage_toward_limit > 0


async def _pids(container) -> bool:
    return (await container.metrics()).pid_stat.current > 0


async def test_pid_stat_max_follows_the_pid_limit(create_container):
    unlimited = await create_container()
    limited = await create_container(
        handle=unique_handle("met"), limits=Limits(pid=PidLimits(max=128))
    )
    assert (await unlimited.metrics()).pid_stat.max == 0
    assert (await limited.metrics()).pid_stat.max == 128


async def test_disk_stat_counts_the_containers_writes(container):
    before = (await container.metrics()).disk_stat
    assert before.total_bytes_used > before.exclusive_bytes_used  # the image counts in total
    await sh_ok(container, "dd if=/dev/zero of=/root/file bs=1M count=3 && sync")
    after = (await container.metrics()).disk_stat
    grew = after.exclusive_bytes_used - before.exclusive_bytes_used
    assert abs(grew - 3 * 2**20) < 1 * MB, grew
    assert after.total_bytes_used - before.total_bytes_used == grew
    assert after.total_bytes_used > after.exclusive_bytes_used
    assert after.exclusive_inodes_used > before.exclusive_inodes_used


async def test_bulk_metrics_over_50_containers(client):
    handles = [unique_handle("bulk") for _ in range(BULK)]

    async def create(handle: str) -> None:
        await client.create(ContainerSpec(handle=handle))

    async def destroy(handle: str) -> None:
        with contextlib.suppress(ContainerNotFoundError):
            await client.destroy(handle)

    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for handle in handles:
                    nursery.start_soon(create, handle)
        start = perf_counter()
        entries = await client.bulk_metrics([*handles, "no-such-container"])
        elapsed = perf_counter() - start
        print(f"bulk_metrics over {BULK} containers: {elapsed * 1e3:.1f} ms")
        assert set(entries) == {*handles, "no-such-container"}
        for handle in handles:
            assert entries[handle].err is None, entries[handle].err
            assert entries[handle].metrics.age > 0
            assert entries[handle].metrics.memory_stat.total_usage_toward_limit > 0
        missing = entries["no-such-container"]
        assert missing.metrics is None
        assert isinstance(missing.err, ContainerNotFoundError)
        assert missing.err.message == "unknown handle: no-such-container"
    finally:
        with trio.fail_after(120), trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for handle in handles:
                    nursery.start_soon(destroy, handle)


async def test_metrics_of_an_unknown_handle(client):
    container = await client.create(ContainerSpec(handle=unique_handle("gone")))
    await client.destroy(container.handle)
    with pytest.raises(ContainerNotFoundError) as caught:
        await container.metrics()
    assert caught.value.handle == container.handle
    assert caught.value.message == f"unknown handle: {container.handle}"
