"""Disk limits: a container's overlay upper dir on a filesystem of the limit's size.

This host has no XFS project quotas and no ext4 quota formats; btrfs qgroups need the
depot on btrfs. What works on any depot filesystem is a loop device: a sparse file
``<container>/disk.img`` of the limit's size holding an ext4 filesystem (no journal, no
reserved blocks, the inode limit as its inode count), mounted at ``<container>/disk``; the
overlay's upper and work dirs live in it. Writes past the limit fail with ENOSPC inside
the container, other containers are unaffected, and the depot's filesystem can grow by at
most the limit (the file is sparse). Measured here: mkfs ~10-20 ms, loop set-up <1 ms,
mount ~1-8 ms, only for containers that ask for a limit (docs/limits.md).

The loop device is configured with LO_FLAGS_AUTOCLEAR, so it detaches itself once the
filesystem's last user (the overlay, the container's mount namespace) is gone: nothing to
release at destroy beyond the lazy unmount, nothing left if the server crashes (the
mounts stay, and the next start re-adopts or removes the container as usual).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess

from . import linux as L
from .errors import KernelError

IMAGE, MOUNT, META = "disk.img", "disk", "disk.json"
MIN_BYTES = 1 << 20  # smaller filesystems cannot hold the upper dir's own metadata
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_MKFS_TIMEOUT = 30.0


def mount(container_dir: str, size: int, inodes: int = 0) -> str:
    """Make and mount the container's limited filesystem; returns its mount point.
    Raises KernelError; on failure nothing it made stays mounted."""
    image, target = os.path.join(container_dir, IMAGE), os.path.join(container_dir, MOUNT)
    with open(image, "wb") as f:
        f.truncate(size)
    cmd = ["mkfs.ext4", "-q", "-F", "-O", "^has_journal,^resize_inode", "-m", "0",
           "-E", "nodiscard,lazy_itable_init=1", *(["-N", str(inodes)] if inodes else []), image]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_MKFS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelError("mkfs.ext4", 0, f"{image}: {err}") from err
    if done.returncode != 0:
        raise KernelError("mkfs.ext4", 0, f"{image}: {done.stderr.strip() or done.returncode}")
    os.makedirs(target, exist_ok=True)
    device, loop = _attach_loop(image)
    try:
        L.mount(device, target, "ext4", 0, "")  # no nosuid: a copied-up setuid file must stay one
    except OSError as err:
        raise KernelError("mount", err.errno or 0, f"{device} on {target}: {err}") from err
    finally:
        os.close(loop)  # the mount holds the device now (or nothing does, and it detaches)
    used_bytes, used_inodes = _used(target)
    with open(os.path.join(container_dir, META), "w") as f:
        json.dump({"size": size, "inodes": inodes, "base_bytes": used_bytes, "base_inodes": used_inodes}, f)
    return target


def unmount(container_dir: str) -> None:
    """Detach the limited filesystem (after the overlay on it); not mounted is fine."""
    target = os.path.join(container_dir, MOUNT)
    try:
        L.umount(target, L.MNT_DETACH)
    except OSError as err:
        if err.errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise KernelError("umount", err.errno or 0, target) from err


def usage(container_dir: str) -> tuple[int, int] | None:
    """Bytes and inodes the container wrote (its filesystem's use beyond an empty one),
    from the filesystem's own counters; None when the container has no disk limit."""
    try:
        with open(os.path.join(container_dir, META)) as f:
            meta = json.load(f)
        used_bytes, used_inodes = _used(os.path.join(container_dir, MOUNT))
    except (OSError, ValueError):
        return None
    return max(0, used_bytes - meta["base_bytes"]), max(0, used_inodes - meta["base_inodes"])


def _used(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


def _attach_loop(image: str) -> tuple[str, int]:
    """A free loop device backed by ``image`` that detaches itself once unused: its path
    and an open fd (close it once something else holds the device)."""
    for _ in range(8):  # another process may take the free device first: EBUSY, try the next
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
        finally:
            os.close(ctl)
        device = f"/dev/loop{number}"
        loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            # struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
            info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR,
                               image.encode()[:63], b"", b"", 0, 0)
            fcntl.ioctl(loop, _LOOP_CONFIGURE, struct.pack("=II", backing, 0) + info + bytes(64))
            return device, loop
        except OSError as err:
            os.close(loop)
            if err.errno != errno.EBUSY:
                raise KernelError("loop configure", err.errno or 0, f"{device} for {image}: {err}") from err
        finally:
            os.close(backing)
    raise KernelError("loop configure", errno.EBUSY, f"no free loop device for {image}")
