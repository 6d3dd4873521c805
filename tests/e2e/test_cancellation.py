"""Cancelling a client call cancels it, as trio does: ``trio.Cancelled`` propagates (a
cancel scope catches it), never a ``GardenError``; the connection stays usable, and what
the call leaves on the server is what its docstring says."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec, Signal, StreamInSpec, StreamOutSpec

from .helpers import (
    E2E_MARKS,
    Sink,
    StdinGate,
    container_pids,
    one_file_tar,
    proc_name,
    sh_ok,
    unique_handle,
    wait_for,
)

pytestmark = E2E_MARKS


def tar_head(name: str, size: int) -> bytes:
    """The first block of a tar holding one ``size``-byte file: a header whose data never comes."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)



class StalledTar:
    """A tar stream that sends its first block, sets ``sent``, and then never ends."""

    def __init__(self) -> None:
        self.sent = trio.Event()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield tar_head("./never-finished", 1 << 20)
        self.sent.set()
        await trio.sleep_forever()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()


def processes_named(handle: str, name: str) -> list[int]:
    return [pid for pid in container_pids(handle) if proc_name(pid) == name]


async def still_usable(client: Any, container: Any) -> None:
    """Later calls on the same client work: a ping, a run, a stream_in."""
    with trio.fail_after(30):
        await client.ping()
        await container.stream_in(StreamInSpec(path="/tmp", tar_stream=one_file_tar("./after", b"ok")))
        assert await sh_ok(container, "cat /tmp/after") == "ok"


async def test_stream_in_under_move_on_after_is_cancelled(client: Any, container: Any) -> None:
    # The issue's own words: this raised GardenError("cancelled due to deadline").
    with trio.move_on_after(1) as scope:
        await container.stream_in(StreamInSpec(path="/tmp", tar_stream=StalledTar()))
    assert scope.cancelled_caught
    await still_usable(client, container)


async def test_a_cancelled_stream_in_ends_the_servers_tar(client: Any, container: Any) -> None:
    stalled = StalledTar()
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(_cancel_when, stalled.sent, scope)
            await container.stream_in(StreamInSpec(path="/tmp", tar_stream=stalled))
    assert scope.cancelled_caught
    # stdin_close reached the server: its tar sees the end of the (truncated) archive.
    await wait_for(lambda: processes_named(container.handle, "tar") == [], within=15,
                   what="the cancelled stream_in's tar to exit")
    await still_usable(client, container)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def test_a_cancelled_stream_out_call_detaches(client: Any, container: Any) -> None:
    # More than the 4 MiB output window: without a detach, tar would wait for credit forever.
    await sh_ok(container, "dd if=/dev/zero of=/tmp/big bs=1M count=16 2>/dev/null")
    with trio.CancelScope() as scope:
        scope.cancel()  # the call is still sent whole, then the wait for its reply is cancelled
        await container.stream_out(StreamOutSpec(path="/tmp/big"))
    assert scope.cancelled_caught
    await wait_for(lambda: processes_named(container.handle, "tar") == [], within=15,
                   what="the detached stream_out's tar to exit")
    await still_usable(client, container)
    async with await container.stream_out(StreamOutSpec(path="/tmp/after")) as stream:
        data = b"".join([chunk async for chunk in stream])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("after")
        assert member is not None
        assert member.read() == b"ok"


async def test_cancelling_a_stream_out_iteration(client: Any, container: Any) -> None:
    await sh_ok(container, "dd if=/dev/zero of=/tmp/big bs=1M count=16 2>/dev/null")
    got = 0
    with trio.CancelScope() as scope:
        async with await container.stream_out(StreamOutSpec(path="/tmp/big")) as stream:
            async for chunk in stream:
                got += len(chunk)
                scope.cancel()
    assert scope.cancelled_caught
    assert 0 < got < 16 << 20
    await wait_for(lambda: processes_named(container.handle, "tar") == [], within=15,
                   what="the abandoned stream_out's tar to exit")
    await still_usable(client, container)


async def test_a_cancelled_run_leaves_the_process_running(client: Any, container: Any) -> None:
    process_id = unique_handle("cancelled-run")
    with trio.CancelScope() as scope:
        scope.cancel()
        await container.run(ProcessSpec(id=process_id, path="sleep", args=["1000"]))
    assert scope.cancelled_caught
    await still_usable(client, container)
    with trio.fail_after(30):
        # the server started it; it runs on, unattached, and can be found by its id
        process = await wait_for(lambda: _attach(container, process_id), within=15,
                                 what="the process of the cancelled run")
        await process.signal(Signal.KILL)
        assert await process.wait() == 137


async def _attach(container: Any, process_id: str) -> Any:
    try:
        return await container.attach(process_id, ProcessIO())
    except gactor.ProcessNotFoundError:
        return None


async def test_a_cancelled_wait_cancels_only_the_wait(client: Any, container: Any) -> None:
    gate, out = StdinGate(), Sink()
    process = await container.run(ProcessSpec(path="cat"), ProcessIO(stdin=gate, stdout=out))
    with trio.move_on_after(0.3) as scope:
        await process.wait()
    assert scope.cancelled_caught
    await still_usable(client, container)
    gate.release(b"still here\n")
    with trio.fail_after(30):
        assert await process.wait() == 0
    assert out.data == b"still here\n"


async def test_a_cancelled_create_completes_on_the_server(client: Any) -> None:
    handle = unique_handle("cancelled-create")
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.create(ContainerSpec(handle=handle))
    assert scope.cancelled_caught
    with trio.fail_after(30):
        await client.ping()
        container = await wait_for(lambda: _lookup(client, handle), within=20,
                                   what="the container of the cancelled create")
        try:
            assert await sh_ok(container, "echo alive") == "alive\n"
        finally:
            await client.destroy(handle)


async def _lookup(client: Any, handle: str) -> Any:
    try:
        return await client.lookup(handle)
    except gactor.ContainerNotFoundError:
        return None


async def test_cancelling_the_connect_block_is_a_cancellation(gactor_server: Any) -> None:
    with trio.CancelScope() as scope:
        async with gactor_server.connect() as client:
            await client.ping()
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_a_cancelled_events_subscription(client: Any, container: Any) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        async with container.events():
            pytest.fail("the subscription was cancelled before it opened")
    assert scope.cancelled_caught
    await still_usable(client, container)
