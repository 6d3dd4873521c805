"""HTTP/1.1 framing for the Garden front end: h11 on a trio stream, one request after
another, with Go's conventions (a ``Date`` on every response, JSON bodies, hijacking after a
200/201 head the way Go's server writes it), and the small ``/debug/vars`` server. No
Garden semantics here: ``garden_http`` owns the routes.
"""

from __future__ import annotations

import email.utils
import json
import os
import ssl
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import trio

from ..errors import ContainerNotFoundError, GardenError, ProcessNotFoundError
from . import garden_wire as W
from . import listeners
from .listeners import ListenAddress

HEADER_TIMEOUT = 60.0  # seconds a request's head may take to arrive (and a keep-alive idle)
MAX_HEAD = 64 << 10  # bytes of request line and headers
MAX_BODY = 16 << 20  # bytes of a JSON request body
RECEIVE_SIZE = 64 << 10
CLOSE_TIMEOUT = 5.0
DRAIN_LIMIT = 256 << 10  # bytes of an unread request body read and dropped before closing
DRAIN_TIMEOUT = 2.0
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 413: "Request Entity Too Large",
            500: "Internal Server Error"}


class ClientGone(Exception):
    """The client closed or broke its connection (or its framing) mid-request."""


# ---- HTTP framing -----------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: list[str]  # the unescaped segments
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class HttpConnection:
    """One client connection as h11 sees it; owns ``stream`` (closed by the caller)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.hijacked = False  # the raw stream was handed over: h11 no longer frames it

    async def _event(self) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as err:
                raise ClientGone(f"bad HTTP from the client: {err}") from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                raise ClientGone(str(err)) from None
            self.h11.receive_data(bytes(data))

    async def next_request(self) -> Request | None:
        """The next request's head; None when the client closed the connection, was idle
        past HEADER_TIMEOUT, or sent something that is not HTTP (answered with 400)."""
        with trio.move_on_after(HEADER_TIMEOUT):
            try:
                event = await self._event()
            except ClientGone as err:
                if self.h11.their_state is h11.ERROR and self.h11.our_state is h11.IDLE:
                    await self._send_raw_error(400, str(err))
                return None
            if not isinstance(event, h11.Request):
                return None
            target = event.target.decode("latin-1")
            raw_path, _, raw_query = target.partition("?")
            segments = [urllib.parse.unquote_plus(s) for s in raw_path.split("/")[1:]]
            return Request(event.method.decode("ascii", "replace"), segments,
                           urllib.parse.parse_qs(raw_query, keep_blank_values=True), list(event.headers))
        return None

    async def _send_raw_error(self, status: int, text: str) -> None:
        body = text.encode("utf-8", "replace") + b"\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            await self.stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def body_chunk(self) -> bytes | None:
        """The next piece of the request body, None at its end. Raises ClientGone. A
        client waiting for ``100 Continue`` (curl, for a large StreamIn) gets it first."""
        if self.h11.client_is_waiting_for_100_continue and self.h11.our_state is h11.SEND_RESPONSE:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone("the client closed the connection mid-body")

    async def read_body(self) -> bytes:
        body = bytearray()
        while (chunk := await self.body_chunk()) is not None:
            body += chunk
            if len(body) > MAX_BODY:
                raise GardenError(f"request body larger than {MAX_BODY} bytes")
        return bytes(body)

    async def send(self, *events: Any) -> None:
        data = b"".join(self.h11.send(event) or b"" for event in events)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise ClientGone(str(err)) from None

    async def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"Content-Type", content_type), (b"Date", date()), (b"Content-Length", b"%d" % len(body))]
        await self.send(h11.Response(status_code=status, reason=_REASONS.get(status, "").encode(),
                                     headers=headers + (extra or [])),
                        h11.Data(data=body), h11.EndOfMessage())

    async def respond_json(self, value: Any, status: int = 200) -> None:
        await self.respond(status, W.encode(value))

    async def respond_error(self, err: GardenError) -> None:
        status = 404 if isinstance(err, ContainerNotFoundError | ProcessNotFoundError) else 500
        await self.respond_json(W.error(err), status)

    async def hijack(self, status: int, content_type: bool = True) -> tuple[trio.abc.Stream, bytes]:
        """Write a 200/201 head as Go's server does before it hijacks (``Transfer-Encoding:
        chunked``, which Go's client needs to keep the connection, and no framing of what
        follows) and hand the raw stream over with the bytes already received after the
        request. The request body must have been read."""
        while self.h11.their_state is h11.SEND_BODY:
            if await self.body_chunk() is not None:
                raise GardenError("this request takes no body")
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        if content_type:
            head += "Content-Type: application/json\r\n"
        head += f"Date: {date().decode()}\r\nTransfer-Encoding: chunked\r\n\r\n"
        leftover = self.h11.trailing_data[0]
        self.hijacked = True
        try:
            await self.stream.send_all(head.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            raise ClientGone(str(err)) from None
        return self.stream, bytes(leftover)

    async def drain_body(self) -> None:
        """Read and drop what is left of a request body that was answered early (a failed
        StreamIn, say), up to DRAIN_LIMIT bytes for DRAIN_TIMEOUT, as Go's server does: a
        socket closed with unread data resets, and the reset can destroy the response
        before the client reads it."""
        drained = 0
        with trio.move_on_after(DRAIN_TIMEOUT):
            while self.h11.their_state is h11.SEND_BODY and drained <= DRAIN_LIMIT:
                drained += len(await self.body_chunk() or b"")

    def reusable(self) -> bool:
        """Whether the next request may follow on this connection (and prepare for it)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


def date() -> bytes:
    return email.utils.formatdate(usegmt=True).encode()


def url(address: ListenAddress, opened: list[Any], ssl_context: ssl.SSLContext | None) -> str:
    if isinstance(address, listeners.UnixAddress):
        return address.url()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{'https' if ssl_context else 'http'}://{host}:{listeners.bound_port(opened)}"


async def serve_http(address: ListenAddress, ssl_context: ssl.SSLContext | None,
                     handle_connection: Callable[[trio.abc.Stream], Awaitable[None]],
                     task_status: trio.TaskStatus[str]) -> None:
    """Listen on ``address`` and run ``handle_connection`` per connection until cancelled;
    reports the URL it serves on through ``task_status``."""
    async with listeners.open_listeners(address, ssl_context) as opened:
        where = url(address, opened, ssl_context)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle_connection, opened)
            task_status.started(where)


# ---- the debug server ---------------------------------------------------------------


SECRET_FLAGS = ("--token",)


def redacted(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret flag (``--token T``, ``--token=T``) replaced."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in SECRET_FLAGS:
            out.append("<redacted>")
        elif any(arg.startswith(flag + "=") for flag in SECRET_FLAGS):
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


def debug_vars() -> dict[str, Any]:
    """What gdn's debug server shows at /debug/vars (Go's expvar), in this process's terms:
    ``memstats.Alloc`` and ``HeapAlloc`` are the resident anonymous memory, ``Sys`` the
    resident set, in bytes."""
    status: dict[str, int] = {}
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                status[key] = int(value.split()[0]) * 1024
    anon = status.get("RssAnon", 0)
    return {"cmdline": redacted(sys.argv), "memstats": {
        "Alloc": anon, "HeapAlloc": anon, "Sys": status.get("VmRSS", 0), "HeapSys": status.get("VmRSS", 0),
        "TotalAlloc": anon}}


async def serve_debug(address: ListenAddress, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve ``GET /debug/vars`` on ``address`` until cancelled (no other route)."""

    async def handle_connection(stream: trio.abc.Stream) -> None:
        conn = HttpConnection(stream)
        try:
            while (request := await conn.next_request()) is not None:
                if request.method == "GET" and request.path == ["debug", "vars"]:
                    await conn.respond(200, json.dumps(debug_vars()).encode() + b"\n")
                else:
                    await conn.respond(404, b"404 page not found\n", b"text/plain; charset=utf-8")
                if not conn.reusable():
                    return
        except ClientGone:
            pass
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()

    await serve_http(address, None, handle_connection, task_status)
