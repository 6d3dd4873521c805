"""Container networking as the actors use it: the kernel services (netlink's own thread,
the nftables firewall) plus the server's network settings.

Not an actor: it holds no mutable container state. Each container actor owns its
``ContainerNet`` and calls these coroutines with it; the registry owns the pools
(addresses, host ports) and the background release of a destroyed container's links.
The firewall keeps one transaction per call, so calls from several actors at once are
serialised inside it, never interleaved.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import GardenError
from ..kernel import dnsfiles, netmodel
from ..kernel.firewall import Firewall
from ..kernel.netlink import Netlink, disable_ipv6, link_stats
from ..kernel.netmodel import Allocation, ContainerNet, NetworkError

log = logging.getLogger("gactor.network")

HOST_RESOLV_CONF = "/etc/resolv.conf"


@dataclass
class NetworkConfig:
    tag: str
    pool: ipaddress.IPv4Network
    deny: list[ipaddress.IPv4Network] = field(default_factory=list)
    mtu: int = 1500
    external_ip: str = "127.0.0.1"


class Networking:
    def __init__(self, config: NetworkConfig, netlink: Netlink, firewall: Firewall) -> None:
        self.config = config
        self.netlink = netlink
        self.firewall = firewall

    def container_net(self, handle: str, alloc: Allocation) -> ContainerNet:
        return ContainerNet(handle, alloc, netmodel.host_ifname(self.config.tag, alloc), self.config.mtu)

    def bridge_for(self, alloc: Allocation) -> str | None:
        return netmodel.bridge_name(self.config.tag, alloc.subnet) if alloc.bridged else None

    # ---- files inside the container ------------------------------------------------

    def write_dns_files(self, directory: str, hostname: str, net: ContainerNet, owner: int) -> tuple[str, str]:
        """``hosts`` and ``resolv.conf`` in the container's depot directory, owned by the
        container's root (so root inside may rewrite them, other users may not)."""
        try:
            with open(HOST_RESOLV_CONF) as f:
                host_resolv = f.read()
        except OSError:
            host_resolv = ""
        contents = {
            "hosts": dnsfiles.hosts_file(hostname, str(net.alloc.container_ip)),
            "resolv.conf": dnsfiles.resolv_conf(host_resolv, str(net.alloc.gateway_ip)),
        }
        paths = []
        for name, text in contents.items():
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            os.chown(path, owner, owner)
            os.chmod(path, 0o644)
            paths.append(path)
        return paths[0], paths[1]

    # ---- a container's network -----------------------------------------------------

    async def prepare(self, net: ContainerNet) -> None:
        """The host side, which needs no namespace yet: a static subnet's bridge and the
        container's firewall state (its rules name the veth, which comes in ``attach``).
        The create runs it while the container's processes start.

        On failure, or when cancelled, whatever this call made is removed before it
        returns (shielded)."""
        bridge = self.bridge_for(net.alloc)
        try:
            if bridge is not None:
                await self.netlink.ensure_bridge(bridge, net.alloc.gateway_ip, net.alloc.subnet.prefixlen, net.mtu)
            await trio.to_thread.run_sync(self.firewall.add_container, net)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(net)
            raise

    async def attach(self, net: ContainerNet, netns_fd: int) -> None:
        """Give the container its veth (after ``prepare``). On failure, or when
        cancelled, the network is removed (``release``) before this returns (shielded)."""
        try:
            await self.netlink.create_container_link(net, netns_fd, self.bridge_for(net.alloc))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.release(net)
            raise

    async def release(self, net: ContainerNet) -> None:
        """Remove the container's firewall state and veth; returns once they are gone.
        The registry calls it after a destroy, in the background, and only then hands
        the address and ports out again (and deletes a static subnet's bridge once its
        last member has gone). Errors are logged: reconcile at the next start removes
        what is left."""
        try:
            await trio.to_thread.run_sync(self.firewall.remove_container, net)
        except NetworkError as err:
            log.warning("container %s: %s", net.handle, err)
        try:
            await self.netlink.delete_container_link(net.host_ifname)
        except NetworkError as err:
            log.warning("container %s: %s", net.handle, err)

    async def add_net_in(self, net: ContainerNet, host_port: int, container_port: int) -> None:
        await trio.to_thread.run_sync(self.firewall.add_net_in, net, host_port, container_port)

    async def add_net_out(self, net: ContainerNet, rules: list[dict[str, Any]]) -> None:
        await trio.to_thread.run_sync(self.firewall.add_net_out, net, rules)

    async def set_bandwidth(self, net: ContainerNet, netns_fd: int, rate: int, burst: int) -> None:
        await self.netlink.set_bandwidth(net, netns_fd, rate, burst)

    def stats(self, net: ContainerNet) -> tuple[int, int]:
        return link_stats(net.host_ifname)

    # ---- startup and shutdown --------------------------------------------------------

    async def shut_down(self, any_containers: bool) -> None:
        """Containers outlive the server, and so must their rules; with none left, the
        table goes too (the next start makes it again)."""
        if not any_containers:
            with contextlib.suppress(NetworkError):
                await trio.to_thread.run_sync(self.firewall.teardown)
        self.netlink.close()

    async def reconcile(self, live: Iterable[ContainerNet]) -> None:
        """Make the kernel match the containers that exist: the whole firewall table
        rebuilt in one transaction, every link and bridge of ours that no container owns
        removed."""
        nets = list(live)
        await trio.to_thread.run_sync(self.firewall.setup, nets)
        keep = {n.host_ifname for n in nets} | {b for n in nets if (b := self.bridge_for(n.alloc))}
        for name in await self.netlink.list_links(netmodel.link_prefix(self.config.tag)):
            if name in keep:
                with contextlib.suppress(OSError):  # links made before IPv6 was turned off
                    disable_ipv6(name)
            else:
                log.warning("removing link %s: no container owns it", name)
                try:
                    await self.netlink.delete_link(name)
                except NetworkError as err:
                    log.warning("link %s left in place: %s", name, err)


def check_net_out(rule: dict[str, Any]) -> None:
    """Garden's validation of one NetOut rule, as a GardenError."""
    from ..kernel.firewall import validate_net_out

    try:
        validate_net_out(rule)
    except ValueError as err:
        raise GardenError(str(err)) from None
