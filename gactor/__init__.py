"""gactor: a Garden-compatible Linux container server and its trio client.

``import gactor`` stays light: the client and its types load lazily, so the CLI
and the server (which forks before importing trio) pay only for what they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConnectionLostError,
    ContainerNotFoundError,
    ExecutableNotFoundError,
    GardenError,
    ProcessNotFoundError,
    ServiceUnavailableError,
    UnrecoverableError,
)
from .types import (
    BandwidthLimits,
    BindMount,
    BindMountMode,
    BindMountOrigin,
    Capacity,
    ContainerEvent,
    ContainerInfo,
    ContainerInfoEntry,
    ContainerMetricsEntry,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    DiskLimitScope,
    ICMPControl,
    ImageInfo,
    ImageRef,
    IPRange,
    LayerProgress,
    Limits,
    MemoryLimits,
    Metrics,
    NetIn,
    NetOutRule,
    PidLimits,
    PortMapping,
    PortRange,
    ProcessSpec,
    Protocol,
    ResourceLimits,
    Signal,
    StreamInSpec,
    StreamOutSpec,
    TTYSpec,
    WindowSize,
)

if TYPE_CHECKING:
    from .client import Client, Container, Process, ProcessIO, connect

_CLIENT_NAMES = {"Client", "Container", "Process", "ProcessIO", "connect"}


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'gactor' has no attribute {name!r}")


__all__ = [
    "BandwidthLimits", "BindMount", "BindMountMode", "BindMountOrigin", "CPULimits", "Capacity",
    "Client", "ConnectionLostError", "Container", "ContainerEvent", "ContainerInfo", "ContainerInfoEntry",
    "ContainerMetricsEntry", "ContainerNotFoundError", "ContainerSpec", "DiskLimitScope",
    "DiskLimits", "ExecutableNotFoundError", "GardenError", "ICMPControl", "IPRange", "ImageInfo", "ImageRef",
    "LayerProgress", "Limits", "MemoryLimits", "Metrics", "NetIn", "NetOutRule", "PidLimits", "PortMapping",
    "PortRange", "Process", "ProcessIO", "ProcessNotFoundError", "ProcessSpec", "Protocol",
    "ResourceLimits", "ServiceUnavailableError", "Signal", "StreamInSpec", "StreamOutSpec",
    "TTYSpec", "UnrecoverableError", "WindowSize", "connect",
]
