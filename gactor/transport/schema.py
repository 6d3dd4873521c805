"""Every API method's arguments and result: the table both ends check calls against.

``METHODS`` names each method's arguments (wire key, type, required or not, the
default a missing optional one takes) and the shape of its result. ``check`` applies
it to one call's ``args``: the client runs it before encoding a call, the server
before dispatching one, so a bad value is refused with a ``GardenError`` naming the
field (an error reply; the connection stays up). The tables of docs/protocol.md are
``GENERATED`` by this module
(``python -m gactor.transport.schema`` prints them), and a test checks the document
against it and against the server's method tables.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .. import types as T
from ..errors import GardenError

# ---- argument kinds: how the document names a type, and the check of a value --------


@dataclass(frozen=True)
class Kind:
    """One argument type: ``name`` as the document writes it, ``check`` raises
    GardenError naming ``key`` when a value is not of it; ``wire_type`` is the dataclass
    a map argument is decoded into (None for a plain value), and then ``check`` returns
    the decoded value."""

    name: str
    check: Callable[[str, Any], Any]
    wire_type: type | None = None


def _type_error(key: str, expected: str, value: Any) -> GardenError:
    return GardenError(f"argument '{key}' must be {expected}, not {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; refuse it


def _check_str(key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _type_error(key, "str", value)


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _type_error(key, "bool", value)


def _check_uint(bits: int) -> Callable[[str, Any], None]:
    def check(key: str, value: Any) -> None:
        if not _is_int(value):
            raise _type_error(key, "an integer", value)
        if not 0 <= value < 1 << bits:
            raise GardenError(f"argument '{key}' = {value} is out of range for a uint{bits}"
                              f" (0..{(1 << bits) - 1})")

    return check


def _check_seconds(key: str, value: Any) -> None:
    if not (_is_int(value) or isinstance(value, float)):
        raise _type_error(key, "float", value)
    if not (math.isfinite(value) and 0 <= value < T.MAX_SECONDS):
        raise GardenError(f"argument '{key}' out of range: {value} (seconds, 0 <= s < {T.MAX_SECONDS:.0e})")


def _check_signal(key: str, value: Any) -> None:
    if not _is_int(value):
        raise _type_error(key, "an integer", value)
    if value not in tuple(T.Signal):
        raise GardenError(f"invalid signal {value}: argument '{key}' must be 0 (terminate) or 1 (kill),"
                          " Garden's Signal values, not a POSIX signal number")


def _check_properties(key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _type_error(key, "a map", value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise GardenError(f"argument '{key}' must map strings to strings")


def _check_strings(key: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _type_error(key, "a list", value)
    if not all(isinstance(v, str) for v in value):
        raise GardenError(f"argument '{key}' must be a list of strings")


def _decoded(cls: type, what: str) -> Kind:
    """A map decoded into ``cls`` strictly (types, ranges, no unknown field) and checked
    against the request rules (``types.check_request``)."""

    def check(key: str, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _type_error(key, "a map", value)
        decoded: Any = T.from_wire(cls, value, what, strict=True)
        T.check_request(decoded, what)
        return decoded

    return Kind(cls.__name__, check, cls)


def _decoded_list(cls: type, what: str) -> Kind:
    item = _decoded(cls, what)

    whole = list[cls]  # type: ignore[valid-type]

    def check(key: str, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _type_error(key, "a list", value)
        # Fast path for long lists (BulkNetOut: thousands of rules): one C call decodes them
        # all; only a list with a problem goes element by element, to name it.
        if all(isinstance(element, dict) for element in value):
            try:
                decoded: list[Any] = msgspec.convert(value, type=whole)
            except msgspec.ValidationError:
                pass
            else:
                if T._check_fields(whole, value, key, strict=True) is None:
                    for element in decoded:
                        T.check_request(element, what)
                    return decoded
        return [item.check(f"{key}[{i}]", element) for i, element in enumerate(value)]

    return Kind(f"list of {cls.__name__}", check, cls)


STR = Kind("str", _check_str)
BOOL = Kind("bool", _check_bool)
STREAM = Kind("uint64 (stream id)", _check_uint(64))
PORT = Kind("uint32", _check_uint(32))
SECONDS = Kind("float (seconds)", _check_seconds)
SIGNAL = Kind("Signal", _check_signal)
PROPERTIES = Kind("map str→str", _check_properties)
HANDLES = Kind("list of str", _check_strings)

# ---- the methods ------------------------------------------------------------------

_REQUIRED = object()  # an Arg default meaning "no default: the argument must be given"


@dataclass(frozen=True)
class Arg:
    name: str
    kind: Kind
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Method:
    """One method: its arguments, its result (as the document writes it), and whether
    it opens a stream (its ``args`` must then hold ``stream``), or may (``may_stream``: a
    call with a ``stream`` opens one, a call without is answered as any other)."""

    name: str
    args: tuple[Arg, ...]
    result: str
    streams: bool = False
    result_types: tuple[type, ...] = ()  # the wire types its result is made of
    may_stream: bool = False

    @property
    def opens(self) -> str:
        """The results table's "opens a stream" cell."""
        return "yes" if self.streams else "if given a `stream`" if self.may_stream else "no"


HANDLE = Arg("handle", STR)
NIL = "nil"


def _stream_args(*args: Arg) -> tuple[Arg, ...]:
    return (*args, Arg("stream", STREAM))


def _pipes() -> tuple[Arg, ...]:
    return tuple(Arg(pipe, BOOL, False) for pipe in ("stdin", "stdout", "stderr"))


_METHODS = [
    Method("ping", (), NIL),
    Method("capacity", (), "Capacity", result_types=(T.Capacity,)),
    Method("images", (), "list of ImageInfo", result_types=(T.ImageInfo,)),
    Method("prune_images", (), "list of str (the removed images' paths and layers' digests)"),
    Method("pull", (Arg("uri", STR), Arg("username", STR, ""), Arg("password", STR, ""), Arg("stream", STREAM, None)),
           "ImageInfo; with a `stream`, after LayerProgress `event` frames and `exit` code 0 on it",
           result_types=(T.ImageInfo, T.LayerProgress), may_stream=True),
    Method("create", (Arg("spec", _decoded(T.ContainerSpec, "container spec")),), '`{"handle": str}`'),
    Method("destroy", (HANDLE,), NIL),
    Method("containers", (Arg("properties", PROPERTIES, {}),), "list of str (handles)"),
    Method("lookup", (HANDLE,), '`{"handle": str}`'),
    Method("bulk_info", (Arg("handles", HANDLES),),
           'map handle→`{"info": ContainerInfo or nil, "err": error object or nil}`',
           result_types=(T.ContainerInfo,)),
    Method("bulk_metrics", (Arg("handles", HANDLES),),
           'map handle→`{"metrics": Metrics or nil, "err": error object or nil}`',
           result_types=(T.Metrics,)),
    Method("set_grace_time", (HANDLE, Arg("seconds", SECONDS)), NIL),
    Method("stop", (HANDLE, Arg("kill", BOOL, False)), NIL),
    Method("info", (HANDLE,), "ContainerInfo", result_types=(T.ContainerInfo,)),
    Method("metrics", (HANDLE,), "Metrics", result_types=(T.Metrics,)),
    Method("properties", (HANDLE,), "map str→str"),
    Method("property", (HANDLE, Arg("name", STR)), "str"),
    Method("set_property", (HANDLE, Arg("name", STR), Arg("value", STR)), NIL),
    Method("remove_property", (HANDLE, Arg("name", STR)), NIL),
    Method("signal", (HANDLE, Arg("process_id", STR), Arg("signal", SIGNAL)), NIL),
    Method("set_tty", (HANDLE, Arg("process_id", STR), Arg("tty", _decoded(T.TTYSpec, "tty spec"))), NIL),
    Method("limit_memory", (HANDLE, Arg("limits", _decoded(T.MemoryLimits, "memory limits"))), NIL),
    Method("current_memory_limits", (HANDLE,), "MemoryLimits", result_types=(T.MemoryLimits,)),
    Method("limit_cpu", (HANDLE, Arg("limits", _decoded(T.CPULimits, "cpu limits"))), NIL),
    Method("current_cpu_limits", (HANDLE,), "CPULimits", result_types=(T.CPULimits,)),
    Method("limit_bandwidth", (HANDLE, Arg("limits", _decoded(T.BandwidthLimits, "bandwidth limits"))), NIL),
    Method("current_bandwidth_limits", (HANDLE,), "BandwidthLimits", result_types=(T.BandwidthLimits,)),
    Method("current_disk_limits", (HANDLE,), "DiskLimits", result_types=(T.DiskLimits,)),
    Method("net_in", (HANDLE, Arg("host_port", PORT, 0), Arg("container_port", PORT, 0)),
           "`[host_port, container_port]`"),
    Method("net_out", (HANDLE, Arg("rule", _decoded(T.NetOutRule, "net out rule"))), NIL),
    Method("bulk_net_out", (HANDLE, Arg("rules", _decoded_list(T.NetOutRule, "net out rule"))), NIL),
    Method("run", _stream_args(HANDLE, Arg("spec", _decoded(T.ProcessSpec, "process spec")), *_pipes()),
           '`{"process_id": str}`; then `output` frames and one `exit` on the stream', streams=True),
    Method("attach", _stream_args(HANDLE, Arg("process_id", STR), *_pipes()),
           '`{"process_id": str}`; then `output` frames and one `exit` on the stream', streams=True),
    Method("stream_in", _stream_args(HANDLE, Arg("path", STR), Arg("user", STR, "")),
           "`{}` once the archive is extracted, after `exit` code 0 on the stream", streams=True),
    Method("stream_out", _stream_args(HANDLE, Arg("path", STR), Arg("user", STR, "")),
           "`{}`; then the tar as `output` fd 1 and one `exit` on the stream", streams=True),
    Method("events", _stream_args(Arg("handle", STR, ""), Arg("lifecycle", BOOL, False)),
           '`{}`; then `event` frames: ContainerEvent with `lifecycle`, else `{"handle": str, "event": str}`',
           streams=True, result_types=(T.ContainerEvent,)),
]
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}

# Methods the server answers with an error saying they are not implemented yet; their
# arguments are checked all the same (they are the contract they will keep).
NOT_IMPLEMENTED: frozenset[str] = frozenset()


def check(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """Check one call's ``args`` against ``METHODS``; raises GardenError naming the
    method, argument or field that is wrong. Returns the args with every map argument
    decoded into its ``wire_type`` (the checked value: nothing is decoded twice); a
    missing optional argument stays missing."""
    spec = METHODS.get(method)
    if spec is None:
        raise GardenError(f"unknown method {method!r}")
    if spec.streams and "stream" not in args:
        raise GardenError(f"{method} needs a 'stream' id in its args: it opens a stream"
                          " (see Streams in docs/protocol.md)")
    known = {a.name: a for a in spec.args}
    for key in args:
        if key not in known:
            expected = ", ".join(repr(k) for k in known) or "none"
            raise GardenError(f"{method}: unknown argument {key!r} (its arguments: {expected})")
    checked = dict(args)
    for arg in spec.args:
        if arg.name not in args:
            if arg.required:
                raise GardenError(f"missing argument {arg.name!r}")
            continue
        decoded = arg.kind.check(arg.name, args[arg.name])
        if arg.kind.wire_type is not None:
            checked[arg.name] = decoded
    return checked


# ---- the document's tables --------------------------------------------------------


def wire_types() -> list[type]:
    """Every dataclass that crosses the wire in a method's args or result, nested ones
    included, in the order the document lists them."""
    roots = [a.kind.wire_type for m in _METHODS for a in m.args if a.kind.wire_type]
    roots += [t for m in _METHODS for t in m.result_types]
    seen: dict[type, None] = {}

    def visit(tp: type) -> None:
        if tp in seen:
            return
        seen[tp] = None
        for hint in T.field_types(tp).values():
            for inner in _inner_types(hint):
                if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                    visit(inner)

    for root in roots:
        visit(root)
    return list(seen)


def wire_enums() -> list[type[enum.IntEnum]]:
    found: dict[type[enum.IntEnum], None] = {}
    for tp in wire_types():
        for hint in T.field_types(tp).values():
            for inner in _inner_types(hint):
                if isinstance(inner, type) and issubclass(inner, enum.IntEnum):
                    found[inner] = None
    found[T.Signal] = None  # the `signal` argument
    return list(found)


def _inner_types(hint: Any) -> Iterator[Any]:
    yield hint
    for inner in typing.get_args(hint):
        if isinstance(inner, type) or typing.get_origin(inner) is not None:  # not a Meta or Range
            yield from _inner_types(inner)


def type_name(hint: Any) -> str:
    """How the document writes a field's type."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *meta = typing.get_args(hint)
        for bound in meta:
            if isinstance(bound, T.Range):
                return bound.go_type
        return "float (seconds)" if base is float else type_name(base)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{type_name(arms[0])} or nil"
    if origin is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"map {type_name(key)}→{type_name(value)}"
    if hint is Any:
        return "any"
    return {str: "str", bool: "bool", int: "int", float: "float"}.get(hint, getattr(hint, "__name__", str(hint)))


def default_text(f: dataclasses.Field[Any]) -> str:
    """A field's default as the document writes it (JSON, nil for None)."""
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        value = {} if dataclasses.is_dataclass(made) else T.to_wire(made)  # {}: its own defaults
    else:
        value = T.to_wire(f.default)
    return "nil" if value is None else json.dumps(value, separators=(", ", ": "))


def render_arguments() -> str:
    """One row per argument of every method; "(none)" for a method without any."""
    out = ["| method | argument | type | required | default |", "|---|---|---|---|---|"]
    for m in _METHODS:
        for a in m.args or (None,):
            if a is None:
                out.append(f"| `{m.name}` | (none) | | | |")
                continue
            default = "" if a.required else f"`{json.dumps(a.default)}`"
            out.append(f"| `{m.name}` | `{a.name}` | {a.kind.name} | {'yes' if a.required else 'no'} | {default} |")
    return "\n".join(out) + "\n"


def render_results() -> str:
    out = ["| method | result | opens a stream |", "|---|---|---|"]
    for m in _METHODS:
        result = m.result + (" (not implemented yet: an error)" if m.name in NOT_IMPLEMENTED else "")
        out.append(f"| `{m.name}` | {result} | {m.opens} |")
    return "\n".join(out) + "\n"


def render_types() -> str:
    out: list[str] = []
    for tp in wire_types():
        out.append(f"### {tp.__name__}\n")
        out.append("| field | type | default |")
        out.append("|---|---|---|")
        hints = T.field_types(tp)
        for f in dataclasses.fields(tp):
            out.append(f"| `{f.name}` | {type_name(hints[f.name])} | `{default_text(f)}` |")
        out.append("")
    return "\n".join(out)


def render_enums() -> str:
    out = ["| enum | value | name |", "|---|---|---|"]
    for e in wire_enums():
        for member in e:
            out.append(f"| {e.__name__} | {int(member)} | `{member.name}` |")
    return "\n".join(out) + "\n"


# The document's generated parts, each between ``<!-- NAME: generated by ... -->`` and
# ``<!-- end of NAME -->``.
GENERATED: dict[str, Callable[[], str]] = {
    "arguments": render_arguments, "results": render_results, "enums": render_enums, "types": render_types,
}



def begin_marker(name: str) -> str:
    return f"<!-- {name}: generated by python -m gactor.transport.schema -->"


def end_marker(name: str) -> str:
    return f"<!-- end of {name} -->"


if __name__ == "__main__":
    for name, text in GENERATED.items():
        sys.stdout.write(f"{begin_marker(name)}\n{text()}{end_marker(name)}\n\n")
