"""Building a container: namespaces, uid map, rootfs mounts and pid 1.

Runs only in processes forked from a shim (single-threaded, no trio). The shim
calls ``start_init``; it returns once pid 1 has pivoted into the rootfs and is
idling as ``garden-init``, or raises ``OSError``/``RuntimeError`` with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import signal
import socket
import struct
import traceback
from typing import Any

import msgpack
import setproctitle

from . import linux as L

# Garden's unprivileged set (SECURITY_BASELINE.md), mask 0xa80425fb.
DEFAULT_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
CAP_SYS_ADMIN = 21
MAX_UID = 4294967294
UID_MAP = f"0 {MAX_UID} 1\n1 1 {MAX_UID - 1}\n"

NAMESPACES = ("user", "ipc", "uts", "net", "pid", "mnt")

MASKED_FILES = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
                "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

_LOCKED = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC | L.MS_RDONLY
_ATIME = ((os.ST_NOATIME, L.MS_NOATIME), (os.ST_NODIRATIME, L.MS_NODIRATIME), (os.ST_RELATIME, L.MS_RELATIME))


def start_init(cfg: dict[str, Any]) -> int:
    """Create the container's namespaces and its pid 1; return pid 1's host pid.

    ``cfg`` keys: rootfs, hostname, privileged, cgroup_procs, bind_mounts
    ([{src, dst, ro}]), hosts_file, resolv.conf_file. The caller (the shim) must be a child
    subreaper so pid 1 is reparented to it when the forking helper exits.
    """
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(to_child_w)
        os.close(from_child_r)
        _run_child(_helper, cfg, to_child_r, from_child_w)
    os.close(to_child_r)
    os.close(from_child_w)
    try:
        with os.fdopen(from_child_r, "rb", buffering=0) as reports, os.fdopen(to_child_w, "wb", buffering=0) as go:
            init_pid, ready = 0, False
            # The helper and pid 1 share the report pipe, so "init" and "ready" may come in either order.
            for msg in msgpack.Unpacker(reports, raw=False):
                if msg == "map":
                    for kind in ("uid_map", "gid_map"):
                        with open(f"/proc/{helper}/{kind}", "w") as f:
                            f.write(UID_MAP)
                    go.write(b"g")
                elif msg == "ready":
                    ready = True
                elif isinstance(msg, dict) and "init" in msg:
                    init_pid = int(msg["init"])
                else:
                    raise RuntimeError(f"container init failed: {msg.get('error') if isinstance(msg, dict) else msg}")
                if init_pid and ready:
                    return init_pid
            raise RuntimeError("container init failed: it exited before it was ready")
    finally:
        os.waitpid(helper, 0)


def _run_child(fn: Any, *args: Any) -> None:
    """Run ``fn`` in a forked child and never return; errors go to the report pipe."""
    report_fd = args[-1]
    try:
        fn(*args)
        os._exit(0)
    except BaseException as err:  # noqa: BLE001 - a forked child must never unwind into the parent's code
        try:
            detail = f"{err}" if isinstance(err, OSError | RuntimeError) else traceback.format_exc()
            os.write(report_fd, msgpack.packb({"error": detail}))
        finally:
            os._exit(1)


def _helper(cfg: dict[str, Any], go_fd: int, report_fd: int) -> None:
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    flags = L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET | L.CLONE_NEWPID
    if not cfg["privileged"]:
        L.unshare(L.CLONE_NEWUSER)
        os.write(report_fd, msgpack.packb("map"))
        if os.read(go_fd, 1) != b"g":
            raise RuntimeError("shim went away before writing the uid map")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    L.unshare(flags)
    init = os.fork()
    if init == 0:
        _run_child(_init, cfg, report_fd)
    os.write(report_fd, msgpack.packb({"init": init}))


def _init(cfg: dict[str, Any], report_fd: int) -> None:
    """Pid 1: build the rootfs, report ready, then become garden-init (or reap in Python)."""
    init_fd = -1
    if cfg.get("init_binary"):
        init_fd = os.open(cfg["init_binary"], os.O_RDONLY)  # reachable after pivot_root only this way
    _setup_rootfs(cfg)
    socket.sethostname(cfg["hostname"])
    _loopback_up()
    if not cfg["privileged"]:
        L.limit_capabilities(DEFAULT_CAPS)
    setproctitle.setproctitle("garden-init")
    L.set_process_name("garden-init")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # Orphans of the container are reparented to pid 1; ignoring SIGCHLD reaps them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.write(report_fd, msgpack.packb("ready"))
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd != init_fd:
            with contextlib.suppress(OSError):
                os.close(fd)
    if init_fd >= 0:
        with contextlib.suppress(OSError):
            os.execve(f"/proc/self/fd/{init_fd}", ["garden-init"], {})
    while True:
        signal.pause()


def _mount_at(root: str, rel: str, source: str, fstype: str | None, flags: int = 0,
              data: str | None = None, is_file: bool = False) -> str:
    target = in_root(root, rel)
    if is_file:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    else:
        os.makedirs(target, exist_ok=True)
    L.mount(source, target, fstype, flags, data)
    return target


def _remount_ro(target: str) -> None:
    """Make the bind mount at ``target`` and every mount below it read-only: a remount
    changes one mount, and a recursive bind brings the source's submounts along."""
    top = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for point in dict.fromkeys(p for p in points if p == top or p.startswith(top.rstrip("/") + "/")):
        # In a user namespace a remount must keep the flags the kernel locked on the
        # source: nosuid, nodev, noexec, rdonly (same bits in statvfs) and the atime mode.
        flags = os.statvfs(point).f_flag
        keep = flags & _LOCKED
        for st_flag, ms_flag in _ATIME:
            if flags & st_flag:
                keep |= ms_flag
        if not flags & (os.ST_NOATIME | os.ST_RELATIME):
            keep |= L.MS_STRICTATIME
        L.mount("", point, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | keep)


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _bind_source(root: str, bm: dict[str, Any]) -> str:
    """Where a bind mount's source is, from pid 1 (still on the host's root): a
    container-origin source is looked up in the rootfs, its symlinks resolved there."""
    src = in_root(root, bm["src"]) if bm.get("from_container") else bm["src"]
    if not os.path.exists(src):
        where = "in the container" if bm.get("from_container") else "on the host"
        raise RuntimeError(f"bind mount source {bm['src']!r} does not exist {where}")
    return src


def in_root(root: str, path: str) -> str:
    """``path`` of the container as a host path under ``root``, following symlinks the
    way the container will see them (an absolute link restarts at ``root``, ``..`` stops
    there). Before pivot_root a plain ``root + path`` would follow an image's ``/x -> /``
    onto the host's root. Nothing runs in the container yet, so nothing races this."""
    parts = path.split("/")
    resolved, hops = root, 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = os.path.dirname(resolved) if resolved != root else root
            continue
        candidate = os.path.join(resolved, part)
        if not os.path.islink(candidate):
            resolved = candidate
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, f"{path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = root
        parts = target.split("/") + parts
    return resolved


def _setup_rootfs(cfg: dict[str, Any]) -> None:
    root = cfg["rootfs"]
    L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
    L.mount(root, root, None, L.MS_BIND | L.MS_REC)
    nse = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
    _mount_at(root, "/proc", "proc", "proc", nse)
    _mount_at(root, "/sys", "sysfs", "sysfs", nse | L.MS_RDONLY)
    _mount_at(root, "/dev", "tmpfs", "tmpfs", L.MS_NOSUID | L.MS_STRICTATIME, "mode=755,size=65536k")
    for dev in DEVICES:
        _mount_at(root, f"/dev/{dev}", f"/dev/{dev}", None, L.MS_BIND, is_file=True)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    if os.path.exists("/proc/kcore"):
        os.symlink("/proc/kcore", f"{root}/dev/core")
    _mount_at(root, "/dev/pts", "devpts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620,gid=5")
    _mount_at(root, "/dev/shm", "tmpfs", "tmpfs", nse, "mode=1777")
    _mount_at(root, "/dev/mqueue", "mqueue", "mqueue", nse)
    for name in ("hosts", "resolv.conf"):
        if cfg.get(f"{name}_file"):
            _mount_at(root, f"/etc/{name}", cfg[f"{name}_file"], None, L.MS_BIND, is_file=True)
    for bm in cfg.get("bind_mounts", ()):
        src = _bind_source(root, bm)
        target = _mount_at(root, bm["dst"], src, None, L.MS_BIND | L.MS_REC, is_file=not os.path.isdir(src))
        if bm.get("ro"):
            _remount_ro(target)
    # Docker masks each CPU's thermal_throttle too (GHSA-6fw5-f8r9-fgfm).
    throttles = sorted(glob.glob(f"{root}/sys/devices/system/cpu/cpu*/thermal_throttle"))
    for target in [root + path for path in MASKED_FILES] + throttles:
        if os.path.isdir(target):
            L.mount("tmpfs", target, "tmpfs", L.MS_RDONLY, "size=0")
        elif os.path.exists(target):
            L.mount("/dev/null", target, None, L.MS_BIND)
    for path in READONLY_PATHS:
        target = root + path
        if os.path.exists(target):
            L.mount(target, target, None, L.MS_BIND | L.MS_REC)
            _remount_ro(target)
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def open_namespaces(init_pid: int, privileged: bool) -> dict[str, int]:
    """File descriptors of pid 1's namespaces, in the order ``setns`` must join them."""
    names = NAMESPACES[1:] if privileged else NAMESPACES
    return {name: os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in names}
