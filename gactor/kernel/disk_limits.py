"""Disk limits: a container's upper dir on a loop-mounted ext4 of its own, sized to the limit.

This kernel has no XFS project quotas and no ext4 quota formats (docs/images.md has the
measurements behind the choice), so a limited container writes to a file system that is
only as big as its limit: writes past it fail with ENOSPC inside the container, other
containers and the depot are unaffected, and usage is two counters (``statvfs``), never a
walk. ``create`` makes ``<container>/disk.img`` (sparse), ``mkfs.ext4``s it and mounts
it (``mount -o loop``, so the loop device is released with the last reference to the file
system) at ``<container>/disk``; the overlay's upper and work dirs go inside.

After the overlay is mounted the caller detaches ``<container>/disk`` (``detach``): the
overlay holds the file system, so it lives exactly as long as the container's rootfs, and
no teardown step (nor a crash) can leave a mount inside the container directory.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading

from . import linux as L
from .errors import KernelError

IMAGE = "disk.img"
MOUNT = "disk"
RECORD = "disk.json"
MIN_BYTES = 4 << 20  # the smallest ext4 worth making; smaller limits get this much
STEP_TIMEOUT = 30.0
PADDING_ROUNDS = 4


# ext4's own metadata (inode tables, bitmaps) by (limit, inodes): added to the image's
# size so that what the container can write is the limit. Learnt at the first create
# of each limit (one more mkfs then), remembered for the process.
_padding: dict[tuple[int, int], int] = {}
_padding_lock = threading.Lock()


def create(container_dir: str, byte_limit: int, inode_limit: int = 0) -> str:
    """The mounted limited file system for ``container_dir``'s upper dir, with
    ``byte_limit`` bytes free (within a block group's rounding); returns its mount point.
    Raises KernelError (and leaves nothing mounted) if it cannot be made."""
    image, mount = os.path.join(container_dir, IMAGE), os.path.join(container_dir, MOUNT)
    limit = max(byte_limit, MIN_BYTES)
    os.makedirs(mount, exist_ok=True)
    with _padding_lock:
        padding = _padding.get((limit, inode_limit))
    _make(image, mount, limit + (padding or 0), inode_limit)
    if padding is None:
        padding = 0
        for _ in range(PADDING_ROUNDS):  # a bigger file system has more metadata: settle it
            st = os.statvfs(mount)
            short = limit - st.f_bavail * st.f_frsize
            if short <= 0:
                break
            padding += short
            detach(mount, lazy=False)
            _make(image, mount, limit + padding, inode_limit)
        with _padding_lock:
            _padding[(limit, inode_limit)] = padding
    try:
        st = os.statvfs(mount)
        with open(os.path.join(container_dir, RECORD), "w") as f:
            json.dump({"baseline_blocks": st.f_blocks - st.f_bfree, "baseline_inodes": st.f_files - st.f_ffree,
                       "frsize": st.f_frsize}, f)
    except BaseException:
        detach(mount)
        raise
    return mount


def _make(image: str, mount: str, size: int, inode_limit: int) -> None:
    with open(image, "wb") as f:
        f.truncate(0)
        f.truncate(size)
    mkfs = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal,^resize_inode", "-m", "0",
            "-E", "nodiscard,lazy_itable_init=1"]
    if inode_limit:
        mkfs += ["-N", str(inode_limit)]
    _run([*mkfs, image], "mkfs.ext4")
    _run(["mount", "-o", "loop,nosuid,nodev,noatime", image, mount], "mount")


def detach(mount: str, lazy: bool = True) -> None:
    """Detach the mount point (the overlay keeps the file system)."""
    try:
        L.umount(mount, L.MNT_DETACH if lazy else 0)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOENT):
            raise KernelError.from_os_error("umount", err, mount) from err


def usage(container_dir: str, root: str) -> tuple[int, int] | None:
    """Bytes and inodes the container wrote on its limited file system (counters of its
    overlay, mounted at ``root``, which reports its upper file system), or None if it
    has none."""
    try:
        with open(os.path.join(container_dir, RECORD)) as f:
            record = json.load(f)
        st = os.statvfs(root)
    except (OSError, ValueError):
        return None
    used = (st.f_blocks - st.f_bfree - int(record["baseline_blocks"])) * st.f_frsize
    inodes = st.f_files - st.f_ffree - int(record["baseline_inodes"])
    return max(0, used), max(0, inodes)


def _run(argv: list[str], what: str) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelError("disk limit", errno.EIO, f"{what}: {err}") from err
    if result.returncode != 0:
        raise KernelError("disk limit", errno.EIO, f"{what}: {result.stderr.strip()}")
