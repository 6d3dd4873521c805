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
from collections.abc import AsyncIterator, Callable
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


def check_unix_socket_path(path: str) -> None:
    """Raise ListenError unless ``path`` is free, or a stale socket file to replace.

    The server calls this before it starts anything, so a mistaken path costs nothing;
    ``bind_unix_socket`` checks again when it binds.
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
    if not os.path.isdir(os.path.dirname(path)):
        raise ListenError(f"cannot listen on unix://{path}: {os.path.dirname(path)} is not a directory")


def bind_unix_socket(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at ``path`` (mode 0660) and its (st_dev, st_ino).

    The socket is bound under a temporary name, given its mode, and renamed into place,
    so it is never reachable with a looser mode and a stale file is replaced atomically.
    Raises ListenError; the caller owns the socket and the file.
    """
    check_unix_socket_path(path)
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
    the way out, also when cancelled. Raises ListenError when binding fails.
    """
    import trio

    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    identity: tuple[int, int] | None = None
    try:
        if isinstance(address, UnixAddress):
            sock, identity = await trio.to_thread.run_sync(bind_unix_socket, address.path)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        else:
            try:
                listeners.extend(await trio.open_tcp_listeners(address.port, host=address.host))
            except OSError as err:
                raise ListenError(f"cannot listen on {address.host}:{address.port}: "
                                  f"{err.strerror or err}") from None
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


class WatchedStream:
    """A ``trio.abc.Stream`` wrapper that calls ``on_end`` once the peer's side ends
    (end of file, a broken connection, a failed TLS handshake) while it is set.

    trio-websocket waits for a handshake that a closed connection will never bring until
    its timeout; watching the stream lets both ends give up at once instead. Set
    ``on_end`` to None once the handshake is done.
    """

    def __init__(self, inner: trio.abc.Stream, on_end: Callable[[], object] | None) -> None:
        self.inner = inner
        self.on_end = on_end

    def _ended(self) -> None:
        if self.on_end is not None:
            self.on_end()
            self.on_end = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        import trio

        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise
        if not data:
            self._ended()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        import trio

        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> WatchedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
