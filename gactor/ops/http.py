"""The operations listener (``--metrics-listen``): ``/metrics``, ``/healthz``, ``/readyz``.

A small HTTP/1.1 server: h11 parses and frames (sans-IO), this module only moves bytes
between it and a trio stream. One task per connection, keep-alive supported, at most
MAX_CONNECTIONS at once (more are closed at once), every read bounded by IDLE_TIMEOUT
and every request head by MAX_HEAD_BYTES. Only GET and HEAD are served.

- ``/healthz``: 200 while the server runs (the event loop answers).
- ``/readyz``: 503 until startup reconcile is done and the API listens, then 200.
- ``/metrics``: the Prometheus exposition (``Scraper.scrape``).
"""

from __future__ import annotations

import contextlib
import http
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from ..transport import listeners
from ..transport.listeners import ListenAddress
from .metrics import Scraper

log = logging.getLogger("gactor.ops.http")

MAX_CONNECTIONS = 32
MAX_HEAD_BYTES = 16 << 10  # request line and headers
MAX_BODY_BYTES = 64 << 10  # a GET has none; more than this closes the connection
IDLE_TIMEOUT = 10.0  # seconds a connection may send nothing before it is closed
LINGER_TIMEOUT = 1.0  # seconds the rest of a refused request is read before closing
READ_CHUNK = 16 << 10
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Route = Callable[[], Awaitable[Response]]


class OpsRoutes:
    """The three paths over one ``Scraper``."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def route(self, method: bytes, target: bytes) -> Route | Response:
        path = target.split(b"?", 1)[0]
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return Response(
                404, TEXT, b"not found: gactor serves /metrics, /healthz and /readyz here\n"
            )
        if method not in (b"GET", b"HEAD"):
            return Response(405, TEXT, b"only GET and HEAD\n")
        return {b"/metrics": self._metrics, b"/healthz": self._healthz, b"/readyz": self._readyz}[
            path
        ]

    async def _metrics(self) -> Response:
        return Response(200, CONTENT_TYPE_LATEST, await self.scraper.scrape())

    async def _healthz(self) -> Response:
        return Response(200, TEXT, b"ok\n")

    async def _readyz(self) -> Response:
        if self.scraper.ready:
            return Response(200, TEXT, b"ready\n")
        return Response(503, TEXT, b"starting: startup reconcile is not done yet\n")


class _Closed(Exception):
    """The peer went away, was idle too long or broke the protocol: drop the connection."""


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            data = await stream.receive_some(READ_CHUNK)
        if idle.cancelled_caught:
            raise _Closed("idle")
        conn.receive_data(bytes(data))  # b"" tells h11 the peer closed


async def _send(
    conn: h11.Connection, stream: trio.abc.Stream, response: Response, head_only: bool
) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("cache-control", "no-store"),
    ]
    reason = http.HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if not head_only:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _linger(stream: trio.abc.Stream) -> None:
    """Read (and drop) what the peer still sends, for a moment, before closing: closing
    with unread data resets the connection, and the peer may lose the error response."""
    with trio.move_on_after(LINGER_TIMEOUT):
        dropped = 0
        while dropped < MAX_BODY_BYTES and (chunk := await stream.receive_some(READ_CHUNK)):
            dropped += len(chunk)


async def _serve_connection(stream: trio.abc.Stream, routes: OpsRoutes) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        try:
            event = await _next_event(conn, stream)
        except h11.RemoteProtocolError as err:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(
                    conn, stream, Response(err.error_status_hint, TEXT, f"{err}\n".encode()), False
                )
                await _linger(stream)
            return
        if not isinstance(event, h11.Request):
            return  # ConnectionClosed (or a stray event after an error): done
        body = 0
        while not isinstance(more := await _next_event(conn, stream), h11.EndOfMessage):
            if not isinstance(more, h11.Data):
                return  # the peer went away mid-request
            body += len(more.data)
            if body > MAX_BODY_BYTES:
                return
        found = routes.route(event.method, event.target)
        try:
            response = found if isinstance(found, Response) else await found()
        except Exception:  # a bug, or the host refusing a read: say so, keep serving
            log.exception("answering %s %s failed", event.method.decode(), event.target.decode())
            response = Response(500, TEXT, b"internal error: see the server log\n")
        await _send(conn, stream, response, event.method == b"HEAD")
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # Connection: close, or HTTP/1.0
        conn.start_next_cycle()


async def serve(
    routes: OpsRoutes,
    address: ListenAddress,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``address`` until cancelled; ``started`` reports the URL
    (with the port the kernel picked for port 0). One connection failing never affects
    another. On cancellation the listeners close and open connections are dropped.
    Raises ListenError if the address cannot be bound."""
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.abc.Stream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _serve_connection(stream, routes)
        except (
            _Closed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,  # a request broken half-way; a peer that went away
        ):
            pass
        except Exception:
            log.exception("a metrics connection failed")
        finally:
            slots.release()
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async with contextlib.AsyncExitStack() as stack:
        try:
            opened = await stack.enter_async_context(listeners.open_listeners(address, None))
        except listeners.ListenError as err:
            raise listeners.ListenError(
                f"--metrics-listen: {err} (give another address, or off)"
            ) from None
        if isinstance(address, listeners.UnixAddress):
            url = address.url()
        else:
            host = f"[{address.host}]" if ":" in address.host else address.host
            url = f"http://{host}:{listeners.bound_port(opened)}"
            if not address.is_loopback:
                log.warning(
                    "serving metrics on %s: anyone who can reach it sees the handles and "
                    "usage of every container",
                    url,
                )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, opened)
            task_status.started(url)
