"""Test images built from the busybox rootfs, with no downloads: rootfs tars, OCI image
layouts (directory or tar, as skopeo/umoci write them) and docker-save archives.

The default image has two layers: busybox itself (gzip), then a layer that whites out
``/etc/motd-gone`` (present in layer one), makes ``/opaque`` opaque (hiding layer one's
``/opaque/old``), adds ``/opaque/new``, a setuid ``/bin/suid`` and a file with a
``user.test`` xattr; the config sets Env, User and WorkingDir.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import zstandard

BUSYBOX = "/var/lib/gactor/images/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar member for ``tar_bytes``."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    pax: dict[str, str] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def zstd(data: bytes, frames: int = 1) -> bytes:
    """``data`` zstd-compressed, in ``frames`` frames one after another (a reader must
    read across frames, as the format allows)."""
    step = -(-len(data) // frames) or 1
    compressor = zstandard.ZstdCompressor(level=3)
    return b"".join(compressor.compress(data[i:i + step]) for i in range(0, len(data), step)) or compressor.compress(b"")


def decompressed(layer: bytes) -> bytes:
    """The layer's tar (what its diff_id hashes); a broken zstd layer (tests make them) as it is."""
    if layer[:2] == b"\x1f\x8b":
        return gzip.decompress(layer)
    if layer[:4] == ZSTD_MAGIC:
        try:
            return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(layer)
        except zstandard.ZstdError:
            return layer
    return layer


def media_type(layer: bytes) -> str:
    return LAYER_GZ if layer[:2] == b"\x1f\x8b" else LAYER_ZSTD if layer[:4] == ZSTD_MAGIC else LAYER_TAR


def tar_bytes(entries: list[Entry], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.kind
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.linkname = e.linkname
            info.pax_headers = dict(e.pax)
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.mtime = 1700000000
            if e.kind == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def busybox_layer(extra: list[Entry] | None = None) -> bytes:
    """The busybox rootfs as a gzip layer (owners as on disk: root), plus ``extra``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(BUSYBOX + "/", arcname=".", recursive=True)
        for e in extra or []:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.size = e.kind, e.mode, len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    return gzip.compress(buf.getvalue(), mtime=0, compresslevel=1)


def default_layers() -> list[bytes]:
    base = busybox_layer([
        Entry("etc/motd-gone", data=b"should be whited out\n"),
        Entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("opaque/old", data=b"hidden by the opaque marker\n"),
    ])
    top = tar_bytes([
        Entry("etc/.wh.motd-gone"),
        Entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("opaque/.wh..wh..opq"),
        Entry("opaque/new", data=b"new\n"),
        Entry("bin/suid", data=b"#!/bin/sh\necho suid\n", mode=0o4755),
        Entry("xattr-file", data=b"x\n", pax={"SCHILY.xattr.user.test": "hello"}),
        Entry("home/alice", kind=tarfile.DIRTYPE, mode=0o755, uid=1000, gid=1000),
        Entry("hello", data=b"from layer two\n", uid=1000, gid=1000),
    ])
    return [base, top]


DEFAULT_CONFIG = {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin:/from-image", "FROM_IMAGE=yes", "OVERRIDE=image"],
                  "WorkingDir": "/opaque", "User": ""}


def config_blob(layers: list[bytes], config: dict[str, object] | None = None) -> bytes:
    diff_ids = [sha256(decompressed(b)) for b in layers]
    return json.dumps({"architecture": "amd64", "os": "linux", "config": config or DEFAULT_CONFIG,
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def manifest_blob(layers: list[bytes], config: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": media_type(b), "digest": sha256(b),
                    "size": len(b)} for b in layers],
    }).encode()


def write_layout(root: str, images: dict[str, tuple[list[bytes], dict[str, object] | None]]) -> dict[str, str]:
    """An OCI layout at ``root`` with one manifest per tag; returns tag -> manifest digest."""
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        with open(os.path.join(root, "blobs", "sha256", digest.partition(":")[2]), "wb") as f:
            f.write(data)
        return digest

    entries, digests = [], {}
    for tag, (layers, config) in images.items():
        for layer in layers:
            put(layer)
        cfg = config_blob(layers, config)
        put(cfg)
        manifest = manifest_blob(layers, cfg)
        digests[tag] = put(manifest)
        entries.append({"mediaType": OCI_MANIFEST, "digest": digests[tag], "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                        "platform": {"architecture": "amd64", "os": "linux"}})
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, f)
    return digests


def add_index(root: str, tag: str, platforms: dict[str, str]) -> str:
    """Tag an image index in the layout at ``root``: ``platforms`` maps "os/arch" to a
    manifest digest already in it. Returns the index's digest (a multi-platform image,
    as ``skopeo copy --all`` pushes it)."""
    blobs = os.path.join(root, "blobs", "sha256")
    entries = []
    for platform, digest in platforms.items():
        os_name, arch = platform.split("/")
        size = os.path.getsize(os.path.join(blobs, digest.partition(":")[2]))
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                        "platform": {"os": os_name, "architecture": arch}})
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    digest = sha256(body)
    with open(os.path.join(blobs, digest.partition(":")[2]), "wb") as f:
        f.write(body)
    with open(os.path.join(root, "index.json")) as f:
        index = json.load(f)
    index["manifests"].append({"mediaType": OCI_INDEX, "digest": digest, "size": len(body),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return digest


def tar_directory(root: str, out: str) -> None:
    """``out``: an uncompressed tar of the directory ``root`` (an OCI layout tar)."""
    with tarfile.open(out, "w") as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)


def oracle_layers() -> list[bytes]:
    """``default_layers`` and a third layer of what an unpacker can get wrong, for the
    umoci comparison: a directory whited out with its contents, a file replaced by a
    directory and a directory by a file, symlinks (relative, absolute, dangling), a hard
    link, a FIFO, owners other than root, setgid and sticky directories, an xattr, and
    a file made over again in a directory the layer names (opaque) again; and a fourth
    layer of members whose parent directories it does not list."""
    base, top = default_layers()
    third = tar_bytes([
        Entry("etc/.wh.gone-dir"),
        Entry("etc/was-file", kind=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001),
        Entry("etc/was-file/inside", data=b"in\n", mode=0o640, uid=1000, gid=1001),
        Entry("etc/was-dir", data=b"now a file\n", mode=0o600),
        Entry("links", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("links/relative", kind=tarfile.SYMTYPE, linkname="../bin/busybox"),
        Entry("links/absolute", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        Entry("links/dangling", kind=tarfile.SYMTYPE, linkname="/nowhere/at/all"),
        Entry("links/data", data=b"linked twice\n", mode=0o644, uid=1000, gid=1000),
        Entry("links/hard", kind=tarfile.LNKTYPE, linkname="links/data"),
        Entry("links/fifo", kind=tarfile.FIFOTYPE, mode=0o620),
        Entry("shared", kind=tarfile.DIRTYPE, mode=0o2775, uid=0, gid=1000),
        Entry("shared/tmp", kind=tarfile.DIRTYPE, mode=0o1777),
        Entry("shared/tagged", data=b"t\n", pax={"SCHILY.xattr.user.colour": "blue"}),
        Entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("opaque/.wh..wh..opq"),
        Entry("opaque/newer", data=b"third layer\n", uid=1000, gid=1000),
        Entry("srv", kind=tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1001, pax={"SCHILY.xattr.user.where": "srv"}),
        Entry("srv/inner", kind=tarfile.DIRTYPE, mode=0o700, uid=1001, gid=1001),
        Entry("srv2", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("srv2/inner", kind=tarfile.DIRTYPE, mode=0o700, uid=1001, gid=1001),
    ], compress=True)
    # Members whose parents the tar does not list: they keep what the layers below say
    # (srv, srv/inner, home/alice), unless this layer's opaque directory hides those (srv2).
    fourth = tar_bytes([
        Entry("srv/inner/deeper/file", data=b"deep\n"),
        Entry("home/alice/.profile", data=b"export PS1=alice\n", uid=1000, gid=1000),
        Entry("srv2", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("srv2/.wh..wh..opq"),
        Entry("srv2/inner/file", data=b"under an opaque parent\n"),
    ])
    base = busybox_layer([
        Entry("etc/motd-gone", data=b"should be whited out\n"),
        Entry("etc/gone-dir", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("etc/gone-dir/file", data=b"whited out with its directory\n"),
        Entry("etc/was-file", data=b"becomes a directory\n"),
        Entry("etc/was-dir", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("etc/was-dir/file", data=b"replaced with its directory\n"),
        Entry("opaque", kind=tarfile.DIRTYPE, mode=0o755),
        Entry("opaque/old", data=b"hidden by the opaque marker\n"),
    ])
    return [base, top, third, fourth]
