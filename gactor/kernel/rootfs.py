"""Container root filesystems: per-container overlays over immutable image layers.

The lower dirs of every overlay are in the image store (``images``): the layers of a
layered image, or a copy of a rootfs directory (``image_copies``). An unprivileged
container's root is host uid ``MAX_UID``, so files the image owns as uid/gid 0 must
appear owned by ``MAX_UID``: through idmapped mounts of unshifted layers (``idmap``;
nothing copied, one store for both kinds of container), or, where the kernel cannot,
through a copy chowned on disk (as Garden's grootfs does at unpack). Each container then
gets an overlay with its own upper and work dirs in the depot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from . import idmap, image_copies
from . import linux as L
from .container_init import MAX_UID
from .errors import KernelError

T = TypeVar("T")


def shifted_image(source: str, store: str) -> str:
    """The lower dir of the uid-shifted copy of ``source`` as it is now (``image_copies.prepare``).

    For callers that do not track references: the copy stays until a ``collect`` that
    does not name it (and no overlay mounts it)."""
    return image_copies.prepare(source, store, shift=True).path


MOUNT_POINTS = "mnt"  # in the image store: where idmapped layers are attached for a moment


def remove_partial_images(store: str) -> None:
    """Remove copies a killed server left half-built or half-removed (startup only, before
    any ``prepare``; ``image_copies.collect`` does this too)."""
    if not os.path.isdir(store):
        return
    reclaim_mount_points(os.path.join(store, MOUNT_POINTS))
    for top in (store, os.path.join(store, "layers"), os.path.join(store, "manifests")):
        for name in os.listdir(top) if os.path.isdir(top) else []:
            if ".tmp-" in name or ".old-" in name:
                shutil.rmtree(os.path.join(top, name), ignore_errors=True)


def mount_overlay(lowers: str | Sequence[str], container_dir: str, privileged: bool, idmapped: bool = False,
                  scratch: str = "", upper_root: str = "") -> str:
    """Mount ``<container_dir>/rootfs`` as an overlay over ``lowers`` (top first); returns
    its path. With ``idmapped`` (an unprivileged container over unshifted layers) each
    lower dir is first attached idmapped and read-only at a mount point in ``scratch``
    (default ``<container_dir>/lower``); the overlay keeps private clones of those
    mounts, so they are unmounted again before this returns, whatever happens. The empty
    mount points are kept for the next call: an rmdir right after the umount waits
    milliseconds for the mount to be released. The upper and work dirs are made in
    ``upper_root`` (default ``container_dir``; a disk-limited file system)."""
    merged = os.path.join(container_dir, "rootfs")

    def mount(options: str) -> str:
        L.mount("overlay", merged, "overlay", 0, options)
        return merged

    return _overlay(lowers, container_dir, privileged, idmapped, scratch, upper_root,
                    lambda layers, upper, work: mount(_options(layers, upper, work)))


def overlay_tree(lowers: str | Sequence[str], container_dir: str, privileged: bool, idmapped: bool = False,
                 scratch: str = "", upper_root: str = "") -> int:
    """``mount_overlay``'s overlay as a detached mount (an fd the caller closes), mounted
    nowhere: the container's pid 1 attaches it at ``<container_dir>/rootfs`` in its own
    mount namespace (``container_init``), so the host's mount table never holds it. A
    host mount per container made every later container's ``unshare(CLONE_NEWNS)`` copy
    it (docs/architecture.md, "With many containers alive"); the overlay now lives
    exactly as long as the container's mount namespace.

    ``fsconfig`` takes strings of at most 255 bytes, so each lower dir goes on its own
    (``lowerdir+``, Linux 6.7+). Where that cannot be (an older kernel, a longer path)
    the overlay is mounted at ``<container_dir>/rootfs`` for a moment and cloned from
    there (``open_tree``), then unmounted: the same detached mount, by way of the host's
    mount table."""
    merged = os.path.join(container_dir, "rootfs")

    def make(layers: list[str], upper: str, work: str) -> int:
        if all(len(path.encode()) <= _FSCONFIG_MAX for path in (upper, work, *layers)):
            try:
                return L.fsmount("overlay", [*(("lowerdir+", layer) for layer in layers),
                                             ("upperdir", upper), ("workdir", work)])
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
        L.mount("overlay", merged, "overlay", 0, _options(layers, upper, work))
        try:
            return L.open_tree_clone(merged)
        finally:
            L.umount(merged, L.MNT_DETACH)

    return _overlay(lowers, container_dir, privileged, idmapped, scratch, upper_root, make)


_FSCONFIG_MAX = 255  # bytes of an fsconfig string value (the kernel copies at most 256 with its NUL)


def _options(layers: list[str], upper: str, work: str) -> str:
    return f"lowerdir={':'.join(layers)},upperdir={upper},workdir={work}"


def _overlay(lowers: str | Sequence[str], container_dir: str, privileged: bool, idmapped: bool, scratch: str,
             upper_root: str, make: Callable[[list[str], str, str], T]) -> T:
    """The upper, work and rootfs dirs, the idmapped lower dirs if asked, and then
    ``make(lower dirs, upper dir, work dir)``."""
    layers = [lowers] if isinstance(lowers, str) else list(lowers)
    upper, work = (os.path.join(upper_root or container_dir, n) for n in ("upper", "work"))
    merged = os.path.join(container_dir, "rootfs")
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    st = os.stat(layers[0])
    # The merged root takes the upper dir's owner and mode.
    shift = idmapped and not privileged
    os.chown(upper, _shifted(st.st_uid, shift), _shifted(st.st_gid, shift))
    os.chmod(upper, st.st_mode & 0o7777)
    attached: list[str] = []
    try:
        if shift:
            for layer in layers:
                point = _take_point(scratch or os.path.join(container_dir, "lower"))
                try:
                    idmap.attach(layer, point)
                except BaseException:
                    _give_back(point)
                    raise
                attached.append(point)
            layers = attached
        return make(layers, upper, work)
    except OSError as err:
        raise KernelError("mount overlay", err.errno or 0, f"{merged}: {err}") from err
    finally:
        for point in attached:
            try:
                L.umount(point, 0)
            except OSError:
                unmount(point)
            _give_back(point)


_free_points: set[str] = set()
_points_lock = threading.Lock()


def _take_point(scratch: str) -> str:
    with _points_lock:
        for point in sorted(_free_points):
            if os.path.dirname(point) == scratch:
                _free_points.discard(point)
                return point
    point = os.path.join(scratch, os.urandom(6).hex())
    os.makedirs(point, mode=0o700)
    return point


def _give_back(point: str) -> None:
    with _points_lock:
        _free_points.add(point)


def reclaim_mount_points(scratch: str) -> None:
    """Detach whatever a killed server left mounted in ``scratch`` (read-only idmapped
    layers) and take its mount points into this process's pool (startup only, before any
    ``mount_overlay``)."""
    for name in os.listdir(scratch) if os.path.isdir(scratch) else []:
        point = os.path.join(scratch, name)
        unmount(point)
        with contextlib.suppress(OSError):
            if not os.listdir(point):
                _give_back(point)


def _shifted(owner: int, shift: bool) -> int:
    return MAX_UID if shift and owner == 0 else owner


def unmount(path: str) -> None:
    """Detach ``path`` if it is mounted; a path that is not mounted is fine."""
    try:
        L.umount(path, L.MNT_DETACH)
    except OSError as err:
        if err.errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise KernelError("umount", err.errno or 0, path) from err
