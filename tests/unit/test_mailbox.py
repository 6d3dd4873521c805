"""The actor mailbox (gactor/actors/mailbox.py): order, bounds, cancellation, the end."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from gactor.actors.mailbox import ActorGone, Mailbox, Request, acquire
from gactor.errors import GardenError


async def test_requests_are_served_one_at_a_time_in_arrival_order() -> None:
    box = Mailbox("owner", size=4)
    served: list[Any] = []

    async def handler(request: Request[Any]) -> Any:
        served.append(request.command)
        if request.command == "bad":
            raise GardenError("no")
        return request.command * 2

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.serve, handler)
        assert box.tell_nowait(1)
        assert await box.tell(2)
        assert await box.ask(3) == 6
        with pytest.raises(GardenError, match="no"):
            await box.ask("bad")
        nursery.cancel_scope.cancel()
    assert served == [1, 2, 3, "bad"]


async def test_a_full_mailbox_makes_senders_wait_in_turn() -> None:
    box = Mailbox("owner", size=2)
    served: list[int] = []
    assert box.tell_nowait(0)
    assert box.tell_nowait(1)
    assert not box.tell_nowait(99)  # full: the caller keeps it
    async with trio.open_nursery() as nursery:
        for n in (2, 3, 4):
            nursery.start_soon(box.tell, n)
            await trio.testing.wait_all_tasks_blocked()
        assert not box.tell_nowait(98)  # senders are waiting: no overtaking them either

        async def handler(request: Request[Any]) -> None:
            served.append(request.command)

        nursery.start_soon(box.serve, handler)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert served == [0, 1, 2, 3, 4]


async def test_a_sender_cancelled_while_waiting_for_room_is_not_queued(autojump_clock: Any) -> None:
    box = Mailbox("owner", size=1)
    assert box.tell_nowait("first")
    with trio.move_on_after(1) as scope:
        await box.tell("never")
    assert scope.cancelled_caught
    served: list[str] = []

    async def handler(request: Request[Any]) -> None:
        served.append(request.command)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.serve, handler)
        await trio.testing.wait_all_tasks_blocked()  # "first" served: room again
        assert box.tell_nowait("second")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert served == ["first", "second"]


async def test_closing_fails_queued_waiting_and_later_requests() -> None:
    box = Mailbox("owner", size=1)
    outcomes: list[str] = []

    async def ask(command: str) -> None:
        try:
            await box.ask(command)
        except ActorGone as err:
            outcomes.append(f"{command}: {err}")

    async def tell(command: str) -> None:
        outcomes.append(f"{command}: {await box.tell(command)}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "queued")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask, "waiting")
        nursery.start_soon(tell, "told")
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert sorted(outcomes) == ["queued: owner is gone", "told: False", "waiting: owner is gone"]
    with pytest.raises(ActorGone):
        await box.ask("later")
    assert await box.tell("later") is False
    assert box.tell_nowait("later") is True  # dropped


async def test_serve_ends_when_the_mailbox_closes_under_a_parked_owner() -> None:
    box = Mailbox("owner")

    async def handler(request: Request[Any]) -> None:
        raise AssertionError("nothing was sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.serve, handler)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    # the nursery exits: serve returned


async def test_acquire_takes_a_free_lock_at_once_and_a_held_one_in_turn() -> None:
    lock = trio.Lock()
    order: list[str] = []
    await acquire(lock)
    assert lock.locked()

    async def waiter(name: str) -> None:
        await acquire(lock)
        order.append(name)
        lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "b")
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert order == ["a", "b"]


async def test_stop_serving_ends_serve_after_the_request_in_hand() -> None:
    box = Mailbox("owner")
    served: list[str] = []

    async def handler(request: Request[Any]) -> None:
        served.append(request.command)
        if request.command == "last":
            box.stop_serving()  # the owner's own work is done
            await trio.lowlevel.checkpoint()  # the request in hand still finishes

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.serve, handler)
        await trio.testing.wait_all_tasks_blocked()
        assert box.tell_nowait("first")
        assert box.tell_nowait("last")
        assert box.tell_nowait("left for close")
    assert served == ["first", "last"]
    box.close()
    with pytest.raises(ActorGone):
        await box.ask("after")


async def test_stop_serving_wakes_a_parked_owner() -> None:
    box = Mailbox("owner")

    async def handler(request: Request[Any]) -> None:
        raise AssertionError("nothing was sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.serve, handler)
        await trio.testing.wait_all_tasks_blocked()
        box.stop_serving()
