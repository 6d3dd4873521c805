"""Grace time ("bomberman"), GARDEN_REFERENCE.md §3.8: exact reap times on a mock clock.

``autojump_clock`` makes virtual time jump straight to the next deadline, so every
assertion below is an exact equality on ``trio.current_time()``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from gactor.actors.registry import GraceTimer, Registry, RegistryRef
from gactor.errors import ContainerNotFoundError, GardenError

NEVER = 10_000.0  # "forever" on the mock clock: far beyond every grace time used here


class Watch:
    """Runs ``timer.expired()`` in the background and records when and how it ended."""

    def __init__(self, timer: GraceTimer) -> None:
        self.timer = timer
        self.fired_at: float | None = None
        self.result: bool | None = None

    async def run(self) -> None:
        self.result = await self.timer.expired()
        self.fired_at = trio.current_time()


async def _watch(nursery: trio.Nursery, timer: GraceTimer) -> Watch:
    watch = Watch(timer)
    nursery.start_soon(watch.run)
    await trio.testing.wait_all_tasks_blocked()
    return watch


async def test_expires_exactly_grace_seconds_after_creation(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(5.0)
    assert await timer.expired() is True
    assert trio.current_time() == start + 5.0


async def test_pause_holds_it_forever(autojump_clock):
    timer = GraceTimer(5.0)
    timer.pause()
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(NEVER)
        assert watch.fired_at is None
        nursery.cancel_scope.cancel()


async def test_unpause_restarts_a_full_countdown(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(10.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(7)  # 3 s left of the first countdown ...
        timer.pause()
        await trio.sleep(1)
        timer.unpause()  # ... but the countdown restarts in full at t=8
    assert watch.result is True
    assert watch.fired_at == start + 8 + 10


async def test_nested_pauses_need_every_unpause(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(2.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        timer.pause()
        timer.pause()
        await trio.sleep(1)
        timer.unpause()  # one pause still outstanding
        await trio.sleep(NEVER)
        assert watch.fired_at is None
        timer.unpause()
    assert watch.fired_at == start + 1 + NEVER + 2


async def test_reset_while_idle_restarts_with_the_new_value(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(10.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(4)
        timer.reset(3.0)
    assert watch.fired_at == start + 4 + 3


async def test_reset_to_a_longer_value_while_idle(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(2.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(1)
        timer.reset(30.0)
    assert watch.fired_at == start + 1 + 30


async def test_reset_while_paused_takes_effect_at_the_last_unpause(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(100.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        timer.pause()
        await trio.sleep(1)
        timer.reset(2.0)
        await trio.sleep(50)  # far past the new value: still paused
        assert watch.fired_at is None
        timer.unpause()
    assert watch.fired_at == start + 51 + 2


async def test_zero_never_reaps(autojump_clock):
    timer = GraceTimer(0.0)
    assert timer.scope.deadline == math.inf
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        timer.pause()
        timer.unpause()  # an unpause does not arm a zero timer either
        await trio.sleep(NEVER)
        assert watch.fired_at is None
        nursery.cancel_scope.cancel()


async def test_reset_to_zero_disarms(autojump_clock):
    timer = GraceTimer(5.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(1)
        timer.reset(0.0)
        await trio.sleep(NEVER)
        assert watch.fired_at is None
        nursery.cancel_scope.cancel()


async def test_defuse_makes_expired_return_false_at_once(autojump_clock):
    start = trio.current_time()
    timer = GraceTimer(5.0)
    async with trio.open_nursery() as nursery:
        watch = await _watch(nursery, timer)
        await trio.sleep(3)
        timer.defuse()
    assert watch.result is False
    assert watch.fired_at == start + 3


async def test_defuse_while_paused(autojump_clock):
    timer = GraceTimer(5.0)
    timer.pause()
    timer.defuse()
    assert await timer.expired() is False


# ---- the registry's reaper, with a fake container and no kernel --------------------------


class FakeContainer:
    """What the registry needs of a container: a handle and name, published properties,
    a grace time, destroy() and set_grace_time()."""

    def __init__(self, handle: str, grace_time: float, fail: bool = False) -> None:
        self.handle = self.name = handle
        self.grace_time = grace_time
        self.image_copy = ""
        self.net = None
        self.properties: dict[str, str] = {}
        self.destroyed_at: list[float] = []
        self.persisted = 0
        self.fail = fail
        self.release: trio.Event | None = None  # set: destroy blocks until it is set

    async def destroy(self) -> None:
        self.destroyed_at.append(trio.current_time())
        if self.release is not None:
            await self.release.wait()
        if self.fail:
            raise GardenError(f"destroying {self.handle}: Device or resource busy")

    async def set_grace_time(self, seconds: float) -> None:
        self.grace_time = seconds
        self.persisted += 1


class NoCgroups:
    parent = "gactor-unit-test"

    def names(self) -> list[str]:
        return []


@pytest.fixture
async def registry(tmp_path) -> Any:
    env: Any = SimpleNamespace(depot=str(tmp_path), cgroups=NoCgroups(), image_store=str(tmp_path / "images"),
                               network=None)
    async with trio.open_nursery() as nursery:
        reg = await nursery.start(Registry(env, "", 0.0, 0).run)
        yield reg
        nursery.cancel_scope.cancel()


async def _add(registry: RegistryRef, handle: str, grace: float, **kwargs: Any) -> FakeContainer:
    fake = FakeContainer(handle, grace, **kwargs)
    await registry.adopt(fake)
    return fake


async def test_registry_reaps_an_idle_container_at_exactly_its_grace_time(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "idle", 4.0)
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 4]
    with pytest.raises(ContainerNotFoundError):
        await registry.lookup("idle")


async def test_registry_zero_grace_time_is_never_reaped(registry, autojump_clock):
    fake = await _add(registry, "forever", 0.0)
    await trio.sleep(NEVER)
    assert fake.destroyed_at == []
    assert await registry.lookup("forever") is fake


async def test_using_pauses_the_reaper_and_restarts_the_full_countdown(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "busy", 4.0)
    await trio.sleep(3)
    async with registry.using("busy") as container:
        assert container is fake
        await trio.sleep(NEVER)  # a long request (an attached process, say)
        assert fake.destroyed_at == []
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 3 + NEVER + 4]


async def test_a_cancelled_request_still_unpauses(registry, autojump_clock):
    fake = await _add(registry, "left", 2.0)
    with trio.move_on_after(5):
        async with registry.using("left"):
            await trio.sleep(NEVER)  # the client went away mid-request
    left_at = trio.current_time()
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [left_at + 2]


async def test_overlapping_requests_keep_it_paused_until_the_last_ends(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "two", 1.0)
    first_done = trio.Event()

    async def first() -> None:
        async with registry.using("two"):
            await trio.sleep(10)
        first_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        async with registry.using("two"):
            await first_done.wait()  # t=10: the other request still holds a pause
            await trio.sleep(5)
            assert fake.destroyed_at == []
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 15 + 1]


async def test_set_grace_time_restarts_the_countdown_and_persists(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "reset", 100.0)
    await trio.sleep(10)
    await registry.set_grace_time("reset", 2.5)
    assert (fake.grace_time, fake.persisted) == (2.5, 1)
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 10 + 2.5]


async def test_set_grace_time_during_a_request_waits_for_its_end(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "held", 100.0)
    async with registry.using("held"):
        await registry.set_grace_time("held", 1.0)
        await trio.sleep(20)
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 20 + 1]


async def test_api_destroy_defuses_the_timer(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "gone", 5.0)
    await trio.sleep(2)
    await registry.destroy("gone")
    await trio.sleep(NEVER)
    assert fake.destroyed_at == [start + 2]  # once, by the API; the timer never fired


async def test_reap_is_skipped_while_an_api_destroy_is_in_progress(registry, autojump_clock):
    start = trio.current_time()
    fake = await _add(registry, "racing", 3.0)
    fake.release = trio.Event()
    async with trio.open_nursery() as nursery:
        await trio.sleep(1)
        nursery.start_soon(registry.destroy, "racing")
        await trio.sleep(NEVER)  # the timer fires at t=3 during the slow destroy
        assert fake.destroyed_at == [start + 1]
        fake.release.set()
    assert fake.destroyed_at == [start + 1]
    with pytest.raises(ContainerNotFoundError):
        await registry.lookup("racing")


async def test_concurrent_destroys_one_wins(registry, autojump_clock):
    fake = await _add(registry, "twice", 0.0)
    fake.release = trio.Event()
    errors: list[GardenError] = []

    async def destroy() -> None:
        try:
            await registry.destroy("twice")
        except GardenError as err:
            errors.append(err)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(destroy)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(destroy)
        await trio.testing.wait_all_tasks_blocked()
        fake.release.set()
    assert [str(e) for e in errors] == ["container already being destroyed"]
    assert len(fake.destroyed_at) == 1
    assert await registry.list(None) == []


async def test_a_cancelled_destroy_still_completes(registry, autojump_clock):
    fake = await _add(registry, "abandoned", 0.0)
    fake.release = trio.Event()
    with trio.move_on_after(1):
        await registry.destroy("abandoned")  # the client disconnects mid-destroy
    assert await registry.list(None) == []  # being destroyed: not listed
    fake.release.set()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(ContainerNotFoundError):
        await registry.lookup("abandoned")
    assert len(fake.destroyed_at) == 1


async def test_a_failed_destroy_keeps_the_container_listed(registry, autojump_clock):
    fake = await _add(registry, "stuck", 0.0, fail=True)
    with pytest.raises(GardenError, match="destroying stuck"):
        await registry.destroy("stuck")
    assert await registry.lookup("stuck") is fake
    assert await registry.list(None) == ["stuck"]
    fake.fail = False
    await registry.destroy("stuck")
    assert await registry.list(None) == []


async def test_destroying_containers_are_not_listed(registry, autojump_clock):
    fake = await _add(registry, "leaving", 0.0)
    await _add(registry, "staying", 0.0)
    fake.release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.destroy, "leaving")
        await trio.testing.wait_all_tasks_blocked()
        assert await registry.list(None) == ["staying"]
        fake.release.set()
