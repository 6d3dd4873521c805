"""Framing between the server and a shim (or the spawner): one SOCK_SEQPACKET
message is one msgpack map, with file descriptors riding along as SCM_RIGHTS.
Sans-IO: both the synchronous shim and the trio side use these helpers.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Any

import msgpack

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


def encode(obj: Any, fds: list[int] | tuple[int, ...] = ()) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Arguments for ``sendmsg``: the payload buffers and the ancillary data."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return [msgpack.packb(obj, use_bin_type=True)], anc


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> tuple[Any, list[int]]:
    """Payload and received descriptors (the caller owns them) from ``recvmsg``'s result."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ValueError("shim message truncated")
    return msgpack.unpackb(data, raw=False), fds


def send(sock: socket.socket, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    buffers, anc = encode(obj, fds)
    sock.sendmsg(buffers, anc)


def recv(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """One message, or None at end of stream."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, ANCILLARY_SPACE)
    if not data and not ancdata:
        return None
    return decode(data, ancdata, flags)


def socket_path(dir_fd: int, name: str) -> str:
    """A short path to ``name`` in an open directory, dodging the 108-byte sun_path limit."""
    return f"/proc/self/fd/{dir_fd}/{name}"
