"""Asking the spawner (``gactor.kernel.spawner``) for a new shim, from trio."""

from __future__ import annotations

import os
import socket
from typing import Any

import msgpack
import trio

from ..errors import GardenError
from ..kernel import shim_wire as wire


class SpawnerClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._lock = trio.Lock()  # one request/reply at a time on the shared socket

    async def start_shim(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Start a shim for ``cfg``; return its report ``{"shim", "init"}`` once the container is up."""
        buffers, anc = wire.encode(cfg)
        async with self._lock:
            await self._sock.sendmsg(buffers, anc)
            data, ancdata, flags, _ = await self._sock.recvmsg(wire.MAX_MESSAGE, wire.ANCILLARY_SPACE)
        if not data:
            raise GardenError("the spawner process is gone")
        reply, fds = wire.decode(data, ancdata, flags)
        if not reply.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            raise GardenError(f"starting container shim: {reply.get('error')}")
        stream = trio.lowlevel.FdStream(fds[0])
        report = b""
        async with stream:
            while chunk := await stream.receive_some(4096):
                report += chunk
        try:
            status = msgpack.unpackb(report, raw=False) if report else {"error": "the shim died while starting"}
        except (ValueError, msgpack.UnpackException):
            status = {"error": f"garbled shim report {report!r}"}
        if "error" in status:
            raise GardenError(f"creating container: {status['error']}")
        return status
