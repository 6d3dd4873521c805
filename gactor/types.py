"""Garden's types as dataclasses, shared by client, server and wire.

Field names are the snake_case of Garden's; enums keep Garden's numeric values.
Durations are float seconds. On the wire every type is the msgpack map of its
fields (``to_wire``); ``from_wire`` validates a map back into the type (field types,
enum values and the numeric range of every field, which is that of Garden's Go type)
and raises ``GardenError`` naming the offending field. ``check_request`` adds the rules
a request must also meet (a memory limit big enough to start a container, ``env``
entries of the form ``NAME=value``); ``gactor.transport.schema`` applies both to every
call, on the client before encoding and on the server before dispatch.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import GardenError


@dataclass(frozen=True)
class Range:
    """The inclusive bounds of an integer field: those of Garden's Go type ``go_type``."""

    go_type: str
    low: int
    high: int


# Ranges are checked by from_wire, not msgspec (whose bounds must fit an int64), so that
# every out-of-range value gets the same message naming the field and its Go type.
U8 = Annotated[int, Range("uint8", 0, 0xFF)]
U16 = Annotated[int, Range("uint16", 0, 0xFFFF)]
U32 = Annotated[int, Range("uint32", 0, 0xFFFF_FFFF)]
U64 = Annotated[int, Range("uint64", 0, (1 << 64) - 1)]
MAX_SECONDS = 1e9  # about 31 years; a duration must be finite (nan and inf are refused)
Seconds = Annotated[float, msgspec.Meta(ge=0, lt=MAX_SECONDS)]

# The smallest non-zero memory limit a container may have. Measured on the reference
# host (cgroup v1, busybox rootfs): below ~1.4 MiB the container's init is killed before
# it is ready, up to 2 MiB creates fail or `sh -c 'echo; ls'` is OOM-killed now and then,
# from 3 MiB on every create and run succeeded. 8 MiB leaves room for a shell and a few
# commands, and for kernels that charge more (v2, other page sizes). 0 means no limit.
MIN_MEMORY_LIMIT = 8 << 20
# The most pids a container may be limited to: the kernel's PID_MAX_LIMIT (64-bit), above
# which pids.max refuses the value.
MAX_PIDS_LIMIT = 4 << 20


class BindMountMode(enum.IntEnum):
    RO = 0
    RW = 1


class BindMountOrigin(enum.IntEnum):
    HOST = 0
    CONTAINER = 1


class DiskLimitScope(enum.IntEnum):
    TOTAL = 0
    EXCLUSIVE = 1


class Protocol(enum.IntEnum):
    ALL = 0
    TCP = 1
    UDP = 2
    ICMP = 3
    ICMPV6 = 4


class Signal(enum.IntEnum):
    TERMINATE = 0
    KILL = 1


@dataclass
class ImageRef:
    uri: str = ""
    username: str = ""
    password: str = ""


@dataclass
class BindMount:
    src_path: str = ""
    dst_path: str = ""
    mode: BindMountMode = BindMountMode.RO
    origin: BindMountOrigin = BindMountOrigin.HOST


@dataclass
class MemoryLimits:
    limit_in_bytes: U64 = 0


@dataclass
class CPULimits:
    weight: U64 = 0
    limit_in_shares: U64 = 0


@dataclass
class DiskLimits:
    inode_soft: U64 = 0
    inode_hard: U64 = 0
    byte_soft: U64 = 0
    byte_hard: U64 = 0
    scope: DiskLimitScope = DiskLimitScope.TOTAL


@dataclass
class BandwidthLimits:
    rate_in_bytes_per_second: U64 = 0
    burst_rate_in_bytes_per_second: U64 = 0


@dataclass
class PidLimits:
    max: U64 = 0


@dataclass
class Limits:
    bandwidth: BandwidthLimits = field(default_factory=BandwidthLimits)
    cpu: CPULimits = field(default_factory=CPULimits)
    disk: DiskLimits = field(default_factory=DiskLimits)
    memory: MemoryLimits = field(default_factory=MemoryLimits)
    pid: PidLimits = field(default_factory=PidLimits)


@dataclass
class IPRange:
    start: str = ""
    end: str = ""


@dataclass
class PortRange:
    start: U16 = 0
    end: U16 = 0


@dataclass
class ICMPControl:
    type: U8 = 0
    code: U8 | None = None


@dataclass
class NetOutRule:
    protocol: Protocol = Protocol.ALL
    networks: list[IPRange] = field(default_factory=list)
    ports: list[PortRange] = field(default_factory=list)
    icmps: ICMPControl | None = None
    log: bool = False


@dataclass
class NetIn:
    host_port: U32 = 0
    container_port: U32 = 0


@dataclass
class ContainerSpec:
    handle: str = ""
    grace_time: Seconds = 0.0
    rootfs_path: str = ""
    image: ImageRef = field(default_factory=ImageRef)
    bind_mounts: list[BindMount] = field(default_factory=list)
    network: str = ""
    properties: dict[str, str] = field(default_factory=dict)
    env: list[str] = field(default_factory=list)
    privileged: bool = False
    limits: Limits = field(default_factory=Limits)
    net_out: list[NetOutRule] = field(default_factory=list)
    net_in: list[NetIn] = field(default_factory=list)


@dataclass
class ResourceLimits:
    as_: U64 | None = None
    core: U64 | None = None
    cpu: U64 | None = None
    data: U64 | None = None
    fsize: U64 | None = None
    locks: U64 | None = None
    memlock: U64 | None = None
    msgqueue: U64 | None = None
    nice: U64 | None = None
    nofile: U64 | None = None
    nproc: U64 | None = None
    rss: U64 | None = None
    rtprio: U64 | None = None
    sigpending: U64 | None = None
    stack: U64 | None = None


@dataclass
class WindowSize:
    columns: U16 = 0
    rows: U16 = 0


@dataclass
class TTYSpec:
    window_size: WindowSize | None = None


@dataclass
class ProcessLimits:
    cpu: CPULimits | None = None
    memory: MemoryLimits | None = None


@dataclass
class ProcessSpec:
    id: str = ""
    path: str = ""
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    dir: str = ""
    user: str = ""
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    override_container_limits: ProcessLimits | None = None
    tty: TTYSpec | None = None
    image: ImageRef = field(default_factory=ImageRef)
    bind_mounts: list[BindMount] = field(default_factory=list)


@dataclass
class StreamInSpec:
    path: str = ""
    user: str = ""
    tar_stream: Any = None  # bytes or an async iterable of bytes


@dataclass
class StreamOutSpec:
    path: str = ""
    user: str = ""


@dataclass
class PortMapping:
    host_port: int = 0
    container_port: int = 0


@dataclass
class ImageInfo:
    """One image in the server's image store (``images``): ``path`` identifies it,
    ``source`` is the URI it was made from, ``bytes`` its size on disk, ``layers`` how
    many layers it has, ``users`` the handles of the containers using it."""

    path: str = ""
    source: str = ""
    bytes: int = 0
    layers: int = 0
    users: list[str] = dataclasses.field(default_factory=list)


@dataclass
class LayerProgress:
    """How far a pull has got with one layer (``Client.pull(..., progress=)``): ``digest``,
    the blob's bytes read so far (``done``) and its size (``total``; -1 when the manifest
    does not say). ``done`` only grows and reaches ``total`` when the layer is in the store;
    a layer the store had already (``cached``) is reported once, done. Bytes are the
    blob's (compressed)."""

    digest: str = ""
    done: int = 0
    total: int = 0
    cached: bool = False


@dataclass
class ContainerEvent:
    """One event of a container's life, as ``Client.watch`` delivers it.

    ``kind`` is one of ``EVENT_KINDS``; ``event`` says it in words (for ``oom``,
    ``oom_victim`` and a ``broken`` whose shim died, the text ``ContainerInfo.events``
    records). ``seq`` numbers the server's events from 1 in the order they were
    published (a one-container subscription skips the others'), ``time`` is when (Unix
    seconds). The other fields are set where the kind has them: ``reason`` for
    ``destroyed`` (``client``, ``grace_time``), ``stopped`` (``stop``, ``oom``) and
    ``broken`` (``shim_died``, ``destroy_failed``); ``process_id`` and ``pid`` for the
    process kinds and ``oom_victim`` (``task``: the killed command); ``exit_status`` for
    ``process_exited``; ``missed`` for ``missed`` (no handle: the subscriber fell behind
    and that many events were not delivered to it)."""

    kind: str = ""
    handle: str = ""
    event: str = ""
    seq: int = 0
    time: float = 0.0
    reason: str = ""
    process_id: str = ""
    pid: int = 0
    task: str = ""
    exit_status: int | None = None
    missed: int = 0


EVENT_KINDS = ("created", "destroyed", "stopped", "broken", "oom", "oom_victim",
               "process_started", "process_exited", "missed")


@dataclass
class Capacity:
    memory_in_bytes: int = 0
    disk_in_bytes: int = 0
    schedulable_disk_in_bytes: int = 0
    max_containers: int = 0


@dataclass
class ContainerInfo:
    state: str = ""
    events: list[str] = field(default_factory=list)
    host_ip: str = ""
    container_ip: str = ""
    external_ip: str = ""
    container_path: str = ""
    process_ids: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    mapped_ports: list[PortMapping] = field(default_factory=list)


@dataclass
class ContainerMemoryStat:
    active_anon: int = 0
    active_file: int = 0
    cache: int = 0
    hierarchical_memory_limit: int = 0
    inactive_anon: int = 0
    inactive_file: int = 0
    mapped_file: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    pgpgin: int = 0
    pgpgout: int = 0
    rss: int = 0
    rss_huge: int = 0
    total_active_anon: int = 0
    total_active_file: int = 0
    total_cache: int = 0
    total_inactive_anon: int = 0
    total_inactive_file: int = 0
    total_mapped_file: int = 0
    total_pgfault: int = 0
    total_pgmajfault: int = 0
    total_pgpgin: int = 0
    total_pgpgout: int = 0
    total_rss: int = 0
    total_rss_huge: int = 0
    total_unevictable: int = 0
    unevictable: int = 0
    swap: int = 0
    hierarchical_memsw_limit: int = 0
    total_swap: int = 0
    total_usage_toward_limit: int = 0
    anon: int = 0
    file: int = 0
    swapcached: int = 0


@dataclass
class ContainerCPUStat:
    usage: int = 0
    user: int = 0
    system: int = 0


@dataclass
class ContainerDiskStat:
    total_bytes_used: int = 0
    total_inodes_used: int = 0
    exclusive_bytes_used: int = 0
    exclusive_inodes_used: int = 0


@dataclass
class ContainerNetworkStat:
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass
class ContainerPidStat:
    current: int = 0
    max: int = 0


@dataclass
class Metrics:
    memory_stat: ContainerMemoryStat = field(default_factory=ContainerMemoryStat)
    cpu_stat: ContainerCPUStat = field(default_factory=ContainerCPUStat)
    disk_stat: ContainerDiskStat = field(default_factory=ContainerDiskStat)
    network_stat: ContainerNetworkStat | None = None
    pid_stat: ContainerPidStat = field(default_factory=ContainerPidStat)
    age: float = 0.0
    cpu_entitlement: int = 0


@dataclass
class ContainerInfoEntry:
    info: ContainerInfo | None = None
    err: GardenError | None = None


@dataclass
class ContainerMetricsEntry:
    metrics: Metrics | None = None
    err: GardenError | None = None


T = TypeVar("T")


def to_wire(obj: Any) -> Any:
    """The msgpack-ready form of a dataclass (maps, lists, ints, strings)."""
    return msgspec.to_builtins(obj)


def from_wire(cls: type[T], obj: Any, what: str | None = None, *, strict: bool = False) -> T:
    """Validate ``obj`` into ``cls``; raises GardenError naming the bad field.

    Every integer field must lie in its Go type's range (``Range``). With ``strict``, a
    key that is no field of its map's type is refused too (requests are strict; a
    record written by an older server need not be).
    """
    what = what or cls.__name__
    try:
        value = msgspec.convert(obj, type=cls)
    except msgspec.ValidationError as err:
        raise GardenError(f"invalid {what}: {err}") from None
    problem = _check_fields(cls, obj, "", strict)
    if problem is not None:
        raise GardenError(f"invalid {what}: {problem}")
    return value


def check_request(obj: Any, what: str) -> None:
    """The rules a request must meet beyond its types: raises GardenError naming the field.

    A container's memory limit (``limits.memory.limit_in_bytes``, at create and at
    ``limit_memory``) is 0 (no limit) or at least MIN_MEMORY_LIMIT; its pid limit
    (``limits.pid.max``) at most MAX_PIDS_LIMIT. An ``env`` entry
    (container or process) is ``NAME=value`` with a non-empty NAME and no NUL, as runc
    requires under Garden (which fails the create or run otherwise).
    """
    if isinstance(obj, ContainerSpec):
        _check_memory_limit(obj.limits.memory.limit_in_bytes, what)
        if obj.limits.pid.max > MAX_PIDS_LIMIT:
            raise GardenError(f"invalid {what}: limits.pid.max = {obj.limits.pid.max} is above the"
                              f" kernel's largest pid limit, {MAX_PIDS_LIMIT}; 0 means no limit")
    if isinstance(obj, MemoryLimits):
        _check_memory_limit(obj.limit_in_bytes, what)
    if isinstance(obj, ContainerSpec | ProcessSpec):
        for i, entry in enumerate(obj.env):
            name, equals, _ = entry.partition("=")
            problem = ("missing '='" if not equals else "name cannot be empty" if not name
                       else "contains nul byte (\\x00)" if "\0" in entry else None)
            if problem is not None:
                raise GardenError(f"invalid {what}: env[{i}] {entry!r}: invalid environment variable: {problem}")


def _check_memory_limit(limit: int, what: str) -> None:
    if 0 < limit < MIN_MEMORY_LIMIT:
        raise GardenError(
            f"invalid {what}: limits.memory.limit_in_bytes = {limit} is below the smallest memory"
            f" limit, {MIN_MEMORY_LIMIT} bytes ({MIN_MEMORY_LIMIT >> 20} MiB), that a container"
            " needs to start; 0 means no limit")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field types, with their ``Annotated`` bounds."""
    return typing.get_type_hints(cls, include_extras=True)


def _check_fields(tp: Any, value: Any, path: str, strict: bool) -> str | None:
    """The first field of ``value`` (already converted to ``tp`` once) out of range, or
    (``strict``) unknown, described with its dotted path; None when all are good."""
    return None if value is None else _checker(tp)(value, path, strict)


Checker = Callable[[Any, str, bool], "str | None"]  # value, dotted path, strict -> problem


@functools.cache
def _checker(tp: Any) -> Checker:
    """``_check_fields`` for one type, with its typing introspection done once (this runs
    on every request)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        bounds = [bound for bound in meta if isinstance(bound, Range)]
        inner = _checker(base)

        def annotated(value: Any, path: str, strict: bool) -> str | None:
            for bound in bounds:
                if not bound.low <= value <= bound.high:
                    return (f"{path or 'value'} = {value} is out of range for a {bound.go_type}"
                            f" ({bound.low}..{bound.high})")
            return inner(value, path, strict)
        return annotated
    if origin in (typing.Union, types.UnionType):
        arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
        if len(arms) == 1:
            arm = _checker(arms[0])
            return lambda value, path, strict: None if value is None else arm(value, path, strict)
        return _no_check
    if origin is list:
        (item_type,) = typing.get_args(tp)
        item = _checker(item_type)
        if item is _no_check:
            return _no_check

        def each(value: Any, path: str, strict: bool) -> str | None:
            for i, element in enumerate(value):
                if element is not None and (problem := item(element, f"{path}[{i}]", strict)) is not None:
                    return problem
            return None
        return each
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = field_types(tp)
        fields = {name: _checker(hint) for name, hint in hints.items()}

        def record(value: Any, path: str, strict: bool) -> str | None:
            if not isinstance(value, dict):
                return None
            for key, element in value.items():
                check = fields.get(key)
                if check is None:
                    if strict:
                        where = f"{path}.{key}" if path else str(key)
                        return f"unknown field {where!r} (a {tp.__name__} has no field {key!r})"
                    continue
                if check is not _no_check and element is not None:
                    where = f"{path}.{key}" if path else str(key)
                    if (problem := check(element, where, strict)) is not None:
                        return problem
            return None
        return record
    return _no_check


def _no_check(value: Any, path: str, strict: bool) -> str | None:
    return None
