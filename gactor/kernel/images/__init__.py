"""The image store: what a container's overlay is stacked from, by source.

A source is a rootfs directory (snapshotted by ``image_copies``: it may change under
us), or an image made of layers: a rootfs tar (one layer), an OCI layout (directory or
tar), a ``docker save`` archive, or (``registry_client``) a ``docker://`` image. A layered
image is recorded as::

    <store>/manifests/<id>/image.json   its source, config, layer digests (bottom first)
    <store>/layers/...                  the unpacked layers (``layers``), shared by digest

``prepare`` returns an ``Image``, whose ``path`` is what the registry references (and a
container's record names) and whose ``layers`` are the overlay's lower dirs, top first.
Layers are never shifted on disk: ``rootfs.mount_overlay`` shows them to an unprivileged
container through idmapped mounts. Records and layers stay after their last container
(a cache) until ``prune`` removes what no container uses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import image_copies
from ..errors import KernelError
from . import layers, oci
from .oci import ImageConfig, ImageError

__all__ = ["Image", "ImageConfig", "ImageError", "ImageSummary", "Progress", "known", "listed", "prepare", "prune",
           "read"]

# How a pull reports its layers, from the thread pulling: (digest, bytes read, size or -1).
Progress = Callable[[str, int, int], None]
MANIFESTS = "manifests"
RECORD = "image.json"
TMP = ".tmp-"
assert {MANIFESTS, layers.LAYERS} <= image_copies.RESERVED


@dataclass(frozen=True)
class Image:
    """An image as a container uses it; the store owns the files (``prune``)."""

    path: str  # the reference: a copy's lower dir, or <store>/manifests/<id>
    layers: tuple[str, ...]  # overlay lower dirs, top first
    config: ImageConfig
    source: str
    shifted: bool  # uid 0 already shifted on disk (a copy made without idmapped mounts)
    bytes: int
    inodes: int
    digests: tuple[str, ...] = ()  # the layers' digests, bottom first (layered images)

    @property
    def layered(self) -> bool:
        return bool(self.digests)


@dataclass(frozen=True)
class ImageSummary:
    path: str
    source: str
    bytes: int
    layers: int


def is_directory_rootfs(source: str) -> bool:
    path, _ = oci.parse_uri(source)
    return not source.startswith("oci://") and os.path.isdir(path) and not os.path.exists(
        os.path.join(path, "index.json"))


def check_source(source: str) -> None:
    """ImageError if ``source`` cannot name an image here (cheap: no reading of layers)."""
    if source.startswith("docker://"):
        from . import registry_client

        registry_client.parse(source)
        return
    path, _ = oci.parse_uri(source)
    if not os.path.exists(path):
        raise ImageError(f"image {source!r}: {path} does not exist", errno.ENOENT)


_known: dict[tuple[str, str], tuple[tuple[int, ...], Image]] = {}  # (store, source) ->
_known_lock = threading.Lock()


def _signature(source: str) -> tuple[int, ...]:
    path, _ = oci.parse_uri(source)
    st = os.stat(path)
    sig: tuple[int, ...] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    index = os.path.join(path, "index.json")
    if os.path.isdir(path) and os.path.exists(index):
        st = os.stat(index)
        sig += (st.st_ino, st.st_size, st.st_mtime_ns)
    return sig


def known(source: str, store: str, *, privileged: bool, idmap: bool) -> Image | None:
    """The image ``prepare`` would return, if known without reading anything but a stat
    or two (safe on an event loop); else None."""
    if is_directory_rootfs(source):
        copy = image_copies.known(source, store, shift=not privileged and not idmap)
        return None if copy is None else _from_copy(copy)
    if source.startswith("docker://") or (not privileged and not idmap):
        return None  # a tag may have moved / only prepare says why this cannot work
    with _known_lock:
        cached = _known.get((os.path.realpath(store), source))
    try:
        if cached is None or cached[0] != _signature(source) or not os.path.isdir(cached[1].path):
            return None
    except OSError:
        return None
    return cached[1]


def prepare(source: str, store: str, *, privileged: bool, idmap: bool, username: str = "",
            password: str = "", progress: Progress | None = None) -> Image:
    """The image ``source`` names, unpacked (each layer once, ever) and recorded. Blocking.
    A ``docker://`` image's manifest is fetched each time (its tag may have moved; the
    layers are cached), with ``username``/``password`` for the registry if given.
    ``progress`` (of a layered image) hears of every layer once its manifest is read,
    then of its blob's bytes as they are read, and last that it is done (``_ensure_all``).
    Raises ImageError (or KernelError) naming the source for anything wrong with it."""
    if is_directory_rootfs(source):
        return _from_copy(image_copies.prepare(source, store, shift=not privileged and not idmap))
    check_source(source)
    if not privileged and not idmap:
        raise ImageError(f"image {source!r}: this kernel cannot idmap mounts, so layered images "
                         "need a privileged container")
    if source.startswith("docker://"):
        from . import registry_client  # only pulls need the HTTP client

        resolved = registry_client.resolve(source, username, password)
        unpacked = _ensure_layers(store, resolved, f"image {source!r}", progress)
        return _record(store, resolved, unpacked)
    signature = _signature(source)
    path, tag = oci.parse_uri(source)
    if oci.compressed_layout(path):
        # Blobs are read in place, which a compressed tar does not allow: unpack it first.
        root = os.path.join(store, MANIFESTS)
        os.makedirs(root, mode=0o711, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=TMP + "layout-", dir=root)
        try:
            layers.unpack_archive(path, scratch, f"image {source!r}")
            resolved = oci.resolve(f"oci://{scratch}" + (f"#{tag}" if tag else ""), shown=source)
            unpacked = _ensure_layers(store, resolved, f"image {source!r}", progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        resolved = oci.resolve(source)
        unpacked = _ensure_layers(store, resolved, f"image {source!r}", progress)
    image = _record(store, resolved, unpacked)
    with _known_lock:
        if len(_known) > 256:
            _known.clear()
        _known[(os.path.realpath(store), source)] = (signature, image)
    return image


def _ensure_layers(store: str, resolved: oci.Resolved, what: str, progress: Progress | None = None
                   ) -> list[layers.Layer]:
    """The image's layers, bottom first, each unpacked (if new) with those below it.
    ``progress`` hears of each layer first (done already if the store has it), then of
    the bytes read from its blob, then that it is done: ``done`` only grows, and ends at
    the blob's size."""
    if progress is not None:
        for blob in resolved.blobs:
            try:
                cached = layers.read(store, blob.digest) is not None
            except KernelError:
                cached = False  # ``ensure`` says what is wrong
            if cached:  # reported done (0 of 0 when its size is unknown)
                progress(blob.digest, max(blob.size, 0), max(blob.size, 0))
            else:
                progress(blob.digest, 0, blob.size)
    unpacked: list[layers.Layer] = []
    for blob in resolved.blobs:
        below = [layer.path for layer in reversed(unpacked)]
        if progress is None:
            unpacked.append(layers.ensure(store, blob, what, below))
            continue
        reader: list[_CountedBlob] = []

        def open_counted(blob: layers.Blob = blob, reader: list[_CountedBlob] = reader,
                         progress: Progress = progress) -> Any:
            reader.append(_CountedBlob(blob.open(), blob, progress))
            return reader[0]

        unpacked.append(layers.ensure(store, layers.Blob(blob.digest, blob.size, open_counted), what, below))
        if reader:  # it was unpacked now (else the store had it: reported done above)
            progress(blob.digest, reader[0].done, blob.size if blob.size >= 0 else reader[0].done)
    return unpacked


class _CountedBlob:
    """A blob's file object that reports the bytes read from it so far."""

    def __init__(self, raw: Any, blob: layers.Blob, progress: Progress) -> None:
        self._raw, self._blob, self._progress = raw, blob, progress
        self.done = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        if data:
            self.done += len(data)
            self._progress(self._blob.digest, self.done, self._blob.size)
        return data

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> _CountedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(store: str, resolved: oci.Resolved, unpacked: list[layers.Layer]) -> Image:
    root = os.path.join(store, MANIFESTS)
    path = os.path.join(root, resolved.id)
    image = Image(path, tuple(layer.path for layer in reversed(unpacked)), resolved.config, resolved.name, False,
                  sum(layer.bytes for layer in unpacked), sum(layer.inodes for layer in unpacked),
                  tuple(layer.digest for layer in unpacked))
    if os.path.isdir(path):
        return read(path)
    os.makedirs(root, mode=0o711, exist_ok=True)
    tmp = f"{path}{TMP}{os.getpid()}-{os.urandom(4).hex()}"
    os.mkdir(tmp, 0o711)
    try:
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump({"source": image.source, "config": image.config.to_json(), "layers": list(image.digests),
                       "bytes": image.bytes, "inodes": image.inodes}, f)
        os.rename(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return read(path)
        raise KernelError.from_os_error("image record", err, path) from err
    return image


def _from_copy(copy: image_copies.ImageCopy) -> Image:
    return Image(copy.path, (copy.path,), ImageConfig(), copy.source, copy.shifted, copy.bytes, copy.inodes)


def read(path: str) -> Image:
    """The image a container's record names (``Image.path``). KernelError if it is gone."""
    if os.path.basename(os.path.dirname(path)) != MANIFESTS:
        return _from_copy(image_copies.read(path))
    store = os.path.dirname(os.path.dirname(path))
    try:
        with open(os.path.join(path, RECORD)) as f:
            raw = json.load(f)
        digests = tuple(str(d) for d in raw["layers"])
        lowers = []
        for digest in reversed(digests):
            layer = layers.read(store, digest)
            if layer is None:
                raise KernelError("image", errno.ENOENT, f"image {raw['source']!r}: layer {digest} is missing")
            lowers.append(layer.path)
        return Image(path, tuple(lowers), ImageConfig.from_json(raw.get("config") or {}), str(raw["source"]),
                     False, int(raw["bytes"]), int(raw["inodes"]), digests)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KernelError("image", getattr(err, "errno", 0) or 0, f"no image at {path}: {err}") from err


def listed(store: str) -> list[ImageSummary]:
    """Every image in the store: layered images, then directory copies."""
    found = []
    root = os.path.join(store, MANIFESTS)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if TMP in name:
            continue
        with contextlib.suppress(KernelError):
            image = read(os.path.join(root, name))
            found.append(ImageSummary(image.path, image.source, image.bytes, len(image.digests)))
    for name in sorted(os.listdir(store)) if os.path.isdir(store) else []:
        if name in image_copies.RESERVED or TMP in name:
            continue
        with contextlib.suppress(KernelError):
            copy = image_copies.read(os.path.join(store, name, image_copies.ROOTFS))
            found.append(ImageSummary(copy.path, copy.source, copy.bytes, 1))
    return found


def prune(store: str, in_use: Iterable[str]) -> list[str]:
    """Remove every image whose path is not in ``in_use`` (a layered image's record, a
    directory's copy), then every layer no remaining image uses; return what was removed
    (image paths, then layer digests). The caller guarantees no ``prepare`` on this
    store runs meanwhile."""
    keep = set(in_use)
    removed: list[str] = []
    root = os.path.join(store, MANIFESTS)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if path in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if TMP not in name:
            removed.append(path)
    with _known_lock:
        for key in [k for k, (_, image) in _known.items() if image.path in removed]:
            del _known[key]
    used_layers: set[str] = set()
    for path in keep:
        with contextlib.suppress(KernelError):
            used_layers.update(read(path).digests)
    removed += image_copies.collect(store, [p for p in keep if p not in removed], keep_current=False)
    removed += layers.collect(store, used_layers)
    return removed
