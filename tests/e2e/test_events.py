"""Event subscriptions through the registry's event hub: one container's and every container's,
Garden's recorded events (``events``) and the lifecycle (``watch``), a subscriber too slow to
keep up."""

from __future__ import annotations

import os
import re
import signal
import socket

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto import events as wsevents

import gactor
from gactor import ContainerSpec, Limits, MemoryLimits, ProcessIO, ProcessSpec
from gactor.transport import protocol as P

from .helpers import E2E_MARKS, sh

pytestmark = E2E_MARKS

OOM = "Out of memory"


def small(handle: str = "") -> ContainerSpec:
    return ContainerSpec(handle=handle, limits=Limits(memory=MemoryLimits(limit_in_bytes=32 << 20)))


async def oom(container: gactor.Container) -> None:
    code, _, _ = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=48")
    assert code == 137


async def test_a_client_wide_subscription_hears_every_container(client, create_container):
    first = await create_container(small())
    second = await create_container(small())
    quiet = await create_container()
    heard: list[tuple[str, str]] = []
    async with client.events() as events:
        await oom(first)
        await oom(second)
        with trio.fail_after(10):
            async for handle, event in events:
                if event == OOM:  # each also gets an event naming the victim (below)
                    heard.append((handle, event))
                if len(heard) == 2:
                    break
    assert sorted(heard) == sorted([(first.handle, OOM), (second.handle, OOM)])
    assert quiet.handle not in {h for h, _ in heard}


async def test_a_container_subscription_ends_when_it_is_destroyed(client, create_container):
    container = await create_container(small())
    other = await create_container(small())
    async with container.events() as events:
        await oom(other)  # someone else's event is not delivered here
        await oom(container)
        with trio.fail_after(10):
            assert [event async for event in _first(events)] == [OOM]
        await client.destroy(container.handle)
        with trio.fail_after(10):  # the stream just ends (after the event naming the victim)
            assert [e for e in [event async for event in events] if not e.startswith(f"{OOM}:")] == []


async def _first(events):
    async for event in events:
        yield event
        return


async def test_an_oom_event_names_the_killed_process(create_container):
    """Garden's "Out of memory", then which process the kernel killed: its host pid,
    command and, for a process started by run, its process id."""
    container = await create_container(small())
    async with container.events() as events:
        proc = await container.run(ProcessSpec(id="hog", path="dd", args=["if=/dev/zero", "of=/dev/shm/x",
                                                                        "bs=1M", "count=48"]), ProcessIO())
        assert await proc.wait() == 137
        with trio.fail_after(10):
            got = [event async for event in _take(events, 2)]
    assert got[0] == OOM
    assert re.fullmatch(r"Out of memory: killed process \d+ \(dd\), process id 'hog'", got[1]), got
    assert (await container.info()).events[-2:] == got


async def _take(events, n):
    async for event in events:
        yield event
        n -= 1
        if not n:
            return


async def test_subscribing_to_a_destroyed_container_fails(client):
    container = await client.create(ContainerSpec())
    await client.destroy(container.handle)
    with pytest.raises(gactor.ContainerNotFoundError) as caught:
        await container.events().__aenter__()
    assert caught.value.handle == container.handle


# ---- lifecycle events (Client.watch) ----------------------------------------------------

SHIM_DIED = "container shim exited unexpectedly: its processes are lost"


async def _until(events, handle: str, last: str, within: float = 30) -> list[gactor.ContainerEvent]:
    """The events of ``handle`` up to the first of kind ``last``."""
    seen = []
    with trio.fail_after(within):
        async for event in events:
            if event.handle == handle:
                seen.append(event)
                if event.kind == last:
                    return seen
    raise AssertionError(f"the stream ended before {last!r}: {seen}")


def _in_order(seen: list[gactor.ContainerEvent]) -> None:
    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs)), seqs
    assert all(e.time > 0 for e in seen)


async def test_create_oom_and_destroy_arrive_in_order(client, create_container):
    async with client.watch() as events:
        container = await create_container(small())
        await oom(container)
        await client.destroy(container.handle)
        seen = await _until(events, container.handle, "destroyed")
    _in_order(seen)
    kinds = [e.kind for e in seen]
    assert (kinds[0], kinds[1], kinds[-1]) == ("created", "process_started", "destroyed"), kinds
    assert sorted(kinds[2:-1]) == ["oom", "oom_victim", "process_exited", "stopped"], kinds
    # The kill is recorded before the stop it causes and before the kernel names the victim.
    assert kinds.index("oom") < kinds.index("stopped")
    assert kinds.index("oom") < kinds.index("oom_victim")
    by_kind = {e.kind: e for e in seen}
    assert by_kind["oom"].event == OOM
    assert by_kind["stopped"].reason == "oom"
    victim = by_kind["oom_victim"]
    assert re.fullmatch(r"Out of memory: killed process \d+ \(dd\)(, process id '.*')?", victim.event), victim
    assert (victim.task, victim.pid > 0) == ("dd", True)
    assert by_kind["process_exited"].exit_status == 137
    assert by_kind["process_exited"].process_id == by_kind["process_started"].process_id
    assert by_kind["destroyed"].reason == "client"
    # What ContainerInfo.events recorded is what the events say.
    assert [e.event for e in seen if e.kind in ("oom", "oom_victim")] == [OOM, victim.event]


async def test_grace_time_expiry_is_published(client):
    async with client.watch() as events:
        container = await client.create(ContainerSpec(grace_time=0.5))
        seen = await _until(events, container.handle, "destroyed")
    assert [(e.kind, e.reason) for e in seen] == [("created", ""), ("destroyed", "grace_time")]
    _in_order(seen)
    with pytest.raises(gactor.ContainerNotFoundError):
        await client.lookup(container.handle)


async def test_a_killed_shim_is_published_as_broken(gactor_server, client, create_container):
    container = await create_container()
    async with container.watch() as events:
        await container.run(ProcessSpec(id="sleeper", path="sleep", args=["100"]), ProcessIO())
        os.kill(gactor_server.shim_pid(container.handle), signal.SIGKILL)
        seen = await _until(events, container.handle, "broken")
        assert (await container.info()).state == "broken"
        await client.destroy(container.handle)
        with trio.fail_after(30):
            rest = [event async for event in events]  # ends after the destroyed
    assert [e.kind for e in seen] == ["process_started", "broken"]
    assert (seen[0].process_id, seen[0].pid > 0) == ("sleeper", True)
    assert (seen[1].reason, seen[1].event) == ("shim_died", SHIM_DIED)
    assert [(e.kind, e.reason) for e in rest] == [("destroyed", "client")]
    _in_order(seen + rest)


async def test_a_handle_filter_hears_only_that_container(client, create_container):
    watched = await create_container()
    other = await create_container()
    async with client.watch(watched.handle) as events:
        await sh(other, "exit 4")
        code, _, _ = await sh(watched, "exit 5")
        assert code == 5
        await client.destroy(watched.handle)
        with trio.fail_after(30):
            seen = [event async for event in events]  # ends after its destroyed
    assert {e.handle for e in seen} == {watched.handle}
    assert [e.kind for e in seen] == ["process_started", "process_exited", "destroyed"]
    assert seen[1].exit_status == 5
    assert seen[1].event == f"process {seen[1].process_id} exited with status 5"
    _in_order(seen)


async def test_older_clients_still_get_only_recorded_events(client, create_container):
    """``events()`` (no ``lifecycle``): what ContainerInfo.events records, nothing more."""
    container = await create_container(small())
    async with container.events() as events:
        await sh(container, "true")
        await oom(container)
        await client.destroy(container.handle)
        with trio.fail_after(30):
            got = [event async for event in events]
    assert got[0] == OOM
    assert all(e.startswith(OOM) for e in got), got


async def test_watching_an_unknown_container_fails(client):
    with pytest.raises(gactor.ContainerNotFoundError) as caught:
        async with client.watch("no-such-container"):
            pass
    assert caught.value.handle == "no-such-container"


# ---- a subscriber that stops reading ----------------------------------------------------

class RawSubscriber:
    """A websocket client on a unix socket that subscribes and then reads nothing until
    told to: the server's sends to it block once the socket is full."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.proto = P.Connection(P.Role.CLIENT)
        self.events: list[object] = []

    async def subscribe(self, handle: str) -> None:
        await self.sock.connect(self.path)
        await self.sock.send(self.ws.send(wsevents.Request(host="localhost", target="/")))
        while not any(isinstance(e, wsevents.AcceptConnection) for e in self.events):
            self.ws.receive_data(await self.sock.recv(65536))
            self.events += list(self.ws.events())
        frame = self.proto.send(P.Call(1, "events", {"handle": handle, "lifecycle": True, "stream": 1}))
        await self.sock.send(self.ws.send(wsevents.BytesMessage(data=frame)))

    async def read_to_the_end(self) -> list[dict[str, object]]:
        """Every event frame's data, until the stream's ``exit``."""
        got: list[dict[str, object]] = []
        while True:
            data = await self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)
            for ws_event in self.ws.events():
                if isinstance(ws_event, wsevents.BytesMessage):
                    self.proto.receive_data(ws_event.data)
                    while (frame := self.proto.next_event()) is not None:
                        if isinstance(frame, P.Exit):
                            assert frame.code == 0, frame
                            return got
                        if isinstance(frame, P.Event):
                            got.append(frame.data)


async def test_a_slow_subscriber_is_told_how_many_events_it_missed(own_servers):
    """It is neither dropped nor a drag on the server: the events it had no room for are
    counted, and a ``missed`` event takes their place, exactly covering the gap in seq."""
    server = own_servers("events-slow", "10.249.13.0/24", unix_socket=True)
    await server.start()
    async with server.connect() as fast:
        container = await fast.create(ContainerSpec())
        slow = RawSubscriber(server.socket_path)
        with trio.fail_after(20):  # under the server's SEND_TIMEOUT: a reader of nothing is dropped at 30 s
            await slow.subscribe(container.handle)
            async with fast.watch(container.handle) as watched:  # a reader that keeps up
                runs = 300  # 600 events: more than the socket and the queue hold
                async with trio.open_nursery() as nursery:
                    for worker in range(10):
                        nursery.start_soon(_run_true, container, runs // 10, worker)
                await fast.destroy(container.handle)
                kept_up = [event async for event in watched]
        with trio.fail_after(20):
            got = await slow.read_to_the_end()
        slow.sock.close()
    assert len(kept_up) == 2 * runs + 1
    assert not [e for e in kept_up if e.kind == "missed"]
    markers = [i for i, data in enumerate(got) if data["kind"] == "missed"]
    assert markers, f"no missed marker among {len(got)} events"
    assert got[markers[0] - 1]["seq"] >= 64  # the queue held EVENT_QUEUE (64) events at least
    for i in markers:
        before = got[i - 1]
        assert got[i]["missed"] == got[i]["seq"] - before["seq"] > 0, (before, got[i])
        assert got[i]["event"] == f"missed {got[i]['missed']} event{'s' * (got[i]['missed'] != 1)}"
    delivered = [data for data in got if data["kind"] != "missed"]
    assert len(delivered) + sum(got[i]["missed"] for i in markers) == len(kept_up)
    assert [d["seq"] for d in delivered] == sorted(d["seq"] for d in delivered)
    assert "Traceback" not in server.log_text()


async def _run_true(container, n: int, worker: int) -> None:
    for i in range(n):
        proc = await container.run(ProcessSpec(id=f"w{worker}-{i}", path="true"), ProcessIO())
        assert await proc.wait() == 0
