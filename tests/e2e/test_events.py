"""Event subscriptions through the registry: one container's, and every container's."""

from __future__ import annotations

import re

import pytest
import trio

import gactor
from gactor import ContainerSpec, Limits, MemoryLimits, ProcessIO, ProcessSpec

from .helpers import E2E_MARKS, sh

pytestmark = E2E_MARKS

OOM = "Out of memory"


def small(handle: str = "") -> ContainerSpec:
    return ContainerSpec(handle=handle, limits=Limits(memory=MemoryLimits(limit_in_bytes=32 << 20)))


async def oom(container: gactor.Container) -> None:
    code, _, _ = await sh(container, "dd if=/dev/zero of=/dev/shm/x bs=1M count=48")
    assert code == 137


async def test_a_client_wide_subscription_hears_every_container(client, create_container):
    first = await create_container(small())
    second = await create_container(small())
    quiet = await create_container()
    heard: list[tuple[str, str]] = []
    async with client.events() as events:
        await oom(first)
        await oom(second)
        with trio.fail_after(10):
            async for handle, event in events:
                if event == OOM:  # each also gets an event naming the victim (below)
                    heard.append((handle, event))
                if len(heard) == 2:
                    break
    assert sorted(heard) == sorted([(first.handle, OOM), (second.handle, OOM)])
    assert quiet.handle not in {h for h, _ in heard}


async def test_a_container_subscription_ends_when_it_is_destroyed(client, create_container):
    container = await create_container(small())
    other = await create_container(small())
    async with container.events() as events:
        await oom(other)  # someone else's event is not delivered here
        await oom(container)
        with trio.fail_after(10):
            assert [event async for event in _first(events)] == [OOM]
        await client.destroy(container.handle)
        with trio.fail_after(10):  # the stream just ends (after the event naming the victim)
            assert [e for e in [event async for event in events] if not e.startswith(f"{OOM}:")] == []


async def _first(events):
    async for event in events:
        yield event
        return


async def test_an_oom_event_names_the_killed_process(create_container):
    """Garden's "Out of memory", then which process the kernel killed: its host pid,
    command and, for a process started by run, its process id."""
    container = await create_container(small())
    async with container.events() as events:
        proc = await container.run(ProcessSpec(id="hog", path="dd", args=["if=/dev/zero", "of=/dev/shm/x",
                                                                        "bs=1M", "count=48"]), ProcessIO())
        assert await proc.wait() == 137
        with trio.fail_after(10):
            got = [event async for event in _take(events, 2)]
    assert got[0] == OOM
    assert re.fullmatch(r"Out of memory: killed process \d+ \(dd\), process id 'hog'", got[1]), got
    assert (await container.info()).events[-2:] == got


async def _take(events, n):
    async for event in events:
        yield event
        n -= 1
        if not n:
            return


async def test_subscribing_to_a_destroyed_container_fails(client):
    container = await client.create(ContainerSpec())
    await client.destroy(container.handle)
    with pytest.raises(gactor.ContainerNotFoundError) as caught:
        await container.events().__aenter__()
    assert caught.value.handle == container.handle
