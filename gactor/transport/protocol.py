"""The gactor wire protocol, sans-IO: bytes in, events out, no trio and no sockets.

One websocket binary message is one frame: one msgpack map whose ``"t"`` names its
type. A ``Connection`` turns events into frames (``send``) and frames into events
(``receive_data`` + ``next_event``) and enforces the rules below on both directions.
``docs/protocol.md`` describes the same protocol for clients in other languages.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from gactor.errors import GardenError, error_from_wire, error_to_wire

MAX_FRAME_BYTES = 4 << 20  # one encoded frame
MAX_DATA_CHUNK = 1 << 20  # the ``data`` of one output or stdin frame
INITIAL_WINDOW = 4 << 20  # output and stdin credit of a freshly opened stream; several chunks in flight
MAX_CREDIT = 1 << 30  # most credit a stream may hold in either direction


class LocalProtocolError(Exception):
    """We tried to send something the protocol does not allow; nothing was sent."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    OPEN = "open"
    STDIN_CLOSED = "stdin closed"  # the client sent stdin_close; output still flows
    DETACHED = "detached"  # the client stopped listening; frames in flight are dropped
    CLOSED = "closed"  # exit or an error reply; nothing more on this stream


@dataclass(frozen=True, slots=True)
class Call:
    id: int
    method: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    error: GardenError


@dataclass(frozen=True, slots=True)
class Output:
    stream: int
    fd: int  # 1 stdout, 2 stderr
    data: bytes


@dataclass(frozen=True, slots=True)
class Exit:
    stream: int
    code: int | None  # None when the stream ended without a status ...
    error: GardenError | None = None  # ... and this says why


@dataclass(frozen=True, slots=True)
class Credit:
    stream: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Stdin:
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StdinClose:
    stream: int


@dataclass(frozen=True, slots=True)
class Detach:
    stream: int


@dataclass(frozen=True, slots=True)
class Event:
    """A server-pushed event on a subscription stream; events take no credit."""

    stream: int
    data: Any


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; the connection yields nothing after this."""

    message: str


WireEvent = Call | Reply | ErrorReply | Output | Exit | Credit | Stdin | StdinClose | Detach | Event
StreamEvent = Output | Exit | Credit | Stdin | StdinClose | Detach | Event

CLIENT, SERVER = Role.CLIENT, Role.SERVER
OPEN, STDIN_CLOSED, DETACHED, CLOSED = StreamState

# ---- The rules ---------------------------------------------------------------------

# Who may send which frames.
SENDS: dict[Role, frozenset[type[WireEvent]]] = {
    CLIENT: frozenset({Call, Stdin, StdinClose, Credit, Detach}),
    SERVER: frozenset({Reply, ErrorReply, Output, Exit, Credit, Event}),
}

# Whose credit a credit frame adds to: the client grants output, the server stdin.
# Output and stdin each spend their own credit, INITIAL_WINDOW when a stream opens.
CREDITS: dict[Role, type[Output | Stdin]] = {CLIENT: Output, SERVER: Stdin}

# What each role may send on a stream in each state, and the state that follows.
# A stream opens (OPEN) with a call whose args hold "stream"; an error reply to that
# call closes it. Anything not listed is a violation.
STREAM_TRANSITIONS: dict[Role, dict[StreamState, dict[type[StreamEvent], StreamState]]] = {
    CLIENT: {
        OPEN: {Stdin: OPEN, StdinClose: STDIN_CLOSED, Credit: OPEN, Detach: DETACHED},
        STDIN_CLOSED: {Credit: STDIN_CLOSED, Detach: DETACHED},
        DETACHED: {},
    },
    SERVER: {
        OPEN: {Output: OPEN, Event: OPEN, Credit: OPEN, Exit: CLOSED},
        STDIN_CLOSED: {
            Output: STDIN_CLOSED,
            Event: STDIN_CLOSED,
            Credit: STDIN_CLOSED,
            Exit: CLOSED,
        },
        # Only the client holds DETACHED: what the server sent before it saw the
        # detach is dropped there, silently.
        DETACHED: {Output: DETACHED, Event: DETACHED, Credit: DETACHED, Exit: CLOSED},
    },
}

# States in which each role stops tracking a stream. The server forgets a detached
# stream at once. Client frames for a stream the server no longer tracks (it sent exit
# or an error reply, or the client detached it: any id not above the newest) are
# dropped, never violations: they race with the exit, and with the client's own tasks
# (a reader returning credit while another detaches). The client itself sends nothing
# once it has detached (its DETACHED row is empty). docs/protocol.md says the same.
FORGOTTEN: dict[Role, frozenset[StreamState]] = {
    CLIENT: frozenset({CLOSED}),
    SERVER: frozenset({DETACHED, CLOSED}),
}

# ---- Field checks: each returns the decoded value or raises _Broken ----------------


class _Broken(Exception):
    """A rule was broken; the message names which."""


Check = Callable[[str, Any], Any]


def _integer(key: str, value: Any) -> int:
    if type(value) is not int:  # bool is an int subclass; refuse it
        raise _Broken(f"field {key!r} must be an integer, not {type(value).__name__}")
    return value


def _id(key: str, value: Any) -> int:
    if _integer(key, value) < 0:
        raise _Broken(f"field {key!r} must not be negative")
    return int(value)


def _positive(key: str, value: Any) -> int:
    if _integer(key, value) < 1:
        raise _Broken(f"field {key!r} must be positive")
    return int(value)


def _fd(key: str, value: Any) -> int:
    if _integer(key, value) not in (1, 2):
        raise _Broken(f"field {key!r} must be 1 (stdout) or 2 (stderr), not {value}")
    return int(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Broken(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Broken(f"field {key!r} must be a map, not {type(value).__name__}")
    return value


def _chunk(key: str, value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise _Broken(f"field {key!r} must be binary, not {type(value).__name__}")
    if len(value) > MAX_DATA_CHUNK:
        raise _Broken(
            f"field {key!r} holds {len(value)} bytes, over the {MAX_DATA_CHUNK}-byte chunk limit"
        )
    return value if type(value) is bytes else bytes(value)  # no copy of what is bytes already


def _anything(key: str, value: Any) -> Any:
    return value


def _garden_error(key: str, value: Any) -> GardenError:
    return error_from_wire(_mapping(key, value))


class _Optional(NamedTuple):
    """A field that may be absent or nil (read as None); otherwise ``check`` applies."""

    check: Check


# Every frame type, its event and its fields (wire key -> check).
FRAMES: dict[str, tuple[type[WireEvent], dict[str, Check | _Optional]]] = {
    "call": (Call, {"id": _id, "method": _text, "args": _mapping}),
    "reply": (Reply, {"id": _id, "result": _anything}),
    "error": (ErrorReply, {"id": _id, "error": _garden_error}),
    "output": (Output, {"stream": _id, "fd": _fd, "data": _chunk}),
    "exit": (Exit, {"stream": _id, "code": _Optional(_integer), "error": _Optional(_garden_error)}),
    "credit": (Credit, {"stream": _id, "bytes": _positive}),
    "stdin": (Stdin, {"stream": _id, "data": _chunk}),
    "stdin_close": (StdinClose, {"stream": _id}),
    "detach": (Detach, {"stream": _id}),
    "event": (Event, {"stream": _id, "data": _anything}),
}
_ATTRS = {"bytes": "nbytes"}  # wire keys whose event attribute is named otherwise
_NAMES: dict[type[WireEvent], str] = {cls: name for name, (cls, _) in FRAMES.items()}


def _check_size(frame: bytes) -> None:
    if len(frame) > MAX_FRAME_BYTES:
        raise _Broken(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not used by the protocol")


def _from_wire(frame: Any) -> WireEvent:
    """Check one decoded frame field by field; raises _Broken naming the first problem."""
    if not isinstance(frame, dict):
        raise _Broken(f"frame must be a map, not {type(frame).__name__}")
    if "t" not in frame:
        raise _Broken("frame has no 't' field")
    name = frame["t"]
    if not isinstance(name, str) or name not in FRAMES:
        raise _Broken(f"unknown frame type {name!r}")
    cls, fields = FRAMES[name]
    unknown = frame.keys() - {"t", *fields}
    if unknown:
        raise _Broken(f"'{name}' frame has unknown field {next(iter(unknown))!r}")
    values: dict[str, Any] = {}
    for key, check in fields.items():
        attr, value = _ATTRS.get(key, key), frame.get(key)
        if isinstance(check, _Optional):
            values[attr] = None if value is None else check.check(key, value)
        elif key not in frame:
            raise _Broken(f"'{name}' frame is missing field {key!r}")
        else:
            values[attr] = check(key, value)
    if name == "exit" and (values["code"] is None) == (values["error"] is None):
        raise _Broken("'exit' frame must carry exactly one of 'code' and 'error'")
    return cls(**values)


def _to_wire(event: WireEvent) -> dict[str, Any]:
    name = _NAMES.get(type(event))
    if name is None:
        raise _Broken(f"{type(event).__name__} is not a frame")
    wire: dict[str, Any] = {"t": name}
    for key, check in FRAMES[name][1].items():
        value = getattr(event, _ATTRS.get(key, key))
        if isinstance(check, _Optional):
            if value is None:
                continue
            check = check.check
        if check is _garden_error:
            if not isinstance(value, GardenError):
                raise _Broken(f"field {key!r} must be a GardenError, not {type(value).__name__}")
            value = error_to_wire(value)
        wire[key] = value
    return wire


@dataclass(slots=True)
class _Stream:
    state: StreamState = OPEN
    credit: dict[type[Output | Stdin], int] = field(
        default_factory=lambda: {Output: INITIAL_WINDOW, Stdin: INITIAL_WINDOW}
    )


class Connection:
    """Both ends of one connection's rules, seen from ``role``; holds no I/O resources."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.peer_role = SERVER if role is CLIENT else CLIENT
        self._calls: dict[int, int | None] = {}  # outstanding call id -> stream it opened
        self._streams: dict[int, _Stream] = {}
        self._newest_stream = -1  # stream ids must increase, so none is ever ambiguous
        self._events: deque[WireEvent | ProtocolViolation] = deque()
        self._broken = False

    @property
    def broken(self) -> bool:
        """True once the peer broke the protocol; the connection should then be closed."""
        return self._broken

    def stream_state(self, stream: int) -> StreamState:
        """The stream's state as this end sees it; CLOSED for streams not tracked."""
        entry = self._streams.get(stream)
        return CLOSED if entry is None else entry.state

    def output_credit(self, stream: int) -> int:
        """Output bytes the server may still send on ``stream``; 0 if it is not open."""
        entry = self._streams.get(stream)
        return 0 if entry is None else entry.credit[Output]

    def stdin_credit(self, stream: int) -> int:
        """Stdin bytes the client may still send on ``stream``; 0 if it is not open."""
        entry = self._streams.get(stream)
        return 0 if entry is None else entry.credit[Stdin]

    def send(self, event: WireEvent) -> bytes:
        """Encode ``event`` as one frame for the caller to send, and apply its effects.

        Raises LocalProtocolError, leaving the state untouched, if this role may not
        send ``event`` now (wrong direction, bad field, stream not open, out of credit,
        frame too large) or if the connection is broken.
        """
        if self._broken:
            raise LocalProtocolError("the connection is broken; close it")
        try:
            wire = _to_wire(event)
            _from_wire(wire)  # the same field checks the peer will apply
            try:
                frame: bytes = msgpack.packb(wire, use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise _Broken(f"cannot encode '{wire['t']}' frame: {exc}") from None
            _check_size(frame)
            self._apply(self.role, event)
        except _Broken as exc:
            raise LocalProtocolError(str(exc)) from None
        return frame

    def receive_data(self, data: bytes) -> None:
        """Take one whole frame from the peer; never raises.

        A frame breaking the rules queues a ProtocolViolation and marks the connection
        broken; data received after that is ignored.
        """
        if self._broken:
            return
        try:
            _check_size(data)
            try:
                frame = msgpack.unpackb(data, raw=False, ext_hook=_refuse_ext)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise _Broken(f"frame is not valid msgpack: {exc}") from None
            event = _from_wire(frame)
            if self._apply(self.peer_role, event):
                self._events.append(event)
        except _Broken as exc:
            self._broken = True
            self._events.append(ProtocolViolation(str(exc)))

    def next_event(self) -> WireEvent | ProtocolViolation | None:
        """The next event received, in order, or None when there is none yet."""
        return self._events.popleft() if self._events else None

    def _apply(self, sender: Role, event: WireEvent) -> bool:
        """Check ``event`` against the rules and update the state; False: drop it."""
        name = _NAMES[type(event)]
        if type(event) not in SENDS[sender]:
            raise _Broken(f"the {sender.value} may not send '{name}' frames")
        if isinstance(event, Call):
            self._open_call(event)
            return True
        if isinstance(event, Reply | ErrorReply):
            if event.id not in self._calls:
                raise _Broken(f"'{name}' for unknown call id {event.id}")
            stream = self._calls.pop(event.id)
            if isinstance(event, ErrorReply) and stream is not None:
                self._streams.pop(stream, None)
            return True
        return self._on_stream(sender, name, event)

    def _open_call(self, call: Call) -> None:
        if call.id in self._calls:
            raise _Broken(f"call id {call.id} is already outstanding")
        stream = None
        if "stream" in call.args:
            stream = _id("args.stream", call.args["stream"])
            if stream <= self._newest_stream:
                newest = self._newest_stream
                raise _Broken(f"stream {stream} does not follow stream {newest}; ids must increase")
            self._streams[stream] = _Stream()
            self._newest_stream = stream
        self._calls[call.id] = stream

    def _on_stream(self, sender: Role, name: str, event: StreamEvent) -> bool:
        n = event.stream
        entry = self._streams.get(n)
        if entry is None:
            if sender is CLIENT and self.role is SERVER and n <= self._newest_stream:
                return False  # late: sent before it saw our exit or error, or after its detach
            raise _Broken(f"stream {n} is not open")
        following = STREAM_TRANSITIONS[sender][entry.state].get(type(event))
        if following is None:
            raise _Broken(f"'{name}' is not allowed on stream {n} once it is {entry.state.value}")
        if entry.state is DETACHED:  # only the client gets here
            if following is CLOSED:
                del self._streams[n]
            return False
        if isinstance(event, Output | Stdin):
            left = entry.credit[type(event)] - len(event.data)
            if left < 0:
                raise _Broken(f"{name} on stream {n} exceeds its credit by {-left} bytes")
            entry.credit[type(event)] = left
        elif isinstance(event, Credit):
            window = entry.credit[CREDITS[sender]] + event.nbytes
            if window > MAX_CREDIT:
                raise _Broken(
                    f"credit on stream {n} would raise its window to {window} bytes,"
                    f" over the {MAX_CREDIT}-byte limit"
                )
            entry.credit[CREDITS[sender]] = window
        if following in FORGOTTEN[self.role]:
            del self._streams[n]
        else:
            entry.state = following
        return True
