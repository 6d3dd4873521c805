"""Framing between the server and a shim (or the spawner): one SOCK_SEQPACKET
message is one msgpack map, with file descriptors riding along as SCM_RIGHTS.
Sans-IO: both the synchronous shim and the trio side use these helpers.

Every message is at most ``MAX_MESSAGE`` bytes: ``encode`` refuses a bigger one
with ``MessageTooLarge`` (naming its size), so nothing is ever cut or silently
dropped by the kernel, and ``size_sockets`` raises each socket's send buffer so a
message of that size fits (a unix datagram longer than the sender's buffer is
refused with EMSGSIZE, and the default buffer holds only about 208 KiB).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from typing import Any

import msgpack

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_SO_SNDBUFFORCE = 32  # root may exceed net.core.wmem_max
_SEND_BUFFER = MAX_MESSAGE + (64 << 10)  # room for one maximal message and its overhead

# Exited-and-drained processes a shim (and the server's container actor) remember,
# newest first, so exit codes stay readable for attach and wait while memory, depot
# files and ``list`` replies stay bounded.
KEEP_COLLECTED = 1000


class MessageTooLarge(ValueError):
    """A message that does not fit in ``MAX_MESSAGE`` bytes."""

    def __init__(self, size: int, what: str) -> None:
        super().__init__(f"{what} is {size} bytes encoded, more than the {MAX_MESSAGE} a shim message may be")
        self.size = size


def size_socket(sock: socket.socket) -> None:
    """Let ``sock`` send messages of up to ``MAX_MESSAGE`` bytes (best effort)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _SEND_BUFFER)
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)


def pack(obj: Any, what: str = "message") -> bytes:
    """``obj`` encoded; raises MessageTooLarge past ``MAX_MESSAGE``."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_MESSAGE:
        raise MessageTooLarge(len(data), what)
    return data


def encode(obj: Any, fds: list[int] | tuple[int, ...] = (),
           what: str = "message") -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Arguments for ``sendmsg``: the payload buffers and the ancillary data.

    Raises MessageTooLarge (a ValueError) when ``obj`` does not fit in one message."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"{what} carries {len(fds)} file descriptors, more than {MAX_FDS}")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    return [pack(obj, what)], anc


# As a plain int: ``socket.MSG_*`` are Flag members, and Flag arithmetic on every message
# costs more than the decoding.
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> tuple[Any, list[int]]:
    """Payload and received descriptors (the caller owns them) from ``recvmsg``'s result."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & _TRUNCATED:
        for fd in fds:
            os.close(fd)
        raise ValueError("shim message truncated")
    return msgpack.unpackb(data, raw=False), fds


def send(sock: socket.socket, obj: Any, fds: list[int] | tuple[int, ...] = (), what: str = "message") -> None:
    """Send one message. Raises MessageTooLarge before sending anything, or OSError."""
    buffers, anc = encode(obj, fds, what)
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
