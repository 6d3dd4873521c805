"""What confines a container's processes, checked from inside and from outside: seccomp,
capabilities, no_new_privs, the cgroup namespace and its read-only cgroup filesystems,
privileged containers; then hostile input against the real server (bad names, bind
mounts that traverse or symlink out, tar entries aimed at the host), each answered with
a clear error while the host files they aim at stay as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator

import msgpack
import pytest
import trio

from gactor import (
    BindMount,
    BindMountMode,
    BindMountOrigin,
    ContainerNotFoundError,
    ContainerSpec,
    GardenError,
    ProcessIO,
    ProcessSpec,
    StreamInSpec,
    StreamOutSpec,
)

from .helpers import (
    E2E_MARKS,
    ROOTFS,
    Sink,
    StdinGate,
    container_pids,
    ensure_user,
    init_pid,
    proc_name,
    proc_status,
    sh,
    sh_ok,
    unique_handle,
    wait_for,
)

pytestmark = E2E_MARKS

UNPRIVILEGED_CAPS = 0xA80425FB
ROOT_CAPS = dict(CapInh=UNPRIVILEGED_CAPS, CapPrm=UNPRIVILEGED_CAPS, CapEff=UNPRIVILEGED_CAPS,
                 CapBnd=UNPRIVILEGED_CAPS, CapAmb=0)  # fmt: skip
EPERM_TEXT = "Operation not permitted"
EROFS_TEXT = "Read-only file system"


def status_inside(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def caps_of(status: dict[str, str]) -> dict[str, int]:
    return {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}


def host_cgroup_hierarchies() -> dict[str, str]:
    """Host v1 hierarchies (mount point basename -> options naming it) and cgroup2 mounts."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] in ("cgroup", "cgroup2"):
                found.setdefault(os.path.basename(fields[4]), fields[sep + 1])
    return found


async def sleeper(container, user: str = "root"):
    """``sleep 1000`` in the container; (process, host pid)."""
    process = await container.run(
        ProcessSpec(path="sleep", args=["1000"], user=user), ProcessIO(stdout=Sink(), stderr=Sink())
    )

    def find() -> int:
        pids = [p for p in container_pids(container.handle) if proc_name(p) == "sleep"]
        return pids[0] if len(pids) == 1 else 0

    return process, int(await wait_for(find, 10, what="the sleep process"))


# ---- seccomp --------------------------------------------------------------------------


async def test_every_process_of_an_unprivileged_container_is_filtered(container):
    _, pid = await sleeper(container)
    assert proc_status(pid)["Seccomp"] == "2"
    assert proc_status(await init_pid(container.handle))["Seccomp"] == "2"
    inside = status_inside(await sh_ok(container, "cat /proc/self/status"))
    assert (inside["Seccomp"], inside["Seccomp_filters"]) == ("2", "1")


async def test_the_stream_in_tar_is_filtered_too(container):
    gate = StdinGate(b"")  # tar waits for its archive while we look at it
    seen: dict[str, str] = {}

    async def look() -> None:
        init = await init_pid(container.handle)

        def tar_pid() -> int:
            # Named tar once confined (the helper that forks it, in the cgroup a moment
            # earlier, has the shim's name and no filter of its own).
            others = [p for p in container_pids(container.handle) if p != init and proc_name(p) == "tar"]
            return others[0] if len(others) == 1 else 0

        pid = int(await wait_for(tar_pid, 10, what="the tar process"))
        seen.update(proc_status(pid))
        gate.release(_tar_of([("f", b"x")]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        await container.stream_in(StreamInSpec(path="/tmp", tar_stream=gate))
    assert seen["Seccomp"] == "2"
    assert caps_of(seen)["CapEff"] == UNPRIVILEGED_CAPS


@pytest.mark.parametrize("args", [["--user"], ["--mount"], ["--net"], ["--pid", "--fork"]])
async def test_namespaces_cannot_be_made_inside(container, args):
    code, _, err = await sh(container, f"busybox unshare {' '.join(args)} true", user="root")
    assert code != 0
    assert EPERM_TEXT in err.decode(), err


async def test_mount_is_refused_even_to_container_root(container):
    code, _, err = await sh(
        container, "mkdir -p /tmp/m && mount -t tmpfs tmpfs /tmp/m", user="root"
    )
    assert code != 0
    assert "denied" in err.decode() or EPERM_TEXT in err.decode(), err


async def test_ordinary_work_still_runs_under_the_filter(container):
    script = (
        "set -e; mkdir -p /tmp/w && cd /tmp/w && echo hi > a && ln -s a b && ln a c && "
        "tar -cf /tmp/x.tar . && mkdir /tmp/y && tar -xf /tmp/x.tar -C /tmp/y && "
        "cat /tmp/y/b && (sleep 0.01 &) && wait && ping -c1 -W2 127.0.0.1 >/dev/null && "
        "linux32 uname -m && mknod /tmp/p p && echo ok"
    )
    out = await sh_ok(container, script, user="root")
    assert out.split() == ["hi", "i686", "ok"]


async def test_privileged_containers_are_not_filtered(create_container):
    container = await create_container(privileged=True)
    inside = status_inside(await sh_ok(container, "cat /proc/self/status"))
    assert inside["Seccomp"] == "0"


async def test_processes_started_after_a_server_restart_are_filtered_too(own_servers):
    # The shim keeps the program it inherited; a new server's shims get a new one.
    server = own_servers("seccomp-restart", "10.253.67.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="before"))
    await server.kill()
    await server.start()
    async with server.connect() as client:
        before = await client.lookup("before")
        after = await client.create(ContainerSpec(handle="after"))
        for container in (before, after):
            inside = status_inside(await sh_ok(container, "cat /proc/self/status"))
            assert inside["Seccomp"] == "2", container.handle
            code, _, _ = await sh(container, "busybox unshare --user true")
            assert code != 0, container.handle
        await client.destroy("before")
        await client.destroy("after")


# ---- capabilities and no_new_privs ----------------------------------------------------


async def test_unprivileged_root_and_alice_capabilities(container):
    await ensure_user(container)
    root = caps_of(status_inside(await sh_ok(container, "cat /proc/self/status", user="root")))
    assert root == ROOT_CAPS
    alice = caps_of(status_inside(await sh_ok(container, "cat /proc/self/status", user="alice")))
    assert alice == {**ROOT_CAPS, "CapPrm": 0, "CapEff": 0}
    assert caps_of(proc_status(await init_pid(container.handle))) == ROOT_CAPS


SETUID_PING = ("cp /bin/busybox /tmp/ping && chmod 4755 /tmp/ping", "/tmp/ping -c1 -W2 127.0.0.1")


async def test_setuid_binaries_work_by_default(container):
    # busybox ping needs a raw socket (CAP_NET_RAW): alice gets one only through setuid.
    await ensure_user(container)
    await sh_ok(container, SETUID_PING[0], user="root")
    assert (
        status_inside(await sh_ok(container, "cat /proc/self/status", user="alice"))["NoNewPrivs"]
        == "0"
    )
    code, _, err = await sh(container, "ping -c1 -W2 127.0.0.1", user="alice")
    assert code != 0, "alice pinged without setuid: the test proves nothing"
    await sh_ok(container, SETUID_PING[1], user="alice")


async def test_no_new_privileges_flag_sets_it_and_setuid_stops_working(own_servers):
    server = own_servers("nnp", "10.253.64.0/24", "--no-new-privileges")
    await server.start()
    async with server.connect() as client:
        container = await client.create(ContainerSpec(handle=unique_handle()))
        await ensure_user(container)
        inside = status_inside(await sh_ok(container, "cat /proc/self/status", user="alice"))
        assert (inside["NoNewPrivs"], inside["Seccomp"]) == ("1", "2")
        await sh_ok(container, SETUID_PING[0], user="root")
        code, _, _ = await sh(container, SETUID_PING[1], user="alice")
        assert code != 0
        privileged = await client.create(ContainerSpec(handle=unique_handle(), privileged=True))
        assert status_inside(await sh_ok(privileged, "cat /proc/self/status"))["NoNewPrivs"] == "0"
        await client.destroy(container.handle)
        await client.destroy(privileged.handle)


# ---- cgroup namespace and cgroup filesystems ------------------------------------------


async def test_cgroup_filesystems_are_read_only_and_rooted_at_the_container(container):
    own = {
        os.path.basename(os.path.dirname(os.path.dirname(d)))
        for d in _container_cgroup_dirs(container.handle)
    }
    mounts = [
        line.split() for line in (await sh_ok(container, "cat /proc/self/mounts")).splitlines()
    ]
    cgroup_mounts = {
        m[1]: (m[2], set(m[3].split(","))) for m in mounts if m[1].startswith("/sys/fs/cgroup")
    }
    hierarchies = host_cgroup_hierarchies()
    assert own, "the container has no cgroup of its own"
    assert own <= set(hierarchies), (own, hierarchies)
    for name in own:
        fstype, options = cgroup_mounts[f"/sys/fs/cgroup/{name}"]
        assert fstype == hierarchies[name], (name, cgroup_mounts)
        assert "ro" in options, (name, cgroup_mounts)
    assert "ro" in cgroup_mounts["/sys/fs/cgroup"][1]
    # The container is the root of each: /proc/self/cgroup says "/", and the limit files
    # at the top are the container's own.
    for line in (await sh_ok(container, "cat /proc/self/cgroup")).splitlines():
        assert line.split(":", 2)[2] == "/", line
    if "memory" in own:
        inside = await sh_ok(container, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
        host = next(d for d in _container_cgroup_dirs(container.handle) if "/memory/" in d)
        with open(os.path.join(host, "memory.limit_in_bytes")) as f:
            assert inside == f.read()
        assert (
            await sh_ok(container, "ls /sys/fs/cgroup/memory | grep -c '^gactor' || true") == "0\n"
        )
    for script in (f"mkdir /sys/fs/cgroup/{sorted(own)[0]}/escape", "mkdir /sys/fs/cgroup/new"):
        code, _, err = await sh(container, script, user="root")
        assert code != 0, script
        assert EROFS_TEXT in err.decode(), (script, err)


async def test_a_process_joins_the_cgroup_namespace_of_its_container(container):
    _, pid = await sleeper(container)
    init = await init_pid(container.handle)
    assert os.readlink(f"/proc/{pid}/ns/cgroup") == os.readlink(f"/proc/{init}/ns/cgroup")
    assert os.readlink(f"/proc/{pid}/ns/cgroup") != os.readlink("/proc/self/ns/cgroup")


async def test_privileged_containers_mount_no_cgroup_filesystems(create_container):
    container = await create_container(privileged=True)
    mounts = await sh_ok(container, "cat /proc/self/mounts")
    assert not [m for m in mounts.splitlines() if m.split()[2] in ("cgroup", "cgroup2")], mounts


def _container_cgroup_dirs(handle: str) -> list[str]:
    from .helpers import cgroup_dirs

    return cgroup_dirs(handle)


# ---- privileged containers -------------------------------------------------------------


async def test_privileged_root_gets_the_servers_capabilities_inheritable_too(create_container):
    container = await create_container(privileged=True)
    with open("/proc/self/status") as f:
        bounding = int(next(line.split()[1] for line in f if line.startswith("CapBnd:")), 16)
    root = caps_of(status_inside(await sh_ok(container, "cat /proc/self/status", user="root")))
    assert root == dict(
        CapInh=bounding, CapPrm=bounding, CapEff=bounding, CapBnd=bounding, CapAmb=0
    )


async def test_privileged_containers_have_dev_fuse(create_container):
    container = await create_container(privileged=True)
    out = await sh_ok(container, "stat -c '%F %t:%T %a' /dev/fuse")
    assert out.split() == ["character", "special", "file", "a:e5", "666"]
    unprivileged = await create_container()
    code, _, _ = await sh(unprivileged, "test -e /dev/fuse")
    assert code != 0


async def test_disable_privileged_containers(own_servers):
    server = own_servers("nopriv", "10.253.65.0/24", "--disable-privileged-containers")
    await server.start()
    async with server.connect() as client:
        handle = unique_handle()
        with pytest.raises(GardenError, match="privileged container creation is disabled"):
            await client.create(ContainerSpec(handle=handle, privileged=True))
        with pytest.raises(ContainerNotFoundError):
            await client.lookup(handle)
        ok = await client.create(ContainerSpec(handle=unique_handle()))
        await client.destroy(ok.handle)


# ---- hostile input --------------------------------------------------------------------


def tree_digest(top: str) -> str:
    """A checksum of everything under ``top``: names, types, modes, owners, contents, link targets."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(f"{path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@contextlib.contextmanager
def target_dir() -> Iterator[str]:
    """A host directory an attack aims at, with a file in it; removed afterwards."""
    path = tempfile.mkdtemp(prefix="gactor-target-", dir="/tmp")
    try:
        with open(os.path.join(path, "precious"), "w") as f:
            f.write("host data\n")
        os.chmod(path, 0o777)  # even world-writable: only the container's confinement protects it
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _tar_of(
    entries: list[tuple[str, bytes]] | None = None,
    members: list[tuple[tarfile.TarInfo, bytes]] | None = None,
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries or []:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info, data in members or []:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    linkname: str = "",
    devmajor: int = 0,
    devminor: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o666
    info.devmajor, info.devminor = devmajor, devminor
    return info, data


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "x\0y", "../../etc", "/abs", "a" * 1025])
async def test_hostile_process_ids_are_refused(container, bad):
    with pytest.raises(GardenError) as raised:
        await container.run(ProcessSpec(path="true", id=bad), ProcessIO())
    assert "process id" in raised.value.message.lower() or "process_id" in raised.value.message
    assert await sh_ok(container, "echo alive") == "alive\n"


async def test_an_over_long_handle_is_refused(client):
    with pytest.raises(GardenError) as raised:
        await client.create(ContainerSpec(handle="h" * 1025))
    assert "handle" in raised.value.message.lower()


async def test_tar_entries_aimed_at_the_host_stay_in_the_container(gactor_server, container):
    with target_dir() as target:
        before = tree_digest(target)
        rootfs_before = tree_digest(ROOTFS)
        attacks = [
            _tar_of(members=[_member(f"../../../../../../..{target}/dotdot", data=b"evil")]),
            _tar_of(members=[_member(f"{target}/absolute", data=b"evil")]),
            _tar_of(
                members=[
                    _member("out", tarfile.SYMTYPE, linkname=target),
                    _member("out/through-symlink", data=b"evil"),
                ]
            ),
            _tar_of(
                members=[
                    _member("hard", tarfile.LNKTYPE, linkname=f"{target}/precious"),
                    _member("hard", data=b"evil"),
                ]
            ),
            _tar_of(
                members=[
                    _member("up", tarfile.SYMTYPE, linkname="../../../../../../.."),
                    _member(f"up{target}/via-relative-link", data=b"evil"),
                ]
            ),
        ]
        for archive in attacks:
            with contextlib.suppress(GardenError):  # refusing is fine; escaping is not
                await container.stream_in(
                    StreamInSpec(path="/tmp/in", user="root", tar_stream=archive)
                )
        assert tree_digest(target) == before
        assert tree_digest(ROOTFS) == rootfs_before
        # What could be written went into the container.
        listing = await sh_ok(
            container,
            "find /tmp/in 2>/dev/null | sort; cat /tmp/in/out/through-symlink "
            f"{target}/precious 2>/dev/null || true",
        )
        assert "host data" not in listing
    assert gactor_server.running


async def test_device_nodes_in_a_tar_cannot_reach_host_devices(container):
    disk = _host_block_device()
    archive = _tar_of(
        members=[
            _member("disk", tarfile.BLKTYPE, devmajor=disk[0], devminor=disk[1]),
            _member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
        ]
    )
    with pytest.raises(GardenError) as raised:
        await container.stream_in(StreamInSpec(path="/tmp/dev", user="root", tar_stream=archive))
    assert "error streaming in" in raised.value.message
    code, _, _ = await sh(container, "head -c1 /tmp/dev/disk || head -c1 /tmp/dev/mem", user="root")
    assert code != 0


def _host_block_device() -> tuple[int, int]:
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram", "nbd")):
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
            return int(major), int(minor)
    return 7, 0


async def test_stream_out_through_a_symlink_reads_the_container_not_the_host(container):
    with target_dir() as target:
        await sh_ok(
            container,
            f"ln -s {target} /tmp/link-out; ln -s {target}/precious /tmp/file-out",
            user="root",
        )
        for path in ("/tmp/link-out/precious", "/tmp/file-out"):
            with contextlib.suppress(GardenError):
                data = b""
                async with await container.stream_out(
                    StreamOutSpec(path=path, user="root")
                ) as chunks:
                    async for chunk in chunks:
                        data += chunk
                assert b"host data" not in data, path


@pytest.mark.parametrize("dst", ["/../../../../tmp/gactor-escape", "/tmp/../../../gactor-escape"])
async def test_bind_mount_destinations_with_dotdot_stop_at_the_container_root(
    gactor_server, client, dst
):
    with target_dir() as source:
        handle = unique_handle()
        spec = ContainerSpec(handle=handle, bind_mounts=[BindMount(src_path=source, dst_path=dst)])
        container = await client.create(spec)
        try:
            landed = "/" + os.path.normpath(dst).lstrip("/")
            assert await sh_ok(container, f"cat {landed}/precious") == "host data\n"
            init = await init_pid(handle)
            assert os.path.exists(f"/proc/{init}/root{landed}/precious")
        finally:
            await client.destroy(handle)
        assert not os.path.exists("/tmp/gactor-escape")
        assert not os.path.exists("/gactor-escape")


@contextlib.contextmanager
def image_with_links_out(victim: str) -> Iterator[str]:
    """A copy of the busybox image holding symlinks to ``victim``: absolute, and up with ``..``."""
    path = tempfile.mkdtemp(prefix="gactor-image-", dir="/tmp")
    try:
        shutil.copytree(ROOTFS, os.path.join(path, "rootfs"), symlinks=True)
        rootfs = os.path.join(path, "rootfs")
        os.symlink(victim, os.path.join(rootfs, "abs-out"))
        os.symlink("../../../../../../.." + victim, os.path.join(rootfs, "tmp", "rel-out"))
        yield rootfs
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("link", ["/abs-out", "/tmp/rel-out"])
async def test_bind_mounts_through_an_images_symlinks_resolve_inside_the_rootfs(
    gactor_server, client, link
):
    with target_dir() as victim, target_dir() as source, image_with_links_out(victim) as rootfs:
        before = tree_digest(victim)
        # A container-origin source through the link: it names the rootfs's own victim
        # path, which does not exist there (the host's is never looked at).
        spec = ContainerSpec(
            handle=unique_handle(),
            rootfs_path=rootfs,
            bind_mounts=[
                BindMount(
                    src_path=f"{link}/precious", dst_path="/mnt/x", origin=BindMountOrigin.CONTAINER
                )
            ],
        )
        with pytest.raises(GardenError, match="does not exist in the container"):
            await client.create(spec)
        # A destination through the link: mounted inside the rootfs, never over the host.
        handle = unique_handle()
        spec = ContainerSpec(
            handle=handle,
            rootfs_path=rootfs,
            bind_mounts=[
                BindMount(src_path=source, dst_path=f"{link}/mounted", mode=BindMountMode.RO)
            ],
        )
        container = await client.create(spec)
        try:
            assert await sh_ok(container, f"cat {victim}/mounted/precious") == "host data\n"
            assert not os.path.exists(os.path.join(victim, "mounted"))
        finally:
            await client.destroy(handle)
        assert tree_digest(victim) == before


async def test_env_without_equals_is_refused(container):
    with pytest.raises(GardenError) as raised:
        await container.run(ProcessSpec(path="true", env=["NOEQUALS"]), ProcessIO())
    assert "NOEQUALS" in raised.value.message


# ---- hostile peers ---------------------------------------------------------------------


async def test_a_thousand_idle_connections_and_clients_that_never_read(own_servers):
    """1000 TCP connections that never finish a handshake, 50 websocket clients that flood
    calls and never read a reply: a well-behaved client is still served, and once they
    are gone the server's fds are back where they were."""
    from trio_websocket import open_websocket_url

    from .helpers import server_fds

    server = own_servers("flood", "10.253.66.0/24")
    await server.start()
    host, port = server.url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
    async with server.connect() as client:
        # One create first: it opens what the server keeps for good (netlink, image store).
        warm = await client.create(ContainerSpec(handle=unique_handle()))
        await client.destroy(warm.handle)
        baseline = server_fds(server.pid)
        idle: list[trio.SocketStream] = []
        try:
            for _ in range(1000):
                idle.append(await trio.open_tcp_stream(host, int(port)))
            async with trio.open_nursery() as nursery:

                async def flood(n: int) -> None:
                    async with open_websocket_url(server.url) as ws:
                        for i in range(200):  # replies pile up unread on our side
                            await ws.send_message(
                                msgpack.packb(
                                    {"t": "call", "id": i + 1, "method": "containers", "args": {}}
                                )
                            )
                        with trio.move_on_after(3):
                            await trio.sleep_forever()

                for n in range(50):
                    nursery.start_soon(flood, n)
                await trio.sleep(0.5)
                with trio.fail_after(10):
                    await client.ping()
                    created = await client.create(ContainerSpec(handle=unique_handle()))
                    assert await sh_ok(created, "echo served") == "served\n"
                    await client.destroy(created.handle)
        finally:
            for stream in idle:
                await stream.aclose()
        assert server.running
        await wait_for(
            lambda: server_fds(server.pid) <= baseline,
            20,
            what=f"the server's fds back to {baseline}",
        )
