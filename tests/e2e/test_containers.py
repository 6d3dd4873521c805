"""Containers against a real server: lifecycle, properties, identity, filesystem, stop
and destroy, each checked from outside (``/proc``, ``/sys/fs/cgroup``, the depot)
where the kernel shows the effect.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
import trio

from gactor import (
    ContainerNotFoundError,
    ContainerSpec,
    GardenError,
    ProcessIO,
    ProcessSpec,
)

from .helpers import (
    E2E_MARKS,
    Sink,
    StdinGate,
    cgroup_dirs,
    container_pids,
    mounts_containing,
    paths_under,
    proc_name,
    proc_status,
    run,
    sh,
    sh_ok,
    unique_handle,
    wait_for,
)

pytestmark = E2E_MARKS


# ---- API basics ---------------------------------------------------------------------


async def test_ping(client):
    assert await client.ping() is None


async def test_capacity(client):
    capacity = await client.capacity()
    assert capacity.memory_in_bytes > 0
    assert capacity.disk_in_bytes > 0
    assert capacity.schedulable_disk_in_bytes > 0
    # A /22 pool holds 1024 addresses, one /30 per container.
    assert capacity.max_containers == 256


async def test_create_with_handle_and_lookup(client, create_container):
    handle = unique_handle()
    created = await create_container(handle=handle)
    assert created.handle == handle
    found = await client.lookup(handle)
    assert found.handle == handle
    assert handle in {c.handle for c in await client.containers()}


async def test_create_without_handle_generates_one(client, create_container):
    created = await create_container(spec=ContainerSpec())
    assert created.handle
    assert (await client.lookup(created.handle)).handle == created.handle
    assert created.handle in {c.handle for c in await client.containers()}


async def test_duplicate_handle_is_refused(client, container):
    with pytest.raises(GardenError) as raised:
        await client.create(ContainerSpec(handle=container.handle))
    assert raised.value.message == f"Handle '{container.handle}' already in use"
    assert str(raised.value) == raised.value.message
    # The original container is untouched.
    assert (await container.info()).state == "active"


async def test_handle_reusable_after_destroy(client):
    handle = unique_handle()
    await client.create(ContainerSpec(handle=handle))
    await client.destroy(handle)
    again = await client.create(ContainerSpec(handle=handle))
    try:
        assert again.handle == handle
        assert (await again.info()).state == "active"
    finally:
        await client.destroy(handle)


async def test_lookup_unknown_handle(client):
    handle = f"nope-{uuid.uuid4().hex}"
    with pytest.raises(ContainerNotFoundError) as raised:
        await client.lookup(handle)
    assert raised.value.handle == handle
    assert raised.value.message == f"unknown handle: {handle}"


async def test_destroy_unknown_handle(client):
    with pytest.raises(ContainerNotFoundError) as raised:
        await client.destroy("potato-sandwhich-policy")
    assert raised.value.handle == "potato-sandwhich-policy"
    assert raised.value.message == "unknown handle: potato-sandwhich-policy"


async def test_destroy_twice(client):
    handle = unique_handle()
    await client.create(ContainerSpec(handle=handle))
    await client.destroy(handle)
    with pytest.raises(ContainerNotFoundError) as raised:
        await client.destroy(handle)
    assert raised.value.handle == handle
    with pytest.raises(ContainerNotFoundError):
        await client.lookup(handle)


async def test_bulk_info(client, container):
    missing = f"missing-{uuid.uuid4().hex}"
    entries = await client.bulk_info([container.handle, missing])
    assert set(entries) == {container.handle, missing}
    good = entries[container.handle]
    assert good.err is None
    assert good.info is not None
    assert good.info.state == "active"
    bad = entries[missing]
    assert bad.info is None
    assert isinstance(bad.err, GardenError)
    assert bad.err.message == f"unknown handle: {missing}"


# ---- properties ---------------------------------------------------------------------


async def test_properties_round_trip_and_crud(create_container):
    node = uuid.uuid4().hex[:8]
    container = await create_container(properties={"foo": f"bar{node}", "a": "b"})

    info = await container.info()
    assert info.properties.items() >= {"foo": f"bar{node}", "a": "b"}.items()

    await container.set_property("bar", "baz")
    props = await container.properties()
    assert props.items() >= {"foo": f"bar{node}", "a": "b", "bar": "baz"}.items()

    assert await container.property("foo") == f"bar{node}"
    await container.set_property("foo", "baz")
    assert await container.property("foo") == "baz"
    await container.remove_property("a")
    with pytest.raises(GardenError):
        await container.property("a")
    with pytest.raises(GardenError):
        await container.property("never-set")

    info = await container.info()
    assert info.properties["foo"] == "baz"
    assert "a" not in info.properties


async def test_containers_filter_by_properties(client, create_container):
    node = uuid.uuid4().hex[:8]
    mine = await create_container(properties={"foo": f"bar{node}", "a": "b"})
    other = await create_container(properties={"foo": f"baz{node}", "a": "b"})
    third = await create_container(properties={f"baz{node}": "bar", "a": "b"})

    async def listed(filter_):
        return {c.handle for c in await client.containers(filter_)}

    assert await listed({"foo": f"bar{node}"}) == {mine.handle}
    # Filters are ANDed: every pair must match.
    assert await listed({"foo": f"baz{node}", "a": "b"}) == {other.handle}
    assert await listed({"foo": f"bar{node}", "a": "not-b"}) == set()
    assert await listed({"foo": f"bar{node}", "a": "b", f"baz{node}": "bar"}) == set()
    assert await listed({f"baz{node}": "bar"}) == {third.handle}
    assert await listed({"matthew": "mcconaughey"}) == set()
    assert {mine.handle, other.handle, third.handle} <= await listed({})
    assert {mine.handle, other.handle, third.handle} <= await listed(None)


# ---- info, identity and filesystem ------------------------------------------------


async def test_info_of_active_container(container):
    info = await container.info()
    assert info.state == "active"
    assert info.container_path
    assert await trio.Path(info.container_path).is_dir(), info.container_path
    assert isinstance(info.properties, dict)


async def test_hostname_is_handle(container):
    code, out, _ = await run(container, "hostname")
    assert (code, out) == (0, f"{container.handle}\n".encode())


async def test_long_handle_hostname_is_last_49_chars(create_container):
    handle = ("long-" + uuid.uuid4().hex + "x" * 60)[:60]
    container = await create_container(handle=handle)
    code, out, _ = await run(container, "hostname")
    assert code == 0
    assert out.decode().strip() == handle[-49:]


def _id_map(text: str) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]


async def test_uid_and_gid_maps(container):
    expected = [[0, 4294967294, 1], [1, 1, 4294967293]]
    assert _id_map(await sh_ok(container, "cat /proc/self/uid_map")) == expected
    assert _id_map(await sh_ok(container, "cat /proc/self/gid_map")) == expected


async def test_init_is_garden_init(container):
    first = await sh_ok(container, "head -1 /proc/1/status")
    assert first.split() == ["Name:", "garden-init"]
    # From the host: the container's cgroups hold its init, named garden-init,
    # running as the host uid that container root maps to.
    pids = await wait_for(lambda: container_pids(container.handle), 10, what="container pids")
    inits = [pid for pid in pids if proc_name(pid) == "garden-init"]
    assert len(inits) == 1, {pid: proc_name(pid) for pid in pids}
    uids = proc_status(inits[0])["Uid"].split()
    assert uids[0] == "4294967294"


async def test_dev_shm_is_tmpfs_and_writable_by_alice(container):
    mounts = await sh_ok(container, "cat /proc/mounts")
    shm = [line for line in mounts.splitlines() if line.split()[1:2] == ["/dev/shm"]]
    assert shm, mounts
    assert shm[0].startswith("tmpfs /dev/shm tmpfs rw,nosuid,nodev,noexec"), shm
    await sh_ok(container, "id -u alice || adduser -D alice")
    await sh_ok(container, "dd if=/dev/zero of=/dev/shm/alice bs=1024 count=64", user="alice")


async def test_sys_is_read_only(container):
    mounts = await sh_ok(container, "cat /proc/mounts")
    sysfs = [line for line in mounts.splitlines() if line.split()[1:2] == ["/sys"]]
    assert sysfs, mounts
    assert sysfs[0].startswith("sysfs /sys sysfs ro"), sysfs
    code, _, _ = await sh(container, "touch /sys/gactor-e2e")
    assert code != 0


async def test_tmp_is_sticky_and_world_writable(container):
    out = await sh_ok(container, "ls -ld /tmp")
    assert out.startswith("drwxrwxrwt"), out


async def test_devices(container):
    await sh_ok(container, "test -c /dev/null && echo discard > /dev/null")
    code, out, _ = await run(container, "cat", ["/dev/null"])
    assert (code, out) == (0, b"")
    await sh_ok(container, "test -d /dev/pts")
    code, out, _ = await sh(container, "head -c 5 /dev/zero | od -An -tx1")
    assert code == 0
    assert out.split() == [b"00"] * 5


async def test_loopback_is_up(container):
    out = await sh_ok(container, "ip -o link show lo")
    flags = re.search(r"<([^>]*)>", out)
    assert flags, out
    assert "UP" in flags.group(1).split(","), out


async def test_only_container_processes_are_visible(container):
    code, out, _ = await run(container, "ps")
    assert code == 0
    lines = out.decode().splitlines()
    assert lines[0].split()[0] == "PID"
    pids = {int(line.split()[0]) for line in lines[1:]}
    # garden-init (pid 1) and ps itself; the host's hundreds of processes stay hidden.
    assert 1 in pids
    assert len(pids) <= 3, out
    assert any("garden-init" in line for line in lines[1:]), out


async def test_no_fds_leak_into_processes(container):
    code, out, _ = await run(container, "ls", ["/proc/self/fd"])
    assert code == 0
    assert out.split() == [b"0", b"1", b"2", b"3"]


# ---- stop ---------------------------------------------------------------------------


async def _start_until_ready(container, script):
    """Run a script that prints ``ready`` once its traps are set; returns (process, out)."""
    out = Sink()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", script]), ProcessIO(stdout=out, stderr=Sink())
    )
    await wait_for(lambda: b"ready" in out.data, 10, what="the process to print ready")
    return process, out


async def test_stop_sends_term(container):
    process, out = await _start_until_ready(
        container, "trap 'echo termed; exit 42' TERM; echo ready; while :; do sleep 0.05; done"
    )
    with trio.fail_after(9):  # well before the ~10 s KILL: it was TERM that ended it
        await container.stop(kill=False)
        assert await process.wait() == 42
    assert b"termed" in out.data
    assert (await container.info()).state == "stopped"


async def test_stop_reaches_child_processes(container):
    # The parent waits on a child shell that waits on sleep; TERM must reach all three.
    process, _ = await _start_until_ready(container, "sh -c 'sleep 1000 & wait' & echo ready; wait")
    await wait_for(
        lambda: sum(proc_name(p) == "sleep" for p in container_pids(container.handle)) == 1,
        10,
        what="sleep to run in the container",
    )
    started = trio.current_time()
    with trio.fail_after(9):
        await container.stop(kill=False)
        assert await process.wait() == 143
        await wait_for(
            lambda: {proc_name(p) for p in container_pids(container.handle)} == {"garden-init"},
            9 - (trio.current_time() - started),
            what="only garden-init to remain",
        )
    assert (await container.info()).state == "stopped"


@pytest.mark.slow
async def test_stop_kills_term_ignoring_process_after_10s(container):
    process, _ = await _start_until_ready(
        container, "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    )
    started = time.monotonic()
    with trio.fail_after(30):
        await container.stop(kill=False)
        code = await process.wait()
    elapsed = time.monotonic() - started
    assert code in (137, 255)
    assert elapsed >= 9.5, f"killed after only {elapsed:.1f}s"
    assert (await container.info()).state == "stopped"


async def test_stop_kill_is_immediate(container):
    gate = StdinGate()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", "trap '' TERM; read x"]), ProcessIO(stdin=gate)
    )
    await wait_for(lambda: len(container_pids(container.handle)) >= 2, 10, what="sh to start")
    with trio.fail_after(5):
        await container.stop(kill=True)
        assert await process.wait() == 137
    assert (await container.info()).state == "stopped"
    gate.release()


# ---- destroy ------------------------------------------------------------------------


async def test_the_host_mount_table_holds_no_container_overlay(gactor_server, client):
    """Each container's overlay is mounted in its own mount namespace only, so the host's
    mount table (which every new mount namespace copies) does not grow with containers:
    containers started from a warm shim, a cold one (a burst drains the warm pool) and a
    privileged one (cold, host user namespace)."""
    depot_mounts = mounts_containing(gactor_server.depot)
    handles = [unique_handle() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for handle in handles[:3]:
            nursery.start_soon(client.create, ContainerSpec(handle=handle))
    await client.create(ContainerSpec(handle=handles[3], privileged=True))
    try:
        assert mounts_containing(gactor_server.depot) == depot_mounts
        assert mounts_containing(gactor_server.depot, gactor_server.proc.pid) == depot_mounts
        for handle in handles:
            root = gactor_server.container_root(handle)
            with open(os.path.join(os.path.dirname(root), "mountinfo")) as f:
                top = [line for line in f if line.split()[4] == "/"]
            assert len(top) == 1, top
            assert " - overlay " in top[0], top
            assert os.path.exists(os.path.join(root, "bin", "sh"))  # what the host reads through
    finally:
        for handle in handles:
            await client.destroy(handle)


async def test_destroy_kills_processes_and_releases_everything(gactor_server, client):
    handle = unique_handle()
    container = await client.create(ContainerSpec(handle=handle))
    info = await container.info()
    container_path = info.container_path
    assert await trio.Path(container_path).is_dir()
    assert cgroup_dirs(handle), "the container has no cgroup"

    process = await container.run(
        ProcessSpec(path="sleep", args=["1000"]), ProcessIO(stdout=Sink(), stderr=Sink())
    )
    await wait_for(
        lambda: "sleep" in {proc_name(p) for p in container_pids(handle)}, 10, what="sleep"
    )
    pids = container_pids(handle)
    codes = []

    async def waiter():
        codes.append(await process.wait())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await client.destroy(handle)

    assert codes == [137]
    # Everything the container had is gone, as seen from the host.
    await wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10, what="pids")
    assert cgroup_dirs(handle) == []
    assert not await trio.Path(container_path).exists()
    assert mounts_containing(container_path) == []
    assert mounts_containing(container_path, gactor_server.proc.pid) == []
    # Its directory goes through the trash, which the server empties in the background.
    await wait_for(lambda: [p for p in paths_under(gactor_server.depot) if handle in p] == [], 10,
                   what="the container's directory to be removed")
    with pytest.raises(ContainerNotFoundError):
        await client.lookup(handle)
