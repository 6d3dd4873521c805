"""The async (trio) client: ``async with gactor.connect(url) as client: ...``.

One websocket connection carries every call and stream. A reader task turns
frames into events: replies resolve waiting calls, output goes to the stream's
ProcessIO sinks. Output credit is returned only after a sink has taken the data,
so a slow sink slows the process down instead of growing memory. Connection loss
fails every pending call and wait with ``ConnectionLostError``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import ssl as _ssl  # connect() takes a parameter named ssl
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .errors import ConnectionLostError, GardenError, error_from_wire
from .transport import protocol as P
from .transport import schema
from .transport.listeners import WatchedStream
from .types import (
    BandwidthLimits,
    Capacity,
    ContainerEvent,
    ContainerInfo,
    ContainerInfoEntry,
    ContainerMetricsEntry,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    ImageInfo,
    LayerProgress,
    MemoryLimits,
    Metrics,
    NetOutRule,
    ProcessSpec,
    Signal,
    StreamInSpec,
    StreamOutSpec,
    TTYSpec,
    from_wire,
    to_wire,
)

CLOSE_TIMEOUT = 2.0
SEND_TIMEOUT = 30.0
# trio-websocket reads 4 KiB at a time by default; output arrives in frames of up to 1 MiB.
RECEIVE_BUFFER = 256 << 10


class Sink(Protocol):
    async def send_all(self, data: bytes) -> None: ...


@dataclass
class ProcessIO:
    stdin: bytes | AsyncIterable[bytes] | None = None
    stdout: Sink | None = None
    stderr: Sink | None = None


class _Call:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: GardenError | None = None


class _Stream:
    """Client side of a run/attach stream: output queue, credit for stdin, the exit."""

    def __init__(self, io: ProcessIO) -> None:
        self.io = io
        self.output_send, self.output_receive = trio.open_memory_channel[tuple[int, bytes] | None](math.inf)
        self.stdin_credit = trio.Event()
        self.finished = trio.Event()
        self.code: int | None = None
        self.error: GardenError | None = None


class Connection:
    """Owns the websocket and the protocol state; tasks run in the connect() nursery."""

    def __init__(self, ws: Any, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.nursery = nursery
        self.proto = P.Connection(P.Role.CLIENT)
        self.calls: dict[int, _Call] = {}
        self.streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._send_lock = trio.Lock()
        self.lost: GardenError | None = None

    async def send(self, event: Any) -> None:
        """Encode and send one frame, atomically: a frame is never abandoned half-written
        (cancellation waits for it, up to SEND_TIMEOUT), and frames leave in the order
        the protocol state saw them."""
        if self.lost is not None:
            raise self.lost
        if isinstance(event, P.Call) and event.method in schema.METHODS:
            schema.check(event.method, event.args)  # a bad value is refused naming its field
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                try:
                    frame = self.proto.send(event)
                except P.LocalProtocolError as err:
                    raise GardenError(f"invalid request: {err}") from None
                with trio.move_on_after(SEND_TIMEOUT) as timeout:
                    try:
                        await self.ws.send_message(frame)
                    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as err:
                        raise self._lose(err) from None
                if timeout.cancelled_caught:
                    raise self._lose(TimeoutError(f"the server read nothing for {SEND_TIMEOUT} s"))

    def _lose(self, err: BaseException | None) -> GardenError:
        if self.lost is None:
            reason = getattr(getattr(err, "reason", None), "reason", None) or str(err or "closed")
            self.lost = ConnectionLostError(f"connection to gactor server lost: {reason}")
            for call in self.calls.values():
                call.error = self.lost
                call.done.set()
            for stream in self.streams.values():
                stream.error = self.lost
                stream.output_send.close()
                stream.stdin_credit.set()
        return self.lost

    async def read_forever(self) -> None:
        try:
            while True:
                self.proto.receive_data(await self.ws.get_message())
                while (event := self.proto.next_event()) is not None:
                    self._dispatch(event)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._lose(err)
        except GardenError as err:
            self._lose(err)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, P.ProtocolViolation):
            raise GardenError(f"protocol violation by the server: {event.message}")
        if isinstance(event, P.Reply | P.ErrorReply):
            call = self.calls.pop(event.id, None)
            if call is not None:
                if isinstance(event, P.Reply):
                    call.result = event.result
                else:
                    call.error = event.error
                call.done.set()
            return
        stream = self.streams.get(event.stream)
        if stream is None:
            return
        if isinstance(event, P.Output):
            stream.output_send.send_nowait((event.fd, event.data))
        elif isinstance(event, P.Exit):
            stream.code, stream.error = event.code, event.error
            stream.output_send.close()
            self.streams.pop(event.stream, None)
        elif isinstance(event, P.Credit):
            stream.stdin_credit.set()
        elif isinstance(event, P.Event):
            stream.output_send.send_nowait((0, event.data))

    async def call(self, method: str, **args: Any) -> Any:
        """Send a call and wait for its answer; raises the server's GardenError.

        Cancelled, it raises ``trio.Cancelled``; the call has then been sent (frames are
        never half-written) and runs to completion on the server, whose answer this
        client drops. The connection stays usable.
        """
        call_id = next(self._ids)
        call = self.calls[call_id] = _Call()
        try:
            await self.send(P.Call(call_id, method, args))
            await call.done.wait()
        finally:
            self.calls.pop(call_id, None)
        if call.error is not None:
            raise call.error
        return call.result

    async def stream_in(self, tar: bytes | AsyncIterable[bytes], **args: Any) -> None:
        """A stream_in call: the reply only comes once the server has extracted the whole
        archive, so stdin flows while the call is outstanding.

        Cancelled, it raises ``trio.Cancelled`` and ends the server's input with
        ``stdin_close``: the server extracts what it received (a truncated archive, so
        usually it fails) and its answer is dropped. The connection stays usable.
        """
        stream = _Stream(ProcessIO(stdin=tar))

        async def feed(stream_id: int) -> None:
            await self._feed_stdin(stream_id, stream, tar)

        # Not detach when cancelled: the server answers stream_in after stdin_close either way.
        await self._call_on_stream("stream_in", args, stream, feed,
                                   lambda nursery: nursery.cancel_scope.cancel(), P.StdinClose)

    async def _call_on_stream(self, method: str, args: dict[str, Any], stream: _Stream,
                              alongside: Callable[[int], Awaitable[None]],
                              on_reply: Callable[[trio.Nursery], None],
                              abandon: type[P.StdinClose | P.Detach]) -> Any:
        """A call given a stream of its own: ``alongside(stream_id)`` runs (feeding stdin,
        delivering events) until the reply comes, when ``on_reply(nursery)`` ends it.
        Cancelled (or ``alongside`` failed) before the reply: ``abandon`` is sent for the
        stream, and the server's answer is dropped."""
        stream_id = next(self._stream_ids)
        self.streams[stream_id] = stream
        call_id = next(self._ids)
        call = self.calls[call_id] = _Call()
        try:
            await self.send(P.Call(call_id, method, {**args, "stream": stream_id}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alongside, stream_id)
                await call.done.wait()
                on_reply(nursery)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            self.calls.pop(call_id, None)
            self.streams.pop(stream_id, None)
            if not call.done.is_set():
                await self._abandon(stream_id, abandon)
        if call.error is not None:
            raise call.error
        return call.result

    async def _abandon(self, stream_id: int, *frames: type[P.StdinClose | P.Detach]) -> None:
        """Send ``frames`` for a stream this client stopped following (a cancelled call),
        those the stream's state still allows; shielded, never raises."""
        allowed = {P.StreamState.OPEN: (P.StdinClose, P.Detach), P.StreamState.STDIN_CLOSED: (P.Detach,)}
        with trio.CancelScope(shield=True):
            for frame in frames:
                if self.lost is not None or frame not in allowed.get(self.proto.stream_state(stream_id), ()):
                    continue
                with contextlib.suppress(GardenError):
                    await self.send(frame(stream_id))

    async def open_stream(self, method: str, stream: _Stream, **args: Any) -> tuple[Any, int]:
        """Send a call that opens a stream (run, attach, stream_out, events) and wait for
        its reply: the result and the stream id, the stream registered for its frames.

        Cancelled or failed, the stream is forgotten; if the server may still open it,
        this client detaches (and ends stdin it would have sent), so the server stops
        sending on it: a process keeps running, unattached.
        """
        stream_id = next(self._stream_ids)
        self.streams[stream_id] = stream
        try:
            result = await self.call(method, stream=stream_id, **args)
        except BaseException:
            self.streams.pop(stream_id, None)
            closing = (P.StdinClose, P.Detach) if stream.io.stdin is not None else (P.Detach,)
            await self._abandon(stream_id, *closing)
            raise
        return result, stream_id

    async def open_process(self, method: str, io: ProcessIO, **args: Any) -> tuple[str, _Stream, int]:
        """Run or attach; see ``open_stream`` for what a cancelled call leaves behind."""
        stream = _Stream(io)
        result, stream_id = await self.open_stream(
            method, stream, stdin=io.stdin is not None, stdout=io.stdout is not None,
            stderr=io.stderr is not None, **args)
        self.nursery.start_soon(self._deliver, stream_id, stream)
        if io.stdin is not None:
            self.nursery.start_soon(self._feed_stdin, stream_id, stream, io.stdin)
        return result["process_id"], stream, stream_id

    @asynccontextmanager
    async def subscribe(self, handle: str | None, lifecycle: bool = False) -> AsyncIterator[AsyncIterator[Any]]:
        """An ``events`` stream: the frames' ``data``, for one container or for all (see
        ``Client.events`` and ``Client.watch``). Leaving the block detaches, which the server
        takes as unsubscribing."""
        stream = _Stream(ProcessIO())
        args: dict[str, Any] = {"lifecycle": True} if lifecycle else {}  # older servers know no lifecycle
        _, stream_id = await self.open_stream("events", stream, handle=handle or "", **args)

        async def frames() -> AsyncIterator[Any]:
            async for item in stream.output_receive:
                data = item[1] if item is not None else None
                if isinstance(data, dict):
                    yield data
            if stream.error is not None:
                raise stream.error

        try:
            yield frames()
        finally:
            if stream_id in self.streams and self.lost is None:
                self.streams.pop(stream_id, None)
                with trio.CancelScope(shield=True), contextlib.suppress(GardenError):
                    await self.send(P.Detach(stream_id))

    async def call_with_events(self, method: str, on_event: Callable[[Any], None], **args: Any) -> Any:
        """A call given a stream on which the server sends ``event`` frames before its
        reply (``pull``'s progress): each frame's data goes to ``on_event`` as it arrives,
        all of them before this returns the reply.

        Cancelled, it raises ``trio.Cancelled`` and detaches: the server stops sending
        events, and the call runs to completion there (its answer is dropped).
        """
        stream = _Stream(ProcessIO())

        async def deliver(_: int) -> None:
            async for item in stream.output_receive:
                if item is not None:
                    on_event(item[1])

        def drain(_: trio.Nursery) -> None:
            # Frames come in order: after a reply, every event of the call is queued and
            # its exit has closed the queue; after an error reply, nothing more comes.
            stream.output_send.close()

        return await self._call_on_stream(method, args, stream, deliver, drain, P.Detach)

    async def _deliver(self, stream_id: int, stream: _Stream) -> None:
        """Hand output to the sinks, returning credit only once a sink has taken it."""
        try:
            async for item in stream.output_receive:
                if item is None:
                    break
                fd, data = item
                sink = stream.io.stdout if fd == 1 else stream.io.stderr
                if sink is not None:
                    await sink.send_all(data)
                if stream_id in self.streams and self.lost is None:
                    try:
                        await self.send(P.Credit(stream_id, len(data)))
                    except (GardenError, P.LocalProtocolError):
                        pass
        finally:
            stream.finished.set()

    async def _feed_stdin(self, stream_id: int, stream: _Stream, stdin: bytes | AsyncIterable[bytes]) -> None:
        try:
            chunks = _chunks(stdin)
            async for data in chunks:
                view = memoryview(data)
                while view:
                    while (credit := self.proto.stdin_credit(stream_id)) <= 0:
                        if stream_id not in self.streams or self.lost is not None:
                            return
                        stream.stdin_credit = trio.Event()
                        await stream.stdin_credit.wait()
                    n = min(credit, P.MAX_DATA_CHUNK)
                    await self.send(P.Stdin(stream_id, bytes(view[:n])))
                    view = view[n:]
            if stream_id in self.streams:
                await self.send(P.StdinClose(stream_id))
        except (GardenError, P.LocalProtocolError):
            pass  # the process ended or the connection went away; stdin no longer matters


async def _container_events(frames: AsyncIterator[Any]) -> AsyncIterator[ContainerEvent]:
    async for data in frames:
        yield from_wire(ContainerEvent, data)


async def _chunks(stdin: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(stdin, bytes | bytearray | memoryview):
        data = bytes(stdin)
        for i in range(0, len(data), P.MAX_DATA_CHUNK):
            yield data[i:i + P.MAX_DATA_CHUNK]
        return
    async for chunk in stdin:
        if chunk:
            yield bytes(chunk)


class Process:
    def __init__(self, container: Container, process_id: str, stream: _Stream) -> None:
        self._container = container
        self.id = process_id
        self._stream = stream

    async def wait(self) -> int:
        """The exit code, once every byte of output has reached the sinks.

        Cancelling a wait cancels only the wait: the process runs on, its output still
        flows to the sinks, and a later ``wait()`` returns the code."""
        await self._stream.finished.wait()
        if self._stream.code is None:
            raise self._stream.error or GardenError(f"process {self.id}: stream ended without an exit status")
        return self._stream.code

    async def signal(self, signal: Signal) -> None:
        await self._container._call("signal", process_id=self.id, signal=int(signal))

    async def set_tty(self, tty: TTYSpec) -> None:
        await self._container._call("set_tty", process_id=self.id, tty=to_wire(tty))


class Container:
    def __init__(self, conn: Connection, handle: str) -> None:
        self._conn = conn
        self.handle = handle

    def __repr__(self) -> str:
        return f"Container({self.handle!r})"

    async def _call(self, method: str, **args: Any) -> Any:
        return await self._conn.call(method, handle=self.handle, **args)

    async def stop(self, kill: bool = False) -> None:
        await self._call("stop", kill=kill)

    async def info(self) -> ContainerInfo:
        return from_wire(ContainerInfo, await self._call("info"))

    async def run(self, spec: ProcessSpec, io: ProcessIO | None = None) -> Process:
        """Start a process; its output flows to ``io``'s sinks until it exits.

        Cancelled, it raises ``trio.Cancelled``. If the server started the process it
        keeps running, unattached (``attach`` finds it by ``spec.id``): the client
        detaches from its stream and, if ``io.stdin`` was given, ends its stdin."""
        process_id, stream, _ = await self._conn.open_process("run", io or ProcessIO(), handle=self.handle,
                                                              spec=to_wire(spec))
        return Process(self, process_id, stream)

    async def attach(self, process_id: str, io: ProcessIO | None = None) -> Process:
        pid, stream, _ = await self._conn.open_process("attach", io or ProcessIO(), handle=self.handle,
                                                       process_id=process_id)
        return Process(self, pid, stream)

    @asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribe to the container's events (Garden's ``"Out of memory"``) from now on.

        ``async with c.events() as events: async for event in events: ...``; the
        iteration ends when the container is destroyed. Leaving the block unsubscribes.
        """
        async with self._conn.subscribe(self.handle) as frames:

            async def events() -> AsyncIterator[str]:
                async for data in frames:
                    yield str(data.get("event", ""))

            yield events()

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[ContainerEvent]]:
        """This container's lifecycle events (``Client.watch(handle)``) until it is destroyed."""
        async with self._conn.subscribe(self.handle, lifecycle=True) as frames:
            yield _container_events(frames)

    async def metrics(self) -> Metrics:
        return from_wire(Metrics, await self._call("metrics"))

    async def set_grace_time(self, seconds: float) -> None:
        await self._call("set_grace_time", seconds=float(seconds))

    async def properties(self) -> dict[str, str]:
        return dict(await self._call("properties"))

    async def property(self, name: str) -> str:
        return str(await self._call("property", name=name))

    async def set_property(self, name: str, value: str) -> None:
        await self._call("set_property", name=name, value=value)

    async def remove_property(self, name: str) -> None:
        await self._call("remove_property", name=name)

    async def limit_memory(self, limits: MemoryLimits) -> None:
        await self._call("limit_memory", limits=to_wire(limits))

    async def current_memory_limits(self) -> MemoryLimits:
        return from_wire(MemoryLimits, await self._call("current_memory_limits"))

    async def limit_cpu(self, limits: CPULimits) -> None:
        await self._call("limit_cpu", limits=to_wire(limits))

    async def current_cpu_limits(self) -> CPULimits:
        return from_wire(CPULimits, await self._call("current_cpu_limits"))

    async def limit_bandwidth(self, limits: BandwidthLimits) -> None:
        await self._call("limit_bandwidth", limits=to_wire(limits))

    async def current_bandwidth_limits(self) -> BandwidthLimits:
        return from_wire(BandwidthLimits, await self._call("current_bandwidth_limits"))

    async def current_disk_limits(self) -> DiskLimits:
        return from_wire(DiskLimits, await self._call("current_disk_limits"))

    async def net_in(self, host_port: int = 0, container_port: int = 0) -> tuple[int, int]:
        result = await self._call("net_in", host_port=host_port, container_port=container_port)
        return int(result[0]), int(result[1])

    async def net_out(self, rule: NetOutRule) -> None:
        await self._call("net_out", rule=to_wire(rule))

    async def bulk_net_out(self, rules: list[NetOutRule]) -> None:
        await self._call("bulk_net_out", rules=[to_wire(r) for r in rules])

    async def stream_in(self, spec: StreamInSpec) -> None:
        """Extract ``spec.tar_stream`` (bytes or an async iterable of bytes, an uncompressed
        tar) into ``spec.path`` as ``spec.user``; returns once it is all written.

        Cancelled, it raises ``trio.Cancelled`` and ends the input early: files the
        server extracted before it stay, the rest of the archive is not sent."""
        if spec.tar_stream is None:
            raise GardenError("stream_in needs a tar_stream")
        await self._conn.stream_in(spec.tar_stream, handle=self.handle, path=spec.path, user=spec.user)

    async def stream_out(self, spec: StreamOutSpec) -> TarStream:
        """A tar of ``spec.path`` (``path/`` for its contents): iterate it for bytes chunks.

        Raises GardenError if the path cannot be archived (it does not exist, say).
        Cancelled, it raises ``trio.Cancelled`` and detaches from the stream, which
        makes the server stop sending; the connection stays usable. Cancelling the
        iteration leaves the stream open until it is closed (``async with`` does)."""
        stream = _Stream(ProcessIO())
        _, stream_id = await self._conn.open_stream("stream_out", stream, handle=self.handle,
                                                    path=spec.path, user=spec.user)
        return TarStream(self._conn, stream_id, stream)


class TarStream:
    """The chunks of a stream_out; an async iterable and an async context manager.

    Credit goes back to the server as chunks are consumed, so an unread stream pauses
    tar in the container rather than filling memory. Leaving the context early stops it.
    """

    def __init__(self, conn: Connection, stream_id: int, stream: _Stream) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._stream = stream

    async def __aenter__(self) -> TarStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream_id in self._conn.streams and self._conn.lost is None:
            self._conn.streams.pop(self._stream_id, None)
            with trio.CancelScope(shield=True), contextlib.suppress(GardenError):
                await self._conn.send(P.Detach(self._stream_id))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for item in self._stream.output_receive:
            if item is None:
                break
            yield item[1]
            if self._stream_id in self._conn.streams and self._conn.lost is None:
                with contextlib.suppress(GardenError, P.LocalProtocolError):
                    await self._conn.send(P.Credit(self._stream_id, len(item[1])))
        if self._stream.code is None:
            raise self._stream.error or GardenError("stream_out ended without a status")


class Client:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def ping(self) -> None:
        await self._conn.call("ping")

    async def capacity(self) -> Capacity:
        return from_wire(Capacity, await self._conn.call("capacity"))

    async def images(self) -> list[ImageInfo]:
        """The server's image store: one entry per image, with the containers using it."""
        return [from_wire(ImageInfo, i) for i in await self._conn.call("images")]

    async def pull(self, uri: str, username: str = "", password: str = "",
                   progress: Callable[[LayerProgress], None] | None = None) -> ImageInfo:
        """Fetch an image into the server's store (a registry login for ``docker://``);
        raises GardenError naming the image. ``progress`` is called, before this returns,
        with each report the server sends: a ``LayerProgress`` of one layer (every layer
        once as soon as the manifest is known, then as its bytes arrive; ``done`` grows
        to ``total``). Cancelled: the pull goes on on the server (no more reports)."""
        login = {"uri": uri, "username": username, "password": password}
        if progress is None:
            return from_wire(ImageInfo, await self._conn.call("pull", **login))

        def report(data: Any) -> None:
            progress(from_wire(LayerProgress, data))

        return from_wire(ImageInfo, await self._conn.call_with_events("pull", report, **login))

    async def prune_images(self) -> list[str]:
        """Remove every image and layer no container uses; returns the removed images'
        paths and layers' digests. Cancelled: the prune goes on on the server."""
        removed: list[str] = await self._conn.call("prune_images")
        return removed

    async def create(self, spec: ContainerSpec | None = None) -> Container:
        """Create a container; raises GardenError if the server cannot.

        Cancelled, it raises ``trio.Cancelled`` and the create goes on on the server: the
        container appears (and its grace time applies) or the create fails; only a
        ``spec.handle`` given here lets this client find it."""
        result = await self._conn.call("create", spec=to_wire(spec or ContainerSpec()))
        return Container(self._conn, result["handle"])

    async def destroy(self, handle: str) -> None:
        await self._conn.call("destroy", handle=handle)

    async def containers(self, properties: dict[str, str] | None = None) -> list[Container]:
        handles = await self._conn.call("containers", properties=properties or {})
        return [Container(self._conn, h) for h in handles]

    async def lookup(self, handle: str) -> Container:
        result = await self._conn.call("lookup", handle=handle)
        return Container(self._conn, result["handle"])

    async def bulk_info(self, handles: list[str]) -> dict[str, ContainerInfoEntry]:
        raw = await self._conn.call("bulk_info", handles=list(handles))
        return {h: ContainerInfoEntry(
            info=from_wire(ContainerInfo, e["info"]) if e.get("info") is not None else None,
            err=error_from_wire(e["err"]) if e.get("err") else None) for h, e in raw.items()}

    @asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        """Every container's events as ``(handle, event)`` pairs, from now on, until the
        block is left: ``async with client.events() as events: async for h, e in events:``."""
        async with self._conn.subscribe(None) as frames:

            async def pairs() -> AsyncIterator[tuple[str, str]]:
                async for data in frames:
                    yield str(data.get("handle", "")), str(data.get("event", ""))

            yield pairs()

    @asynccontextmanager
    async def watch(self, handle: str | None = None) -> AsyncIterator[AsyncIterator[ContainerEvent]]:
        """Lifecycle events from now on, of the container ``handle`` or (None) of every
        container: ``async with client.watch() as events: async for event in events:``.

        Each is a ``ContainerEvent`` (``kind``: ``created``, ``destroyed``, ``stopped``,
        ``broken``, ``oom``, ``oom_victim``, ``process_started``, ``process_exited``), in
        the order the server published them. A one-container iteration ends after its
        ``destroyed``. A subscriber that reads too slowly is not dropped: it gets a
        ``missed`` event saying how many events it did not get, then the later ones.
        Raises ContainerNotFoundError for an unknown handle. Leaving the block (or
        disconnecting) unsubscribes; cancelled while subscribing, nothing stays subscribed.
        """
        async with self._conn.subscribe(handle, lifecycle=True) as frames:
            yield _container_events(frames)

    async def bulk_metrics(self, handles: list[str]) -> dict[str, ContainerMetricsEntry]:
        raw = await self._conn.call("bulk_metrics", handles=list(handles))
        return {h: ContainerMetricsEntry(
            metrics=from_wire(Metrics, e["metrics"]) if e.get("metrics") is not None else None,
            err=error_from_wire(e["err"]) if e.get("err") else None) for h, e in raw.items()}


UNIX_SCHEMES = ("unix://", "ws+unix://")
CONNECT_TIMEOUT = 60.0  # to connect and complete the handshakes (trio-websocket's default)


@asynccontextmanager
async def connect(url: str = "ws://127.0.0.1:7777", token: str | None = None,
                  ssl: Any = None) -> AsyncIterator[Client]:
    """Connect to a gactor server: ``ws://HOST:PORT``, ``wss://HOST:PORT`` (verified with
    the ``ssl.SSLContext`` given as ``ssl``, else the system's trust store), or a unix
    socket, ``unix:///PATH`` or ``ws+unix:///PATH``. ``token`` is sent as a bearer token.

    Raises GardenError (never a transport error or group); a cancelled connect or a
    cancelled block raises ``trio.Cancelled``. Leaving the block closes the connection:
    streams still open end, processes on the server keep running.
    """
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else None
    try:
        async with trio.open_nursery() as nursery:
            try:
                ws_cm = _open_websocket(url, ssl, headers)
                ws = await ws_cm.__aenter__()
            except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError,
                    BaseExceptionGroup) as err:
                raise ConnectionLostError(f"cannot connect to {url}: {_connect_failure(err)}") from None
            try:
                conn = Connection(ws, nursery)
                nursery.start_soon(conn.read_forever)
                yield Client(conn)
            finally:
                # Close the websocket first: its close handshake needs its reader task alive.
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                    try:
                        await ws_cm.__aexit__(None, None, None)
                    except BaseException:  # noqa: BLE001 - closing a dead socket is not an error
                        pass
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


@asynccontextmanager
async def _open_websocket(url: str, ssl_context: Any, headers: list[tuple[bytes, bytes]] | None
                          ) -> AsyncIterator[WebSocketConnection]:
    """A client websocket to ``url``, its reader task in this block's nursery.

    The stream is opened here rather than by trio-websocket, which dials only TCP and
    starts TLS lazily (a certificate it rejects shows up only at its 60 s timeout): a
    unix socket is dialled directly, and TLS is handshaken before the websocket's.
    """
    target = _parse_url(url)
    async with trio.open_nursery() as nursery:
        stream: trio.abc.Stream
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if isinstance(target, str):
                    stream = await trio.open_unix_socket(target)
                    host_header, resource = "localhost", "/"
                else:
                    tls, host, port, host_header, resource = target
                    stream = await trio.open_tcp_stream(host, port)
                    if tls:
                        stream = trio.SSLStream(stream, ssl_context or _ssl.create_default_context(),
                                                server_hostname=host, https_compatible=True)
                        try:
                            await stream.do_handshake()
                        except BaseException:
                            await trio.aclose_forcefully(stream)
                            raise
                watched = WatchedStream(stream, None)
                try:
                    with trio.CancelScope() as handshake:
                        watched.on_end = handshake.cancel
                        ws = await wrap_client_stream(
                            nursery, watched, host_header, resource, extra_headers=headers,  # type: ignore[arg-type]
                            max_message_size=P.MAX_FRAME_BYTES, receive_buffer_size=RECEIVE_BUFFER)
                        watched.on_end = None
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                if handshake.cancelled_caught:
                    await trio.aclose_forcefully(stream)
                    raise HandshakeError("the server closed the connection during the handshake")
        except trio.TooSlowError:
            raise HandshakeError(f"no websocket handshake within {CONNECT_TIMEOUT} s") from None
        try:
            yield ws
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose()
            nursery.cancel_scope.cancel()


def _parse_url(url: str) -> str | tuple[bool, str, int, str, str]:
    """A unix socket's path, or (tls, host, port, Host header, resource) of a ws(s) URL."""
    for scheme in UNIX_SCHEMES:
        if url.startswith(scheme):
            path = url[len(scheme):]
            if not path.startswith("/"):
                raise HandshakeError(f"a unix socket URL needs an absolute path: unix:///{path}")
            return path
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise HandshakeError("the URL must be ws://HOST:PORT, wss://HOST:PORT or unix:///PATH")
    tls = parts.scheme == "wss"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as err:
        raise HandshakeError(str(err)) from None
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return tls, parts.hostname, port, parts.netloc.rpartition("@")[2], resource


def _connect_failure(err: BaseException) -> str:
    """Why a connection attempt failed, in words (a refusal says the server's reason)."""
    if isinstance(err, BaseExceptionGroup):
        leaf = _unwrap(err)
        if isinstance(leaf, trio.Cancelled):
            raise leaf
        if not isinstance(leaf, OSError | HandshakeError | ConnectionClosed | trio.BrokenResourceError):
            raise leaf
        err = leaf
    if isinstance(err, ConnectionRejected):
        body = (err.body or b"").decode("utf-8", "replace").strip()
        return f"the server refused the handshake ({err.status_code})" + (f": {body}" if body else "")
    return str(err) or str(err.__cause__ or err.__context__ or type(err).__name__)


def _unwrap(group: BaseExceptionGroup) -> BaseException:
    """The single meaningful exception inside trio's groups; GardenError if several.

    Cancellation is never turned into an error: a group of nothing but ``Cancelled``
    yields one of them, and errors win over cancellation as they do in trio.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    errors = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if not errors:
        # Only cancellation: re-raise trio's own Cancelled so the cancel scope that
        # caused it catches it, exactly as if there had been no nursery in between.
        return leaves[0]
    if len(errors) == 1:
        return errors[0]
    for error in errors:
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: keep them
            return error
    return GardenError("; ".join(str(e) for e in errors))


__all__ = ["Client", "Container", "Process", "ProcessIO", "TarStream", "connect"]
