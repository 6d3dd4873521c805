"""Bad values against a real server: each is refused with an error naming the field
(through the client, which refuses before encoding, and on a raw websocket, which the
server refuses itself), nothing is left half-made, and the connection stays up. Also
what docs/protocol.md promises about violations (close codes) and late frames.
"""

from __future__ import annotations

import math
import os

import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from gactor import (
    ContainerNotFoundError,
    ContainerSpec,
    GardenError,
    Limits,
    MemoryLimits,
    PidLimits,
    ProcessIO,
    ProcessSpec,
    ResourceLimits,
)
from gactor.types import MAX_PIDS_LIMIT, MIN_MEMORY_LIMIT

from .helpers import CGROUP_ROOT, E2E_MARKS, run, server_cgroup_dirs, sh_ok, unique_handle

pytestmark = E2E_MARKS

MiB = 1 << 20
U64_MAX = (1 << 64) - 1
MEMORY_FIELD = "limits.memory.limit_in_bytes"


def memory_limit_on_host(server, handle: str) -> int | None:
    """The container's memory limit as the kernel holds it; None for "unlimited"."""
    v1 = os.path.join(CGROUP_ROOT, "memory", server.cgroup_parent, handle, "memory.limit_in_bytes")
    path = v1 if os.path.exists(v1) else os.path.join(CGROUP_ROOT, server.cgroup_parent, handle, "memory.max")
    with open(path) as f:
        text = f.read().strip()
    if text == "max" or int(text) >= 1 << 62:  # v1 says "unlimited" as ~2**63 rounded to pages
        return None
    return int(text)


def memory_spec(limit: int) -> ContainerSpec:
    return ContainerSpec(handle=unique_handle("val"), limits=Limits(memory=MemoryLimits(limit)))


async def assert_not_created(server, client, handle: str) -> None:
    """Refused before anything was made: not listed, no depot entry, no cgroup."""
    with pytest.raises(ContainerNotFoundError):
        await client.lookup(handle)
    assert not os.path.exists(server.container_dir(handle))
    assert not any(d.endswith("/" + handle) for d in server_cgroup_dirs(server.depot))


# ---- through the client ----------------------------------------------------------------


@pytest.mark.parametrize("limit", [1 << 64, -1])
async def test_out_of_range_memory_limit_is_refused_by_the_client(gactor_server, client, limit):
    """Before this, 2**64 failed as "cannot encode 'call' frame: integer value out of range".
    The client refuses it before sending: the server never logs the failed create."""
    spec = memory_spec(limit)
    logged_before = gactor_server.log_text().count(f"{MEMORY_FIELD} = {limit} ")
    with pytest.raises(GardenError) as raised:
        await client.create(spec)
    message = raised.value.message
    assert f"{MEMORY_FIELD} = {limit} is out of range for a uint64" in message, message
    assert "encode" not in message
    await client.ping()  # the server has read everything sent before
    assert gactor_server.log_text().count(f"{MEMORY_FIELD} = {limit} ") == logged_before
    await assert_not_created(gactor_server, client, spec.handle)
    await client.ping()


@pytest.mark.parametrize("limit", [1, 1 << 20, MIN_MEMORY_LIMIT - 1])
async def test_a_memory_limit_too_small_to_start_is_refused_naming_it(gactor_server, client, limit):
    """Before this, 1 byte failed as "container init failed: it exited before it was ready"."""
    spec = memory_spec(limit)
    with pytest.raises(GardenError) as raised:
        await client.create(spec)
    message = raised.value.message
    assert f"{MEMORY_FIELD} = {limit} is below the smallest memory limit" in message, message
    assert "init" not in message
    await assert_not_created(gactor_server, client, spec.handle)


async def test_the_smallest_memory_limit_starts_and_runs(gactor_server, create_container):
    container = await create_container(memory_spec(MIN_MEMORY_LIMIT))
    assert memory_limit_on_host(gactor_server, container.handle) == MIN_MEMORY_LIMIT
    assert (await sh_ok(container, "echo ok; ls / > /dev/null")).strip() == "ok"
    assert (await container.info()).events == []


async def test_limit_memory_below_the_floor_keeps_the_old_limit(gactor_server, create_container):
    container = await create_container(memory_spec(64 * MiB))
    with pytest.raises(GardenError, match=f"{MEMORY_FIELD} = 4096 is below"):
        await container.limit_memory(MemoryLimits(limit_in_bytes=4096))
    assert memory_limit_on_host(gactor_server, container.handle) == 64 * MiB
    assert await container.current_memory_limits() == MemoryLimits(64 * MiB)


async def test_the_largest_uint64_memory_limit_means_unlimited(gactor_server, create_container):
    container = await create_container(memory_spec(U64_MAX))
    assert memory_limit_on_host(gactor_server, container.handle) is None
    assert await container.current_memory_limits() == MemoryLimits(0)
    await container.limit_memory(MemoryLimits(64 * MiB))
    assert memory_limit_on_host(gactor_server, container.handle) == 64 * MiB


async def test_a_pid_limit_above_the_kernels_is_refused_naming_it(gactor_server, client, create_container):
    spec = ContainerSpec(handle=unique_handle("val"), limits=Limits(pid=PidLimits(max=MAX_PIDS_LIMIT + 1)))
    with pytest.raises(GardenError, match=f"limits.pid.max = {MAX_PIDS_LIMIT + 1} is above"):
        await client.create(spec)
    await assert_not_created(gactor_server, client, spec.handle)
    await create_container(limits=Limits(pid=PidLimits(max=MAX_PIDS_LIMIT)))


async def test_container_env_without_equals_is_refused(gactor_server, client):
    """Garden hands env to runc, which refuses "FOO" with "invalid environment variable:
    missing '='"; gactor refuses it at create with the same words and the entry's index."""
    spec = ContainerSpec(handle=unique_handle("val"), env=["A=1", "FOO"])
    with pytest.raises(GardenError) as raised:
        await client.create(spec)
    assert "env[1] 'FOO': invalid environment variable: missing '='" in raised.value.message
    await assert_not_created(gactor_server, client, spec.handle)


@pytest.mark.parametrize(
    ("entry", "words"),
    [("FOO", "missing '='"), ("=x", "name cannot be empty"), ("A=b\0c", "contains nul byte")],
)
async def test_process_env_entries_must_be_name_equals_value(container, entry, words):
    with pytest.raises(GardenError) as raised:
        await container.run(ProcessSpec(path="true", env=[entry]), ProcessIO())
    assert f"invalid process spec: env[0] {entry!r}: invalid environment variable: {words}" in raised.value.message
    assert (await container.info()).process_ids == []
    code, out, _ = await run(container, "sh", ["-c", "echo $FOO"], env=["FOO=a=b"])
    assert (code, out) == (0, b"a=b\n")


async def test_an_unlimited_rlimit_is_applied_and_a_refused_one_names_its_field(container):
    """2**64-1 is Go's RLIM_INFINITY: `ulimit -c` says unlimited. nofile cannot exceed
    fs.nr_open, so the kernel refuses it: the error names limits.nofile."""
    code, out, _ = await run(container, "sh", ["-c", "ulimit -c"], limits=ResourceLimits(core=U64_MAX))
    assert (code, out) == (0, b"unlimited\n")
    with pytest.raises(GardenError, match="limits.nofile"):
        await container.run(ProcessSpec(path="true", limits=ResourceLimits(nofile=U64_MAX)), ProcessIO())


async def test_destroy_of_an_unknown_handle(client):
    handle = unique_handle("never")
    with pytest.raises(ContainerNotFoundError) as raised:
        await client.destroy(handle)
    assert raised.value.handle == handle


# ---- on a raw websocket: what the server itself refuses --------------------------------


async def call(ws, call_id: int, method: str, args: dict) -> dict:
    await ws.send_message(msgpack.packb({"t": "call", "id": call_id, "method": method, "args": args}))
    with trio.fail_after(20):
        while True:
            frame = msgpack.unpackb(await ws.get_message(), raw=False)
            if frame.get("id") == call_id:
                return frame


def raw(server):
    return open_websocket_url(server.url, max_message_size=16 * MiB)


SERVER_REFUSES = [
    ("create", {"sepc": {}}, "create: unknown argument 'sepc'"),
    ("create", {"spec": {"handle": "x", "limits": {"memroy": {}}}}, "unknown field 'limits.memroy'"),
    ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": -1}}}}, MEMORY_FIELD),
    ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": 1}}}}, f"{MEMORY_FIELD} = 1 is below"),
    ("create", {"spec": {"grace_time": math.inf}}, "grace_time"),
    ("create", {"spec": {"net_in": [{"host_port": 1 << 32}]}}, "net_in[0].host_port"),
    ("create", {"spec": {"env": ["FOO"]}}, "env[0] 'FOO'"),
    ("destroy", {"handle": "x", "force": True}, "destroy: unknown argument 'force'"),
    ("set_grace_time", {"handle": "x", "seconds": math.nan}, "argument 'seconds' out of range"),
    ("containers", {"properties": {}, "limit": 3}, "containers: unknown argument 'limit'"),
    ("signal", {"handle": "x", "process_id": "p", "signal": 15}, "invalid signal 15"),
    ("net_in", {"handle": "x", "host_port": 1 << 32}, "argument 'host_port'"),
    ("ping", {"extra": 1}, "ping: unknown argument 'extra'"),
    ("run", {"handle": "x", "spec": {"path": "true"}}, "run needs a 'stream' id"),
    ("events", {"handle": ""}, "events needs a 'stream' id"),
]


@pytest.mark.parametrize(("method", "args", "words"), SERVER_REFUSES)
async def test_the_server_refuses_bad_arguments_with_an_error_reply(gactor_server, method, args, words):
    async with raw(gactor_server) as ws:
        reply = await call(ws, 1, method, args)
        assert reply["t"] == "error", reply
        assert words in reply["error"]["Message"], reply["error"]["Message"]
        assert reply["error"]["Type"] == ""
        assert (await call(ws, 2, "ping", {}))["t"] == "reply"  # the connection stays up


async def test_streaming_calls_refuse_unknown_arguments(gactor_server, container):
    """run, attach, stream_in, stream_out and events reach the server's argument check
    by their own paths; each refuses an unknown key with an error reply."""
    h = container.handle
    cases = [
        ("run", {"handle": h, "spec": {"path": "true"}, "stdout": True, "colour": True}, "colour"),
        ("attach", {"handle": h, "process_id": "p", "tty": True}, "tty"),
        ("stream_in", {"handle": h, "path": "/tmp", "mode": 1}, "mode"),
        ("stream_out", {"handle": h, "path": "/etc", "gzip": True}, "gzip"),
        ("events", {"handle": h, "filter": "oom"}, "filter"),
        ("run", {"handle": h, "spec": {"path": "true", "limits": {"nofile": -1}}}, "limits.nofile"),
        ("run", {"handle": h, "spec": {"path": "true", "tty": {"window_size": {"columns": 70000}}}},
         "tty.window_size.columns"),
    ]  # fmt: skip
    async with raw(gactor_server) as ws:
        for i, (method, args, words) in enumerate(cases, start=1):
            reply = await call(ws, i, method, {**args, "stream": i})
            assert reply["t"] == "error", (method, reply)
            assert f"unknown argument {words!r}" in reply["error"]["Message"] or words in reply["error"]["Message"]
        assert (await call(ws, 99, "ping", {}))["t"] == "reply"
    assert (await container.info()).process_ids == []


async def test_a_violation_closes_with_1002_and_names_it(gactor_server, client):
    async with raw(gactor_server) as ws:
        await ws.send_message(msgpack.packb({"t": "call", "id": 1, "method": "ping", "args": {}, "x": 1}))
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 1002
    assert closed.value.reason.reason == "'call' frame has unknown field 'x'"
    await client.ping()


async def test_a_text_message_closes_with_1003(gactor_server):
    async with raw(gactor_server) as ws:
        await ws.send_message("ping")
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 1003
    assert "binary" in closed.value.reason.reason


async def test_a_frame_for_a_stream_never_opened_is_a_violation(gactor_server):
    async with raw(gactor_server) as ws:
        await ws.send_message(msgpack.packb({"t": "credit", "stream": 5, "bytes": 10}))
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.reason) == (1002, "stream 5 is not open")


async def test_client_frames_after_detach_are_dropped_not_violations(gactor_server, container):
    """Credit, stdin, stdin_close and a second detach for a detached stream race with the
    detach; the server drops them and keeps serving the connection and the process."""
    async with raw(gactor_server) as ws:
        run_args = {"handle": container.handle, "spec": {"path": "sh", "args": ["-c", "cat; exit 3"]},
                    "stream": 1, "stdin": True, "stdout": True, "stderr": True}  # fmt: skip
        reply = await call(ws, 1, "run", run_args)
        assert reply["t"] == "reply", reply
        process_id = reply["result"]["process_id"]
        for frame in (
            {"t": "detach", "stream": 1},
            {"t": "credit", "stream": 1, "bytes": 4096},
            {"t": "stdin", "stream": 1, "data": b"late\n"},
            {"t": "stdin_close", "stream": 1},
            {"t": "detach", "stream": 1},
        ):
            await ws.send_message(msgpack.packb(frame, use_bin_type=True))
        assert (await call(ws, 2, "ping", {}))["t"] == "reply"
    assert process_id in (await container.info()).process_ids  # still running: stdin never closed
    with trio.fail_after(20):
        attached = await container.attach(process_id, ProcessIO(stdin=b""))
        assert await attached.wait() == 3
