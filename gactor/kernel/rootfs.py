"""Container root filesystems: uid-shifted image copies and per-container overlays.

An unprivileged container's root maps to host uid ``MAX_UID``, so files the image
owns as uid/gid 0 must be owned by ``MAX_UID`` on the host (Garden's grootfs does
the same at unpack). Shifted copies are cached per source directory; each
container then gets an overlay with its own upper and work dirs in the depot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from . import linux as L
from .container_init import MAX_UID
from .errors import KernelError

_VERSION_FILE = ".gactor-shifted-from"


def shifted_image(source: str, store: str) -> str:
    """A copy of ``source`` with uid/gid 0 shifted to MAX_UID, built once and cached.

    The cache is keyed by the source's real path and invalidated when the source
    directory's mtime changes. Safe against concurrent builders (build, then rename).
    """
    real = os.path.realpath(source)
    if not os.path.isdir(real):
        raise KernelError("rootfs", 2, f"rootfs {source} is not a directory")
    stamp = f"{real}\n{os.stat(real).st_mtime_ns}\n"
    dest = os.path.join(store, hashlib.sha256(real.encode()).hexdigest()[:24])
    try:
        with open(os.path.join(dest, _VERSION_FILE)) as f:
            if f.read() == stamp:
                return dest
    except FileNotFoundError:
        pass
    os.makedirs(store, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    result = subprocess.run(["cp", "-a", "--reflink=auto", real, tmp], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KernelError("rootfs", 5, f"copying {source}: {result.stderr.strip()}")
    for top, dirs, files in os.walk(tmp):
        for name in (top, *(os.path.join(top, n) for n in dirs + files)):
            st = os.lstat(name)
            if st.st_uid == 0 or st.st_gid == 0:
                mode = st.st_mode
                os.lchown(name, MAX_UID if st.st_uid == 0 else -1, MAX_UID if st.st_gid == 0 else -1)
                if not os.path.islink(name) and mode & 0o6000:
                    os.chmod(name, mode & 0o7777)  # chown clears setuid/setgid; put them back
    with open(os.path.join(tmp, _VERSION_FILE), "w") as f:
        f.write(stamp)
    old = f"{dest}.old-{os.getpid()}"
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def remove_partial_images(store: str) -> None:
    """Remove copies a killed server left half-built or half-replaced (startup only)."""
    if not os.path.isdir(store):
        return
    for name in os.listdir(store):
        if ".tmp-" in name or ".old-" in name:
            shutil.rmtree(os.path.join(store, name), ignore_errors=True)


def mount_overlay(lower: str, container_dir: str, privileged: bool) -> str:
    """Mount ``<container_dir>/rootfs`` as an overlay over ``lower``; returns its path."""
    upper, work, merged = (os.path.join(container_dir, n) for n in ("upper", "work", "rootfs"))
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
