"""Building a container: namespaces, uid map, rootfs mounts and pid 1.

Runs only in processes forked from a shim (single-threaded, no trio). The shim
calls ``start_init``; it returns once pid 1 has pivoted into the rootfs and is
idling as ``garden-init``, or raises ``OSError``/``RuntimeError`` with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import glob
import os
import re
import signal
import socket
import stat
import struct
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import setproctitle

from . import linux as L
from . import seccomp
from .seccomp import Program

# Garden's unprivileged set (SECURITY_BASELINE.md), mask 0xa80425fb.
DEFAULT_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
CAP_SYS_ADMIN = 21
MAX_UID = 4294967294
UID_MAP = f"0 {MAX_UID} 1\n1 1 {MAX_UID - 1}\n"

# The order setns joins them: user first (the rest are owned by it), mnt last.
NAMESPACES = ("user", "ipc", "uts", "net", "pid", "cgroup", "mnt")
CAP_NAMES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio "
    "sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time "
    "sys_tty_config mknod lease audit_write audit_control setfcap mac_override mac_admin syslog "
    "wake_alarm block_suspend audit_read perfmon bpf checkpoint_restore").split()

MASKED_FILES = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/sched_debug", "/proc/scsi", "/proc/timer_list",
                "/proc/timer_stats", "/sys/devices/virtual/powercap", "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}


@dataclass(frozen=True)
class CgroupMount:
    """A cgroup hierarchy of the host: where it is mounted, its type and (v1) the
    options naming it (its controllers, or ``name=...``)."""

    path: str
    fstype: str
    options: str


@dataclass(frozen=True)
class Confinement:
    """How containers' processes are confined: decided once by the server (``confinement()``)
    before it forks the spawner, so every shim holds the same immutable copy.

    ``seccomp`` is the program of unprivileged containers (None: none, for measurements
    only); ``privileged_caps`` what privileged root gets (every capability the server's own
    bounding set has); ``no_new_privs`` sets PR_SET_NO_NEW_PRIVS for unprivileged processes
    (off by default, as in Garden: it would break setuid binaries); ``cgroup_mounts`` are the
    host's cgroup hierarchies, mounted read-only in unprivileged containers where the
    container has a cgroup of its own."""

    seccomp: Program | None
    privileged_caps: frozenset[int]
    no_new_privs: bool = False
    cgroup_mounts: tuple[CgroupMount, ...] = ()

    @property
    def missing_privileged_caps(self) -> list[str]:
        """Names of the kernel's capabilities privileged root will not get."""
        return [f"CAP_{CAP_NAMES[c].upper()}" if c < len(CAP_NAMES) else str(c)
                for c in range(_cap_last_cap() + 1) if c not in self.privileged_caps]


def _cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def host_cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[CgroupMount, ...]:
    """Every cgroup hierarchy mounted on the host (the first mount of each)."""
    found: dict[str, CgroupMount] = {}
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            names = ",".join(o for o in fields[sep + 3].split(",") if fstype == "cgroup"
                             and (o.startswith("name=") or o in _V1_CONTROLLERS))
            found.setdefault(f"{fstype}:{names}", CgroupMount(_unescape(fields[4]), fstype, names))
    return tuple(found.values())


_V1_CONTROLLERS = frozenset(
    "cpu cpuacct cpuset memory devices freezer blkio pids net_cls net_prio perf_event "
    "hugetlb rdma misc".split())


def confinement(seccomp_on: bool = True, no_new_privs: bool = False) -> Confinement:
    """This host's confinement (see ``Confinement``). Builds the seccomp program (about
    0.1 s); raises SeccompError when libseccomp is missing."""
    with open("/proc/self/status") as f:
        bounding = int(next(line.split()[1] for line in f if line.startswith("CapBnd:")), 16)
    caps = frozenset(c for c in range(_cap_last_cap() + 1) if bounding >> c & 1)
    return Confinement(seccomp.build() if seccomp_on else None, caps, no_new_privs, host_cgroup_mounts())


_LOCKED = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC | L.MS_RDONLY
_ATIME = ((os.ST_NOATIME, L.MS_NOATIME), (os.ST_NODIRATIME, L.MS_NODIRATIME), (os.ST_RELATIME, L.MS_RELATIME))


class PreparedInit:
    """Pid 1 forked ahead of time (by a warm shim) for one unprivileged container: in a
    fresh user namespace (uid map written), UTS, IPC, network and pid namespace of its
    own, with the container's /proc, /sys and /dev made ahead as detached mounts
    (``_staged``), waiting for the container's cfg. The mount and cgroup namespaces come
    only then (they need the container's rootfs and cgroups).
    Nothing has used these namespaces: they are as fresh as ones made at create. The owner (a child subreaper,
    which pid 1 is reparented to) calls ``start_init`` with it, or ``discard``; if the
    owner dies, pid 1 sees its pipe close and exits, and its namespaces with it."""

    def __init__(self, conf: Confinement) -> None:
        helper, to_child_w, from_child_r = _fork_child(_prepared_helper, conf)
        self.pid = 0
        self.reports = os.fdopen(from_child_r, "rb", buffering=0)
        self.go = os.fdopen(to_child_w, "wb", buffering=0)
        self.unpacker = msgpack.Unpacker(self.reports, raw=False)
        try:
            try:
                if next(self.unpacker, None) != "map":
                    raise RuntimeError("the prepared helper failed before its uid map")
                _write_id_maps(helper)
                self.go.write(b"g")
                msg = next(self.unpacker, None)
                if not isinstance(msg, dict) or not isinstance(msg.get("init"), int):
                    raise RuntimeError(f"preparing namespaces failed: {msg.get('error') if isinstance(msg, dict) else msg}")
                self.pid = msg["init"]
            except BaseException:
                with contextlib.suppress(OSError):
                    os.kill(helper, signal.SIGKILL)
                raise
            finally:
                os.waitpid(helper, 0)  # pid 1 is ours from here on
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """End pid 1 (and so its namespaces) and reap it, unless ``start_init`` has taken
        it (its pid must not be signalled once someone may have reaped it)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self.close()
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = 0

    def close(self) -> None:
        self.reports.close()
        self.go.close()


def _write_id_maps(pid: int) -> None:
    for kind in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{kind}", "w") as f:
            f.write(UID_MAP)


def start_init(cfg: dict[str, Any], conf: Confinement, on_netns: Callable[[int], None] | None = None,
               prepared: PreparedInit | None = None) -> int:
    """Create the container's namespaces and its pid 1; return pid 1's host pid.

    ``cfg`` keys: rootfs, hostname, privileged, cgroup_procs, bind_mounts
    ([{src, dst, ro}]), hosts_file, resolv.conf_file; optional rootfs_fd, a detached
    mount pid 1 attaches at rootfs (else rootfs must be mounted there already). The caller (the shim) must be a child
    subreaper so pid 1 is reparented to it when the forking helper exits. ``on_netns(pid)``
    is called as soon as the container's network namespace exists, as that of ``pid``
    (alive and unreaped during the call), while pid 1 is still to build its root; an
    exception from it ends the container and propagates. ``prepared`` (taken over: used
    or discarded here) saves making the namespaces an unprivileged container starts with.
    """
    if prepared is not None and cfg["privileged"]:
        prepared.discard()  # made for an unprivileged container
        prepared = None
    if prepared is not None:
        return _start_prepared(cfg, prepared, on_netns)
    helper, to_child_w, from_child_r = _fork_child(_helper, cfg, conf)
    try:
        with os.fdopen(from_child_r, "rb", buffering=0) as reports, os.fdopen(to_child_w, "wb", buffering=0) as go:
            init_pid, ready = 0, False
            # The helper and pid 1 share the report pipe, so "init" and "ready" may come in either order.
            for msg in msgpack.Unpacker(reports, raw=False):
                if msg == "map":
                    _write_id_maps(helper)
                    go.write(b"g")
                elif msg == "ready":
                    ready = True
                elif isinstance(msg, dict) and "init" in msg:
                    init_pid = int(msg["init"])
                    if on_netns is not None:
                        try:
                            on_netns(init_pid)
                        except BaseException:
                            _end_init(helper, init_pid)
                            raise
                else:
                    raise RuntimeError(f"container init failed: {msg.get('error') if isinstance(msg, dict) else msg}")
                if init_pid and ready:
                    return init_pid
            raise RuntimeError("container init failed: it exited before it was ready")
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(helper, 0)


def _start_prepared(cfg: dict[str, Any], prepared: PreparedInit, on_netns: Callable[[int], None] | None) -> int:
    """``start_init`` with a prepared pid 1: into the container's cgroups (written from
    here, the host's root: it cannot from its user namespace), the cfg, then its report."""
    init_pid = prepared.pid
    try:
        with prepared.reports, prepared.go:
            if on_netns is not None:
                on_netns(init_pid)
            for path in cfg["cgroup_procs"]:
                with open(path, "w") as f:
                    f.write(str(init_pid))
            tree = cfg.get("rootfs_fd")
            go = socket.socket(fileno=prepared.go.fileno())
            try:
                socket.send_fds(go, [msgpack.packb(cfg)], [tree] if tree is not None else [])
            finally:
                go.detach()
            msg = next(prepared.unpacker, None)
            if msg != "ready":
                raise RuntimeError("container init failed: "
                                   f"{msg.get('error') if isinstance(msg, dict) else msg or 'it exited before it was ready'}")
    except BaseException:
        prepared.discard()
        raise
    prepared.pid = 0  # taken: the container's pid 1 now
    return init_pid


def _end_init(helper: int, init_pid: int) -> None:
    """SIGKILL pid 1 and reap it: it is ours (a child subreaper's) once the helper is gone."""
    with contextlib.suppress(OSError):
        os.kill(init_pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(helper, 0)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(init_pid, 0)


def _fork_child(fn: Any, *args: Any) -> tuple[int, int, int]:
    """Fork a child running ``fn(*args, to_child_r, from_child_w)`` (``_run_child``);
    returns its pid and our ends of the two channels: the one to it (a stream socket, so
    the rootfs tree can go to a prepared pid 1 with its cfg) and its report pipe."""
    to_child_r, to_child_w = (s.detach() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
    from_child_r, from_child_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(to_child_w)
        os.close(from_child_r)
        _run_child(fn, *args, to_child_r, from_child_w)
    os.close(to_child_r)
    os.close(from_child_w)
    return helper, to_child_w, from_child_r


def _run_child(fn: Any, *args: Any) -> None:
    """Run ``fn`` in a forked child and never return; errors go to the report pipe."""
    report_fd = args[-1]
    # A collection would walk (and so copy) the shim's heap; these children live briefly.
    gc.disable()
    try:
        fn(*args)
        os._exit(0)
    except BaseException as err:  # noqa: BLE001 - a forked child must never unwind into the parent's code
        try:
            detail = f"{err}" if isinstance(err, OSError | RuntimeError) else traceback.format_exc()
            os.write(report_fd, msgpack.packb({"error": detail}))
        finally:
            os._exit(1)


def _helper(cfg: dict[str, Any], conf: Confinement, go_fd: int, report_fd: int) -> None:
    for path in cfg["cgroup_procs"]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    # Joined its cgroups above, so the new cgroup namespace has them as its root.
    flags = (L.CLONE_NEWNS | L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET | L.CLONE_NEWPID
             | L.CLONE_NEWCGROUP)
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
        _run_child(_init, cfg, conf, report_fd)
    os.write(report_fd, msgpack.packb({"init": init}))


def _prepared_helper(conf: Confinement, go_fd: int, report_fd: int) -> None:
    """The namespaces that need no cfg, then pid 1 (``_prepared_init``), and exit."""
    L.unshare(L.CLONE_NEWUSER)
    os.write(report_fd, msgpack.packb("map"))
    if os.read(go_fd, 1) != b"g":
        raise RuntimeError("shim went away before writing the uid map")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    L.unshare(L.CLONE_NEWUTS | L.CLONE_NEWIPC | L.CLONE_NEWNET | L.CLONE_NEWPID)
    init = os.fork()
    if init == 0:
        _run_child(_prepared_init, conf, go_fd, report_fd)
    os.write(report_fd, msgpack.packb({"init": init}))


def _prepared_init(conf: Confinement, go_fd: int, report_fd: int) -> None:
    """A prepared pid 1: the container's /proc, /sys and /dev made ahead (``_staged``),
    then it waits for the cfg, which comes once the shim has moved it into the
    container's cgroups; then the mount and cgroup namespaces and ``_init``."""
    staged = _staged()
    cfg, tree = _receive_cfg(go_fd)
    if not isinstance(cfg, dict):
        os._exit(0)  # the shim is gone (or gave up on us): so are these namespaces
    if tree is not None:
        cfg["rootfs_fd"] = tree
    # The mount namespace only now: a copy of the host's as it is at the create (bind
    # mount sources mounted since the warm-up included, on hosts without propagation too).
    # In the container's cgroups now, so the new cgroup namespace has them as its root.
    L.unshare(L.CLONE_NEWNS | L.CLONE_NEWCGROUP)
    _init(cfg, conf, report_fd, staged)


_STAGED = ("/proc", "/sys", "/dev")
_STAGE = "/tmp"  # in a throwaway mount namespace


def _staged() -> list[int]:
    """/proc, /sys and /dev as the container gets them (``_stage``), made by a child of a
    prepared pid 1 in a throwaway mount namespace and handed back as detached mount
    trees, which pid 1 attaches once its root is built: none needs anything of the
    container but its pid and network namespaces, which exist. Empty if that failed:
    ``_setup_rootfs`` then makes them itself."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        try:
            ours.close()
            L.unshare(L.CLONE_NEWNS)
            L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
            L.mount("tmpfs", _STAGE, "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=700,size=64k")
            _stage(_STAGE, privileged=False)
            socket.send_fds(theirs, [b"s"], [L.open_tree_clone(_STAGE + path) for path in _STAGED])
        except BaseException:  # noqa: BLE001 - said (the server's log), then pid 1 makes them itself
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, len(_STAGED))
    except OSError:
        fds = []
    finally:
        ours.close()
        os.waitpid(child, 0)
    if len(fds) == len(_STAGED):
        return fds
    for fd in fds:
        os.close(fd)
    return []


def _receive_cfg(go_fd: int) -> tuple[Any, int | None]:
    """The cfg a prepared pid 1 waits for, and the rootfs tree fd riding on it if any;
    (None, None) if the shim closed the socket first."""
    sock = socket.socket(fileno=go_fd)
    unpacker = msgpack.Unpacker(raw=False)
    tree: int | None = None
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
            if fds:
                tree = fds[0]
            if not data:
                return None, tree
            unpacker.feed(data)
            for cfg in unpacker:
                return cfg, tree
    finally:
        sock.detach()


def _init(cfg: dict[str, Any], conf: Confinement, report_fd: int, staged: Sequence[int] = ()) -> None:
    """Pid 1: build the rootfs (with ``staged`` trees, ``_staged``), report ready, then
    become garden-init (or reap in Python)."""
    init_fd = -1
    if cfg.get("init_binary"):
        init_fd = os.open(cfg["init_binary"], os.O_RDONLY)  # reachable after pivot_root only this way
    _setup_rootfs(cfg, conf, staged)
    socket.sethostname(cfg["hostname"])
    _loopback_up()
    confine(conf, cfg["privileged"], 0)
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


def confine(conf: Confinement, privileged: bool, uid: int) -> None:
    """Seccomp, no_new_privs and capabilities for a process of the container that will run
    as ``uid``, while it is still (container) root; all that may follow is setgroups,
    setresgid/setresuid, chdir and execve, which the seccomp program allows.

    Unprivileged: the program is loaded first, while the process still holds
    CAP_SYS_ADMIN in its user namespace (so no_new_privs is not needed), then the
    capabilities shrink to Garden's 14 (a non-root uid loses the effective and permitted
    ones at setuid). Privileged root: every capability the server has, inheritable too;
    a privileged non-root user: the 14 plus CAP_SYS_ADMIN as a ceiling, as in Garden."""
    if not privileged:
        if conf.no_new_privs:
            L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        if conf.seccomp is not None:
            conf.seccomp.load()
        L.limit_capabilities(DEFAULT_CAPS)
    elif uid != 0:
        L.limit_capabilities(DEFAULT_CAPS | {CAP_SYS_ADMIN})
    else:
        L.limit_capabilities(conf.privileged_caps)


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
    try:
        # One call for the whole subtree, and it keeps the flags it is not given (the
        # fallback's locked-flag dance is the kernel's job here). Cheaper than parsing
        # mountinfo, which before pivot_root lists every mount of the host.
        L.mount_setattr(target, L.MOUNT_ATTR_RDONLY)
        return
    except OSError as err:
        if err.errno != errno.ENOSYS:
            raise
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


def _mount_cgroups(root: str, cfg: dict[str, Any], conf: Confinement) -> None:
    """Read-only cgroup filesystems at /sys/fs/cgroup, one per host hierarchy the container
    has a cgroup of its own in (in the others its namespace root would be the host's).
    Fresh mounts in the container's cgroup namespace, so each shows its cgroup as the root."""
    own = [m for m in conf.cgroup_mounts
           if any(p.startswith(m.path.rstrip("/") + "/") for p in cfg["cgroup_procs"])]
    if not own:
        return
    nse = L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
    if len(own) == 1 and own[0].fstype == "cgroup2":
        _mount_at(root, "/sys/fs/cgroup", "cgroup2", "cgroup2", nse | L.MS_RDONLY)
        return
    top = _mount_at(root, "/sys/fs/cgroup", "tmpfs", "tmpfs", nse, "mode=755")
    names = {os.path.basename(m.path.rstrip("/")) for m in own}
    for m in own:
        name = os.path.basename(m.path.rstrip("/"))
        _mount_at(root, f"/sys/fs/cgroup/{name}", "cgroup", m.fstype, nse | L.MS_RDONLY, m.options or None)
        # Co-mounted controllers (cpu,cpuacct on many hosts) get a link per controller, as runc makes.
        for controller in m.options.split(","):
            if "," in m.options and controller not in names and not controller.startswith("name="):
                os.symlink(name, f"{top}/{controller}")
                names.add(controller)
    L.mount("", top, None, L.MS_REMOUNT | L.MS_RDONLY | nse, "mode=755")


def _setup_rootfs(cfg: dict[str, Any], conf: Confinement, staged: Sequence[int] = ()) -> None:
    root = cfg["rootfs"]
    L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
    tree = cfg.get("rootfs_fd")
    if tree is not None:
        # The overlay, made detached by the server (``rootfs.overlay_tree``): it joins
        # this mount namespace only, never the host's.
        L.move_mount(tree, root)
        os.close(tree)
    else:
        L.mount(root, root, None, L.MS_BIND | L.MS_REC)
    if staged:
        for path, staged_tree in zip(_STAGED, staged, strict=True):  # each with its submounts
            target = in_root(root, path)
            os.makedirs(target, exist_ok=True)
            L.move_mount(staged_tree, target)
            os.close(staged_tree)
    else:
        _stage(root, cfg["privileged"])
    if not cfg["privileged"]:
        _mount_cgroups(root, cfg, conf)  # none in privileged ones, as in Garden
    for name in ("hosts", "resolv.conf"):
        if cfg.get(f"{name}_file"):
            _mount_at(root, f"/etc/{name}", cfg[f"{name}_file"], None, L.MS_BIND, is_file=True)
    binds = cfg.get("bind_mounts", ())
    for bm in binds:
        src = _bind_source(root, bm)
        target = _mount_at(root, bm["dst"], src, None, L.MS_BIND | L.MS_REC, is_file=not os.path.isdir(src))
        if bm.get("ro"):
            _remount_ro(target)
    if any(bm["dst"].startswith(("/proc", "/sys")) for bm in binds):
        _mask(root)  # what a bind mount there may have uncovered is masked again
    os.chdir(root)
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")


def _stage(root: str, privileged: bool) -> None:
    """/proc, /sys and /dev under ``root``: the container's rootfs, or a prepared pid 1's
    stage (``_staged``)."""
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
    if privileged:
        # Garden gives privileged containers FUSE; host root may make the node itself.
        os.mknod(f"{root}/dev/fuse", 0o666 | stat.S_IFCHR, os.makedev(10, 229))
        os.chmod(f"{root}/dev/fuse", 0o666)
    _mount_at(root, "/dev/pts", "devpts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620,gid=5")
    _mount_at(root, "/dev/shm", "tmpfs", "tmpfs", nse, "mode=1777")
    _mount_at(root, "/dev/mqueue", "mqueue", "mqueue", nse)
    _mask(root)


def _mask(root: str) -> None:
    """Docker's masked paths (files under /dev/null, directories under an empty read-only
    tmpfs) and read-only paths, in /proc and /sys under ``root``."""
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
