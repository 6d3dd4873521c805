"""Asking the spawner (``gactor.kernel.spawner``) for a new shim, from trio.

Cancellation safety. Requests carry an id (``rid``) and the spawner answers each with
the same id, so a reply is never taken by another request. The send and its reply
form one short exchange (the spawner answers after handing the cfg to a warm shim, or
after two forks) that runs shielded, with a deadline (``SPAWNER_REPLY_TIMEOUT``); a
reply left over from a request that timed out is recognised by its id and discarded,
which (closing its status socket) makes its shim give up.

Pipelining. Up to ``SPAWNER_IN_FLIGHT`` requests are outstanding at once, so the spawner
finds the next request waiting as it finishes one. With one exchange at a time it found
none (the reply had still to reach the event loop, the next request to be sent), took
the idle moment for a warm-pool refill at nice +10 and made the queued request wait for
that fork: 10-50 ms a create in a burst of 50, which made the burst slower than forking
cold. One task at a time reads the socket, for everyone (leader and followers, no task of
its own): it hands each reply to its request's slot, and when its own reply is in, wakes
a request still waiting to read on.

After the reply the shim is started but not yet taken over: it reports on its status
socket, then waits for ``COMMIT``. A request that fails or is cancelled before sending
``COMMIT`` closes that socket, so the shim kills its container's pid 1 and exits, and
waits (shielded, at most ``ABANDON_TIMEOUT``, then SIGKILL through the pidfd) until the
shim is gone. Sending ``COMMIT`` and returning involve no checkpoint, so a started
container is either handed to the caller or not started at all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from ..errors import GardenError
from ..kernel import shim_wire as wire
from ..kernel.spawner import COMMIT

SPAWNER_REPLY_TIMEOUT = 10.0  # seconds for the spawner to fork a shim and answer
SPAWNER_IN_FLIGHT = 8  # requests sent and not yet answered, at most (the rest wait to send)
ABANDON_TIMEOUT = 10.0  # seconds for a shim nobody took over to end its pid 1 and exit
_REPORT_LIMIT = 64 << 10


@dataclass
class _Slot:
    """One outstanding request: its reply once the reader has it; ``wake`` is set when the
    reply is in, or when the reading is handed to this request."""

    reply: tuple[dict[str, Any], list[int]] | None = None
    wake: trio.Event = field(default_factory=trio.Event)


class SpawnerClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()  # one sendmsg at a time
        self._in_flight = trio.Semaphore(SPAWNER_IN_FLIGHT)
        self._pending: dict[int, _Slot] = {}  # rid -> slot, of the requests still waiting
        self._reader: _Slot | None = None  # the request reading the socket for everyone
        self._rids = itertools.count(1)
        self._gone = False

    async def start_shim(self, cfg: dict[str, Any], on_netns: Callable[[int], None] | None = None,
                         rootfs_tree: int | None = None) -> dict[str, Any]:
        """Start a shim for ``cfg``; return its report ``{"shim", "init"}`` once the container is up.

        ``rootfs_tree``, a detached mount (``rootfs.overlay_tree``; the caller keeps and
        closes its fd), goes with the request: pid 1 attaches it at ``cfg["rootfs"]``.

        The caller owns the shim from the return on (it serves on ``<dir>/shim.sock``).
        ``on_netns(fd)`` is called (with no checkpoint between the fd's arrival and the
        call) as soon as the container's network namespace exists, while its pid 1 still
        builds its root: the caller owns that fd from then on, whatever happens next.
        Raises GardenError if the spawner or the shim fails. If cancelled (or on any
        error), the shim of this request, if one was forked, has exited and killed its
        pid 1 before this returns (bounded by ``ABANDON_TIMEOUT``; past it the shim is
        SIGKILLed, and a pid 1 it had started is left to the caller's cgroup cleanup);
        only files it wrote in ``cfg["dir"]`` stay. Cancellation is honoured after the
        spawner's reply, at most ``SPAWNER_REPLY_TIMEOUT`` later.
        """
        status_sock, pidfd = await self._fork(cfg, rootfs_tree)
        try:
            try:
                while True:
                    report, fds = await _receive_report(status_sock)
                    try:
                        status = msgpack.unpackb(report, raw=False) if report else {"error": "the shim died while starting"}
                    except (ValueError, msgpack.UnpackException):
                        status = {"error": f"garbled shim report {report[:200]!r}"}
                    if isinstance(status, dict) and status.get("netns") and len(fds) == 1:
                        if on_netns is None:
                            os.close(fds[0])
                        else:
                            on_netns(fds[0])
                        continue
                    for fd in fds:
                        os.close(fd)
                    break
                if not isinstance(status, dict) or "error" in status:
                    error = status.get("error") if isinstance(status, dict) else status
                    raise GardenError(f"creating container: {error}")
                try:
                    status_sock.send(COMMIT)  # no checkpoint from here to the return
                except OSError as err:
                    raise GardenError("creating container: the shim died while starting") from err
            finally:
                trio.lowlevel.notify_closing(status_sock)
                status_sock.close()  # before COMMIT: the shim gives up
        except BaseException:
            with trio.CancelScope(shield=True):
                await _wait_gone(pidfd)
            raise
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        return status

    async def _fork(self, cfg: dict[str, Any], rootfs_tree: int | None) -> tuple[socket.socket, int]:
        """Ask the spawner for a shim: its status socket and pidfd (the caller owns both)."""
        async with self._in_flight:
            if self._gone:
                raise GardenError("the spawner process is gone")
            rid = next(self._rids)
            try:
                buffers, anc = wire.encode({"rid": rid, "cfg": cfg}, [] if rootfs_tree is None else [rootfs_tree],
                                           what="the container's shim config")
            except ValueError as err:
                raise GardenError(f"creating container: {err}") from err
            slot = self._pending[rid] = _Slot()
            try:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + SPAWNER_REPLY_TIMEOUT
                    await self._send(buffers, anc)
                    await self._wait_reply(slot)
            finally:
                # From here on a reply to this rid is stale: the reader closes its fds.
                del self._pending[rid]
                self._hand_on()
            if slot.reply is None:
                if self._gone:
                    raise GardenError("the spawner process is gone")
                raise GardenError(f"the spawner did not answer within {SPAWNER_REPLY_TIMEOUT:g} s")
        reply, fds = slot.reply
        if not reply.get("ok") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise GardenError(f"starting container shim: {reply.get('error')}")
        status_sock = socket.socket(fileno=fds[0])
        status_sock.setblocking(False)
        return status_sock, fds[1]

    async def _send(self, buffers: list[bytes], anc: list[tuple[int, int, bytes]]) -> None:
        async with self._send_lock:
            try:
                await self._sock.sendmsg(buffers, anc)
            except OSError as err:
                self._spawner_gone()
                raise GardenError(f"the spawner process is gone: {err}") from err

    async def _wait_reply(self, slot: _Slot) -> None:
        """Until ``slot`` has its reply (or the spawner is gone): read the socket while
        nobody else does, else wait to be handed the reply or the reading. Cancelled (the
        caller's deadline): returns at once, handing the reading on."""
        while slot.reply is None and not self._gone:
            if self._reader is not None:
                slot.wake = trio.Event()
                await slot.wake.wait()
                continue
            self._reader = slot
            try:
                while slot.reply is None and not self._gone:
                    await self._read_one()
            finally:
                self._reader = None

    def _hand_on(self) -> None:
        """Nobody reading: wake the first request still waiting for its reply, to read on.
        Called by every request as it stops waiting (answered or timed out), so the reading
        is never left to nobody while replies are due."""
        if self._reader is None:
            for slot in self._pending.values():
                if slot.reply is None:
                    slot.wake.set()
                    break

    async def _read_one(self) -> None:
        """One reply off the socket, into its request's slot; a reply nobody waits for
        (its request timed out) has its fds closed, so its shim gives up."""
        try:
            data, ancdata, flags, _ = await self._sock.recvmsg(wire.MAX_MESSAGE, wire.ANCILLARY_SPACE)
            if not data:
                self._spawner_gone()
                return
            reply, fds = wire.decode(data, ancdata, flags)
        except (OSError, ValueError, msgpack.UnpackException):
            self._spawner_gone()
            return
        rid = reply.get("rid") if isinstance(reply, dict) else None
        slot = self._pending.get(rid) if isinstance(rid, int) else None
        if slot is None or slot.reply is not None:
            for fd in fds:
                os.close(fd)
            return
        slot.reply = (reply, fds)
        slot.wake.set()

    def _spawner_gone(self) -> None:
        self._gone = True
        for slot in self._pending.values():
            slot.wake.set()


async def _receive_report(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The shim's next status message and the fds it carries (the caller owns them), or
    b"" if it died first."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, _REPORT_LIMIT, 1)
            return data, fds
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except ConnectionResetError:
            return b"", []


async def _wait_gone(pidfd: int) -> None:
    """Wait for the shim to exit (it does once its status socket closed); SIGKILL it if
    it takes longer than ABANDON_TIMEOUT. Call shielded."""
    with trio.move_on_after(ABANDON_TIMEOUT):
        await trio.lowlevel.wait_readable(pidfd)
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with trio.move_on_after(ABANDON_TIMEOUT):
        await trio.lowlevel.wait_readable(pidfd)
