"""The firewall against the real kernel, inside a scratch network namespace (the host's
ruleset is never touched): the table's layout, per-container add/remove leaving the table
as it was, idempotent removal and setup, and 3,000 NetOut rules in one transaction.

libnftables works in the caller's namespace, so each case runs in a child process that
unshared one (``unshare --net python -c ...``) and prints what the test checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PRELUDE = """
import ipaddress, json, subprocess
from gactor.kernel.firewall import Firewall
from gactor.kernel.netmodel import Allocation, ContainerNet
from gactor.kernel.nft import Nft

def net(i, net_in=(), net_out=()):
    a = Allocation(ipaddress.IPv4Network(f"10.199.{i // 64}.{(i % 64) * 4}/30"),
                   ipaddress.IPv4Address(f"10.199.{i // 64}.{(i % 64) * 4 + 2}"), False)
    return ContainerNet(f"h{i}", a, f"gabcd{int(a.container_ip):08x}", 1500, list(net_in), list(net_out))

def ruleset():
    # Without handles: the kernel numbers objects anew each time they are created.
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items() if k != "handle"}
        return [plain(v) for v in x] if isinstance(x, list) else x
    return plain(json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], check=True, capture_output=True,
                                           text=True).stdout))

# With host access (what the input chain's anti-spoofing needs to be seen; the default,
# Garden's, rejects container->host outright: tests/e2e/test_net_outside.py checks it).
fw = Firewall(Nft(), "abcd", ipaddress.IPv4Network("10.199.0.0/22"), [ipaddress.IPv4Network("10.0.0.0/8")],
              allow_host_access=True)
"""


def run_in_netns(body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body)
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", script], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out.splitlines()[-1])


def test_add_then_remove_leaves_the_table_as_it_was():
    got = run_in_netns("""
        fw.setup([net(i) for i in range(50)])
        before = ruleset()
        c = net(60, net_in=[(61001, 8080)], net_out=[{"protocol": 1, "ports": [{"start": 80, "end": 80}]}])
        fw.add_container(c)
        during = fw.list()
        fw.remove_container(c)
        after = ruleset()
        fw.remove_container(c)  # gone already: nothing to do, no error
        print(json.dumps({"same": before == after, "during": during, "again": ruleset() == after}))
    """)
    assert got["same"]
    assert got["again"]
    items = got["during"]["nftables"]
    chains = {i["chain"]["name"] for i in items if "chain" in i}
    assert {"forward", "prerouting", "output", "postrouting", "c_0ac700f2"} <= chains
    netin = next(i["map"] for i in items if "map" in i and i["map"]["name"] == "netin")
    assert [61001, {"concat": ["10.199.0.242", 8080]}] in netin["elem"]
    rules = [i["rule"] for i in items if "rule" in i and i["rule"]["chain"] == "c_0ac700f2"]
    assert len(rules) == 1


def test_setup_replaces_a_previous_runs_table_atomically():
    got = run_in_netns("""
        fw.setup([net(1), net(2)])
        fw.setup([net(2)])  # net(1) was destroyed while the server was down
        names = {i["chain"]["name"] for i in fw.list()["nftables"] if "chain" in i}
        print(json.dumps({"chains": sorted(names)}))
    """)
    assert "c_0ac70006" not in got["chains"]
    assert "c_0ac7000a" in got["chains"]


def test_three_thousand_rules_apply_in_one_call():
    got = run_in_netns("""
        fw.setup([net(0)])
        rules = [{"protocol": 1, "networks": [{"start": f"10.1.{i // 250}.{i % 250}"}],
                  "ports": [{"start": 1000 + i}]} for i in range(3000)]
        fw.add_net_out(net(0), rules)
        count = sum(1 for i in fw.list()["nftables"] if "rule" in i and i["rule"]["chain"] == "c_0ac70002")
        print(json.dumps({"count": count}))
    """)
    assert got["count"] == 3000


def test_concurrent_changes_go_in_shared_transactions_each_with_its_own_outcome():
    got = run_in_netns("""
        import threading
        transactions = []
        real = Nft._run_locked

        def counted(self, script, json_output=False):
            transactions.append(script.count("add chain"))
            return real(self, script, json_output)

        Nft._run_locked = counted
        fw.setup([])
        transactions.clear()
        nets = [net(i) for i in range(40)]
        gate = threading.Barrier(len(nets) + 1)
        errors = []

        def add(n):
            gate.wait()
            fw.add_container(n)

        def refused():
            gate.wait()
            try:
                fw.nft.apply("add element ip gactor_abcd nosuchset { 10.1.1.1 }")
            except Exception as err:
                errors.append(str(err))

        threads = [threading.Thread(target=add, args=(n,)) for n in nets] + [threading.Thread(target=refused)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        chains = {i["chain"]["name"] for i in fw.list()["nftables"] if "chain" in i}
        added = sorted(c for c in chains if c.startswith("c_"))
        for n in nets:
            threading.Thread(target=fw.remove_container, args=(n,)).start()
        for t in threading.enumerate():
            if t is not threading.current_thread():
                t.join()
        left = sorted(i["chain"]["name"] for i in fw.list()["nftables"] if "chain" in i)
        print(json.dumps({"added": added, "errors": errors, "largest": max(transactions), "left": left}))
    """)
    assert len(got["added"]) == 40  # every container's state, whichever transaction it went in
    assert len(got["errors"]) == 1
    assert "nosuchset" in got["errors"][0]
    assert got["largest"] > 1  # some went together
    assert not [c for c in got["left"] if c.startswith("c_")]


def test_teardown_removes_the_table():
    got = run_in_netns("""
        fw.setup([net(0)])
        fw.teardown()
        print(json.dumps({"tables": [i for i in ruleset()["nftables"] if "table" in i]}))
    """)
    assert got["tables"] == []


PACKETS = """
import ctypes, os, socket, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
HOST_NS = os.open("/proc/self/ns/net", os.O_RDONLY)
procs = []

def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)

def netns():
    # A sleeping process holds each namespace: nothing named, nothing global to clean up.
    p = subprocess.Popen(["unshare", "--net", "sleep", "120"])
    procs.append(p)
    for _ in range(200):
        if os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net"):
            return p.pid
        time.sleep(0.005)
    raise RuntimeError("unshare did not start")

def inside(pid, *cmd):
    sh("nsenter", "-t", str(pid), "-n", *cmd)

def sock(pid, kind):
    # A socket belongs to the namespace it was created in.
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY) if pid else HOST_NS
    assert libc.setns(fd, CLONE_NEWNET) == 0
    try:
        return socket.socket(socket.AF_INET, kind)
    finally:
        assert libc.setns(HOST_NS, CLONE_NEWNET) == 0
        if pid:
            os.close(fd)

def listen(pid, port):
    s = sock(pid, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    return s

def connects(pid, addr, port, source=None):
    s = sock(pid, socket.SOCK_STREAM)
    s.settimeout(0.6)
    try:
        if source:
            s.bind((source, 0))
        s.connect((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()

def udp_arrives(pid, addr, port, source, receiver):
    s = sock(pid, socket.SOCK_DGRAM)
    s.bind((source, 0))
    token = os.urandom(8)
    s.sendto(token, (addr, port))
    s.close()
    receiver.settimeout(0.4)
    try:
        while True:
            data, peer = receiver.recvfrom(64)
            if data == token:
                return peer[0]
    except OSError:
        return None

def pings(pid, addr):
    # One echo request from a raw socket (this host has no ping binary).
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    assert libc.setns(fd, CLONE_NEWNET) == 0
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    finally:
        assert libc.setns(HOST_NS, CLONE_NEWNET) == 0
        os.close(fd)
    ident = os.getpid() & 0xFFFF
    header = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big") + b"gactor"
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, len(header), 2))
    total = (total & 0xFFFF) + (total >> 16)
    packet = header[:2] + (~total & 0xFFFF).to_bytes(2, "big") + header[4:]
    s.settimeout(0.6)
    try:
        s.sendto(packet, (addr, 0))
        while True:
            data, _ = s.recvfrom(256)
            icmp = data[(data[0] & 0x0F) * 4:]
            if icmp[0] == 0 and icmp[4:6] == ident.to_bytes(2, "big"):
                return True
    except OSError:
        return False
    finally:
        s.close()

def container(pid, c):
    gw = c.alloc.gateway_ip
    sh("ip", "link", "add", c.host_ifname, "type", "veth", "peer", "name", "eth0", "netns", str(pid))
    sh("ip", "addr", "add", f"{gw}/{c.alloc.subnet.prefixlen}", "dev", c.host_ifname)
    sh("ip", "link", "set", c.host_ifname, "up")
    with open(f"/proc/sys/net/ipv4/conf/{c.host_ifname}/route_localnet", "w") as f:
        f.write("1")
    inside(pid, "ip", "addr", "add", f"{c.alloc.container_ip}/{c.alloc.subnet.prefixlen}", "dev", "eth0")
    inside(pid, "ip", "link", "set", "eth0", "up")
    inside(pid, "ip", "link", "set", "lo", "up")
    inside(pid, "ip", "route", "add", "default", "via", str(gw))

try:
    # rp_filter off: anti-spoofing must come from the firewall, not from the routing check.
    for path, value in (("ipv4/ip_forward", "1"), ("ipv4/conf/all/rp_filter", "0"),
                        ("ipv4/conf/default/rp_filter", "0")):
        with open(f"/proc/sys/net/{path}", "w") as f:
            f.write(value)
    sh("ip", "link", "set", "lo", "up")
    c1, c2 = net(0), net(1)
    p1, p2, outside = netns(), netns(), netns()
    container(p1, c1)
    container(p2, c2)
    # The "outside world": a peer on 10.50.0.0/24, which --deny-network 10.0.0.0/8 covers.
    sh("ip", "link", "add", "xout", "type", "veth", "peer", "name", "eth0", "netns", str(outside))
    sh("ip", "addr", "add", "10.50.0.1/24", "dev", "xout")
    sh("ip", "link", "set", "xout", "up")
    inside(outside, "ip", "addr", "add", "10.50.0.2/24", "dev", "eth0")
    inside(outside, "ip", "link", "set", "eth0", "up")
    inside(outside, "ip", "route", "add", "10.199.0.0/22", "via", "10.50.0.1")
    # c1 may also send as c2's address (it owns it locally): only the firewall can stop it.
    inside(p1, "ip", "addr", "add", f"{c2.alloc.container_ip}/32", "dev", "eth0")
    l7000, l7001, l8080 = listen(outside, 7000), listen(outside, 7001), listen(p1, 8080)
    l2 = listen(p2, 9000)
    udp = sock(outside, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 7100))

    fw.setup([c1, c2])
    r = {}
    r["denied_before"] = connects(p1, "10.50.0.2", 7000)
    r["c2_from_c1_denied"] = connects(p1, str(c2.alloc.container_ip), 9000)
    r["ping_before"] = pings(p1, "10.50.0.2")
    fw.add_net_out(c1, [{"protocol": 1, "networks": [{"start": "10.50.0.2"}], "ports": [{"start": 7000}],
                         "log": True}])
    c1.net_out.append({})
    r["allowed_port"] = connects(p1, "10.50.0.2", 7000)
    r["other_port"] = connects(p1, "10.50.0.2", 7001)
    r["c2_unaffected"] = connects(p2, "10.50.0.2", 7000)
    r["ping_with_tcp_rule"] = pings(p1, "10.50.0.2")
    fw.add_net_out(c1, [{"protocol": 3, "networks": [{"start": "10.50.0.2"}], "icmps": {"type": 8, "code": 0}}])
    r["ping_with_icmp_rule"] = pings(p1, "10.50.0.2")
    fw.add_net_out(c1, [{"protocol": 2, "networks": [{"start": "10.50.0.0", "end": "10.50.0.255"}]}])
    r["udp_seen_as"] = udp_arrives(p1, "10.50.0.2", 7100, str(c1.alloc.container_ip), udp)
    r["spoofed_udp"] = udp_arrives(p1, "10.50.0.2", 7100, str(c2.alloc.container_ip), udp)
    r["spoofed_tcp"] = connects(p1, "10.50.0.2", 7000, source=str(c2.alloc.container_ip))
    to_host = sock(0, socket.SOCK_DGRAM)
    to_host.bind(("0.0.0.0", 7200))
    r["host_udp"] = udp_arrives(p1, str(c1.alloc.gateway_ip), 7200, str(c1.alloc.container_ip), to_host)
    r["host_spoofed_udp"] = udp_arrives(p1, str(c1.alloc.gateway_ip), 7200, str(c2.alloc.container_ip), to_host)
    # NetIn: from the host's loopback, from its own address, and from outside.
    fw.add_net_in(c1, 61001, 8080)
    r["netin_loopback"] = connects(0, "127.0.0.1", 61001)
    r["netin_local"] = connects(0, "10.50.0.1", 61001)
    r["netin_outside"] = connects(outside, "10.50.0.1", 61001)
    r["netin_other_port"] = connects(0, "127.0.0.1", 61002)
    fw.add_net_in(c1, 61003, 8080)
    fw.remove_net_in(c1, 61003)
    fw.remove_net_in(c1, 61003)  # gone already: no error
    r["netin_removed"] = connects(0, "127.0.0.1", 61003)
    c1.net_in.append((61001, 8080))
    fw.remove_container(c1)
    r["netin_after_remove"] = connects(0, "127.0.0.1", 61001)
    r["out_after_remove"] = connects(p1, "10.50.0.2", 7000)
    # Without the table the spoofed datagram goes through: the firewall is what dropped it.
    fw.teardown()
    r["spoofed_without_firewall"] = udp_arrives(p1, "10.50.0.2", 7100, str(c2.alloc.container_ip), udp)
    r["host_spoofed_without_firewall"] = udp_arrives(p1, str(c1.alloc.gateway_ip), 7200,
                                                     str(c2.alloc.container_ip), to_host)
    print(json.dumps(r))
finally:
    for p in procs:
        p.kill()
        p.wait()
"""


def test_packets_follow_net_out_deny_anti_spoofing_and_net_in():
    got = run_in_netns(PACKETS)
    assert got == {
        "denied_before": False, "c2_from_c1_denied": False,
        "ping_before": False, "ping_with_tcp_rule": False, "ping_with_icmp_rule": True,
        "allowed_port": True, "other_port": False, "c2_unaffected": False,
        "udp_seen_as": "10.50.0.1",  # masqueraded on the way out
        "spoofed_udp": None, "spoofed_tcp": False,
        "host_udp": "10.199.0.2", "host_spoofed_udp": None, "netin_removed": False,
        "netin_loopback": True, "netin_local": True, "netin_outside": True, "netin_other_port": False,
        "netin_after_remove": False, "out_after_remove": False,
        "spoofed_without_firewall": "10.199.0.6", "host_spoofed_without_firewall": "10.199.0.6",
    }


def test_setup_twice_is_idempotent():
    got = run_in_netns("""
        nets = [net(1, net_in=[(61005, 80)], net_out=[{"protocol": 2, "log": True}]), net(2)]
        fw.setup(nets)
        first = ruleset()
        fw.setup(nets)
        print(json.dumps({"same": ruleset() == first}))
    """)
    assert got["same"]
