"""Limits against a real server: memory and OOM, CPU shares and quota, pids, rlimits.

Every limit is checked twice: through the API (``current_*_limits``, a process that
hits the limit) and from outside, in the container's cgroup files under
``/sys/fs/cgroup/<controller>/<parent>/<handle>/`` and in ``/proc/<pid>/limits``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal

import pytest
import trio

import gactor
from gactor import (
    BandwidthLimits,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    Limits,
    MemoryLimits,
    PidLimits,
    ProcessIO,
    ProcessSpec,
    ResourceLimits,
)

from .helpers import (
    CGROUP_ROOT,
    E2E_MARKS,
    container_pids,
    proc_name,
    sh,
    sh_ok,
    unique_handle,
    wait_for,
)
from .servers import ServerProcess

pytestmark = E2E_MARKS

MiB = 1 << 20
OOM_EVENT = "Out of memory"


def cgroup_file(server: ServerProcess, controller: str, handle: str, name: str) -> str:
    """The text of one of the container's cgroup v1 files, read on the host."""
    if not os.path.isdir(os.path.join(CGROUP_ROOT, "memory")):
        pytest.skip("the host-side checks read cgroup v1 files; this host has none")
    with open(os.path.join(CGROUP_ROOT, controller, server.cgroup_parent, handle, name)) as f:
        return f.read().strip()


def memory_spec(limit: int) -> ContainerSpec:
    memory = MemoryLimits(limit_in_bytes=limit)
    return ContainerSpec(handle=unique_handle("lim"), limits=Limits(memory=memory))


# ---- memory and OOM -----------------------------------------------------------------


async def test_memory_limit_is_applied_on_the_host(gactor_server, create_container):
    container = await create_container(memory_spec(64 * MiB))
    assert await container.current_memory_limits() == MemoryLimits(limit_in_bytes=64 * MiB)
    h = container.handle
    assert int(cgroup_file(gactor_server, "memory", h, "memory.limit_in_bytes")) == 64 * MiB
    # No swap beyond the limit (Garden sets memory+swap to the same value).
    assert int(cgroup_file(gactor_server, "memory", h, "memory.memsw.limit_in_bytes")) == 64 * MiB


async def test_58_mb_fit_in_64_mib(create_container):
    container = await create_container(memory_spec(64 * MiB))
    await sh_ok(container, "dd if=/dev/zero of=/dev/shm/fits bs=1M count=58")
    info = await container.info()
    assert info.events == []
    assert info.state == "active"


async def test_oom_kills_records_the_event_and_stops_the_container(gactor_server, create_container):
    container = await create_container(memory_spec(64 * MiB))
    sleeper = await container.run(ProcessSpec(path="sleep", args=["1000"]), ProcessIO())
    async with container.events() as events:
        code, _, err = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=80")
        assert code == 137, f"dd exited {code}: {err!r}"
        with trio.fail_after(10):
            first = await events.__anext__()
        assert first == OOM_EVENT
    # The container is stopped: every process but init gets SIGKILL.
    with trio.fail_after(10):
        assert await sleeper.wait() == 137
    await wait_for(lambda: _state_is(container, "stopped"), what="state stopped")
    info = await container.info()
    assert info.state == "stopped"
    assert garden_events(info) == [OOM_EVENT]
    await wait_for(lambda: _victim_named(container, "dd"), what="the event naming the victim")

    # Stopped is not destroyed: the cgroup and its limit stay, init stays, and so does
    # the filesystem (seen from the host through init's root).
    h = container.handle
    assert int(cgroup_file(gactor_server, "memory", h, "memory.limit_in_bytes")) == 64 * MiB
    [init] = await wait_for(lambda: container_pids(h), what="init alone in the cgroup")
    shm = f"/proc/{init}/root/dev/shm"
    assert os.listdir(shm) == ["x"]
    # The tmpfs file still holds the cgroup at its limit: free it, then processes run again
    # (the state stays "stopped", as in Garden). The stop's sweep may still be running and
    # SIGKILL a process started now (a server race, see docs/limits.md): retry until one
    # survives.
    os.remove(os.path.join(shm, "x"))

    async def echo() -> str:
        code, out, _ = await sh(container, "echo alive")
        return out.decode().strip() if code == 0 else ""

    assert await wait_for(echo, what="a process to survive") == "alive"
    info = await container.info()
    assert (info.state, garden_events(info)) == ("stopped", [OOM_EVENT])


async def test_an_event_after_a_subscriber_left(create_container):
    container = await create_container(memory_spec(64 * MiB))
    async with container.events():
        pass  # subscribe, then leave at once
    code, _, _ = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=80")
    assert code == 137
    await wait_for(lambda: _has_event(container, OOM_EVENT), what="the OOM event")
    info = await container.info()
    assert (info.state, garden_events(info)) == ("stopped", [OOM_EVENT])


async def test_oom_of_a_child_process_is_recorded(gactor_server, create_container):
    container = await create_container(memory_spec(64 * MiB))
    # The victim is dd, not the process Run started. The shell either reports dd's 137 or
    # is itself killed by the stop that follows the OOM, whichever comes first.
    code, out, _ = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=80; echo $?")
    assert (code, out.strip()) in ((0, b"137"), (137, b""), (137, b"137"))
    oom_control = cgroup_file(gactor_server, "memory", container.handle, "memory.oom_control")
    assert "oom_kill 1" in oom_control.splitlines()  # the kernel counted the kill
    info = await container.info()
    assert (garden_events(info), info.state) == ([OOM_EVENT], "stopped")
    # The victim is named, without a process id: dd was not started by run.
    await wait_for(lambda: _victim_named(container, "dd"), what="the event naming the victim")
    victims = [e for e in (await container.info()).events if e.startswith(f"{OOM_EVENT}:")]
    assert re.fullmatch(rf"{OOM_EVENT}: killed process \d+ \(dd\)", victims[0]), victims


def garden_events(info) -> list[str]:
    """The events Garden itself records (an OOM's victim event follows "Out of memory")."""
    return [e for e in info.events if not e.startswith(f"{OOM_EVENT}:")]


async def _victim_named(container, task: str) -> bool:
    return any(e.startswith(f"{OOM_EVENT}: killed process ") and f"({task})" in e
               for e in (await container.info()).events)


async def _state_is(container, state: str) -> bool:
    return (await container.info()).state == state


async def test_limit_memory_at_runtime(gactor_server, create_container):
    container = await create_container()
    assert await container.current_memory_limits() == MemoryLimits()
    await container.limit_memory(MemoryLimits(limit_in_bytes=32 * MiB))
    assert await container.current_memory_limits() == MemoryLimits(limit_in_bytes=32 * MiB)
    h = container.handle
    assert int(cgroup_file(gactor_server, "memory", h, "memory.limit_in_bytes")) == 32 * MiB
    assert int(cgroup_file(gactor_server, "memory", h, "memory.memsw.limit_in_bytes")) == 32 * MiB
    code, _, err = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=40")
    assert code != 0, f"a 40 MB write under a 32 MiB limit succeeded: {err!r}"
    await wait_for(lambda: _has_event(container, OOM_EVENT), what="the OOM event")


async def _has_event(container, event: str) -> bool:
    return event in (await container.info()).events


async def test_lowering_the_memory_limit_below_usage_fails_cleanly(gactor_server, container):
    # tmpfs pages cannot be reclaimed without swap, so the kernel refuses the limit.
    await sh_ok(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=30")
    with pytest.raises(gactor.GardenError, match="limit"):
        await container.limit_memory(MemoryLimits(limit_in_bytes=16 * MiB))
    assert await container.current_memory_limits() == MemoryLimits()
    info = await container.info()
    assert (info.state, info.events) == ("active", [])
    assert (await sh_ok(container, "echo alive")).strip() == "alive"


async def test_event_subscription_ends_when_the_container_is_destroyed(client):
    container = await client.create(ContainerSpec(handle=unique_handle("ev")))
    async with container.events() as events:
        await client.destroy(container.handle)
        with trio.fail_after(10):
            assert [event async for event in events] == []


async def test_events_of_an_unknown_handle(client):
    container = await client.create(ContainerSpec(handle=unique_handle("ev")))
    await client.destroy(container.handle)
    with pytest.raises(gactor.ContainerNotFoundError):
        async with container.events():
            pass


# ---- CPU ----------------------------------------------------------------------------


def cpu_spec(weight: int = 0, shares: int = 0) -> ContainerSpec:
    cpu = CPULimits(weight=weight, limit_in_shares=shares)
    return ContainerSpec(handle=unique_handle("cpu"), limits=Limits(cpu=cpu))


async def test_limit_in_shares_round_trips(gactor_server, create_container):
    container = await create_container(cpu_spec(shares=50))
    assert await container.current_cpu_limits() == CPULimits(weight=0, limit_in_shares=50)
    assert cgroup_file(gactor_server, "cpu", container.handle, "cpu.shares") == "50"


async def test_weight_wins_over_limit_in_shares(gactor_server, create_container):
    container = await create_container(cpu_spec(weight=300, shares=50))
    assert await container.current_cpu_limits() == CPULimits(limit_in_shares=300)
    assert cgroup_file(gactor_server, "cpu", container.handle, "cpu.shares") == "300"


async def test_limit_cpu_at_runtime(gactor_server, create_container):
    container = await create_container(cpu_spec(shares=50))
    await container.limit_cpu(CPULimits(limit_in_shares=700))
    assert await container.current_cpu_limits() == CPULimits(limit_in_shares=700)
    assert cgroup_file(gactor_server, "cpu", container.handle, "cpu.shares") == "700"
    await container.limit_cpu(CPULimits(weight=900, limit_in_shares=10))
    assert await container.current_cpu_limits() == CPULimits(limit_in_shares=900)
    assert cgroup_file(gactor_server, "cpu", container.handle, "cpu.shares") == "900"


async def test_no_limits_read_back_as_zero(gactor_server, container):
    assert await container.current_cpu_limits() == CPULimits()
    assert await container.current_memory_limits() == MemoryLimits()
    assert await container.current_disk_limits() == DiskLimits()
    assert await container.current_bandwidth_limits() == BandwidthLimits()
    h = container.handle
    # Nothing written: the kernel's defaults stay.
    assert cgroup_file(gactor_server, "cpu", h, "cpu.shares") == "1024"
    assert cgroup_file(gactor_server, "cpu", h, "cpu.cfs_quota_us") == "-1"
    assert cgroup_file(gactor_server, "pids", h, "pids.max") == "max"


@pytest.fixture
async def quota_server(own_servers) -> ServerProcess:
    """A second server, for one test, with ``--cpu-quota-per-share 100``."""
    server = own_servers("quota", "10.249.0.0/24", "--cpu-quota-per-share", "100")
    await server.start()
    return server


async def test_cpu_quota_per_share(quota_server):
    async with quota_server.connect() as client:
        made = []
        try:
            for shares in (1024, 2):
                spec = cpu_spec(shares=shares)
                made.append(spec.handle)
                with trio.fail_after(60):
                    await client.create(spec)
            big, small = made

            def quota(handle: str) -> int:
                return int(cgroup_file(quota_server, "cpu", handle, "cpu.cfs_quota_us"))

            assert quota(big) == 1024 * 100
            assert cgroup_file(quota_server, "cpu", big, "cpu.cfs_period_us") == "100000"
            assert quota(small) == 1000  # the minimum
            container = await client.lookup(big)
            await container.limit_cpu(CPULimits(limit_in_shares=512))
            assert quota(big) == 512 * 100
            assert await container.current_cpu_limits() == CPULimits(limit_in_shares=512)
        finally:
            with trio.fail_after(60):
                for handle in made:
                    with contextlib.suppress(gactor.ContainerNotFoundError):
                        await client.destroy(handle)


# ---- pids ---------------------------------------------------------------------------


async def test_pid_limit_stops_a_fork_loop(gactor_server, create_container):
    container = await create_container(
        handle=unique_handle("pid"), limits=Limits(pid=PidLimits(max=50))
    )
    assert cgroup_file(gactor_server, "pids", container.handle, "pids.max") == "50"
    code, _, err = await sh(container, "for i in $(seq 1 60); do sleep 1000 & done; wait")
    assert code != 0
    assert re.search(rb"sh: (line \d+: )?can't fork", err), err
    assert int(cgroup_file(gactor_server, "pids", container.handle, "pids.current")) <= 50


async def test_pid_limit_zero_means_unlimited(gactor_server, create_container):
    container = await create_container(
        handle=unique_handle("pid"), limits=Limits(pid=PidLimits(max=0))
    )
    assert cgroup_file(gactor_server, "pids", container.handle, "pids.max") == "max"
    assert "PID" in await sh_ok(container, "ps")


# ---- rlimits ------------------------------------------------------------------------


async def test_nofile_rlimit(container):
    limits = ResourceLimits(nofile=100)
    assert (await sh_ok(container, "ulimit -n", limits=limits)).strip() == "100"


async def test_nproc_rlimit(container):
    out = await sh_ok(container, "ulimit -a", limits=ResourceLimits(nproc=4567))
    assert re.search(r"^-?.*process.*\b4567$", out, re.MULTILINE), out


async def test_rlimits_soft_and_hard(container):
    limits = ResourceLimits(as_=1024 * MiB, core=4 * MiB, stack=16 * MiB)
    script = "ulimit -Sv; ulimit -Hv; ulimit -Sc; ulimit -Hc; ulimit -Ss; ulimit -Hs"
    out = (await sh_ok(container, script, limits=limits)).split()
    # busybox reports as (-v) and stack (-s) in KiB, core (-c) in 512-byte blocks.
    assert out == ["1048576", "1048576", "8192", "8192", "16384", "16384"]


async def test_rlimits_seen_from_the_host(container):
    """Every ResourceLimits field lands in /proc/<pid>/limits, soft equal to hard.

    The values stay at or below this host's default hard limits, which a server
    without CAP_SYS_RESOURCE (this sandbox) cannot raise; nice and rtprio (hard 0)
    are covered by ``test_raising_a_hard_rlimit``.
    """
    limits = ResourceLimits(
        as_=2048 * MiB, core=1 * MiB, cpu=3600, data=1024 * MiB, fsize=512 * MiB, locks=333,
        memlock=4 * MiB, msgqueue=409600, nofile=200, nproc=4567, rss=256 * MiB,
        sigpending=777, stack=16 * MiB,
    )  # fmt: skip
    spec = ProcessSpec(path="sleep", args=["1000"], limits=limits)
    sleeper = await container.run(spec, ProcessIO())
    pids = await wait_for(
        lambda: [p for p in container_pids(container.handle) if proc_name(p) == "sleep"],
        what="the sleep process on the host",
    )
    with open(f"/proc/{pids[0]}/limits") as f:
        table = f.read().splitlines()
    expected = {
        "Max address space": 2048 * MiB, "Max core file size": 1 * MiB, "Max cpu time": 3600,
        "Max data size": 1024 * MiB, "Max file size": 512 * MiB, "Max file locks": 333,
        "Max locked memory": 4 * MiB, "Max msgqueue size": 409600, "Max open files": 200,
        "Max processes": 4567, "Max resident set": 256 * MiB, "Max pending signals": 777,
        "Max stack size": 16 * MiB,
    }  # fmt: skip
    for name, value in expected.items():
        line = next(line for line in table if line.startswith(name))
        soft, hard = line[len(name) :].split()[:2]
        assert (soft, hard) == (str(value), str(value)), line
    await sleeper.signal(gactor.Signal.KILL)
    with trio.fail_after(10):
        assert await sleeper.wait() == 128 + signal.SIGKILL


def _has_cap_sys_resource(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(caps, 16) & (1 << 24))  # CAP_SYS_RESOURCE


async def test_raising_a_hard_rlimit(gactor_server, container):
    """nice's hard limit is 0 by default: raising it needs CAP_SYS_RESOURCE, which
    the server may lack (sandboxes); then run fails cleanly with a GardenError."""
    limits = ResourceLimits(nice=5, rtprio=3)
    if _has_cap_sys_resource(gactor_server.proc.pid):
        out = await sh_ok(container, "ulimit -e; ulimit -r", limits=limits)
        assert out.split() == ["5", "3"]
    else:
        with pytest.raises(gactor.GardenError, match="not allowed to raise maximum limit"):
            await sh(container, "true", limits=limits)
