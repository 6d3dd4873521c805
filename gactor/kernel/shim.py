"""The per-container shim: a detached, single-threaded process that outlives the server.

It holds the container's pid 1 and namespace fds, spawns processes on request,
keeps its own copy of every stdio fd (so a dead server never SIGPIPEs a process
and a restarted one can re-attach), reaps, and records exit codes in the depot.
It listens on ``<container dir>/shim.sock``; requests and replies are
``shim_wire`` messages::

    {"op": "spawn", "rid", "id", "spec", "tty"} -> {"rid", "pid"} + stdio fds | {"rid", "error": {type, message}}
    {"op": "attach", "rid", "id"}               -> {"rid", "pid", "exit", "tty", "stdin", "fds": [names]} + fds
    {"op": "signal", "rid", "id", "signal"}     {"op": "resize", "rid", "id", "columns", "rows"}
    {"op": "close_stdin", "rid", "id"}          {"op": "drained", "rid", "id"}  (release the output fds)
    {"op": "list", "rid", "after"?, "limit"?}   -> {"rid", "init", "processes": [{id, pid, exit, tty}], "next"}
    {"op": "netns", "rid"}                      -> {"rid"} + the container's network namespace fd
    {"op": "destroy", "rid"}                    -> kills pid 1 (so the whole pid namespace), reaps, replies, exits
    event to every connection: {"event": "exit", "id", "code"}

``attach`` sends only the fds the shim still holds, in the order ``"fds"`` names them
(``stdin``, ``stdout``, ``stderr``; a tty's one master is ``stdout``): none once drained,
no ``stdin`` once it was closed. ``list`` is paged: entries come in the order the
processes were spawned; ``next`` is the cursor to pass as ``after`` for the following
page, or None after the last one. A page holds at most ``LIST_PAGE`` entries and stays
well under ``shim_wire.MAX_MESSAGE``.

History is bounded: a process is *collected* once it has exited and the server has
released its output (``drained``); only the newest ``KEEP_COLLECTED`` collected
processes are kept (their exit codes stay readable through ``attach``), older ones are
forgotten, exit code file in ``processes/`` included.

No single failure ends the shim: an exception in a request handler becomes an error
reply; one while reaping or recording an exit (ENOSPC, EROFS on the exit code file)
or in any other callback is logged to ``shim.log`` and the shim keeps serving (the exit
code is still kept in memory and sent as an event). A reply that cannot be sent (too
large, a bad fd) is answered with an error reply instead; only a broken connection is
dropped.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
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
from .container_init import Confinement, PreparedInit, open_namespaces, start_init
from .spawn import Forker, ForkerGone, SpawnError, Stdio, make_stdio, set_window_size, spawn
from .spawner import COMMIT

KEEP_COLLECTED = wire.KEEP_COLLECTED
LIST_PAGE = 500  # entries per ``list`` reply at most
RECEIVED_FDS = "_fds"  # the key under which a handler finds its request's fds (no wire field starts with _)
_LIST_PAGE_BYTES = wire.MAX_MESSAGE // 4  # and at most this many encoded bytes of entries
_CONNECTION_ERRORS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


@dataclass
class Process:
    id: str
    seq: int  # spawn order, the ``list`` cursor
    pid: int
    stdio: Stdio
    tty: bool
    exit: int | None = None
    stdin_open: bool = True
    drained: bool = False

    def held_fds(self) -> tuple[list[str], list[int]]:
        """Names and numbers of the stdio fds the shim still holds, for ``attach``."""
        if self.drained:
            return [], []
        if self.tty:
            return ["stdout"], [self.stdio.stdout]
        held = [("stdin", self.stdio.stdin)] if self.stdin_open else []
        held.append(("stdout", self.stdio.stdout))
        if self.stdio.stderr is not None:
            held.append(("stderr", self.stdio.stderr))
        return [name for name, _ in held], [fd for _, fd in held]


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def write_file_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in ``dir_fd`` via a temporary file and a rename; raises OSError
    (after removing the temporary file) if any step fails."""
    tmp = f".{name}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _say(what: str) -> None:
    print(f"gactor-shim: {what}", file=sys.stderr, flush=True)


def _log(what: str) -> None:
    """A traceback of the exception being handled, to shim.log (our stderr)."""
    print(f"gactor-shim: {what}:", file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()


class Shim:
    def __init__(self, cfg: dict[str, Any], dir_fd: int, conf: Confinement | None = None) -> None:
        self.cfg = cfg
        self.conf = conf
        self.dir_fd = dir_fd
        self.procs_dir = os.open("processes", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        self.init_pid = 0
        self.ns_fds: dict[str, int] = {}
        self.procs: dict[str, Process] = {}  # in spawn order (seq ascending)
        self.by_pid: dict[int, Process] = {}
        self.collected: dict[str, None] = {}  # ids of exited-and-drained processes, oldest first
        self.seq = 0
        self.conns: set[socket.socket] = set()
        self.sel = selectors.DefaultSelector()
        self.exiting = False
        self.forker: Forker | None = None  # made at the first process it can start
        self.forker_unusable = ""  # why this container's processes start the cold way, once known

    # ---- setup -------------------------------------------------------------------

    def _confinement(self) -> Confinement:
        # Only a Shim built for bookkeeping tests has none; one that runs containers must.
        if self.conf is None:
            raise RuntimeError("this shim has no confinement: it cannot start processes")
        return self.conf

    def start(self, status_fd: int | None = None, prepared: PreparedInit | None = None) -> None:
        """Build the container (from ``prepared`` namespaces, if given: taken over). With
        ``status_fd``, its network namespace goes there as ``{"netns": true}`` + the fd as
        soon as it exists, before the container is up."""

        def send_netns(pid: int) -> None:
            if status_fd is None:
                return
            netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            status = socket.socket(fileno=status_fd)
            try:
                socket.send_fds(status, [msgpack.packb({"netns": True})], [netns])
            finally:
                status.detach()
                os.close(netns)

        self.init_pid = start_init(self.cfg, self._confinement(), send_netns, prepared)
        tree = self.cfg.pop("rootfs_fd", None)
        if tree is not None:
            os.close(tree)  # pid 1 has attached it: the mount is its namespace's now
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
                try:
                    key.data(key.fileobj)
                except Exception:  # noqa: BLE001 - one failing callback must not end the shim
                    _log(f"callback {getattr(key.data, '__name__', key.data)} failed")

    # ---- connections -----------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        wire.size_socket(conn)
        uid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[4:8]
        if int.from_bytes(uid, sys.byteorder) != 0:
            conn.close()  # only root may drive a shim
            return
        self.conns.add(conn)
        self.sel.register(conn, selectors.EVENT_READ, self._on_message)

    def _drop(self, conn: socket.socket) -> None:
        if conn not in self.conns:
            return  # already dropped (a failed event send while handling its request)
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
        rid = msg.get("rid") if isinstance(msg, dict) else None
        try:
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise SpawnError("", f"bad shim request {msg!r:.200}")
            handler = getattr(self, f"op_{msg['op']}", None)
            if handler is None:
                raise SpawnError("", f"unknown shim op {msg['op']!r:.100}")
            msg[RECEIVED_FDS] = fds  # lent to the handler: closed below, whatever it did
            reply, out_fds = handler(msg)
        except SpawnError as err:
            reply, out_fds = {"error": {"type": err.kind, "message": str(err)}}, []
        except Exception as err:  # noqa: BLE001 - one bad request must not take the shim down
            _log(f"op {msg.get('op') if isinstance(msg, dict) else msg!r:.100} failed")
            reply, out_fds = {"error": {"type": "", "message": f"shim: {type(err).__name__}: {err}"}}, []
        finally:
            for fd in fds:
                os.close(fd)
        reply["rid"] = rid
        self._reply(conn, reply, out_fds)
        if self.exiting:
            os._exit(0)

    def _reply(self, conn: socket.socket, reply: dict[str, Any], fds: list[int]) -> None:
        """Send ``reply``; if it cannot go (too large, a bad fd), send an error reply
        naming why instead. Only a broken connection is dropped."""
        if conn not in self.conns:
            return
        try:
            wire.send(conn, reply, fds, "shim reply")
            return
        except wire.MessageTooLarge as err:
            reason: Exception = err
        except OSError as err:
            if err.errno in _CONNECTION_ERRORS:
                self._drop(conn)
                return
            _log("sending a reply failed")
            reason = err
        error = {"rid": reply.get("rid"), "error": {"type": "", "message": f"shim: cannot send the reply: {reason}"}}
        try:
            wire.send(conn, error)
        except (OSError, ValueError):
            self._drop(conn)

    def _broadcast(self, event: dict[str, Any]) -> None:
        for conn in list(self.conns):
            try:
                wire.send(conn, event, what="shim event")
            except OSError:
                self._drop(conn)
            except ValueError:
                _log(f"sending {event.get('event')!r}")

    # ---- operations ------------------------------------------------------------

    def _proc(self, msg: dict[str, Any]) -> Process:
        proc_id = msg.get("id")
        proc = self.procs.get(proc_id) if isinstance(proc_id, str) else None
        if proc is None:
            raise SpawnError("ProcessNotFoundError", f"unknown process: {msg.get('id')}")
        return proc

    def op_spawn(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        pid_id = msg["id"]
        if not isinstance(pid_id, str) or not isinstance(msg.get("spec"), dict):
            raise SpawnError("", "spawn needs a process id (a string) and a spec (a map)")
        if pid_id in self.procs:
            raise SpawnError("", f"process ID '{pid_id}' already in use")
        tty = msg.get("tty")
        if msg["spec"].get("pea_rootfs"):
            trees = msg.get(RECEIVED_FDS) or []
            if len(trees) != 1:
                raise SpawnError("", f"a pea's spawn brings its root as one fd, not {len(trees)}")
            msg["spec"]["pea_tree_fd"] = trees[0]  # inherited by the forked helper
        stdio = make_stdio(tty)
        try:
            pid = 0
            forker = self._forker(msg["spec"])
            if forker is not None:
                try:
                    pid = forker.spawn(msg["spec"], stdio)
                except ForkerGone as err:  # nothing was started: the cold way
                    _say(f"{err}; starting the process without the forker")
                    self._drop_forker()
                    if err.for_good:
                        self.forker_unusable = str(err)
            if not pid:
                # A pea with limits of its own runs in its own cgroup (the server made it).
                procs = msg["spec"].get("cgroup_procs") or self.cfg["cgroup_procs"]
                pid = spawn(self.ns_fds, procs, self.cfg["privileged"], msg["spec"], stdio,
                            self._confinement())
        except BaseException:
            for fd in stdio.kept:
                os.close(fd)
            if stdio.console is not None:
                stdio.console.close()
            raise
        self.seq += 1
        proc = Process(pid_id, self.seq, pid, stdio, tty is not None)
        self.procs[pid_id] = proc
        self.by_pid[pid] = proc
        # No reaping here: the SIGCHLD wakeup reaps on the next turn, so the exit
        # event always follows this reply on the socket.
        return {"pid": pid}, stdio.kept

    def _forker(self, spec: dict[str, Any]) -> Forker | None:
        """This container's Forker, if it can start ``spec`` (made on first use)."""
        if self.forker_unusable or not Forker.eligible(spec, self.cfg["privileged"]):
            return None
        if self.forker is None:
            if limited := _pid_limited(self.cfg["cgroup_procs"]):
                self.forker_unusable = f"a pid limit ({limited})"
                return None
            try:
                self.forker = Forker(self.ns_fds, self.cfg["cgroup_procs"], self._confinement(),
                                     shims.forker_title(self.cfg["dir"]))
            except (ForkerGone, OSError) as err:
                self.forker_unusable = str(err)
                _log(f"no forker: {err}")
                return None
        return self.forker

    def _drop_forker(self) -> None:
        if self.forker is not None:
            self.forker.close()
            self.forker = None

    def op_attach(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        proc = self._proc(msg)
        names, fds = proc.held_fds()
        return {"pid": proc.pid, "exit": proc.exit, "tty": proc.tty, "stdin": proc.stdin_open, "fds": names}, fds

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
            self._collected(proc)
        return {}, []

    def _collected(self, proc: Process) -> None:
        """Remember ``proc`` as collected; forget the oldest beyond KEEP_COLLECTED."""
        self.collected[proc.id] = None
        while len(self.collected) > KEEP_COLLECTED:
            old_id = next(iter(self.collected))
            del self.collected[old_id]
            self.procs.pop(old_id, None)
            try:
                os.unlink(old_id, dir_fd=self.procs_dir)
            except FileNotFoundError:
                pass
            except OSError:
                _log(f"removing the exit code file of {old_id!r}")

    def op_list(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        after = msg.get("after", 0)
        limit = msg.get("limit", LIST_PAGE)
        if not isinstance(after, int) or not isinstance(limit, int) or limit < 1:
            raise SpawnError("", "list: after and limit must be integers (limit at least 1)")
        limit = min(limit, LIST_PAGE)
        procs = list(self.procs.values())  # seq ascending
        start = bisect.bisect_right(procs, after, key=lambda p: p.seq)
        page: list[dict[str, Any]] = []
        size, last = 0, after
        for proc in procs[start:]:
            entry = {"id": proc.id, "pid": proc.pid, "exit": proc.exit, "tty": proc.tty}
            size += len(msgpack.packb(entry, use_bin_type=True))
            if page and (len(page) >= limit or size > _LIST_PAGE_BYTES):
                break
            page.append(entry)
            last = proc.seq
        more = bool(page) and start + len(page) < len(procs)
        return {"init": self.init_pid, "processes": page, "next": last if more else None}, []

    def op_netns(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        # The server configures the container's network through this fd: never through
        # /proc/<pid 1>, whose pid could name another process once pid 1 has died.
        return {}, [self.ns_fds["net"]]

    def op_destroy(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        self._drop_forker()  # a child of ours too: the wait below would never end
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
            if self.forker is not None and pid == self.forker.pid:
                _say(f"the process forker ended (status {status}); the next process starts a new one")
                self.forker.sock.close()
                self.forker = None
            return
        proc.exit = exit_code(status)
        try:
            write_file_atomic(self.procs_dir, proc.id, b"%d" % proc.exit)
        except OSError:
            # The exit code stays in memory (attach, list, the event below); only the
            # copy on disk is missing.
            _log(f"recording the exit code of {proc.id!r}")
        self._broadcast({"event": "exit", "id": proc.id, "code": proc.exit})


def _pid_limited(cgroup_procs: list[str]) -> str:
    """The container's pid limit ("pids.max = N"), or "" when it has none."""
    for procs in cgroup_procs:
        try:
            with open(os.path.join(os.path.dirname(procs), "pids.max")) as f:
                value = f.read().strip()
        except FileNotFoundError:
            continue
        if value != "max":
            return f"pids.max = {value}"
    return ""


def warm_main(status_fd: int, conf: Confinement, spawner: int = 0) -> None:
    """Entry point of a warm shim, forked ahead of time by the spawner; never returns.

    It does what every shim does before it knows its container (a session of its own,
    every inherited fd but stdio and ``status_fd`` closed, child subreaper, signals),
    prepares pid 1 in fresh namespaces (``PreparedInit``; without it the container starts
    as from a cold shim), then waits on ``status_fd`` for the one message ``{"cfg",
    "nice"}`` naming its container, and goes on as ``shim_main``. Until then it has made no
    mount or cgroup entry and its namespaces have served nothing, so nothing of one
    container can reach another: each warm shim serves one container. If the socket closes
    first (the spawner died, with the server), it ends pid 1 and exits."""
    try:
        _detach(status_fd)
        setproctitle.setproctitle(warm_title(spawner))
        L.set_process_name(WARM_NAME)
        prepared: PreparedInit | None = None
        try:
            prepared = PreparedInit(conf)
        except Exception:  # noqa: BLE001 - the container's start makes its namespaces itself
            traceback.print_exc()
        status = socket.socket(fileno=status_fd)
        try:
            got = wire.recv(status)
        finally:
            status.detach()
    except BaseException:  # noqa: BLE001 - never unwind into the spawner's code
        traceback.print_exc()
        os._exit(1)
    if got is None or not isinstance(got[0], dict) or not isinstance(got[0].get("cfg"), dict):
        if prepared is not None:
            prepared.discard()
        os._exit(0)  # the spawner is gone (or garbled the hand-over): nobody waits for us
    cfg = got[0]["cfg"]
    fds = list(got[1])
    if cfg.get("rootfs_fd") is not None:
        cfg["rootfs_fd"] = fds.pop(0) if fds else None  # the spawner's number is not ours
    for fd in fds:
        os.close(fd)
    # Made at the spawner's refill priority: the container's shim and pid 1 run at the server's.
    nice = got[0].get("nice", 0)
    with contextlib.suppress(OSError, TypeError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        if prepared is not None:
            os.setpriority(os.PRIO_PROCESS, prepared.pid, nice)
    shim_main(cfg, status_fd, conf, detached=True, prepared=prepared)


WARM_NAME = "gactor-warm"


def warm_title(spawner: int) -> str:
    """The title of a warm shim of spawner ``spawner`` (and of its prepared pid 1), which
    no depot's reconcile mistakes for a container's shim (``shims.PREFIX``)."""
    return f"gactor-warm-shim (spawner {spawner})"


def _detach(status_fd: int, *more: int) -> None:
    """Leave the spawner's session and fds behind: keep only stdio, ``status_fd`` and ``more``."""
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stderr stays the spawner's (the server's log) until the shim has its own
    keep = {0, 1, 2, status_fd, *more}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    L.set_child_subreaper()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def shim_main(cfg: dict[str, Any], status_fd: int, conf: Confinement, detached: bool = False,
              prepared: PreparedInit | None = None) -> None:
    """Entry point in the freshly forked shim (or a warm one given its ``cfg``, which has
    ``detached`` already and may bring ``prepared`` namespaces); never returns.

    ``status_fd`` is the shim's end of the spawner's status socket: the report goes
    there, then the shim waits for ``COMMIT``. Without it (the socket closed: the request
    was cancelled or the server died) the shim kills its pid 1 and exits, leaving only
    files in the container directory, which belongs to the caller."""
    shim: Shim | None = None
    try:
        if not detached:
            _detach(status_fd, *([cfg["rootfs_fd"]] if cfg.get("rootfs_fd") is not None else []))
        dir_fd = os.open(cfg["dir"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        log = os.open("shim.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # Forked from the server, we would show its command line; say what we are instead.
        setproctitle.setproctitle(shims.title(cfg["dir"]))
        L.set_process_name("gactor-shim")
        if not _exists(dir_fd, "processes"):
            os.mkdir("processes", 0o700, dir_fd=dir_fd)
        shim = Shim(cfg, dir_fd, conf)
        shim.start(status_fd, prepared)
        prepared = None  # taken over
        os.write(status_fd, msgpack.packb({"shim": os.getpid(), "init": shim.init_pid}))
        if os.read(status_fd, 1) != COMMIT:
            _give_up(shim, dir_fd)
    except BaseException as err:  # noqa: BLE001
        traceback.print_exc()
        try:
            os.write(status_fd, msgpack.packb({"error": str(err) or type(err).__name__}))
        except OSError:
            pass
        finally:
            if shim is not None and shim.init_pid:
                _kill_init(shim.init_pid)
            if prepared is not None:
                prepared.discard()
            os._exit(1)
    os.close(status_fd)
    for name, pid in (("shim.pid", os.getpid()), ("init.pid", shim.init_pid)):
        try:
            write_file_atomic(dir_fd, name, b"%d" % pid)
        except OSError:
            _log(f"writing {name}")  # only for people looking at the depot
    try:
        shim.serve_forever()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    os._exit(0)


def _give_up(shim: Shim, dir_fd: int) -> None:
    """Nobody took this shim over: end its container's pid 1 and exit. Never returns."""
    print("gactor-shim: the server gave up on this container before it was up; exiting", file=sys.stderr)
    sys.stderr.flush()
    _kill_init(shim.init_pid)
    with contextlib.suppress(OSError):
        os.unlink("shim.sock", dir_fd=dir_fd)
    os._exit(1)


def _kill_init(init_pid: int) -> None:
    """SIGKILL pid 1 (and with it its whole pid namespace) and reap it."""
    with contextlib.suppress(OSError):
        os.kill(init_pid, signal.SIGKILL)
        os.waitpid(init_pid, 0)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
