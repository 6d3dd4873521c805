"""The event hub and its per-subscriber queues (gactor/actors/events.py): exact counts."""

from __future__ import annotations

import trio
import trio.testing

from gactor.actors.events import EventHub, EventQueue, event, recorded


async def _drain(queue: EventQueue) -> list[tuple[str, int, int]]:
    """What ``queue`` holds now, as (kind, seq, missed), without waiting for more."""
    queue.end()
    return [(e.kind, e.seq, e.missed) async for e in queue]


async def _hub(nursery: trio.Nursery) -> EventHub:
    hub: EventHub = await nursery.start(EventHub().run)
    return hub


async def test_a_full_queue_counts_what_it_misses_in_one_marker(nursery: trio.Nursery) -> None:
    hub = await _hub(nursery)
    queue = EventQueue(None, size=3)
    await hub.subscribe(queue)
    for i in range(7):
        await hub.publish(event("created", f"c{i}"))
    await hub.subscribe(EventQueue(None))  # a round trip: the hub has handled every publish
    got = await _drain(queue)
    assert got == [("created", 1, 0), ("created", 2, 0), ("created", 3, 0), ("missed", 7, 4)]
    assert queue.missed == 4


async def test_a_reader_that_catches_up_gets_a_marker_per_gap(nursery: trio.Nursery) -> None:
    queue = EventQueue("h", size=2)
    for seq in range(1, 5):  # 1, 2 queued; 3, 4 missed
        queue.put(event("process_started", "h", seq=seq))
    reader = queue.__aiter__()
    assert (await reader.__anext__()).seq == 1
    queue.put(event("process_exited", "h", seq=5))  # the marker takes a slot: still full, missed
    assert (await reader.__anext__()).seq == 2  # now only the marker is queued
    queue.put(event("process_exited", "h", seq=6))  # queued behind the marker...
    queue.put(event("process_exited", "h", seq=7))  # ...and this one missed: a new marker
    queue.end()
    rest = [(e.kind, e.seq, e.missed, e.handle, e.event) async for e in reader]
    assert rest == [("missed", 5, 3, "h", "missed 3 events"), ("process_exited", 6, 0, "h", "process_exited"),
                    ("missed", 7, 1, "h", "missed 1 event")]
    assert queue.missed == 4


async def test_subscriptions_by_handle_end_with_the_container(nursery: trio.Nursery) -> None:
    hub = await _hub(nursery)
    mine, everything, legacy = EventQueue("a"), EventQueue(None), EventQueue("a", recorded_only=True)
    for queue in (mine, everything, legacy):
        await hub.subscribe(queue)
    await hub.publish(event("created", "b"))
    await hub.publish(event("oom", "a", "Out of memory"))
    await hub.publish(event("stopped", "a", reason="oom"))
    await hub.publish(event("destroyed", "a", reason="client"))
    await hub.end_of("a")
    with trio.fail_after(5):
        assert [e.kind async for e in mine] == ["oom", "stopped", "destroyed"]  # ends by itself
        assert [e.event async for e in legacy] == ["Out of memory"]
    everything.end()
    assert [(e.kind, e.handle) async for e in everything] == [
        ("created", "b"), ("oom", "a"), ("stopped", "a"), ("destroyed", "a")]


async def test_a_subscriber_that_leaves_is_removed(nursery: trio.Nursery) -> None:
    hub = await _hub(nursery)
    queue = EventQueue(None)
    await hub.subscribe(queue)
    await hub.unsubscribe(queue)
    await hub.publish(event("created", "c"))
    await hub.subscribe(EventQueue(None))  # a round trip: the hub has handled the rest
    assert queue not in hub._subscribers[None]
    assert [e async for e in queue] == []  # its iteration ends at once


def test_recorded_kinds_are_what_container_info_records() -> None:
    assert recorded(event("oom", "h"))
    assert recorded(event("oom_victim", "h"))
    assert recorded(event("broken", "h", reason="shim_died"))
    assert not recorded(event("broken", "h", reason="destroy_failed"))
    assert not recorded(event("process_exited", "h", exit_status=0))


async def test_with_nobody_subscribed_a_publish_goes_nowhere_and_costs_no_hop(nursery: trio.Nursery) -> None:
    """The usual case (two events per Run): the publisher sees ``listening`` false and sends
    nothing; a subscription that has returned sees every later event, numbered from the
    first one published while someone listened; after the last unsubscribe, nothing again."""
    hub = await _hub(nursery)
    for i in range(5):
        await hub.publish(event("created", f"quiet{i}"))
    assert not hub.listening
    queue = EventQueue(None)
    await hub.subscribe(queue)
    assert hub.listening
    await hub.publish(event("created", "heard"))
    other = EventQueue("other")
    await hub.subscribe(other)  # a round trip: the hub has handled the publish
    got = await _drain(queue)
    assert got == [("created", 1, 0)]  # 1: the quiet five never reached the hub
    await hub.unsubscribe(queue)
    more = EventQueue("more")
    await hub.subscribe(more)  # a round trip: the unsubscribe is handled
    assert hub.listening  # "other" and "more" still listen (to their own containers only)
    await hub.unsubscribe(other)
    await hub.unsubscribe(more)
    await trio.testing.wait_all_tasks_blocked()  # the hub has handled both
    assert not hub.listening
