"""Disk limits (``limits.disk``) on the real server: a limited container's writes stop at
its limit with ENOSPC (as root and as another user), its neighbours are unaffected, the
total scope counts the image, metrics come from the limited file system's counters, and
destroying the container releases its loop device."""

from __future__ import annotations

import os
import subprocess
import tarfile

import pytest

from gactor import ContainerSpec, DiskLimits, DiskLimitScope, GardenError, Limits, StreamInSpec

from .helpers import E2E_MARKS, sh, sh_ok, wait_for

pytestmark = E2E_MARKS
MiB = 1 << 20


def loop_devices_for(image: str) -> str:
    """Loop devices backed by the container's disk image, wherever its directory is now
    (a destroyed container's directory is renamed into the depot's trash first)."""
    name = os.path.basename(os.path.dirname(image))
    return "\n".join(line for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
                     .splitlines() if "disk.img" in line and f"/{name}" in line)


async def test_exclusive_limit_stops_writes(gactor_server, client, create_container) -> None:
    limits = DiskLimits(byte_hard=16 * MiB, scope=DiskLimitScope.EXCLUSIVE)
    c = await create_container(limits=Limits(disk=limits))
    assert await c.current_disk_limits() == limits
    code, out, err = await sh(c, "dd if=/dev/zero of=/big bs=64k count=512 2>&1; sync; ls -l /big")
    assert code != 0 or b"No space left" in out + err
    assert b"No space left on device" in out + err
    written = int((await sh_ok(c, "stat -c %s /big")).strip())
    assert 15 * MiB <= written <= 16 * MiB  # the limit, less a few blocks of directories
    metrics = await c.metrics()
    assert 15 * MiB <= metrics.disk_stat.exclusive_bytes_used <= 16 * MiB
    # As another user too, and the container keeps working once space is freed.
    await sh_ok(c, "adduser -D -u 1234 writer")
    code, out, err = await sh(c, "dd if=/dev/zero of=/tmp/more bs=1M count=8 2>&1", user="writer")
    assert b"No space left on device" in out + err
    await sh_ok(c, "rm /big /tmp/more && echo fine > /ok && cat /ok")
    # An unlimited neighbour is not affected.
    neighbour = await create_container()
    assert await neighbour.current_disk_limits() == DiskLimits()
    await sh_ok(neighbour, "dd if=/dev/zero of=/big bs=1M count=32 2>/dev/null && rm /big")
    image = gactor_server.container_dir(c.handle) + "/disk.img"
    assert loop_devices_for(image)
    await client.destroy(c.handle)
    await wait_for(lambda: not loop_devices_for(image), within=15, what="the loop device released")


async def test_total_scope_counts_the_image(client, create_container) -> None:
    with pytest.raises(GardenError, match="not above the image's"):
        await client.create(ContainerSpec(limits=Limits(disk=DiskLimits(byte_hard=1024))))
    c = await create_container(limits=Limits(disk=DiskLimits(byte_hard=24 * MiB)))
    image_bytes = (await c.metrics()).disk_stat.total_bytes_used
    assert image_bytes > 0
    code, out, err = await sh(c, "dd if=/dev/zero of=/big bs=64k count=1024 2>&1")
    assert b"No space left on device" in out + err
    total = (await c.metrics()).disk_stat.total_bytes_used
    assert 23 * MiB <= total <= 24 * MiB


async def test_inode_limit(create_container) -> None:
    c = await create_container(limits=Limits(disk=DiskLimits(byte_hard=64 * MiB, inode_hard=4096,
                                                            scope=DiskLimitScope.EXCLUSIVE)))
    code, out, err = await sh(c, "mkdir /many && cd /many && i=0; while [ $i -lt 20000 ]; do "
                                 ": > f$i || exit 3; i=$((i+1)); done")
    assert code != 0, (out, err)
    assert b"No space left on device" in err
    count = int((await sh_ok(c, "ls /many | wc -l")).strip())
    assert 3900 <= count <= 4096


async def test_limit_survives_a_restart(own_servers) -> None:
    server = own_servers("disk-restart", "10.250.13.0/24")
    await server.start()
    limits = DiskLimits(byte_hard=16 * MiB, scope=DiskLimitScope.EXCLUSIVE)
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="kept", limits=Limits(disk=limits)))
    await server.kill()
    await server.start()
    async with server.connect() as client:
        c = await client.lookup("kept")
        assert await c.current_disk_limits() == limits
        code, out, err = await sh(c, "dd if=/dev/zero of=/big bs=1M count=32 2>&1")
        assert b"No space left on device" in out + err
        assert (await c.metrics()).disk_stat.exclusive_bytes_used >= 12 * MiB
        image = server.container_dir("kept") + "/disk.img"
        await client.destroy("kept")
        await wait_for(lambda: not loop_devices_for(image), within=15, what="the loop device released")
    await server.finish()


async def test_a_failed_create_releases_the_disk(gactor_server, client) -> None:
    from gactor import BindMount, BindMountOrigin

    from .helpers import unique_handle

    handle = unique_handle()
    with pytest.raises(GardenError):
        await client.create(ContainerSpec(handle=handle, limits=Limits(disk=DiskLimits(byte_hard=16 * MiB)),
                                          bind_mounts=[BindMount(src_path="/no/such/dir", dst_path="/mnt/x",
                                                                 origin=BindMountOrigin.CONTAINER)]))
    assert handle not in [c.handle for c in await client.containers()]
    image = gactor_server.container_dir(handle) + "/disk.img"
    await wait_for(lambda: not loop_devices_for(image), within=15, what="the loop device released")


def limited(byte_hard: int = 0, scope: DiskLimitScope = DiskLimitScope.EXCLUSIVE, handle: str = "") -> ContainerSpec:
    from .helpers import unique_handle

    return ContainerSpec(handle=handle or unique_handle(), limits=Limits(disk=DiskLimits(
        byte_hard=byte_hard, byte_soft=byte_hard, scope=scope)))


def mounted_under(directory: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(directory)]


async def test_an_image_bigger_than_a_total_limit_is_refused(client):
    spec = limited(MiB // 2, DiskLimitScope.TOTAL)
    with pytest.raises(GardenError, match=r"disk limit of \d+ bytes \(total scope\) is not above the image"):
        await client.create(spec)
    assert spec.handle not in [c.handle for c in await client.containers()]


async def test_destroy_releases_the_loop_device_and_mounts(client, gactor_server):
    container = await client.create(limited(8 * MiB))
    directory = gactor_server.container_dir(container.handle)
    assert (await sh(container, "echo hi > /root/x"))[0] == 0
    assert loop_devices_for(directory + "/disk.img")
    # The overlay (over the loop file system) is in the container's mount namespace only.
    assert not mounted_under(directory)
    assert " - overlay " in await sh_ok(container, "grep ' / / ' /proc/self/mountinfo")
    await client.destroy(container.handle)
    await wait_for(lambda: not loop_devices_for(directory + "/disk.img"), within=15, what="the loop device to detach")
    assert not mounted_under(directory)


async def test_a_tar_bomb_fills_only_the_containers_own_filesystem(create_container, gactor_server):
    """StreamIn of a 200 MiB file into a container limited to 16 MiB: the stream fails with
    a clear error, the depot's filesystem grew by no more than the limit, and the
    container can write again once it deleted the partial file."""
    container = await create_container(limited(16 * MiB))
    size = 200 * MiB
    header = tarfile.TarInfo("bomb")
    header.size = size

    async def bomb():
        yield header.tobuf(format=tarfile.GNU_FORMAT)
        chunk = bytes(MiB)
        for _ in range(size // MiB):
            yield chunk
        yield bytes(2 * tarfile.BLOCKSIZE)

    free_before = os.statvfs(gactor_server.depot).f_bavail * os.statvfs(gactor_server.depot).f_frsize
    with pytest.raises(GardenError) as raised:
        await container.stream_in(StreamInSpec(path="/root", user="root", tar_stream=bomb()))
    assert "error streaming in" in raised.value.message
    free_after = os.statvfs(gactor_server.depot).f_bavail * os.statvfs(gactor_server.depot).f_frsize
    assert free_before - free_after < 24 * MiB  # the limit, plus what else the host wrote meanwhile
    assert (await sh(container, "rm -f /root/bomb && echo ok > /root/after && cat /root/after"))[1] == b"ok\n"
