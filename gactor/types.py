"""Garden's types as dataclasses, shared by client, server and wire.

Field names are the snake_case of Garden's; enums keep Garden's numeric values.
Durations are float seconds. On the wire every type is the msgpack map of its
fields (``to_wire``); ``from_wire`` validates a map back into the type and raises
``GardenError`` naming the offending field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import GardenError

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
# msgspec bounds must fit an int64; no real limit comes near it.
U64 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


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


def from_wire(cls: type[T], obj: Any, what: str | None = None) -> T:
    """Validate ``obj`` into ``cls``; raises GardenError naming the bad field."""
    try:
        return msgspec.convert(obj, type=cls)
    except msgspec.ValidationError as err:
        raise GardenError(f"invalid {what or cls.__name__}: {err}") from None
