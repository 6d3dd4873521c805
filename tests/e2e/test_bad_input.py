"""Bad input gets a clear GardenError (never a bare ValueError, never a crash), and a
peer breaking the wire protocol is cut off while the server keeps serving everyone else.
"""

from __future__ import annotations

import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import gactor
from gactor import (
    ContainerNotFoundError,
    ContainerSpec,
    GardenError,
    Limits,
    MemoryLimits,
    ProcessIO,
    ProcessSpec,
    ResourceLimits,
    Signal,
    TTYSpec,
    WindowSize,
)

from .helpers import E2E_MARKS, StdinGate, run, unique_handle

pytestmark = E2E_MARKS

MiB = 1 << 20


# ---- validation through the client ------------------------------------------------


@pytest.mark.parametrize("handle", ["a/b", "/", "..", ".", "nul\0byte", "../escape"])
async def test_bad_handles_are_refused(client, handle):
    with pytest.raises(GardenError) as raised:
        await client.create(ContainerSpec(handle=handle))
    assert "handle" in raised.value.message.lower()
    assert handle not in {c.handle for c in await client.containers()}


async def test_empty_process_path(container):
    with pytest.raises(GardenError):
        await container.run(ProcessSpec(path=""), ProcessIO())
    assert (await run(container, "true"))[0] == 0


async def test_unknown_handle_on_container_methods(client):
    handle = unique_handle()
    stale = await client.create(ContainerSpec(handle=handle))
    await client.destroy(handle)
    calls = {
        "info": lambda: stale.info(),
        "run": lambda: stale.run(ProcessSpec(path="true"), ProcessIO()),
        "stop": lambda: stale.stop(),
        "properties": lambda: stale.properties(),
        "property": lambda: stale.property("x"),
        "set_property": lambda: stale.set_property("x", "y"),
        "attach": lambda: stale.attach("some-process", ProcessIO()),
    }
    for name, call in calls.items():
        with pytest.raises(ContainerNotFoundError) as raised:
            await call()
        assert raised.value.handle == handle, name


@pytest.mark.parametrize("limit", [-1, 1 << 64])
async def test_out_of_range_memory_limit(client, limit):
    handle = unique_handle()
    spec = ContainerSpec(handle=handle, limits=Limits(memory=MemoryLimits(limit_in_bytes=limit)))
    with pytest.raises(GardenError):
        await client.create(spec)
    with pytest.raises(ContainerNotFoundError):
        await client.lookup(handle)


async def test_out_of_range_limit_on_a_container(container):
    for limit in (-1, 1 << 64):
        with pytest.raises(GardenError):
            await container.limit_memory(MemoryLimits(limit_in_bytes=limit))
    assert (await container.info()).state == "active"


@pytest.mark.parametrize(
    "size", [WindowSize(columns=70000, rows=24), WindowSize(columns=80, rows=-1)]
)
async def test_out_of_range_window_size(container, size):
    with pytest.raises(GardenError):
        await container.run(ProcessSpec(path="true", tty=TTYSpec(window_size=size)), ProcessIO())
    assert (await run(container, "true"))[0] == 0


async def test_out_of_range_set_tty(container):
    gate = StdinGate()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", "read x"], tty=TTYSpec()), ProcessIO(stdin=gate)
    )
    with pytest.raises(GardenError):
        await process.set_tty(TTYSpec(window_size=WindowSize(columns=1 << 20, rows=1)))
    gate.release(b"go\n")
    with trio.fail_after(10):
        assert await process.wait() == 0


@pytest.mark.parametrize("nofile", [-5, 1 << 64])
async def test_out_of_range_rlimit(container, nofile):
    with pytest.raises(GardenError):
        await container.run(
            ProcessSpec(path="true", limits=ResourceLimits(nofile=nofile)), ProcessIO()
        )


async def test_bad_signal_value(container):
    process = await container.run(ProcessSpec(path="true"), ProcessIO())
    with pytest.raises(GardenError):
        await process.signal(99)
    with trio.fail_after(10):
        assert await process.wait() == 0


# ---- a raw websocket peer breaking the protocol -----------------------------------


async def _still_serving(url: str) -> None:
    with trio.fail_after(30):
        async with gactor.connect(url) as c:
            await c.ping()
            container = await c.create(ContainerSpec(handle=unique_handle()))
            assert (await run(container, "echo", ["ok"]))[1] == b"ok\n"
            await c.destroy(container.handle)


async def _rejected(url: str, message: bytes | str) -> str:
    """Send one message; the server must close the connection (or answer with an error).

    Returns the close reason (or the error message) for the caller to inspect.
    """
    with trio.fail_after(10):
        async with open_websocket_url(url, max_message_size=16 * MiB) as ws:
            try:
                await ws.send_message(message)
                while True:
                    reply = msgpack.unpackb(await ws.get_message(), raw=False)
                    if isinstance(reply, dict) and reply.get("t") == "error":
                        return str(reply["error"].get("Message", ""))
                    pytest.fail(f"server answered a bad frame with {reply!r}")
            except ConnectionClosed as closed:
                return closed.reason.reason or f"closed with code {closed.reason.code}"
    raise AssertionError("unreachable")


BAD_FRAMES = {
    "garbage": (b"\xc1\xff\x00garbage", ["msgpack"]),
    "text message": ("hello", ["text", "binary"]),
    "not a map": (msgpack.packb([1, 2, 3]), ["map"]),
    "unknown t": (msgpack.packb({"t": "potato", "id": 1}), ["potato"]),
    "no t": (msgpack.packb({"id": 1, "method": "ping", "args": {}}), ["'t'"]),
    "wrong field types": (
        msgpack.packb({"t": "call", "id": "one", "method": 5, "args": []}),
        ["id", "must be"],
    ),
    "unknown field": (
        msgpack.packb({"t": "call", "id": 1, "method": "ping", "args": {}, "extra": 1}),
        ["extra"],
    ),
    "non-integer stream id": (
        msgpack.packb(
            {"t": "call", "id": 1, "method": "run", "args": {"handle": "x", "stream": "s"}}
        ),
        ["stream"],
    ),
    "server-only frame": (msgpack.packb({"t": "reply", "id": 1, "result": None}), ["reply"]),
    "oversized": (
        msgpack.packb(
            {"t": "call", "id": 1, "method": "ping", "args": {"pad": b"x" * (5 * MiB)}},
            use_bin_type=True,
        ),
        ["exceed", "limit", "maximum", "too big"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_protocol_violation_closes_only_that_connection(gactor_server, client, name):
    message, words = BAD_FRAMES[name]
    async with gactor.connect(gactor_server.url) as bystander:
        reason = await _rejected(gactor_server.url, message)
        assert any(w.lower() in reason.lower() for w in words), reason
        # Other connections, old and new, are unaffected.
        await bystander.ping()
        await client.ping()
    await _still_serving(gactor_server.url)


async def _call(ws, call_id: int, method: str, args: dict) -> dict:
    frame = {"t": "call", "id": call_id, "method": method, "args": args}
    await ws.send_message(msgpack.packb(frame, use_bin_type=True))
    with trio.fail_after(10):
        while True:
            reply = msgpack.unpackb(await ws.get_message(), raw=False)
            if reply.get("id") == call_id:
                return reply


@pytest.mark.parametrize(
    ("method", "args", "words"),
    [
        ("no_such_method", {}, ["no_such_method"]),
        ("create", {"spec": 5}, ["spec"]),
        ("create", {"spec": {"handle": 5}}, ["handle"]),
        ("destroy", {}, ["handle"]),
        ("set_grace_time", {"handle": "x", "seconds": "soon"}, ["seconds"]),
    ],
)
async def test_bad_call_arguments_get_an_error_reply(gactor_server, method, args, words):
    """A well-formed frame with bad arguments is an error reply; the connection stays up."""
    async with open_websocket_url(gactor_server.url, max_message_size=16 * MiB) as ws:
        reply = await _call(ws, 1, method, args)
        assert reply["t"] == "error", reply
        message = reply["error"]["Message"]
        assert any(w in message for w in words), message
        assert (await _call(ws, 2, "ping", {}))["t"] == "reply"
    await _still_serving(gactor_server.url)


async def _stream_then_vanish(url: str, handle: str, abort: bool) -> str:
    """Start ``yes`` on a raw connection, keep the server sending (lots of credit), read a
    little, then leave: a close handshake, or (``abort``) a dropped TCP connection."""
    async with open_websocket_url(url, max_message_size=16 * MiB) as ws:
        run_args = {
            "handle": handle,
            "spec": {"path": "yes"},
            "stream": 1,
            "stdin": False,
            "stdout": True,
            "stderr": True,
        }
        reply = await _call(ws, 1, "run", run_args)
        assert reply["t"] == "reply", reply
        credit = {"t": "credit", "stream": 1, "bytes": 512 * MiB}
        await ws.send_message(msgpack.packb(credit))
        with trio.fail_after(10):
            for _ in range(20):
                frame = msgpack.unpackb(await ws.get_message(), raw=False)
                assert frame["t"] == "output", frame
        if abort:
            await ws._stream.aclose()  # no close handshake: the peer just vanishes
    return str(reply["result"]["process_id"])


@pytest.mark.parametrize("abort", [False, True], ids=["close", "drop"])
async def test_disconnect_while_server_is_sending(gactor_server, container, abort):
    """A client leaving while its process streams output does not hurt the server, and
    the process keeps running: it can be attached again and killed."""
    for _ in range(3):
        process_id = await _stream_then_vanish(gactor_server.url, container.handle, abort)
        assert gactor_server.proc.poll() is None, gactor_server.log_tail()
        with trio.fail_after(10):
            attached = await container.attach(process_id, ProcessIO())
            await attached.signal(Signal.KILL)
            assert await attached.wait() == 137
    await _still_serving(gactor_server.url)


async def test_reattach_after_disconnect_reads_exit_status(gactor_server, container):
    """A client vanishing before its process ends; a later attach reads the exit code."""
    async with open_websocket_url(gactor_server.url, max_message_size=16 * MiB) as ws:
        reply = await _call(
            ws,
            1,
            "run",
            {
                "handle": container.handle,
                "spec": {"path": "sh", "args": ["-c", "yes | head -c 10000000; exit 3"]},
                "stream": 1,
                "stdin": False,
                "stdout": True,
                "stderr": True,
            },
        )
        assert reply["t"] == "reply", reply
    process_id = reply["result"]["process_id"]
    with trio.fail_after(30):
        attached = await container.attach(process_id, ProcessIO())
        assert await attached.wait() == 3
    await _still_serving(gactor_server.url)
