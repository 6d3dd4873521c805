"""Disk limits (``limits.disk``): the upper dir on a loop-mounted filesystem of the limit's
size. Checked from inside (writes fail with ENOSPC past the limit) and outside (the loop
device and its mount, gone after destroy)."""

from __future__ import annotations

import os
import signal
import tarfile

import pytest

from gactor import ContainerSpec, DiskLimits, GardenError, Limits, StreamInSpec
from gactor.types import DiskLimitScope

from .helpers import E2E_MARKS, loop_devices_under, sh, unique_handle, wait_for

pytestmark = E2E_MARKS

MiB = 1 << 20


def limited(byte_hard: int = 0, scope: DiskLimitScope = DiskLimitScope.EXCLUSIVE, inode_hard: int = 0,
            handle: str = "") -> ContainerSpec:
    return ContainerSpec(handle=handle or unique_handle(), limits=Limits(disk=DiskLimits(
        byte_hard=byte_hard, byte_soft=byte_hard, inode_hard=inode_hard, scope=scope)))


def mounted_under(directory: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(directory)]


async def test_an_exclusive_limit_stops_writes_at_the_limit(create_container, gactor_server):
    container = await create_container(limited(20 * MiB))
    other = await create_container()
    directory = gactor_server.container_dir(container.handle)
    assert loop_devices_under(directory), "the upper dir is not on a loop device"
    assert await container.current_disk_limits() == DiskLimits(
        byte_hard=20 * MiB, byte_soft=20 * MiB, scope=DiskLimitScope.EXCLUSIVE)

    before = (await container.metrics()).disk_stat
    code, _, _ = await sh(container, "dd if=/dev/zero of=/root/a bs=1M count=10")
    assert code == 0
    after = (await container.metrics()).disk_stat
    assert abs(after.exclusive_bytes_used - before.exclusive_bytes_used - 10 * MiB) < MiB
    assert after.total_bytes_used - after.exclusive_bytes_used == before.total_bytes_used - before.exclusive_bytes_used

    code, _, err = await sh(container, "dd if=/dev/zero of=/root/b bs=1M count=30")
    assert code != 0
    assert b"No space left on device" in err
    # Another container is not limited by it.
    assert (await sh(other, "dd if=/dev/zero of=/root/b bs=1M count=30"))[0] == 0


async def test_a_total_limit_counts_the_image(create_container, client):
    probe = await create_container()
    image_bytes = (await probe.metrics()).disk_stat.total_bytes_used
    container = await create_container(limited(image_bytes + 12 * MiB, DiskLimitScope.TOTAL))
    assert (await sh(container, "dd if=/dev/zero of=/root/a bs=1M count=6"))[0] == 0
    code, _, err = await sh(container, "dd if=/dev/zero of=/root/b bs=1M count=8")
    assert code != 0
    assert b"No space left on device" in err
    metrics = (await container.metrics()).disk_stat
    assert metrics.total_bytes_used > metrics.exclusive_bytes_used >= 6 * MiB


async def test_an_image_bigger_than_a_total_limit_is_refused(client):
    spec = limited(MiB // 2, DiskLimitScope.TOTAL)
    with pytest.raises(GardenError, match=r"limits\.disk .* too little room: its image alone uses"):
        await client.create(spec)
    assert spec.handle not in [c.handle for c in await client.containers()]


async def test_an_inode_limit_stops_new_files(create_container):
    # ext4 rounds the inode count up to fill its inode tables (docs/limits.md): with a byte
    # limit of one block group the count is the limit to within a block of inodes.
    container = await create_container(limited(16 * MiB, inode_hard=200))
    code, out, err = await sh(container, "i=0; while [ $i -lt 400 ]; do touch /root/f$i || break; i=$((i+1)); done;"
                                         " echo $i")
    assert code == 0
    assert 100 < int(out) < 200, (out, err)


async def test_destroy_releases_the_loop_device_and_mounts(client, gactor_server):
    container = await client.create(limited(8 * MiB))
    directory = gactor_server.container_dir(container.handle)
    assert (await sh(container, "echo hi > /root/x"))[0] == 0
    assert loop_devices_under(directory)
    assert mounted_under(directory)
    await client.destroy(container.handle)
    await wait_for(lambda: not loop_devices_under(directory), what="the loop device to detach")
    assert not mounted_under(directory)


@pytest.mark.slow
async def test_a_limit_holds_across_a_server_restart(own_servers):
    server = own_servers("disk", "10.248.31.0/24")
    await server.start()
    async with server.connect() as client:
        container = await client.create(limited(10 * MiB, handle="d1"))
        assert (await sh(container, "dd if=/dev/zero of=/root/a bs=1M count=4"))[0] == 0
    await server.kill(signal.SIGKILL)
    await server.start()
    async with server.connect() as client:
        container = await client.lookup("d1")
        assert await container.current_disk_limits() == DiskLimits(byte_hard=10 * MiB, byte_soft=10 * MiB,
                                                                    scope=DiskLimitScope.EXCLUSIVE)
        code, _, err = await sh(container, "dd if=/dev/zero of=/root/b bs=1M count=10")
        assert code != 0
        assert b"No space left on device" in err
        assert 3 * MiB < (await container.metrics()).disk_stat.exclusive_bytes_used < 11 * MiB
        directory = server.container_dir("d1")
        await client.destroy("d1")
    await wait_for(lambda: not loop_devices_under(directory), what="the loop device to detach")
    assert not os.path.exists(directory)
    await server.finish()


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
