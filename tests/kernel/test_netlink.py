"""The netlink thread against the real kernel: a container's veth, addresses, route,
bandwidth, bridges and clean-up, checked from outside with ``ip -j`` and ``tc -j``.

A "container" here is a network namespace held by a sleeping child of the test; traffic
only goes between the host and such namespaces."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
import trio

from gactor.kernel.netlink import Netlink, link_stats
from gactor.kernel.netmodel import (
    Allocation,
    ContainerNet,
    NetworkError,
    bridge_name,
    deletion_group,
    host_ifname,
    server_tag,
)

TAG = server_tag("/tmp/gactor-test-netlink")


class Namespace:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
        for _ in range(100):  # until the child has unshared (bounded)
            if os.readlink(f"/proc/{self.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
                break
            trio.run(trio.sleep, 0.01)
        self.fd = os.open(f"/proc/{self.proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def run(self, *cmd: str) -> str:
        return subprocess.run(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *cmd],
                              check=True, capture_output=True, text=True).stdout

    def close(self) -> None:
        os.close(self.fd)
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def namespaces() -> Iterator[list[Namespace]]:
    made = [Namespace(), Namespace()]
    yield made
    for ns in made:
        ns.close()


@pytest.fixture
def netlink() -> Iterator[Netlink]:
    nl = Netlink(deletion_group(TAG))
    nl.start()
    yield nl
    nl.close()


def container_net(ip: str, prefixlen: int = 30, bridged: bool = False) -> ContainerNet:
    address = ipaddress.IPv4Address(ip)
    alloc = Allocation(ipaddress.IPv4Network(f"{ip}/{prefixlen}", strict=False), address, bridged)
    return ContainerNet("h", alloc, host_ifname(TAG, alloc), 1400)


def host_run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], check=True, capture_output=True, text=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def ping(ns: Namespace | None, address: str) -> bool:
    cmd = ["busybox", "ping", "-c1", "-W1", address]
    if ns is not None:
        cmd = ["nsenter", f"--net=/proc/{ns.proc.pid}/ns/net", *cmd]
    return subprocess.run(cmd, capture_output=True, timeout=10, check=False).returncode == 0


def test_a_container_link_is_addressed_routed_and_removed(netlink, namespaces):
    ns = namespaces[0]
    net = container_net("10.199.0.2")
    before = host_links()

    async def main() -> None:
        await netlink.create_container_link(net, ns.fd, None)
        inside = {a["ifname"]: a for a in json.loads(ns.run("ip", "-j", "addr"))}
        assert [(i["local"], i["prefixlen"]) for i in inside["eth0"]["addr_info"] if i["family"] == "inet"] \
            == [("10.199.0.2", 30)]
        assert inside["eth0"]["mtu"] == 1400
        assert "UP" in inside["eth0"]["flags"]
        routes = json.loads(ns.run("ip", "-j", "route"))
        assert {"dst": "default", "gateway": "10.199.0.1", "dev": "eth0"}.items() <= routes[0].items()
        host = json.loads(host_run("ip", "-j", "addr", "show", net.host_ifname))[0]
        assert [i["local"] for i in host["addr_info"] if i["family"] == "inet"] == ["10.199.0.1"]
        with open(f"/proc/sys/net/ipv4/conf/{net.host_ifname}/route_localnet") as f:
            assert f.read().strip() == "1"
        assert await trio.to_thread.run_sync(ping, None, "10.199.0.2")
        rx, tx = link_stats(net.host_ifname)
        assert rx > 0
        assert tx > 0
        assert await netlink.list_links(f"g{TAG}") == [net.host_ifname]
        await netlink.delete_link(net.host_ifname)
        await netlink.delete_link(net.host_ifname)  # gone already: fine

    trio.run(main)
    assert host_links() == before
    assert "eth0" not in ns.run("ip", "-br", "link")


def test_bandwidth_is_a_tbf_on_both_ends(netlink, namespaces):
    ns = namespaces[0]
    net = container_net("10.199.0.6")

    async def main() -> None:
        await netlink.create_container_link(net, ns.fd, None)
        try:
            await netlink.set_bandwidth(net, ns.fd, 1_000_000, 50_000)
            host = json.loads(host_run("tc", "-j", "qdisc", "show", "dev", net.host_ifname))
            inside = json.loads(ns.run("tc", "-j", "qdisc", "show", "dev", "eth0"))
            for qdiscs in (host, inside):
                assert qdiscs[0]["kind"] == "tbf"
                assert qdiscs[0]["options"]["rate"] == 1_000_000
            await netlink.set_bandwidth(net, ns.fd, 2_000_000, 50_000)  # replaced at runtime
            inside = json.loads(ns.run("tc", "-j", "qdisc", "show", "dev", "eth0"))
            assert inside[0]["options"]["rate"] == 2_000_000
            await netlink.set_bandwidth(net, ns.fd, 0, 0)
            inside = json.loads(ns.run("tc", "-j", "qdisc", "show", "dev", "eth0"))
            assert inside[0]["kind"] != "tbf"
        finally:
            await netlink.delete_link(net.host_ifname)

    trio.run(main)


def test_a_bridge_joins_members_of_a_static_subnet(netlink, namespaces):
    subnet = ipaddress.IPv4Network("10.199.8.0/24")
    bridge = bridge_name(TAG, subnet)
    a, b = container_net("10.199.8.2", 24, True), container_net("10.199.8.3", 24, True)
    before = host_links()

    async def main() -> None:
        await netlink.ensure_bridge(bridge, subnet.network_address + 1, 24, 1400)
        await netlink.ensure_bridge(bridge, subnet.network_address + 1, 24, 1400)  # exists: kept
        await netlink.create_container_link(a, namespaces[0].fd, bridge)
        await netlink.create_container_link(b, namespaces[1].fd, bridge)
        assert await trio.to_thread.run_sync(ping, namespaces[0], "10.199.8.3")
        assert await trio.to_thread.run_sync(ping, None, "10.199.8.2")
        for net in (a, b):
            await netlink.delete_link(net.host_ifname)
        await netlink.delete_bridge(bridge)

    trio.run(main)
    assert host_links() == before


def test_a_failed_step_removes_the_veth(netlink, namespaces):
    net = container_net("10.199.0.10")
    before = host_links()

    async def main() -> None:
        with pytest.raises(NetworkError, match="attaching .* to bridge gnone"):
            await netlink.create_container_link(net, namespaces[0].fd, "gnone")

    trio.run(main)
    assert host_links() == before
    assert "eth0" not in namespaces[0].run("ip", "-br", "link")


def test_a_cancelled_call_still_completes_in_order(netlink, namespaces):
    net = container_net("10.199.0.14")

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await netlink.create_container_link(net, namespaces[0].fd, None)
        # The create ran anyway: a job queued after it sees its link.
        assert await netlink.list_links(net.host_ifname) == [net.host_ifname]
        await netlink.delete_link(net.host_ifname)

    trio.run(main)
    assert net.host_ifname not in host_links()


def test_deletions_queued_together_go_in_one_request_and_spare_other_links(netlink, monkeypatch):
    from gactor.kernel import rtnl

    group_deletions: list[int] = []
    real = rtnl.Rtnl.delete_group

    def counted(self: rtnl.Rtnl, group: int) -> None:
        group_deletions.append(group)
        real(self, group)

    monkeypatch.setattr(rtnl.Rtnl, "delete_group", counted)
    spaces = [Namespace() for _ in range(7)]
    nets = [container_net(f"10.199.1.{4 * n + 2}") for n in range(7)]

    def ours() -> set[str]:  # other servers on the host make and delete links meanwhile
        return {name for name in host_links() if name.startswith(f"g{TAG}")}

    before = ours()

    async def main() -> None:
        for net, ns in zip(nets, spaces, strict=True):
            await netlink.create_container_link(net, ns.fd, None)
        async with trio.open_nursery() as nursery:
            for net in nets[:6]:
                nursery.start_soon(netlink.delete_container_link, net.host_ifname)
            nursery.start_soon(netlink.delete_container_link, "g" + TAG + "ffffffff")  # none: fine

    try:
        trio.run(main)
        # The first deletion runs alone; the others queued behind it and went together.
        assert group_deletions == [deletion_group(TAG)]
        assert ours() == before | {nets[6].host_ifname}
        for ns in spaces[:6]:
            assert "eth0" not in ns.run("ip", "-br", "link")
        assert "eth0" in spaces[6].run("ip", "-br", "link")
        assert ping(None, str(nets[6].alloc.container_ip))  # the one left still works
    finally:
        trio.run(netlink.delete_link, nets[6].host_ifname)
        for ns in spaces:
            ns.close()
    assert ours() == before
