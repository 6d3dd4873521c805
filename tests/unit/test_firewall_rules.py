"""NetOut validation (Garden's messages) and translation into nft rules: pure functions."""

from __future__ import annotations

import ipaddress

import pytest

from gactor.kernel.firewall import net_out_rules, validate_net_out
from gactor.kernel.netmodel import Allocation, ContainerNet

NET = ContainerNet("some-handle", Allocation(ipaddress.IPv4Network("10.254.0.0/30"),
                                             ipaddress.IPv4Address("10.254.0.2"), False), "g0000x", 1500)


@pytest.mark.parametrize(("rule", "message"), [
    ({"ports": [{"start": 80, "end": 80}]}, "Ports cannot be specified for Protocol ALL"),
    ({"protocol": 3, "ports": [{"start": 1, "end": 5}]}, "Ports cannot be specified for Protocol ICMP"),
    ({"protocol": 52}, "invalid protocol: 52"),
    ({"protocol": 4}, "invalid protocol: 4"),  # ICMPv6: for network plugins, as in Guardian
    ({"protocol": 1, "ports": [{"start": 90, "end": 80}]}, "invalid port range 90-80: the start is after the end"),
    ({"networks": [{"start": "10.0.0.9", "end": "10.0.0.1"}]},
     "invalid network range 10.0.0.9-10.0.0.1: the start is after the end"),
    ({"networks": [{"start": "fe80::1"}]}, "invalid network range fe80::1-fe80::1: not IPv4 addresses"),
    ({"networks": [{}]}, "invalid network range: it needs a start or an end address"),
    ({"networks": [{"start": "10.0.0.300"}]}, "invalid network range 10.0.0.300-10.0.0.300: not IPv4 addresses"),
    ({"protocol": 2, "ports": [{"start": 1, "end": 70000}]}, "invalid port range 1-70000: ports end at 65535"),
    ({"protocol": 1, "icmps": {"type": 8}}, "ICMPs cannot be specified for Protocol TCP"),
    ({"icmps": {}}, "ICMPs cannot be specified for Protocol ALL"),
    ({"protocol": 4, "ports": [{"start": 1}]}, "invalid protocol: 4"),
])
def test_invalid_rules_are_refused_with_gardens_messages(rule, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        validate_net_out(rule)


@pytest.mark.parametrize("rule", [
    {}, {"protocol": 1, "ports": [{"start": 80}], "networks": [{"end": "10.0.0.1"}]},
    {"protocol": 3, "icmps": {"type": 8, "code": 0}}, {"protocol": 2, "icmps": None, "log": True},
    {"protocol": 1, "ports": [{"end": 80}]},  # a start of 0 is omitted on the wire
])
def test_valid_rules_pass(rule):
    validate_net_out(rule)


def test_the_zero_rule_allows_everything():
    assert net_out_rules(NET, {}) == ["accept"]


def test_networks_and_ports_become_sets():
    rule = {"protocol": 1, "networks": [{"start": "10.0.0.1", "end": "10.0.0.9"}, {"start": "192.0.2.7"}],
            "ports": [{"start": 80, "end": 80}, {"start": 8000, "end": 8080}]}
    assert net_out_rules(NET, rule) == [
        "ip daddr { 10.0.0.1-10.0.0.9, 192.0.2.7 } tcp dport { 80, 8000-8080 } accept"]


def test_a_port_range_without_an_end_is_one_port():
    assert net_out_rules(NET, {"protocol": 2, "ports": [{"start": 53}]}) == ["udp dport 53 accept"]


def test_single_values_are_not_sets():
    rule = {"protocol": 1, "networks": [{"start": "10.0.0.1", "end": "10.0.0.9"}], "ports": [{"start": 80, "end": 90}]}
    assert net_out_rules(NET, rule) == ["ip daddr 10.0.0.1-10.0.0.9 tcp dport 80-90 accept"]
    assert net_out_rules(NET, {"networks": [{"end": "192.0.2.1"}]}) == ["ip daddr 192.0.2.1 accept"]


def test_icmp_type_and_code():
    assert net_out_rules(NET, {"protocol": 3, "icmps": {"type": 8, "code": 0}}) == [
        "meta l4proto icmp icmp type 8 icmp code 0 accept"]
    assert net_out_rules(NET, {"protocol": 3, "icmps": {"type": 8}}) == ["meta l4proto icmp icmp type 8 accept"]
    assert net_out_rules(NET, {"protocol": 3}) == ["meta l4proto icmp accept"]
    # Present but empty: Garden passes --icmp-type 0 (echo reply).
    assert net_out_rules(NET, {"protocol": 3, "icmps": {}}) == ["meta l4proto icmp icmp type 0 accept"]


def test_logging_is_a_rate_limited_rule_before_the_accept():
    rules = net_out_rules(NET, {"protocol": 1, "log": True})
    assert len(rules) == 2
    assert rules[0].startswith("meta l4proto tcp ct state new limit rate")
    assert rules[0].endswith('log prefix "some-handle "')
    assert rules[1] == "meta l4proto tcp accept"


def test_logging_covers_tcp_only_as_gardens_log_chain_does():
    assert net_out_rules(NET, {"protocol": 2, "log": True}) == ["meta l4proto udp accept"]
    assert net_out_rules(NET, {"protocol": 3, "log": True}) == ["meta l4proto icmp accept"]
    everything = net_out_rules(NET, {"log": True, "networks": [{"start": "10.0.0.1"}]})
    assert everything[0].startswith("ip daddr 10.0.0.1 meta l4proto tcp ct state new limit rate 2/second")
    assert everything[1] == "ip daddr 10.0.0.1 accept"


def test_a_handle_cannot_break_out_of_the_log_prefix():
    odd = ContainerNet('a "quoted" handle; drop', NET.alloc, "g0000x", 1500)
    assert net_out_rules(odd, {"protocol": 1, "log": True})[0].endswith('log prefix "a__quoted__handle__d "')
