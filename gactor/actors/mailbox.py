"""Actor plumbing (STYLE.md rules 1-5): a bounded mailbox of typed commands, each
carrying a one-shot reply slot.

A caller ``ask``s: the command goes into the owner's mailbox (waiting for room when it
is full, so a flood of callers is slowed, never buffered without bound) and the caller
waits for the reply. Cancelling the caller cancels only its wait: the owner still
carries the command out and the reply is dropped. The owner settles every request
exactly once; when the owner ends, every queued request and every later ``ask`` fails
with ``ActorGone``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from ..errors import GardenError, ServiceUnavailableError

log = logging.getLogger("gactor.actors")

T = TypeVar("T")
# A handler's return value meaning "not yet": a task of the owner settles the request later.
DEFERRED: Any = object()
MAILBOX_SIZE = 256  # commands queued per actor before askers wait for room


async def acquire(lock: trio.Lock) -> None:
    """``await lock.acquire()``, without a trip through the scheduler when the lock is
    free (trio's ``acquire`` always yields; for a lock taken on every frame or request
    that is a task switch each time). A held lock is waited for in turn (trio's Lock is
    fair: a free lock with waiters is theirs). Cancelled while waiting: not acquired."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class ActorGone(ServiceUnavailableError):
    def __init__(self, owner: str) -> None:
        super().__init__(f"{owner} is gone")


class Request(Generic[T]):
    """One command and the slot its reply goes into (``settled``: an event an asker
    waits on; a told command has none, nobody waits for its reply)."""

    __slots__ = ("command", "_outcome", "_settled")

    def __init__(self, command: Any, settled: trio.Event | None = None) -> None:
        self.command = command
        self._outcome: outcome.Outcome[T] | None = None
        self._settled = settled

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    def reply(self, value: T) -> None:
        if self._outcome is None:
            self._outcome = outcome.Value(value)
            if self._settled is not None:
                self._settled.set()

    def fail(self, error: BaseException) -> None:
        if self._outcome is None:
            self._outcome = outcome.Error(error)
            if self._settled is not None:
                self._settled.set()

    async def settle(self, handler: Callable[[Request[T]], Awaitable[T]]) -> None:
        """Run ``handler(self)``; its result or GardenError is the reply (none when it
        returns DEFERRED). Any other exception fails the request with an internal error
        and is re-raised: the actor's supervisor decides what a bug means."""
        try:
            result = await handler(self)
            if result is not DEFERRED:
                self.reply(result)
        except GardenError as err:
            self.fail(err)
        except BaseException as err:
            self.fail(GardenError(f"internal error in {type(self.command).__name__}: {err!r}"))
            raise


class _Gone(Exception):
    """Internal: the mailbox closed while a sender waited for room."""


class Mailbox:
    """A bounded FIFO of requests with one owner serving it.

    Not a trio memory channel: on every hop that costs a channel pair per actor, a
    checkpoint per send and one per queued receive; here a send with room queues without
    a trip through the scheduler, and the owner, parked when the mailbox is empty, is
    handed each request as it comes. Senders finding it full wait in order (each one's
    request joins the queue, in turn, as the owner takes one out).
    """

    def __init__(self, owner: str, size: int = MAILBOX_SIZE,
                 gone: Callable[[], BaseException] | None = None) -> None:
        """``gone`` makes the error askers get once the owner has ended (ActorGone by
        default; a container's says its handle is not found once it is destroyed)."""
        self.owner = owner
        self._gone = gone or (lambda: ActorGone(owner))
        self._size = size
        self._queue: collections.deque[Request[Any]] = collections.deque()
        # Senders waiting for room, oldest first, each with the request it brings.
        self._senders: collections.OrderedDict[trio.lowlevel.Task, Request[Any]] = collections.OrderedDict()
        self._serving: trio.lowlevel.Task | None = None  # the owner, parked on an empty mailbox
        self._closed = False
        self._stopping = False  # ``stop_serving``: serve returns before the next request

    def _put_nowait(self, request: Request[Any]) -> bool:
        """Queue ``request`` if there is room (and nobody waits for it before us);
        raises _Gone once closed."""
        if self._closed:
            raise _Gone
        if len(self._queue) >= self._size or self._senders:
            return False
        self._queue.append(request)
        if self._serving is not None:
            owner, self._serving = self._serving, None
            trio.lowlevel.reschedule(owner)
        return True

    async def _put(self, request: Request[Any]) -> None:
        """Queue ``request``, waiting for room in turn; cancelled while waiting: not
        queued. Raises _Gone once closed."""
        if self._put_nowait(request):
            return
        task = trio.lowlevel.current_task()
        self._senders[task] = request

        def abort(_: Any) -> trio.lowlevel.Abort:
            del self._senders[task]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # Value: queued; Error(_Gone): closed

    async def _take(self) -> Request[Any] | None:
        """The oldest request (None once closed), parking while there is none."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled owner stops before the next
        while not self._queue or self._stopping:
            if self._closed or self._stopping:
                return None
            self._serving = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._serving = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        request = self._queue.popleft()
        if self._senders:  # room now: the longest-waiting sender's request goes in
            sender, waiting = self._senders.popitem(last=False)
            self._queue.append(waiting)
            trio.lowlevel.reschedule(sender)
        return request

    async def ask(self, command: Any) -> Any:
        """Send ``command`` and wait for its reply. Raises what the owner replied with,
        or ActorGone. Cancelled: the command may still be carried out."""
        settled = trio.Event()
        request: Request[Any] = Request(command, settled)
        try:
            await self._put(request)
        except _Gone:
            raise self._gone() from None
        await settled.wait()
        assert request._outcome is not None
        return request._outcome.unwrap()

    async def tell(self, command: Any) -> bool:
        """Send ``command`` without waiting for it to be carried out (the owner's own
        tasks reporting back to it). False (dropped) once the owner has ended.

        With room in the mailbox the command is queued at once, without a checkpoint
        (a tell is a hand-over: it is not lost to a cancellation that arrives with it,
        and costs no trip through the scheduler); only a full mailbox makes the caller
        wait, and a cancellation then cancels the send (the command is not queued)."""
        try:
            await self._put(Request(command))
            return True
        except _Gone:
            return False

    def tell_nowait(self, command: Any) -> bool:
        """``tell`` from synchronous code: False when the mailbox is full (the caller must
        keep the command and send it later); once the owner has ended it is dropped (True)."""
        try:
            return self._put_nowait(Request(command))
        except _Gone:
            return True

    async def serve(self, handler: Callable[[Request[Any]], Awaitable[Any]],
                    until: Callable[[], bool] = lambda: False) -> None:
        """The owner's loop: settle requests with ``handler`` one at a time, in arrival
        order, until ``close`` or until ``until()`` holds after one. A handler failing
        with anything but a GardenError answers its caller with an internal error and is
        logged; the actor keeps serving (one bad command never takes its state down)."""
        while (request := await self._take()) is not None:
            try:
                await request.settle(handler)
            except Exception:  # noqa: BLE001 - the caller got an internal error already
                log.exception("%s: %s failed", self.owner, type(request.command).__name__)
            if until():
                return

    def stop_serving(self) -> None:
        """Make ``serve`` return once the request in hand (if any) is settled, without a
        cancellation: the owner's own tasks call it when the actor's work is done. What
        is queued stays for ``close``."""
        self._stopping = True
        if self._serving is not None:
            owner, self._serving = self._serving, None
            trio.lowlevel.reschedule(owner)

    def close(self) -> None:
        """End the mailbox (the owner is ending): queued, waiting and later requests fail."""
        self._closed = True
        while self._queue:
            self._queue.popleft().fail(self._gone())
        for sender, request in self._senders.items():
            request.fail(self._gone())
            trio.lowlevel.reschedule(sender, outcome.Error(_Gone()))
        self._senders.clear()
        if self._serving is not None:  # closed from elsewhere while the owner waits: it ends
            owner, self._serving = self._serving, None
            trio.lowlevel.reschedule(owner)
