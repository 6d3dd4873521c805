"""The server's connection to one container's shim (see ``gactor.kernel.shim``).

``ShimLink.request`` sends one op and returns its reply and any fds (the caller
owns them). Exit events are handed to ``on_exit`` by the reader, which runs in
the owning container actor's task via ``ShimLink.run``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio

from ..errors import (
    ExecutableNotFoundError,
    GardenError,
    ProcessNotFoundError,
    ServiceUnavailableError,
)
from ..kernel import shim_wire as wire

log = logging.getLogger("gactor.shim_link")


class ShimGone(ServiceUnavailableError):
    def __init__(self, handle: str) -> None:
        super().__init__(f"container {handle}: its shim is gone")


class ShimLink:
    def __init__(self, handle: str, sock: trio.socket.SocketType, on_exit: Callable[[str, int], None]) -> None:
        self.handle = handle
        self._sock = sock
        self._on_exit = on_exit
        self._rids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[tuple[dict[str, Any], list[int]]]] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    @classmethod
    async def connect(cls, handle: str, container_dir: str, on_exit: Callable[[str, int], None]) -> ShimLink:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
                try:
                    if waiter is None:
                        raise trio.BrokenResourceError
                    waiter.send_nowait((msg, fds))
                except (trio.BrokenResourceError, trio.WouldBlock):
                    # The requester gave up (cancelled) before its reply came: drop it.
                    for fd in fds:
                        os.close(fd)
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

    async def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send ``op``; return the reply and its fds. Raises the shim's error as GardenError."""
        if self.closed.is_set():
            raise ShimGone(self.handle)
        rid = next(self._rids)
        send, receive = trio.open_memory_channel[tuple[dict[str, Any], list[int]]](1)
        self._waiting[rid] = send
        buffers, anc = wire.encode({"op": op, "rid": rid, **fields})
        try:
            async with self._send_lock:
                await self._sock.sendmsg(buffers, anc)
            reply, fds = await receive.receive()
        except (OSError, trio.EndOfChannel) as err:
            raise ShimGone(self.handle) from err
        finally:
            # Unregister and close with no checkpoint in between, so the reader never hands a
            # reply to a closed channel; a reply that arrived as we were cancelled is dropped.
            self._waiting.pop(rid, None)
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                _, late_fds = receive.receive_nowait()
                for fd in late_fds:
                    os.close(fd)
            receive.close()
        if "error" in reply:
            error = reply["error"]
            raise garden_error(error.get("type", ""), error.get("message", "shim error"))
        return reply, fds

    def close(self) -> None:
        self._sock.close()


def garden_error(kind: str, message: str) -> GardenError:
    """The Garden error type the shim named, with its message."""
    if kind == "ExecutableNotFoundError":
        return ExecutableNotFoundError(message)
    if kind == "ProcessNotFoundError":
        return ProcessNotFoundError(message.removeprefix("unknown process: "))
    return GardenError(message)
