"""The per-container shim: a detached, single-threaded process that outlives the server.

It holds the container's pid 1 and namespace fds, spawns processes on request,
keeps its own copy of every stdio fd (so a dead server never SIGPIPEs a process
and a restarted one can re-attach), reaps, and records exit codes in the depot.
It listens on ``<container dir>/shim.sock``; requests and replies are
``shim_wire`` messages::

    {"op": "spawn", "rid", "id", "spec", "tty"} -> {"rid", "pid"} + stdio fds | {"rid", "error": {type, message}}
    {"op": "attach", "rid", "id"}               -> {"rid", "pid", "exit", "tty", "stdin"} + fds (stdin's only
                                                   while open; none once drained)
    {"op": "signal", "rid", "id", "signal"}     {"op": "resize", "rid", "id", "columns", "rows"}
    {"op": "close_stdin", "rid", "id"}          {"op": "drained", "rid", "id"}  (release the output fds)
    {"op": "list", "rid"}                       -> {"rid", "init", "processes": [{id, pid, exit, tty}]}
    {"op": "destroy", "rid"}                    -> kills pid 1 (so the whole pid namespace), reaps, replies, exits
    event to every connection: {"event": "exit", "id", "code"}
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import msgpack
import setproctitle

from . import linux as L
from . import shim_wire as wire
from . import shims
from .container_init import open_namespaces, start_init
from .spawn import SpawnError, Stdio, make_stdio, set_window_size, spawn


@dataclass
class Process:
    id: str
    pid: int
    stdio: Stdio
    tty: bool
    exit: int | None = None
    stdin_open: bool = True
    drained: bool = False


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def write_file_atomic(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


class Shim:
    def __init__(self, cfg: dict[str, Any], dir_fd: int) -> None:
        self.cfg = cfg
        self.dir_fd = dir_fd
        self.procs_dir = os.open("processes", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        self.init_pid = 0
        self.ns_fds: dict[str, int] = {}
        self.procs: dict[str, Process] = {}
        self.by_pid: dict[int, Process] = {}
        self.conns: set[socket.socket] = set()
        self.sel = selectors.DefaultSelector()
        self.exiting = False

    # ---- setup -------------------------------------------------------------------

    def start(self) -> None:
        self.init_pid = start_init(self.cfg)
        self.ns_fds = open_namespaces(self.init_pid, self.cfg["privileged"])
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        path = wire.socket_path(self.dir_fd, "shim.sock")
        try:
            os.unlink("shim.sock", dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(16)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda _: self._reap(wake_r))

    def serve_forever(self) -> None:
        while not self.exiting:
            for key, _ in self.sel.select():
                key.data(key.fileobj)

    # ---- connections -----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        uid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8]
        if int.from_bytes(uid, sys.byteorder) != 0:
            conn.close()  # only root may drive a shim
            return
        self.conns.add(conn)
        self.sel.register(conn, selectors.EVENT_READ, self._on_message)

    def _drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.conns.discard(conn)
        conn.close()

    def _on_message(self, conn: socket.socket) -> None:
        try:
            got = wire.recv(conn)
        except (OSError, ValueError, msgpack.UnpackException):
            got = None
        if got is None:
            self._drop(conn)
            return
        msg, fds = got
        for fd in fds:
            os.close(fd)
        rid = msg.get("rid") if isinstance(msg, dict) else None
        handler = getattr(self, f"op_{msg.get('op')}", None) if isinstance(msg, dict) else None
        try:
            if handler is None:
                raise SpawnError("", f"unknown shim op {msg!r}")
            reply, out_fds = handler(msg)
        except SpawnError as err:
            reply, out_fds = {"error": {"type": err.kind, "message": str(err)}}, []
        except Exception as err:  # noqa: BLE001 - one bad request must not take the shim down
            traceback.print_exc()
            reply, out_fds = {"error": {"type": "", "message": f"shim: {err}"}}, []
        reply["rid"] = rid
        try:
            wire.send(conn, reply, out_fds)
        except OSError:
            self._drop(conn)
        if self.exiting:
            os._exit(0)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for conn in list(self.conns):
            try:
                wire.send(conn, event)
            except OSError:
                self._drop(conn)

    # ---- operations ------------------------------------------------------------

    def _proc(self, msg: dict[str, Any]) -> Process:
        proc = self.procs.get(msg.get("id", ""))
        if proc is None:
            raise SpawnError("ProcessNotFoundError", f"unknown process: {msg.get('id')}")
        return proc

    def op_spawn(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        pid_id = msg["id"]
        if pid_id in self.procs:
            raise SpawnError("", f"process ID '{pid_id}' already in use")
        tty = msg.get("tty")
        stdio = make_stdio(tty)
        try:
            pid = spawn(self.ns_fds, self.cfg["cgroup_procs"], self.cfg["privileged"], msg["spec"], stdio)
        except BaseException:
            for fd in stdio.kept:
                os.close(fd)
            if stdio.console is not None:
                stdio.console.close()
            raise
        proc = Process(pid_id, pid, stdio, tty is not None)
        self.procs[pid_id] = proc
        self.by_pid[pid] = proc
        # No reaping here: the SIGCHLD wakeup reaps on the next turn, so the exit
        # event always follows this reply on the socket.
        return {"pid": pid}, stdio.kept

    def op_attach(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        # Never the stdin fd once close_stdin closed it: sending a closed fd fails.
        fds = [] if proc.drained else [
            fd for fd in proc.stdio.kept if fd != proc.stdio.stdin or proc.stdin_open or proc.tty]
        return {"pid": proc.pid, "exit": proc.exit, "tty": proc.tty, "stdin": proc.stdin_open}, fds

    def op_signal(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        if proc.exit is None:  # not yet reaped, so the pid cannot have been reused
            os.kill(proc.pid, int(msg["signal"]))
        return {}, []

    def op_resize(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        if proc.tty and not proc.drained:
            set_window_size(proc.stdio.stdout, int(msg["columns"]) or 80, int(msg["rows"]) or 24)
        return {}, []

    def op_close_stdin(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        if proc.stdin_open and not proc.tty:
            os.close(proc.stdio.stdin)
            proc.stdin_open = False
        return {}, []

    def op_drained(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        if proc.exit is not None and not proc.drained:
            proc.drained = True
            for fd in proc.stdio.kept:
                if fd != proc.stdio.stdin or proc.stdin_open or proc.tty:
                    os.close(fd)
            proc.stdin_open = False
        return {}, []

    def op_list(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        procs = [{"id": p.id, "pid": p.pid, "exit": p.exit, "tty": p.tty} for p in self.procs.values()]
        return {"init": self.init_pid, "processes": procs}, []

    def op_destroy(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        # Killing pid 1 makes the kernel SIGKILL every process in the pid namespace.
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in self.procs.values():
            if proc.exit is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self._record(pid, status)
        self.exiting = True
        return {}, []

    # ---- reaping ---------------------------------------------------------------

    def _reap(self, wake_fd: int | None) -> None:
        if wake_fd is not None:
            try:
                while os.read(wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._record(pid, status)

    def _record(self, pid: int, status: int) -> None:
        proc = self.by_pid.pop(pid, None)
        if proc is None:
            return
        proc.exit = exit_code(status)
        write_file_atomic(self.procs_dir, proc.id, b"%d" % proc.exit)
        self._broadcast({"event": "exit", "id": proc.id, "code": proc.exit})


def shim_main(cfg: dict[str, Any], status_fd: int) -> None:
    """Entry point in the freshly forked shim; never returns."""
    try:
        os.setsid()
        dir_fd = os.open(cfg["dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        log = os.open("shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        keep = {0, 1, 2, status_fd, dir_fd}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        L.set_child_subreaper()
        # Forked from the server, we would show its command line; say what we are instead.
        setproctitle.setproctitle(shims.title(cfg["dir"]))
        L.set_process_name("gactor-shim")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if not _exists(dir_fd, "processes"):
            os.mkdir("processes", 0o700, dir_fd=dir_fd)
        shim = Shim(cfg, dir_fd)
        shim.start()
        write_file_atomic(dir_fd, "shim.pid", b"%d" % os.getpid())
        write_file_atomic(dir_fd, "init.pid", b"%d" % shim.init_pid)
        os.write(status_fd, msgpack.packb({"shim": os.getpid(), "init": shim.init_pid}))
        os.close(status_fd)
    except BaseException as err:  # noqa: BLE001
        traceback.print_exc()
        try:
            os.write(status_fd, msgpack.packb({"error": str(err) or type(err).__name__}))
        finally:
            os._exit(1)
    try:
        shim.serve_forever()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    os._exit(0)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
