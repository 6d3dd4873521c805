"""The spawner: a single-threaded process forked before trio starts, which forks shims.

Forking from the trio process is unsafe (it has threads), and exec'ing a fresh
interpreter per container is slow, so the server forks this helper first and asks
it over a SOCK_SEQPACKET socketpair for each new shim. The spawner double-forks,
so a shim is nobody's child and survives the server.

The exchange, one message each way, matched by ``rid``::

    {"rid", "cfg"} -> {"rid", "ok": True, "shim": pid} + [status socket, shim pidfd]
                    | {"rid", "ok": False, "error": text}

The spawner answers as soon as the shim is forked (or handed the cfg). The status
socket is the server's end of a SEQPACKET pair whose other end the shim holds: the shim
sends ``{"netns": true}`` + the container's network namespace fd as soon as it exists,
then reports ``{"shim", "init"}`` or ``{"error"}`` once the container is up, then waits
for one byte, ``COMMIT``. Only then does it serve; if instead the socket closes (the
request was cancelled, the server died), the shim kills its pid 1 and exits. So a
shim nobody took over never outlives its request. The pidfd lets the server wait for
(or kill) that shim without racing pid reuse.

Warm shims: the spawner keeps ``warm`` shims forked ahead of time (``shim.warm_main``),
each waiting on its status socket for ``{"cfg", "nice"}``; a request takes one (the
server gets that status socket, exactly as from a fresh fork) and the pool is refilled
once no request has come for ``REFILL_IDLE``, at nice +``REFILL_NICE``. A warm shim exits
when its socket closes, so the pool ends with the spawner.
"""

from __future__ import annotations

import functools
import gc
import os
import select
import signal
import socket
import struct
import traceback
from dataclasses import dataclass
from typing import Any

import setproctitle

from . import linux as L
from . import shim_wire as wire
from .container_init import Confinement, confinement

_PR_SET_PDEATHSIG = 1
COMMIT = b"k"  # the server took the shim over


@dataclass
class SpawnerHandle:
    """The server's end: the socket (owned by the caller) and the spawner's pid."""

    sock: socket.socket
    pid: int


WARM_SHIMS = 2  # shims forked ahead of time, waiting for a container
REFILL_IDLE = 0.01  # seconds without a request before the pool gets its next warm shim
REFILL_NICE = 10  # how much nicer than the spawner warm shims are made (and wait)


def fork_spawner(conf: Confinement | None = None, warm: int = WARM_SHIMS) -> SpawnerHandle:
    """Fork the spawner, whose shims confine their containers with ``conf`` (default:
    ``container_init.confinement()``, built here) and which keeps ``warm`` shims forked
    ahead of time. Call before any thread exists in this process."""
    if conf is None:
        conf = confinement()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wire.size_socket(ours)
    wire.size_socket(theirs)
    gc.collect()
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            _serve(theirs, conf, warm)
        except BaseException:  # noqa: BLE001 - never unwind into the server's code
            traceback.print_exc()
        finally:
            os._exit(0)
    theirs.close()
    return SpawnerHandle(ours, pid)


@dataclass
class _Warm:
    """A warm shim: our end of its status socket and its pidfd (both ours to close)."""

    pid: int
    sock: socket.socket
    pidfd: int

    def close(self) -> None:
        self.sock.close()  # the shim sees the socket close and exits
        os.close(self.pidfd)


def _serve(sock: socket.socket, conf: Confinement, warm: int) -> None:
    L.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    setproctitle.setproctitle("gactor-spawner")
    L.set_process_name("gactor-spawner")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Children share our heap copy-on-write; freezing keeps the GC from touching (copying) it.
    gc.freeze()
    from .shim import shim_main, warm_main

    cold = functools.partial(shim_main, conf=conf)
    pool: list[_Warm] = []
    while True:
        _refill(sock, pool, warm, functools.partial(warm_main, conf=conf, spawner=os.getpid()))
        try:
            got = wire.recv(sock)
        except OSError:
            got = None  # the server died: so do we (PDEATHSIG is on its way anyway)
        except ValueError:
            traceback.print_exc()  # a garbled request has no rid to answer; its caller times out
            continue
        if got is None:
            return  # our ends of the warm shims' sockets close with us: they exit
        msg, fds = got
        rid = msg.get("rid") if isinstance(msg, dict) else None
        out_fds: list[int] = []
        try:
            if not isinstance(msg, dict) or not isinstance(msg.get("cfg"), dict):
                raise ValueError(f"bad spawner request {msg!r:.200}")
            cfg = msg["cfg"]
            # The rootfs tree (a detached mount) rides on the request: the shim gets it
            # by inheritance (a cold fork) or with the hand-over, and gives it to pid 1.
            cfg.pop("rootfs_fd", None)
            if fds:
                cfg["rootfs_fd"] = fds[0]
            shim_pid, out_fds = _hand_over(pool, cfg) or _fork_shim(sock, functools.partial(cold, cfg))
            reply: dict[str, Any] = {"rid": rid, "ok": True, "shim": shim_pid}
        except Exception:  # noqa: BLE001 - keep serving; the server sees the error text
            reply = {"rid": rid, "ok": False, "error": traceback.format_exc(limit=2)}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            wire.send(sock, reply, out_fds, "spawner reply")
        except (BrokenPipeError, ConnectionResetError):
            return
        except OSError:
            traceback.print_exc()  # the shim sees its status socket close, and gives up
        finally:
            for fd in out_fds:
                os.close(fd)


def _refill(sock: socket.socket, pool: list[_Warm], size: int, warm_main: Any) -> None:
    """Fork warm shims until the pool holds ``size``, while no request waits: the first at
    once, each further one only after ``REFILL_IDLE`` seconds without a request, so
    refilling stays off the path of a burst of creates."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while len(pool) < size:
        if poller.poll(0 if not pool else REFILL_IDLE * 1000):
            return
        # Refilling is background work: at a lower priority it yields the CPU to the
        # creates and destroys running meanwhile (measured: both faster than at the
        # server's). The forked processes inherit it; a warm shim given a container puts
        # itself and its pid 1 back at the server's priority (``shim.warm_main``).
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, nice + REFILL_NICE)
        try:
            pid, (status, pidfd) = _fork_shim(sock, warm_main)
        except Exception:  # noqa: BLE001 - no warm shim: requests fork their own
            traceback.print_exc()
            return
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        pool.append(_Warm(pid, socket.socket(fileno=status), pidfd))


def _hand_over(pool: list[_Warm], cfg: dict[str, Any]) -> tuple[int, list[int]] | None:
    """Give ``cfg`` to a live warm shim; its pid and [status socket, pidfd] (the caller
    closes them), or None when the pool has none."""
    while pool:
        shim = pool.pop(0)
        try:
            tree = cfg.get("rootfs_fd")
            wire.send(shim.sock, {"cfg": cfg, "nice": os.getpriority(os.PRIO_PROCESS, 0)},
                      [tree] if tree is not None else [], what="the container's shim config")
        except OSError:
            shim.close()  # it died waiting (killed by someone): try the next
            continue
        except BaseException:
            shim.close()
            raise
        return shim.pid, [shim.sock.detach(), shim.pidfd]
    return None


def _fork_shim(sock: socket.socket, main: Any) -> tuple[int, list[int]]:
    """Double-fork a shim running ``main(status fd)``; return its pid and [status socket,
    pidfd] (the caller closes them).

    The middle process stays until we hold the shim's pidfd: while it lives and has not
    reaped the shim, the shim's pid cannot name another process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wire.size_socket(ours)
    wire.size_socket(theirs)
    hold_parent, hold_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        middle = os.fork()
        if middle == 0:
            try:
                sock.close()
                ours.close()
                hold_parent.close()
                shim = os.fork()
                if shim == 0:
                    hold_child.close()
                    main(theirs.detach())
                theirs.close()
                hold_child.sendall(struct.pack("q", shim))
                hold_child.recv(1)  # until the spawner has the pidfd (or died)
            finally:
                os._exit(0)
        theirs.close()
        hold_child.close()
        try:
            raw = b""
            while len(raw) < 8 and (chunk := hold_parent.recv(8 - len(raw))):
                raw += chunk
            if len(raw) != 8:
                raise RuntimeError("the spawner's middle process died before forking the shim")
            shim_pid = int(struct.unpack("q", raw)[0])
            pidfd = os.pidfd_open(shim_pid)
        finally:
            hold_parent.close()
            os.waitpid(middle, 0)
        return shim_pid, [ours.detach(), pidfd]
    except BaseException:
        ours.close()
        theirs.close()
        hold_child.close()
        hold_parent.close()
        raise
