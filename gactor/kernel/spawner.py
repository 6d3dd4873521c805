"""The spawner: a single-threaded process forked before trio starts, which forks shims.

Forking from the trio process is unsafe (it has threads), and exec'ing a fresh
interpreter per container is slow, so the server forks this helper first and asks
it over a SOCK_SEQPACKET socketpair for each new shim. The spawner double-forks,
so a shim is nobody's child and survives the server; it answers at once with the
read end of a status pipe on which the shim reports ``{"shim", "init"}`` or
``{"error"}`` once the container is up.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import traceback
from dataclasses import dataclass

import setproctitle

from . import linux as L
from . import shim_wire as wire

_PR_SET_PDEATHSIG = 1


@dataclass
class SpawnerHandle:
    """The server's end: the socket (owned by the caller) and the spawner's pid."""

    sock: socket.socket
    pid: int


def fork_spawner() -> SpawnerHandle:
    """Fork the spawner. Call before any thread exists in this process."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
    # Children share our heap copy-on-write; freezing keeps the GC from touching (copying) it.
    gc.freeze()
    from .shim import shim_main

    while True:
        try:
            got = wire.recv(sock)
        except ConnectionResetError:
            got = None  # the server died: so do we (PDEATHSIG is on its way anyway)
        if got is None:
            return
        cfg, fds = got
        for fd in fds:
            os.close(fd)
        status_r, status_w = os.pipe()
        try:
            child = os.fork()
            if child == 0:
                sock.close()
                os.close(status_r)
                if os.fork() == 0:
                    shim_main(cfg, status_w)
                os._exit(0)
            os.close(status_w)
            os.waitpid(child, 0)
            wire.send(sock, {"ok": True}, [status_r])
        except Exception:  # noqa: BLE001 - keep serving; the server sees the error text
            wire.send(sock, {"ok": False, "error": traceback.format_exc(limit=2)})
        finally:
            os.close(status_r)
