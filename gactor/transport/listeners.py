"""Where the websocket API listens: a TCP address or a unix socket, with optional TLS.

Importing this module does not import trio: the server parses its addresses before it
forks the spawner.

``parse_listen`` turns a ``--listen`` value into a ``TcpAddress`` or a ``UnixAddress``;
``open_listeners`` opens trio listeners on it for as long as its block runs. A unix
socket is created with mode 0660 (root and the socket's group may connect), replaces a
stale socket file left by a server that died, refuses to replace a live socket or
anything that is not a socket, and is removed when the block ends.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # trio is imported only where it runs: the server parses addresses before forking
    import trio

UNIX_SCHEME = "unix://"
UNIX_SOCKET_MODE = 0o660
UNIX_BACKLOG = 128


class ListenError(Exception):
    """The address cannot be listened on; the message says why and names the address."""


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name: it may resolve to anything

    def url(self, port: int, tls: bool) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if tls else 'ws'}://{host}:{port}/"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def url(self) -> str:
        return UNIX_SCHEME + self.path


ListenAddress = TcpAddress | UnixAddress


def parse_listen(address: str) -> ListenAddress:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) or ``unix:///ABSOLUTE/PATH``; ValueError otherwise."""
    if address.startswith(UNIX_SCHEME):
        path = address[len(UNIX_SCHEME):]
        if not path.startswith("/"):
            raise ValueError(f"listen address {address!r}: a unix socket needs an absolute path "
                             f"(unix:///run/gactor.sock)")
        return UnixAddress(os.path.normpath(path))
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {address!r} must be HOST:PORT or unix:///PATH")
    return TcpAddress(host.strip("[]") or "127.0.0.1", int(port))


def _probe_live(path: str) -> bool:
    """Whether something accepts connections on the socket file ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as err:
            if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
        return True


def bind_unix_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at ``path`` (mode 0660) and its (st_dev, st_ino).

    The socket is bound under a temporary name, given its mode, and renamed into place,
    so it is never reachable with a looser mode and a stale file is replaced atomically.
    Raises ListenError; the caller owns the socket and the file.
    """
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as err:
        raise ListenError(f"cannot listen on unix://{path}: {err.strerror}") from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ListenError(f"cannot listen on unix://{path}: it exists and is not a socket; "
                              f"refusing to replace it")
        if _probe_live(path):
            raise ListenError(f"cannot listen on unix://{path}: another server is listening on it")
    directory = os.path.dirname(path)
    temporary = os.path.join(directory, f".gactor-{os.getpid()}.sock.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock.bind(temporary)
        try:
            os.chmod(temporary, UNIX_SOCKET_MODE)
            sock.listen(UNIX_BACKLOG)
            os.rename(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        st = os.stat(path)
    except OSError as err:
        sock.close()
        raise ListenError(f"cannot listen on unix://{path}: {err.strerror or err}") from None
    return sock, (st.st_dev, st.st_ino)


def remove_unix_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the socket we created (another server may have
    replaced it since)."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


@contextlib.asynccontextmanager
async def open_listeners(address: ListenAddress, ssl_context: ssl.SSLContext | None
                         ) -> AsyncIterator[list[trio.abc.Listener[trio.abc.Stream]]]:
    """Listeners on ``address`` (TLS-wrapped with ``ssl_context``) while the block runs.

    The caller may close them; this closes them too and removes a unix socket file on
    the way out, also when cancelled. Raises ListenError or OSError when binding fails.
    """
    import trio

    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    identity: tuple[int, int] | None = None
    try:
        if isinstance(address, UnixAddress):
            sock, identity = await trio.to_thread.run_sync(bind_unix_socket, address.path)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        else:
            listeners.extend(await trio.open_tcp_listeners(address.port, host=address.host))
        if ssl_context is not None:
            listeners = [trio.SSLListener(listener, ssl_context, https_compatible=True)
                         for listener in listeners]
        yield listeners
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
        if isinstance(address, UnixAddress) and identity is not None:
            remove_unix_socket(address.path, identity)


def bound_port(listeners: list[trio.abc.Listener[trio.abc.Stream]]) -> int:
    """The TCP port the first listener is bound to (the kernel's pick for port 0)."""
    import trio

    listener = listeners[0]
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    assert isinstance(listener, trio.SocketListener)
    return int(listener.socket.getsockname()[1])
