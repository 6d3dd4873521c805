"""The server's connection to one container's shim (see ``gactor.kernel.shim``).

``ShimLink.request`` sends one op and returns its reply and any fds (the caller
owns them). Exit events are handed to ``on_exit`` by the reader, which runs in
the owning container actor's task via ``ShimLink.run``. ``list_processes`` fetches
every page of the shim's paged ``list``; ``attach`` returns a process's fds in the
positional order the process actor expects. A request too large for one shim
message fails with a GardenError naming its size; nothing is cut or dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import (
    ExecutableNotFoundError,
    GardenError,
    ProcessNotFoundError,
    ServiceUnavailableError,
)
from ..kernel import shim_wire as wire
from .mailbox import acquire

log = logging.getLogger("gactor.shim_link")


class ShimGone(ServiceUnavailableError):
    def __init__(self, handle: str) -> None:
        super().__init__(f"container {handle}: its shim is gone")


@dataclass(frozen=True)
class Attached:
    """A process as ``attach`` found it; ``fds`` (owned by the caller) are positional:
    [stdin, stdout, stderr] for pipes, [master] for a tty, [] once drained. Where the shim
    no longer holds stdin (it was closed), a /dev/null placeholder takes its place, so
    the order holds; ``stdin_open`` is then False and nothing may be written to it."""

    pid: int
    exit: int | None
    tty: bool
    stdin_open: bool
    fds: list[int]


class _ReplySlot:
    """Where the reader puts one request's reply (a memory channel of one, for less)."""

    __slots__ = ("arrived", "reply", "closed")

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.reply: tuple[dict[str, Any], list[int]] | None = None
        self.closed = False  # the link ended: no reply will come

    def put(self, reply: tuple[dict[str, Any], list[int]]) -> None:
        self.reply = reply
        self.arrived.set()

    def close(self) -> None:
        self.closed = True
        self.arrived.set()


class ShimLink:
    def __init__(self, handle: str, sock: trio.socket.SocketType, on_exit: Callable[[str, int], None]) -> None:
        self.handle = handle
        self._sock = sock
        self._on_exit = on_exit
        self._rids = itertools.count(1)
        self._waiting: dict[int, _ReplySlot] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    @classmethod
    async def connect(cls, handle: str, container_dir: str, on_exit: Callable[[str, int], None]) -> ShimLink:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        wire.size_socket(raw)
        sock = trio.socket.from_stdlib_socket(raw)
        dir_fd = os.open(container_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            await sock.connect(wire.socket_path(dir_fd, "shim.sock"))
        except OSError as err:
            sock.close()
            raise ShimGone(handle) from err
        finally:
            os.close(dir_fd)
        return cls(handle, sock, on_exit)

    def peer_pid(self) -> int:
        """The pid of the process listening on the shim's socket."""
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])

    async def run(self) -> None:
        """Read replies and events until the shim hangs up; then fail every waiter."""
        try:
            while True:
                data, anc, flags, _ = await self._sock.recvmsg(wire.MAX_MESSAGE, wire.ANCILLARY_SPACE)
                if not data:
                    return
                msg, fds = wire.decode(data, anc, flags)
                if "event" in msg:
                    if msg["event"] == "exit":
                        self._on_exit(msg["id"], int(msg["code"]))
                    continue
                waiter = self._waiting.pop(msg.get("rid"), None)
                if waiter is None:
                    # The requester gave up (cancelled) before its reply came: drop it.
                    for fd in fds:
                        os.close(fd)
                else:
                    waiter.put((msg, fds))
        except OSError:
            return
        except Exception:
            log.exception("container %s: shim link failed", self.handle)
        finally:
            self.closed.set()
            self._sock.close()
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()

    async def request(self, op: str, *, send_fds: Sequence[int] = (), **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send ``op`` (with ``send_fds``, which stay the caller's); return the reply and its
        fds. Raises the shim's error as GardenError."""
        if self.closed.is_set():
            raise ShimGone(self.handle)
        rid = next(self._rids)
        try:
            buffers, anc = wire.encode({"op": op, "rid": rid, **fields}, list(send_fds), what=f"the shim request {op!r}")
        except ValueError as err:
            raise GardenError(f"container {self.handle}: {err}") from err
        slot = self._waiting[rid] = _ReplySlot()
        try:
            await acquire(self._send_lock)
            try:
                await self._sock.sendmsg(buffers, anc)
            finally:
                self._send_lock.release()
            await slot.arrived.wait()
        except BaseException as err:
            # Unregister with no checkpoint after the wait, so the reader never hands a reply
            # to a requester that left; a reply that arrived as we were cancelled is dropped.
            self._waiting.pop(rid, None)
            if slot.reply is not None:
                for fd in slot.reply[1]:
                    os.close(fd)
            if isinstance(err, OSError):
                raise ShimGone(self.handle) from err
            raise
        if slot.reply is None:  # the link ended first
            raise ShimGone(self.handle)
        reply, fds = slot.reply
        if "error" in reply:
            error = reply["error"]
            raise garden_error(error.get("type", ""), error.get("message", "shim error"))
        return reply, fds

    async def list_processes(self) -> tuple[int, list[dict[str, Any]]]:
        """The container's pid 1 and every process the shim remembers, in spawn order
        (``{"id", "pid", "exit", "tty"}`` each), fetched page by page. A process spawned
        meanwhile may be listed; one forgotten meanwhile (history pruning) may be too."""
        entries: list[dict[str, Any]] = []
        after: int | None = None
        while True:
            paging: dict[str, Any] = {} if after is None else {"after": after}
            page, _ = await self.request("list", **paging)
            entries.extend(page["processes"])
            after = page.get("next")
            if after is None:
                return int(page["init"]), entries

    async def attach(self, process_id: str) -> Attached:
        """Take the server's copies of a process's fds again (after a restart).

        Raises ProcessNotFoundError if the shim no longer knows it (its history was
        pruned). Cancelled: no fd is left open."""
        reply, fds = await self.request("attach", id=process_id)
        tty = bool(reply["tty"])
        # A shim started by an older server names nothing: it sends all it has, in order.
        names = list(reply.get("fds", (["stdout"] if tty else ["stdin", "stdout", "stderr"])[: len(fds)]))
        expected = (["stdout"],) if tty else (["stdin", "stdout", "stderr"], ["stdout", "stderr"])
        if (fds and names not in expected) or len(names) != len(fds):
            for fd in fds:
                os.close(fd)
            raise GardenError(f"container {self.handle}: process {process_id}: the shim sent fds {names} for {len(fds)}")
        by_name = dict(zip(names, fds, strict=True))
        if tty or not by_name:
            positional = list(by_name.values())
        else:
            stdin = by_name.get("stdin")
            if stdin is None:
                stdin = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            positional = [stdin, by_name["stdout"], *([by_name["stderr"]] if "stderr" in by_name else [])]
        return Attached(int(reply["pid"]), reply["exit"], tty, bool(reply["stdin"]) and "stdin" in by_name,
                        positional)

    def close(self) -> None:
        self._sock.close()


def garden_error(kind: str, message: str) -> GardenError:
    """The Garden error type the shim named, with its message."""
    if kind == "ExecutableNotFoundError":
        return ExecutableNotFoundError(message)
    if kind == "ProcessNotFoundError":
        return ProcessNotFoundError(message.removeprefix("unknown process: "))
    return GardenError(message)


NETNS_TIMEOUT = 5.0  # seconds the shim gets to hand over the namespace fd


def fetch_netns(handle: str, container_dir: str) -> int:
    """The container's network namespace fd, asked of its shim over a connection of its
    own (blocking: call it in a worker thread). A link's own reader may not run yet when
    the network is set up, so this does not go through one. The caller owns the fd."""
    dir_fd = os.open(container_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            wire.size_socket(sock)
            sock.settimeout(NETNS_TIMEOUT)
            sock.connect(wire.socket_path(dir_fd, "shim.sock"))
            wire.send(sock, {"op": "netns", "rid": 1}, what="shim request")
            got = wire.recv(sock)
    except OSError as err:
        raise ShimGone(handle) from err
    finally:
        os.close(dir_fd)
    if got is None:
        raise ShimGone(handle)
    reply, fds = got
    if len(fds) != 1 or not isinstance(reply, dict) or "error" in reply:
        for fd in fds:
            os.close(fd)
        raise GardenError(f"container {handle}: the shim did not send its network namespace: {reply!r:.200}")
    return fds[0]
