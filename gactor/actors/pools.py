"""The address and port pools the registry actor owns (GARDEN_REFERENCE.md §5.3).

Plain synchronous state: no locks and no trio, because only the registry's task touches
it. ``SubnetPool`` hands out container addresses: a dynamic /30 from ``--network-pool``
or an address in a static subnet named by ``ContainerSpec.network``. ``PortPool`` is
Garden's FIFO of host ports for NetIn, persisted on every change so that a ``kill -9``
of the server never hands a port out twice.

Both pools refuse misuse with ``PoolError``; its messages are Garden's where Garden has
one, so the registry can pass them to the client unchanged.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import json
import os
from collections.abc import Iterable

from gactor.kernel.netmodel import Allocation, IPv4Address, IPv4Network

PORT_MAX = 65535


class PoolError(Exception):
    """An allocation was refused or the pools were misused; ``str()`` is Garden's text."""


def max_containers(pool: IPv4Network, limit: int = 0) -> int:
    """Capacity's ``max_containers`` (§5.7): the pool's /30 count, capped by a non-zero limit."""
    subnets = pool.num_addresses // 4
    return min(limit, subnets) if limit > 0 else subnets


def _gateway(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address + 1


def _parse_request(request: str) -> tuple[IPv4Network, IPv4Address | None]:
    """``ContainerSpec.network`` as (subnet, exact IP or None for "next free in the subnet").

    A bare address means a /30 (Garden's rule); the address of the subnet itself asks
    for the lowest free IP, any other address for exactly that one.
    """
    text = request if "/" in request else request + "/30"
    address, _, prefix = text.partition("/")
    # Python also takes "a.b.c.d/255.255.255.0" and non-ASCII digits; Go's ParseCIDR does not
    if not (prefix.isascii() and prefix.isdigit()) or len(prefix) > 2:
        raise PoolError(f"invalid CIDR address: {request}")
    try:
        interface = ipaddress.IPv4Interface(f"{address}/{int(prefix)}")
    except ValueError:
        raise PoolError(f"invalid CIDR address: {request}") from None
    subnet = interface.network
    return subnet, None if interface.ip == subnet.network_address else interface.ip


class SubnetPool:
    """Container addresses: dynamic /30s from ``pool`` and members of static subnets.

    An address is *live* from ``allocate``/``restore`` until ``release``, and *held* from
    ``hold`` until ``free_held``; it is handed out again only when it is neither. The
    container actor holds an allocation for as long as its links may still exist, so an
    address (and the link names derived from it) is never reused before they are gone::

        pool.hold(alloc); pool.release(alloc)   # destroy: links are being deleted
        ...                                     # veth gone
        pool.free_held(alloc)                   # the address may be handed out again
    """

    def __init__(self, pool: IPv4Network) -> None:
        self.pool = pool
        # container addresses as ints: ipaddress objects cost microseconds per operation
        self._live: dict[IPv4Network, set[int]] = {}
        self._held: dict[IPv4Network, set[int]] = {}
        self._dynamic: set[int] = set()  # indexes of the /30s with a live or held address
        self._static: set[IPv4Network] = set()  # static subnets with a live or held address
        # The lowest free /30 without a scan of the taken ones (a create must not get
        # slower with every container alive): every free index below _high is in _freed
        # (a heap; entries taken again since are dropped when met), none at _high or above.
        self._high = 0
        self._freed: list[int] = []
        self._in_freed: set[int] = set()

    def allocate(self, request: str) -> Allocation:
        """An address for ``ContainerSpec.network`` ``request`` ("" = the next free /30).

        Raises ``PoolError`` with Garden's message when the request is unparsable,
        overlaps the dynamic range or another subnet, names a reserved or taken IP, or
        when the pool or subnet is full.
        """
        if request == "":
            subnet = self._free_dynamic_subnet()  # a /30 has one container address: N+2
            alloc = Allocation(subnet, subnet.network_address + 2, False)
        else:
            subnet, ip = _parse_request(request)
            self._check_static_subnet(subnet)
            if ip is None:
                ip = self._lowest_free_ip(subnet)
            else:
                self._check_ip(subnet, ip)
            alloc = Allocation(subnet, ip, True)
        self._add(self._live, alloc)
        return alloc

    def restore(self, alloc: Allocation) -> None:
        """Take ``alloc`` back from a container record at startup.

        Raises ``PoolError`` if it conflicts with what was restored before or does not
        fit this pool (e.g. ``--network-pool`` changed since the record was written).
        """
        if alloc.bridged:
            self._check_static_subnet(alloc.subnet)
        elif alloc.subnet.prefixlen != 30 or not alloc.subnet.subnet_of(self.pool):
            raise PoolError(f"the restored subnet ({alloc.subnet}) is not a /30 of the dynamic "
                            f"allocation range ({self.pool})")
        self._check_ip(alloc.subnet, alloc.container_ip)
        self._add(self._live, alloc)

    def release(self, alloc: Allocation) -> int:
        """End ``alloc``'s use by its container; returns the subnet's remaining ``members``.

        The address stays unavailable while it is held. Raises ``PoolError`` if ``alloc``
        is not live.
        """
        if not self._remove(self._live, alloc):
            raise PoolError("subnet is not allocated")
        return self.members(alloc.subnet)

    def hold(self, alloc: Allocation) -> None:
        """Keep ``alloc``'s address from being handed out, even after ``release``.

        Call it while ``alloc`` is live (idempotent); raises ``PoolError`` otherwise, since
        a released address may already belong to another container.
        """
        ip = int(alloc.container_ip)
        if ip in self._held.get(alloc.subnet, ()):
            return
        if ip not in self._live.get(alloc.subnet, ()):
            raise PoolError("subnet is not allocated")
        self._add(self._held, alloc)

    def free_held(self, alloc: Allocation) -> None:
        """End ``hold``: once released too, the address may be handed out again."""
        if not self._remove(self._held, alloc):
            raise PoolError(f"the IP {alloc.container_ip} in {alloc.subnet} is not held")

    def capacity(self) -> int:
        """The number of /30s in the dynamic range."""
        return self.pool.num_addresses // 4

    def in_use(self) -> int:
        """Addresses that cannot be handed out now: live or held, dynamic or static."""
        return sum(len(self._taken(subnet)) for subnet in self._live.keys() | self._held.keys())

    def members(self, subnet: IPv4Network) -> int:
        """Live containers in ``subnet``; 0 after the last one left (its bridge may go)."""
        return len(self._live.get(subnet, ()))

    def _taken(self, subnet: IPv4Network) -> set[int]:
        return self._live.get(subnet, set()) | self._held.get(subnet, set())

    def _add(self, table: dict[IPv4Network, set[int]], alloc: Allocation) -> None:
        table.setdefault(alloc.subnet, set()).add(int(alloc.container_ip))
        self._occupancy_changed(alloc.subnet)

    def _remove(self, table: dict[IPv4Network, set[int]], alloc: Allocation) -> bool:
        ips = table.get(alloc.subnet)
        if ips is None or int(alloc.container_ip) not in ips:
            return False
        ips.discard(int(alloc.container_ip))
        if not ips:
            del table[alloc.subnet]
        self._occupancy_changed(alloc.subnet)
        return True

    def _occupancy_changed(self, subnet: IPv4Network) -> None:
        occupied = subnet in self._live or subnet in self._held
        offset = int(subnet.network_address) - int(self.pool.network_address)
        if not 0 <= offset < self.pool.num_addresses:  # static subnets never overlap the pool
            if occupied:
                self._static.add(subnet)
            else:
                self._static.discard(subnet)
        elif occupied:
            self._dynamic.add(offset // 4)
        else:
            index = offset // 4
            self._dynamic.discard(index)
            if index < self._high and index not in self._in_freed:
                heapq.heappush(self._freed, index)
                self._in_freed.add(index)

    def _free_dynamic_subnet(self) -> IPv4Network:
        """The lowest free /30 (the caller takes it), in O(log n)."""
        index = -1
        while self._freed and index < 0:
            candidate = heapq.heappop(self._freed)
            self._in_freed.discard(candidate)
            if candidate not in self._dynamic:  # else taken again since it was freed (restore)
                index = candidate
        if index < 0:
            while self._high in self._dynamic:  # restored ones above the mark
                self._high += 1
            if self._high >= self.capacity():
                raise PoolError("insufficient subnets remaining in the pool")
            index = self._high
        return IPv4Network((int(self.pool.network_address) + 4 * index, 30))

    def _check_static_subnet(self, subnet: IPv4Network) -> None:
        if subnet.overlaps(self.pool):
            raise PoolError(f"the requested subnet ({subnet}) overlaps the dynamic allocation "
                            f"range ({self.pool})")
        # an equal subnet is shared (one bridge); any other overlap would clash in routing
        for existing in sorted(self._static):
            if existing != subnet and existing.overlaps(subnet):
                raise PoolError(f"the requested subnet ({subnet}) overlaps an existing subnet "
                                f"({existing})")

    def _check_ip(self, subnet: IPv4Network, ip: IPv4Address) -> None:
        # Garden's order: broadcast, gateway, containment, then taken (network included)
        if ip == subnet.broadcast_address:
            raise PoolError("a container IP must not equal the broadcast IP")
        if ip == _gateway(subnet):
            raise PoolError("a container IP must not equal the gateway IP")
        if ip not in subnet:
            raise PoolError("the requested IP is not within the subnet")
        if ip == subnet.network_address or int(ip) in self._taken(subnet):
            raise PoolError("the requested IP is already allocated")

    def _lowest_free_ip(self, subnet: IPv4Network) -> IPv4Address:
        network, broadcast = int(subnet.network_address), int(subnet.broadcast_address)
        unavailable = self._taken(subnet) | {network, network + 1, broadcast}
        # at most len(unavailable) steps, whatever the subnet's size
        for value in range(network, broadcast + 1):
            if value not in unavailable:
                return IPv4Address(value)
        raise PoolError("insufficient IPs remaining in the pool")


class PortPool:
    """Host ports for NetIn: ``size`` ports from ``start``, handed out first in, first out.

    ``acquire`` takes the head of the queue and ``release`` appends to its tail, so a
    freed port is reused as late as possible. Explicitly requested host ports are
    ``reserve``d instead: counted, never taken from the head, and kept out of the queue
    while any user holds them (Garden itself does not reserve them). A port in use has a
    user count; two NetIns on one explicit port are two users.

    The queue order is written to ``state_path`` (temp file, fsync, rename) before every
    method that changed it returns. A new ``PortPool`` on the same file keeps every port
    that was out of the queue at the crash out of it until ``restore`` says which of
    them are still in use, so a ``kill -9`` at any point never hands a port out twice.
    The directory is not fsynced: a rename lost to a host crash leaves an older queue,
    and ``restore`` takes the ports of the surviving records out of it all the same.
    """

    def __init__(self, start: int, size: int, state_path: str) -> None:
        if start < 1 or size < 0 or start + size > PORT_MAX:
            raise PoolError(f"invalid port range: start {start}, size {size}")
        self.start, self.size, self.state_path = start, size, state_path
        self._users: dict[int, int] = {}
        self._restored = False
        persisted = self._load()
        # the queue as runs of consecutive ports, head first: a rotation of the range plus
        # the released ports is a few runs, so saving it costs little whatever the size
        self._runs: collections.deque[list[int]] = collections.deque()
        self._queued: set[int] = set()
        for port in range(start, start + size) if persisted is None else persisted:
            if port not in self._queued:  # a hand-edited file may repeat a port
                self._push(port)
        # out of the queue at the crash: in use, or acquired without reaching a record
        self._unclaimed = set(range(start, start + size)) - self._queued
        self._save()

    def acquire(self) -> int:
        """The port at the head of the queue; raises ``PoolError`` when none is free."""
        if not self._runs:
            raise PoolError("port pool is exhausted")
        head = self._runs[0]
        port = head[0]
        if head[0] == head[1]:
            self._runs.popleft()
        else:
            head[0] += 1
        self._queued.discard(port)
        try:
            self._save()
        except BaseException:
            self._queued.add(port)
            if self._runs and self._runs[0][0] == port + 1:
                self._runs[0][0] = port
            else:
                self._runs.appendleft([port, port])
            raise
        self._users[port] = 1
        return port

    def reserve(self, port: int) -> None:
        """Count a user of an explicitly requested host ``port``; it is not handed out
        until every user released it. Raises ``PoolError`` for a port outside 1-65535."""
        if self._count_user(port):
            try:
                self._save()
            except BaseException:
                self._drop_user(port)  # back in memory, at the tail; the file never lost it
                raise

    def release(self, port: int) -> None:
        """Drop one user of ``port``; the last one returns it to the tail of the queue if
        it lies in the range. Releasing a port nobody uses does nothing (as in Garden),
        also before ``restore`` for a port that was out of the queue at the crash."""
        if self._drop_user(port):
            self._save()

    def restore(self, in_use: Iterable[int]) -> None:
        """Once, at startup: the host ports of every restored NetIn (one entry per mapping).

        Ports out of the queue that no record names return to its tail, in ascending
        order. Raises ``PoolError`` when called twice or for an invalid port.
        """
        if self._restored:
            raise PoolError("the port pool was already restored")
        ports = list(in_use)
        for port in ports:
            if not 1 <= port <= PORT_MAX:
                raise PoolError(f"invalid port: {port}")
        self._restored = True
        for port in ports:
            self._count_user(port)
        for port in sorted(self._unclaimed):
            self._push(port)
        self._unclaimed.clear()
        self._save()

    def available(self) -> int:
        """Ports ``acquire`` can still hand out."""
        return len(self._queued)

    def users(self, port: int) -> int:
        """How many NetIns use host ``port`` (0 = free)."""
        return self._users.get(port, 0)

    def _count_user(self, port: int) -> bool:
        """One more user of ``port``; True if that took it out of the queue."""
        if not 1 <= port <= PORT_MAX:
            raise PoolError(f"invalid port: {port}")
        self._unclaimed.discard(port)
        self._users[port] = self._users.get(port, 0) + 1
        if port not in self._queued:
            return False
        self._queued.discard(port)
        for index, run in enumerate(self._runs):
            if run[0] <= port <= run[1]:
                if run[0] == run[1]:
                    del self._runs[index]
                elif port == run[0]:
                    run[0] += 1
                elif port == run[1]:
                    run[1] -= 1
                else:
                    self._runs.insert(index + 1, [port + 1, run[1]])
                    run[1] = port - 1
                break
        return True

    def _drop_user(self, port: int) -> bool:
        """One user less of ``port``; True if that put it back in the queue."""
        users = self._users.get(port, 0)
        if users > 1:
            self._users[port] = users - 1
        elif users == 1:
            del self._users[port]
            if self._in_range(port):
                self._push(port)
                return True
        return False

    def _push(self, port: int) -> None:
        """Append ``port`` to the tail of the queue."""
        if self._runs and self._runs[-1][1] + 1 == port:
            self._runs[-1][1] = port
        else:
            self._runs.append([port, port])
        self._queued.add(port)

    def _in_range(self, port: int) -> bool:
        return self.start <= port < self.start + self.size

    def _load(self) -> list[int] | None:
        try:
            with open(self.state_path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise PoolError(f"reading port pool state {self.state_path}: {e}") from e
        end = self.start + self.size - 1
        try:  # clipped to the range, which may have changed since the file was written
            return [port for first, last in raw["queue"]
                    for port in range(max(int(first), self.start), min(int(last), end) + 1)]
        except (KeyError, TypeError, ValueError) as e:
            raise PoolError(f"parsing port pool state {self.state_path}: {e!r}") from e

    def _save(self) -> None:
        """Persist the queue's runs; raises ``PoolError`` if the file cannot be written."""
        data = json.dumps({"queue": list(self._runs)}, separators=(",", ":")).encode()
        tmp = self.state_path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.state_path)
        except OSError as e:
            raise PoolError(f"writing port pool state {self.state_path}: {e}") from e
