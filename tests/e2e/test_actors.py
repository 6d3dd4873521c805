"""Regressions of issue 7 that the actor model fixes, tried from outside as a user would:
a dead shim is noticed, one stream's failure never closes the connection, handles with
awkward characters work across a restart, and unimplemented spec fields are refused."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from trio_websocket import open_websocket_url

from gactor import (
    ContainerNotFoundError,
    ContainerSpec,
    GardenError,
    ProcessIO,
    ProcessSpec,
    StreamInSpec,
)
from gactor.transport import protocol as P

from .helpers import (
    Sink,
    StdinGate,
    host_snapshot,
    sh_ok,
    wait_until_nothing_left,
)

pytestmark = pytest.mark.trio



async def test_a_dead_shim_is_noticed(gactor_server, client, create_container):
    container = await create_container()
    before_info = await container.info()
    assert before_info.state == "active"
    gate = StdinGate(b"x")
    process = await container.run(ProcessSpec(path="cat"), ProcessIO(stdin=gate, stdout=Sink()))
    os.kill(gactor_server.shim_pid(container.handle), signal.SIGKILL)
    with trio.fail_after(10):
        with pytest.raises(GardenError, match=container.handle):
            await process.wait()  # ends with an error naming the container; never hangs
    info = await container.info()
    assert info.state == "broken"
    assert any("shim" in event for event in info.events)
    with pytest.raises(GardenError, match="broken"):
        await container.run(ProcessSpec(path="true"), ProcessIO())
    gate.release()
    handle = container.handle
    await client.destroy(handle)
    assert handle not in [c.handle for c in await client.containers()]
    assert not os.path.exists(gactor_server.container_dir(handle))


async def test_a_shim_dying_during_stream_in_fails_only_that_call(gactor_server, client, create_container):
    container = await create_container()
    other = await create_container()
    shim = gactor_server.shim_pid(container.handle)
    started = trio.Event()

    async def endless_tar():
        yield b"\0" * 512  # a partial header: tar waits for the rest
        started.set()
        await trio.sleep_forever()

    async def kill_when_started():
        await started.wait()
        os.kill(shim, signal.SIGKILL)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_started)
            with pytest.raises(GardenError):
                await container.stream_in(StreamInSpec(path="/tmp", tar_stream=endless_tar()))
    await client.ping()  # the connection is alive
    assert await sh_ok(other, "echo still here") == "still here\n"


async def test_awkward_handles_survive_a_restart(own_servers):
    server = own_servers("awkward", "10.247.7.0/24")
    await server.start()
    handles = ["with,comma", "trailing space ", "colon:and=equals", "newline\nin it", "%percent"]
    async with server.connect() as client:
        await client.destroy((await client.create(ContainerSpec())).handle)  # the image copy stays
        before = host_snapshot(server)
        for handle in handles:
            container = await client.create(ContainerSpec(handle=handle))
            assert await sh_ok(container, "hostname") == handle[-49:] + "\n"
    await server.kill()
    await server.start()
    async with server.connect() as client:
        assert sorted(c.handle for c in await client.containers()) == sorted(handles)
        for handle in handles:
            container = await client.lookup(handle)
            assert await sh_ok(container, "echo ok") == "ok\n"
            await client.destroy(handle)
        await wait_until_nothing_left(server, {**before, "server fds": host_snapshot(server)["server fds"]})


async def test_a_detach_racing_output_keeps_the_connection(gactor_server, container):
    """Detach streams whose output sends are queued on the connection: the client stops
    reading until the server's sends block (holding the connection's send lock, with the
    other streams' sends waiting for it), detaches every stream, then reads again. The
    queued sends find their streams gone; the connection and the calls on it carry on
    (raw protocol: the client library has no detach)."""
    conn = P.Connection(P.Role.CLIENT)
    streams = set(range(1, 11))
    ping = 100

    async def receive() -> list[object]:
        conn.receive_data(await ws.get_message())
        events = []
        while (event := conn.next_event()) is not None:
            assert not isinstance(event, P.ProtocolViolation), event
            events.append(event)
        return events

    async with open_websocket_url(gactor_server.url, max_message_size=16 << 20) as ws:
        for stream in streams:
            # More than the 4 MiB window the client never extends: no stream can finish.
            spec = {"path": "sh", "args": ["-c", "head -c 8000000 /dev/zero"]}
            await ws.send_message(conn.send(P.Call(stream, "run", {
                "handle": container.handle, "spec": spec, "stream": stream, "stdout": True})))
        streaming: set[int] = set()
        with trio.fail_after(30):
            while streaming != streams:
                streaming |= {e.stream for e in await receive() if isinstance(e, P.Output)}
        # Not a wait for a condition but the condition itself: a client that reads
        # nothing for a while, so the server's sends back up behind its send lock.
        await trio.sleep(0.5)
        for stream in streams:
            await ws.send_message(conn.send(P.Detach(stream)))
        await ws.send_message(conn.send(P.Call(ping, "ping", {})))
        with trio.fail_after(30):
            while not any(isinstance(e, P.Reply) and e.id == ping for e in await receive()):
                pass
    assert await sh_ok(container, "echo alive") == "alive\n"


async def _read_until_cancelled(client, handles: list[str], seen: list[BaseException]) -> None:
    """bulk_info, lookup and info of every handle, over and over, noting every error."""
    while True:
        for entry in (await client.bulk_info(handles)).values():
            if entry.err is not None:
                seen.append(entry.err)
        for handle in handles:
            try:
                await (await client.lookup(handle)).info()
            except GardenError as err:
                seen.append(err)
        await trio.lowlevel.checkpoint()


async def test_a_container_destroyed_during_a_call_is_not_found(gactor_server, client):
    """A call that found the container just before its destroy finished answers
    ContainerNotFoundError (Garden's answer for a handle that is not there), never "container
    ... is gone" (a ServiceUnavailableError): a reader bulk-infoing, listing and infoing every
    handle while all of them are destroyed at once, for several rounds."""
    for round_ in range(4):
        handles = [f"gone-race-{round_}-{i}" for i in range(12)]
        for handle in handles:
            await client.create(ContainerSpec(handle=handle))
        seen: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_until_cancelled, client, handles, seen)
            async with trio.open_nursery() as destroys:
                for handle in handles:
                    destroys.start_soon(client.destroy, handle)
            nursery.cancel_scope.cancel()
        wrong = [err for err in seen if not isinstance(err, ContainerNotFoundError)]
        assert not wrong, wrong[:3]
