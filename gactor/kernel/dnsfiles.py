"""The ``/etc/hosts`` and ``/etc/resolv.conf`` gactor writes into every container.

Pure functions of their inputs, in the form Guardian's kawasaki/dns compilers produce,
so containers can resolve ``localhost``, their own hostname and outside names even when
the rootfs ships neither file (GARDEN_REFERENCE.md §4.12, §5.2).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

HOSTNAME_MAX = 49  # Garden keeps the last 49 characters of a longer handle


def hosts_file(hostname: str, container_ip: str, *, container_ipv6: str | None = None,
               extra: Sequence[str] = ()) -> str:
    """``127.0.0.1 localhost``, then ``<container_ip> <hostname>``, then ``extra`` lines.

    As Guardian writes it: the IPv6 lines (``::1 localhost`` and the hostname's IPv6
    entry) only when the container has an IPv6 address, and ``hostname`` cut to its last
    49 characters (idempotent on a name already cut so).
    """
    hostname = hostname[-HOSTNAME_MAX:]
    lines = ["127.0.0.1 localhost"]
    if container_ipv6 is not None:
        lines.append("::1 localhost")
    lines.append(f"{container_ip} {hostname}")
    if container_ipv6 is not None:
        lines.append(f"{container_ipv6} {hostname}")
    lines.extend(extra)
    return "\n".join(lines) + "\n"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def resolv_conf(host_resolv_conf: str, gateway_ip: str, extra: Sequence[str] = (), *,
                servers: Sequence[str] = ()) -> str:
    """The container's resolv.conf, derived from the host's.

    ``servers`` (``--dns-server``) replace the host's file entirely; ``extra``
    (``--additional-dns-server``) are appended as nameservers in every case. Otherwise the
    host's lines are kept in order (search, options, comments) minus its loopback
    nameservers (127.0.0.0/8, ::1), which the container cannot reach; lines
    ``nameserver`` with other than one address are dropped, as Guardian does. A host
    with only loopback resolvers (systemd-resolved's 127.0.0.53, a local dnsmasq) gets
    ``gateway_ip`` in place of the first of them.

    Guardian substitutes the gateway only when the whole file is one loopback
    nameserver line and otherwise leaves such a container without any nameserver;
    gactor applies the substitution whenever no usable host nameserver remains.
    """
    if servers:
        return "".join(f"nameserver {server}\n" for server in [*servers, *extra])
    lines: list[str] = []
    loopback_at: int | None = None
    usable = 0
    for line in host_resolv_conf.strip().splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] != "nameserver":
            lines.append(line)
        elif len(fields) != 2:
            continue
        elif _loopback(fields[1]):
            loopback_at = len(lines) if loopback_at is None else loopback_at
        else:
            lines.append(f"nameserver {fields[1]}")
            usable += 1
    if usable == 0 and loopback_at is not None:
        lines.insert(loopback_at, f"nameserver {gateway_ip}")
    lines.extend(f"nameserver {server}" for server in extra)
    return "".join(f"{line}\n" for line in lines)
