"""The registry's image store lock: prepares of different sources run together, one
source's prepares one at a time, collects alone and never starved by prepares."""

from __future__ import annotations

import trio
import trio.testing

from gactor.actors.registry import ImageStoreLock


async def hold(lock: ImageStoreLock, kind: str, source: str, seconds: float, log: list[tuple[float, str]]) -> None:
    cm = lock.shared(source) if kind == "shared" else lock.alone()
    async with cm:
        log.append((trio.current_time(), f"{kind} {source} in"))
        await trio.sleep(seconds)
        log.append((trio.current_time(), f"{kind} {source} out"))


async def test_sources_share_and_one_source_waits(autojump_clock: trio.testing.MockClock) -> None:
    lock = ImageStoreLock()
    log: list[tuple[float, str]] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, "shared", "a", 10, log)
        nursery.start_soon(hold, lock, "shared", "b", 10, log)
        nursery.start_soon(hold, lock, "shared", "a", 10, log)
    times = {(round(t - start), what) for t, what in log}
    assert times == {(0, "shared a in"), (0, "shared b in"), (10, "shared a out"), (10, "shared b out"),
                     (10, "shared a in"), (20, "shared a out")}


async def test_alone_waits_for_sharers_and_goes_before_new_ones(autojump_clock: trio.testing.MockClock) -> None:
    lock = ImageStoreLock()
    log: list[tuple[float, str]] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, "shared", "a", 10, log)
        await trio.sleep(1)
        nursery.start_soon(hold, lock, "alone", "-", 5, log)
        await trio.sleep(1)
        nursery.start_soon(hold, lock, "shared", "b", 1, log)  # arrives while the collect waits
    order = [(round(t - start), what) for t, what in log]
    assert order == [(0, "shared a in"), (10, "shared a out"), (10, "alone - in"), (15, "alone - out"),
                     (15, "shared b in"), (16, "shared b out")]


async def test_cancelled_waits_leave_the_lock_usable(autojump_clock: trio.testing.MockClock) -> None:
    lock = ImageStoreLock()
    log: list[tuple[float, str]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, lock, "shared", "a", 10, log)
        await trio.sleep(1)
        with trio.move_on_after(1):
            async with lock.alone():
                raise AssertionError("got the lock while a prepare held it")
        with trio.move_on_after(1):
            async with lock.shared("a"):
                raise AssertionError("got source a while another prepare held it")
    async with lock.alone():
        pass
    async with lock.shared("a"):
        pass
