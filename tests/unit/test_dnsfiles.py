"""The /etc/hosts and /etc/resolv.conf contents (Guardian's kawasaki/dns compilers)."""

from __future__ import annotations

import pytest

from gactor.kernel.dnsfiles import hosts_file, resolv_conf

GATEWAY = "10.254.0.1"

SYSTEMD_RESOLVED_STUB = """\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
# Do not edit.

nameserver 127.0.0.53
options edns0 trust-ad
search .
"""


def test_hosts_file() -> None:
    assert hosts_file("my-handle", "10.254.0.2") == "127.0.0.1 localhost\n10.254.0.2 my-handle\n"


def test_hosts_file_keeps_the_last_49_characters() -> None:
    handle = "too-looooong-haaaaaaaaaaaaaannnnnndddle-1234456787889"
    assert hosts_file(handle, "10.254.0.2").splitlines()[1] == (
        "10.254.0.2 looooong-haaaaaaaaaaaaaannnnnndddle-1234456787889")
    assert hosts_file(handle[-49:], "10.254.0.2") == hosts_file(handle, "10.254.0.2")


def test_hosts_file_ipv6_and_extra_entries() -> None:
    text = hosts_file("h", "10.254.0.2", container_ipv6="fd00::2", extra=["1.2.3.4 foo", "2.3.4.5 bar"])
    assert text == ("127.0.0.1 localhost\n::1 localhost\n10.254.0.2 h\nfd00::2 h\n"
                    "1.2.3.4 foo\n2.3.4.5 bar\n")


@pytest.mark.parametrize(("host", "expected"), [
    ("nameserver 1.2.3.4\n", "nameserver 1.2.3.4\n"),
    ("nameserver 1.2.3.4\narbitrary text\n", "nameserver 1.2.3.4\narbitrary text\n"),
    # loopback resolvers (127.0.0.0/8, ::1) are unreachable from the container
    ("nameserver 1.2.3.4\nnameserver 127.0.0.19\nnameserver 127.0.18.19\nnameserver 127.17.0.19\n"
     "nameserver ::1\n", "nameserver 1.2.3.4\n"),
    ("nameserver 1.2.3.4\nnameserver 127.0.0.1\nsearch hey", "nameserver 1.2.3.4\nsearch hey\n"),
    ("nameserver 1.2.3.4\nnameserver 127.0.0.1\nnameserver 127.0.2.1\nnameserver 5.6.7.8\n",
     "nameserver 1.2.3.4\nnameserver 5.6.7.8\n"),
    # only a loopback resolver: the gateway takes its place
    ("nameserver 127.0.0.19\n", f"nameserver {GATEWAY}\n"),
    ("  nameserver 127.0.0.1  \n\n", f"nameserver {GATEWAY}\n"),
    ("search corp\nnameserver 127.0.0.1\nnameserver ::1\noptions ndots:2\n",
     f"search corp\nnameserver {GATEWAY}\noptions ndots:2\n"),
    (SYSTEMD_RESOLVED_STUB,
     "# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).\n"
     f"# Do not edit.\nnameserver {GATEWAY}\noptions edns0 trust-ad\nsearch .\n"),
    # nothing usable and no loopback resolver either: nothing to substitute
    ("", ""),
    ("arbitrary text\n", "arbitrary text\n"),
    # a nameserver line with other than one address is dropped
    ("nameserver\nnameserver 1.2.3.4 5.6.7.8\nnameserver 9.9.9.9\n", "nameserver 9.9.9.9\n"),
    ("nameserver\tfd00::53\n", "nameserver fd00::53\n"),
])
def test_resolv_conf_from_the_host(host: str, expected: str) -> None:
    assert resolv_conf(host, GATEWAY) == expected


def test_additional_servers_are_appended() -> None:
    assert resolv_conf("nameserver 1.2.3.4\narbitrary text\n", GATEWAY, ["10.0.0.1", "10.0.0.2"]) == (
        "nameserver 1.2.3.4\narbitrary text\nnameserver 10.0.0.1\nnameserver 10.0.0.2\n")
    assert resolv_conf("nameserver 127.0.0.53\n", GATEWAY, ["10.0.0.1"]) == (
        f"nameserver {GATEWAY}\nnameserver 10.0.0.1\n")


def test_operator_servers_replace_the_host_file() -> None:
    assert resolv_conf("nameserver 1.2.3.4\nsearch hey\n", GATEWAY, ["10.0.0.1", "10.0.0.2"],
                       servers=["10.0.0.3"]) == (
        "nameserver 10.0.0.3\nnameserver 10.0.0.1\nnameserver 10.0.0.2\n")
    assert resolv_conf("nameserver 1.2.3.4\n", GATEWAY, servers=["10.0.0.1", "10.0.0.2"]) == (
        "nameserver 10.0.0.1\nnameserver 10.0.0.2\n")


def test_this_hosts_resolv_conf_yields_a_nameserver() -> None:
    with open("/etc/resolv.conf") as f:
        host = f.read()
    if "nameserver" not in host:
        pytest.skip("this host's resolv.conf names no nameserver")
    text = resolv_conf(host, GATEWAY)
    nameservers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver ")]
    assert nameservers
    assert not any(ns.startswith("127.") or ns == "::1" for ns in nameservers)
