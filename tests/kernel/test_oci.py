"""Layered images on the real kernel: OCI layouts (directory and tar), docker-save
archives and rootfs tars resolved, their layers unpacked once by digest (verified),
whiteouts and opaque dirs honoured by a real overlay, tar escapes refused with the host
untouched, idmapped lower layers for unprivileged containers, and prune."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from gactor.kernel import idmap, images, rootfs
from gactor.kernel.container_init import MAX_UID
from gactor.kernel.errors import KernelError
from gactor.kernel.images import layers, oci
from tests.oci_images import (
    BUSYBOX,
    Entry,
    default_layers,
    sha256,
    tar_bytes,
    tar_directory,
    write_layout,
    zstd,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chown, mknod and mount need root"),
    pytest.mark.skipif(not Path(BUSYBOX, "bin").is_dir(), reason="no busybox rootfs (scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def layer_blobs() -> list[bytes]:
    return default_layers()


@pytest.fixture
def layout(tmp_path: Path, layer_blobs: list[bytes]) -> str:
    root = str(tmp_path / "layout")
    write_layout(root, {"latest": (layer_blobs, None),
                        "other": (layer_blobs[:1], {"Env": ["ONLY=base"], "User": "1000", "WorkingDir": "/tmp"})})
    return root


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "store")
    os.makedirs(path)
    return path


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[str]]:
    """Overlay mount points to detach at the end."""
    points: list[str] = []
    yield points
    for point in points:
        rootfs.unmount(point)


def mount(image: images.Image, container: Path, privileged: bool, mounted: list[str]) -> Path:
    merged = rootfs.mount_overlay(image.layers, str(container), privileged, idmapped=not image.shifted)
    mounted.append(merged)
    return Path(merged)


def prepare(source: str, store: str, privileged: bool = True) -> images.Image:
    return images.prepare(source, store, privileged=privileged, idmap=True)


def test_layout_directory_stacks_layers_with_whiteouts(layout: str, store: str, tmp_path: Path,
                                                       mounted: list[str]) -> None:
    image = prepare(f"oci://{layout}#latest", store)
    assert len(image.layers) == 2
    assert image.config == oci.ImageConfig(("PATH=/usr/sbin:/usr/bin:/sbin:/bin:/from-image", "FROM_IMAGE=yes",
                                            "OVERRIDE=image"), "", "/opaque")
    top = Path(image.layers[0])
    st = os.lstat(top / "etc" / "motd-gone")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert os.getxattr(top / "opaque", "trusted.overlay.opaque") == b"y"
    root = mount(image, tmp_path / "c1", True, mounted)
    assert not (root / "etc" / "motd-gone").exists()
    assert sorted(os.listdir(root / "opaque")) == ["new"]
    assert (root / "bin" / "busybox").is_file()
    assert os.stat(root / "bin" / "suid").st_mode & 0o7777 == 0o4755
    assert os.getxattr(root / "xattr-file", "user.test") == b"hello"
    assert (os.stat(root / "hello").st_uid, os.stat(root / "bin" / "busybox").st_uid) == (1000, 0)


def test_idmapped_layers_show_root_as_max_uid(layout: str, store: str, tmp_path: Path, mounted: list[str]) -> None:
    if not idmap.supported(store):
        pytest.skip("no idmapped mounts on this kernel")
    image = prepare(f"oci://{layout}#latest", store, privileged=False)
    root = mount(image, tmp_path / "c1", False, mounted)
    assert os.stat(root / "bin" / "busybox").st_uid == MAX_UID
    assert os.stat(root / "hello").st_uid == 1000  # other ids map to themselves
    assert os.stat(root).st_uid == MAX_UID  # the merged root (upper dir) belongs to the container's root
    assert os.stat(Path(image.layers[1]) / "bin" / "busybox").st_uid == 0  # nothing shifted on disk
    assert os.stat(root / "bin" / "suid").st_mode & 0o7777 == 0o4755
    points = list((tmp_path / "c1" / "lower").iterdir())
    assert len(points) == 2
    assert [os.listdir(p) for p in points] == [[], []]  # the idmapped mounts are gone again
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    assert not [p for p in points if p.startswith(str(tmp_path / "c1" / "lower"))]
    # A privileged container shares the very same layers.
    again = prepare(f"oci://{layout}#latest", store, privileged=True)
    assert again.layers == image.layers


def test_layout_tar_and_dir_share_layers(layout: str, store: str, tmp_path: Path) -> None:
    from_dir = prepare(f"oci://{layout}#latest", store)
    inode = os.stat(from_dir.layers[0]).st_ino
    archive = str(tmp_path / "layout.tar")
    tar_directory(layout, archive)
    from_tar = prepare(f"oci://{archive}#latest", store)
    assert from_tar.layers == from_dir.layers
    assert from_tar.path == from_dir.path
    assert os.stat(from_tar.layers[0]).st_ino == inode  # not unpacked again
    # The other tag shares the base layer.
    other = prepare(f"oci://{archive}#other", store)
    assert other.layers == from_dir.layers[1:]
    assert other.config == oci.ImageConfig(("ONLY=base",), "1000", "/tmp")


def test_tags_are_required_and_checked(layout: str, store: str, tmp_path: Path, layer_blobs: list[bytes]) -> None:
    with pytest.raises(images.ImageError, match="no tag 'nope'.*latest, other"):
        prepare(f"oci://{layout}#nope", store)
    assert prepare(f"oci://{layout}", store) == prepare(f"oci://{layout}#latest", store)  # no tag: latest
    two = str(tmp_path / "two")
    write_layout(two, {"a": (layer_blobs[:1], None), "b": (layer_blobs[:1], {"Env": ["B=1"]})})
    with pytest.raises(images.ImageError, match="holds 2 linux/amd64 images: name one.*a, b"):
        prepare(f"oci://{two}", store)


def test_plain_path_of_a_layout_directory(tmp_path: Path, store: str, layer_blobs: list[bytes]) -> None:
    root = str(tmp_path / "single")
    write_layout(root, {"v1": (layer_blobs, None)})
    image = prepare(root, store)
    assert len(image.layers) == 2


def test_rootfs_tars(tmp_path: Path, store: str, layer_blobs: list[bytes], mounted: list[str]) -> None:
    gz = tmp_path / "rootfs.tar.gz"
    gz.write_bytes(layer_blobs[0])
    plain = tmp_path / "rootfs.tar"
    plain.write_bytes(gzip.decompress(layer_blobs[0]))
    a, b = prepare(str(gz), store), prepare(str(plain), store)
    assert len(a.layers) == len(b.layers) == 1
    assert a.layers != b.layers
    assert a.config == oci.ImageConfig()
    root = mount(a, tmp_path / "c", True, mounted)
    assert (root / "bin" / "busybox").is_file()
    assert prepare(str(gz), store) == a  # hashed once per version of the file


def test_zstd_layers(tmp_path: Path, store: str, layer_blobs: list[bytes], mounted: list[str]) -> None:
    """zstd layers (several frames, as the format allows) unpack as their gzip twins do,
    the digest checked on the compressed bytes; bad zstd data is refused naming the
    layer; a ``.tar.zst`` rootfs is one layer."""
    base = zstd(gzip.decompress(layer_blobs[0]), frames=3)
    top = zstd(layer_blobs[1])
    root = str(tmp_path / "zst")
    write_layout(root, {"latest": ([base, top], None)})
    index = json.loads(Path(root, "index.json").read_bytes())
    manifest = json.loads(Path(root, "blobs", "sha256", index["manifests"][0]["digest"][7:]).read_bytes())
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    image = prepare(f"oci://{root}#latest", store)
    assert image.digests == (sha256(base), sha256(top))
    merged = mount(image, tmp_path / "c", True, mounted)
    assert sorted(os.listdir(merged / "opaque")) == ["new"]
    assert not (merged / "etc" / "motd-gone").exists()
    assert os.getxattr(merged / "xattr-file", "user.test") == b"hello"
    assert os.stat(merged / "bin" / "suid").st_mode & 0o7777 == 0o4755
    assert (merged / "bin" / "busybox").read_bytes() == Path(BUSYBOX, "bin", "busybox").read_bytes()
    write_layout(root + "-gz", {"latest": (layer_blobs, None)})  # the same tars, gzip
    twin = prepare(f"oci://{root}-gz#latest", store)
    assert [layers.read(store, d).inodes for d in twin.digests] == [  # type: ignore[union-attr]
        layers.read(store, d).inodes for d in image.digests]  # type: ignore[union-attr]

    bad = bytearray(zstd(tar_bytes([Entry("unique", data=os.urandom(4096))])))
    bad[8:24] = b"\xff" * 16  # the frame header's block: not zstd any more
    broken = str(tmp_path / "broken")
    write_layout(broken, {"latest": ([base, bytes(bad)], None)})
    with pytest.raises(KernelError, match=f"layer {sha256(bytes(bad))}: bad zstd data"):
        prepare(f"oci://{broken}#latest", store)
    assert layers.read(store, sha256(bytes(bad))) is None

    rootfs_zst = tmp_path / "rootfs.tar.zst"
    rootfs_zst.write_bytes(base)
    plain = prepare(str(rootfs_zst), store)
    assert len(plain.layers) == 1
    assert (Path(plain.layers[0]) / "bin" / "busybox").is_file()


def test_unlisted_parents_keep_the_lower_layers_attributes(tmp_path: Path, store: str,
                                                           layer_blobs: list[bytes]) -> None:
    """A member whose parents its tar does not list: each such directory of the new layer
    takes mode, owner, times and xattrs from the layers below (the upper-most that shows
    it), and root 0755 where they show none: whited out, shadowed by a symlink (not
    followed), or hidden by an opaque directory."""
    low = tar_bytes([Entry("dark", kind=tarfile.DIRTYPE, mode=0o755),
                     Entry("dark/sub", kind=tarfile.DIRTYPE, mode=0o700, uid=1000)])
    mid = tar_bytes([
        Entry("srv", kind=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001, pax={"SCHILY.xattr.user.where": "srv"}),
        Entry("gone", kind=tarfile.DIRTYPE, mode=0o700, uid=1000),
        Entry("link", kind=tarfile.SYMTYPE, linkname="/etc"),
        Entry("dark", kind=tarfile.DIRTYPE, mode=0o711, uid=1001),
        Entry("dark/.wh..wh..opq"),  # hides low's dark/sub
    ])
    hide = tar_bytes([Entry(".wh.gone")])
    top = tar_bytes([Entry(f"{d}/file", data=b"x") for d in ("srv", "gone", "link", "etc", "dark/sub")])
    root = str(tmp_path / "unlisted")
    write_layout(root, {"latest": ([layer_blobs[0], low, mid, hide, top], None)})
    image = prepare(f"oci://{root}#latest", store)
    new = Path(image.layers[0])
    st = os.lstat(new / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 1000, 1001, 1700000000)
    assert os.getxattr(new / "srv", "user.where") == b"srv"
    etc = os.lstat(Path(image.layers[-1]) / "etc")
    assert (os.lstat(new / "etc").st_mtime_ns, os.lstat(new / "etc").st_mode) == (etc.st_mtime_ns, etc.st_mode)
    dark = os.lstat(new / "dark")
    assert (stat.S_IMODE(dark.st_mode), dark.st_uid) == (0o711, 1001)
    assert "trusted.overlay.opaque" not in os.listxattr(new / "dark")  # only the lower copy was opaque
    for hidden in ("gone", "link", "dark/sub"):
        st = os.lstat(new / hidden)
        assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid) == (True, 0o755, 0), hidden
    meta = json.loads((new.parent / "layer.json").read_text())
    assert (meta["implicit_dirs"], meta["inherited_dirs"]) == (6, 3)  # srv, etc, dark


def test_docker_save_archive(tmp_path: Path, store: str, layer_blobs: list[bytes]) -> None:
    raw = [gzip.decompress(layer_blobs[0]), layer_blobs[1]]
    archive = tmp_path / "saved.tar"
    config = json.dumps({"config": {"Env": ["A=1"], "User": "alice", "WorkingDir": "/home/alice"},
                         "rootfs": {"type": "layers", "diff_ids": [sha256(r) for r in raw]}}).encode()
    files = {"abc/layer.tar": raw[0], "def/layer.tar": raw[1], "cfg.json": config,
             "manifest.json": json.dumps([{"Config": "cfg.json", "RepoTags": ["busy:1"],
                                           "Layers": ["abc/layer.tar", "def/layer.tar"]}]).encode()}
    archive.write_bytes(tar_bytes([Entry(name, data=data) for name, data in files.items()]))
    image = prepare(f"oci://{archive}#1", store)
    assert image.config == oci.ImageConfig(("A=1",), "alice", "/home/alice")
    assert len(image.layers) == 2
    assert prepare(str(archive), store).path == image.path
    compressed = tmp_path / "saved.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes(), compresslevel=1))
    assert prepare(str(compressed), store).layers == image.layers


def test_digest_mismatch_leaves_nothing(layout: str, store: str, layer_blobs: list[bytes]) -> None:
    blob = Path(layout, "blobs", "sha256", sha256(layer_blobs[1]).partition(":")[2])
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF  # inside the gzip trailer/padding region of an uncompressed tar: still a tar
    blob.write_bytes(bytes(data))
    with pytest.raises(KernelError, match="digest mismatch"):
        prepare(f"oci://{layout}#latest", store)
    assert [n for n in os.listdir(os.path.join(store, "layers")) if n.startswith(".tmp-")] == []
    assert layers.read(store, sha256(layer_blobs[1])) is None
    assert layers.read(store, sha256(layer_blobs[0])) is not None  # the good base layer stays


def checksum_tree(root: str, skip: str) -> str:
    """Every path under ``root`` (but ``skip``) with its mode, size and owner."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if os.path.join(top, d) != skip)
        for name in sorted(dirs + files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            h.update(f"{path} {st.st_mode} {st.st_size} {st.st_uid}\n".encode())
    return h.hexdigest()


ESCAPES = {
    "dotdot": [Entry("../../../../../../../../../../escaped", data=b"x")],
    "dotdot-inside": [Entry("a/../../../../../../../../../../escaped", data=b"x")],
    "symlink-then-write": [Entry("link", kind=tarfile.SYMTYPE, linkname="{victim}"),
                           Entry("link/escaped", data=b"x")],
    "relative-symlink-then-write": [Entry("link", kind=tarfile.SYMTYPE, linkname="../../../../../../../../../.."),
                                    Entry("link/escaped", data=b"x")],
    "hardlink-out": [Entry("hard", kind=tarfile.LNKTYPE, linkname="../../../../../../../../../../{victim_file}")],
    "hardlink-absolute": [Entry("hard", kind=tarfile.LNKTYPE, linkname="{victim_file_abs}")],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_tar_escapes_are_refused(case: str, tmp_path: Path, store: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("precious\n")
    fmt = {"victim": str(victim), "victim_file": str(victim / "file").lstrip("/"),
           "victim_file_abs": str(victim / "file")}
    entries = [Entry(e.name, e.kind, e.data, e.mode, linkname=e.linkname.format(**fmt)) for e in ESCAPES[case]]
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_bytes(entries))
    before = checksum_tree(str(tmp_path.parent), store)
    with pytest.raises(KernelError, match=r"outside the layer|goes through the symlink|No such file"):
        prepare(str(archive), store)
    assert checksum_tree(str(tmp_path.parent), store) == before
    assert (victim / "file").read_text() == "precious\n"
    assert os.stat(victim / "file").st_nlink == 1


def test_absolute_names_stay_inside(tmp_path: Path, store: str, mounted: list[str]) -> None:
    victim = tmp_path / "abs-victim"
    archive = tmp_path / "abs.tar"
    archive.write_bytes(tar_bytes([Entry(str(victim), data=b"inside\n"),
                                   Entry("dev/sda", kind=tarfile.BLKTYPE, devmajor=8, devminor=0),
                                   Entry("dev/mem", kind=tarfile.CHRTYPE, devmajor=1, devminor=1),
                                   Entry("fifo", kind=tarfile.FIFOTYPE)]))
    image = prepare(str(archive), store)
    assert not victim.exists()
    layer = Path(image.layers[0])
    assert (layer / str(victim).lstrip("/")).read_bytes() == b"inside\n"
    assert not (layer / "dev" / "sda").exists()
    assert not (layer / "dev" / "mem").exists()
    assert stat.S_ISFIFO(os.lstat(layer / "fifo").st_mode)
    meta = json.loads((layer.parent / "layer.json").read_text())
    assert meta["skipped_devices"] == 2


def test_forged_overlay_xattrs_are_dropped(tmp_path: Path, store: str) -> None:
    archive = tmp_path / "forged.tar"
    archive.write_bytes(tar_bytes([Entry("d", kind=tarfile.DIRTYPE, mode=0o755,
                                         pax={"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                              "SCHILY.xattr.user.ok": "1"})]))
    layer = Path(prepare(str(archive), store).layers[0])
    assert os.listxattr(layer / "d") == ["user.ok"]


def test_concurrent_prepares_unpack_once(layout: str, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = layers._unpack

    def counting(blob: layers.Blob, target: str, what: str, below: Sequence[str] = ()) -> dict[str, int]:
        calls.append(blob.digest)
        return real(blob, target, what, below)

    monkeypatch.setattr(layers, "_unpack", counting)
    barrier = threading.Barrier(4)
    results: list[images.Image] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        got = prepare(f"oci://{layout}#latest", store)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert len({r.layers for r in results}) == 1
    # Racing builders may each unpack, but exactly one copy of each layer is kept.
    assert sorted(os.listdir(os.path.join(store, "layers"))) == sorted(
        d.replace(":", "-") for d in results[0].digests)
    assert len(calls) <= 8


def test_prune_keeps_what_is_used(layout: str, store: str) -> None:
    latest = prepare(f"oci://{layout}#latest", store)
    other = prepare(f"oci://{layout}#other", store)
    assert {s.path for s in images.listed(store)} == {latest.path, other.path}
    removed = images.prune(store, [other.path])
    assert removed == [latest.path, latest.digests[1]]
    assert images.read(other.path).layers == other.layers
    assert images.prune(store, []) == [other.path, other.digests[0]]
    assert os.listdir(os.path.join(store, "layers")) == []


def test_bad_sources_name_the_image(tmp_path: Path, store: str) -> None:
    (tmp_path / "junk").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(images.ImageError, match="junk.*neither a directory nor a tar"):
        prepare(str(tmp_path / "junk"), store)
    with pytest.raises(images.ImageError, match="does not exist"):
        prepare(f"oci://{tmp_path}/missing#x", store)
    (tmp_path / "notlayout").mkdir()
    with pytest.raises(images.ImageError, match="not an OCI layout"):
        prepare(f"oci://{tmp_path}/notlayout", store)


def test_layered_images_without_idmap_need_privilege(layout: str, store: str) -> None:
    privileged = images.prepare(f"oci://{layout}#latest", store, privileged=True, idmap=False)
    assert images.known(f"oci://{layout}#latest", store, privileged=True, idmap=False) == privileged
    assert images.known(f"oci://{layout}#latest", store, privileged=False, idmap=False) is None
    with pytest.raises(images.ImageError, match="cannot idmap mounts"):
        images.prepare(f"oci://{layout}#latest", store, privileged=False, idmap=False)


def test_compressed_layout_and_docker_save_tars(layout: str, store: str, tmp_path: Path) -> None:
    """``docker save | gzip`` and a gzipped OCI layout: unpacked to a scratch layout, which goes."""
    plain = str(tmp_path / "layout.tar")
    tar_directory(layout, plain)
    compressed = tmp_path / "layout.tar.gz"
    compressed.write_bytes(gzip.compress(Path(plain).read_bytes(), compresslevel=1))
    from_dir = prepare(f"oci://{layout}#latest", store)
    from_gz = prepare(f"oci://{compressed}#latest", store)
    assert from_gz.path == from_dir.path
    assert from_gz.layers == from_dir.layers
    assert [n for n in os.listdir(os.path.join(store, "manifests")) if n.startswith(".tmp-")] == []
    with pytest.raises(images.ImageError, match=rf"oci://{compressed}#nope' has no tag 'nope'"):
        prepare(f"oci://{compressed}#nope", store)


def test_startup_detaches_leftover_idmapped_mounts(layout: str, store: str) -> None:
    """A server killed between attaching a layer and mounting its overlay leaves a
    read-only idmapped mount in <store>/mnt; the next start detaches it."""
    if not idmap.supported(store):
        pytest.skip("no idmapped mounts on this kernel")
    image = prepare(f"oci://{layout}#latest", store)
    point = Path(store, rootfs.MOUNT_POINTS, "left-over")
    point.mkdir(parents=True)
    idmap.attach(image.layers[0], str(point))
    with pytest.raises(OSError, match="Read-only"):
        (point / "new").write_text("x")  # read-only: a stray rmtree could never empty a layer
    rootfs.remove_partial_images(store)
    assert os.listdir(point) == []  # detached; the empty point is reused by the next mount
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(point) in line.split()[4]]
    assert images.read(image.path).layers == image.layers  # the layer itself is untouched
    assert (Path(image.layers[1]) / "bin" / "busybox").is_file()
