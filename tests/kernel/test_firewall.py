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
    return json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], check=True, capture_output=True,
                                     text=True).stdout)

fw = Firewall(Nft(), "abcd", ipaddress.IPv4Network("10.199.0.0/22"), [ipaddress.IPv4Network("10.0.0.0/8")])
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


def test_teardown_removes_the_table():
    got = run_in_netns("""
        fw.setup([net(0)])
        fw.teardown()
        print(json.dumps({"tables": [i for i in ruleset()["nftables"] if "table" in i]}))
    """)
    assert got["tables"] == []
