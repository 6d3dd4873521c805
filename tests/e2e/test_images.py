"""Layered images through the real server: containers created from OCI layouts
(directory and tar, ``oci://PATH#TAG`` and plain paths) and rootfs tars, with the image
config honoured (Env image < container < process, User, WorkingDir), whiteouts and opaque
dirs applied, root-owned files owned by root inside an unprivileged container, layers
unpacked once and shared, kept while in use and pruned after, clear errors naming the
image. Checked from inside the containers and from outside (the depot's image store).

Registries: images pushed with skopeo to a real docker-registry on 127.0.0.1
(``registry_docker.py``) are compared, path for path as the host sees the container's
root, with umoci's unpack of the same image (gzip and zstd layers); the small Python
registry (``registry_server.py``) gives what docker-registry cannot: bearer auth with
counted requests, held downloads."""

from __future__ import annotations

import gzip
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gactor import ContainerSpec, GardenError, ImageRef, LayerProgress
from gactor.kernel.container_init import MAX_UID

from ..oci_images import (
    LAYER_ZSTD,
    Entry,
    decompressed,
    default_layers,
    oracle_layers,
    sha256,
    tar_bytes,
    tar_directory,
    write_layout,
    zstd,
)
from ..registry_docker import (
    DockerRegistry,
    IdMap,
    Node,
    differences,
    pull_layout,
    skopeo,
    tree,
    umoci_unpack,
)
from ..registry_server import STEP, LocalRegistry
from .helpers import E2E_MARKS, init_pid, sh_ok, wait_for
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


# ---- a real registry (docker-registry), checked against umoci ---------------------------


@pytest.fixture(scope="module")
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    registry = DockerRegistry(str(tmp_path_factory.mktemp("docker-registry"))).start()
    yield registry
    registry.stop()


def mount_points(pid: int) -> list[str]:
    """What is mounted over the container's root file system inside it (``/proc``,
    ``/dev``, bind-mounted files): neither tree has a say there."""
    with open(f"/proc/{pid}/mountinfo") as f:
        return [p for p in (line.split()[4] for line in f) if p != "/"]


def container_tree(pid: int) -> dict[str, Node]:
    """The container's root file system as the host sees it (``/proc/PID/root``)."""
    return tree(f"/proc/{pid}/root", skip=mount_points(pid))


def oracle_tree(image_uri: str, base: Path, pid: int) -> dict[str, Node]:
    """umoci's unpack of the image the registry serves (``skopeo copy`` to a layout
    first), its owners mapped as the container's maps map them."""
    pull_layout(image_uri, str(base / "pulled"), "it")
    rootfs = umoci_unpack(str(base / "pulled"), "it", str(base / "bundle"))
    return tree(rootfs, uids=IdMap.of(pid, "uid"), gids=IdMap.of(pid, "gid"), skip=mount_points(pid))


@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
async def test_registry_image_unpacked_as_umoci_does(create_container, docker_registry: DockerRegistry,
                                                     tmp_path: Path, privileged: bool) -> None:
    """An image pushed to docker-registry with skopeo (busybox, a whiteout and opaque
    layer, a layer of types, links, owners and modes, a layer that does not list its
    members' parents), created from ``docker://``: the
    container's root file system, seen from the host, is umoci's unpack of the same
    image path for path (kind, mode, owner as shifted, content, symlink target, mtime,
    xattrs), the container's own mounts aside; the image config is honoured."""
    root = str(tmp_path / "layout")
    write_layout(root, {"four": (oracle_layers(), {"Env": ["WHO=oracle"], "User": "1000:1001",
                                                    "WorkingDir": "/shared"})})
    uri = docker_registry.push(root, "four", f"oracle-{'p' if privileged else 'u'}")
    c = await create_container(image=ImageRef(uri=uri), privileged=privileged)
    assert (await sh_ok(c, "id -u; id -g; pwd; echo $WHO")).splitlines() == ["1000", "1001", "/shared", "oracle"]
    pid = await init_pid(c.handle)
    got = await trio.to_thread.run_sync(container_tree, pid)
    expected = await trio.to_thread.run_sync(oracle_tree, uri, tmp_path, pid)
    diffs = differences(expected, got)
    assert not diffs, f"{len(diffs)} differences from umoci:\n" + "\n".join(diffs[:60])
    # The comparison is not vacuous: the image's corner cases are in both trees.
    assert (got["/etc/was-file"].kind, got["/etc/was-dir"].kind) == ("dir", "file")
    assert not {"/etc/gone-dir", "/etc/motd-gone", "/opaque/new"} & got.keys()
    assert (got["/links/relative"].content, got["/shared"].mode) == ("../bin/busybox", 0o2775)
    assert got["/xattr-file"].xattrs == (("user.test", b"hello"),)
    assert (got["/links/hard"].nlink, got["/links/fifo"].kind) == (2, "fifo")
    # Parents the fourth layer does not list keep the lower layers' attributes ...
    assert (got["/srv"].mode, got["/srv"].gid, got["/srv"].xattrs) == (0o750, 1001, (("user.where", b"srv"),))
    assert (got["/srv/inner"].mode, got["/home/alice"].uid) == (0o700, 1000)
    # ... unless the layer's own opaque directory hides them.
    assert (got["/srv2/inner"].mode, sorted(p for p in got if p.startswith("/srv2/"))) == (
        0o755, ["/srv2/inner", "/srv2/inner/file"])
    if not privileged:
        assert got["/bin/busybox"].uid == MAX_UID  # root, shifted


async def test_zstd_registry_image(create_container, docker_registry: DockerRegistry, tmp_path: Path) -> None:
    """An image of zstd layers (built here: skopeo 1.9 does not recompress, umoci 0.4.7
    does not read zstd) pushed to docker-registry: gactor's container holds what umoci
    unpacks from the gzip twin of the same tars (the configs' diff_ids equal)."""
    tars = [decompressed(layer) for layer in oracle_layers()]
    root = str(tmp_path / "layout")
    write_layout(root, {"zstd": ([zstd(t, frames=2) for t in tars], None),
                        "gzip": ([gzip.compress(t, mtime=0, compresslevel=1) for t in tars], None)})
    zstd_uri = docker_registry.push(root, "zstd", "zstd")
    gzip_uri = docker_registry.push(root, "gzip", "zstd")
    served = json.loads(skopeo("inspect", "--tls-verify=false", "--raw",
                               zstd_uri.replace("#", ":").replace("docker://", "docker://", 1)))
    assert {layer["mediaType"] for layer in served["layers"]} == {LAYER_ZSTD}
    configs = [json.loads(skopeo("inspect", "--tls-verify=false", "--config", u.replace("#", ":")))
               for u in (zstd_uri, gzip_uri)]
    assert configs[0]["rootfs"]["diff_ids"] == configs[1]["rootfs"]["diff_ids"]
    c = await create_container(image=ImageRef(uri=zstd_uri))
    pid = await init_pid(c.handle)
    got = await trio.to_thread.run_sync(container_tree, pid)
    expected = await trio.to_thread.run_sync(oracle_tree, gzip_uri, tmp_path, pid)
    diffs = differences(expected, got)
    assert not diffs, f"{len(diffs)} differences from umoci:\n" + "\n".join(diffs[:60])
    assert (got["/opaque"].uid, got["/opaque/newer"].uid) == (MAX_UID, 1000)  # root shifted, in both trees


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
