"""Container root filesystems: per-container overlays over immutable image copies.

The lower dir of every overlay is a copy in the image store (``image_copies``):
uid-shifted for unprivileged containers (their root maps to host uid ``MAX_UID``, so
files the image owns as uid/gid 0 must be owned by ``MAX_UID`` on the host, as Garden's
grootfs does at unpack), unshifted for privileged ones. Each container then gets an
overlay with its own upper and work dirs in the depot.
"""

from __future__ import annotations

import os
import shutil

from . import image_copies
from . import linux as L
from .errors import KernelError


def shifted_image(source: str, store: str) -> str:
    """The lower dir of the uid-shifted copy of ``source`` as it is now (``image_copies.prepare``).

    For callers that do not track references: the copy stays until a ``collect`` that
    does not name it (and no overlay mounts it)."""
    return image_copies.prepare(source, store, shift=True).path


def remove_partial_images(store: str) -> None:
    """Remove copies a killed server left half-built or half-removed (startup only, before
    any ``prepare``; ``image_copies.collect`` does this too)."""
    if not os.path.isdir(store):
        return
    for name in os.listdir(store):
        if ".tmp-" in name or ".old-" in name:
            shutil.rmtree(os.path.join(store, name), ignore_errors=True)


def mount_overlay(lower: str, container_dir: str, privileged: bool, upper_root: str | None = None) -> str:
    """Mount ``<container_dir>/rootfs`` as an overlay over ``lower``; returns its path.
    The upper and work dirs are made in ``upper_root`` (a disk-limited filesystem) when
    given, else in ``container_dir``."""
    upper, work = (os.path.join(upper_root or container_dir, n) for n in ("upper", "work"))
    merged = os.path.join(container_dir, "rootfs")
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    st = os.stat(lower)
    # The merged root takes the upper dir's owner and mode.
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
    try:
        L.mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
    except OSError as err:
        raise KernelError("mount overlay", err.errno or 0, f"{merged}: {err}") from err
    return merged


def unmount(path: str) -> None:
    """Detach ``path`` if it is mounted; a path that is not mounted is fine."""
    try:
        L.umount(path, L.MNT_DETACH)
    except OSError as err:
        if err.errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise KernelError("umount", err.errno or 0, path) from err
