"""Property-based fuzzing of what a hostile peer controls: the protocol decoder
(``transport.protocol``), call argument and spec validation (``transport.schema``), and
the names that become files (handles, process ids). Bounded budgets (examples and no
deadline) keep it to a few seconds in CI.

The properties: the decoder never raises, whatever the bytes; once it reports a
violation it yields nothing more; every event it yields is a well-typed frame the
sender's role may send. Validation raises only GardenError, and whatever it accepts
names a single, safe path component."""

from __future__ import annotations

import math
import os
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gactor import types as T
from gactor.actors.registry import check_name
from gactor.errors import GardenError
from gactor.kernel import depot
from gactor.transport import protocol as P
from gactor.transport import schema

# GACTOR_FUZZ_EXAMPLES=5000 for a longer hunt than CI's.
EXAMPLES = int(os.environ.get("GACTOR_FUZZ_EXAMPLES", "100"))
BUDGET = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

FRAME_TYPES = [
    "call",
    "reply",
    "error",
    "output",
    "exit",
    "credit",
    "stdin",
    "stdin_close",
    "detach",
    "event",
    "bogus",
    "",
]
FIELDS = [
    "t",
    "id",
    "method",
    "args",
    "result",
    "error",
    "stream",
    "fd",
    "data",
    "code",
    "bytes",
    "extra",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=64),
    st.sampled_from(
        ["", ".", "..", "a/b", "x\0y", "/", "../../etc", "h" * 300, "ünï", "c 1:3 rwm"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.sampled_from(FIELDS)), inner, max_size=6
        ),
    ),
    max_leaves=12,
)
frames = st.fixed_dictionaries(
    {"t": st.sampled_from(FRAME_TYPES)},
    optional={k: values for k in FIELDS[1:]},
)


def refused(fn: Any, *args: Any) -> str | None:
    """The message of the GardenError ``fn(*args)`` raises (never empty), or None.
    Any other exception fails the test."""
    try:
        fn(*args)
    except GardenError as err:
        message = err.message
        assert message
        return message
    return None


def drain(conn: P.Connection) -> list[Any]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def check_events(role: P.Role, events: list[Any], conn: P.Connection) -> None:
    violations = [i for i, e in enumerate(events) if isinstance(e, P.ProtocolViolation)]
    if violations:
        assert violations == [len(events) - 1], "nothing may follow a violation"
        assert conn.broken
        assert events[-1].message
    peer = P.SERVER if role is P.CLIENT else P.CLIENT
    for event in events[: violations[0] if violations else None]:
        assert type(event) in P.SENDS[peer], event
        for name in ("id", "stream", "fd", "nbytes"):
            if hasattr(event, name):
                assert isinstance(getattr(event, name), int), event
        if isinstance(event, P.Call):
            assert isinstance(event.method, str)
            assert isinstance(event.args, dict)
        if isinstance(event, P.Output | P.Stdin):
            assert isinstance(event.data, bytes)
            assert len(event.data) <= P.MAX_DATA_CHUNK


@BUDGET
@given(st.lists(st.binary(max_size=200), max_size=8), st.sampled_from([P.CLIENT, P.SERVER]))
def test_random_bytes_never_crash_the_decoder(chunks: list[bytes], role: P.Role) -> None:
    conn = P.Connection(role)
    events: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
    check_events(role, events, conn)
    if conn.broken:
        conn.receive_data(msgpack.packb({"t": "call", "id": 1, "method": "ping", "args": {}}))
        assert drain(conn) == []


@BUDGET
@given(st.lists(frames, min_size=1, max_size=5), st.sampled_from([P.CLIENT, P.SERVER]))
def test_random_frames_are_events_of_the_peer_or_one_violation(
    batch: list[dict[str, Any]], role: P.Role
) -> None:
    conn = P.Connection(role)
    events: list[Any] = []
    for frame in batch:
        conn.receive_data(msgpack.packb(frame, use_bin_type=True))
        events += drain(conn)
    check_events(role, events, conn)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=5000))
def test_deep_nesting_is_an_event_or_a_violation_not_a_crash(depth: int) -> None:
    conn = P.Connection(P.SERVER)
    nested: Any = 0
    for _ in range(depth):
        nested = [nested]
    try:
        frame = msgpack.packb({"t": "call", "id": 1, "method": "ping", "args": {"x": nested}})
    except ValueError:  # msgpack's own recursion limit: a peer could still send such bytes
        frame = b"\x91" * depth + b"\x00"
    conn.receive_data(frame)
    check_events(P.SERVER, drain(conn), conn)


def test_a_huge_frame_is_a_violation_naming_the_limit() -> None:
    big = P.Connection(P.SERVER)
    size = P.MAX_FRAME_BYTES + 1
    big.receive_data(b"\xc6" + size.to_bytes(4, "big") + b"\0" * size)
    (event,) = drain(big)
    assert isinstance(event, P.ProtocolViolation)
    assert "limit" in event.message


@BUDGET
@given(
    st.sampled_from(sorted(schema.METHODS)),
    st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    "handle",
                    "spec",
                    "process_id",
                    "signal",
                    "limits",
                    "path",
                    "user",
                    "stream",
                    "stdin",
                    "stdout",
                    "stderr",
                    "tty",
                    "seconds",
                    "rule",
                    "rules",
                    "handles",
                    "properties",
                    "name",
                    "value",
                    "host_port",
                    "container_port",
                    "kill",
                ]
            ),
            st.text(max_size=8),
        ),
        values,
        max_size=6,
    ),
)
def test_call_arguments_are_accepted_or_refused_with_a_garden_error(
    method: str, args: dict[str, Any]
) -> None:
    refusal = refused(schema.check, method, args)
    if refusal is None:
        assert set(schema.check(method, args)) <= set(args)


def spec_fields() -> st.SearchStrategy[dict[str, Any]]:
    """ContainerSpec maps: the right fields with values of any type, plus strays."""
    names = [
        "handle",
        "grace_time",
        "rootfs_path",
        "image",
        "bind_mounts",
        "network",
        "properties",
        "env",
        "privileged",
        "limits",
        "net_out",
        "net_in",
    ]
    bind_mount = st.fixed_dictionaries(
        {},
        optional={
            "src_path": st.one_of(
                st.sampled_from(["/tmp", "/../..", "/etc/shadow", "", "rel", "/x\0"]), values
            ),
            "dst_path": st.one_of(
                st.sampled_from(["/mnt", "/..", "../../x", "", "/proc/1/root"]), values
            ),
            "mode": st.one_of(st.integers(-2, 3), values),
            "origin": st.one_of(st.integers(-2, 3), values),
        },
    )
    limits = st.fixed_dictionaries(
        {},
        optional={
            "memory": st.fixed_dictionaries(
                {}, optional={"limit_in_bytes": st.one_of(st.integers(-(1 << 70), 1 << 70), values)}
            ),
            "pid": st.fixed_dictionaries(
                {}, optional={"max": st.one_of(st.integers(-5, 1 << 40), values)}
            ),
            "cpu": st.fixed_dictionaries(
                {}, optional={"weight": values, "limit_in_shares": values}
            ),
        },
    )
    special = {
        "bind_mounts": st.lists(bind_mount, max_size=3),
        "limits": limits,
        "env": st.lists(
            st.one_of(st.sampled_from(["A=1", "NOEQ", "=x", "A=\0", ""]), values), max_size=3
        ),
        "handle": st.one_of(scalars, st.sampled_from(["ok", "a/b", "..", "x" * 201, "\0"])),
    }
    return st.fixed_dictionaries(
        {}, optional={n: special.get(n, values) for n in names + ["stray"]}
    )


@BUDGET
@given(spec_fields())
def test_container_specs_are_refused_or_safe(spec: dict[str, Any]) -> None:
    if refused(schema.check, "create", {"spec": spec}) is not None:
        return
    decoded: T.ContainerSpec = schema.check("create", {"spec": spec})["spec"]
    if decoded.handle and refused(check_name, "handle", decoded.handle) is not None:
        return
    assert isinstance(decoded, T.ContainerSpec)
    for entry in decoded.env:
        assert "=" in entry
        assert not entry.startswith("=")
        assert "\0" not in entry
    for bm in decoded.bind_mounts:
        assert isinstance(bm.src_path, str)
        assert isinstance(bm.dst_path, str)
    assert decoded.limits.memory.limit_in_bytes >= 0
    assert math.isfinite(decoded.grace_time)
    name = depot.dir_name(decoded.handle or "generated")
    assert name not in ("", ".", "..")
    assert "/" not in name
    assert "\0" not in name
    assert os.path.basename(name) == name
    assert len(name.encode()) <= 255


@BUDGET
@given(st.one_of(st.text(max_size=300), st.sampled_from(["..", ".", "a/b", "/", "\0", "x" * 201])))
def test_names_that_pass_are_one_path_component(name: str) -> None:
    for kind in ("handle", "process id"):
        refusal = refused(check_name, kind, name)
        if refusal is not None:
            assert kind in refusal
            continue
        assert "/" not in name
        assert "\0" not in name
        assert name not in (".", "..")
        assert len(name.encode()) <= 200
        escaped = depot.dir_name(name)
        assert os.path.normpath(os.path.join("/depot", escaped)) == os.path.join("/depot", escaped)


def process_specs() -> st.SearchStrategy[dict[str, Any]]:
    """ProcessSpec maps with hostile ids, paths, env, users, dirs, limits and ttys."""
    hostile = st.sampled_from(["", ".", "..", "a/b", "x\0y", "/", "../../etc", "p" * 300, "ok"])
    big = st.integers(-(1 << 65), 1 << 65)
    limits = st.fixed_dictionaries(
        {}, optional={k: st.one_of(big, values) for k in ("nofile", "nproc", "as_", "cpu")}
    )
    window = st.fixed_dictionaries(
        {}, optional={"columns": st.integers(-5, 1 << 20), "rows": values}
    )
    tty = st.fixed_dictionaries({}, optional={"window_size": st.one_of(window, values)})
    fields = {
        "id": st.one_of(hostile, values),
        "args": st.one_of(st.lists(st.text(max_size=10), max_size=3), values),
        "env": st.lists(
            st.one_of(st.sampled_from(["A=1", "NOEQ", "=x", "A=\0"]), values), max_size=3
        ),
        "dir": st.one_of(hostile, values),
        "user": st.one_of(st.sampled_from(["root", "1000:1000", "a:b:c", "-1", "\0"]), values),
        "limits": st.one_of(limits, values),
        "tty": st.one_of(st.none(), tty, values),
        "stray": values,
    }
    path = st.one_of(st.sampled_from(["true", "/bin/sh", "", "\0"]), values)
    return st.fixed_dictionaries({"path": path}, optional=fields)


@BUDGET
@given(process_specs())
def test_process_specs_are_refused_or_safe(spec: dict[str, Any]) -> None:
    args = {"handle": "h", "spec": spec, "stream": 1}
    if refused(schema.check, "run", args) is not None:
        return
    decoded: T.ProcessSpec = schema.check("run", args)["spec"]
    assert isinstance(decoded, T.ProcessSpec)
    assert isinstance(decoded.path, str)
    for entry in decoded.env:
        assert "=" in entry
        assert not entry.startswith("=")
    if decoded.id and refused(check_name, "process id", decoded.id) is None:
        assert "/" not in decoded.id
        assert decoded.id not in (".", "..")
