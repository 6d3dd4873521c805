"""Thin ctypes wrappers for the syscalls Python 3.11's ``os`` lacks.

Each wrapper raises ``OSError`` with the real errno, like ``os`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP = 40

_SYS_PIVOT_ROOT = 155
_SYS_CAPSET = 126
_SYS_MOUNT_SETATTR = 442  # x86_64, Linux 5.12+
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def mount_setattr(target: str, attr_set: int, recursive: bool = True) -> None:
    """Set mount attributes on ``target`` (and every mount below it when ``recursive``),
    leaving the others as they are. OSError(ENOSYS) before Linux 5.12."""
    attr = struct.pack("QQQQ", attr_set, 0, 0, 0)  # struct mount_attr: set, clr, propagation, userns_fd
    flags = _AT_RECURSIVE if recursive else 0
    _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), target.encode(),
                         ctypes.c_long(flags), attr, ctypes.c_long(len(attr))), f"mount_setattr {target}")


_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429  # x86_64, Linux 5.2+
OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount tree at ``path`` (recursive), as an fd: it can be
    attached in another mount namespace with ``move_mount``."""
    return _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_long(_AT_FDCWD), path.encode(),
                                ctypes.c_uint(OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE)),
                  f"open_tree {path}")


def move_mount(tree_fd: int, target: str) -> None:
    """Attach the detached mount ``tree_fd`` at ``target`` (in this mount namespace)."""
    _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_long(tree_fd), b"", ctypes.c_long(_AT_FDCWD),
                         target.encode(), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), f"move_mount to {target}")


_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432  # x86_64, Linux 5.2+
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_FS_CLOEXEC = 1  # FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC


def fsmount(fstype: str, options: list[tuple[str, str]], attr_flags: int = 0) -> int:
    """A new ``fstype`` file system, mounted nowhere: a detached mount as an fd (attach
    it with ``move_mount``, in any mount namespace). No mount table sees it until then,
    nor any of the host's mount propagation. An error carries the file system's own
    message (what ``dmesg`` would say after a failed ``mount``)."""
    fs = _check(_libc.syscall(ctypes.c_long(_SYS_FSOPEN), fstype.encode(), ctypes.c_uint(_FS_CLOEXEC)),
                f"fsopen {fstype}")
    try:
        for key, value in options:
            _fsconfig(fs, _FSCONFIG_SET_STRING, key, value)
        _fsconfig(fs, _FSCONFIG_CMD_CREATE, None, None)
        return _check(_libc.syscall(ctypes.c_long(_SYS_FSMOUNT), ctypes.c_long(fs), ctypes.c_uint(_FS_CLOEXEC),
                                    ctypes.c_uint(attr_flags)), f"fsmount {fstype}")
    finally:
        os.close(fs)


def _fsconfig(fs: int, cmd: int, key: str | None, value: str | None) -> None:
    if _libc.syscall(ctypes.c_long(_SYS_FSCONFIG), ctypes.c_long(fs), ctypes.c_uint(cmd),
                     key.encode() if key else None, value.encode() if value is not None else None,
                     ctypes.c_int(0)) == 0:
        return
    err = ctypes.get_errno()
    detail = ""
    try:  # the file system's messages: "e overlayfs: ..." lines
        detail = os.read(fs, 4096).decode(errors="replace").strip()
    except OSError:
        pass
    what = f"fsconfig {key}" if key else "fsconfig create"
    raise OSError(err, f"{what}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, arg2: int | bytes = 0, arg3: int = 0) -> int:
    return _check(
        _libc.prctl(option, arg2, ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "prctl",
    )


def set_process_name(name: str) -> None:
    """What /proc/PID/status ``Name:`` shows (at most 15 bytes)."""
    prctl(PR_SET_NAME, name.encode()[:15])


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


_SPLICE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EXDEV)


def splice_up_to(src: int, dst: int, size: int) -> tuple[int, bool]:
    """Move up to ``size`` bytes from ``src`` to ``dst`` with splice(2), stopping early at
    end of input. Returns the bytes moved and whether splice works for this pair (False:
    the kernel refused it, nothing lost; copy the rest by read/write)."""
    moved = 0
    while moved < size:
        try:
            n = os.splice(src, dst, size - moved)
        except OSError as err:
            if err.errno not in _SPLICE_UNSUPPORTED:
                raise
            return moved, False
        if not n:
            break
        moved += n
    return moved, True


def limit_capabilities(keep: frozenset[int]) -> None:
    """Drop every capability outside ``keep`` from the bounding set, then set
    effective, permitted and inheritable to ``keep`` (capset v3)."""
    drop_bounding(keep)
    set_capabilities(keep)


def drop_bounding(keep: frozenset[int]) -> None:
    """Drop every capability outside ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(CAP_LAST_CAP + 1):
        if cap not in keep:
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError as err:
                if err.errno != 22:  # EINVAL: the kernel does not know this cap
                    raise


def set_capabilities(keep: frozenset[int]) -> None:
    """No ambient capabilities; effective, permitted and inheritable = ``keep`` (capset v3)."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    lo, hi = mask & 0xFFFFFFFF, mask >> 32
    header = struct.pack("Ii", 0x20080522, 0)
    data = struct.pack("IIIIII", lo, lo, lo, hi, hi, hi)
    hbuf = ctypes.create_string_buffer(header)
    dbuf = ctypes.create_string_buffer(data)
    _check(_libc.syscall(_SYS_CAPSET, hbuf, dbuf), "capset")


# The GIL stays held across the call: the child of a raw clone must resume in a Python
# that no other thread of the parent's could have left mid-way (the caller has none).
_pylibc = ctypes.PyDLL(None, use_errno=True)
_SYS_CLONE = 56  # x86_64
CLONE_PARENT = 0x00008000


def clone_sibling() -> int:
    """fork(2), except that the child's parent is the caller's parent (CLONE_PARENT):
    it is reaped by, and reports its exit to, the caller's parent. Returns the child's
    pid in the parent, 0 in the child. The caller must be single-threaded: none of
    fork()'s bookkeeping (Python's or glibc's atfork handlers) runs."""
    return _check(_pylibc.syscall(ctypes.c_long(_SYS_CLONE), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD),
                                  ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
                  "clone")
