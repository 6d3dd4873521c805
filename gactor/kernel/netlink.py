"""Links, addresses, routes and qdiscs of container networks, through pyroute2 from ONE thread.

pyroute2's sockets belong to the thread that made them, and configuring a container's
side means entering its network namespace with ``setns``: that must never happen on one
of trio's worker threads (they are reused by every task). So this module owns a
dedicated thread; ``Netlink.call`` queues a function for it and wakes the trio caller
with the outcome. Jobs run one at a time, in the order they were queued.

A container's veth is made with its peer directly inside the container's namespace
(``peer={"net_ns_fd": ...}``): moving an interface between namespaces costs an RCU
grace period (~18 ms here), creating it there costs ~1 ms. The container side is then
configured through a netlink socket opened while the thread sits in that namespace;
the thread returns to the host namespace before the job ends, whatever happens.

A container's veth is made and deleted with raw rtnetlink messages (``rtnl``): the
create's and the destroy's hot path, where pyroute2's Python doubled the cost.

Deleting a container's veth takes the kernel ~20 ms (it waits for RCU grace periods,
holding the rtnl lock a veth being made needs too); it runs in a second thread
(``delete_container_link``), handed over in queue order, so the next container's veth is
not made after it. Deletions that queue up meanwhile (50 destroys at once) go in one
request: the links are put in the server's deletion group and the group is deleted, one
set of waits for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import linux as L
from .netmodel import CONTAINER_IFNAME, ContainerNet, NetworkError
from .rtnl import Rtnl

T = TypeVar("T")
_Deliver = Callable[[outcome.Outcome[Any]], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], _Deliver]
# Addresses, flags and routes through ioctls on an AF_INET socket: microseconds each,
# where every pyroute2 request costs about a millisecond of Python.
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCSIFADDR, _SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
_SIOCADDRT, _SIOCBRADDIF = 0x890B, 0x89A2
_IFF_UP, _RTF_UP, _RTF_GATEWAY = 0x1, 0x1, 0x2
TBF_LATENCY_MS = 25  # queueing allowed before tbf drops (what `tc ... latency 25ms` gives)
_U32_MAX = 2**32 - 1


class Netlink:
    """The netlink thread. ``start()`` before use, ``close()`` at shutdown.

    ``deletion_group``: the link group (``IFLA_GROUP``, not 0) this server puts container
    veths in to delete them together; no other server on the host may use it
    (``netmodel.deletion_group`` derives it from the server's tag)."""

    def __init__(self, deletion_group: int) -> None:
        if not 0 < deletion_group < 2**32:
            raise ValueError(f"link group {deletion_group} is not a u32 other than 0")
        self._deletion_group = deletion_group
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._deletions: queue.SimpleQueue[tuple[str, _Deliver] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._deleter: threading.Thread | None = None
        self._host_ns = -1
        self._ipr: IPRoute | None = None
        self._rtnl: Rtnl | None = None

    def start(self) -> None:
        ready, deleter_ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name="gactor-netlink", daemon=True)
        self._thread.start()
        self._deleter = threading.Thread(target=self._delete_loop, args=(deleter_ready,),
                                         name="gactor-netlink-delete", daemon=True)
        self._deleter.start()
        ready.wait()
        deleter_ready.wait()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)
            self._thread = None
        if self._deleter is not None:
            self._deletions.put(None)  # after the netlink thread: it hands deletions over
            self._deleter.join(timeout=10)
            self._deleter = None

    def _loop(self, ready: threading.Event) -> None:
        self._host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._ipr = IPRoute()
        self._rtnl = Rtnl()
        ready.set()
        try:
            while (job := self._jobs.get()) is not None:
                fn, args, deliver = job
                deliver(outcome.capture(fn, *args))
        finally:
            self._rtnl.close()
            self._ipr.close()
            os.close(self._host_ns)

    def _delete_loop(self, ready: threading.Event) -> None:
        """The deletion thread: container veths only, with the thread's own socket (never
        in another namespace); whatever queued while it deleted goes in one request."""
        rtnl = Rtnl()
        ready.set()
        try:
            while (first := self._deletions.get()) is not None:
                batch, stop = [first], False
                while True:
                    try:
                        more = self._deletions.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._delete_batch(rtnl, batch)
                if stop:
                    return
        finally:
            rtnl.close()

    def _delete_batch(self, rtnl: Rtnl, batch: list[tuple[str, _Deliver]]) -> None:
        """Delete the links of ``batch``, delivering each outcome: one alone directly,
        several through the deletion group (one by one if the group cannot go at once)."""
        if len(batch) == 1:
            name, deliver = batch[0]
            deliver(outcome.capture(_delete_link, rtnl, name))
            return
        grouped = []
        for name, deliver in batch:
            try:
                rtnl.set_group(name, self._deletion_group)
            except OSError as err:
                if err.errno in (errno.ENODEV, errno.ENOENT):
                    deliver(outcome.Value(None))  # gone already
                else:
                    deliver(outcome.Error(NetworkError(f"deleting link {name}: {err}")))
                continue
            grouped.append((name, deliver))
        if not grouped:
            return
        try:
            rtnl.delete_group(self._deletion_group)
        except OSError:
            for name, deliver in grouped:
                deliver(outcome.capture(_delete_link, rtnl, name))
            return
        for _, deliver in grouped:
            deliver(outcome.Value(None))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the netlink thread. Cancelled: the job still runs to its
        end (later jobs, such as a rollback, queue behind it); only the wait stops."""
        value: T = await _await_job(lambda deliver: self._jobs.put((fn, args, deliver)))
        return value

    @property
    def ipr(self) -> IPRoute:
        assert self._ipr is not None
        assert threading.current_thread() is self._thread, "netlink thread only"
        return self._ipr

    @property
    def rtnl(self) -> Rtnl:
        assert self._rtnl is not None
        assert threading.current_thread() is self._thread, "netlink thread only"
        return self._rtnl

    def _inet_socket_in(self, netns_fd: int) -> socket.socket:
        """An AF_INET socket of the container's namespace (for ioctls on its interfaces)."""
        L.setns(netns_fd, L.CLONE_NEWNET)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        finally:
            L.setns(self._host_ns, L.CLONE_NEWNET)

    @contextlib.contextmanager
    def _inside(self, netns_fd: int) -> Any:
        """An IPRoute socket in the container's namespace (the thread returns to the host's)."""
        L.setns(netns_fd, L.CLONE_NEWNET)
        try:
            ipr = IPRoute()
        finally:
            L.setns(self._host_ns, L.CLONE_NEWNET)
        try:
            yield ipr
        finally:
            ipr.close()

    # ---- containers ------------------------------------------------------------------

    async def create_container_link(self, net: ContainerNet, netns_fd: int, bridge: str | None) -> None:
        """The veth ``net.host_ifname`` <-> eth0 (inside), addresses, MTU, default route.
        Raises NetworkError naming the step; on failure the veth is removed again."""
        await self.call(self._create_container_link, net, netns_fd, bridge)

    def _create_container_link(self, net: ContainerNet, netns_fd: int, bridge: str | None) -> None:
        rtnl, alloc, name = self.rtnl, net.alloc, net.host_ifname
        step = f"creating veth {name}"
        try:
            rtnl.add_veth(name, net.mtu, CONTAINER_IFNAME, netns_fd)
        except OSError as err:
            raise NetworkError(f"{step}: {err}") from None
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as host:
                if bridge is None:
                    step = f"addressing {name}"
                    _set_address(host, name, alloc.gateway_ip, alloc.subnet.prefixlen)
                else:
                    step = f"attaching {name} to bridge {bridge}"
                    fcntl.ioctl(host, _SIOCBRADDIF, struct.pack("16si20x", bridge.encode(), socket.if_nametoindex(name)))
                step = f"disabling IPv6 on {name}"
                disable_ipv6(name)
                step = f"bringing {name} up"
                _set_up(host, name)
            # NetIn from the host's loopback: DNATed packets keep their 127.0.0.1 source
            # until masqueraded, which the kernel only routes out of this link with this on.
            step = f"route_localnet on {name}"
            _write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
            step = "configuring the container's eth0"
            with self._inet_socket_in(netns_fd) as inside:
                _set_address(inside, CONTAINER_IFNAME, alloc.container_ip, alloc.subnet.prefixlen)
                _set_up(inside, CONTAINER_IFNAME)
                _add_default_route(inside, alloc.gateway_ip)
        except OSError as err:
            with contextlib.suppress(OSError):
                rtnl.delete_link(name)
            raise NetworkError(f"{step}: {err}") from None

    async def delete_link(self, name: str) -> None:
        """Remove a link (a veth takes its peer along); gone already is fine. Returns once
        the kernel has removed it."""
        await self.call(lambda: _delete_link(self.rtnl, name))

    async def delete_container_link(self, name: str) -> None:
        """``delete_link`` for a container's veth, in a thread of its own: the kernel takes
        ~20 ms to delete a veth (it waits for the device's last references), and the
        creates queued behind it would wait as long. Every job queued before this one still
        runs first: the hand-over to that thread is itself a job of the netlink thread.
        Returns once the kernel has removed the link; cancelled, the deletion still runs."""

        def submit(deliver: _Deliver) -> None:
            def hand_over() -> None:
                self._deletions.put((name, deliver))

            self._jobs.put((hand_over, (), lambda got: None))  # a queue put: it cannot fail

        await _await_job(submit)

    async def ensure_bridge(self, name: str, gateway: ipaddress.IPv4Address, prefixlen: int, mtu: int) -> None:
        """A static subnet's bridge, carrying its gateway address (kept if it exists)."""
        await self.call(self._ensure_bridge, name, gateway, prefixlen, mtu)

    def _ensure_bridge(self, name: str, gateway: ipaddress.IPv4Address, prefixlen: int, mtu: int) -> None:
        ipr = self.ipr
        if ipr.link_lookup(ifname=name):
            return
        try:
            ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
            index = ipr.link_lookup(ifname=name)[0]
            disable_ipv6(name)
            ipr.addr("add", index=index, address=str(gateway), prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            _write_sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
        except (NetlinkError, OSError, IndexError) as err:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", ifname=name)
            raise NetworkError(f"creating bridge {name}: {err}") from None

    async def delete_bridge(self, name: str) -> None:
        await self.delete_link(name)

    async def set_bandwidth(self, net: ContainerNet, netns_fd: int, rate: int, burst: int) -> None:
        """``tbf`` on both ends of the veth: the host end shapes what the container receives,
        eth0 (set from here: the container has no CAP_NET_ADMIN) what it sends. Rate 0
        removes both."""
        await self.call(self._set_bandwidth, net, netns_fd, rate, burst)

    def _set_bandwidth(self, net: ContainerNet, netns_fd: int, rate: int, burst: int) -> None:
        if rate > _U32_MAX:
            raise NetworkError(f"rate {rate} bytes/s is above the {_U32_MAX} tbf can express")
        # A token bucket smaller than one packet would never send it.
        burst = max(burst, net.mtu + 64)
        try:
            _shape(self.ipr, net.host_ifname, rate, burst)
            if netns_fd >= 0:
                with self._inside(netns_fd) as inside:
                    _shape(inside, CONTAINER_IFNAME, rate, burst)
        except (NetlinkError, IndexError) as err:
            raise NetworkError(f"tbf on {net.host_ifname}: {err}") from None

    async def list_links(self, prefix: str) -> list[str]:
        return await self.call(self._list_links, prefix)

    def _list_links(self, prefix: str) -> list[str]:
        names = (link.get_attr("IFLA_IFNAME") for link in self.ipr.get_links())
        return [name for name in names if name and name.startswith(prefix)]

    # ---- the host --------------------------------------------------------------------

    def default_route_mtu(self) -> int:
        """MTU of the host's default-route interface (1500 without one); netlink thread."""
        ipr = self.ipr
        for route in ipr.get_default_routes(family=2):
            oif = route.get_attr("RTA_OIF")
            if oif:
                link = ipr.get_links(oif)[0]
                return int(link.get_attr("IFLA_MTU"))
        return 1500

    def primary_address(self) -> str:
        """The first IPv4 address of the default-route interface ("" without one)."""
        ipr = self.ipr
        for route in ipr.get_default_routes(family=2):
            oif = route.get_attr("RTA_OIF")
            for addr in ipr.get_addr(family=2, index=oif) if oif else ():
                return str(addr.get_attr("IFA_ADDRESS"))
        return ""

    @staticmethod
    def enable_forwarding() -> None:
        """Containers' traffic is routed through the host (Docker does the same)."""
        _write_sysctl("net/ipv4/ip_forward", "1")


def _delete_link(rtnl: Rtnl, name: str) -> None:
    try:
        rtnl.delete_link(name)
    except OSError as err:
        if err.errno not in (errno.ENODEV, errno.ENOENT):
            raise NetworkError(f"deleting link {name}: {err}") from None


async def _await_job(submit: Callable[[_Deliver], None]) -> Any:
    """Hand a job to a thread (``submit`` queues it with the ``deliver`` callback the
    thread calls with its outcome) and wait for that outcome here."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[Any]] = []

    def deliver(got: outcome.Outcome[Any]) -> None:
        result.append(got)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    submit(deliver)
    await done.wait()
    return result[0].unwrap()


def link_stats(name: str) -> tuple[int, int]:
    """(rx, tx) bytes as the container sees them: the host end's tx is the container's rx."""
    base = f"/sys/class/net/{name}/statistics"
    try:
        with open(f"{base}/tx_bytes") as tx, open(f"{base}/rx_bytes") as rx:
            return int(tx.read()), int(rx.read())
    except OSError:
        return 0, 0


def _sockaddr(address: ipaddress.IPv4Address) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"", address.packed)


def _set_address(sock: socket.socket, ifname: str, address: ipaddress.IPv4Address, prefixlen: int) -> None:
    name = ifname.encode()
    fcntl.ioctl(sock, _SIOCSIFADDR, struct.pack("16s16s8x", name, _sockaddr(address)))
    mask = ipaddress.IPv4Network(f"0.0.0.0/{prefixlen}").netmask
    fcntl.ioctl(sock, _SIOCSIFNETMASK, struct.pack("16s16s8x", name, _sockaddr(mask)))


def _set_up(sock: socket.socket, ifname: str) -> None:
    request = struct.pack("16sH22x", ifname.encode(), 0)
    flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", ifname.encode(), flags | _IFF_UP))


def _add_default_route(sock: socket.socket, gateway: ipaddress.IPv4Address) -> None:
    """``struct rtentry`` (x86-64/aarch64 layout): pad, dst, gateway, genmask, flags, ..."""
    any_address = _sockaddr(ipaddress.IPv4Address(0))
    entry = struct.pack("=Q16s16s16sH6x", 0, any_address, _sockaddr(gateway), any_address,
                        _RTF_UP | _RTF_GATEWAY).ljust(120, b"\0")
    fcntl.ioctl(sock, _SIOCADDRT, entry)


def _shape(ipr: IPRoute, ifname: str, rate: int, burst: int) -> None:
    index = ipr.link_lookup(ifname=ifname)[0]
    with contextlib.suppress(NetlinkError):  # none set: nothing to remove
        ipr.tc("del", index=index, handle="1:", parent=0xFFFFFFFF)
    if rate:
        ipr.tc("add", "tbf", index=index, handle="1:", rate=f"{rate * 8}bit", burst=burst,
               latency=f"{TBF_LATENCY_MS}ms")


def disable_ipv6(ifname: str) -> None:
    """No IPv6 on a host end: the firewall is an IPv4 table, and with IPv6 on, a container
    reaches host services over the link-local address whatever --allow-host-access says.
    Set before the link is up, so no link-local address is ever configured; the kernel
    then drops every IPv6 packet arriving on it. A host without IPv6 has nothing to do."""
    try:
        _write_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
    except FileNotFoundError:
        if os.path.isdir("/proc/sys/net/ipv6"):
            raise


def _write_sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)
