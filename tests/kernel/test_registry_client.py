"""docker:// pulls (gactor.kernel.images.registry_client) from a real HTTP registry on
127.0.0.1 (tests/registry_server.py, serving layouts built here): plain, bearer and basic
auth, image indexes with linux/amd64 selection, redirects, downloads that break off and
resume with Range, corrupt blobs, missing images and timeouts, each with a clear error.
The same pulls from a real docker-registry (distribution 2.8, fed by skopeo): by tag and
by digest, a multi-platform index, a base layer shared across repositories, zstd layers,
and the real registry's 404s."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gactor.kernel import images
from gactor.kernel.errors import KernelError
from gactor.kernel.images import registry_client
from tests.oci_images import BUSYBOX, add_index, default_layers, sha256, write_layout, zstd
from tests.registry_docker import DockerRegistry, skopeo
from tests.registry_server import LocalRegistry

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking (chroot, chown) needs root"),
    pytest.mark.skipif(not Path(BUSYBOX, "bin").is_dir(), reason="no busybox rootfs (scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def layer_blobs() -> list[bytes]:
    return default_layers()


@pytest.fixture
def registry(tmp_path: Path, layer_blobs: list[bytes]) -> Iterator[LocalRegistry]:
    root = str(tmp_path / "layout")
    write_layout(root, {"latest": (layer_blobs, None), "v1": (layer_blobs[:1], {"Env": ["V=1"], "User": "1000"})})
    server = LocalRegistry({"busy": root, "team/busy": root}).start()
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = str(tmp_path / "store")
    os.makedirs(path)
    return path


def pull(uri: str, store: str, **kwargs: str) -> images.Image:
    return images.prepare(uri, store, privileged=True, idmap=True, **kwargs)


def test_pull_unpacks_each_layer_once(registry: LocalRegistry, store: str, layer_blobs: list[bytes]) -> None:
    image = pull(f"docker://{registry.host}/busy#latest", store)
    assert len(image.layers) == 2
    assert image.config.env[1] == "FROM_IMAGE=yes"
    assert (Path(image.layers[1]) / "bin" / "busybox").is_file()
    blob_gets = [p for p, _ in registry.requests if "/blobs/" in p]
    registry.requests.clear()
    again = pull(f"docker://{registry.host}/team/busy#v1", store)  # shares the base layer
    assert again.layers == image.layers[1:]
    assert again.config.user == "1000"
    assert [p for p, _ in registry.requests if p.endswith(sha256(layer_blobs[0]))] == []
    assert len(blob_gets) == 3  # config + 2 layers, each once


def test_default_tag_is_latest(registry: LocalRegistry, store: str) -> None:
    assert pull(f"docker://{registry.host}/busy", store) == pull(f"docker://{registry.host}/busy#latest", store)


def test_index_selects_linux_amd64(registry: LocalRegistry, store: str) -> None:
    registry.indexes["multi"] = [("linux/arm64", "v1"), ("linux/amd64", "latest")]
    assert len(pull(f"docker://{registry.host}/busy#multi", store).layers) == 2
    registry.indexes["armonly"] = [("linux/arm64", "v1")]
    with pytest.raises(images.ImageError, match=r"armonly.*no linux/amd64 manifest \(it has: linux/arm64\)"):
        pull(f"docker://{registry.host}/busy#armonly", store)


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_auth(registry: LocalRegistry, store: str, auth: str) -> None:
    registry.auth, registry.users = auth, {"alice": "secret"}
    image = pull(f"docker://{registry.host}/busy#latest", store, username="alice", password="secret")
    assert len(image.layers) == 2
    with pytest.raises(images.ImageError, match=r"busy#latest.*(401|token service|username)"):
        pull(f"docker://{registry.host}/busy#latest", store, username="alice", password="wrong")


def test_broken_download_resumes_with_range(registry: LocalRegistry, store: str, layer_blobs: list[bytes]) -> None:
    digest = sha256(layer_blobs[0])
    registry.break_blobs[digest] = 100_000
    registry.redirect_blobs = True
    pull(f"docker://{registry.host}/busy#latest", store)
    ranges = [r for p, r in registry.requests if p.endswith(digest) and p.startswith("/storage/")]
    assert ranges == ["", "bytes=100000-"]  # redirected to blob storage, then resumed there


def test_broken_download_without_ranges_skips_what_it_has(registry: LocalRegistry, store: str,
                                                         layer_blobs: list[bytes]) -> None:
    digest = sha256(layer_blobs[0])
    registry.break_blobs[digest] = 50_000
    registry.ranges = False
    image = pull(f"docker://{registry.host}/busy#latest", store)
    assert (Path(image.layers[1]) / "bin" / "busybox").is_file()
    assert [r for p, r in registry.requests if p.endswith(digest)] == ["", "bytes=50000-"]


def test_corrupt_blob_is_refused(registry: LocalRegistry, store: str, layer_blobs: list[bytes]) -> None:
    registry.corrupt_blobs.add(sha256(layer_blobs[1]))
    with pytest.raises(KernelError, match=f"busy#latest.*{sha256(layer_blobs[1])}: digest mismatch"):
        pull(f"docker://{registry.host}/busy#latest", store)
    assert not os.path.exists(os.path.join(store, "manifests"))


def test_missing_image_and_repo(registry: LocalRegistry, store: str) -> None:
    with pytest.raises(images.ImageError, match=r"docker://.*/busy#nope.*HTTP 404"):
        pull(f"docker://{registry.host}/busy#nope", store)
    with pytest.raises(images.ImageError, match="HTTP 404"):
        pull(f"docker://{registry.host}/other#latest", store)
    with pytest.raises(images.ImageError, match="no repository"):
        pull(f"docker://{registry.host}", store)


def test_unreachable_and_stalled_registries_time_out(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_client, "STEP_TIMEOUT", 0.3)
    monkeypatch.setattr(registry_client, "RETRIES", 1)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    with pytest.raises(images.ImageError, match=rf"docker://127.0.0.1:{port}/busy.*after 2 attempts"):
        pull(f"docker://127.0.0.1:{port}/busy", store)
    stalled = socket.socket()  # accepts, never answers
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        stalled.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(stalled.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        with pytest.raises(images.ImageError, match="timed out"):
            pull(f"docker://127.0.0.1:{stalled.getsockname()[1]}/busy", store)
    finally:
        stop.set()
        thread.join()
        for s in accepted:
            s.close()
        stalled.close()


def test_hub_references_parse_without_network() -> None:
    assert registry_client.parse("docker:///busybox") == registry_client.Reference(
        "registry-1.docker.io", "library/busybox", "latest")
    ref = registry_client.parse("docker://localhost:5000/a/b#1.0")
    assert (ref.host, ref.repo, ref.tag, ref.secure) == ("localhost:5000", "a/b", "1.0", False)
    assert registry_client.parse("docker://registry.example/a").secure
    with pytest.raises(images.ImageError, match="bad repository"):
        registry_client.parse("docker://h/a/../b")


# ---- a real registry: docker-registry, fed by skopeo ------------------------------------


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory: pytest.TempPathFactory, layer_blobs: list[bytes]) -> Iterator[DockerRegistry]:
    """docker-registry on 127.0.0.1 holding ``busy`` (latest, v1, multi: an index of
    arm64 and amd64, zstd) and ``team/busy`` (v1), pushed with skopeo."""
    base = tmp_path_factory.mktemp("real-registry")
    registry = DockerRegistry(str(base / "registry")).start()
    root = str(base / "layout")
    plain = [gzip.decompress(layer_blobs[0]), layer_blobs[1]]
    digests = write_layout(root, {"latest": (layer_blobs, None), "v1": (layer_blobs[:1], {"User": "1000"}),
                                  "zstd": ([zstd(t) for t in plain], None)})
    add_index(root, "multi", {"linux/arm64": digests["v1"], "linux/amd64": digests["latest"]})
    add_index(root, "armonly", {"linux/arm64": digests["v1"]})
    try:
        for tag in ("latest", "v1", "zstd"):
            registry.push(root, tag, "busy")
        for tag in ("multi", "armonly"):
            registry.push(root, tag, "busy", tag, "--all")  # the index and every manifest in it
        registry.push(root, "v1", "team/busy")
        yield registry
    finally:
        registry.stop()


def test_real_registry_tags_digests_and_shared_layers(real_registry: DockerRegistry, store: str) -> None:
    host = real_registry.host
    image = pull(f"docker://{host}/busy#latest", store)
    assert len(image.layers) == 2
    assert image.config.env[1] == "FROM_IMAGE=yes"
    assert (Path(image.layers[0]) / "opaque" / "new").is_file()
    digest = skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}", f"docker://{host}/busy:latest").strip()
    by_digest = pull(f"docker://{host}/busy#{digest}", store)
    assert (by_digest.layers, by_digest.path) == (image.layers, image.path)
    team = pull(f"docker://{host}/team/busy#v1", store)  # another repository, the same base layer
    assert (team.layers, team.config.user) == (image.layers[1:], "1000")
    assert pull(f"docker://{host}/busy", store) == image  # no tag: latest


def test_real_registry_index_and_zstd(real_registry: DockerRegistry, store: str) -> None:
    host = real_registry.host
    served = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{host}/busy:multi"))
    assert served["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert pull(f"docker://{host}/busy#multi", store) == pull(f"docker://{host}/busy#latest", store)
    with pytest.raises(images.ImageError, match=r"armonly.*no linux/amd64 manifest \(it has: linux/arm64\)"):
        pull(f"docker://{host}/busy#armonly", store)
    zstd_image = pull(f"docker://{host}/busy#zstd", store)
    gzip_image = pull(f"docker://{host}/busy#latest", store)
    assert zstd_image.digests != gzip_image.digests
    for z, g in zip(zstd_image.layers, gzip_image.layers, strict=True):
        assert sorted(p.name for p in Path(z).rglob("*")) == sorted(p.name for p in Path(g).rglob("*"))


def test_real_registry_404s_name_the_image(real_registry: DockerRegistry, store: str) -> None:
    host = real_registry.host
    with pytest.raises(images.ImageError, match=rf"docker://{host}/busy#nope.*HTTP 404.*MANIFEST_UNKNOWN"):
        pull(f"docker://{host}/busy#nope", store)
    with pytest.raises(images.ImageError, match=r"other#latest.*HTTP 404.*MANIFEST_UNKNOWN"):  # an unknown repo too
        pull(f"docker://{host}/other#latest", store)
    assert not os.path.exists(os.path.join(store, "manifests"))


def test_docker_registries_listen_on_loopback_only(real_registry: DockerRegistry) -> None:
    """Every docker-registry on the host (this test's, other tests') listens on 127.0.0.1
    only, and the package's own service (all interfaces by default) is masked."""
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line.split()[3] for line in listening.splitlines() if '"docker-registry"' in line]
    assert f"127.0.0.1:{real_registry.port}" in ours
    assert [a for a in ours if not a.startswith("127.0.0.1:")] == []
    state = subprocess.run(["systemctl", "is-enabled", "docker-registry.service"], capture_output=True,
                           text=True, check=False).stdout.strip()
    assert state == "masked"  # scripts/setup.sh
