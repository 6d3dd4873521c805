"""The sans-IO wire protocol: round trips, violations, credit and local refusals."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from gactor.errors import (
    ContainerNotFoundError,
    GardenError,
    ProcessNotFoundError,
    ServiceUnavailableError,
)
from gactor.transport.protocol import (
    INITIAL_WINDOW,
    MAX_CREDIT,
    MAX_DATA_CHUNK,
    MAX_FRAME_BYTES,
    Call,
    Connection,
    Credit,
    Detach,
    ErrorReply,
    Event,
    Exit,
    LocalProtocolError,
    Output,
    ProtocolViolation,
    Reply,
    Role,
    Stdin,
    StdinClose,
    StreamState,
    WireEvent,
)


def pair() -> tuple[Connection, Connection]:
    return Connection(Role.CLIENT), Connection(Role.SERVER)


def deliver(sender: Connection, receiver: Connection, event: WireEvent) -> Any:
    """Send ``event`` across and return exactly what the receiver yields for it."""
    receiver.receive_data(sender.send(event))
    got = receiver.next_event()
    assert receiver.next_event() is None
    return got


def raw(receiver: Connection, frame: Any) -> Any:
    """Feed a hand-made frame, bypassing the sender's checks."""
    data = frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True)
    receiver.receive_data(data)
    return receiver.next_event()


def violation(receiver: Connection, frame: Any) -> str:
    got = raw(receiver, frame)
    assert isinstance(got, ProtocolViolation), got
    assert receiver.broken
    return got.message


def open_stream(stream: int = 3, call_id: int = 1) -> tuple[Connection, Connection]:
    client, server = pair()
    deliver(client, server, Call(call_id, "run", {"handle": "h", "stream": stream}))
    deliver(server, client, Reply(call_id, {"process_id": "p"}))
    return client, server


# ---- round trips ---------------------------------------------------------------------


def test_call_and_reply_round_trip() -> None:
    client, server = pair()
    call = Call(1, "create", {"spec": {"handle": "h", "properties": {"a": "b"}}})
    assert deliver(client, server, call) == call
    assert deliver(server, client, Reply(1, {"handle": "h"})) == Reply(1, {"handle": "h"})
    deliver(client, server, Call(2, "ping", {}))
    assert deliver(server, client, Reply(2, None)) == Reply(2, None)


@pytest.mark.parametrize(
    "error",
    [
        ContainerNotFoundError("box"),
        ProcessNotFoundError("p-7"),
        ServiceUnavailableError("busy"),
        GardenError("x"),
    ],
)
def test_error_reply_round_trip_keeps_type_and_fields(error: GardenError) -> None:
    client, server = pair()
    deliver(client, server, Call(1, "info", {"handle": "box"}))
    got = deliver(server, client, ErrorReply(1, error))
    assert got == ErrorReply(1, error)
    assert type(got.error) is type(error)
    assert getattr(got.error, "handle", None) == getattr(error, "handle", None)
    assert getattr(got.error, "process_id", None) == getattr(error, "process_id", None)


def test_error_wire_form_is_gardens() -> None:
    client, server = pair()
    deliver(client, server, Call(1, "info", {"handle": "box"}))
    frame = msgpack.unpackb(server.send(ErrorReply(1, ContainerNotFoundError("box"))), raw=False)
    assert frame == {
        "t": "error",
        "id": 1,
        "error": {
            "Type": "ContainerNotFoundError",
            "Message": "unknown handle: box",
            "Handle": "box",
            "ProcessID": "",
            "Binary": "",
        },
    }


def test_stream_events_round_trip() -> None:
    client, server = open_stream(3)
    for event in (
        Output(3, 1, b"out"),
        Output(3, 2, b"\x00err"),
        Event(3, {"type": "oom"}),
        Credit(3, 10),
    ):
        assert deliver(server, client, event) == event
    for event in (Stdin(3, b"in"), Credit(3, 5), StdinClose(3)):
        assert deliver(client, server, event) == event
    assert deliver(server, client, Exit(3, 0)) == Exit(3, 0, None)
    assert client.stream_state(3) is StreamState.CLOSED
    assert server.stream_state(3) is StreamState.CLOSED


def test_exit_with_error_round_trip() -> None:
    client, server = open_stream(3)
    exit_ = Exit(3, None, ProcessNotFoundError("p"))
    got = deliver(server, client, exit_)
    assert got == exit_
    assert got.error.process_id == "p"


def test_wire_keys() -> None:
    client, server = open_stream(3)
    assert msgpack.unpackb(server.send(Output(3, 1, b"x")), raw=False) == {
        "t": "output",
        "stream": 3,
        "fd": 1,
        "data": b"x",
    }
    assert msgpack.unpackb(client.send(Credit(3, 9)), raw=False) == {
        "t": "credit",
        "stream": 3,
        "bytes": 9,
    }
    assert msgpack.unpackb(server.send(Exit(3, 7)), raw=False) == {
        "t": "exit",
        "stream": 3,
        "code": 7,
    }


def test_detach_round_trip_and_in_flight_output_is_dropped() -> None:
    client, server = open_stream(3)
    in_flight = [server.send(Output(3, 1, b"late")), server.send(Event(3, "e"))]
    assert deliver(client, server, Detach(3)) == Detach(3)
    assert client.stream_state(3) is StreamState.DETACHED
    assert server.stream_state(3) is StreamState.CLOSED
    for frame in in_flight:
        client.receive_data(frame)
    assert client.next_event() is None
    assert not client.broken
    with pytest.raises(LocalProtocolError, match="not open"):
        server.send(Output(3, 1, b"more"))


def test_client_frames_in_flight_after_exit_are_dropped() -> None:
    client, server = open_stream(3)
    in_flight = [client.send(Stdin(3, b"x")), client.send(Credit(3, 1)), client.send(StdinClose(3))]
    server.send(Exit(3, 0))
    for frame in in_flight:
        server.receive_data(frame)
    assert server.next_event() is None
    assert not server.broken


def test_client_frames_after_detach_are_dropped_by_the_server() -> None:
    """docs/protocol.md: late client frames for a stream the server no longer tracks
    (here: detached) are dropped, not violations; they race with the detach."""
    client, server = open_stream(3)
    deliver(client, server, Detach(3))
    late = [
        {"t": "credit", "stream": 3, "bytes": 100},
        {"t": "stdin", "stream": 3, "data": b"x"},
        {"t": "stdin_close", "stream": 3},
        {"t": "detach", "stream": 3},
    ]
    for frame in late:
        assert raw(server, frame) is None
    assert not server.broken
    assert deliver(client, server, Call(2, "ping", {})) == Call(2, "ping", {})


def test_the_client_sends_nothing_after_its_own_detach() -> None:
    client, _ = open_stream(3)
    client.send(Detach(3))
    for event in (Credit(3, 1), Stdin(3, b"x"), StdinClose(3), Detach(3)):
        with pytest.raises(LocalProtocolError, match="once it is detached"):
            client.send(event)


def test_a_frame_for_a_stream_above_the_newest_is_a_violation() -> None:
    _, server = open_stream(3)
    assert violation(server, {"t": "credit", "stream": 4, "bytes": 1}) == "stream 4 is not open"


def test_both_directions_start_with_the_initial_window() -> None:
    """The stdin window is INITIAL_WINDOW (4 MiB), like the output window."""
    client, server = open_stream(3)
    assert INITIAL_WINDOW == 4 << 20
    for end in (client, server):
        assert end.stdin_credit(3) == end.output_credit(3) == INITIAL_WINDOW


def test_error_reply_closes_the_stream() -> None:
    client, server = pair()
    deliver(client, server, Call(1, "run", {"handle": "h", "stream": 4}))
    deliver(server, client, ErrorReply(1, ContainerNotFoundError("h")))
    assert client.stream_state(4) is StreamState.CLOSED
    with pytest.raises(LocalProtocolError, match="stream 4 is not open"):
        client.send(Stdin(4, b"x"))


# ---- credit --------------------------------------------------------------------------


def exhaust(sender: Connection, receiver: Connection, make: Any, credit: int) -> None:
    """Spend ``credit`` bytes in frames of at most MAX_DATA_CHUNK."""
    while credit:
        n = min(credit, MAX_DATA_CHUNK)
        deliver(sender, receiver, make(b"x" * n))
        credit -= n


def test_output_credit_accounting() -> None:
    client, server = open_stream(3)
    assert server.output_credit(3) == client.output_credit(3) == INITIAL_WINDOW
    deliver(server, client, Output(3, 1, b"x" * 1000))
    assert server.output_credit(3) == client.output_credit(3) == INITIAL_WINDOW - 1000
    exhaust(server, client, lambda data: Output(3, 1, data), INITIAL_WINDOW - 1000)
    assert server.output_credit(3) == client.output_credit(3) == 0
    with pytest.raises(LocalProtocolError, match="exceeds its credit by 1000 bytes"):
        server.send(Output(3, 1, b"x" * 1000))
    deliver(client, server, Credit(3, 1000))
    assert server.output_credit(3) == client.output_credit(3) == 1000
    deliver(server, client, Output(3, 1, b"x" * 1000))
    assert server.output_credit(3) == 0


def test_stdin_credit_accounting() -> None:
    client, server = open_stream(3)
    assert client.stdin_credit(3) == INITIAL_WINDOW
    exhaust(client, server, lambda data: Stdin(3, data), INITIAL_WINDOW)
    assert client.stdin_credit(3) == server.stdin_credit(3) == 0
    with pytest.raises(LocalProtocolError, match="exceeds its credit by 1 bytes"):
        client.send(Stdin(3, b"y"))
    deliver(server, client, Credit(3, 100))
    assert client.stdin_credit(3) == server.stdin_credit(3) == 100
    assert client.output_credit(3) == INITIAL_WINDOW


def test_peer_exceeding_output_credit_is_a_violation() -> None:
    client, server = open_stream(7)
    exhaust(server, client, lambda data: Output(7, 1, data), INITIAL_WINDOW)
    message = violation(client, {"t": "output", "stream": 7, "fd": 1, "data": b"x" * 10})
    assert message == "output on stream 7 exceeds its credit by 10 bytes"


def test_peer_exceeding_stdin_credit_is_a_violation() -> None:
    client, server = open_stream(7)
    exhaust(client, server, lambda data: Stdin(7, data), INITIAL_WINDOW)
    message = violation(server, {"t": "stdin", "stream": 7, "data": b"xy"})
    assert message == "stdin on stream 7 exceeds its credit by 2 bytes"


def test_credit_over_the_limit() -> None:
    client, server = open_stream(3)
    over = MAX_CREDIT - INITIAL_WINDOW + 1
    with pytest.raises(LocalProtocolError, match="over the 1073741824-byte limit"):
        client.send(Credit(3, over))
    assert "over the 1073741824-byte limit" in violation(
        server, {"t": "credit", "stream": 3, "bytes": over}
    )


# ---- local refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "event", "match"),
    [
        (Role.SERVER, Call(1, "ping", {}), "the server may not send 'call'"),
        (Role.CLIENT, Reply(1, None), "the client may not send 'reply'"),
        (Role.CLIENT, Output(3, 1, b""), "the client may not send 'output'"),
        (Role.SERVER, Stdin(3, b""), "the server may not send 'stdin'"),
        (Role.SERVER, Detach(3), "the server may not send 'detach'"),
        (Role.SERVER, Reply(9, None), "'reply' for unknown call id 9"),
        (Role.SERVER, Output(3, 1, b""), "stream 3 is not open"),
        (Role.CLIENT, Credit(3, 1), "stream 3 is not open"),
        (Role.SERVER, Exit(3, None), "exactly one of 'code' and 'error'"),
        (Role.CLIENT, Call(True, "ping", {}), "field 'id' must be an integer, not bool"),
        (Role.CLIENT, Call(-1, "ping", {}), "field 'id' must not be negative"),
        (Role.CLIENT, Call(1, "ping", {"stream": "3"}), "field 'args.stream' must be an integer"),
    ],
)
def test_send_refuses(role: Role, event: Any, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        Connection(role).send(event)


def test_send_refuses_on_open_stream() -> None:
    client, server = open_stream(3)
    with pytest.raises(LocalProtocolError, match=r"must be 1 \(stdout\) or 2 \(stderr\), not 3"):
        server.send(Output(3, 3, b"x"))
    with pytest.raises(LocalProtocolError, match="over the 1048576-byte chunk limit"):
        client.send(Stdin(3, b"x" * (MAX_DATA_CHUNK + 1)))
    with pytest.raises(LocalProtocolError, match="field 'bytes' must be positive"):
        client.send(Credit(3, 0))
    with pytest.raises(
        LocalProtocolError, match="frame of .* bytes exceeds the 4194304-byte limit"
    ):
        client.send(Call(2, "put", {"blob": b"x" * MAX_FRAME_BYTES}))
    with pytest.raises(LocalProtocolError, match="cannot encode 'call' frame"):
        client.send(Call(2, "put", {"what": object()}))
    client.send(StdinClose(3))
    with pytest.raises(
        LocalProtocolError, match="'stdin' is not allowed on stream 3 once it is stdin closed"
    ):
        client.send(Stdin(3, b"x"))
    client.send(Detach(3))
    with pytest.raises(
        LocalProtocolError, match="'credit' is not allowed on stream 3 once it is detached"
    ):
        client.send(Credit(3, 1))
    with pytest.raises(LocalProtocolError, match="stream 3 does not follow stream 3"):
        client.send(Call(5, "attach", {"stream": 3}))
    with pytest.raises(LocalProtocolError, match="ProtocolViolation is not a frame"):
        client.send(ProtocolViolation("x"))  # type: ignore[arg-type]


def test_refused_send_changes_nothing() -> None:
    client, server = open_stream(3)
    with pytest.raises(LocalProtocolError):
        server.send(Output(3, 1, b"x" * (MAX_DATA_CHUNK + 1)))
    assert server.output_credit(3) == INITIAL_WINDOW
    client.send(Call(2, "a", {}))
    with pytest.raises(LocalProtocolError, match="call id 2 is already outstanding"):
        client.send(Call(2, "b", {"stream": 9}))
    with pytest.raises(LocalProtocolError, match="exceeds the 4194304-byte limit"):
        client.send(Call(4, "c", {"stream": 10, "blob": b"x" * MAX_FRAME_BYTES}))
    deliver(client, server, Call(5, "attach", {"stream": 4}))  # 9 and 10 were never taken


# ---- violations from the peer --------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1", "frame is not valid msgpack"),
        (b"\x92\x01", "frame is not valid msgpack"),
        (msgpack.packb({"t": "ping"}) + b"\x00", "frame is not valid msgpack"),
        (msgpack.ExtType(5, b"x"), "frame is not valid msgpack: msgpack extension type 5"),
        ([1, 2], "frame must be a map, not list"),
        ({"id": 1}, "frame has no 't' field"),
        ({"t": "foo"}, "unknown frame type 'foo'"),
        ({"t": 7}, "unknown frame type 7"),
        ({"t": "call", "id": 1, "method": "ping"}, "'call' frame is missing field 'args'"),
        (
            {"t": "call", "id": 1, "method": "ping", "args": {}, "x": 1},
            "'call' frame has unknown field 'x'",
        ),
        (
            {"t": "call", "id": True, "method": "ping", "args": {}},
            "field 'id' must be an integer, not bool",
        ),
        (
            {"t": "call", "id": 1.0, "method": "ping", "args": {}},
            "field 'id' must be an integer, not float",
        ),
        (
            {"t": "call", "id": 1, "method": b"ping", "args": {}},
            "field 'method' must be a string, not bytes",
        ),
        (
            {"t": "call", "id": 1, "method": "ping", "args": []},
            "field 'args' must be a map, not list",
        ),
        (
            {"t": "call", "id": 1, "method": "run", "args": {"stream": False}},
            "field 'args.stream' must be an integer",
        ),
        ({"t": "stdin", "stream": "3", "data": b""}, "field 'stream' must be an integer, not str"),
        ({"t": "stdin", "stream": 3, "data": "text"}, "field 'data' must be binary, not str"),
        ({"t": "stdin", "stream": 3, "data": b""}, "stream 3 is not open"),
        ({"t": "reply", "id": 1, "result": None}, "the client may not send 'reply' frames"),
        (
            {"t": "output", "stream": 3, "fd": 1, "data": b""},
            "the client may not send 'output' frames",
        ),
    ],
)
def test_server_sees_violation(frame: Any, message: str) -> None:
    if isinstance(frame, msgpack.ExtType):
        frame = msgpack.packb(frame)
    assert message in violation(Connection(Role.SERVER), frame)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"t": "reply", "id": 5, "result": None}, "'reply' for unknown call id 5"),
        ({"t": "error", "id": 1, "error": "oops"}, "field 'error' must be a map, not str"),
        (
            {"t": "output", "stream": 3, "fd": 0, "data": b""},
            "field 'fd' must be 1 (stdout) or 2 (stderr), not 0",
        ),
        (
            {"t": "output", "stream": 3, "fd": True, "data": b""},
            "field 'fd' must be an integer, not bool",
        ),
        (
            {"t": "output", "stream": 3, "fd": 1, "data": b"x" * (MAX_DATA_CHUNK + 1)},
            "over the 1048576-byte chunk limit",
        ),
        ({"t": "output", "stream": 4, "fd": 1, "data": b""}, "stream 4 is not open"),
        ({"t": "exit", "stream": 3}, "'exit' frame must carry exactly one of 'code' and 'error'"),
        (
            {"t": "exit", "stream": 3, "code": 0, "error": {"Type": ""}},
            "exactly one of 'code' and 'error'",
        ),
        ({"t": "exit", "stream": 3, "code": "0"}, "field 'code' must be an integer, not str"),
        ({"t": "credit", "stream": 3, "bytes": -1}, "field 'bytes' must be positive"),
        ({"t": "stdin_close", "stream": 3}, "the server may not send 'stdin_close' frames"),
        ({"t": "detach", "stream": 3}, "the server may not send 'detach' frames"),
    ],
)
def test_client_sees_violation(frame: Any, message: str) -> None:
    client, _ = open_stream(3)
    assert message in violation(client, frame)


def test_oversized_frame() -> None:
    server = Connection(Role.SERVER)
    message = violation(server, b"\x00" * 5_000_000)
    assert message == "frame of 5000000 bytes exceeds the 4194304-byte limit"


def test_stdin_after_stdin_close_is_a_violation() -> None:
    client, server = open_stream(3)
    deliver(client, server, StdinClose(3))
    message = violation(server, {"t": "stdin", "stream": 3, "data": b"x"})
    assert message == "'stdin' is not allowed on stream 3 once it is stdin closed"


def test_output_after_exit_is_a_violation() -> None:
    client, server = open_stream(3)
    deliver(server, client, Exit(3, 0))
    assert (
        violation(client, {"t": "output", "stream": 3, "fd": 1, "data": b"x"})
        == "stream 3 is not open"
    )


def test_duplicate_call_id_and_reused_stream_are_violations() -> None:
    _, server = open_stream(3)
    raw(server, {"t": "call", "id": 2, "method": "info", "args": {}})
    message = violation(server, {"t": "call", "id": 2, "method": "info", "args": {}})
    assert message == "call id 2 is already outstanding"
    _, server = open_stream(3)
    message = violation(server, {"t": "call", "id": 2, "method": "run", "args": {"stream": 3}})
    assert message == "stream 3 does not follow stream 3; ids must increase"


def test_nothing_after_a_violation() -> None:
    client, server = open_stream(3)
    good = server.send(Output(3, 1, b"ok"))
    client.receive_data(good)
    client.receive_data(b"garbage")
    client.receive_data(server.send(Output(3, 1, b"ignored")))
    assert client.next_event() == Output(3, 1, b"ok")
    assert isinstance(client.next_event(), ProtocolViolation)
    assert client.next_event() is None
    with pytest.raises(LocalProtocolError, match="broken"):
        client.send(Credit(3, 1))
