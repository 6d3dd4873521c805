"""The shim's process forker (``gactor.kernel.spawn.Forker``), checked from outside.

An unprivileged container's processes are cloned by one forker per container, already in
the container's namespaces with its bounding set and seccomp program: each process must
end up exactly as confined, placed and parented as one the shim's helper starts (the cold
way, still used for peas, privileged containers, pid-limited containers and rlimits above
the shim's own), and the forker itself must hold nothing of the container's and leave
nothing behind.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import trio

from gactor import (
    ContainerSpec,
    GardenError,
    Limits,
    PidLimits,
    ProcessIO,
    ProcessSpec,
    ResourceLimits,
)

from .helpers import (
    E2E_MARKS,
    Sink,
    StdinGate,
    container_pids,
    init_pid,
    proc_status,
    run,
    server_forkers,
    sh_ok,
    wait_for,
)

pytestmark = E2E_MARKS

UNPRIVILEGED_CAPS = "00000000a80425fb"
CAP_SYS_RESOURCE = 24
NAMESPACES = ("user", "mnt", "uts", "ipc", "net", "cgroup")


def forkers_of(server: Any, handle: str) -> set[int]:
    shim = server.shim_pid(handle)
    return {pid for pid in server_forkers(server.depot) if proc_status(pid).get("PPid") == str(shim)}


def ns(pid: int, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


async def started_cat(container: Any) -> tuple[Any, StdinGate, int]:
    """A ``cat`` kept alive by a held stdin; returns it, its gate and its host pid."""
    gate = StdinGate()
    before = container_pids(container.handle)
    process = await container.run(ProcessSpec(path="cat"), ProcessIO(stdin=gate, stdout=Sink()))
    pid = await wait_for(lambda: container_pids(container.handle) - before, what="the new process")
    (host_pid,) = pid
    return process, gate, host_pid


async def test_processes_come_from_one_forker_and_are_confined_as_before(gactor_server: Any,
                                                                        create_container: Any) -> None:
    container = await create_container()
    assert forkers_of(gactor_server, container.handle) == set(), "a forker before any process ran"
    process, gate, pid = await started_cat(container)
    shim = gactor_server.shim_pid(container.handle)
    init = await init_pid(container.handle)
    (forker,) = forkers_of(gactor_server, container.handle)

    status = proc_status(pid)
    assert status["PPid"] == str(shim), "the process is not the shim's child"
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd"):
        assert status[field] == UNPRIVILEGED_CAPS, (field, status[field])
    assert status["CapAmb"] == "0000000000000000"
    assert (status["Seccomp"], status["Seccomp_filters"], status["NoNewPrivs"]) == ("2", "1", "0")
    for name in (*NAMESPACES, "pid"):
        assert ns(pid, name) == ns(init, name), f"{name} namespace differs from pid 1's"
    assert cgroups(pid) == cgroups(init), "not in the container's cgroups"
    assert sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2"], "fds leaked into the process"

    # The forker: in the container's namespaces for its children, but in the host's pid
    # namespace and the shim's cgroups, so nothing in the container sees it or pays for it.
    assert ns(forker, "pid") == ns(shim, "pid")
    assert ns(forker, "pid_for_children") == ns(init, "pid")
    for name in NAMESPACES:
        assert ns(forker, name) == ns(init, name), name
    assert cgroups(forker) == cgroups(shim)
    assert proc_status(forker)["CapBnd"] == UNPRIVILEGED_CAPS
    assert proc_status(forker)["Seccomp"] == "2"
    fds_before = sorted(os.listdir(f"/proc/{forker}/fd"))
    assert len(fds_before) <= 4 + len(cgroups(init).splitlines()), fds_before  # stdio, socket, cgroup.procs

    gate.release(b"bye")
    assert await process.wait() == 0
    for _ in range(5):  # the same forker again, holding no more fds than before
        assert await run(container, "true") == (0, b"", b"")
    assert forkers_of(gactor_server, container.handle) == {forker}
    assert sorted(os.listdir(f"/proc/{forker}/fd")) == fds_before


async def test_a_user_process_and_a_failed_exec_through_the_forker(create_container: Any) -> None:
    container = await create_container()
    await sh_ok(container, "id -u alice || adduser -D alice", user="root")
    out = await sh_ok(container, "id -u; pwd; grep -E '^Cap(Eff|Prm)' /proc/self/status", user="alice")
    uid, home, eff, prm = out.split("\n")[:4]
    assert (home, eff.split()[1], prm.split()[1]) == ("/home/alice", "0" * 16, "0" * 16)
    assert uid != "0"
    code, _, _ = await run(container, "sh", ["-c", "exit 7"])
    assert code == 7
    with pytest.raises(GardenError, match="no such file"):
        await run(container, "/no/such/program")


async def test_a_killed_forker_is_replaced_and_running_processes_keep_their_exit(
        gactor_server: Any, create_container: Any) -> None:
    container = await create_container()
    process, gate, _ = await started_cat(container)
    (forker,) = forkers_of(gactor_server, container.handle)
    os.kill(forker, signal.SIGKILL)
    await wait_for(lambda: forker not in forkers_of(gactor_server, container.handle), what="the forker gone")
    assert await run(container, "sh", ["-c", "exit 3"]) == (3, b"", b"")
    (again,) = forkers_of(gactor_server, container.handle)
    assert again != forker
    gate.release()
    assert await process.wait() == 0


async def test_destroy_ends_the_forker(gactor_server: Any, client: Any) -> None:
    handle = "forker-destroy"
    container = await client.create(ContainerSpec(handle=handle))
    try:
        await run(container, "true")
        (forker,) = forkers_of(gactor_server, handle)
    finally:
        await client.destroy(handle)
    await wait_for(lambda: not os.path.exists(f"/proc/{forker}"), what="the forker ended")


async def test_no_forker_where_it_would_change_semantics(gactor_server: Any, create_container: Any) -> None:
    # A pid limit: a process cloned outside the cgroup would not be counted at its fork.
    limited = await create_container(limits=Limits(pid=PidLimits(max=4)))
    await run(limited, "true")
    assert forkers_of(gactor_server, limited.handle) == set()
    privileged = await create_container(privileged=True)
    await run(privileged, "true")
    assert forkers_of(gactor_server, privileged.handle) == set()


async def test_an_rlimit_above_the_shims_own_takes_the_helper(gactor_server: Any, create_container: Any) -> None:
    """Raising a hard limit needs CAP_SYS_RESOURCE in the host's user namespace, which the
    forker gave up: the helper (host root) sets it. Where host root itself lacks the
    capability (this CI host: CapBnd 000001fffeffffff) the helper's clear error is the answer."""
    container = await create_container()
    await run(container, "true")  # the forker exists
    shim = gactor_server.shim_pid(container.handle)
    with open(f"/proc/{shim}/limits") as f:
        hard = int(next(line for line in f if line.startswith("Max open files")).split()[4])
    with open("/proc/sys/fs/nr_open") as f:
        want = min(hard + 1024, int(f.read()))
    can_raise = int(proc_status(shim)["CapEff"], 16) >> CAP_SYS_RESOURCE & 1
    with trio.fail_after(30):
        if can_raise and want > hard:
            assert int(await sh_ok(container, "ulimit -n", limits=ResourceLimits(nofile=want))) == want
        else:
            with pytest.raises(GardenError, match=f"rlimit limits.nofile = {want}"):
                await run(container, "true", limits=ResourceLimits(nofile=want))
        # At or below the shim's hard limit: the forker sets it.
        assert int(await sh_ok(container, "ulimit -n", limits=ResourceLimits(nofile=hard))) == hard
    assert len(forkers_of(gactor_server, container.handle)) == 1
