"""docs/protocol.md against the code: its tables are parsed and compared with
gactor/transport/schema.py, with the server's method tables and with the protocol's
constants; and ``schema.check`` refuses each kind of bad argument naming it."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from gactor import types as T
from gactor.actors import events
from gactor.errors import GardenError
from gactor.transport import protocol as P
from gactor.transport import schema, ws_server
from gactor.transport.methods import API_METHODS, CONTAINER_METHODS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def doc_text() -> str:
    return DOC.read_text()


def generated(name: str) -> str:
    """The text between a generated part's begin and end markers."""
    text = doc_text()
    begin, end = schema.begin_marker(name), schema.end_marker(name)
    assert text.count(begin) == 1, f"docs/protocol.md needs exactly one {begin!r}"
    assert text.count(end) == 1, f"docs/protocol.md needs exactly one {end!r}"
    return text.split(begin, 1)[1].split(end, 1)[0].lstrip("\n")


def rows(markdown: str) -> list[list[str]]:
    """The body rows of every table in ``markdown``, as stripped cells."""
    out = []
    for line in markdown.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(re.fullmatch(r"-+", c) for c in cells):
            continue  # the separator
        out.append(cells)
    return [r for r in out if r[0] not in ("method", "enum", "field")]  # drop the header rows


def unquote(cell: str) -> str:
    return cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell


# ---- the document's tables against schema.py -------------------------------------------


def test_generated_parts_are_current() -> None:
    """Regenerate with `python -m gactor.transport.schema` when this fails."""
    for name, render in schema.GENERATED.items():
        assert generated(name) == render(), f"the {name!r} part of docs/protocol.md is stale"


def test_argument_table_lists_every_argument() -> None:
    documented: dict[str, list[tuple[str, str, bool, Any]]] = {}
    for method, argument, kind, required, default in rows(generated("arguments")):
        entry = documented.setdefault(unquote(method), [])
        if argument == "(none)":
            continue
        assert required in ("yes", "no"), required
        value = json.loads(unquote(default)) if default else None
        entry.append((unquote(argument), kind, required == "yes", value))
    expected = {
        name: [(a.name, a.kind.name, a.required, None if a.required else a.default) for a in m.args]
        for name, m in schema.METHODS.items()
    }
    assert documented == expected


def test_result_table_lists_every_method() -> None:
    documented = {unquote(m): (result, streams) for m, result, streams in rows(generated("results"))}
    assert set(documented) == set(schema.METHODS)
    for name, m in schema.METHODS.items():
        result, streams = documented[name]
        assert result.startswith(m.result), (name, result)
        assert streams == ("yes" if m.streams else "if given a `stream`" if m.may_stream else "no"), name
        assert ("not implemented yet" in result) == (name in schema.NOT_IMPLEMENTED), name


def test_enum_table_lists_every_enum_value() -> None:
    documented = {(e, int(v), unquote(n)) for e, v, n in rows(generated("enums"))}
    in_code = {(e.__name__, int(m), m.name) for e in schema.wire_enums() for m in e}
    assert documented == in_code
    # Every enum a wire type uses is there; `signal` takes Garden's 0/1.
    assert {("Signal", 0, "TERMINATE"), ("Signal", 1, "KILL")} <= documented
    used = {
        inner
        for tp in schema.wire_types()
        for hint in T.field_types(tp).values()
        for inner in schema._inner_types(hint)
        if isinstance(inner, type) and issubclass(inner, enum.IntEnum)
    }
    assert {e.__name__ for e in used} <= {e for e, _, _ in documented}


def test_type_tables_list_every_field() -> None:
    text = generated("types")
    sections = re.split(r"^### (\w+)\n", text, flags=re.MULTILINE)[1:]
    documented = {name: rows(body) for name, body in zip(sections[::2], sections[1::2], strict=True)}
    assert list(documented) == [tp.__name__ for tp in schema.wire_types()]
    for tp in schema.wire_types():
        hints = T.field_types(tp)
        expected = [
            [f"`{f.name}`", schema.type_name(hints[f.name]), f"`{schema.default_text(f)}`"]
            for f in dataclasses.fields(tp)
        ]
        assert documented[tp.__name__] == expected, tp.__name__


def test_every_type_a_method_names_is_documented() -> None:
    names = {tp.__name__ for tp in schema.wire_types()}
    for m in schema.METHODS.values():
        for a in m.args:
            if a.kind.wire_type is not None:
                assert a.kind.wire_type.__name__ in names, (m.name, a.name)
        for tp in m.result_types:
            assert tp.__name__ in names, m.name


# ---- schema.py against the server ------------------------------------------------------


def test_schema_lists_exactly_the_servers_methods() -> None:
    """A method added to the server without a schema entry (and so without documentation)
    fails here; so does a schema entry the server does not serve."""
    streaming = {"run", "attach", *ws_server._STREAMING}
    served = set(API_METHODS) | set(CONTAINER_METHODS) | streaming
    assert set(schema.METHODS) == served
    assert {n for n, m in schema.METHODS.items() if m.streams or m.may_stream} == streaming
    # A method that may stream is also a plain call (without a `stream`); one that must is not.
    plain = set(API_METHODS) | set(CONTAINER_METHODS)
    assert {n for n in streaming if n in plain} == {n for n, m in schema.METHODS.items() if m.may_stream}


def test_streaming_methods_take_a_stream_and_others_do_not() -> None:
    for name, m in schema.METHODS.items():
        assert ("stream" in {a.name for a in m.args}) == (m.streams or m.may_stream), name
        assert not (m.streams and m.may_stream), name


# ---- the document's numbers against the code --------------------------------------------

CONSTANTS = {
    "MAX_FRAME_BYTES": P.MAX_FRAME_BYTES,
    "MAX_DATA_CHUNK": P.MAX_DATA_CHUNK,
    "INITIAL_WINDOW": P.INITIAL_WINDOW,
    "MAX_CREDIT": P.MAX_CREDIT,
    "MIN_MEMORY_LIMIT": T.MIN_MEMORY_LIMIT,
    "MAX_PIDS_LIMIT": T.MAX_PIDS_LIMIT,
}


def test_every_named_constant_in_the_document_has_its_value() -> None:
    """Wherever the document names a constant with a value ("`INITIAL_WINDOW` = 4 MiB
    (4194304)" or a limits-table row), the value is the code's."""
    text = doc_text()
    seen = set()
    for name, value in CONSTANTS.items():
        for match in re.finditer(rf"`{name}`\s*(?:=|\|)\s*([^|\n]*?\((\d+)\))", text):
            assert int(match.group(2)) == value, (name, match.group(0))
            seen.add(name)
    assert seen == set(CONSTANTS)
    assert f"`SEND_TIMEOUT` = {ws_server.SEND_TIMEOUT:g} s" in text
    assert f"falls {events.EVENT_QUEUE} events behind" in text


def test_every_event_kind_is_documented() -> None:
    """The events stream's bullet names every ContainerEvent kind, and LayerProgress's
    fields are the pull stream's."""
    text = " ".join(doc_text().split())
    bullet = text.split("With `\"lifecycle\": true`", 1)[1].split("- **pull** with a `stream`", 1)[0]
    for kind in T.EVENT_KINDS:
        assert f"`{kind}`" in bullet, kind
    assert events.RECORDED <= set(T.EVENT_KINDS)
    pull = text.split("- **pull** with a `stream`", 1)[1][:200]
    for field in dataclasses.fields(T.LayerProgress):
        assert f"`{field.name}`" in pull, field.name


def test_no_window_or_stall_other_than_the_initial_window() -> None:
    """The stdin window and the stall point are INITIAL_WINDOW, never another size."""
    text = " ".join(doc_text().split())
    for claim in re.findall(r"(?:may send|stalls after)[^.]*?(\d+ [MK]iB)", text):
        assert claim == f"{P.INITIAL_WINDOW >> 20} MiB", claim


def test_close_codes_are_documented() -> None:
    text = " ".join(doc_text().split())
    assert "closes the websocket with code 1002" in text
    assert "code **1003**" in " ".join(doc_text().split())


# ---- schema.check ------------------------------------------------------------------------

MiB = 1 << 20
RUN = {"handle": "h", "spec": {"path": "true"}, "stream": 1, "stdout": True}


def refused(method: str, args: dict[str, Any]) -> str:
    with pytest.raises(GardenError) as raised:
        schema.check(method, args)
    return raised.value.message


def valid_args(m: schema.Method) -> dict[str, Any]:
    """Every argument of ``m``, required and optional, at a value it accepts."""
    samples: dict[str, Any] = {
        "str": "x", "bool": True, "uint64 (stream id)": 7, "uint32": 80, "float (seconds)": 1.5,
        "Signal": 1, "map str→str": {"a": "b"}, "list of str": ["a"],
    }  # fmt: skip
    args = {}
    for a in m.args:
        if a.kind.wire_type is not None:
            value: Any = T.to_wire(a.kind.wire_type())
            args[a.name] = [value] if a.kind.name.startswith("list of") else value
        else:
            args[a.name] = samples[a.kind.name]
    return args


@pytest.mark.parametrize("method", list(schema.METHODS))
def test_every_method_accepts_its_documented_arguments(method: str) -> None:
    m = schema.METHODS[method]
    schema.check(method, valid_args(m))
    schema.check(method, {a.name: valid_args(m)[a.name] for a in m.args if a.required})


@pytest.mark.parametrize("method", list(schema.METHODS))
def test_every_method_refuses_an_unknown_argument(method: str) -> None:
    args = {**valid_args(schema.METHODS[method]), "bogus": 1}
    assert f"{method}: unknown argument 'bogus'" in refused(method, args)


@pytest.mark.parametrize("method", [n for n, m in schema.METHODS.items() if any(a.required for a in m.args)])
def test_every_required_argument_is_required(method: str) -> None:
    m = schema.METHODS[method]
    for a in m.args:
        if a.required and a.name != "stream":
            args = valid_args(m)
            del args[a.name]
            assert refused(method, args) == f"missing argument {a.name!r}"


@pytest.mark.parametrize("method", ["run", "attach", "stream_in", "stream_out", "events"])
def test_a_streaming_method_without_a_stream(method: str) -> None:
    args = valid_args(schema.METHODS[method])
    del args["stream"]
    message = refused(method, args)
    assert message.startswith(f"{method} needs a 'stream' id"), message
    assert "unknown method" not in message


@pytest.mark.parametrize(
    ("method", "args", "words"),
    [
        ("no_such_method", {}, "unknown method 'no_such_method'"),
        ("destroy", {"handle": 5}, "argument 'handle' must be str, not int"),
        ("stop", {"handle": "h", "kill": 1}, "argument 'kill' must be bool, not int"),
        ("set_grace_time", {"handle": "h", "seconds": True}, "argument 'seconds' must be float"),
        ("set_grace_time", {"handle": "h", "seconds": math.inf}, "argument 'seconds' out of range"),
        ("set_grace_time", {"handle": "h", "seconds": math.nan}, "argument 'seconds' out of range"),
        ("set_grace_time", {"handle": "h", "seconds": -1}, "argument 'seconds' out of range"),
        ("signal", {"handle": "h", "process_id": "p", "signal": 9}, "invalid signal 9"),
        ("signal", {"handle": "h", "process_id": "p", "signal": 15}, "not a POSIX signal number"),
        ("net_in", {"handle": "h", "host_port": 1 << 32}, "argument 'host_port' = 4294967296 is out of range"),
        ("net_in", {"handle": "h", "container_port": -1}, "argument 'container_port' = -1 is out of range"),
        ("containers", {"properties": {"a": 1}}, "argument 'properties' must map strings to strings"),
        ("bulk_info", {"handles": ["a", 2]}, "argument 'handles' must be a list of strings"),
        ("create", {"spec": []}, "argument 'spec' must be a map, not list"),
        (
            "create",
            {"spec": {"limits": {"memory": {"limit_in_bytes": 1 << 64}}}},
            "limits.memory.limit_in_bytes = 18446744073709551616 is out of range for a uint64",
        ),
        ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": -1}}}}, "limits.memory.limit_in_bytes"),
        ("create", {"spec": {"limits": {"cpu": {"weight": 1 << 64}}}}, "limits.cpu.weight"),
        ("create", {"spec": {"limits": {"pid": {"max": (4 << 20) + 1}}}}, "limits.pid.max = 4194305"),
        ("create", {"spec": {"grace_time": math.inf}}, "grace_time"),
        ("create", {"spec": {"net_in": [{"host_port": 1 << 32}]}}, "net_in[0].host_port"),
        ("create", {"spec": {"bind_mounts": [{"mode": 2}]}}, "bind_mounts[0].mode"),
        ("create", {"spec": {"handel": "x"}}, "unknown field 'handel'"),
        ("create", {"spec": {"limits": {"memroy": {}}}}, "unknown field 'limits.memroy'"),
        ("create", {"spec": {"env": ["FOO"]}}, "env[0] 'FOO': invalid environment variable: missing '='"),
        ("create", {"spec": {"env": ["A=1", "=x"]}}, "env[1] '=x': invalid environment variable: name cannot be empty"),
        ("create", {"spec": {"env": ["A=\0"]}}, "contains nul byte"),
        ("run", {**RUN, "spec": {"path": "true", "env": ["FOO"]}}, "invalid process spec: env[0] 'FOO'"),
        ("run", {**RUN, "spec": {"path": "true", "limits": {"nofile": 1 << 64}}}, "limits.nofile"),
        ("run", {**RUN, "spec": {"path": "true", "limits": {"nofile": -5}}}, "limits.nofile"),
        ("run", {**RUN, "spec": {"path": "true", "tty": {"window_size": {"columns": 70000}}}}, "tty.window_size.columns"),
        ("run", {**RUN, "stdin": "yes"}, "argument 'stdin' must be bool, not str"),
        ("set_tty", {"handle": "h", "process_id": "p", "tty": {"window_size": {"rows": -1}}}, "window_size.rows"),
        ("limit_memory", {"handle": "h", "limits": {"limit_in_bytes": 1 << 64}}, "limit_in_bytes"),
        ("limit_cpu", {"handle": "h", "limits": {"weight": -1}}, "weight"),
        ("bulk_net_out", {"handle": "h", "rules": [{}, {"protocol": 9}]}, "protocol"),
        ("net_out", {"handle": "h", "rule": {"ports": [{"start": 1 << 16}]}}, "ports[0].start"),
        ("net_out", {"handle": "h", "rule": {"icmps": {"type": 256}}}, "icmps.type"),
    ],
)
def test_bad_values_are_refused_naming_the_field(method: str, args: dict[str, Any], words: str) -> None:
    message = refused(method, args)
    assert words in message, message


@pytest.mark.parametrize("limit", [1, 1 << 20, T.MIN_MEMORY_LIMIT - 1])
def test_a_memory_limit_too_small_to_start_a_container(limit: int) -> None:
    for method, args in [
        ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": limit}}}}),
        ("limit_memory", {"handle": "h", "limits": {"limit_in_bytes": limit}}),
    ]:
        message = refused(method, args)
        assert f"limits.memory.limit_in_bytes = {limit} is below the smallest memory limit" in message
        assert str(T.MIN_MEMORY_LIMIT) in message


@pytest.mark.parametrize("limit", [0, T.MIN_MEMORY_LIMIT, 64 * MiB, (1 << 64) - 1])
def test_memory_limits_that_are_fine(limit: int) -> None:
    schema.check("create", {"spec": {"limits": {"memory": {"limit_in_bytes": limit}}}})
    schema.check("limit_memory", {"handle": "h", "limits": {"limit_in_bytes": limit}})


def test_uint64_fields_take_their_whole_range() -> None:
    top = (1 << 64) - 1
    spec = {"limits": {"cpu": {"weight": top, "limit_in_shares": top}, "bandwidth":
                       {"rate_in_bytes_per_second": top}, "disk": {"byte_hard": top}}}  # fmt: skip
    schema.check("create", {"spec": spec})
    schema.check("run", {**RUN, "spec": {"path": "true", "limits": {"nofile": top}}})
    schema.check("create", {"spec": {"limits": {"pid": {"max": T.MAX_PIDS_LIMIT}}}})


def test_a_record_from_an_older_server_still_loads() -> None:
    """Strictness is for requests: restoring a container tolerates extra keys."""
    assert T.from_wire(T.ContainerSpec, {"handle": "h", "retired_field": 1}).handle == "h"
    with pytest.raises(GardenError, match="unknown field 'retired_field'"):
        T.from_wire(T.ContainerSpec, {"handle": "h", "retired_field": 1}, strict=True)


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("foo", {}),
        ("create", {"sepc": {}}),
        ("destroy", {}),
        ("stop", {"handle": "h", "kill": 1}),
        ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": 1 << 64}}}}),
        ("create", {"spec": {"limits": {"memroy": {}}}}),
        ("create", {"spec": {"limits": {"memory": {"limit_in_bytes": 1}}}}),
        ("run", {**RUN, "spec": {"path": "true", "env": ["FOO"]}}),
        ("run", {"handle": "h", "spec": {"path": "true"}}),
    ],
)
def test_the_documents_example_messages_are_the_real_ones(method: str, args: dict[str, Any]) -> None:
    """Each example message docs/protocol.md quotes is what the check says, word for word
    (the document may cut a long one short with "...")."""
    message = refused(method, args)
    text = " ".join(re.sub(r"```.*?```", "", doc_text(), flags=re.DOTALL).split())
    quoted = re.findall(r"`([^`]+)`", text)
    cut = [q.removesuffix(" ...") for q in quoted if q.endswith(" ...")]
    assert message in quoted or any(message.startswith(q) for q in cut), message


def test_check_hands_back_map_arguments_decoded_and_the_rest_as_given() -> None:
    spec = T.to_wire(T.ContainerSpec(handle="h", properties={"a": "b"}))
    checked = schema.check("create", {"spec": spec})
    assert checked["spec"] == T.ContainerSpec(handle="h", properties={"a": "b"})
    assert spec == T.to_wire(T.ContainerSpec(handle="h", properties={"a": "b"}))  # the wire map is untouched
    limits = schema.check("limit_memory", {"handle": "h", "limits": {"limit_in_bytes": 1 << 30}})
    assert limits == {"handle": "h", "limits": T.MemoryLimits(limit_in_bytes=1 << 30)}
    assert schema.check("stop", {"handle": "h"}) == {"handle": "h"}  # a missing optional stays missing


def test_a_long_rule_list_is_decoded_whole_and_a_bad_rule_still_named() -> None:
    """bulk_net_out decodes thousands of rules in one pass; one bad rule among them is
    refused with the same message as on its own."""
    good = {"protocol": 1, "networks": [{"start": "10.1.0.1", "end": ""}], "ports": [{"start": 80, "end": 0}]}
    checked = schema.check("bulk_net_out", {"handle": "h", "rules": [good] * 3000})
    assert checked["rules"] == [T.NetOutRule(protocol=T.Protocol.TCP, networks=[T.IPRange("10.1.0.1", "")],
                                             ports=[T.PortRange(80, 0)])] * 3000
    for bad, words in [({**good, "ports": [{"start": 1 << 16, "end": 0}]}, "ports[0].start = 65536 is out of range"),
                       ({**good, "colour": "red"}, "unknown field 'colour'"),
                       ({**good, "protocol": "tcp"}, "Expected `int`")]:
        assert words in refused("bulk_net_out", {"handle": "h", "rules": [good] * 1500 + [bad] + [good] * 1500})
