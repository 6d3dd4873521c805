"""Idmapped mounts: showing a directory's files with uid/gid 0 as ``MAX_UID`` (an
unprivileged container's root on the host) without changing a byte on disk.

``attach(source, target)`` clones ``source`` as a detached mount (``open_tree``), marks it
idmapped through a user namespace with the containers' map (``container_init.UID_MAP``)
and read-only (``mount_setattr``), and attaches it at ``target`` (``move_mount``). An
overlay mounted over such lower dirs keeps private clones of them, so the caller
detaches the attached mounts again right after mounting it (``rootfs.mount_overlay``).

The user namespace is made once per process (a forked child unshares it; its fd keeps it
alive after the child exits). Measured here (kernel 6.18): about 0.3 ms per layer, where
copying and chowning a busybox rootfs costs about 100 ms and a full copy on disk.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

from .container_init import UID_MAP
from .errors import KernelError

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x100000
_CLONE_NEWUSER = 0x10000000

_userns = -1
_userns_lock = threading.Lock()


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _make_userns() -> int:
    """A user namespace with the containers' uid and gid map; the caller owns the fd."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only async-signal-safe calls until _exit
        try:
            os.close(ready_r)
            os.close(done_w)
            ok = _libc.unshare(_CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, "unshare(CLONE_NEWUSER) failed")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(UID_MAP)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def userns_fd() -> int:
    """This process's idmapping user namespace (made at the first call; kept open)."""
    global _userns
    with _userns_lock:
        if _userns < 0:
            _userns = _make_userns()
        return _userns


def attach(source: str, target: str) -> None:
    """Mount ``source`` at ``target`` (an existing directory), idmapped and read-only.
    Raises KernelError (ENOSYS/EINVAL/EPERM where the kernel or the file system cannot)."""
    try:
        fd = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(_AT_FDCWD), source.encode(),
                                  ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC)), f"open_tree {source}")
        try:
            attr = struct.pack("QQQQ", MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY, 0, 0, userns_fd())
            _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), b"",
                                 ctypes.c_uint(_AT_EMPTY_PATH), attr, ctypes.c_size_t(len(attr))),
                   f"mount_setattr idmap {source}")
            _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD),
                                 target.encode(), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount {target}")
        finally:
            os.close(fd)
    except OSError as err:
        raise KernelError.from_os_error("idmapped mount", err, str(err)) from err


_supported: bool | None = None


def supported(probe_dir: str) -> bool:
    """Whether idmapped mounts work for directories on ``probe_dir``'s file system (tried
    once per process: an idmapped mount of it, then detached again)."""
    global _supported
    if _supported is None:
        target = os.path.join(probe_dir, f".idmap-probe-{os.getpid()}")
        os.makedirs(target, exist_ok=True)
        try:
            attach(probe_dir, target)
            _libc.umount2(target.encode(), 2)
            _supported = True
        except KernelError:
            _supported = False
        finally:
            os.rmdir(target)
    return _supported
