"""Peas: processes with their own image (``ProcessSpec.image``). A pea has its own root
filesystem and mount namespace and shares the container's other namespaces, cgroup,
/etc/hosts and /etc/resolv.conf (Garden's semantics, GARDEN_REFERENCE.md)."""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from gactor import ContainerSpec, GardenError, ProcessIO, ProcessSpec, Signal
from gactor.types import BindMount, ImageRef

from .helpers import (
    E2E_MARKS,
    ROOTFS,
    container_pids,
    mounts_containing,
    proc_name,
    run,
    sh_ok,
    unique_handle,
    wait_for,
)

pytestmark = E2E_MARKS


@pytest.fixture(scope="module")
def pea_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox rootfs plus a marker file: an image the container itself does not have."""
    base = tmp_path_factory.mktemp("pea-image")
    os.chmod(base, 0o755)
    image = os.path.join(base, "rootfs")
    shutil.copytree(ROOTFS, image, symlinks=True)
    with open(os.path.join(image, "pea-marker"), "w") as f:
        f.write("from the pea's image\n")
    return image


def pea(image: str, script: str, **kwargs: object) -> ProcessSpec:
    return ProcessSpec(path="sh", args=["-c", script], image=ImageRef(uri=image), **kwargs)  # type: ignore[arg-type]


async def pea_out(container, image: str, script: str, **kwargs: object) -> str:
    from .helpers import Sink

    out, err = Sink(), Sink()
    proc = await container.run(pea(image, script, **kwargs), ProcessIO(stdout=out, stderr=err))
    code = await proc.wait()
    assert code == 0, (code, out.data, err.data)
    return out.data.decode()


async def test_a_pea_runs_in_its_own_root_filesystem(container, pea_image):
    assert await pea_out(container, pea_image, "cat /pea-marker; echo mine > /pea-only") == "from the pea's image\n"
    code, _, _ = await run(container, "cat", ["/pea-marker"])
    assert code != 0  # the container's root has no marker
    assert (await run(container, "cat", ["/pea-only"]))[0] != 0  # nor what the pea wrote


async def test_a_pea_shares_every_namespace_but_mount(container, pea_image):
    names = ("pid", "net", "ipc", "uts", "user", "mnt")
    script = "; ".join(f"readlink /proc/self/ns/{n}" for n in names)
    own = dict(zip(names, (await pea_out(container, pea_image, script)).split(), strict=True))
    theirs = dict(zip(names, (await sh_ok(container, script)).split(), strict=True))
    assert {n: own[n] == theirs[n] for n in names} == {**{n: True for n in names[:-1]}, "mnt": False}


async def test_a_pea_sees_the_containers_hosts_and_resolv_conf_and_starts_in_slash(container, pea_image):
    script = "cat /etc/hosts /etc/resolv.conf"
    assert await pea_out(container, pea_image, script) == await sh_ok(container, script)
    assert await pea_out(container, pea_image, "pwd") == "/\n"
    assert await pea_out(container, pea_image, "pwd", dir="/tmp") == "/tmp\n"


async def test_an_unprivileged_peas_root_owns_its_image(container, pea_image):
    assert await pea_out(container, pea_image, "id -u; stat -c %u /bin/busybox") == "0\n0\n"


async def test_a_pea_without_the_executable_fails_in_run(container, pea_image):
    with pytest.raises(GardenError, match="executable file not found"):
        await container.run(ProcessSpec(path="no-such-binary", image=ImageRef(uri=pea_image)), ProcessIO())


async def test_a_peas_own_bind_mounts_from_the_host_and_the_container(container, pea_image, tmp_path):
    from gactor.types import BindMountMode, BindMountOrigin

    host_dir = tmp_path / "shared"
    host_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(host_dir, 0o755)
    (host_dir / "from-host").write_text("host file\n")
    await sh_ok(container, "mkdir -p /srv/box && echo container file > /srv/box/from-container")
    binds = [BindMount(src_path=str(host_dir), dst_path="/mnt/host"),
             BindMount(src_path="/srv/box", dst_path="/mnt/box", mode=BindMountMode.RW,
                       origin=BindMountOrigin.CONTAINER)]
    out = await pea_out(container, pea_image, "cat /mnt/host/from-host /mnt/box/from-container;"
                        " touch /mnt/host/x 2>/dev/null && echo host-writable; echo pea > /mnt/box/from-pea",
                        bind_mounts=binds)
    assert out == "host file\ncontainer file\n"
    assert await sh_ok(container, "cat /srv/box/from-pea") == "pea\n"
    assert not (host_dir / "x").exists()
    missing = [BindMount(src_path=str(tmp_path / "missing"), dst_path="/mnt/m")]
    with pytest.raises(GardenError, match="missing"):
        await container.run(pea(pea_image, "true", bind_mounts=missing), ProcessIO())


async def test_a_finished_pea_leaves_nothing_and_destroy_ends_running_ones(client, gactor_server, pea_image):
    container = await client.create(ContainerSpec(handle=unique_handle()))
    directory = gactor_server.container_dir(container.handle)
    peas = os.path.join(directory, "peas")
    await pea_out(container, pea_image, "true")
    await wait_for(lambda: not os.listdir(peas), what="the finished pea's directory to go")
    assert mounts_containing(peas) == []

    sleeper = await container.run(pea(pea_image, "sleep 1000"), ProcessIO())
    # Its overlay is in its own mount namespace only, never in the host's.
    assert mounts_containing(peas) == []
    pid = await wait_for(lambda: [p for p in container_pids(container.handle) if proc_name(p) == "sleep"],
                         what="the pea's sleep")
    with open(f"/proc/{pid[0]}/mountinfo") as f:
        assert [line for line in f if line.split()[4] == "/" and " - overlay " in line]
    await client.destroy(container.handle)
    with trio.fail_after(10):
        assert await sleeper.wait() == 137
    assert mounts_containing(directory) == []


async def test_a_pea_of_a_privileged_container(create_container, pea_image):
    container = await create_container(privileged=True)
    assert await pea_out(container, pea_image, "cat /pea-marker; id -u") == "from the pea's image\n0\n"


def limited_spec() -> ContainerSpec:
    from gactor import Limits, MemoryLimits

    return ContainerSpec(handle=unique_handle(), limits=Limits(memory=MemoryLimits(limit_in_bytes=64 << 20)))


async def pea_code(container, image: str, script: str, **kwargs: object) -> int:
    proc = await container.run(pea(image, script, **kwargs), ProcessIO())
    return await proc.wait()


async def test_a_pea_shares_the_containers_memory_limit_unless_it_has_its_own(create_container, gactor_server,
                                                                               pea_image):
    from gactor import MemoryLimits
    from gactor.types import ProcessLimits

    from .helpers import server_cgroup_dirs

    container = await create_container(limited_spec())
    assert (await sh_ok(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=5 2>/dev/null; echo ok")) == "ok\n"
    # Its own /dev/shm, the container's memory: 5 + 60 MiB do not fit in 64 MiB.
    assert await pea_code(container, pea_image, "dd if=/dev/zero of=/dev/shm/x bs=1M count=60") != 0
    # An empty override: a cgroup of its own, without the container's limit.
    assert await pea_code(container, pea_image, "dd if=/dev/zero of=/dev/shm/x bs=1M count=65",
                          override_container_limits=ProcessLimits()) == 0
    # Its own limit.
    assert await pea_code(container, pea_image, "dd if=/dev/zero of=/dev/shm/x bs=1M count=33",
                          override_container_limits=ProcessLimits(memory=MemoryLimits(32 << 20))) != 0
    name = os.path.basename(gactor_server.container_dir(container.handle))
    await wait_for(lambda: not [d for d in server_cgroup_dirs(gactor_server.depot) if f"{name}%pea" in d],
                   what="the peas' own cgroups to go")


async def test_bulk_metrics_answers_for_a_peas_process_id(client, container, pea_image):
    """As Garden's: a running pea's process id works as a handle in bulk_metrics."""
    proc = await container.run(pea(pea_image, "sleep 1000", id=f"pea-{unique_handle()}"), ProcessIO())
    try:
        entries = await client.bulk_metrics([proc.id, "no-such-handle-or-pea"])
        assert entries[proc.id].err is None
        assert entries[proc.id].metrics.memory_stat.total_usage_toward_limit > 0
        assert entries[proc.id].metrics.pid_stat.current >= 1
        assert entries["no-such-handle-or-pea"].metrics is None
    finally:
        await proc.signal(Signal.KILL)
        await proc.wait()


async def test_a_pea_is_confined_like_any_process(container, pea_image):
    """Seccomp filter and Garden's root capabilities in a pea of an unprivileged container."""
    status = await pea_out(container, pea_image, "grep -E '^(Seccomp|CapEff|CapBnd):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status.splitlines())
    assert fields == {"Seccomp": "2", "CapEff": "00000000a80425fb", "CapBnd": "00000000a80425fb"}
    assert "Operation not permitted" in await pea_out(container, pea_image, "unshare --user true 2>&1; true")


async def test_peas_across_a_server_restart(own_servers, pea_image):
    """A pea started before a kill -9 of the server keeps running and is re-adopted; a new
    pea after the restart gets a directory of its own; destroy leaves nothing."""
    import signal

    server = own_servers("peas", "10.248.32.0/24")
    await server.start()
    async with server.connect() as client:
        container = await client.create(ContainerSpec(handle="p1"))
        await container.run(pea(pea_image, "sleep 1000", id="old-pea"), ProcessIO())
    await server.kill(signal.SIGKILL)
    await server.start()
    async with server.connect() as client:
        container = await client.lookup("p1")
        assert "old-pea" in (await container.info()).process_ids
        assert await pea_out(container, pea_image, "cat /pea-marker") == "from the pea's image\n"
        directory = server.container_dir("p1")
        await client.destroy("p1")
    assert mounts_containing(directory) == []
    await server.finish()
