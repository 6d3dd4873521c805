"""The spawner exchange (gactor/actors/spawner_client.py) against a fake spawner on a
socketpair: requests are pipelined (several outstanding, at most SPAWNER_IN_FLIGHT),
each reply reaches its own request in whatever order it comes, a reply to a request
that gave up is discarded (its status socket closed), and a spawner that goes away fails
every request waiting for it."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from gactor.actors import spawner_client
from gactor.actors.spawner_client import SpawnerClient
from gactor.errors import GardenError
from gactor.kernel import shim_wire as wire
from gactor.kernel.spawner import COMMIT


class FakeSpawner:
    """The spawner's end: ``requests`` as they arrive; ``answer(rid)`` replies as the real
    spawner does (a status socket whose shim reports ``{"shim": rid, "init": rid}`` and
    waits for COMMIT, and a pidfd)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.requests: list[int] = []
        self.arrived = trio.Event()
        self.shim_ends: dict[int, socket.socket] = {}

    async def receive(self, count: int) -> None:
        while len(self.requests) < count:
            data, ancdata, flags, _ = await self.sock.recvmsg(wire.MAX_MESSAGE, wire.ANCILLARY_SPACE)
            msg, _fds = wire.decode(data, ancdata, flags)
            self.requests.append(msg["rid"])

    async def answer(self, rid: int, report: bool = True) -> None:
        ours, shims = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.shim_ends[rid] = shims
        if report:
            shims.send(msgpack.packb({"shim": rid, "init": rid}))
        pidfd = os.pidfd_open(os.getpid())
        buffers, anc = wire.encode({"rid": rid, "ok": True, "shim": rid}, [ours.fileno(), pidfd])
        await self.sock.sendmsg(buffers, anc)
        ours.close()
        os.close(pidfd)

    def committed(self, rid: int) -> bool:
        return self.shim_ends[rid].recv(1) == COMMIT


def pair() -> tuple[SpawnerClient, FakeSpawner]:
    client_end, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return SpawnerClient(client_end), FakeSpawner(spawner_end)


async def start_all(client: SpawnerClient, count: int, started: dict[int, dict[str, Any]],
                    errors: list[BaseException]) -> Callable[[], Awaitable[None]]:
    async def one(n: int) -> None:
        try:
            started[n] = await client.start_shim({"n": n})
        except GardenError as err:
            errors.append(err)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(one, n)
    return run


async def test_requests_are_sent_before_earlier_ones_are_answered_and_replies_reach_their_own() -> None:
    client, spawner = pair()
    started: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(await start_all(client, 4, started, errors))
            # All four are outstanding before the first reply: the spawner never waits
            # for the next request while one is due.
            await spawner.receive(4)
            for rid in reversed(spawner.requests):  # answered out of order
                await spawner.answer(rid)
    assert errors == []
    assert sorted(s["shim"] for s in started.values()) == sorted(spawner.requests)
    assert all(spawner.committed(rid) for rid in spawner.requests)


async def test_at_most_spawner_in_flight_requests_are_outstanding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawner_client, "SPAWNER_IN_FLIGHT", 3)
    client, spawner = pair()
    started: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(await start_all(client, 7, started, errors))
            await spawner.receive(3)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.2):
                await spawner.receive(4)
            assert len(spawner.requests) == 3  # the other four wait to send
            answered = 0
            while answered < 7:
                await spawner.receive(answered + 1)
                await spawner.answer(spawner.requests[answered])
                answered += 1
    assert errors == []
    assert len(started) == 7


async def test_a_reply_after_its_request_gave_up_is_discarded_and_later_ones_go_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawner_client, "SPAWNER_REPLY_TIMEOUT", 0.3)
    client, spawner = pair()
    with trio.fail_after(10):
        with pytest.raises(GardenError, match="did not answer within 0.3 s"):
            await client.start_shim({"n": 0})
        await spawner.receive(1)
        late = spawner.requests[0]
        await spawner.answer(late, report=False)

        async def next_start() -> dict[str, Any]:
            return await client.start_shim({"n": 1})

        async with trio.open_nursery() as nursery:
            got: list[dict[str, Any]] = []

            async def second() -> None:
                got.append(await next_start())

            nursery.start_soon(second)
            await spawner.receive(2)
            await spawner.answer(spawner.requests[1])
    assert got == [{"shim": spawner.requests[1], "init": spawner.requests[1]}]
    # The stale reply's status socket was closed: its shim gives up.
    assert spawner.shim_ends[late].recv(1) == b""


async def test_a_spawner_that_goes_away_fails_every_waiting_request() -> None:
    client, spawner = pair()
    started: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(await start_all(client, 3, started, errors))
            await spawner.receive(3)
            await spawner.answer(spawner.requests[0])
            spawner.sock.close()
    assert len(started) == 1
    assert len(errors) == 2
    assert all("the spawner process is gone" in str(e) for e in errors)
    with pytest.raises(GardenError, match="the spawner process is gone"):
        await client.start_shim({"n": 9})
