"""Image sources on disk: rootfs tars, OCI image layouts (a directory or a tar of one, as
``skopeo copy oci:``, ``umoci`` and ``docker save`` write them) and ``docker save``'s
older ``manifest.json`` archives, resolved to what the layer store needs: the image's
config and its layer blobs, bottom first, each with its digest.

Nothing here unpacks anything or writes anywhere; every JSON blob read (index, manifest,
config) is checked against its digest, and layer blobs are checked while they are
unpacked (``layers.ensure``). A problem raises ``ImageError`` naming the image.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import KernelError
from .layers import ZSTD_MAGIC, Blob, check_digest

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
PLATFORM = ("linux", "amd64")
MAX_JSON = 4 << 20  # bytes of an index, manifest or config blob; larger is refused
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


class ImageError(KernelError):
    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__("image", err, message)

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says about processes: ``Env`` (below the container's and
    the process's), the default ``User`` and ``WorkingDir``."""

    env: tuple[str, ...] = ()
    user: str = ""
    working_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"env": list(self.env), "user": self.user, "working_dir": self.working_dir}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ImageConfig:
        return cls(tuple(raw.get("env") or ()), str(raw.get("user") or ""), str(raw.get("working_dir") or ""))


@dataclass(frozen=True)
class Resolved:
    id: str  # the manifest's sha256 hex (a rootfs tar: the tar's)
    name: str  # what it was resolved from, for messages
    config: ImageConfig
    blobs: tuple[Blob, ...]  # bottom layer first


def parse_uri(uri: str) -> tuple[str, str]:
    """``(path, tag)`` of an ``oci://PATH[#TAG]`` or plain-path source."""
    if uri.startswith("oci://"):
        path, _, tag = uri[len("oci://"):].partition("#")
        if not path:
            raise ImageError(f"image {uri!r}: no path after oci://")
        return path, tag
    return uri, ""


def resolve(source: str, shown: str = "") -> Resolved:
    """Resolve a non-directory-rootfs source: an OCI layout (directory or tar), a docker
    save archive, or a rootfs tar (``.tar``, ``.tar.gz``). Blocking (reads the index,
    manifest and config; a rootfs tar is hashed once per change of its file). Messages
    and the result's ``name`` say ``shown`` (default: ``source``)."""
    path, tag = parse_uri(source)
    uri = shown or source
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "index.json")):
            return _from_layout(_DirLayout(path), uri, tag)
        if os.path.exists(os.path.join(path, "manifest.json")):
            return _from_docker_archive(_DirLayout(path), uri, tag)
        raise ImageError(f"image {uri!r}: {path} has no index.json, so it is not an OCI layout")
    if not os.path.isfile(path):
        raise ImageError(f"image {uri!r}: {path} does not exist", errno.ENOENT)
    try:
        layout = _TarLayout(path)
    except tarfile.ReadError as err:
        if _compressed(path):  # a compressed tar can only be a rootfs (a layout is read in place)
            if tag:
                raise ImageError(f"image {uri!r}: a rootfs tar has no tags") from None
            return _rootfs_tar(path, uri)
        raise ImageError(f"image {uri!r}: {path} is neither a directory nor a tar: {err}") from err
    except OSError as err:
        raise ImageError(f"image {uri!r}: reading {path}: {err}", err.errno or errno.EIO) from err
    if layout.has("index.json"):
        return _from_layout(layout, uri, tag)
    if layout.has("manifest.json"):
        return _from_docker_archive(layout, uri, tag)
    if tag:
        raise ImageError(f"image {uri!r}: a rootfs tar has no tags")
    return _rootfs_tar(path, uri)


_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", ZSTD_MAGIC)  # gzip, bzip2, xz (tarfile's "r|*"), zstd


def compressed_layout(path: str) -> bool:
    """Whether ``path`` is a compressed tar of an OCI layout or docker save archive
    (``docker save | gzip``): its first members name layout files."""
    if not os.path.isfile(path) or not _compressed(path):
        return False
    try:
        with tarfile.open(path, "r|*") as tar:
            for _, member in zip(range(8), tar, strict=False):
                name = member.name.removeprefix("./")
                if name in ("oci-layout", "index.json", "manifest.json", "repositories") or name.startswith("blobs/"):
                    return True
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return any(head.startswith(m) for m in _MAGIC)


# ---- reading layouts ----------------------------------------------------------------------


class _Slice:
    """``size`` bytes of an open file from ``offset`` on: a member of an uncompressed tar."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._file.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Slice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DirLayout:
    def __init__(self, root: str) -> None:
        self.root = root

    def has(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def _path(self, name: str) -> str:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ImageError(f"{self.root}: path {name!r} points outside the layout")
        return os.path.join(self.root, *parts)

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        path = self._path(name)
        return lambda: open(path, "rb")


class _TarLayout:
    def __init__(self, path: str) -> None:
        self.path = path
        with tarfile.open(path, "r:") as tar:  # uncompressed: members are read in place
            self.members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isreg()}

    def has(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        return self._member(name).size

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self.members.get(name.removeprefix("./"))
        if member is None:
            raise ImageError(f"{self.path}: the archive has no {name}", errno.ENOENT)
        return member

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        member = self._member(name)
        return lambda: _Slice(self.path, member.offset_data, member.size)  # type: ignore[return-value]


_Layout = _DirLayout | _TarLayout


def _read_json(layout: _Layout, name: str, uri: str, digest: str = "") -> Any:
    try:
        if layout.size(name) > MAX_JSON:
            raise ImageError(f"image {uri!r}: {name} is larger than {MAX_JSON} bytes")
        with layout.opener(name)() as f:
            data = f.read()
    except OSError as err:
        raise ImageError(f"image {uri!r}: reading {name}: {err}", err.errno or errno.EIO) from err
    if digest and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(f"image {uri!r}: {name} does not match its digest {digest}", errno.EBADMSG)
    try:
        return json.loads(data)
    except ValueError as err:
        raise ImageError(f"image {uri!r}: {name} is not JSON: {err}") from err


def _blob_name(digest: str) -> str:
    algo, _, hexpart = check_digest(digest).partition(":")
    return f"blobs/{algo}/{hexpart}"


def _ref_names(descriptor: dict[str, Any]) -> list[str]:
    annotations = descriptor.get("annotations") or {}
    names = [str(annotations[k]) for k in (REF_NAME, CONTAINERD_NAME) if k in annotations]
    return names + [n.rsplit(":", 1)[1] for n in names if ":" in n.rsplit("/", 1)[-1]]


def _is_platform(entry: dict[str, Any]) -> bool:
    platform = entry.get("platform") or {}
    return (platform.get("os", PLATFORM[0]), platform.get("architecture", PLATFORM[1])) == PLATFORM


def pick_platform(manifests: list[dict[str, Any]], uri: str) -> dict[str, Any]:
    """The linux/amd64 entry of an index (an entry without a platform counts as one)."""
    for entry in manifests:
        if _is_platform(entry):
            return entry
    found = sorted({f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
                    for e in manifests})
    raise ImageError(f"image {uri!r} has no linux/amd64 manifest (it has: {', '.join(found) or 'none'})")


def _from_layout(layout: _Layout, uri: str, tag: str) -> Resolved:
    index = _read_json(layout, "index.json", uri)
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if tag:
        chosen = [m for m in manifests if tag in _ref_names(m)]
        if not chosen:
            tags = sorted({n for m in manifests for n in _ref_names(m)})
            raise ImageError(f"image {uri!r} has no tag {tag!r} (tags: {', '.join(tags) or 'none'})", errno.ENOENT)
    else:
        chosen = manifests
    if not chosen:
        raise ImageError(f"image {uri!r}: index.json lists no manifests")
    if len(chosen) > 1:
        matching = [m for m in chosen if _is_platform(m)] or [pick_platform(chosen, uri)]
        latest = [m for m in matching if "latest" in _ref_names(m)]
        if len(matching) > 1 and len(latest) != 1:
            tags = sorted({n for m in matching for n in _ref_names(m)})
            raise ImageError(f"image {uri!r} holds {len(matching)} linux/amd64 images: name one with "
                             f"oci://PATH#TAG (tags: {', '.join(tags) or 'none'})")
        chosen = latest if len(matching) > 1 else matching
    descriptor = chosen[0]
    for _ in range(4):  # an index of indexes, at most this deep
        if descriptor.get("mediaType") not in INDEX_TYPES:
            break
        nested = _read_json(layout, _blob_name(descriptor["digest"]), uri, descriptor["digest"])
        descriptor = pick_platform(list(nested.get("manifests") or []), uri)
    digest = check_digest(str(descriptor.get("digest")))
    manifest = _read_json(layout, _blob_name(digest), uri, digest)
    return from_manifest(manifest, digest, uri,
                         lambda d: _read_json(layout, _blob_name(d), uri, d),
                         lambda d: Blob(d, layout.size(_blob_name(d)), layout.opener(_blob_name(d))))


def from_manifest(manifest: dict[str, Any], digest: str, uri: str, read_config: Callable[[str], Any],
                  blob: Callable[[str], Blob]) -> Resolved:
    """The image an (OCI or Docker v2) image manifest describes; ``read_config`` fetches
    and checks the config blob, ``blob`` makes a layer's Blob (shared with the registry
    client)."""
    if manifest.get("mediaType", MANIFEST_TYPES[0]) not in MANIFEST_TYPES:
        raise ImageError(f"image {uri!r}: manifest {digest} has the unsupported type {manifest.get('mediaType')!r}")
    config_digest = check_digest(str((manifest.get("config") or {}).get("digest")))
    config = _config(read_config(config_digest))
    blobs = []
    for layer in manifest.get("layers") or []:
        blobs.append(blob(check_digest(str(layer.get("digest")))))
    return Resolved(digest.partition(":")[2], uri, config, tuple(blobs))


def _config(raw: Any) -> ImageConfig:
    section = (raw.get("config") or {}) if isinstance(raw, dict) else {}
    env = section.get("Env") or []
    return ImageConfig(tuple(str(e) for e in env), str(section.get("User") or ""),
                       str(section.get("WorkingDir") or ""))


def _from_docker_archive(layout: _Layout, uri: str, tag: str) -> Resolved:
    """``docker save`` before Docker 25: manifest.json lists config and layer files; each
    layer file is an uncompressed tar whose sha256 is its diff_id in the config."""
    entries = _read_json(layout, "manifest.json", uri)
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"image {uri!r}: manifest.json lists no images")
    if tag:
        entries = [e for e in entries if any(t == tag or t.endswith(f":{tag}") for t in e.get("RepoTags") or [])]
        if not entries:
            raise ImageError(f"image {uri!r} has no tag {tag!r}", errno.ENOENT)
    elif len(entries) > 1:
        raise ImageError(f"image {uri!r} holds {len(entries)} images: name one with oci://PATH#TAG")
    entry = entries[0]
    raw = _read_json(layout, str(entry["Config"]), uri)
    diff_ids = list((raw.get("rootfs") or {}).get("diff_ids") or [])
    files = list(entry.get("Layers") or [])
    if len(diff_ids) != len(files):
        raise ImageError(f"image {uri!r}: {len(files)} layer files but {len(diff_ids)} diff_ids")
    blobs = tuple(Blob(check_digest(d), layout.size(f), layout.opener(f)) for d, f in zip(diff_ids, files, strict=True))
    config_digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode() + str(diff_ids).encode())
    return Resolved(config_digest.hexdigest(), uri, _config(raw), blobs)


# ---- rootfs tars ----------------------------------------------------------------------------

_hashed: dict[tuple[str, int, int, int, int], str] = {}
_hashed_lock = threading.Lock()


def _rootfs_tar(path: str, uri: str) -> Resolved:
    """One layer: the tar itself (any compression tarfile reads), hashed once per version
    of the file (path, inode, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    signature = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _hashed_lock:
        digest = _hashed.get(signature)
    if digest is None:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        with _hashed_lock:
            if len(_hashed) > 256:
                _hashed.clear()
            _hashed[signature] = digest
    blob = Blob(digest, st.st_size, lambda: open(real, "rb"))
    return Resolved(digest.partition(":")[2], uri, ImageConfig(), (blob,))
