"""The msgpack-over-websocket front end: moves frames between trio-websocket and
the sans-IO ``protocol.Connection``, and runs each call and stream in its own task.

Per connection: one reader task (this peer's ``run``), one task per call, and for
run/attach one task that owns the stream (output pump, exit) plus one for stdin.
The grace timer of a container stays paused while any of its streams is open.
"""

from __future__ import annotations

import hmac
import logging
import math
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ..actors.mailbox import acquire
from ..actors.process import ProcessActor, Subscription
from ..actors.pull_progress import PullProgress
from ..errors import GardenError
from ..types import to_wire
from . import listeners, schema
from . import protocol as P
from .listeners import ListenAddress
from .methods import Api, arg, feed_stdin, first_error

log = logging.getLogger("gactor.api")

class _StreamGone(trio.ClosedResourceError):
    """A frame for a stream the client detached: that stream's task ends."""


# A client going away mid-send: its streams end, its processes keep running.
_GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)
SEND_TIMEOUT = 30.0  # seconds a client may read nothing before it is dropped
# Calls that open a stream other than run/attach, and the Peer method serving each.
# ``pull`` opens one only when given a ``stream`` (for its progress); without, it is a plain call.
_STREAMING = {"events": "_serve_events", "stream_in": "_serve_stream_in", "stream_out": "_serve_stream_out",
              "pull": "_serve_pull"}


class _Stream:
    """One open stream's state in the connection's tasks: the client's credit, the scope a
    detach cancels, and the stdin frames queued for the task feeding them (the channel
    made when first needed: most runs get no stdin)."""

    __slots__ = ("credit", "scope", "_stdin")

    def __init__(self) -> None:
        self.credit = trio.Event()
        self.scope = trio.CancelScope()
        self._stdin: tuple[trio.MemorySendChannel[bytes | None], trio.MemoryReceiveChannel[bytes | None]] | None = None

    @property
    def stdin(self) -> tuple[trio.MemorySendChannel[bytes | None], trio.MemoryReceiveChannel[bytes | None]]:
        if self._stdin is None:
            self._stdin = trio.open_memory_channel(math.inf)
        return self._stdin


class Peer:
    def __init__(self, ws: WebSocketConnection, api: Api) -> None:
        self.ws = ws
        self.api = api
        self.conn = P.Connection(P.Role.SERVER)
        self.streams: dict[int, _Stream] = {}
        self._send_lock = trio.Lock()
        self._broken = False
        self._nursery: trio.Nursery | None = None

    async def send(self, event: Any) -> None:
        """Encode and send one frame atomically. Cancelling a stream (a detach, say) must
        not leave a frame half-written: that would corrupt every other call on the
        connection. A client that reads nothing for SEND_TIMEOUT is disconnected."""
        # One scope does both: shielded from outer cancellation, and its own deadline
        # (set once the lock is ours) is the SEND_TIMEOUT of the frame's send.
        with trio.CancelScope(shield=True) as timeout:
            await acquire(self._send_lock)  # every frame takes it: no task switch when free
            try:
                if self._broken:
                    raise trio.ClosedResourceError("connection dropped")
                if isinstance(event, P.Output | P.Exit | P.Credit | P.Event) and \
                        self.conn.stream_state(event.stream) is P.StreamState.CLOSED:
                    # The client detached this stream (or it ended) while we waited for the
                    # lock: end the stream's task, never the connection.
                    raise _StreamGone(f"stream {event.stream} is no longer open")
                frame = self.conn.send(event)
                del event  # an output chunk is not kept alive by a send blocked on the client
                timeout.deadline = trio.current_time() + SEND_TIMEOUT
                await self.ws.send_message(frame)
            finally:
                self._send_lock.release()
        if timeout.cancelled_caught:  # no other task has run since the release
            self._broken = True
            log.warning("dropping a client that read nothing for %s s", SEND_TIMEOUT)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            raise trio.ClosedResourceError("client stopped reading")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._read(nursery)
            except ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            message = await self.ws.get_message()
            if isinstance(message, str):
                await self.ws.aclose(1003, "text frames are not allowed; send binary msgpack frames")
                return
            self.conn.receive_data(message)
            while (event := self.conn.next_event()) is not None:
                if isinstance(event, P.ProtocolViolation):
                    log.info("closing a connection: %s", event.message)
                    await self.ws.aclose(1002, event.message[:120])
                    return
                self._dispatch(event, nursery)

    def _dispatch(self, event: Any, nursery: trio.Nursery) -> None:
        if isinstance(event, P.Call):
            if isinstance(event.args.get("stream"), int) and event.method in ("run", "attach"):
                stream = self.streams[event.args["stream"]] = _Stream()
                nursery.start_soon(self._serve_stream, event, stream)
            elif isinstance(event.args.get("stream"), int) and event.method in _STREAMING:
                stream = self.streams[event.args["stream"]] = _Stream()
                nursery.start_soon(getattr(self, _STREAMING[event.method]), event, stream)
            else:
                nursery.start_soon(self._serve_call, event)
            return
        target = self.streams.get(getattr(event, "stream", -1))
        if target is None:
            return  # a frame for a stream that has already ended
        if isinstance(event, P.Credit):
            target.credit.set()
        elif isinstance(event, P.Stdin):
            target.stdin[0].send_nowait(event.data)
        elif isinstance(event, P.StdinClose):
            target.stdin[0].send_nowait(None)
        elif isinstance(event, P.Detach):
            target.scope.cancel()

    async def _serve_call(self, call: P.Call) -> None:
        try:
            result = await self.api.call(call.method, call.args)
        except GardenError as err:
            log.info("%s failed: %s", call.method, err)
            await self._reply_error(call.id, err)
        except Exception as err:
            log.exception("call %s failed", call.method)
            await self._reply_error(call.id, GardenError(f"internal error in {call.method}: {err}"))
        else:
            await self._safe_send(P.Reply(call.id, result))

    async def _reply_error(self, call_id: int, err: GardenError) -> None:
        await self._safe_send(P.ErrorReply(call_id, err))

    async def _safe_send(self, event: Any) -> None:
        try:
            await self.send(event)
        except* _GONE:
            pass

    async def _serve_stream(self, call: P.Call, stream: _Stream) -> None:
        """Start or find the process, reply, then pump its output and finally its exit code."""
        stream_id = call.args["stream"]
        replied = False
        try:
            stdin = arg(call.args, "stdin", bool, False)
            async with self.api.process(call.method, call.args) as (proc, sub):
                await self.send(P.Reply(call.id, {"process_id": proc.id}))
                replied = True
                with stream.scope:
                    if stdin:  # a task feeds it meanwhile; without stdin, no nursery to open
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(feed_stdin, proc, self._stdin_chunks(stream, stream_id))
                            code, error = await self._pump_output(stream, stream_id, proc, sub)
                            nursery.cancel_scope.cancel()
                    else:
                        code, error = await self._pump_output(stream, stream_id, proc, sub)
                    await self.send(P.Exit(stream_id, code, error))
        except* GardenError as group:
            failure = first_error(group)
            if replied:
                log.warning("stream %d of %s failed after its reply: %s", stream_id, call.method, failure)
            else:
                await self._reply_error(call.id, failure)
        except* _GONE:
            pass
        finally:
            self.streams.pop(stream_id, None)

    async def _pump_output(self, stream: _Stream, stream_id: int, proc: ProcessActor, sub: Subscription
                           ) -> tuple[int | None, GardenError | None]:
        """Send the output ``sub`` delivers until it ends; then the exit code, or the
        error saying why it is lost (the shim died)."""
        async with sub.receive:
            async for fd, data in sub.receive:
                parcel = [data]
                del data  # handed over whole: see _send_output
                await self._send_output(stream, stream_id, fd, parcel)
        try:
            return await proc.wait(), None
        except GardenError as err:
            return None, err

    async def _send_output(self, stream: _Stream, stream_id: int, fd: int, parcel: list[bytes]) -> None:
        """Send the chunk in ``parcel`` as output frames, waiting for the client's credit as
        needed; empties ``parcel``. The chunk is handed over in it rather than passed, so
        that no reference outlives its encoding: a send blocked on a slow client then
        holds the encoded frame and trio-websocket's copy of it, not the chunk as well."""
        while parcel:
            while (credit := self.conn.output_credit(stream_id)) <= 0:
                stream.credit = trio.Event()
                await stream.credit.wait()
            n = min(credit, P.MAX_DATA_CHUNK)
            if len(parcel[0]) > n:  # the rest waits for more credit
                parcel[:] = [parcel[0][:n], parcel[0][n:]]
            await self.send(P.Output(stream_id, fd, parcel.pop(0)))

    async def _serve_stream_in(self, call: P.Call, stream: _Stream) -> None:
        """Extract the tar the client streams as stdin; reply once it is all written."""
        stream_id = call.args["stream"]
        try:
            await self.api.stream_in(call.args, self._stdin_chunks(stream, stream_id))
            await self.send(P.Exit(stream_id, 0))
            await self.send(P.Reply(call.id, {}))
        except* GardenError as group:
            await self._reply_error(call.id, first_error(group))
        except* _GONE:
            pass
        finally:
            self.streams.pop(stream_id, None)

    async def _serve_stream_out(self, call: P.Call, stream: _Stream) -> None:
        """Stream a tar of ``path`` as output fd 1. A path that cannot be archived is an
        error reply (``Api.stream_out`` waits for the first member or tar's exit)."""
        stream_id = call.args["stream"]
        replied = False
        try:
            async with self.api.stream_out(call.args) as archive:
                await self.send(P.Reply(call.id, {}))
                replied = True
                with stream.scope:
                    async for parcel in archive:
                        await self._send_output(stream, stream_id, 1, parcel)
                    await self.send(P.Exit(stream_id, 0))
        except* GardenError as group:
            if replied:
                await self._safe_send(P.Exit(stream_id, None, first_error(group)))
            else:
                await self._reply_error(call.id, first_error(group))
        except* _GONE:
            pass
        finally:
            self.streams.pop(stream_id, None)

    async def _serve_events(self, call: P.Call, stream: _Stream) -> None:
        """Push the events of one container until it is destroyed, or of every container
        (no ``handle``) until the client detaches. With ``lifecycle`` each frame is a
        ContainerEvent; without, the stream older clients know: ``{"handle", "event"}``
        for what ``ContainerInfo.events`` records, ended (exit 0) where the subscriber
        fell too far behind. A client that detaches or disconnects is unsubscribed."""
        stream_id = call.args["stream"]
        replied = False
        try:
            schema.check(call.method, call.args)
            lifecycle = arg(call.args, "lifecycle", bool, False)
            handle = arg(call.args, "handle", str, "") or None
            async with self.api.registry.subscribe(handle, recorded_only=not lifecycle) as events:
                await self.send(P.Reply(call.id, {}))
                replied = True
                with stream.scope:
                    async for item in events:
                        if lifecycle:
                            await self.send(P.Event(stream_id, to_wire(item)))
                        elif item.kind == "missed":
                            break  # what older clients were told: the stream ends
                        else:
                            await self.send(P.Event(stream_id, {"handle": item.handle, "event": item.event}))
                    await self.send(P.Exit(stream_id, 0))
        except* GardenError as group:
            if not replied:
                await self._reply_error(call.id, first_error(group))
        except* _GONE:
            pass
        finally:
            self.streams.pop(stream_id, None)

    async def _serve_pull(self, call: P.Call, stream: _Stream) -> None:
        """Pull with progress: LayerProgress ``event`` frames while it runs (each layer's
        latest, as fast as the client reads them), then ``exit`` code 0 and the reply. A
        detach stops the frames, not the pull, whose reply still comes."""
        stream_id = call.args["stream"]
        progress = PullProgress()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_progress, stream, stream_id, progress)
                try:
                    result = await self.api.pull(call.args, progress.report)
                finally:
                    progress.finish()
            await self._safe_send(P.Exit(stream_id, 0))
            await self._safe_send(P.Reply(call.id, result))
        except* GardenError as group:
            await self._reply_error(call.id, first_error(group))
        finally:
            self.streams.pop(stream_id, None)

    async def _send_progress(self, stream: _Stream, stream_id: int, progress: PullProgress) -> None:
        with stream.scope:
            try:
                async for batch in progress.updates():
                    for layer in batch:
                        await self.send(P.Event(stream_id, to_wire(layer)))
            except _GONE:
                pass  # detached (or gone): the pull goes on without reporting

    async def _stdin_chunks(self, stream: _Stream, stream_id: int) -> AsyncIterator[bytes]:
        """The client's stdin frames until it closes stdin, granting credit back for each
        chunk once the consumer asks for the next (it has written the previous one)."""
        async for data in stream.stdin[1]:
            if data is None:
                return
            yield data
            await self.send(P.Credit(stream_id, len(data)))


HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection may take to complete its handshake
CLOSE_TIMEOUT = 5.0  # seconds the websocket close handshake may take


@dataclass(frozen=True)
class Access:
    """Who may open the API: a bearer token (None: anyone who can connect) and the
    browser origins allowed to (a handshake carrying any other ``Origin`` is refused)."""

    token: str | None = None
    allow_origins: frozenset[str] = frozenset()


def check_handshake(request_path: str, headers: list[tuple[bytes, bytes]], access: Access
                    ) -> tuple[int, bytes] | None:
    """None if the handshake may proceed, else the HTTP status and body to refuse it with.

    Browsers send ``Origin`` on every websocket handshake and let any page open one, so a
    handshake with an ``Origin`` not listed is refused before the token is looked at: a
    page must not be able to drive the root API even where a token leaked to it. The
    token is compared in constant time and never echoed.
    """
    if request_path.split("?")[0] not in ("/", ""):
        return 404, b"the gactor API is served at /\n"
    origins = [v for k, v in headers if k.lower() == b"origin"]
    if origins:
        origin = origins[0].decode("latin-1")
        if len(origins) > 1 or origin not in access.allow_origins:
            shown = origin.encode("ascii", "replace")[:200]
            return 403, (b"websocket handshakes from browsers are refused: origin " + shown +
                         b" is not allowed (start the server with --allow-origin ORIGIN)\n")
    if access.token is not None:
        expected = f"Bearer {access.token}".encode()
        given = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        if not hmac.compare_digest(given, expected):
            return 401, b"a valid bearer token is required\n"
    return None


async def serve(api: Api, address: ListenAddress, access: Access = Access(),
                ssl_context: ssl.SSLContext | None = None, *,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the websocket API on ``address`` until cancelled; ``started`` reports the URL
    clients connect to (with the port the kernel picked for port 0).

    Each connection runs in its own task; one failing never affects another. On
    cancellation the listeners close (a unix socket file is removed) and every open
    connection is dropped. Raises ListenError if the address cannot be bound.
    """

    async def handle_connection(stream: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:  # holds the websocket's reader task
                ws = await _handshake(nursery, stream, access)
                if ws is not None:
                    try:
                        await Peer(ws, api).run()
                    finally:
                        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                            await ws.aclose()
                nursery.cancel_scope.cancel()
        except Exception:
            # One connection's failure must never take the server (and every other client) down.
            log.exception("a client connection failed")
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()  # closes the stream even when cut short

    async with listeners.open_listeners(address, ssl_context) as opened:
        if isinstance(address, listeners.UnixAddress):
            url = address.url()
        else:
            url = address.url(listeners.bound_port(opened), tls=ssl_context is not None)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle_connection, opened)
            task_status.started(url)


async def _handshake(nursery: trio.Nursery, stream: trio.abc.Stream, access: Access
                     ) -> WebSocketConnection | None:
    """The accepted websocket, or None if the handshake was refused, broken or too slow
    (HANDSHAKE_TIMEOUT), or the client went away first (a failed TLS handshake, say)."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
        watched = listeners.WatchedStream(stream, scope.cancel)
        request = await wrap_server_stream(nursery, watched,  # type: ignore[arg-type]
                                           max_message_size=P.MAX_FRAME_BYTES,
                                           receive_buffer_size=None)  # 64 KiB reads, not 4 KiB
        watched.on_end = None
        refusal = check_handshake(request.path, request.headers, access)
        if refusal is None:
            return await request.accept()
        status, body = refusal
        log.info("refused a websocket handshake (%d): %s", status,
                 body.decode("ascii", "replace").strip())
        await request.reject(status, body=body)
    return None
