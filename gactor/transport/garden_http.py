"""Garden's HTTP front end: the routes of Garden's Go server over the same ``Api`` as the
websocket front end, so Garden's own clients (the Go client, Diego, Concourse, GATS)
work unchanged. h11 parses and frames; this module moves bytes and calls the ``Api``.

Per connection: one task, serving requests one after another (keep-alive allowed; the
Go client never reuses a connection). Run and Attach take the connection over after
their 201/200 header (a "hijack", as Go's server does): the task then owns a control
stream (``ProcessPayload`` messages in, the first ``{process_id, stream_id}`` message
and the exit status out) and, for as long as it runs, the container's grace timer stays
paused. Output travels on separate connections (``.../attaches/<stream id>/stdout``
and ``/stderr``), matched by stream id only, through a ``GardenStream`` of bounded
buffers: a slow output connection pauses the process; nothing is dropped for an output
connection that is open or still expected (``ATTACH_WINDOW``). Wire shapes live in
``garden_wire``; docs/garden-compat.md says what matches Garden and what differs.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import itertools
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

from ..actors.process import ProcessActor
from ..errors import GardenError
from . import garden_wire as W
from .garden_conn import (
    CLOSE_TIMEOUT,
    RECEIVE_SIZE,
    ClientGone,
    HttpConnection,
    Request,
    date,
    serve_http,
)
from .listeners import ListenAddress
from .methods import Api, feed_stdin, first_error
from .ws_server import Access

log = logging.getLogger("gactor.garden")

OUTPUT_BUFFER = 1 << 20  # bytes of output buffered per stream and fd before the process waits
# Seconds after a Run/Attach's first message during which output for an fd nobody has
# opened yet is kept (the process waits once the buffer is full): the Go client opens
# stdout and stderr right after that message, each with a 2 s dial timeout. After it,
# output for an fd no connection asked for is discarded, as Garden discards the output
# of a stream the client did not want (a nil io.Stdout).
ATTACH_WINDOW = 5.0
STREAM_LINGER = 60.0  # seconds a finished stream stays addressable (Garden: 1 minute)
_SIGNALS = {0: 15, 1: 9}


# ---- output streams ---------------------------------------------------------------


class OutputBuffer:
    """The output of one fd of one stream, between the stream's pump and the one output
    connection reading it. ``put`` waits while the buffer is full and a reader is there
    or still expected; otherwise the chunk is discarded (nobody asked for this fd)."""

    def __init__(self, attach_deadline: float) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.readers = 0
        self.had_reader = False
        self.ended = False
        self.attach_deadline = attach_deadline
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _unwanted(self) -> bool:
        return self.readers == 0 and (self.had_reader or trio.current_time() >= self.attach_deadline)

    async def put(self, data: bytes) -> None:
        """Queue ``data`` for the reader, waiting while the buffer is full and a reader is
        there (or may still come, until the attach deadline). Cancelled: nothing queued."""
        while self.size >= OUTPUT_BUFFER:
            if self._unwanted():
                return
            with trio.move_on_at(self.attach_deadline if self.readers == 0 else math.inf):
                await self._changed.wait()
        if self._unwanted():
            return
        self.chunks.append(data)
        self.size += len(data)
        self._notify()

    async def take(self) -> bytes | None:
        """The next chunk (the caller owns it), or None once the stream ended and
        everything was taken. Cancelled: nothing is taken."""
        while not self.chunks:
            if self.ended:
                return None
            await self._changed.wait()
        data = self.chunks.popleft()
        self.size -= len(data)
        self._notify()
        return data

    def attach(self) -> None:
        self.readers += 1
        self.had_reader = True
        self._notify()

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0:  # the reader went away: what it left is nobody's
            self.chunks.clear()
            self.size = 0
        self._notify()

    def end(self) -> None:
        self.ended = True
        self._notify()


class GardenStream:
    """A Run or Attach's output (fd 1 and 2), addressable by its stream id until
    STREAM_LINGER after it ended, as in Garden: a late output connection still gets what
    was buffered (at most OUTPUT_BUFFER per fd)."""

    def __init__(self, id: str, attach_deadline: float) -> None:
        self.id = id
        self.attach_deadline = attach_deadline
        self.buffers = {fd: OutputBuffer(attach_deadline) for fd in (1, 2)}

    def end(self) -> None:
        for buffer in self.buffers.values():
            buffer.end()


# ---- routes -----------------------------------------------------------------------

Handler = Callable[["GardenServer", HttpConnection, Request, dict[str, str]], Awaitable[None]]
ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/ping", "ping"),
    ("GET", "/capacity", "capacity"),
    ("GET", "/containers", "list"),
    ("POST", "/containers", "create"),
    ("GET", "/containers/bulk_info", "bulk_info"),
    ("GET", "/containers/bulk_metrics", "bulk_metrics"),
    ("GET", "/containers/:handle/info", "info"),
    ("DELETE", "/containers/:handle", "destroy"),
    ("PUT", "/containers/:handle/stop", "stop"),
    ("PUT", "/containers/:handle/files", "stream_in"),
    ("GET", "/containers/:handle/files", "stream_out"),
    ("GET", "/containers/:handle/limits/bandwidth", "current_bandwidth_limits"),
    ("GET", "/containers/:handle/limits/cpu", "current_cpu_limits"),
    ("GET", "/containers/:handle/limits/disk", "current_disk_limits"),
    ("GET", "/containers/:handle/limits/memory", "current_memory_limits"),
    ("POST", "/containers/:handle/net/in", "net_in"),
    ("POST", "/containers/:handle/net/out", "net_out"),
    ("POST", "/containers/:handle/net/out/bulk", "bulk_net_out"),
    ("GET", "/containers/:handle/processes/:pid/attaches/:streamid/stdout", "stdout"),
    ("GET", "/containers/:handle/processes/:pid/attaches/:streamid/stderr", "stderr"),
    ("POST", "/containers/:handle/processes", "run"),
    ("GET", "/containers/:handle/processes/:pid", "attach"),
    ("PUT", "/containers/:handle/grace_time", "set_grace_time"),
    ("GET", "/containers/:handle/properties", "properties"),
    ("GET", "/containers/:handle/properties/:key", "property"),
    ("PUT", "/containers/:handle/properties/:key", "set_property"),
    ("DELETE", "/containers/:handle/properties/:key", "remove_property"),
    ("GET", "/containers/:handle/metrics", "metrics"),
]


def match(segments: list[str]) -> list[tuple[str, str, dict[str, str]]]:
    """Every route whose path matches, as (method, route name, path parameters); a
    literal segment wins over a parameter (``/containers/bulk_info`` is no handle)."""
    found: list[tuple[int, str, str, dict[str, str]]] = []
    for method, pattern, name in ROUTES:
        parts = pattern.split("/")[1:]
        if len(parts) != len(segments):
            continue
        params: dict[str, str] = {}
        literal = 0
        for part, segment in zip(parts, segments, strict=True):
            if part.startswith(":"):
                params[part[1:]] = segment
            elif part == segment:
                literal += 1
            else:
                break
        else:
            found.append((literal, method, name, params))
    best = max((f[0] for f in found), default=0)
    return [(method, name, params) for literal, method, name, params in found
            if literal == best or method not in {m for lit, m, _, _ in found if lit == best}]


# ---- the server -------------------------------------------------------------------


class GardenServer:
    """Serves Garden's routes over ``api``; ``streams`` holds the live Run/Attach outputs."""

    def __init__(self, api: Api, access: Access, nursery: trio.Nursery) -> None:
        self.api = api
        self.access = access
        self.streams: dict[str, GardenStream] = {}
        self._stream_ids = itertools.count(1)
        self._nursery = nursery  # for the timers that forget finished streams

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = HttpConnection(stream)
        try:
            while (request := await conn.next_request()) is not None:
                if not await self._serve_request(conn, request) or not conn.reusable():
                    return
        except* ClientGone as group:
            log.debug("a Garden client went away: %s", group.exceptions[0])

    async def _serve_request(self, conn: HttpConnection, request: Request) -> bool:
        """Answer one request; False when the connection must not be reused (hijacked,
        or a body left unread)."""
        refusal = self._refusal(request)
        if refusal is not None:
            await conn.respond_json(W.error(GardenError(refusal[1])), refusal[0])
            await conn.drain_body()
            return False
        routes = match(request.path)
        chosen = next(((name, params) for method, name, params in routes if method == request.method), None)
        if chosen is None:
            if routes:
                allow = ", ".join(sorted({method for method, _, _ in routes}))
                await conn.respond(405, b"Method Not Allowed\n", b"text/plain; charset=utf-8",
                                   [(b"Allow", allow.encode())])
            else:
                await conn.respond(404, b"404 page not found\n", b"text/plain; charset=utf-8")
            await conn.drain_body()
            return True
        name, params = chosen
        handler: Handler = getattr(GardenServer, f"_{name}")
        failure: GardenError | None = None
        try:
            await handler(self, conn, request, params)
        except* GardenError as group:
            failure = first_error(group)
            log.info("%s failed: %s", name, failure)
        except* ClientGone:
            raise
        except* Exception as group:  # a bug: answer it as the websocket API does, keep serving
            log.error("%s failed", name, exc_info=group)
            failure = GardenError(f"internal error in {name}: {group.exceptions[0]}")
        if failure is not None and not conn.hijacked and conn.h11.our_state is h11.SEND_RESPONSE:
            await conn.respond_error(failure)
        if conn.hijacked:
            return False
        await conn.drain_body()
        return True

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        """As for the websocket API: a browser's ``Origin`` not allowed is refused (a page
        must not reach the root API, even with a leaked token), then the bearer token."""
        origins = [v for k, v in request.headers if k.lower() == b"origin"]
        if origins and (len(origins) > 1 or origins[0].decode("latin-1") not in self.access.allow_origins):
            return 403, ("requests from browsers are refused: origin "
                         f"{origins[0].decode('latin-1')[:200]!r} is not allowed (--allow-origin ORIGIN)")
        if self.access.token is not None:
            given = request.header(b"authorization") or b""
            if not hmac.compare_digest(given, f"Bearer {self.access.token}".encode()):
                return 401, "a valid bearer token is required (header Authorization: Bearer TOKEN)"
        return None

    async def _json_body(self, conn: HttpConnection, what: str) -> Any:
        return W.parse(await conn.read_body(), what)

    async def _reply(self, conn: HttpConnection, method: str, args: dict[str, Any],
                     shape: Callable[[Any], Any] = lambda result: {}) -> None:
        await conn.respond_json(shape(await self.api.call(method, args)))

    # ---- plain routes -------------------------------------------------------------

    async def _ping(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "ping", {})

    async def _capacity(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "capacity", {}, W.capacity)

    async def _list(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        properties = {key: values[0] for key, values in request.query.items()}
        await self._reply(conn, "containers", {"properties": properties}, lambda handles: {"Handles": handles})

    async def _create(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        spec = W.decode(W.CONTAINER_SPEC, await self._json_body(conn, "container spec"))
        await self._reply(conn, "create", {"spec": spec}, lambda result: {"Handle": result["handle"]})

    async def _bulk(self, conn: HttpConnection, request: Request, method: str, key: str) -> None:
        if "handles" not in request.query:
            raise GardenError("missing query parameter 'handles' (comma-separated container handles)")
        handles = [h for h in request.query["handles"][0].split(",") if h]
        await self._reply(conn, method, {"handles": handles}, lambda result: W.bulk_entries(result, key))

    async def _bulk_info(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._bulk(conn, request, "bulk_info", "info")

    async def _bulk_metrics(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._bulk(conn, request, "bulk_metrics", "metrics")

    async def _info(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "info", {"handle": params["handle"]}, W.container_info)

    async def _metrics(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "metrics", {"handle": params["handle"]}, W.metrics)

    async def _destroy(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "destroy", {"handle": params["handle"]})

    async def _stop(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        body = _object(W.decode({"kill": W.Field("kill")}, await self._json_body(conn, "stop request")))
        await self._reply(conn, "stop", {"handle": params["handle"], **body})

    async def _current_bandwidth_limits(self, conn: HttpConnection, request: Request,
                                        params: dict[str, str]) -> None:
        await self._reply(conn, "current_bandwidth_limits", {"handle": params["handle"]}, W.bandwidth_limits)

    async def _current_cpu_limits(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "current_cpu_limits", {"handle": params["handle"]}, W.cpu_limits)

    async def _current_disk_limits(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "current_disk_limits", {"handle": params["handle"]}, W.disk_limits)

    async def _current_memory_limits(self, conn: HttpConnection, request: Request,
                                     params: dict[str, str]) -> None:
        await self._reply(conn, "current_memory_limits", {"handle": params["handle"]}, W.memory_limits)

    async def _net_in(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        body = _object(W.decode(W.NET_IN, await self._json_body(conn, "net in request")))
        body.pop("handle", None)  # the path names the container
        await self._reply(conn, "net_in", {"handle": params["handle"], **body},
                          lambda ports: W.omit_zero([("host_port", ports[0]), ("container_port", ports[1])]))

    async def _net_out(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        rule = W.decode(W.NET_OUT_RULE, await self._json_body(conn, "net out rule"))
        await self._reply(conn, "net_out", {"handle": params["handle"], "rule": rule})

    async def _bulk_net_out(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        rules = await self._json_body(conn, "net out rules")
        if isinstance(rules, list):
            rules = [W.decode(W.NET_OUT_RULE, rule) for rule in rules]
        await self._reply(conn, "bulk_net_out", {"handle": params["handle"], "rules": rules or []})

    async def _set_grace_time(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        seconds = W.duration(await self._json_body(conn, "grace time"))
        await self._reply(conn, "set_grace_time", {"handle": params["handle"], "seconds": seconds})

    async def _properties(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "properties", {"handle": params["handle"]}, lambda props: props)

    async def _property(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "property", {"handle": params["handle"], "name": params["key"]},
                          lambda value: {"value": value})

    async def _set_property(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        body = _object(W.decode({"value": W.Field("value")}, await self._json_body(conn, "property")))
        await self._reply(conn, "set_property", {"handle": params["handle"], "name": params["key"],
                                                 "value": body.get("value", "")})

    async def _remove_property(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._reply(conn, "remove_property", {"handle": params["handle"], "name": params["key"]})

    # ---- files --------------------------------------------------------------------

    async def _stream_in(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        """Extract the (chunked or sized) tar body; ``{}`` once written. A client that goes
        away mid-body kills tar (what it extracted stays) and ends the connection."""
        args = {"handle": params["handle"], "path": _first(request, "destination"),
                "user": _first(request, "user"), "stream": 0}
        await self.api.stream_in(args, _BodyChunks(conn))
        await conn.respond_json({})

    async def _stream_out(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        """The tar of ``source`` as the body (chunked). A failure before the first byte is
        a JSON error; after it, the connection is closed mid-body (a truncated transfer)."""
        args = {"handle": params["handle"], "path": _first(request, "source"),
                "user": _first(request, "user"), "stream": 0}
        async with self.api.stream_out(args) as archive:
            await conn.send(h11.Response(status_code=200, reason=b"OK", headers=[
                (b"Content-Type", b"application/x-tar"), (b"Date", date())]))
            try:
                async for parcel in archive:
                    await conn.send(h11.Data(data=parcel.pop()))
            except GardenError as err:
                log.warning("stream out of %s failed mid-transfer: %s", params["handle"], err)
                raise ClientGone("truncated the transfer") from None
            await conn.send(h11.EndOfMessage())

    # ---- processes ----------------------------------------------------------------

    async def _run(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        spec = W.decode(W.PROCESS_SPEC, await self._json_body(conn, "process spec"))
        await self._serve_process(conn, 201, "run", {"handle": params["handle"], "spec": spec})

    async def _attach(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._serve_process(conn, 200, "attach", {"handle": params["handle"], "process_id": params["pid"]})

    async def _serve_process(self, conn: HttpConnection, status: int, method: str, args: dict[str, Any]) -> None:
        """Run or attach, answer with the stream's first message, then relay control
        messages until the exit status is sent (or the client goes away: the process
        keeps running). The grace timer is paused all along. Raises GardenError before
        the hijack; after it, failures end the connection."""
        stream_id = str(next(self._stream_ids))
        async with self.api.process(method, {**args, "stdout": True, "stderr": True, "stream": 0}) as (proc, sub):
            raw, leftover = await conn.hijack(status)
            stream = GardenStream(stream_id, trio.current_time() + ATTACH_WINDOW)
            self.streams[stream_id] = stream
            try:
                with trio.CancelScope() as control:
                    await _send(raw, {"process_id": proc.id, "stream_id": stream_id})
                    async with trio.open_nursery() as nursery:
                        stdin_send, stdin_receive = trio.open_memory_channel[bytes](1)
                        nursery.start_soon(feed_stdin, proc, _Stdin(stdin_receive))
                        nursery.start_soon(self._read_control, raw, leftover, proc, stdin_send, control)
                        async with sub.receive:
                            async for fd, data in sub.receive:
                                await stream.buffers[fd].put(data)
                        try:
                            message: dict[str, Any] = {"process_id": proc.id, "exit_status": await proc.wait()}
                        except GardenError as err:
                            message = {"process_id": proc.id, "error": str(err)}
                        nursery.cancel_scope.cancel()
                    await _send(raw, message)
            finally:
                stream.end()
                self._nursery.start_soon(self._forget, stream)

    async def _read_control(self, raw: trio.abc.Stream, leftover: bytes, proc: ProcessActor,
                            stdin: trio.MemorySendChannel[bytes], control: trio.CancelScope) -> None:
        """ProcessPayload messages in order, as Garden's server handles them: stdin data
        (written before the next message is read: backpressure reaches the client),
        stdin EOF, TTY resizes and signals, these two also after stdin EOF (Garden stops
        reading there). An unknown signal or message closes stdin and stops the reading;
        the exit status still goes out. The client going away (or sending what is not
        JSON) closes the process's stdin, as Garden does, and ends the control stream;
        the process keeps running and can be attached again."""
        decoder = W.PayloadDecoder()
        decoder.receive_data(leftover)
        try:
            while True:
                while (payload := decoder.next_payload()) is not None:
                    if not await self._handle_payload(payload, proc, stdin):
                        log.info("process %s: stopped reading its control stream at %r", proc.id, payload)
                        await stdin.aclose()
                        return
                data = await raw.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                decoder.receive_data(bytes(data))
        except GardenError as err:
            log.info("ending the control stream of process %s: %s", proc.id, err)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await proc.close_stdin()
        control.cancel()

    async def _handle_payload(self, payload: dict[str, Any], proc: ProcessActor,
                              stdin: trio.MemorySendChannel[bytes]) -> bool:
        """Act on one payload; False for one Garden stops reading at."""
        tty = payload.get("tty")
        if tty is not None:
            size = tty.get("window_size") if isinstance(tty, dict) else None
            if isinstance(size, dict):
                try:
                    await proc.resize(_uint16(size.get("columns")), _uint16(size.get("rows")))
                except GardenError as err:  # not a tty, say: Garden logs and carries on
                    log.debug("process %s: resize failed: %s", proc.id, err)
            return True
        if payload.get("source") is not None:
            data = payload.get("data")
            if data is None:
                await stdin.aclose()
            elif isinstance(data, str):
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await stdin.send(data.encode("utf-8", errors="replace"))
            else:
                raise GardenError(f"stdin data must be a JSON string, not {type(data).__name__}")
            return True
        signal = payload.get("signal")
        if type(signal) is int and signal in _SIGNALS:
            try:
                await proc.signal(_SIGNALS[signal])
            except GardenError as err:
                log.warning("process %s: signal %d failed: %s", proc.id, signal, err)
            return True
        return False

    async def _forget(self, stream: GardenStream) -> None:
        await trio.sleep(STREAM_LINGER)
        self.streams.pop(stream.id, None)

    async def _stdout(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._serve_output(conn, params["streamid"], 1)

    async def _stderr(self, conn: HttpConnection, request: Request, params: dict[str, str]) -> None:
        await self._serve_output(conn, params["streamid"], 2)

    async def _serve_output(self, conn: HttpConnection, stream_id: str, fd: int) -> None:
        """Raw output bytes of one fd of a stream until it ended and was drained, then
        close (an unknown stream id: close at once, as Garden does)."""
        raw, _ = await conn.hijack(200, content_type=False)
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        buffer = stream.buffers[fd]
        buffer.attach()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_at_eof, raw, nursery.cancel_scope)
                while (data := await buffer.take()) is not None:
                    await raw.send_all(data)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            buffer.detach()


class _Stdin:
    """The stdin chunks of a control stream, for ``feed_stdin``; ends at stdin EOF."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self.receive = receive

    def __aiter__(self) -> _Stdin:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class _BodyChunks:
    """A request body as the chunks h11 decodes (Content-Length or chunked), read as
    they are asked for: a slow tar slows the client. Raises ClientGone if it breaks off."""

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        while (chunk := await self.conn.body_chunk()) is not None:
            if chunk:
                return chunk
        raise StopAsyncIteration


async def _cancel_at_eof(raw: trio.abc.Stream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client closes its side (it needs no more output)."""
    try:
        while await raw.receive_some(RECEIVE_SIZE):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


async def _send(raw: trio.abc.Stream, message: dict[str, Any]) -> None:
    """One message on a hijacked control stream; ClientGone if the client went away."""
    try:
        await raw.send_all(W.encode(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
        raise ClientGone(str(err)) from None


def _uint16(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= 0xFFFF else 0


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GardenError(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


def _first(request: Request, key: str) -> str:
    return request.query.get(key, [""])[0]


async def serve(api: Api, address: ListenAddress, access: Access = Access(),  # noqa: B008 - frozen
                ssl_context: ssl.SSLContext | None = None, *,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve Garden's HTTP API on ``address`` until cancelled; ``started`` reports where
    (``http://HOST:PORT``, ``https://`` with TLS, or ``unix:///PATH``).

    One task per connection; one failing never affects another. On cancellation the
    listeners close (a unix socket file is removed) and every connection is dropped;
    each Run/Attach leaves its process running. Raises ListenError if the address
    cannot be bound.
    """
    async with trio.open_nursery() as timers:
        server = GardenServer(api, access, timers)

        async def handle_connection(stream: trio.abc.Stream) -> None:
            try:
                await server.serve_connection(stream)
            except Exception:
                log.exception("a Garden client connection failed")
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await stream.aclose()

        await serve_http(address, ssl_context, handle_connection, task_status)
        timers.cancel_scope.cancel()


