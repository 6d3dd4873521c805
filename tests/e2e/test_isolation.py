"""What keeps a container in: bind mounts, privileged containers, masked and read-only
``/proc`` paths, and the device cgroup.

Each claim is checked twice where the kernel allows: from inside (the errno a process
gets) and from outside (pid 1's ``mountinfo``, ``/proc/<pid>/status``, the cgroup files).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import pytest
import trio

from gactor import (
    BindMount,
    BindMountMode,
    BindMountOrigin,
    ContainerSpec,
    GardenError,
    ProcessIO,
    ProcessSpec,
)

from .helpers import (
    E2E_MARKS,
    ROOTFS,
    Sink,
    cgroup_dirs,
    container_pids,
    host_snapshot,
    proc_name,
    proc_status,
    sh,
    sh_ok,
    unique_handle,
    wait_for,
    wait_until_nothing_left,
)

pytestmark = E2E_MARKS

EROFS_TEXT = "Read-only file system"
EPERM_TEXT = "Operation not permitted"
# Garden's unprivileged set (SECURITY_BASELINE.md).
UNPRIVILEGED_CAPS = 0xA80425FB
CAP_SYS_ADMIN = 21
# Docker's masked paths (moby daemon/pkg/oci/defaults.go), plus every thermal_throttle dir.
DOCKER_MASKED = (
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys",
    "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
    "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# What the server writes to devices.allow after "a" to devices.deny (cgroup v1 shows
# the rules back in devices.list exactly as written).
DEVICE_LIST = {
    "c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
    "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm",
}


# ---- helpers --------------------------------------------------------------------------


@contextlib.contextmanager
def host_dir(mode: int = 0o755) -> Iterator[str]:
    """A directory on the host (in /tmp, whose ancestors container root can traverse),
    removed afterwards with whatever a container wrote into it."""
    path = tempfile.mkdtemp(prefix="gactor-bind-", dir="/tmp")
    try:
        os.chmod(path, mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def init_pid(handle: str) -> int:
    """Host pid of the container's garden-init, found through its cgroup."""

    def find() -> int:
        inits = [p for p in container_pids(handle) if proc_name(p) == "garden-init"]
        return inits[0] if len(inits) == 1 else 0

    return int(await wait_for(find, 10, what=f"the garden-init of {handle}"))


def mountinfo(pid: int) -> dict[str, tuple[set[str], str]]:
    """pid's mounts as seen from its root: mount point -> (per-mount options, fs type);
    the last mount on a mount point wins (it is the one visible)."""
    mounts: dict[str, tuple[set[str], str]] = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mounts[fields[4]] = (set(fields[5].split(",")), fields[sep + 1])
    return mounts


def caps(status: dict[str, str], key: str) -> int:
    return int(status[key], 16)


def host_bounding_set() -> int:
    return caps(proc_status(os.getpid()), "CapBnd")


def host_disk() -> tuple[str, int, int]:
    """A real block device of the host (not loop, ram or zram): (name, major, minor)."""
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith(("loop", "ram", "zram", "nbd")):
            continue
        with open(f"/sys/block/{name}/dev") as f:
            major, minor = f.read().strip().split(":")
        return name, int(major), int(minor)
    pytest.skip("the host has no block device other than loop/ram/zram")


def devices_cgroup(handle: str) -> str:
    dirs = [d for d in cgroup_dirs(handle) if os.path.exists(os.path.join(d, "devices.list"))]
    if not dirs:
        pytest.skip("no cgroup v1 devices hierarchy: on cgroup v2 gactor applies no device control yet")
    assert len(dirs) == 1, dirs
    return dirs[0]


async def sleeper_pid(container) -> tuple[object, int]:
    """Start ``sleep 1000`` as root in ``container``; (process, its host pid)."""
    process = await container.run(ProcessSpec(path="sleep", args=["1000"], user="root"),
                                  ProcessIO(stdout=Sink(), stderr=Sink()))

    def find() -> int:
        pids = [p for p in container_pids(container.handle) if proc_name(p) == "sleep"]
        return pids[0] if len(pids) == 1 else 0

    return process, int(await wait_for(find, 10, what="the sleep process"))


# ---- bind mounts ----------------------------------------------------------------------


async def test_ro_bind_mount_from_host_is_readable_and_not_writable(create_container):
    # World-writable on the host, so that only the read-only mount can refuse a write
    # (container root is an unmapped stranger to host-owned files: EACCES otherwise).
    with host_dir(mode=0o777) as src:
        with open(os.path.join(src, "hello"), "w") as f:
            f.write("from the host\n")
        os.chmod(os.path.join(src, "hello"), 0o666)
        container = await create_container(bind_mounts=[
            BindMount(src_path=src, dst_path="/mnt/ro", mode=BindMountMode.RO)])
        assert await sh_ok(container, "cat /mnt/ro/hello") == "from the host\n"
        for script in ("touch /mnt/ro/new", "echo x >> /mnt/ro/hello", "rm /mnt/ro/hello",
                       "mkdir /mnt/ro/d"):
            code, _, err = await sh(container, script, user="root")
            assert code != 0, script
            assert EROFS_TEXT in err.decode(), (script, err)
        assert sorted(os.listdir(src)) == ["hello"]
        # From outside: pid 1 sees a read-only bind of the host directory.
        options, _ = mountinfo(await init_pid(container.handle))["/mnt/ro"]
        assert "ro" in options, options


async def test_ro_bind_mount_is_read_only_in_its_submounts_too(create_container):
    # The submount is noatime: in a user namespace a remount must keep the atime flags too.
    with host_dir(mode=0o777) as src:
        sub = os.path.join(src, "sub")
        os.mkdir(sub)
        await trio.run_process(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1m,noatime", "gactor-e2e-sub", sub])
        try:
            container = await create_container(bind_mounts=[
                BindMount(src_path=src, dst_path="/mnt/ro", mode=BindMountMode.RO)])
            code, _, err = await sh(container, "touch /mnt/ro/sub/new", user="root")
            assert (code, EROFS_TEXT in err.decode()) == (1, True), err
            assert os.listdir(sub) == []
            mounts = mountinfo(await init_pid(container.handle))
            assert "ro" in mounts["/mnt/ro/sub"][0], mounts["/mnt/ro/sub"]
        finally:
            await trio.run_process(["umount", "-l", sub])


async def test_rw_bind_mount_from_host_writes_reach_the_host(create_container):
    with host_dir(mode=0o777) as src:
        container = await create_container(bind_mounts=[
            BindMount(src_path=src, dst_path="/mnt/rw", mode=BindMountMode.RW)])
        await sh_ok(container, "echo from the container > /mnt/rw/out", user="root")
        with open(os.path.join(src, "out")) as f:
            assert f.read() == "from the container\n"
        # Written by container root, which is host uid 4294967294 (no host root).
        assert os.stat(os.path.join(src, "out")).st_uid == 4294967294
        with open(os.path.join(src, "back"), "w") as f:
            f.write("from the host\n")
        assert await sh_ok(container, "cat /mnt/rw/back") == "from the host\n"
        options, _ = mountinfo(await init_pid(container.handle))["/mnt/rw"]
        assert "rw" in options, options


async def test_bind_mount_of_a_host_file(create_container):
    with host_dir() as src:
        path = os.path.join(src, "config")
        with open(path, "w") as f:
            f.write("key=value\n")
        os.chmod(path, 0o666)
        container = await create_container(bind_mounts=[
            BindMount(src_path=path, dst_path="/etc/app/config", mode=BindMountMode.RO)])
        assert await sh_ok(container, "cat /etc/app/config; test -f /etc/app/config") == "key=value\n"
        code, _, err = await sh(container, "echo x > /etc/app/config", user="root")
        assert code != 0
        assert EROFS_TEXT in err.decode()


async def test_bind_mounts_from_the_container(gactor_server, create_container):
    container = await create_container(bind_mounts=[
        BindMount(src_path="/etc", dst_path="/mnt/etc", mode=BindMountMode.RO,
                  origin=BindMountOrigin.CONTAINER),
        BindMount(src_path="/tmp", dst_path="/mnt/tmp", mode=BindMountMode.RW,
                  origin=BindMountOrigin.CONTAINER),
    ])
    assert await sh_ok(container, "cat /mnt/etc/passwd") == await sh_ok(container, "cat /etc/passwd")
    code, _, err = await sh(container, "touch /mnt/etc/new", user="root")
    assert code != 0
    assert EROFS_TEXT in err.decode()
    await sh_ok(container, "echo through the bind > /mnt/tmp/file", user="root")
    assert await sh_ok(container, "cat /tmp/file") == "through the bind\n"
    # From outside: the write landed in the container's own rootfs (its overlay upper dir).
    upper = os.path.join(gactor_server.container_dir(container.handle), "upper", "tmp", "file")
    with open(upper) as f:
        assert f.read() == "through the bind\n"
    mounts = mountinfo(await init_pid(container.handle))
    assert "ro" in mounts["/mnt/etc"][0]
    assert "rw" in mounts["/mnt/tmp"][0]


async def test_container_paths_of_bind_mounts_resolve_symlinks_inside_the_rootfs(gactor_server, client,
                                                                                create_container):
    # A privileged container, whose pid 1 is host root: before pivot_root, an image's
    # absolute symlink followed on the host would bind the host's /etc in, or create
    # directories on the host's filesystem.
    marker = unique_handle("gactor-escape")
    with host_dir() as base:
        rootfs = os.path.join(base, "rootfs")
        shutil.copytree(ROOTFS, rootfs, symlinks=True)
        os.symlink("/", os.path.join(rootfs, "escape"))
        os.symlink("../../..", os.path.join(rootfs, "tmp", "up"))
        container = await create_container(privileged=True, rootfs_path=rootfs, bind_mounts=[
            BindMount(src_path="/escape/etc", dst_path="/mnt/etc", origin=BindMountOrigin.CONTAINER),
            BindMount(src_path="/tmp/up/etc", dst_path=f"/escape/tmp/{marker}",
                      origin=BindMountOrigin.CONTAINER),
        ])
        with open(os.path.join(rootfs, "etc", "passwd")) as f:
            image_passwd = f.read()
        with open("/etc/passwd") as f:
            assert f.read() != image_passwd, "the host and the image must differ for this test"
        assert await sh_ok(container, "cat /mnt/etc/passwd") == image_passwd
        assert await sh_ok(container, f"cat /tmp/{marker}/passwd") == image_passwd
        assert not os.path.exists(f"/tmp/{marker}")
        upper = os.path.join(gactor_server.container_dir(container.handle), "upper")
        assert os.path.isdir(os.path.join(upper, "tmp", marker))
        await client.destroy(container.handle)  # before its lower dir is removed


@pytest.mark.parametrize("origin", [BindMountOrigin.HOST, BindMountOrigin.CONTAINER])
async def test_missing_bind_mount_source_fails_create_and_leaves_nothing(gactor_server, client, container,
                                                                       origin):
    # ``container`` exists so that the image copy (a cache, kept) exists before the snapshot.
    missing = f"/tmp/gactor-missing-{unique_handle()}"
    handle = unique_handle()
    before = host_snapshot(gactor_server)
    with trio.fail_after(60), pytest.raises(GardenError) as caught:
        await client.create(ContainerSpec(handle=handle, bind_mounts=[
            BindMount(src_path=missing, dst_path="/mnt/x", origin=origin)]))
    assert missing in str(caught.value)
    assert handle not in {c.handle for c in await client.containers()}
    assert cgroup_dirs(handle) == []
    assert not os.path.exists(gactor_server.container_dir(handle))
    await wait_until_nothing_left(gactor_server, before)


# ---- privileged containers -----------------------------------------------------------


async def test_privileged_container_has_no_user_namespace(client, create_container):
    container = await create_container(privileged=True)
    uid_map = await sh_ok(container, "cat /proc/self/uid_map")
    assert [line.split() for line in uid_map.splitlines()] == [["0", "0", "4294967295"]]
    gid_map = await sh_ok(container, "cat /proc/self/gid_map")
    assert [line.split() for line in gid_map.splitlines()] == [["0", "0", "4294967295"]]
    # From outside: pid 1 and a process are host root, in the host's user namespace.
    init = await init_pid(container.handle)
    assert proc_status(init)["Uid"].split() == ["0"] * 4
    assert os.readlink(f"/proc/{init}/ns/user") == os.readlink("/proc/self/ns/user")
    assert os.readlink(f"/proc/{init}/ns/pid") != os.readlink("/proc/self/ns/pid")
    process, pid = await sleeper_pid(container)
    assert proc_status(pid)["Uid"].split() == ["0"] * 4
    await client.destroy(container.handle)
    with trio.fail_after(10):
        assert await process.wait() == 137


async def test_privileged_root_keeps_every_capability_the_host_has(create_container):
    container = await create_container(privileged=True)
    _, pid = await sleeper_pid(container)
    status = proc_status(pid)
    bounding = host_bounding_set()
    assert caps(status, "CapBnd") == bounding
    assert caps(status, "CapEff") == bounding
    assert caps(status, "CapPrm") == bounding
    inside = dict(line.split(":\t") for line in (await sh_ok(container, "cat /proc/self/status")).splitlines())
    assert int(inside["CapEff"], 16) == bounding


async def test_privileged_non_root_user_is_bounded_to_the_unprivileged_set_and_sys_admin(create_container):
    container = await create_container(privileged=True)
    await sh_ok(container, "id -u alice || adduser -D alice", user="root")
    inside = dict(line.split(":\t") for line in
                  (await sh_ok(container, "cat /proc/self/status", user="alice")).splitlines())
    assert int(inside["CapBnd"], 16) == UNPRIVILEGED_CAPS | 1 << CAP_SYS_ADMIN
    assert int(inside["CapEff"], 16) == 0


async def test_unprivileged_capabilities_from_outside(container):
    _, pid = await sleeper_pid(container)
    status = proc_status(pid)
    assert status["Uid"].split() == ["4294967294"] * 4
    for key in ("CapBnd", "CapEff", "CapPrm"):
        assert caps(status, key) == UNPRIVILEGED_CAPS, (key, status[key])
    assert caps(status, "CapAmb") == 0
    init = await init_pid(container.handle)
    assert caps(proc_status(init), "CapBnd") == UNPRIVILEGED_CAPS


# ---- masked and read-only paths ------------------------------------------------------


def docker_masked_paths() -> list[str]:
    """Docker's list, as far as the paths exist on this host (they exist in the
    container's /proc and /sys exactly when they do on the host)."""
    paths = [*DOCKER_MASKED, *glob.glob("/sys/devices/system/cpu/cpu*/thermal_throttle")]
    return [p for p in paths if os.path.exists(p)]


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
async def test_masked_paths_show_nothing(create_container, privileged):
    container = await create_container(privileged=privileged)
    paths = docker_masked_paths()
    assert "/proc/keys" in paths
    mounts = mountinfo(await init_pid(container.handle))
    for path in paths:
        if os.path.isdir(path):
            # An empty read-only tmpfs over it.
            assert await sh_ok(container, f"ls -A {path}") == "", path
            code, _, err = await sh(container, f"touch {path}/x", user="root")
            assert code != 0, path
            assert EROFS_TEXT in err.decode(), (path, err)
            options, fstype = mounts[path]
            assert (fstype, "ro" in options) == ("tmpfs", True), (path, mounts[path])
        else:
            # /dev/null over it: a null char device, reading gives nothing.
            out = await sh_ok(container, f"stat -c '%F %t:%T' {path}; wc -c < {path}", user="root")
            assert out.split() == ["character", "special", "file", "1:3", "0"], (path, out)
            assert path in mounts, path


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
async def test_proc_sys_and_other_proc_paths_are_read_only(create_container, privileged):
    container = await create_container(privileged=privileged)
    code, _, err = await sh(container, "echo other > /proc/sys/kernel/hostname", user="root")
    assert code != 0
    assert EROFS_TEXT in err.decode(), err
    assert (await sh_ok(container, "hostname")).strip() == container.handle[-49:]
    code, _, err = await sh(container, "echo 1 > /proc/sys/net/ipv4/ip_forward", user="root")
    assert code != 0
    assert EROFS_TEXT in err.decode(), err
    mounts = mountinfo(await init_pid(container.handle))
    for path in READONLY_PATHS:
        if os.path.exists(path):
            assert "ro" in mounts[path][0], (path, mounts.get(path))


# ---- device cgroup -------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
async def test_device_cgroup_allowlist_from_outside(create_container, privileged):
    container = await create_container(privileged=privileged)
    devices = devices_cgroup(container.handle)
    with open(os.path.join(devices, "devices.list")) as f:
        assert set(f.read().splitlines()) == DEVICE_LIST
    with open(os.path.join(devices, "cgroup.procs")) as f:
        assert await init_pid(container.handle) in {int(p) for p in f.read().split()}


async def test_unprivileged_mknod_of_a_block_device_fails(container):
    _, major, minor = host_disk()
    code, _, err = await sh(container, f"mknod /tmp/disk b {major} {minor}", user="root")
    assert code != 0
    assert EPERM_TEXT in err.decode(), err
    code, _, err = await sh(container, "mknod /dev/null2 c 1 3", user="root")
    assert code != 0, "an unprivileged container made a device node"


async def test_privileged_container_cannot_open_the_hosts_disk(create_container):
    name, major, minor = host_disk()
    container = await create_container(privileged=True)
    devices_cgroup(container.handle)
    # mknod is allowed ("b *:* m", as in Garden and runc); opening is what the cgroup stops.
    await sh_ok(container, f"mknod /dev/{name} b {major} {minor}", user="root")
    assert stat.S_ISBLK(os.stat(f"/proc/{await init_pid(container.handle)}/root/dev/{name}").st_mode)
    for script in (f"head -c 512 /dev/{name} > /dev/null", f"echo x > /dev/{name}"):
        code, _, err = await sh(container, script, user="root")
        assert code != 0, script
        assert EPERM_TEXT in err.decode(), (script, err)
    # The allowed devices still work.
    await sh_ok(container, "head -c 4 /dev/urandom > /dev/null && echo > /dev/null")


# ---- pid 1 ---------------------------------------------------------------------------
# What garden-init promises (and why it is not catatonit or tini: docs/architecture.md).


async def test_pid1_ignores_signals_sent_from_inside(container):
    init = await init_pid(container.handle)
    for sig in ("TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP"):
        # Container root holds CAP_KILL; the kernel queues signals pid 1 blocks.
        await sh_ok(container, f"kill -{sig} 1", user="root")
        status = proc_status(init)
        assert status.get("State", "gone")[0] in "SR", (sig, status.get("State"))
    assert await sh_ok(container, "echo still here") == "still here\n"
    assert proc_name(init) == "garden-init"


async def test_pid1_reaps_orphans(container):
    # The subshell exits at once; its sleep is reparented to pid 1 (the shim, a subreaper
    # outside the pid namespace, cannot adopt it), which must reap it when it exits.
    orphan = (await sh_ok(container, "(sleep 0.2 >/dev/null 2>&1 & echo $!)")).strip()

    def orphan_left() -> list[str]:
        return [f"{pid} {status.get('State')}" for pid in container_pids(container.handle)
                if (status := proc_status(pid)).get("NSpid", "").split()[-1:] == [orphan]]

    await wait_for(lambda: not orphan_left(), 10, what=f"the orphan (pid {orphan} inside) to be reaped")


async def test_pid1_is_small_and_static(container):
    init = await init_pid(container.handle)
    # Static, so it runs in any image, one without a libc too: it maps no shared library.
    with open(f"/proc/{init}/maps") as f:
        assert not [line for line in f if ".so" in line], "pid 1 maps a shared library"
    with open(f"/proc/{init}/smaps_rollup") as f:
        fields = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip().endswith("kB")}
    # Anonymous memory is what each container pays; the binary's pages are one copy in
    # the page cache for all of them. garden-init: ~44 KiB; a forked Python pid 1 held
    # ~14 MiB (the spawner's pages) and was the OOM killer's pick (docs/architecture.md).
    assert fields["Anonymous"] < 256, fields
