"""gactor's nftables rules: one table per server, per-container state in elements and chains.

Table ``ip gactor_<tag>`` (the tag names the server's depot, so several servers on one
host never touch each other's rules)::

    set sources   { ifname . ipv4_addr }        which address may come from which link
    map egress    { ipv4_addr : verdict }       container IP -> jump c_<ip>, its NetOut chain
    map netin     { inet_service : ipv4_addr . inet_service }   host port -> container ip . port
    set deny      { ipv4_addr, interval }       --deny-network
    chain forward      (filter/forward)  anti-spoofing, established, NetOut, deny
    chain input        (filter/input)    anti-spoofing for traffic to the host itself
    chain prerouting   (nat/prerouting)  NetIn DNAT to local addresses (and the external IP)
    chain output       (nat/output)      NetIn DNAT for connections made on the host itself
    chain postrouting  (nat/srcnat)      masquerade: containers -> outside; loopback -> containers
    chain c_<ip hex>   one per container: its NetOut accept rules, newest first

Base chains never name a container, so adding or removing one is a handful of element
and chain operations in one transaction, whatever the number of containers.

NetOut semantics (Garden): without ``--deny-network`` every destination is allowed and a
rule only adds logging; with it, traffic to a denied range is dropped unless one of the
container's rules accepts it. Rules are matched newest first (Garden prepends them).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from typing import Any

from .netmodel import ContainerNet, IPv4Network, NetworkError, bridge_name, link_prefix
from .nft import Nft, NftError

PROTOCOLS = {0: "all", 1: "tcp", 2: "udp", 3: "icmp"}
LOG_RATE = "limit rate 2/second burst 5 packets"  # Garden rate-limits its LOG rules too


def table_name(tag: str) -> str:
    return f"gactor_{tag}"


def chain_name(net: ContainerNet) -> str:
    return f"c_{int(net.alloc.container_ip):08x}"


# ---- NetOut ----------------------------------------------------------------------------

def validate_net_out(rule: dict[str, Any]) -> None:
    """Raise ValueError with Garden's message if ``rule`` (NetOutRule wire form) is invalid."""
    protocol = rule.get("protocol", 0)
    if rule.get("ports") and protocol not in (1, 2):
        if protocol in PROTOCOLS:
            raise ValueError(f"Ports cannot be specified for Protocol {PROTOCOLS[protocol].upper()}")
        raise ValueError(f"invalid protocol: {protocol}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"invalid protocol: {protocol}")
    if rule.get("icmps") is not None and protocol != 3:
        # Garden passes these to iptables, which refuses --icmp-type without -p icmp.
        raise ValueError(f"ICMPs cannot be specified for Protocol {PROTOCOLS[protocol].upper()}")
    for network in rule.get("networks") or []:
        _address_range(network)
    for ports in rule.get("ports") or []:
        _port_range(ports)


def _address_range(network: dict[str, Any]) -> str:
    start: str = network.get("start") or network.get("end") or ""
    end: str = network.get("end") or start
    if not start:
        raise ValueError("invalid network range: it needs a start or an end address")
    # inet_pton, not ipaddress: a BulkNetOut of 3,000 rules parses 6,000 addresses.
    try:
        first, last = socket.inet_pton(socket.AF_INET, start), socket.inet_pton(socket.AF_INET, end)
    except (OSError, TypeError):
        raise ValueError(f"invalid network range {start}-{end}: not IPv4 addresses") from None
    if first > last:  # network byte order compares as the numbers do
        raise ValueError(f"invalid network range {start}-{end}: the start is after the end")
    return start if first == last else f"{start}-{end}"


def _port_range(ports: dict[str, Any]) -> str:
    start = int(ports.get("start") or 0)
    end = int(ports.get("end") or start)
    if start > end:
        raise ValueError(f"invalid port range {start}-{end}: the start is after the end")
    if end > 65535:
        raise ValueError(f"invalid port range {start}-{end}: ports end at 65535")
    return str(start) if start == end else f"{start}-{end}"


def _one_or_set(values: list[str]) -> str:
    # A one-element anonymous set is a kernel set object of its own: a third slower to load.
    return values[0] if len(values) == 1 else f"{{ {', '.join(values)} }}"


def net_out_rules(net: ContainerNet, rule: dict[str, Any]) -> list[str]:
    """The nft rule bodies (without ``add rule ...``) for one NetOut rule, which
    ``validate_net_out`` accepted (an invalid one may raise ValueError or KeyError).

    Garden expands a rule into one iptables rule per (network range x port range); here the
    ranges become anonymous sets in one nft rule, which matches the same product."""
    protocol = PROTOCOLS[rule.get("protocol", 0)]
    match = []
    networks = [_address_range(n) for n in rule.get("networks") or []]
    if networks:
        match.append(f"ip daddr {_one_or_set(networks)}")
    if protocol in ("tcp", "udp"):
        ports = [_port_range(p) for p in rule.get("ports") or []]
        match.append(f"{protocol} dport {_one_or_set(ports)}" if ports else f"meta l4proto {protocol}")
    elif protocol == "icmp":
        match.append("meta l4proto icmp")
        icmps = rule.get("icmps")
        if icmps is not None:  # Garden: present means --icmp-type, an absent type is 0
            match.append(f"icmp type {int(icmps.get('type') or 0)}")
            if icmps.get("code") is not None:
                match.append(f"icmp code {int(icmps['code'])}")
    body = " ".join(match)
    rules = []
    if rule.get("log") and protocol in ("all", "tcp"):
        # Garden's log chain logs new TCP connections only, whatever the rule's protocol.
        tcp = "meta l4proto tcp " if protocol == "all" else ""
        # Garden prefixes with the handle too; nft caps the prefix and has no quote escapes.
        prefix = '"' + re.sub(r"[^A-Za-z0-9_.:-]", "_", net.handle[:20]) + ' "'
        rules.append(f"{body} {tcp}ct state new {LOG_RATE} log prefix {prefix}".strip())
    rules.append(f"{body} accept".strip())
    return rules


# ---- the table -------------------------------------------------------------------------

class Firewall:
    """Synchronous; call it from a worker thread. Every method is one transaction."""

    def __init__(self, nft: Nft, tag: str, pool: IPv4Network, deny: list[IPv4Network],
                 external_ip: str = "", allow_host_access: bool = False) -> None:
        self.nft = nft
        self.tag = tag
        self.table = f"ip {table_name(tag)}"
        self.prefix = link_prefix(tag)
        self.pool = pool
        self.deny = deny
        self.external_ip = external_ip
        self.allow_host_access = allow_host_access

    def _base(self) -> list[str]:
        t, ifs = self.table, f'"{self.prefix}*"'
        deny = f"elements = {{ {', '.join(map(str, self.deny))} }};" if self.deny else ""
        external = ""
        if self.external_ip:
            external = f"add rule {t} prerouting ip daddr {self.external_ip} dnat ip to tcp dport map @netin"
        return [
            f"add table {t}",
            f"delete table {t}",
            f"add table {t}",
            f"add set {t} sources {{ type ifname . ipv4_addr; }}",
            f"add map {t} egress {{ type ipv4_addr : verdict; }}",
            f"add map {t} netin {{ type inet_service : ipv4_addr . inet_service; }}",
            f"add set {t} deny {{ type ipv4_addr; flags interval; {deny} }}",
            f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
            f"add rule {t} forward iifname {ifs} iifname . ip saddr != @sources drop",
            f"add rule {t} forward ct state established,related accept",
            f"add rule {t} forward iifname {ifs} ip saddr vmap @egress",
            f"add rule {t} forward iifname {ifs} ip daddr @deny drop",
            # The host itself: a container must not reach the gateway's services as another one,
            # and (Garden's default, --allow-host-access otherwise) reaches none of the host's
            # services at all: only replies to what the host started get in.
            f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
            f"add rule {t} input iifname {ifs} iifname . ip saddr != @sources drop",
            f"add rule {t} input iifname {ifs} ct state established,related accept",
            "" if self.allow_host_access else f"add rule {t} input iifname {ifs} reject with icmp type host-prohibited",
            f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}",
            f"add rule {t} prerouting fib daddr type local dnat ip to tcp dport map @netin",
            external,
            f"add chain {t} output {{ type nat hook output priority -100; policy accept; }}",
            f"add rule {t} output fib daddr type local dnat ip to tcp dport map @netin",
            f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}",
            f"add rule {t} postrouting iifname {ifs} oifname != {ifs} masquerade",
            f"add rule {t} postrouting ip saddr 127.0.0.0/8 oifname {ifs} masquerade",
        ]

    def _container(self, net: ContainerNet) -> list[str]:
        t, chain, ip = self.table, chain_name(net), net.alloc.container_ip
        source_link = net.host_ifname if not net.alloc.bridged else bridge_name(self.tag, net.alloc.subnet)
        commands = [
            f"add chain {t} {chain}",
            f'add element {t} sources {{ "{source_link}" . {ip} }}',
            f"add element {t} egress {{ {ip} : jump {chain} }}",
        ]
        commands += [f"add element {t} netin {{ {host} : {ip} . {port} }}" for host, port in net.net_in]
        commands += self._net_out(net, net.net_out, empty_chain=True)
        return commands

    def _net_out(self, net: ContainerNet, rules: list[dict[str, Any]], empty_chain: bool) -> list[str]:
        """Garden prepends each rule: the newest is matched first. Into an empty chain the
        same order is appended (``add``: a third faster than ``insert`` for 3,000 rules)."""
        bodies = [body for rule in rules for body in reversed(net_out_rules(net, rule))]
        if empty_chain:
            return [f"add rule {self.table} {chain_name(net)} {body}" for body in reversed(bodies)]
        return [f"insert rule {self.table} {chain_name(net)} {body}" for body in bodies]

    def _apply(self, commands: Iterable[str], what: str, coalesce: bool = False) -> None:
        """One transaction; ``coalesce``: possibly together with other threads' (``Nft.apply``),
        for one container's own state, which no other container's commands touch."""
        script = "\n".join(c for c in commands if c) + "\n"
        try:
            if coalesce:
                self.nft.apply(script)
            else:
                self.nft.run(script)
        except NftError as err:
            raise NetworkError(f"{what}: {err}") from None

    def setup(self, containers: Iterable[ContainerNet]) -> None:
        """(Re)create the whole table with ``containers`` in it, atomically: stale chains and
        elements of a previous run vanish, live ones never see a gap."""
        commands = self._base()
        for net in containers:
            commands += self._container(net)
        self._apply(commands, "setting up the firewall")

    def add_container(self, net: ContainerNet) -> None:
        self._apply(self._container(net), f"firewall for {net.handle}", coalesce=True)

    def remove_container(self, net: ContainerNet) -> None:
        """Remove every element and the chain of ``net``; what is gone already is skipped."""
        t, chain, ip = self.table, chain_name(net), net.alloc.container_ip
        source_link = net.host_ifname if not net.alloc.bridged else bridge_name(self.tag, net.alloc.subnet)
        commands = [
            f"delete element {t} egress {{ {ip} : jump {chain} }}",
            f'delete element {t} sources {{ "{source_link}" . {ip} }}',
            *(f"delete element {t} netin {{ {host} }}" for host, _ in net.net_in),
            f"delete chain {t} {chain}",  # the kernel deletes the chain's rules with it
        ]
        try:
            self._apply(commands, f"removing the firewall of {net.handle}", coalesce=True)
        except NetworkError:
            # Some of it is gone already (a retried removal): delete the rest one by one.
            for command in commands:
                try:
                    self.nft.run(command + "\n")
                except NftError as err:
                    if "No such file or directory" not in str(err):
                        raise NetworkError(f"removing the firewall of {net.handle}: {err}") from None

    def add_net_in(self, net: ContainerNet, host_port: int, container_port: int) -> None:
        self._apply([f"add element {self.table} netin {{ {host_port} : {net.alloc.container_ip} . {container_port} }}"],
                    f"net in {host_port} -> {net.alloc.container_ip}:{container_port}")

    def remove_net_in(self, net: ContainerNet, host_port: int) -> None:
        """Drop one mapping; one that is gone already is not an error."""
        try:
            self.nft.run(f"delete element {self.table} netin {{ {host_port} }}\n")
        except NftError as err:
            if "No such file or directory" not in str(err):
                raise NetworkError(f"removing net in {host_port} of {net.handle}: {err}") from None

    def add_net_out(self, net: ContainerNet, rules: list[dict[str, Any]]) -> None:
        """All of ``rules`` in one transaction (ValueError for an invalid one, before any
        applies); ``net.net_out`` holds the rules applied before."""
        self._apply(self._net_out(net, rules, empty_chain=not net.net_out), f"net out for {net.handle}")

    def teardown(self) -> None:
        self._apply([f"add table {self.table}", f"delete table {self.table}"], "removing the firewall table")

    def list(self) -> dict[str, Any]:
        return self.nft.list_json(f"table {self.table}")


