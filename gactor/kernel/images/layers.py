"""The layer store: each layer blob unpacked once, by digest, never changed afterwards.

Laid out as::

    <store>/layers/<algo>-<hex>/diff        the unpacked layer: one overlay lower dir
    <store>/layers/<algo>-<hex>/layer.json  its digest, size on disk, what was skipped
    <store>/layers/.tmp-*                   a layer being unpacked, or being removed

Layers are unpacked unshifted (owners as the tar has them) and shared by privileged and
unprivileged containers alike; an unprivileged container sees them through idmapped
mounts (``rootfs.mount_overlay``). A layer is built in a ``.tmp-`` directory and renamed
into place only after its digest matched, so a name in the store always holds a verified
layer; a builder that loses the rename race (another thread or process unpacked the same
layer meanwhile) throws its copy away and uses the winner's.

Which layers are in use is the caller's to know: ``collect`` removes every layer not in
the set it is given (the registry passes the layers of every image it keeps).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from ..errors import KernelError
from . import unpack as _unpack_script

LAYERS = "layers"
DIFF = "diff"
META = "layer.json"
TMP = ".tmp-"
CHUNK = 1 << 20
ZSTD_MAGIC = _unpack_script.ZSTD_MAGIC
UNPACK_TIMEOUT = 600.0  # seconds one layer may take to unpack before it is given up


@dataclass(frozen=True)
class Blob:
    """A layer blob to unpack: its digest (``sha256:<hex>``), size (-1: unknown) and how
    to open it (the caller's file object; ``ensure`` closes it)."""

    digest: str
    size: int
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class Layer:
    digest: str
    path: str  # the lower dir
    bytes: int
    inodes: int


def layer_dir(store: str, digest: str) -> str:
    return os.path.join(store, LAYERS, digest.replace(":", "-", 1))


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:<64 hex>`` (the only algorithm accepted), else KernelError."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise KernelError("layer", errno.EINVAL, f"unsupported or malformed digest {digest!r}")
    return digest


def read(store: str, digest: str) -> Layer | None:
    """The unpacked layer ``digest``, or None if the store has none."""
    path = layer_dir(store, check_digest(digest))
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        return Layer(digest, os.path.join(path, DIFF), int(meta["bytes"]), int(meta["inodes"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KernelError("layer", getattr(err, "errno", 0) or 0, f"layer {digest}: bad record: {err}") from err


def ensure(store: str, blob: Blob, what: str, below: Sequence[str] = ()) -> Layer:
    """The unpacked layer of ``blob``: read from the store, or unpacked now (blocking).

    The blob is streamed into an unpacking process (``unpack.py``, chrooted into the new
    layer) while its sha256 is computed; a mismatch, a bad member or a timeout raises
    KernelError naming ``what`` (the image) and the layer, and leaves nothing in the
    store. ``below``: the image's lower layers' dirs, top first; a directory the tar
    needs but does not list gets their attributes (``unpack.inherit``). Safe to call
    from several threads and processes at once.
    """
    found = read(store, blob.digest)
    if found is not None:
        return found
    root = os.path.join(store, LAYERS)
    os.makedirs(root, mode=0o711, exist_ok=True)
    final = layer_dir(store, blob.digest)
    tmp = os.path.join(root, f"{TMP}{os.path.basename(final)}-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp, 0o711)
    try:
        diff = os.path.join(tmp, DIFF)
        os.mkdir(diff, 0o755)
        summary = _unpack(blob, diff, what, below)
        used, inodes = _usage(diff)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"digest": blob.digest, "bytes": used, "inodes": inodes, **summary}, f)
        try:
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)  # another builder was first; its layer is the same
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KernelError.from_os_error("layer", err, f"{what}: layer {blob.digest}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layer = read(store, blob.digest)
    assert layer is not None
    return layer


def unpack_archive(path: str, target: str, what: str) -> None:
    """Unpack the (compressed) tar ``path`` into the directory ``target``, confined as a
    layer is (``unpack.py``) but with no digest to check: a compressed OCI layout."""
    _unpack(Blob("", -1, lambda: open(path, "rb")), target, what)


def _unpack(blob: Blob, target: str, what: str, below: Sequence[str] = ()) -> dict[str, int]:
    # zstandard's directory: the unpacker (stdlib only, no site) imports it from there
    # for a zstd blob, as tarfile's own decompressors, before it chroots.
    zstd_path = os.path.dirname(os.path.dirname(os.path.abspath(zstandard.__file__)))
    child = subprocess.Popen([sys.executable, "-I", "-S", _unpack_script.__file__, target, zstd_path, *below],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdin is not None
    # A watchdog bounds the whole unpack, the writes into a stuck child included.
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        child.kill()

    watchdog = threading.Timer(UNPACK_TIMEOUT, expire)
    watchdog.start()
    digest = hashlib.sha256()
    size = 0
    broken = False
    try:
        with blob.open() as source:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if not broken:
                    try:
                        child.stdin.write(chunk)
                    except BrokenPipeError:
                        broken = True  # the child gave up: its answer says why
        with contextlib.suppress(BrokenPipeError):
            child.stdin.close()
        child.stdin = None
        out, err = child.communicate()
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        raise KernelError("layer", errno.ETIMEDOUT,
                          f"{what}: layer {blob.digest}: unpacking took over {UNPACK_TIMEOUT:.0f} s")
    got = "sha256:" + digest.hexdigest()
    if blob.digest and got != blob.digest:
        raise KernelError("layer", errno.EBADMSG, f"{what}: layer {blob.digest}: digest mismatch "
                          f"(the blob's content hashes to {got})")
    if blob.size >= 0 and size != blob.size:
        raise KernelError("layer", errno.EBADMSG, f"{what}: layer {blob.digest}: {size} bytes, "
                          f"the manifest says {blob.size}")
    try:
        summary: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise KernelError("layer", errno.EIO, f"{what}: layer {blob.digest}: unpacking failed: "
                          f"{err.decode(errors='replace').strip()[-500:]}") from None
    if "error" in summary or child.returncode != 0:
        raise KernelError("layer", errno.EINVAL, f"{what}: layer {blob.digest}: {summary.get('error')}")
    return summary


def _usage(path: str) -> tuple[int, int]:
    used = inodes = 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            used += os.lstat(os.path.join(top, name)).st_blocks * 512
            inodes += 1
    return used, inodes


def listed(store: str) -> list[Layer]:
    """Every layer in the store (half-built ones not included)."""
    root = os.path.join(store, LAYERS)
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if TMP in name:
            continue
        with contextlib.suppress(KernelError):
            layer = read(store, name.replace("-", ":", 1))
            if layer is not None:
                found.append(layer)
    return found


def collect(store: str, in_use: Iterable[str]) -> list[str]:
    """Remove every layer whose digest is not in ``in_use``, and every half-built or
    half-removed one; return the removed digests. The caller guarantees no ``ensure``
    of a layer it removes runs meanwhile. Each layer is first renamed to a ``.tmp-``
    name, so one interrupted mid-removal is never found again under its digest."""
    root = os.path.join(store, LAYERS)
    keep = {layer_dir(store, d) for d in in_use}
    removed = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if path in keep:
            continue
        doomed = path if TMP in name else os.path.join(root, f"{TMP}gc-{name}-{os.urandom(4).hex()}")
        try:
            if doomed != path:
                os.rename(path, doomed)
            shutil.rmtree(doomed)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise KernelError.from_os_error("layer collect", err, doomed) from err
        if TMP not in name:
            removed.append(name.replace("-", ":", 1))
    return removed
