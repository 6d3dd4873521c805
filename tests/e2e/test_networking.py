"""Container networking against a real server, checked from outside: addresses, routes,
NetIn from the host, NetOut under --deny-network, shared subnets, bandwidth, DNS files,
metrics, host state after destroy, restarts.

Network safety: traffic only goes between the host (loopback, its own addresses) and
containers these servers created; every loop is bounded in count and time."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time

import pytest
import trio

from gactor import ContainerSpec, GardenError
from gactor.kernel.firewall import table_name
from gactor.kernel.netmodel import link_prefix
from gactor.types import BandwidthLimits, IPRange, Limits, NetIn, NetOutRule, PortRange, Protocol

from .helpers import ensure_user, sh, sh_ok, unique_handle, wait_until_equal


def host_json(*cmd: str) -> object:
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout or "[]")


def server_network_state(server) -> dict[str, object]:
    """The server's links, their routes and qdiscs, and its nft table: what a create may
    add and a destroy must take away again."""
    prefix = link_prefix(server.tag)
    links = sorted(link["ifname"] for link in host_json("ip", "-j", "link") if link["ifname"].startswith(prefix))
    routes = sorted(json.dumps(r, sort_keys=True) for r in host_json("ip", "-j", "route")
                    if r.get("dev", "").startswith(prefix))
    qdiscs = sorted(json.dumps(q, sort_keys=True) for q in host_json("tc", "-j", "qdisc")
                    if q.get("dev", "").startswith(prefix))
    out = subprocess.run(["nft", "-j", "list", "table", "ip", table_name(server.tag)],
                         capture_output=True, text=True, check=False).stdout
    # Handles are the kernel's numbering (a rebuilt table gets new ones), not content.
    table = [json.dumps(_without_handles(i), sort_keys=True) for i in json.loads(out)["nftables"]
             if "metainfo" not in i] if out else []
    return {"links": links, "routes": routes, "qdiscs": qdiscs, "nft": table}


def _without_handles(item: object) -> object:
    if isinstance(item, dict):
        return {k: _without_handles(v) for k, v in item.items() if k != "handle"}
    if isinstance(item, list):
        return [_without_handles(v) for v in item]
    return item


async def host_connect(address: str, port: int) -> bytes:
    """Connect from the host, read until the peer closes (bounded: 5 s per step)."""
    def go() -> bytes:
        with socket.create_connection((address, port), timeout=5) as s:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data
    return await trio.to_thread.run_sync(go)


async def serve_once(container, port: int, text: str) -> None:
    """``nc -l`` in the container answering ``text`` to one connection (busybox nc)."""
    await sh(container, f"echo {text} | nc -l -p {port}", seconds=20)


async def ping(container, address: str) -> bool:
    code, _, _ = await sh(container, f"ping -c1 -W1 {address}")
    return code == 0


async def tcp_ok(container, address: str, port: int) -> bool:
    code, out, _ = await sh(container, f"nc -w2 {address} {port} </dev/null")
    return code == 0 and bool(out)


# ---- addresses, hosts, routes ------------------------------------------------------------

async def test_info_addresses_properties_and_the_interface_inside(client, container, gactor_server):
    info = await container.info()
    ip = ipaddress.IPv4Address(info.container_ip)
    assert ip in ipaddress.IPv4Network(gactor_server.pool)
    assert info.host_ip == str(ip - 1)
    assert info.external_ip
    props = info.properties
    assert props["garden.network.container-ip"] == info.container_ip
    assert props["garden.network.host-ip"] == info.host_ip
    assert props["garden.network.external-ip"] == info.external_ip
    assert json.loads(props["garden.network.mapped-ports"]) == []
    assert f"inet {info.container_ip}/30" in await sh_ok(container, "ip addr show eth0")
    assert f"default via {info.host_ip}" in await sh_ok(container, "ip route")
    hosts = await sh_ok(container, "cat /etc/hosts")
    assert f"{info.container_ip} {container.handle[-49:]}" in hosts
    assert await ping(container, container.handle[-49:])
    assert await ping(container, "localhost")
    assert await ping(container, info.host_ip)


async def test_containers_reach_each_other_by_ip(client, container):
    other = await client.create(ContainerSpec(handle=unique_handle()))
    try:
        theirs = (await other.info()).container_ip
        assert await ping(container, theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once, other, 7000, "peer")
            await trio.sleep(0.3)
            assert (await sh_ok(container, f"nc -w2 {theirs} 7000 </dev/null")).strip() == "peer"
    finally:
        await client.destroy(other.handle)


async def test_root_may_rewrite_hosts_and_resolv_conf_other_users_may_not(container):
    await sh_ok(container, "echo '# root' >> /etc/hosts && echo '# root' >> /etc/resolv.conf", user="root")
    await ensure_user(container, "alice")
    for name in ("/etc/hosts", "/etc/resolv.conf"):
        code, _, err = await sh(container, f"echo x >> {name}", user="alice")
        assert code == 1
        assert b"Permission denied" in err
    assert "nameserver" in await sh_ok(container, "cat /etc/resolv.conf")


async def test_metrics_count_the_containers_traffic(container):
    before = (await container.metrics()).network_stat
    await ping(container, (await container.info()).host_ip)
    after = (await container.metrics()).network_stat
    assert before is not None
    assert after is not None
    assert after.tx_bytes > before.tx_bytes
    assert after.rx_bytes > before.rx_bytes


# ---- NetIn ---------------------------------------------------------------------------------

async def test_net_in_from_the_host_via_loopback_and_the_external_ip(container):
    info = await container.info()
    host_port, container_port = await container.net_in(0, 8080)
    assert container_port == 8080
    second = await container.net_in(0, 0)
    assert second[1] == second[0]  # container port 0 means the host port
    info = await container.info()
    assert [(m.host_port, m.container_port) for m in info.mapped_ports] == [(host_port, 8080), second]
    assert json.loads(info.properties["garden.network.mapped-ports"])[0] == \
        {"HostPort": host_port, "ContainerPort": 8080}
    for address in ("127.0.0.1", info.external_ip):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once, container, 8080, "hallo")
            await trio.sleep(0.3)
            assert await host_connect(address, host_port) == b"hallo\n"


async def test_net_in_in_the_spec(client):
    c = await client.create(ContainerSpec(handle=unique_handle(), net_in=[NetIn(0, 9000)]))
    try:
        [mapping] = (await c.info()).mapped_ports
        assert mapping.container_port == 9000
        assert mapping.host_port > 0
    finally:
        await client.destroy(c.handle)


# ---- NetOut --------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "message"), [
    (NetOutRule(ports=[PortRange(80, 80)]), "Ports cannot be specified for Protocol ALL"),
    (NetOutRule(protocol=Protocol.ICMP, ports=[PortRange(1, 5)]), "Ports cannot be specified for Protocol ICMP"),
    (NetOutRule(protocol=Protocol.ICMPV6), "invalid protocol: 4"),
    (NetOutRule(protocol=Protocol.TCP, ports=[PortRange(90, 80)]), "invalid port range 90-80"),
    (NetOutRule(networks=[IPRange("10.0.0.9", "10.0.0.1")]), "invalid network range 10.0.0.9-10.0.0.1"),
])
async def test_invalid_net_out_rules_are_refused(container, rule, message):
    with pytest.raises(GardenError, match=message):
        await container.net_out(rule)
    await container.net_out(NetOutRule())  # the container still takes valid rules


async def test_bulk_net_out_of_three_thousand_rules(container, gactor_server):
    rules = [NetOutRule(protocol=Protocol.TCP, networks=[IPRange(f"10.1.{i // 250}.{i % 250}", "")],
                        ports=[PortRange(1000 + i, 0)]) for i in range(3000)]
    await container.bulk_net_out(rules)
    chain = f"c_{int(ipaddress.IPv4Address((await container.info()).container_ip)):08x}"
    listing = host_json("nft", "-j", "list", "chain", "ip", table_name(gactor_server.tag), chain)
    assert sum(1 for item in listing["nftables"] if "rule" in item) == 3000


async def test_deny_network_blocks_until_net_out_allows_exactly_that(own_servers):
    server = own_servers("deny", "10.239.8.0/24", "--deny-network", "10.239.8.0/24",
                         "--port-pool-start", "42000", "--port-pool-size", "100")
    await server.start()
    async with server.connect() as client:
        a = await client.create(ContainerSpec(handle="a"))
        b = await client.create(ContainerSpec(handle="b"))
        ip_a = (await a.info()).container_ip
        assert not await ping(b, ip_a)
        await b.net_out(NetOutRule(protocol=Protocol.TCP, networks=[IPRange(ip_a, ip_a)], ports=[PortRange(8080, 8080)]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once, a, 8080, "allowed")
            nursery.start_soon(serve_once, a, 8081, "denied")
            await trio.sleep(0.3)
            assert (await sh_ok(b, f"nc -w2 {ip_a} 8080 </dev/null")).strip() == "allowed"
            assert not await tcp_ok(b, ip_a, 8081)
            nursery.cancel_scope.cancel()
        assert not await ping(b, ip_a)  # TCP only
        await b.net_out(NetOutRule(protocol=Protocol.ICMP, networks=[IPRange(ip_a, ip_a)],
                                   icmps=None))
        assert await ping(b, ip_a)
        assert not await ping(a, (await b.info()).container_ip)  # a has no rule of its own
    await server.finish()


# ---- static subnets and pools ---------------------------------------------------------------

async def test_a_shared_subnet_its_addresses_and_its_errors(client, gactor_server):
    made = []
    try:
        first = await client.create(ContainerSpec(handle=unique_handle(), network="10.239.5.0/24"))
        made.append(first)
        second = await client.create(ContainerSpec(handle=unique_handle(), network="10.239.5.0/24"))
        made.append(second)
        exact = await client.create(ContainerSpec(handle=unique_handle(), network="10.239.5.77/24"))
        made.append(exact)
        ips = [(await c.info()).container_ip for c in made]
        assert ips == ["10.239.5.2", "10.239.5.3", "10.239.5.77"]
        assert (await first.info()).host_ip == "10.239.5.1"
        assert await ping(first, ips[1])
        for network, message in [
            ("10.239.5.1/24", "a container IP must not equal the gateway IP"),
            ("10.239.5.255/24", "a container IP must not equal the broadcast IP"),
            ("10.239.5.77/24", "the requested IP is already allocated"),
            (gactor_server.pool, "overlaps the dynamic allocation range"),
            ("10.239.5.0/25", "overlaps an existing subnet"),
            ("not-an-ip", "invalid CIDR address"),
        ]:
            with pytest.raises(GardenError, match=message):
                await client.create(ContainerSpec(handle=unique_handle(), network=network))
    finally:
        for c in made:
            await client.destroy(c.handle)


async def test_pool_exhaustion_is_a_clear_error(own_servers):
    server = own_servers("tiny", "10.239.9.0/29", "--port-pool-start", "42100", "--port-pool-size", "10")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="one"))
        await client.create(ContainerSpec(handle="two"))
        with pytest.raises(GardenError, match="insufficient subnets remaining in the pool"):
            await client.create(ContainerSpec(handle="three"))
        assert (await client.capacity()).max_containers == 2
    await server.finish()


# ---- bandwidth -------------------------------------------------------------------------------

RATE = 400_000  # bytes per second
TRANSFER = 1_600_000  # bytes: about 4 s at RATE


async def _measure_upload(container, host_ip: str) -> float:
    """Bytes per second from the container to a listener on the host's gateway address."""
    listener = socket.create_server((host_ip, 0))
    port = listener.getsockname()[1]

    def receive() -> float:
        listener.settimeout(20)
        conn, _ = listener.accept()
        with conn:
            got, start = 0, time.monotonic()
            while chunk := conn.recv(65536):
                got += len(chunk)
            return got / (time.monotonic() - start)

    async with trio.open_nursery() as nursery:
        result: list[float] = []

        async def rx() -> None:
            result.append(await trio.to_thread.run_sync(receive))

        nursery.start_soon(rx)
        await sh_ok(container, f"dd if=/dev/zero bs=16000 count={TRANSFER // 16000} 2>/dev/null | nc -w5 {host_ip} {port}",
                    seconds=30)
    listener.close()
    return result[0]


async def _measure_download(container, container_ip: str) -> float:
    """Bytes per second from the host to ``nc -l`` in the container."""
    result: list[float] = []

    def send() -> None:
        for _ in range(50):  # until the listener is up (bounded)
            try:
                conn = socket.create_connection((container_ip, 9100), timeout=20)
                break
            except OSError:
                time.sleep(0.1)
        start = time.monotonic()
        with conn:
            conn.sendall(b"\0" * TRANSFER)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # until the container has read everything and closed
        result.append(TRANSFER / (time.monotonic() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sh, container, "nc -l -p 9100 > /dev/null")
        await trio.to_thread.run_sync(send)
    return result[0]


async def test_bandwidth_is_limited_both_ways(client, container):
    limits = BandwidthLimits(rate_in_bytes_per_second=RATE, burst_rate_in_bytes_per_second=20_000)
    await container.limit_bandwidth(limits)
    assert await container.current_bandwidth_limits() == limits
    info = await container.info()
    up = await _measure_upload(container, info.host_ip)
    down = await _measure_download(container, info.container_ip)
    assert 0.75 * RATE <= up <= 1.25 * RATE, f"upload {up:.0f} B/s"
    assert 0.75 * RATE <= down <= 1.25 * RATE, f"download {down:.0f} B/s"
    await container.limit_bandwidth(BandwidthLimits())  # removed at runtime
    assert await container.current_bandwidth_limits() == BandwidthLimits()
    assert await _measure_upload(container, info.host_ip) > 5 * RATE


async def test_bandwidth_in_the_spec(client):
    c = await client.create(ContainerSpec(handle=unique_handle(),
                                          limits=Limits(bandwidth=BandwidthLimits(1_000_000, 100_000))))
    try:
        assert (await c.current_bandwidth_limits()).rate_in_bytes_per_second == 1_000_000
    finally:
        await client.destroy(c.handle)


# ---- nothing survives, restarts keep it --------------------------------------------------------

async def test_destroy_leaves_links_routes_qdiscs_and_rules_as_they_were(own_servers):
    server = own_servers("netclean", "10.239.10.0/24", "--deny-network", "10.99.0.0/16",
                         "--port-pool-start", "42200", "--port-pool-size", "100")
    await server.start()
    before = server_network_state(server)
    async with server.connect() as client:
        for round_ in range(100):
            c = await client.create(ContainerSpec(handle=f"c{round_}", net_in=[NetIn(0, 80)]))
            if round_ % 25 == 0:
                await c.net_out(NetOutRule(protocol=Protocol.TCP, ports=[PortRange(80, 80)], log=True))
                await c.limit_bandwidth(BandwidthLimits(1_000_000, 10_000))
                assert server_network_state(server) != before
            await client.destroy(c.handle)
    await wait_until_equal(lambda: server_network_state(server), before, within=15)
    await server.finish()


async def test_a_restart_keeps_addresses_mappings_and_rules(own_servers):
    server = own_servers("netrestart", "10.239.11.0/24", "--port-pool-start", "42300", "--port-pool-size", "100")
    await server.start()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="kept"))
        host_port, _ = await c.net_in(0, 8080)
        ip = (await c.info()).container_ip
    state = server_network_state(server)
    await server.kill()
    await server.start()
    assert server_network_state(server) == state
    async with server.connect() as client:
        c = await client.lookup("kept")
        info = await c.info()
        assert info.container_ip == ip
        assert [(m.host_port, m.container_port) for m in info.mapped_ports] == [(host_port, 8080)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once, c, 8080, "still")
            await trio.sleep(0.3)
            assert await host_connect("127.0.0.1", host_port) == b"still\n"
        newer = await client.create(ContainerSpec(handle="newer"))
        assert (await newer.info()).container_ip != ip
        assert (await newer.net_in(0, 80))[0] != host_port
    await server.finish()


async def test_a_container_cannot_send_as_another_address(own_servers):
    """A privileged container may add another container's address to its eth0; the host
    drops what it sends from that address (anti-spoofing): nothing reaches the target.
    (Were it let through, the replies would go to that other container, never out.)"""
    server = own_servers("spoof", "10.239.12.0/24", "--port-pool-start", "42400", "--port-pool-size", "10")
    await server.start()
    async with server.connect() as client:
        target = await client.create(ContainerSpec(handle="target"))
        bystander = await client.create(ContainerSpec(handle="bystander"))
        spoofer = await client.create(ContainerSpec(handle="spoofer", privileged=True))
        target_ip, stolen = (await target.info()).container_ip, (await bystander.info()).container_ip

        async def received() -> int:
            stat = (await target.metrics()).network_stat
            assert stat is not None
            return stat.rx_bytes

        before = await received()
        assert await ping(spoofer, target_ip)
        assert await received() - before >= 84  # its own address: the ping arrives
        await sh_ok(spoofer, f"ip addr add {stolen}/32 dev eth0")
        before = await received()
        await sh(spoofer, f"ping -c3 -W1 -s 1000 -I {stolen} {target_ip}")
        assert await received() - before < 1000  # three 1 kB pings were sent: none arrived
    await server.finish()
