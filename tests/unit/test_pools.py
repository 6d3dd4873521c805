"""Subnet and port pools (GARDEN_REFERENCE.md §5.3, §5.7): Garden's choices and messages."""

from __future__ import annotations

import collections
import json
import os
import random
import tempfile
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gactor.actors.pools import PoolError, PortPool, SubnetPool, max_containers
from gactor.kernel.netmodel import Allocation

POOL = IPv4Network("10.254.0.0/22")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


# ---- SubnetPool: dynamic /30s ------------------------------------------------------------


def test_first_dynamic_allocation_is_the_pools_first_slash30() -> None:
    alloc = SubnetPool(POOL).allocate("")
    assert alloc == Allocation(net("10.254.0.0/30"), ip("10.254.0.2"), False)
    assert alloc.gateway_ip == ip("10.254.0.1")


def test_dynamic_allocations_scan_upwards_and_reuse_the_lowest_free() -> None:
    pool = SubnetPool(POOL)
    allocs = [pool.allocate("") for _ in range(3)]
    assert [str(a.container_ip) for a in allocs] == ["10.254.0.2", "10.254.0.6", "10.254.0.10"]
    pool.release(allocs[0])
    assert pool.allocate("").container_ip == ip("10.254.0.2")
    assert pool.allocate("").container_ip == ip("10.254.0.14")


def test_dynamic_allocation_is_always_the_lowest_free_slash30() -> None:
    """Against a scan of the pool (the reference): allocations, releases, holds and
    restores in a random order, the pool exhausted and refilled."""
    rng = random.Random(7)
    small = net("10.9.0.0/26")  # 16 /30s
    pool = SubnetPool(small)
    live: list[Allocation] = []
    held: list[Allocation] = []

    def lowest_free() -> IPv4Network | None:
        taken = {a.subnet for a in live + held}
        return next((s for s in small.subnets(new_prefix=30) if s not in taken), None)

    for _ in range(2000):
        action = rng.random()
        if action < 0.5:
            expected = lowest_free()
            if expected is None:
                with pytest.raises(PoolError, match="insufficient subnets"):
                    pool.allocate("")
            else:
                live.append(pool.allocate(""))
                assert live[-1].subnet == expected
        elif action < 0.75 and live:
            alloc = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.3:
                pool.hold(alloc)
                held.append(alloc)
            pool.release(alloc)
        elif action < 0.9 and held:
            pool.free_held(held.pop(rng.randrange(len(held))))
        elif (free := [s for s in small.subnets(new_prefix=30) if s not in {a.subnet for a in live + held}]):
            subnet = rng.choice(free)  # a container record at startup, anywhere in the pool
            alloc = Allocation(subnet, subnet.network_address + 2, False)
            pool.restore(alloc)
            live.append(alloc)


class _CountingSet(set[int]):
    lookups = 0

    def __contains__(self, item: object) -> bool:
        _CountingSet.lookups += 1
        return super().__contains__(item)


def test_dynamic_allocation_does_not_scan_the_taken_slash30s() -> None:
    """A create must not get slower with every container alive (issue 8): the next free
    /30 is found without looking at each taken one."""
    pool = SubnetPool(net("10.0.0.0/16"))
    pool._dynamic = _CountingSet()
    allocs = [pool.allocate("") for _ in range(5000)]
    pool.release(allocs[10])
    _CountingSet.lookups = 0
    assert pool.allocate("").subnet == allocs[10].subnet
    assert pool.allocate("").subnet == net("10.0.78.32/30")  # the 5001st
    assert _CountingSet.lookups <= 4


def test_pool_exhaustion() -> None:
    pool = SubnetPool(net("10.9.0.0/29"))
    assert pool.capacity() == 2
    pool.allocate("")
    pool.allocate("")
    with pytest.raises(PoolError, match="^insufficient subnets remaining in the pool$"):
        pool.allocate("")
    assert pool.in_use() == 2


def test_capacity_and_max_containers() -> None:
    assert SubnetPool(POOL).capacity() == 256
    assert max_containers(POOL) == 256
    assert max_containers(POOL, 250) == 250
    assert max_containers(POOL, 1000) == 256
    assert max_containers(net("10.0.0.0/31")) == 0


# ---- SubnetPool: static subnets and IPs --------------------------------------------------


def test_subnet_request_hands_out_the_lowest_free_ips() -> None:
    pool = SubnetPool(POOL)
    a, b = pool.allocate("192.168.12.0/24"), pool.allocate("192.168.12.0/24")
    assert a == Allocation(net("192.168.12.0/24"), ip("192.168.12.2"), True)
    assert b.container_ip == ip("192.168.12.3")
    assert a.gateway_ip == ip("192.168.12.1")
    assert pool.members(net("192.168.12.0/24")) == 2
    assert pool.release(a) == 1
    assert pool.allocate("192.168.12.0/24").container_ip == ip("192.168.12.2")


def test_full_subnet() -> None:
    pool = SubnetPool(POOL)
    assert pool.allocate("192.168.1.0/30").container_ip == ip("192.168.1.2")
    with pytest.raises(PoolError, match="^insufficient IPs remaining in the pool$"):
        pool.allocate("192.168.1.0/30")


def test_exact_ip_requests() -> None:
    pool = SubnetPool(POOL)
    assert pool.allocate("192.168.2.9/24") == Allocation(net("192.168.2.0/24"), ip("192.168.2.9"), True)
    # a subnet request skips the taken .9 only when it reaches it
    assert pool.allocate("192.168.2.0/24").container_ip == ip("192.168.2.2")


def test_bare_address_is_a_slash30() -> None:
    alloc = SubnetPool(POOL).allocate("192.168.3.6")
    assert alloc == Allocation(net("192.168.3.4/30"), ip("192.168.3.6"), True)


@pytest.mark.parametrize(("request_", "message"), [
    ("192.168.4.1/24", "a container IP must not equal the gateway IP"),
    ("192.168.4.255/24", "a container IP must not equal the broadcast IP"),
    ("192.168.4.5", "a container IP must not equal the gateway IP"),
    ("192.168.4.7", "a container IP must not equal the broadcast IP"),
    ("192.168.4.9/31", "a container IP must not equal the broadcast IP"),
    ("192.168.4.9/32", "insufficient IPs remaining in the pool"),  # .9 is the network address
    ("10.254.0.0/24", "the requested subnet (10.254.0.0/24) overlaps the dynamic allocation range (10.254.0.0/22)"),
    ("10.254.3.7/30", "the requested subnet (10.254.3.4/30) overlaps the dynamic allocation range (10.254.0.0/22)"),
    ("10.0.0.0/8", "the requested subnet (10.0.0.0/8) overlaps the dynamic allocation range (10.254.0.0/22)"),
])
def test_request_errors(request_: str, message: str) -> None:
    pool = SubnetPool(POOL)
    with pytest.raises(PoolError) as info:
        pool.allocate(request_)
    assert str(info.value) == message
    assert pool.in_use() == 0


def test_taken_ip() -> None:
    pool = SubnetPool(POOL)
    pool.allocate("192.168.5.2/24")
    with pytest.raises(PoolError, match="^the requested IP is already allocated$"):
        pool.allocate("192.168.5.2/24")


def test_overlapping_static_subnets() -> None:
    pool = SubnetPool(POOL)
    pool.allocate("192.168.6.0/24")
    pool.allocate("192.168.6.0/24")  # equal: shared
    with pytest.raises(PoolError) as info:
        pool.allocate("192.168.6.128/25")
    assert str(info.value) == "the requested subnet (192.168.6.128/25) overlaps an existing subnet (192.168.6.0/24)"
    with pytest.raises(PoolError) as info:
        pool.allocate("192.168.0.0/16")
    assert str(info.value) == "the requested subnet (192.168.0.0/16) overlaps an existing subnet (192.168.6.0/24)"


@pytest.mark.parametrize("request_", [
    "nonsense", "192.168.1.0/33", "192.168.1.0/24/1", "192.168.1.300", "192.168.1.0/255.255.255.0",
    " 192.168.1.2", "192.168.1.2/24 ", "192.168.1.2/", "fd00::2/64", "192.168.1.2/\u00b2", "010.1.1.2",
])
def test_unparsable_requests_name_the_input(request_: str) -> None:
    with pytest.raises(PoolError) as info:
        SubnetPool(POOL).allocate(request_)
    assert str(info.value) == f"invalid CIDR address: {request_}"


# ---- SubnetPool: release, hold, restore --------------------------------------------------


def test_release_of_unallocated() -> None:
    pool = SubnetPool(POOL)
    alloc = pool.allocate("")
    pool.release(alloc)
    with pytest.raises(PoolError, match="^subnet is not allocated$"):
        pool.release(alloc)
    with pytest.raises(PoolError, match="^subnet is not allocated$"):
        pool.hold(alloc)


def test_held_dynamic_subnet_is_not_reused_until_freed() -> None:
    pool = SubnetPool(POOL)
    first = pool.allocate("")
    pool.hold(first)
    pool.hold(first)  # idempotent
    assert pool.release(first) == 0
    assert pool.in_use() == 1
    assert pool.allocate("").container_ip == ip("10.254.0.6")
    pool.free_held(first)
    assert pool.allocate("") == first
    with pytest.raises(PoolError, match=r"^the IP 10\.254\.0\.2 in 10\.254\.0\.0/30 is not held$"):
        pool.free_held(first)


def test_held_static_ip_and_subnet() -> None:
    pool = SubnetPool(POOL)
    a = pool.allocate("192.168.7.0/24")
    pool.hold(a)
    assert pool.release(a) == 0  # no live member: the bridge may go
    assert pool.members(a.subnet) == 0
    with pytest.raises(PoolError, match="^the requested IP is already allocated$"):
        pool.allocate("192.168.7.2/24")
    with pytest.raises(PoolError, match="overlaps an existing subnet"):
        pool.allocate("192.168.7.0/25")  # the held subnet still routes
    assert pool.allocate("192.168.7.0/24").container_ip == ip("192.168.7.3")
    pool.free_held(a)
    assert pool.allocate("192.168.7.0/24").container_ip == ip("192.168.7.2")


def test_free_held_before_release_keeps_it_live() -> None:
    pool = SubnetPool(POOL)
    a = pool.allocate("")
    pool.hold(a)
    pool.free_held(a)
    assert pool.allocate("").container_ip == ip("10.254.0.6")
    pool.release(a)
    assert pool.allocate("") == a


def test_restore_takes_records_back() -> None:
    pool = SubnetPool(POOL)
    dynamic = Allocation(net("10.254.0.4/30"), ip("10.254.0.6"), False)
    static = Allocation(net("192.168.8.0/24"), ip("192.168.8.2"), True)
    pool.restore(dynamic)
    pool.restore(static)
    assert pool.in_use() == 2
    assert pool.allocate("").container_ip == ip("10.254.0.2")
    assert pool.allocate("").container_ip == ip("10.254.0.10")
    assert pool.allocate("192.168.8.0/24").container_ip == ip("192.168.8.3")
    assert pool.members(static.subnet) == 2


@pytest.mark.parametrize(("alloc", "message"), [
    (Allocation(net("10.254.0.0/30"), ip("10.254.0.2"), False), "the requested IP is already allocated"),
    (Allocation(net("192.168.9.0/24"), ip("192.168.9.2"), True), "the requested IP is already allocated"),
    (Allocation(net("192.168.9.0/25"), ip("192.168.9.3"), True),
     "the requested subnet (192.168.9.0/25) overlaps an existing subnet (192.168.9.0/24)"),
    (Allocation(net("192.168.9.0/24"), ip("192.168.10.3"), True), "the requested IP is not within the subnet"),
    (Allocation(net("192.168.9.0/24"), ip("192.168.9.1"), True), "a container IP must not equal the gateway IP"),
    (Allocation(net("10.254.0.0/24"), ip("10.254.0.2"), True),
     "the requested subnet (10.254.0.0/24) overlaps the dynamic allocation range (10.254.0.0/22)"),
    (Allocation(net("10.200.0.0/30"), ip("10.200.0.2"), False),
     "the restored subnet (10.200.0.0/30) is not a /30 of the dynamic allocation range (10.254.0.0/22)"),
    (Allocation(net("10.254.0.0/29"), ip("10.254.0.2"), False),
     "the restored subnet (10.254.0.0/29) is not a /30 of the dynamic allocation range (10.254.0.0/22)"),
])
def test_restore_conflicts(alloc: Allocation, message: str) -> None:
    pool = SubnetPool(POOL)
    pool.restore(Allocation(net("10.254.0.0/30"), ip("10.254.0.2"), False))
    pool.restore(Allocation(net("192.168.9.0/24"), ip("192.168.9.2"), True))
    with pytest.raises(PoolError) as info:
        pool.restore(alloc)
    assert str(info.value) == message
    assert pool.in_use() == 2


def test_restore_round_trips_the_record_form() -> None:
    pool = SubnetPool(POOL)
    alloc = pool.allocate("192.168.11.0/24")
    again = SubnetPool(POOL)
    again.restore(Allocation.from_record(json.loads(json.dumps(alloc.to_record()))))
    assert again.allocate("192.168.11.0/24").container_ip == ip("192.168.11.3")


# ---- SubnetPool: random sequences --------------------------------------------------------

REQUESTS = ["", "", "", "192.168.20.0/29", "192.168.20.0/29", "192.168.20.3/29", "192.168.20.6/29",
            "192.168.21.2", "192.168.21.0/30", "192.168.20.0/28", "192.168.20.8/29", "10.99.0.0/28"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allocate", "release", "hold", "free"]),
                          st.integers(0, len(REQUESTS) - 1)), max_size=60))
def test_random_sequences_never_hand_out_an_address_twice(ops: list[tuple[str, int]]) -> None:
    pool = SubnetPool(net("10.99.0.0/28"))  # four /30s: exhaustion happens often
    live: list[Allocation] = []
    held: list[Allocation] = []
    for op, n in ops:
        if op == "allocate":
            try:
                alloc = pool.allocate(REQUESTS[n])
            except PoolError as e:
                refusal = str(e)
            else:
                refusal = ""
            if refusal:
                assert refusal.startswith(("insufficient", "the requested", "a container IP")), refusal
                assert pool.in_use() == len({a.container_ip for a in live + held})
                continue
            taken = {a.container_ip for a in live + held}
            assert alloc.container_ip not in taken
            assert alloc.container_ip in alloc.subnet
            assert alloc.container_ip not in {alloc.subnet.network_address, alloc.gateway_ip,
                                              alloc.subnet.broadcast_address}
            assert alloc.bridged == (REQUESTS[n] != "")
            live.append(alloc)
        elif op == "release" and live:
            alloc = live.pop(n % len(live))
            assert pool.release(alloc) == sum(a.subnet == alloc.subnet for a in live)
        elif op == "hold" and live:
            alloc = live[n % len(live)]
            pool.hold(alloc)
            if alloc not in held:
                held.append(alloc)
        elif op == "free" and held:
            pool.free_held(held.pop(n % len(held)))
        assert pool.in_use() == len({a.container_ip for a in live + held})


# ---- PortPool -----------------------------------------------------------------------------


def test_fifo_order(tmp_path: os.PathLike[str]) -> None:
    pool = PortPool(61001, 5, f"{tmp_path}/ports.json")
    assert [pool.acquire() for _ in range(3)] == [61001, 61002, 61003]
    pool.release(61002)
    pool.release(61001)
    assert [pool.acquire() for _ in range(4)] == [61004, 61005, 61002, 61001]
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        pool.acquire()
    assert pool.available() == 0


def test_invalid_ranges(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(PoolError, match="^invalid port range: start 61001, size 4535$"):
        PortPool(61001, 4535, f"{tmp_path}/ports.json")
    with pytest.raises(PoolError, match="^invalid port range: start 0, size 10$"):
        PortPool(0, 10, f"{tmp_path}/ports.json")
    assert PortPool(61001, 4534, f"{tmp_path}/ports.json").available() == 4534


def test_reserved_ports_are_never_handed_out(tmp_path: os.PathLike[str]) -> None:
    pool = PortPool(61001, 3, f"{tmp_path}/ports.json")
    pool.reserve(61002)
    pool.reserve(61002)  # a second NetIn on the same explicit port
    pool.reserve(8080)  # outside the range: counted, never queued
    assert [pool.acquire(), pool.acquire()] == [61001, 61003]
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        pool.acquire()
    pool.release(61002)
    assert pool.users(61002) == 1
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        pool.acquire()
    pool.release(61002)
    pool.release(8080)
    pool.release(8080)  # nobody uses it: nothing happens
    assert pool.users(8080) == 0
    assert pool.acquire() == 61002
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        pool.acquire()
    with pytest.raises(PoolError, match="^invalid port: 65536$"):
        pool.reserve(65536)


def test_state_survives_a_crash(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    pool = PortPool(61001, 6, path)
    assert [pool.acquire() for _ in range(4)] == [61001, 61002, 61003, 61004]
    assert PortPool(61001, 6, path).acquire() == 61005  # the last acquire reached the file
    pool.release(61002)
    # kill -9: no close, no flush; a new pool reads only the file
    again = PortPool(61001, 6, path)
    assert [again.acquire() for _ in range(3)] == [61005, 61006, 61002]
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        again.acquire()  # 61001, 61003, 61004 are unclaimed until restore


def test_restore_returns_only_unrecorded_ports(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    pool = PortPool(61001, 6, path)
    for _ in range(4):
        pool.acquire()
    pool.reserve(61005)
    again = PortPool(61001, 6, path)
    # records: 61003 and 61005 mapped (61005 twice); 61001/61002/61004 never reached a record
    again.restore([61003, 61005, 61005, 9000])
    assert [again.acquire() for _ in range(4)] == [61006, 61001, 61002, 61004]
    with pytest.raises(PoolError, match="^port pool is exhausted$"):
        again.acquire()
    assert again.users(61005) == 2
    assert again.users(9000) == 1
    with pytest.raises(PoolError, match="^the port pool was already restored$"):
        again.restore([])


def test_restore_rejects_invalid_ports_without_change(tmp_path: os.PathLike[str]) -> None:
    pool = PortPool(61001, 2, f"{tmp_path}/ports.json")
    with pytest.raises(PoolError, match="^invalid port: 0$"):
        pool.restore([61001, 0])
    assert pool.users(61001) == 0
    pool.restore([61001])
    assert pool.acquire() == 61002


def test_state_file_is_written_atomically_and_compactly(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    pool = PortPool(61001, 4534, path)
    with open(path) as f:
        assert json.load(f) == {"queue": [[61001, 65534]]}
    pool.acquire()
    pool.acquire()
    pool.release(61001)
    with open(path) as f:
        assert json.load(f) == {"queue": [[61003, 65534], [61001, 61001]]}
    assert sorted(os.listdir(tmp_path)) == ["ports.json"]  # no temp file left behind


def test_range_change_across_restart(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    pool = PortPool(61001, 4, path)
    pool.acquire()
    again = PortPool(61003, 4, path)  # 61001-61002 dropped; 61005-61006 are new
    assert [again.acquire(), again.acquire()] == [61003, 61004]
    again.restore([])
    assert [again.acquire(), again.acquire()] == [61005, 61006]


def test_unreadable_state_file(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    with open(path, "w") as f:
        f.write('{"queue": 3}')
    with pytest.raises(PoolError, match="^parsing port pool state "):
        PortPool(61001, 4, path)
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(PoolError, match="^reading port pool state "):
        PortPool(61001, 4, path)


def test_unwritable_state_leaves_the_port_in_the_queue(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/sub/ports.json"
    os.mkdir(f"{tmp_path}/sub")
    pool = PortPool(61001, 2, path)
    os.rename(f"{tmp_path}/sub", f"{tmp_path}/gone")  # root ignores modes: take the directory away
    with pytest.raises(PoolError, match="^writing port pool state "):
        pool.acquire()
    os.rename(f"{tmp_path}/gone", f"{tmp_path}/sub")
    assert pool.acquire() == 61001


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acquire", "reserve", "release", "crash"]),
                          st.integers(0, 11)), max_size=40))
def test_random_port_sequences_never_reissue_a_port_in_use(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory(prefix="net-pools-") as tmp:
        path = f"{tmp}/ports.json"
        pool = PortPool(61001, 8, path)
        mappings: list[int] = []  # one entry per live NetIn, as container records hold them
        expected = collections.deque(range(61001, 61009))  # the model of the FIFO queue
        restored = True
        for op, n in ops:
            if op == "acquire":
                if not expected:
                    with pytest.raises(PoolError):
                        pool.acquire()
                    continue
                port = pool.acquire()
                assert port == expected.popleft()
                assert port not in mappings
                mappings.append(port)
            elif op == "reserve":
                port = 61001 + n  # 61009-61012 lie outside the range
                pool.reserve(port)
                if port in expected:
                    expected.remove(port)
                mappings.append(port)
            elif op == "release" and mappings and restored:  # records are restored first
                port = mappings.pop(n % len(mappings))
                pool.release(port)
                if port not in mappings and 61001 <= port <= 61008:
                    expected.append(port)
            elif op == "crash":
                pool = PortPool(61001, 8, path)
                restored = n % 2 == 0
                if not restored:
                    continue  # not restored yet: the file alone must keep mapped ports out
                pool.restore(mappings)
                # ports out of the file's queue and not in a record went to the tail, ascending
                missing = sorted(set(range(61001, 61009)) - set(expected) - set(mappings))
                expected.extend(missing)
            assert pool.available() == len(expected)


def test_hand_edited_state_is_clipped_and_deduplicated(tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/ports.json"
    with open(path, "w") as f:
        json.dump({"queue": [[61003, 61003], [61002, 61003], [1, 99999999]]}, f)
    pool = PortPool(61001, 4, path)
    assert [pool.acquire() for _ in range(4)] == [61003, 61002, 61001, 61004]
