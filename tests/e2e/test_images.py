"""Layered images through the real server: containers created from OCI layouts
(directory and tar, ``oci://PATH#TAG`` and plain paths) and rootfs tars, with the image
config honoured (Env image < container < process, User, WorkingDir), whiteouts and opaque
dirs applied, root-owned files owned by root inside an unprivileged container, layers
unpacked once and shared, kept while in use and pruned after, clear errors naming the
image. Checked from inside the containers and from outside (the depot's image store)."""

from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import pytest
import trio

from gactor import ContainerSpec, GardenError, ImageRef, LayerProgress

from ..oci_images import Entry, default_layers, sha256, tar_bytes, tar_directory, write_layout
from ..registry_server import STEP, LocalRegistry
from .helpers import E2E_MARKS, sh_ok, wait_for
from .servers import ServerProcess, gactor_command

pytestmark = E2E_MARKS


@pytest.fixture(scope="module")
def layer_blobs() -> list[bytes]:
    return default_layers()


@pytest.fixture
def layout(tmp_path: Path, layer_blobs: list[bytes]) -> str:
    root = str(tmp_path / "layout")
    write_layout(root, {"latest": (layer_blobs, None),
                        "alice": (layer_blobs, {"Env": ["WHO=alice"], "User": "1000:1000", "WorkingDir": "/work"})})
    os.chmod(tmp_path, 0o755)
    return root


async def cli(server: ServerProcess, *args: str) -> str:
    result = await trio.run_process(gactor_command("--target", server.url, *args), capture_stdout=True,
                                    capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def layer_names(server: ServerProcess) -> list[str]:
    root = os.path.join(server.depot, "images", "layers")
    return sorted(n for n in os.listdir(root) if not n.startswith(".")) if os.path.isdir(root) else []


async def test_oci_layout_container(create_container, layout: str) -> None:
    c = await create_container(image=ImageRef(uri=f"oci://{layout}#latest"),
                               env=["OVERRIDE=container", "FROM_CONTAINER=yes", "PROC=container"])
    out = await sh_ok(c, 'echo "$FROM_IMAGE $FROM_CONTAINER $OVERRIDE $PROC"; echo "$PATH"; pwd; id -u; '
                         'ls /opaque; test -e /etc/motd-gone || echo gone; stat -c "%u %a" /bin/busybox /bin/suid; '
                         'stat -c %u /hello', env=["PROC=process"])
    assert out.splitlines() == ["yes yes container process", "/usr/sbin:/usr/bin:/sbin:/bin:/from-image",
                                "/opaque", "0", "new", "gone", "0 755", "0 4755", "1000"]
    # The container writes over a read-only shared layer: only its upper dir changes.
    await sh_ok(c, "echo changed > /hello && rm /bin/suid && cat /hello")
    c2 = await create_container(image=ImageRef(uri=f"oci://{layout}#latest"))
    assert (await sh_ok(c2, "cat /hello; ls /bin/suid")) == "from layer two\n/bin/suid\n"


async def test_image_user_and_working_dir(create_container, layout: str) -> None:
    c = await create_container(image=ImageRef(uri=f"oci://{layout}#alice"))
    assert (await sh_ok(c, "id -u; id -g; pwd; echo $WHO")).splitlines() == ["1000", "1000", "/work", "alice"]
    # The process spec still wins over the image's defaults.
    assert (await sh_ok(c, "id -u; pwd", user="root", dir="/tmp")).splitlines() == ["0", "/tmp"]


async def test_layout_tar_and_rootfs_tars(create_container, layout: str, tmp_path: Path,
                                          layer_blobs: list[bytes]) -> None:
    archive = str(tmp_path / "layout.tar")
    tar_directory(layout, archive)
    rootfs_gz = tmp_path / "rootfs.tar.gz"
    rootfs_gz.write_bytes(layer_blobs[0])
    rootfs_tar = tmp_path / "rootfs.tar"
    rootfs_tar.write_bytes(gzip.decompress(layer_blobs[0]))
    for source, privileged in ((f"oci://{archive}#latest", False), (str(rootfs_gz), True), (str(rootfs_tar), False)):
        c = await create_container(rootfs_path=source, privileged=privileged)
        out = await sh_ok(c, "cat /etc/motd-gone 2>/dev/null || echo gone; stat -c %u /bin/busybox")
        expected = "gone\n0\n" if source.startswith("oci://") else "should be whited out\n0\n"
        assert out == expected, source


async def test_layers_shared_kept_in_use_and_pruned(own_servers, layout: str, layer_blobs: list[bytes]) -> None:
    server = own_servers("img-layers", "10.250.8.0/24")
    await server.start()
    async with server.connect() as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:  # concurrent creates of one new image
                for n in range(4):
                    nursery.start_soon(client.create, ContainerSpec(
                        handle=f"c{n}", image=ImageRef(uri=f"oci://{layout}#latest"), privileged=n % 2 == 1))
        assert layer_names(server) == sorted(sha256(b).replace(":", "-") for b in layer_blobs)
        listed = await client.images()
        assert len(listed) == 1
        assert sorted(listed[0].users) == ["c0", "c1", "c2", "c3"]
        for n in range(3):
            await client.destroy(f"c{n}")
        assert await client.prune_images() == []  # c3 still uses it
        assert len(layer_names(server)) == 2
        c3 = await client.lookup("c3")
        assert (await sh_ok(c3, "ls /opaque")) == "new\n"
        assert (await cli(server, "pull", f"oci://{layout}#latest")).startswith(f"oci://{layout}#latest: ")
        listing = (await cli(server, "images")).split()
        assert listing[2:] == ["2", "layers", "users:", "c3", f"oci://{layout}#latest"]
        await client.destroy("c3")
        assert json.loads(await cli(server, "--json", "images"))[0]["users"] == []
        removed = (await cli(server, "images", "prune")).splitlines()
        assert len(removed) == 3  # the image record and its two layers
        assert layer_names(server) == []
        assert await client.images() == []
        assert (await cli(server, "images", "prune")) == "nothing to prune\n"
    await server.finish()


async def test_image_config_survives_a_restart(own_servers, layout: str) -> None:
    server = own_servers("img-restart", "10.250.9.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="keep", image=ImageRef(uri=f"oci://{layout}#alice")))
    await server.kill()  # SIGKILL: nothing is saved at exit
    await server.start()
    async with server.connect() as client:
        c = await client.lookup("keep")
        assert (await sh_ok(c, "id -u; pwd; echo $WHO")).splitlines() == ["1000", "/work", "alice"]
        assert await client.prune_images() == []  # the re-adopted container still holds its image
        assert [i.users for i in await client.images()] == [["keep"]]
        await client.destroy("keep")
        assert len(await client.prune_images()) == 3
        assert layer_names(server) == []
    await server.finish()


async def test_bad_images_name_the_image(client, layout: str, tmp_path: Path, layer_blobs: list[bytes]) -> None:
    with pytest.raises(GardenError, match="nowhere.*does not exist"):
        await client.create(ContainerSpec(image=ImageRef(uri=f"oci://{tmp_path}/nowhere#x")))
    with pytest.raises(GardenError, match="has no tag 'nope'"):
        await client.create(ContainerSpec(image=ImageRef(uri=f"oci://{layout}#nope")))
    # A layer of its own (a cached layer is not unpacked again, so not checked again).
    fresh = tar_bytes([Entry("unique", data=os.urandom(64))])
    corrupt = str(tmp_path / "corrupt")
    write_layout(corrupt, {"latest": ([layer_blobs[0], fresh], None)})
    blob = Path(corrupt, "blobs", "sha256", sha256(fresh).partition(":")[2])
    blob.write_bytes(blob.read_bytes()[:-1] + b"\1")
    with pytest.raises(GardenError, match=f"oci://{corrupt}#latest.*{sha256(fresh)}: digest mismatch"):
        await client.create(ContainerSpec(handle="corrupt", image=ImageRef(uri=f"oci://{corrupt}#latest")))
    assert "corrupt" not in [c.handle for c in await client.containers()]


@pytest.fixture
def registry(layout: str):
    server = LocalRegistry({"busy": layout}).start()
    yield server
    server.stop()


async def test_docker_registry_image(own_servers, registry: LocalRegistry, layer_blobs: list[bytes]) -> None:
    """A pull through the server from a loopback registry with bearer auth: credentials
    from ImageRef, layers pulled once for concurrent creates, the config honoured, a
    corrupt blob and a missing tag refused naming the image."""
    registry.auth, registry.users = "bearer", {"alice": "secret"}
    uri = f"docker://{registry.host}/busy#alice"
    server = own_servers("img-docker", "10.250.10.0/24")
    await server.start()
    async with server.connect() as client:
        with pytest.raises(GardenError, match=f"image '{uri}'.*(401|token service)"):
            await client.create(ContainerSpec(image=ImageRef(uri=uri)))
        ref = ImageRef(uri=uri, username="alice", password="secret")
        pulled = await client.pull(uri, "alice", "secret")
        assert (pulled.source, pulled.layers, pulled.users) == (uri, 2, [])
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(client.create, ContainerSpec(handle=f"d{n}", image=ref))
        layer_gets = [p for p, _ in registry.requests if p.endswith(tuple(sha256(b) for b in layer_blobs))]
        assert len(layer_gets) == 2  # each layer downloaded once
        c = await client.lookup("d0")
        assert (await sh_ok(c, "id -u; pwd; echo $WHO; ls /opaque")).splitlines() == ["1000", "/work", "alice", "new"]
        assert "pulled layer" in server.log_text()
        with pytest.raises(GardenError, match=rf"docker://{registry.host}/busy#nope.*HTTP 404"):
            await client.create(ContainerSpec(image=ImageRef(uri=f"docker://{registry.host}/busy#nope",
                                                             username="alice", password="secret")))
        for n in range(3):
            await client.destroy(f"d{n}")
        assert len(await client.prune_images()) == 3
    await server.finish()


async def test_cancelled_pull_goes_on(own_servers, registry: LocalRegistry) -> None:
    """A client that gives up on a pull cancels only its wait: the server finishes the
    pull, and the image is in the store."""
    uri = f"docker://{registry.host}/busy#latest"
    server = own_servers("img-cancel", "10.250.11.0/24")
    await server.start()
    registry.hold_blobs.clear()
    async with server.connect() as client:
        with trio.move_on_after(0.5) as scope:
            await client.pull(uri)
        assert scope.cancelled_caught
        assert await client.images() == []  # a listing does not wait for the pull
    registry.hold_blobs.set()
    async with server.connect() as client:
        listed = await wait_for(client.images, within=30, what="the pulled image")
        assert [(i.source, i.layers) for i in listed] == [(uri, 2)]
    await server.finish()


# ---- pull progress ------------------------------------------------------------------------

BIG = 5 * STEP + 4321  # bytes of the big layer's one file: six pieces of the stepped blob


@pytest.fixture
def big_image(tmp_path: Path, layer_blobs: list[bytes]) -> tuple[str, list[bytes]]:
    """A layout with the busybox layer and a big, incompressible one on top."""
    blobs = [layer_blobs[0], tar_bytes([Entry("big", data=os.urandom(BIG))])]
    root = str(tmp_path / "big")
    write_layout(root, {"latest": (blobs, None)})
    return root, blobs


async def test_pull_reports_each_layers_progress(own_servers, big_image: tuple[str, list[bytes]]) -> None:
    """Every layer is reported once its manifest is read, then as its bytes arrive (the
    big one piece by piece: the registry sends a piece only once the client has heard of
    the last), monotone, up to its size; then the reply. A second pull reports each layer
    once, already done. The server log has a line per layer pulled."""
    root, blobs = big_image
    base, big = (sha256(b) for b in blobs)
    registry = LocalRegistry({"prog": root}).start()
    steps = registry.step_blobs[big] = threading.Semaphore(0)
    try:
        server = own_servers("img-progress", "10.250.12.0/24")
        await server.start()
        uri = f"docker://{registry.host}/prog#latest"
        reports: list[LayerProgress] = []

        def progress(layer: LayerProgress) -> None:
            reports.append(layer)
            if layer.digest == big and layer.done < layer.total:
                steps.release()  # the next piece of the big blob

        async with server.connect() as client:
            with trio.fail_after(60):
                pulled = await client.pull(uri, progress=progress)
            assert (pulled.source, pulled.layers) == (uri, 2)
            by_layer = {d: [(r.done, r.total) for r in reports if r.digest == d] for d in (base, big)}
            assert {r.digest for r in reports} == {base, big}
            assert not [r for r in reports if r.cached]
            assert [r.digest for r in reports[:2]] == [base, big]  # both once the manifest is read
            for digest, blob in zip((base, big), blobs, strict=True):
                seen = by_layer[digest]
                assert {total for _, total in seen} == {len(blob)}
                assert seen[-1] == (len(blob), len(blob))
                assert [done for done, _ in seen] == sorted(done for done, _ in seen), seen
            # The big blob arrived in pieces, each reported before the next was sent.
            dones = sorted({done for done, _ in by_layer[big]})
            assert dones == [*range(0, len(blobs[1]), STEP), len(blobs[1])]
            again: list[LayerProgress] = []
            await client.pull(uri, progress=again.append)
            assert [(r.digest, r.done, r.total, r.cached) for r in again] == [
                (d, len(b), len(b), True) for d, b in zip((base, big), blobs, strict=True)]
            # A client that asks for no progress gets the plain call, as older clients do.
            assert (await client.pull(uri)).layers == 2
        log = server.log_text()
        for digest, blob in zip((base, big), blobs, strict=True):
            assert f"pulled layer {digest}: {len(blob)} bytes" in log
        await server.finish()
    finally:
        registry.stop()
