"""Starting a process inside a running container (the shim's ``runc exec``).

The shim forks a helper that joins the container's cgroup and namespaces and
forks the process itself; the helper exits at once so the process is reparented
to the shim (a child subreaper), which reaps it and records its exit code. Every
failure before ``execve`` is reported through a close-on-exec pipe, so the caller
learns "started" or the exact error before the process runs.

For the common case (an unprivileged container's own processes) the shim keeps a
``Forker`` instead: one process that has joined the namespaces, cut its capability
bounding set and loaded the seccomp program once, and clones each new process with
CLONE_PARENT, so the process is the shim's child from birth, as above. A process
inherits the seccomp program (no per-process load) and skips the helper's fork, its
seven setns calls, its exit and the bounding-set drops: `run` costs ~1.5 ms less here
(docs/architecture.md, "Processes").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import importlib
import os
import resource
import signal
import socket
import struct
import sys
import termios
import traceback
from dataclasses import dataclass
from typing import Any

import msgpack
import setproctitle

from . import linux as L
from . import shim_wire as wire
from .container_init import DEFAULT_CAPS, Confinement, confine
from .users import UserNotFound, find_executable, process_env, resolve_user

RLIMITS = {
    "as_": resource.RLIMIT_AS, "core": resource.RLIMIT_CORE, "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA, "fsize": resource.RLIMIT_FSIZE, "locks": 10,  # RLIMIT_LOCKS: Linux has it, the resource module does not
    "memlock": resource.RLIMIT_MEMLOCK, "msgqueue": resource.RLIMIT_MSGQUEUE,
    "nice": resource.RLIMIT_NICE, "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
    "rss": resource.RLIMIT_RSS, "rtprio": resource.RLIMIT_RTPRIO,
    "sigpending": resource.RLIMIT_SIGPENDING, "stack": resource.RLIMIT_STACK,
}
PIPE_SIZE = 1 << 20
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ,
                  signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
_F_SETPIPE_SZ = 1031
_TIOCSPTLCK = 0x40045431  # unlock the pty slave
_TIOCGPTPEER = 0x5441  # open the slave through the master (no path lookup, Linux 4.13+)
# spec["builtin"]: code of the shim's that the process runs instead of execve (StreamIn's
# and StreamOut's tar), by the module that has its ``main(args) -> exit status``.
TAR_EXTRACT, TAR_CREATE = "tar-extract", "tar-create"
BUILTINS = {TAR_EXTRACT: "tar_in", TAR_CREATE: "tar_out"}


class SpawnError(Exception):
    """The process could not be started; ``kind`` is a Garden error type name or ""."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Stdio:
    """The shim's ends of a new process's stdio: three pipes, or one pty master.

    A pty is allocated by the process itself, inside the container (its devpts, so
    ``tty`` names it and it belongs to the container user), and its master comes back
    to the shim over ``console`` (runc's console socket) before exec.
    """

    stdin: int
    stdout: int
    stderr: int | None  # None when a tty merges stderr into stdout
    child: tuple[int, ...]  # what the process gets; closed in the shim after the fork
    console: socket.socket | None = None
    window: tuple[int, int] = (80, 24)

    @property
    def kept(self) -> list[int]:
        # A pty master is stdin and stdout at once: list each fd once.
        return list(dict.fromkeys(fd for fd in (self.stdin, self.stdout, self.stderr)
                                  if fd is not None and fd >= 0))

    def receive_console(self) -> None:
        """Take the pty master the process sent; call once it has exec'd."""
        assert self.console is not None
        self.console.setblocking(False)
        try:
            _, fds, _, _ = socket.recv_fds(self.console, 1, 1)
        except BlockingIOError:
            fds = []
        finally:
            self.console.close()
        if not fds:
            raise SpawnError("", "the process did not send its terminal")
        self.stdin = self.stdout = fds[0]


def make_stdio(tty: dict[str, int] | None) -> Stdio:
    if tty is not None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        window = (tty.get("columns") or 80, tty.get("rows") or 24)
        return Stdio(-1, -1, None, (theirs.detach(),), ours, window)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (in_r, out_w, err_w):
        # Pipes belong to host root; the process must be able to reopen them through
        # /dev/stdin and friends whatever user it runs as (runc chowns them instead).
        os.fchmod(fd, 0o666)
    for fd in (out_r, err_r):
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe only costs throughput
    return Stdio(in_w, out_r, err_r, (in_r, out_w, err_w))


def _open_terminal(stdio: Stdio, uid: int, gid: int) -> int:
    """In the container: a new pty from its devpts; the master goes to the shim. Returns the slave."""
    master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    os.fchown(slave, uid, gid)
    set_window_size(master, *stdio.window)
    console = socket.socket(fileno=stdio.child[0])
    socket.send_fds(console, [b"t"], [master])
    console.close()
    os.close(master)
    return slave


def set_window_size(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def spawn(ns_fds: dict[str, int], cgroup_procs: list[str], privileged: bool,
          spec: dict[str, Any], stdio: Stdio, conf: Confinement) -> int:
    """Start ``spec`` in the container, confined by ``conf``; return its host pid.
    Raises SpawnError."""
    if spec.get("builtin") in BUILTINS:
        # Imported here, in the shim: the forked process runs it in the container's mount
        # namespace, which has none of the server's files.
        importlib.import_module(f"{__package__}.{BUILTINS[spec['builtin']]}")
    pid_r, pid_w = os.pipe()
    err_r, err_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        gc.disable()  # a collection would walk (and so copy) the shim's heap before exec
        try:
            os.close(pid_r)
            os.close(err_r)
            _helper(ns_fds, cgroup_procs, privileged, spec, stdio, conf, pid_w, err_w)
        finally:
            os._exit(2)
    os.close(pid_w)
    os.close(err_w)
    for fd in set(stdio.child):
        os.close(fd)
    os.waitpid(helper, 0)
    with os.fdopen(pid_r, "rb") as f:
        raw_pid = f.read()
    with os.fdopen(err_r, "rb") as f:
        report = f.read()
    if report:
        if stdio.console is not None:
            stdio.console.close()
        err = msgpack.unpackb(report, raw=False)
        raise SpawnError(err.get("type", ""), err.get("message", "spawn failed"))
    if len(raw_pid) != 8:
        raise SpawnError("", "spawn failed: the helper died before forking the process")
    if stdio.console is not None:
        stdio.receive_console()
    return int(struct.unpack("q", raw_pid)[0])


def _helper(ns_fds: dict[str, int], cgroup_procs: list[str], privileged: bool,
            spec: dict[str, Any], stdio: Stdio, conf: Confinement, pid_w: int, err_w: int) -> None:
    try:
        for path in cgroup_procs:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        # rlimits need the host's privilege to raise hard limits, so set them before joining.
        for name, value in (spec.get("rlimits") or {}).items():
            if value is not None:
                # A uint64 at or above 2**63 (Go's RLIM_INFINITY is 2**64-1) is "unlimited",
                # which Python's resource module spells -1.
                limit = resource.RLIM_INFINITY if value >= 1 << 63 else value
                try:
                    resource.setrlimit(RLIMITS[name], (limit, limit))
                except (ValueError, OSError) as err:
                    raise ValueError(f"rlimit limits.{name} = {value}: {err}") from None
        if spec.get("pea_rootfs"):
            # A pea's own root is a detached mount (the server's ``rootfs.overlay_tree``,
            # ``pea_tree_fd``, brought by the spawn request): attached in the pea's own
            # mount namespace once inside the container.
            for bind in spec.get("pea_binds") or []:  # host sources, taken along the same way
                if not bind["from_container"]:
                    bind["tree_fd"] = L.open_tree_clone(bind["src"])
        if spec.get("host_exe"):
            # A tool of the server's (a static tar) that the image need not have: opened
            # here, on the host, and executed inside the container through /proc/self/fd.
            spec["host_exe_fd"] = os.open(spec["host_exe"], os.O_RDONLY)
        for fd in ns_fds.values():
            L.setns(fd)
    except Exception as err:  # noqa: BLE001 - reported, then this forked helper exits
        _report(err_w, "", f"joining container: {err}")
        return
    try:
        pid = os.fork()
    except OSError as err:
        hint = " (the container's pid limit is reached?)" if err.errno == errno.EAGAIN else ""
        _report(err_w, "", f"cannot start the process: fork: {os.strerror(err.errno or 0)}{hint}")
        return
    if pid == 0:
        os.close(pid_w)
        try:
            if "pea_tree_fd" in spec:
                _enter_pea(spec["pea_tree_fd"], spec.get("pea_binds") or [])
            _exec(spec, privileged, stdio, conf)
        except SpawnError as err:
            _report(err_w, err.kind, str(err))
        except Exception:  # noqa: BLE001
            _report(err_w, "", traceback.format_exc(limit=3))
        finally:
            os._exit(127)
    os.write(pid_w, struct.pack("q", pid))


PEA_ATTACH = "/tmp"  # where the pea's root is attached (in its own mount namespace only)
_PEA_SHARED = ("/proc", "/dev", "/sys")  # the container's, bound into the pea
_PEA_FILES = ("/etc/hosts", "/etc/resolv.conf")  # the container's, as Garden's peas get them


def _enter_pea(tree_fd: int, binds: list[dict[str, Any]]) -> None:
    """In the container's namespaces: a mount namespace of the pea's own, rooted at its
    image (``tree_fd``), with the container's /proc, /dev (but a /dev/shm of its own),
    /sys, /etc/hosts and /etc/resolv.conf. The container's own mounts are not changed."""
    L.unshare(L.CLONE_NEWNS)
    L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
    os.makedirs(PEA_ATTACH, exist_ok=True)
    L.move_mount(tree_fd, PEA_ATTACH)
    os.close(tree_fd)
    for path in _PEA_SHARED:
        target = PEA_ATTACH + path
        os.makedirs(target, exist_ok=True)
        L.mount(path, target, None, L.MS_BIND | L.MS_REC)
    # Its own /dev/shm, as each of Garden's peas gets (what it writes there is still charged
    # to the cgroup it runs in).
    L.mount("tmpfs", PEA_ATTACH + "/dev/shm", "tmpfs", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, "mode=1777")
    for path in _PEA_FILES:
        if os.path.exists(path):
            target = PEA_ATTACH + path
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                with open(target, "w"):
                    pass
            L.mount(path, target, None, L.MS_BIND)
    for bind in binds:  # the pea's own bind mounts: from the host (a tree) or the container
        source = bind["src"]
        target = PEA_ATTACH + os.path.normpath("/" + bind["dst"])
        is_dir = os.path.isdir(source) if bind["from_container"] else os.path.isdir(f"/proc/self/fd/{bind['tree_fd']}")
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                with open(target, "w"):
                    pass
        if bind["from_container"]:
            L.mount(source, target, None, L.MS_BIND | L.MS_REC)
        else:
            L.move_mount(bind["tree_fd"], target)
            os.close(bind["tree_fd"])
        if bind["ro"]:
            L.mount_setattr(target, L.MOUNT_ATTR_RDONLY)
    os.chdir(PEA_ATTACH)
    L.pivot_root(".", ".")
    L.umount(".", L.MNT_DETACH)
    os.chdir("/")


def _report(fd: int, kind: str, message: str) -> None:
    os.write(fd, msgpack.packb({"type": kind, "message": message}))


def _exec(spec: dict[str, Any], privileged: bool, stdio: Stdio, conf: Confinement | None) -> None:
    """In the container's namespaces: become the user, wire stdio, exec. Never returns.
    ``conf`` None: a Forker's child, whose seccomp program and bounding set are the
    Forker's already; only the capability sets are left to set."""
    # Ignored signals survive exec, and the shim (like every Python process) ignores some.
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    if not privileged:
        # Until now we were host root, which this user namespace does not map; become its root
        # so that files we create (the working directory) get a mapped owner.
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    user_spec = spec.get("user") or ""
    try:
        user = resolve_user(user_spec)
    except UserNotFound as err:
        raise SpawnError("", str(err)) from None
    env = process_env(spec.get("image_env") or [], spec.get("container_env") or [],
                      spec.get("env") or [], user, user_spec)
    env_map = dict(item.partition("=")[::2] for item in env)
    path = spec["path"]
    if "host_exe_fd" in spec:
        exe: str | None = f"/proc/self/fd/{spec['host_exe_fd']}"
    else:
        exe = find_executable(path, env_map.get("PATH", ""))
    if exe is None:
        if "/" in path:
            raise SpawnError("ExecutableNotFoundError", f'exec: "{path}": stat {path}: no such file or directory')
        raise SpawnError("ExecutableNotFoundError", f'exec: "{path}": executable file not found in $PATH')
    workdir = os.path.normpath(os.path.join(user.home or "/", spec.get("dir") or ""))  # relative: to the home
    if spec.get("dir_must_exist") and not os.path.isdir(workdir):
        raise SpawnError("", f"{workdir}: no such directory")
    _ensure_dir(workdir, user.uid, user.gid)

    os.setsid()
    if stdio.console is not None:
        slave = _open_terminal(stdio, user.uid, user.gid)
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        in_fd = out_fd = err_fd = slave
    else:
        in_fd, out_fd, err_fd = stdio.child
    os.dup2(in_fd, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)

    if conf is None:
        L.set_capabilities(DEFAULT_CAPS)
    else:
        confine(conf, privileged, user.uid)  # seccomp from here on: only what the program allows
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    os.chdir(workdir)
    if spec.get("builtin") in BUILTINS:
        builtin = sys.modules[f"{__package__}.{BUILTINS[spec['builtin']]}"]  # spawn() imported it
        os._exit(builtin.main(spec.get("args", [])))
    try:
        os.execve(exe, [path, *spec.get("args", [])], env_map)
    except OSError as err:
        kind = "ExecutableNotFoundError" if err.errno in (errno.ENOENT, errno.ENOEXEC) else ""
        raise SpawnError(kind, f'exec: "{path}": {os.strerror(err.errno or 0).lower()}') from None


def _ensure_dir(path: str, uid: int, gid: int) -> None:
    """Create ``path`` and missing parents, owned by the process user (Garden's default dir)."""
    missing = []
    current = path
    while current and current != "/" and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        os.chown(directory, uid, gid)


FORKER_NAME = "gactor-forker"  # its /proc/PID/status Name (a fork of the shim's would say gactor-shim)


class ForkerGone(Exception):
    """The Forker died or cannot start processes here (``for_good``); nothing was
    started, and the shim starts the process the cold way."""

    def __init__(self, message: str, for_good: bool = False) -> None:
        super().__init__(message)
        self.for_good = for_good


_CGROUP_REFUSED = "gactor:forker-cgroup"  # a report type of the Forker's child, never a Garden one


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in set(fds):
        os.close(fd)


class Forker:
    """A process of the shim's in one unprivileged container's namespaces (all seven
    joined: its children are born in the container's pid namespace) with the container's
    bounding set and seccomp program in force, that starts the container's processes.

    It is a fork of the shim made at the first ``run`` (never for a container that runs
    nothing), lives in the shim's cgroup (so it is charged nothing of the container's, and
    counts against no limit of it), and is not in the container's pid namespace (no
    process of the container can see or signal it). Each process is cloned with
    CLONE_PARENT, so the shim is its parent: reaping and exit codes are as for the
    helper's processes. A process writes itself into the container's cgroups (files the
    Forker opened as host root before joining) and then runs ``_exec``.

    Only for what needs nothing the Forker gave up (``eligible``): no pea (its mount
    namespace needs mount(2)), no builtin or host executable (host files), no rlimit above
    the shim's own hard limit (raising one needs host privilege), no pid limit (a process
    cloned outside the cgroup and moved in afterwards is not counted at its fork).
    The Forker ends when its socket closes, and with the shim (PDEATHSIG).
    """

    def __init__(self, ns_fds: dict[str, int], cgroup_procs: list[str], conf: Confinement,
                 title: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        wire.size_socket(ours)
        wire.size_socket(theirs)
        shim = os.getpid()
        pid = os.fork()
        if pid == 0:
            gc.disable()
            try:
                ours.close()
                _forker_main(theirs, shim, ns_fds, cgroup_procs, conf, title)
            finally:
                os._exit(0)
        theirs.close()
        self.pid = pid
        self.sock = ours
        try:
            got = wire.recv(ours)
        except OSError as err:
            got = None
            reason = str(err)
        else:
            reason = "it exited"
        if got is not None and got[0].get("error"):
            reason = got[0]["error"]
        if got is None or not got[0].get("ready"):
            self.close()
            raise ForkerGone(f"the forker did not start: {reason}")

    @staticmethod
    def eligible(spec: dict[str, Any], privileged: bool) -> bool:
        if privileged or spec.get("builtin") or spec.get("pea_rootfs") or spec.get("host_exe") \
                or spec.get("cgroup_procs"):
            return False
        for name, value in (spec.get("rlimits") or {}).items():
            if value is None:
                continue
            hard = resource.getrlimit(RLIMITS[name])[1] if name in RLIMITS else 0
            if hard != resource.RLIM_INFINITY and (value >= 1 << 63 or value > hard):
                return False
        return True

    def spawn(self, spec: dict[str, Any], stdio: Stdio) -> int:
        """As ``spawn``, through this Forker. Raises SpawnError, or ForkerGone (nothing
        runs, ``stdio`` is untouched: the caller may start the process another way)."""
        try:
            pid = self._spawn(spec, stdio)
        except ForkerGone:
            raise
        except BaseException:
            _close_all(stdio.child)
            raise
        _close_all(stdio.child)
        return pid

    def _spawn(self, spec: dict[str, Any], stdio: Stdio) -> int:
        err_r, err_w = os.pipe()
        try:
            try:
                window = stdio.window if stdio.console is not None else None
                wire.send(self.sock, {"spec": spec, "tty": window}, [*stdio.child, err_w], "spawn request")
            except wire.MessageTooLarge as err:
                raise SpawnError("", str(err)) from None
            except OSError as err:
                raise ForkerGone(f"sending to the forker: {err}") from None
            finally:
                os.close(err_w)
            try:
                got = wire.recv(self.sock)
            except OSError as err:
                got = None
                reason = str(err)
            else:
                reason = "it exited"
            if got is None:
                # It may have died after its clone: that process, if any, has its error
                # pipe and the shim as parent; it is reaped and, unlisted, ignored.
                raise SpawnError("", f"the container's process forker died while starting the process ({reason})")
            reply, _ = got
            if "error" in reply:
                raise SpawnError("", reply["error"])
            with os.fdopen(err_r, "rb") as f:
                err_r = -1
                report = f.read()  # EOF: the process exec'd (close-on-exec) or died
        finally:
            if err_r >= 0:
                os.close(err_r)
        if report:
            failure = msgpack.unpackb(report, raw=False)
            if failure.get("type") == _CGROUP_REFUSED:
                # A kernel that checks a cgroup.procs write against the writer's cgroup
                # namespace, not the opener's (before Linux 5.16 and its backports): the
                # process exited before anything ran; this Forker can never work here.
                raise ForkerGone(f"the kernel refused a forked process its cgroup: {failure.get('message')}",
                                 for_good=True)
            if stdio.console is not None:
                stdio.console.close()
            raise SpawnError(failure.get("type", ""), failure.get("message", "spawn failed"))
        if stdio.console is not None:
            stdio.receive_console()
        return int(reply["pid"])

    def close(self) -> None:
        """End the Forker (the shim reaps it)."""
        self.sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _forker_main(sock: socket.socket, shim: int, ns_fds: dict[str, int], cgroup_procs: list[str],
                 conf: Confinement, title: str) -> None:
    """The Forker's body (a fork of the shim); returns when the shim closes the socket."""
    signal.set_wakeup_fd(-1)
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    L.prctl(L.PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != shim:
        return
    setproctitle.setproctitle(title)
    L.set_process_name(FORKER_NAME)
    try:
        # Opened as host root before joining: the kernel checks a cgroup.procs write
        # against the opener's credentials and cgroup namespace.
        cgroup_fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup_procs]
        keep = {0, 1, 2, sock.fileno(), *cgroup_fds, *ns_fds.values()}
        for entry in os.listdir("/proc/self/fd"):  # the shim's fds: its sockets, every process's stdio
            fd = int(entry)
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in ns_fds.values():
            L.setns(fd)
            os.close(fd)
        L.drop_bounding(DEFAULT_CAPS)
        if conf.no_new_privs:
            L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
        if conf.seccomp is not None:
            conf.seccomp.load()
    except Exception as err:  # noqa: BLE001 - reported; the shim starts processes the cold way
        with contextlib.suppress(OSError):
            wire.send(sock, {"error": f"{type(err).__name__}: {err}"})
        return
    wire.send(sock, {"ready": True})
    while True:
        try:
            got = wire.recv(sock)
        except OSError:
            return
        if got is None:
            return
        msg, fds = got
        for fd in fds:
            os.set_inheritable(fd, False)
        *child_fds, err_w = fds
        try:
            pid = L.clone_sibling()
        except OSError as err:
            hint = " (the container's pid namespace has ended?)" if err.errno == errno.ENOMEM else ""
            reply: dict[str, Any] = {"error": f"cannot start the process: clone: {os.strerror(err.errno or 0)}{hint}"}
        else:
            if pid == 0:
                _forked_child(msg["spec"], msg["tty"], child_fds, err_w, cgroup_fds)
            reply = {"pid": pid}
        for fd in fds:
            os.close(fd)
        try:
            wire.send(sock, reply)
        except OSError:
            return


def _forked_child(spec: dict[str, Any], tty: list[int] | None, child_fds: list[int], err_w: int,
                  cgroup_fds: list[int]) -> None:
    """A Forker's new process: into the container's cgroups, then ``_exec``. Never returns."""
    try:
        stdio = Stdio(-1, -1, None, tuple(child_fds))
        if tty is not None:  # child_fds is the console socket (make_stdio); _exec sends the pty there
            stdio.console = socket.socket(fileno=os.dup(child_fds[0]))
            stdio.window = (tty[0], tty[1])
        try:
            for fd in cgroup_fds:
                os.write(fd, b"0")  # 0: the writer itself
        except OSError as err:
            _report(err_w, _CGROUP_REFUSED, str(err))
            return
        for name, value in (spec.get("rlimits") or {}).items():
            if value is not None:
                limit = resource.RLIM_INFINITY if value >= 1 << 63 else value
                try:
                    resource.setrlimit(RLIMITS[name], (limit, limit))
                except (ValueError, OSError) as err:
                    raise ValueError(f"rlimit limits.{name} = {value}: {err}") from None
        _exec(spec, False, stdio, None)
    except SpawnError as err:
        _report(err_w, err.kind, str(err))
    except Exception:  # noqa: BLE001
        _report(err_w, "", traceback.format_exc(limit=3))
    finally:
        os._exit(127)
