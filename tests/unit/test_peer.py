"""The websocket Peer's send path: a frame for a stream the client detached while the
frame waited for the connection's send lock ends that stream's task (a ClosedResourceError,
which stream tasks treat as "gone"), never the connection (LocalProtocolError)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from gactor.transport import protocol as P
from gactor.transport.ws_server import Peer


class RecordingWebSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_message(self, frame: bytes) -> None:
        self.sent.append(frame)


def detached_peer() -> tuple[Peer, RecordingWebSocket]:
    client = P.Connection(P.Role.CLIENT)
    ws = RecordingWebSocket()
    peer = Peer(ws, api=None)  # type: ignore[arg-type]
    peer.conn.receive_data(client.send(P.Call(1, "run", {"handle": "h", "stream": 1, "spec": {"path": "x"}})))
    peer.conn.receive_data(client.send(P.Detach(1)))
    events: list[Any] = []
    while (event := peer.conn.next_event()) is not None:
        events.append(event)
    assert [type(e) for e in events] == [P.Call, P.Detach]
    return peer, ws


async def test_output_for_a_detached_stream_ends_the_stream_not_the_connection():
    peer, ws = detached_peer()
    with pytest.raises(trio.ClosedResourceError, match="stream 1 is no longer open"):
        await peer.send(P.Output(1, 1, b"late"))
    assert not peer.conn.broken
    await peer.send(P.Reply(1, {"process_id": "p"}))  # the connection still works
    assert len(ws.sent) == 1
