"""The spawner: a single-threaded process forked before trio starts, which forks shims.

Forking from the trio process is unsafe (it has threads), and exec'ing a fresh
interpreter per container is slow, so the server forks this helper first and asks
it over a SOCK_SEQPACKET socketpair for each new shim. A shim is the spawner's
child (the spawner reaps it when it exits); it has no parent-death signal, so it
survives the spawner and the server (the spawner dies with the server) and is then
reparented.

The exchange, one message each way, matched by ``rid``::

    {"rid", "cfg"} -> {"rid", "ok": True, "shim": pid} + [status socket, shim pidfd]
                    | {"rid", "ok": False, "error": text}

The spawner answers as soon as the shim is forked. The status socket is the server's
end of a SEQPACKET pair whose other end the shim holds: the shim reports
``{"shim", "init"}`` or ``{"error"}`` on it once the container is up, then waits for
one byte, ``COMMIT``. Only then does it serve; if instead the socket closes (the
request was cancelled, the server died), the shim kills its pid 1 and exits. So a
shim nobody took over never outlives its request. The pidfd lets the server wait for
(or kill) that shim without racing pid reuse.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import traceback
from dataclasses import dataclass
from typing import Any

import setproctitle

from . import linux as L
from . import shim_wire as wire

_PR_SET_PDEATHSIG = 1
COMMIT = b"k"  # the server took the shim over


@dataclass
class SpawnerHandle:
    """The server's end: the socket (owned by the caller) and the spawner's pid."""

    sock: socket.socket
    pid: int


def fork_spawner() -> SpawnerHandle:
    """Fork the spawner. Call before any thread exists in this process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wire.size_socket(ours)
    wire.size_socket(theirs)
    gc.collect()
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            _serve(theirs)
        except BaseException:  # noqa: BLE001 - never unwind into the server's code
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    return SpawnerHandle(ours, pid)


def _serve(sock: socket.socket) -> None:
    L.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    setproctitle.setproctitle("gactor-spawner")
    L.set_process_name("gactor-spawner")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Children share our heap copy-on-write; freezing keeps the GC from touching (copying) it.
    gc.freeze()
    from .shim import shim_main

    # Shims are our children: a SIGCHLD wakes the loop below to reap them. The wakeup fd
    # (not reaping in a handler) keeps reaping out of the window between fork and pidfd_open.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap()
        if sock not in readable:
            continue
        try:
            got = wire.recv(sock)
        except OSError:
            got = None  # the server died: so do we (PDEATHSIG is on its way anyway)
        except ValueError:
            traceback.print_exc()  # a garbled request has no rid to answer; its caller times out
            continue
        if got is None:
            return
        msg, fds = got
        for fd in fds:
            os.close(fd)
        rid = msg.get("rid") if isinstance(msg, dict) else None
        out_fds: list[int] = []
        try:
            if not isinstance(msg, dict) or not isinstance(msg.get("cfg"), dict):
                raise ValueError(f"bad spawner request {msg!r:.200}")
            shim_pid, out_fds = _fork_shim(msg["cfg"], sock, shim_main)
            reply: dict[str, Any] = {"rid": rid, "ok": True, "shim": shim_pid}
        except Exception:  # noqa: BLE001 - keep serving; the server sees the error text
            reply = {"rid": rid, "ok": False, "error": traceback.format_exc(limit=2)}
        try:
            wire.send(sock, reply, out_fds, "spawner reply")
        except (BrokenPipeError, ConnectionResetError):
            return
        except OSError:
            traceback.print_exc()  # the shim sees its status socket close, and gives up
        finally:
            for fd in out_fds:
                os.close(fd)


def _fork_shim(cfg: dict[str, Any], sock: socket.socket, shim_main: Any) -> tuple[int, list[int]]:
    """Fork a shim; return its pid and [status socket, pidfd] (the caller closes them).

    The shim is our child and we reap it only in ``_reap`` (at the top of the serving
    loop), so its pid cannot name another process before ``pidfd_open`` below. A single
    fork: a double fork (a middle process, so the shim is nobody's child) cost about
    4 ms more per create, two forks and an exit of a process this size."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        shim = os.fork()
        if shim == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim reaps its own children
                sock.close()
                ours.close()
                shim_main(cfg, theirs.detach())
            finally:
                os._exit(1)
        theirs.close()
        pidfd = os.pidfd_open(shim)
        return shim, [ours.detach(), pidfd]
    except BaseException:
        ours.close()
        theirs.close()
        raise


def _reap() -> None:
    """Reap every shim that has exited (the server watches them through their pidfds)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
