"""Image directories change under running containers: the containers never notice.

A container's lower dir is an immutable copy in ``<depot>/images`` (image_copies), keyed
on the source's generation: a changed image gets a new copy for new containers, the old
copy stays as long as a container uses it (across ``kill -9`` and restarts) and is
removed once its last container is destroyed. Each test runs its own server, on an image
directory of its own under the server's temp dir, and checks from outside: what ``ls``
shows inside the containers, what the image store holds, what the records name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from typing import Any

import pytest
import trio

from gactor import ContainerSpec
from gactor.kernel import image_copies

from .helpers import E2E_MARKS, ROOTFS, sh_ok
from .servers import ServerProcess

pytestmark = E2E_MARKS


def make_image(server: ServerProcess) -> str:
    """A private image directory (a copy of the default busybox rootfs) with one extra
    file, ``/bin/doomed``, for the test to remove."""
    image = os.path.join(server.base, "image")
    shutil.copytree(ROOTFS, image, symlinks=True)
    write_script(os.path.join(image, "bin", "doomed"))
    return image


def write_script(path: str) -> None:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(path, 0o755)


def change_image(image: str) -> None:
    """Add two files to /bin, remove one, touch /bin: one entry more than before."""
    for name in ("added-1", "added-2"):
        write_script(os.path.join(image, "bin", name))
    os.unlink(os.path.join(image, "bin", "doomed"))
    os.utime(os.path.join(image, "bin"))


def store(server: ServerProcess) -> list[str]:
    """The image copies in the server's image store (not the layer store's directories)."""
    path = os.path.join(server.depot, "images")
    return sorted(set(os.listdir(path)) - image_copies.RESERVED) if os.path.isdir(path) else []


def copy_of(server: ServerProcess, handle: str) -> str:
    """The store entry the container's depot record says it uses."""
    with open(os.path.join(server.container_dir(handle), "container.json")) as f:
        path = json.load(f)["image_copy"]
    assert os.path.dirname(os.path.dirname(path)) == os.path.realpath(os.path.join(server.depot, "images"))
    return os.path.basename(os.path.dirname(path))


async def bin_entries(container: Any) -> list[str]:
    listed = (await sh_ok(container, "ls /bin")).split()
    assert int(await sh_ok(container, "ls /bin | wc -l")) == len(listed)
    return listed


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
async def test_changing_an_image_leaves_running_containers_alone(own_servers, privileged):
    server = own_servers(f"img-{'p' if privileged else 'u'}", f"10.250.{1 + privileged}.0/24")
    await server.start()
    image = make_image(server)
    async with server.connect() as client:
        first = await client.create(ContainerSpec(handle="first", rootfs_path=image, privileged=privileged))
        before = await bin_entries(first)
        assert "doomed" in before
        assert store(server) == [copy_of(server, "first")]

        change_image(image)
        second = await client.create(ContainerSpec(handle="second", rootfs_path=image, privileged=privileged))
        after = await bin_entries(second)
        assert len(after) == len(before) + 1
        assert {"added-1", "added-2"} <= set(after)
        assert "doomed" not in after
        assert await bin_entries(first) == before  # the first container's rootfs is unchanged
        await sh_ok(first, "/bin/doomed; echo still runs")
        assert copy_of(server, "first") != copy_of(server, "second")
        assert store(server) == sorted([copy_of(server, "first"), copy_of(server, "second")])

        # A third container from the unchanged image shares the second's copy.
        third = await client.create(ContainerSpec(handle="third", rootfs_path=image, privileged=privileged))
        assert copy_of(server, "third") == copy_of(server, "second")
        assert await bin_entries(third) == after
        kept = copy_of(server, "second")

        await client.destroy("first")
        assert store(server) == [kept]  # its copy went with its last container
        await client.destroy("second")
        assert store(server) == [kept]  # still used by the third
        assert await bin_entries(third) == after
        await client.destroy("third")
        assert store(server) == [kept]  # unused, but still current: the next create reuses it
    shutil.rmtree(image)
    await server.stop()
    await server.start()
    assert store(server) == []  # its source is gone: collected at startup
    await server.finish()


async def test_image_references_survive_kill_9(own_servers):
    server = own_servers("img-restart", "10.250.3.0/24")
    await server.start()
    image = make_image(server)
    async with server.connect() as client:
        first = await client.create(ContainerSpec(handle="first", rootfs_path=image))
        before = await bin_entries(first)
        change_image(image)
        second = await client.create(ContainerSpec(handle="second", rootfs_path=image))
        after = await bin_entries(second)
    old, new = copy_of(server, "first"), copy_of(server, "second")
    assert store(server) == sorted([old, new])

    await server.kill(signal.SIGKILL)
    await server.start()
    assert store(server) == sorted([old, new])  # both still referenced after re-adoption
    async with server.connect() as client:
        assert await bin_entries(await client.lookup("first")) == before
        assert await bin_entries(await client.lookup("second")) == after
        await client.destroy("first")
        assert store(server) == [new]

    await server.kill(signal.SIGKILL)
    half_built = os.path.join(server.depot, "images", f"{new}.tmp-1-dead")
    os.makedirs(os.path.join(half_built, "rootfs", "bin"))
    await server.start()
    assert store(server) == [new]  # the half-built copy is gone, the used one kept
    async with server.connect() as client:
        second = await client.lookup("second")
        assert await bin_entries(second) == after
        # Creating from the image again after the restart finds the same copy.
        again = await client.create(ContainerSpec(handle="again", rootfs_path=image))
        assert copy_of(server, "again") == new
        assert await bin_entries(again) == after
        await client.destroy("second")
        assert store(server) == [new]
        await client.destroy("again")
        assert store(server) == [new]  # current for the image: kept for the next create
        os.utime(os.path.join(image, "bin"))
        await client.destroy((await client.create(ContainerSpec())).handle)  # a collect
        assert new not in store(server)
    await server.finish()


async def busybox_builder(dest: str) -> str:
    """Run ``python -m gactor.kernel.busybox DEST`` as setup.sh does; its one line of output."""
    result = await trio.run_process([sys.executable, "-m", "gactor.kernel.busybox", dest],
                                    capture_stdout=True)
    return result.stdout.decode().strip()


async def test_busybox_rebuilds_leave_running_containers_intact(own_servers):
    server = own_servers("img-bb", "10.250.4.0/24")
    await server.start()
    dest = os.path.join(server.base, "busybox")
    assert (await busybox_builder(dest)).startswith("busybox rootfs built:")
    async with server.connect() as client:
        plain = await client.create(ContainerSpec(handle="plain", rootfs_path=dest))
        priv = await client.create(ContainerSpec(handle="priv", rootfs_path=dest, privileged=True))
        listed = await bin_entries(plain)
        assert await bin_entries(priv) == listed
        generations = set()
        for _ in range(2):  # two real rebuilds: a stale version stamp forces each
            generations.add(os.path.realpath(dest))
            with open(os.path.join(dest, ".gactor-rootfs-version"), "w") as f:
                f.write("stale\n")
            assert (await busybox_builder(dest)).startswith("busybox rootfs built:")
        assert os.path.realpath(dest) not in generations
        assert (await busybox_builder(dest)).startswith("busybox rootfs up to date:")
        for container in (plain, priv):
            assert await bin_entries(container) == listed
            assert (await sh_ok(container, "echo ok; cat /etc/os-release")).startswith("ok\n")
        fresh = await client.create(ContainerSpec(handle="fresh", rootfs_path=dest))
        assert await bin_entries(fresh) == listed
        current = copy_of(server, "fresh")
        # One unshifted copy serves both kinds of container (idmapped for the unprivileged one).
        assert copy_of(server, "plain") == copy_of(server, "priv") != current
        for handle in ("plain", "priv", "fresh"):
            await client.destroy(handle)
        assert store(server) == [current]  # the older generations' copies are gone
    await server.finish()
