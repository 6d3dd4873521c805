"""The network state of one container, shared by the pools, netlink, the firewall and the depot.

A container gets an ``Allocation`` from the registry's pools: a dynamic /30 from
``--network-pool`` (routed: the host end of its veth carries the gateway address, no
bridge), or an address in a static subnet named by ``ContainerSpec.network`` (every
member's veth is a port of the subnet's bridge, which carries the gateway address).
Link names derive from the server's tag and the allocation, so they are unique while
the allocation is held; an allocation is only handed out again once its links are gone.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

IPv4Network = ipaddress.IPv4Network
IPv4Address = ipaddress.IPv4Address

CONTAINER_IFNAME = "eth0"


class NetworkError(Exception):
    """A network step failed; the message names the step and the object."""


@dataclass(frozen=True)
class Allocation:
    """What the pools handed a container."""

    subnet: IPv4Network
    container_ip: IPv4Address
    bridged: bool  # a static subnet, shared through a bridge

    @property
    def gateway_ip(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def to_record(self) -> dict[str, Any]:
        return {"subnet": str(self.subnet), "container_ip": str(self.container_ip), "bridged": self.bridged}

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> Allocation:
        return cls(ipaddress.IPv4Network(raw["subnet"]), ipaddress.IPv4Address(raw["container_ip"]),
                   bool(raw["bridged"]))


def server_tag(depot_realpath: str) -> str:
    """Four hex digits naming this server's links and nft table (one per depot)."""
    import hashlib

    return hashlib.sha256(depot_realpath.encode()).hexdigest()[:4]


def host_ifname(tag: str, alloc: Allocation) -> str:
    """The host end of the container's veth: ``g<tag><ip as 8 hex>`` (13 of IFNAMSIZ's 15)."""
    return f"g{tag}{int(alloc.container_ip):08x}"


def bridge_name(tag: str, subnet: IPv4Network) -> str:
    """A static subnet's bridge: ``g<tag>b<network address as 8 hex>`` (14 characters)."""
    return f"g{tag}b{int(subnet.network_address):08x}"


def link_prefix(tag: str) -> str:
    """Every link of this server starts with this (reconcile lists them by it)."""
    return f"g{tag}"


def deletion_group(tag: str) -> int:
    """The link group (``IFLA_GROUP``) this server's destroyed veths are put in to be
    deleted together: ``0x6761`` ("ga") then the tag's 16 bits, so no two servers' overlap
    and no link of the host's (group 0, the default) is ever in it."""
    return 0x6761_0000 | int(tag, 16)


@dataclass
class ContainerNet:
    """One container's network, as the firewall and netlink need it; persisted in its record."""

    handle: str
    alloc: Allocation
    host_ifname: str
    mtu: int
    net_in: list[tuple[int, int]] = field(default_factory=list)  # (host port, container port)
    net_out: list[dict[str, Any]] = field(default_factory=list)  # NetOutRule wire dicts, in order
    bandwidth: tuple[int, int] = (0, 0)  # (rate, burst) bytes per second; (0, 0) = unlimited

    def to_record(self) -> dict[str, Any]:
        return {"alloc": self.alloc.to_record(), "host_ifname": self.host_ifname, "mtu": self.mtu,
                "net_in": [list(m) for m in self.net_in], "net_out": list(self.net_out),
                "bandwidth": list(self.bandwidth)}

    @classmethod
    def from_record(cls, handle: str, raw: dict[str, Any]) -> ContainerNet:
        return cls(handle, Allocation.from_record(raw["alloc"]), raw["host_ifname"], int(raw["mtu"]),
                   [(int(h), int(c)) for h, c in raw.get("net_in", [])], list(raw.get("net_out", [])),
                   (int(raw.get("bandwidth", (0, 0))[0]), int(raw.get("bandwidth", (0, 0))[1])))
