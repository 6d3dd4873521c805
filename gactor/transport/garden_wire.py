"""Garden's JSON shapes: requests decoded into gactor's wire maps, results encoded as
Garden's Go server writes them. Pure functions; no I/O, no trio.

Decoding follows Go's ``encoding/json``: keys match case-insensitively (an exact match
wins), unknown keys are ignored, ``null`` leaves a field at its zero value, and
durations are integer nanoseconds. A request is renamed into the snake_case maps of
``gactor.types`` (``netout_rules`` becomes ``net_out``, ``rlimits`` ``limits``...) and
then checked by ``schema.check`` like a websocket call, so a bad value is refused
naming the field. Encoding writes exactly Garden's keys, in Go's field order, every
struct field always present, ``\\u003c``/``\\u003e``/``\\u0026`` escaped and a trailing
newline (``encode``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GardenError, error_to_wire

NS = 1_000_000_000


# ---- decoding ---------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One Garden key of a struct: the gactor field it becomes and how its value is
    converted (``nested`` struct, ``each`` element of a list, or a ``convert`` function);
    ``nullable`` fields are pointers in Go, so ``null`` is kept (as None)."""

    name: str
    nested: Struct | None = None
    each: Struct | None = None
    convert: Callable[[Any], Any] | None = None
    nullable: bool = False


Struct = dict[str, Field]


def _plain(*names: str) -> Struct:
    return {n: Field(n) for n in names}


def duration(value: Any) -> Any:
    """Nanoseconds to gactor's float seconds; anything but an integer is passed on for
    the schema to refuse with its own message."""
    if type(value) is int:
        if value < 0:
            raise GardenError(f"invalid duration {value}: must not be negative (nanoseconds)")
        return value / NS
    if isinstance(value, float) and value.is_integer():
        return value / NS
    raise GardenError(f"invalid duration {value!r}: must be an integer number of nanoseconds")


IMAGE = _plain("uri", "username", "password")
BIND_MOUNT = _plain("src_path", "dst_path", "mode", "origin")
CPU = _plain("weight", "limit_in_shares")
MEMORY = _plain("limit_in_bytes")
BANDWIDTH = {"rate": Field("rate_in_bytes_per_second"), "burst": Field("burst_rate_in_bytes_per_second")}
DISK = _plain("inode_soft", "inode_hard", "byte_soft", "byte_hard", "scope")
LIMITS = {
    "bandwidth_limits": Field("bandwidth", BANDWIDTH),
    "cpu_limits": Field("cpu", CPU),
    "disk_limits": Field("disk", DISK),
    "memory_limits": Field("memory", MEMORY),
    "pid_limits": Field("pid", _plain("max")),
}
NET_OUT_RULE = {
    "protocol": Field("protocol"),
    "networks": Field("networks", each=_plain("start", "end")),
    "ports": Field("ports", each=_plain("start", "end")),
    "icmps": Field("icmps", _plain("type", "code"), nullable=True),
    "log": Field("log"),
}
NET_IN = _plain("handle", "host_port", "container_port")
CONTAINER_SPEC = {
    "handle": Field("handle"),
    "grace_time": Field("grace_time", convert=duration),
    "rootfs": Field("rootfs_path"),
    "image": Field("image", IMAGE),
    "bind_mounts": Field("bind_mounts", each=BIND_MOUNT),
    "network": Field("network"),
    "properties": Field("properties"),
    "env": Field("env"),
    "privileged": Field("privileged"),
    "limits": Field("limits", LIMITS),
    "netout_rules": Field("net_out", each=NET_OUT_RULE),
    "netin": Field("net_in", each=_plain("host_port", "container_port")),
}
RLIMITS = {name: Field("as_" if name == "as" else name, nullable=True) for name in (
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss",
    "rtprio", "sigpending", "stack")}
TTY = {"window_size": Field("window_size", _plain("columns", "rows"), nullable=True)}
PROCESS_SPEC = {
    "id": Field("id"),
    "path": Field("path"),
    "args": Field("args"),
    "env": Field("env"),
    "dir": Field("dir"),
    "user": Field("user"),
    "rlimits": Field("limits", RLIMITS),
    "limits": Field("override_container_limits", {"cpu_limits": Field("cpu", CPU, nullable=True),
                                                  "memory_limits": Field("memory", MEMORY, nullable=True)},
                    nullable=True),
    "tty": Field("tty", TTY, nullable=True),
    "image": Field("image", IMAGE),
    "bind_mounts": Field("bind_mounts", each=BIND_MOUNT),
}
PROCESS_PAYLOAD = {
    "process_id": Field("process_id"),
    "source": Field("source", nullable=True),
    "data": Field("data", nullable=True),
    "tty": Field("tty", TTY, nullable=True),
    "signal": Field("signal", nullable=True),
}


def decode(struct: Struct, obj: Any) -> Any:
    """``obj`` (a parsed JSON value) renamed into gactor's map for ``struct``, as Go
    would decode it: case-insensitive keys (exact first), unknown keys dropped, ``null``
    dropped unless the field is a pointer. A value of the wrong JSON kind is passed on
    unchanged, for ``schema.check`` to refuse naming the field."""
    if not isinstance(obj, dict):
        return obj
    folded = {key.lower(): key for key in struct}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        garden_key = key if key in struct else folded.get(key.lower())
        if garden_key is None:
            continue
        spec = struct[garden_key]
        if value is None:
            if spec.nullable:
                out[spec.name] = None
            else:
                out.pop(spec.name, None)
            continue
        if spec.nested is not None:
            value = decode(spec.nested, value)
        elif spec.each is not None and isinstance(value, list):
            value = [decode(spec.each, element) for element in value]
        elif spec.convert is not None:
            value = spec.convert(value)
        out[spec.name] = value
    return out


def parse(body: bytes, what: str) -> Any:
    """The one JSON value of a request body; GardenError naming ``what`` otherwise (Go's
    decoder says ``EOF`` for an empty body, and so does this)."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise GardenError("EOF")
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        raise GardenError(f"invalid JSON in the {what}: {err}") from None
    return value


# ---- encoding ---------------------------------------------------------------------


def encode(value: Any) -> bytes:
    """``value`` as Go's encoder writes it: compact, HTML characters escaped, UTF-8,
    followed by a newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode("utf-8", errors="replace") + b"\n"


def omit_zero(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The pairs whose value is not a Go zero value (``omitempty``)."""
    return {key: value for key, value in pairs if value not in (0, "", False, None, [], {})}


def error(err: GardenError) -> dict[str, Any]:
    return error_to_wire(err)


def capacity(c: dict[str, Any]) -> dict[str, Any]:
    return omit_zero([(k, c.get(k, 0)) for k in
                      ("memory_in_bytes", "disk_in_bytes", "schedulable_disk_in_bytes", "max_containers")])


def container_info(info: dict[str, Any] | None) -> dict[str, Any]:
    """ContainerInfo with Go's field names; ``None`` gives the zero value (a bulk entry
    with an error). Empty ``Events`` and ``ProcessIDs`` are ``null``, as Go writes nil
    slices; ``MappedPorts`` is ``[]`` when empty, as Guardian returns it."""
    info = info or {}
    ports = [{"HostPort": p.get("host_port", 0), "ContainerPort": p.get("container_port", 0)}
             for p in info.get("mapped_ports") or []]
    return {
        "State": info.get("state", ""),
        "Events": info.get("events") or None,
        "HostIP": info.get("host_ip", ""),
        "ContainerIP": info.get("container_ip", ""),
        "ContainerIPv6": "",
        "ExternalIP": info.get("external_ip", ""),
        "ContainerPath": info.get("container_path", ""),
        "ProcessIDs": info.get("process_ids") or None,
        "Properties": info.get("properties") or ({} if info else None),
        "MappedPorts": ports if info else None,
    }


MEMORY_STAT_KEYS = (
    "active_anon", "active_file", "cache", "hierarchical_memory_limit", "inactive_anon", "inactive_file",
    "mapped_file", "pgfault", "pgmajfault", "pgpgin", "pgpgout", "rss", "total_active_anon",
    "total_active_file", "total_cache", "total_inactive_anon", "total_inactive_file", "total_mapped_file",
    "total_pgfault", "total_pgmajfault", "total_pgpgin", "total_pgpgout", "total_rss", "total_unevictable",
    "unevictable", "swap", "hierarchical_memsw_limit", "total_swap", "TotalUsageTowardLimit", "anon", "file",
    "swapcached")


def metrics(m: dict[str, Any] | None) -> dict[str, Any]:
    """Metrics with Go's field names; ``Age`` in nanoseconds; ``None`` gives the zero value."""
    m = m or {}
    memory = m.get("memory_stat") or {}
    cpu = m.get("cpu_stat") or {}
    disk = m.get("disk_stat") or {}
    pids = m.get("pid_stat") or {}
    network = m.get("network_stat")
    return {
        "MemoryStat": {key: memory.get("total_usage_toward_limit" if key == "TotalUsageTowardLimit" else key, 0)
                       for key in MEMORY_STAT_KEYS},
        "CPUStat": {"Usage": cpu.get("usage", 0), "User": cpu.get("user", 0), "System": cpu.get("system", 0)},
        "DiskStat": {"TotalBytesUsed": disk.get("total_bytes_used", 0),
                     "TotalInodesUsed": disk.get("total_inodes_used", 0),
                     "ExclusiveBytesUsed": disk.get("exclusive_bytes_used", 0),
                     "ExclusiveInodesUsed": disk.get("exclusive_inodes_used", 0)},
        "NetworkStat": None if network is None else {"RxBytes": network.get("rx_bytes", 0),
                                                     "TxBytes": network.get("tx_bytes", 0)},
        "PidStat": {"Current": pids.get("current", 0), "Max": pids.get("max", 0)},
        "Age": round(m.get("age", 0.0) * NS),
        "CPUEntitlement": m.get("cpu_entitlement", 0),
    }


def bulk_entries(result: dict[str, Any], key: str) -> dict[str, Any]:
    """A bulk result (handle → ``{"info"|"metrics": ..., "err": ...}``) as Garden's entries.
    A per-handle error loses its type, as Guardian's ``garden.NewError`` wrapping does."""
    shape = container_info if key == "info" else metrics
    out = {}
    for handle, entry in result.items():
        err = entry.get("err")
        if err is not None:
            err = {**err, "Type": "", "Handle": "", "ProcessID": ""}
        out[handle] = {key.capitalize(): shape(entry.get(key)), "Err": err}
    return out


def memory_limits(m: dict[str, Any]) -> dict[str, Any]:
    return omit_zero([("limit_in_bytes", m.get("limit_in_bytes", 0))])


def cpu_limits(c: dict[str, Any]) -> dict[str, Any]:
    return omit_zero([("weight", c.get("weight", 0)), ("limit_in_shares", c.get("limit_in_shares", 0))])


def bandwidth_limits(b: dict[str, Any]) -> dict[str, Any]:
    return omit_zero([("rate", b.get("rate_in_bytes_per_second", 0)),
                      ("burst", b.get("burst_rate_in_bytes_per_second", 0))])


def disk_limits(d: dict[str, Any]) -> dict[str, Any]:
    return omit_zero([(k, d.get(k, 0)) for k in ("inode_soft", "inode_hard", "byte_soft", "byte_hard", "scope")])


# ---- the control stream of a Run or Attach ------------------------------------------

MAX_PAYLOAD = 4 << 20  # bytes one ProcessPayload message may take (stdin arrives in 32 KiB chunks)
_LITERALS = ("true", "false", "null")


class PayloadDecoder:
    """Sans-IO decoder of the concatenated JSON values a Garden client writes on a Run or
    Attach connection: ``receive_data(bytes)``, ``end()`` at the end of the stream, then
    ``next_payload()`` until it returns None (need more data). A payload comes back
    decoded into gactor's names (``PROCESS_PAYLOAD``). Raises GardenError for a value that
    is not JSON, not an object, larger than MAX_PAYLOAD, or cut off by the end."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._ended = False

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def end(self) -> None:
        """No more bytes will come: a value cut off is an error from now on."""
        self._ended = True

    def next_payload(self) -> dict[str, Any] | None:
        start = 0
        while start < len(self._buffer) and self._buffer[start] in b" \t\r\n":
            start += 1
        del self._buffer[:start]
        if not self._buffer:
            return None
        raw = bytes(self._buffer)
        if not self._ended:
            raw = raw[: len(raw) - _partial_utf8_tail(raw)]
        text = raw.decode("utf-8", errors="replace")  # as Go, invalid UTF-8 becomes U+FFFD
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as err:
            if not self._ended and _incomplete(text, err):
                if len(self._buffer) > MAX_PAYLOAD:
                    raise GardenError(f"a process payload is larger than {MAX_PAYLOAD} bytes") from None
                return None
            raise GardenError(f"invalid process payload: {err.msg} (at byte {err.pos})") from None
        consumed = text[:end]
        if "\ufffd" in consumed:  # replacement characters: count the bytes they stood for
            del self._buffer[: _bytes_for(raw, len(consumed))]
        else:
            del self._buffer[: len(consumed.encode("utf-8"))]
        if not isinstance(value, dict):
            raise GardenError(f"invalid process payload: expected a JSON object, got {type(value).__name__}")
        decoded: dict[str, Any] = decode(PROCESS_PAYLOAD, value)
        return decoded


def _incomplete(text: str, err: json.JSONDecodeError) -> bool:
    """Whether more bytes could still complete the value ``err`` was raised for."""
    if err.msg.startswith("Unterminated string"):
        return True
    rest = text[err.pos:].rstrip()
    if err.pos >= len(text.rstrip()):
        return True
    return err.msg == "Expecting value" and any(word.startswith(rest) for word in _LITERALS)


def _partial_utf8_tail(raw: bytes) -> int:
    """How many bytes at the end of ``raw`` are the start of an unfinished UTF-8 character."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if back < need else 0
    return 0


def _bytes_for(raw: bytes, chars: int) -> int:
    """The number of bytes of ``raw`` that decode (with replacement) to ``chars`` characters."""
    low, high = 0, len(raw)
    while low < high:  # the shortest prefix decoding to at least ``chars`` characters
        mid = (low + high) // 2
        if len(raw[:mid].decode("utf-8", errors="replace")) < chars:
            low = mid + 1
        else:
            high = mid
    return low
