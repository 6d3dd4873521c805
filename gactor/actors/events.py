"""The event hub: containers' lifecycle events, fanned out to subscribers.

The registry starts the hub in its own nursery and owns it: the registry publishes
``created`` and ``destroyed``, container actors publish the rest (state changes, OOM
kills, processes) through ``Environment.publish``. The hub's one task owns the
subscriptions and never waits for anybody: each subscriber has an ``EventQueue`` of
EVENT_QUEUE events that the hub fills without blocking. A subscriber that falls that
far behind is not dropped and never slows a publisher: the events it cannot take are
counted, and one ``missed`` event saying how many takes their place in its queue.

Events reach the hub through its mailbox, in the order they were published; a
container's own events are published before it answers the command that caused them,
so a subscriber sees, for one container, ``created``, then what happened in it, then
``destroyed``. Nothing here touches the kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from ..types import EVENT_KINDS, ContainerEvent
from .mailbox import Mailbox, Request

EVENT_QUEUE = 64  # events queued per subscriber; beyond, they are counted as missed
UNSUBSCRIBE_TIMEOUT = 5.0  # seconds a leaving subscriber may wait for room in the hub's mailbox


def event(kind: str, handle: str, words: str = "", **fields: object) -> ContainerEvent:
    """A new event of ``handle``, stamped now; the hub numbers it (``seq``)."""
    assert kind in EVENT_KINDS, f"unknown event kind {kind!r}"  # the wire's closed list
    return ContainerEvent(kind=kind, handle=handle, event=words or kind, time=time.time(),
                          **fields)  # type: ignore[arg-type]


class EventQueue:
    """One subscriber's events, in order: filled by the hub (``put``, never blocking),
    read by the subscriber (``async for``). Holds at most EVENT_QUEUE events plus one
    ``missed`` marker, whose count grows while the queue stays full.

    ``recorded_only`` subscribers (the ``events`` stream of older clients) get only the
    events ``ContainerInfo.events`` records."""

    def __init__(self, handle: str | None, recorded_only: bool = False, size: int = EVENT_QUEUE) -> None:
        self.handle = handle
        self.recorded_only = recorded_only
        self._size = size
        self._items: collections.deque[ContainerEvent] = collections.deque()
        self._changed = trio.Event()
        self.ended = False  # no more events will come (the container was destroyed, or the hub ended)
        self.left = False  # the subscriber went away (``EventHub.unsubscribe``)
        self.missed = 0  # events this subscriber did not get, in all

    def put(self, item: ContainerEvent) -> None:
        """Queue ``item`` (the hub's task only); when full, count it as missed."""
        if self.ended or self.left:
            return
        if len(self._items) < self._size:
            self._items.append(item)
        else:
            self.missed += 1
            tail = self._items[-1]
            if tail.kind == "missed":  # not read yet: it counts this one too
                self._items[-1] = dataclasses.replace(tail, missed=tail.missed + 1, seq=item.seq, time=item.time)
            else:
                self._items.append(ContainerEvent(kind="missed", handle=self.handle or "", event="missed 1 event",
                                                  seq=item.seq, time=item.time, missed=1))
        self._changed.set()

    def end(self) -> None:
        """No more events: the subscriber reads what is queued, then its iteration ends."""
        self.ended = True
        self._changed.set()

    def __aiter__(self) -> AsyncIterator[ContainerEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ContainerEvent]:
        while True:
            while self._items:
                item = self._items.popleft()
                if item.kind == "missed":
                    item = dataclasses.replace(item, event=f"missed {item.missed} event{'s' * (item.missed != 1)}")
                yield item
            if self.ended or self.left:
                return
            self._changed = trio.Event()
            await self._changed.wait()


# ---- commands ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Publish:
    event: ContainerEvent


@dataclass(frozen=True)
class Subscribe:
    queue: EventQueue


@dataclass(frozen=True)
class Unsubscribe:
    queue: EventQueue


@dataclass(frozen=True)
class EndOf:
    """The container ``handle`` is gone: its subscriptions end (after its ``destroyed``)."""

    handle: str


RECORDED = frozenset({"oom", "oom_victim"})  # kinds whose text ContainerInfo.events records


def recorded(item: ContainerEvent) -> bool:
    """Whether ``ContainerInfo.events`` records this event's text (a shim's death included)."""
    return item.kind in RECORDED or (item.kind == "broken" and item.reason == "shim_died")


class EventHub:
    """The subscriptions and their owning task; start it with ``nursery.start(run)``,
    which hands back the hub (``publish``, ``subscription``)."""

    def __init__(self) -> None:
        self.mailbox = Mailbox("the event hub")
        self._subscribers: dict[str | None, set[EventQueue]] = {}  # None: every container's
        self._seq = 0
        # Published by the owner on every (un)subscribe: with nobody listening (the usual
        # case) a publisher skips the hop to the hub (two per Run), which is invisible: an
        # event published while no subscription exists reaches no one, numbered or not.
        self.listening = False

    async def run(self, *, task_status: trio.TaskStatus[EventHub] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started(self)
            await self.mailbox.serve(self._handle)
        finally:
            self.mailbox.close()
            for queues in self._subscribers.values():
                for queue in queues:
                    queue.end()
            self._subscribers.clear()

    async def _handle(self, request: Request[Any]) -> None:
        match request.command:
            case Publish(item):
                self._seq += 1
                if not (self._subscribers.get(item.handle) or self._subscribers.get(None)):
                    return  # nobody listens (the usual case): numbered, no copy
                item = dataclasses.replace(item, seq=self._seq)
                for key in (item.handle, None):
                    queues = self._subscribers.get(key, set())
                    for queue in list(queues):
                        if queue.left:
                            queues.discard(queue)  # it went away without telling (its mailbox send timed out)
                        elif not queue.recorded_only or recorded(item):
                            queue.put(item)
            case Subscribe(queue):
                self._subscribers.setdefault(queue.handle, set()).add(queue)
            case Unsubscribe(queue):
                remaining = self._subscribers.get(queue.handle, set())
                remaining.discard(queue)
                if not remaining and queue.handle is not None:
                    self._subscribers.pop(queue.handle, None)
            case EndOf(handle):
                for queue in self._subscribers.pop(handle, set()):
                    queue.end()
        self.listening = any(self._subscribers.values())

    async def publish(self, item: ContainerEvent) -> None:
        """Hand ``item`` to every subscriber of its container and of all containers. Waits
        only for room in the hub's mailbox (the hub never blocks: it drains fast);
        dropped once the hub has ended (the server is stopping), and when nobody is
        subscribed (checked and sent with no checkpoint between: a subscription that has
        returned always sees it)."""
        if self.listening:
            await self.mailbox.tell(Publish(item))

    async def end_of(self, handle: str) -> None:
        await self.mailbox.tell(EndOf(handle))

    async def subscribe(self, queue: EventQueue) -> None:
        """Start filling ``queue``: every event published after this returns reaches it."""
        await self.mailbox.ask(Subscribe(queue))

    async def unsubscribe(self, queue: EventQueue) -> None:
        """Stop filling ``queue`` (idempotent, shielded, bounded: a hub that has ended or
        whose mailbox stays full drops it at its next event)."""
        queue.left = True
        queue._changed.set()
        with trio.CancelScope(shield=True), trio.move_on_after(UNSUBSCRIBE_TIMEOUT):
            await self.mailbox.tell(Unsubscribe(queue))
