"""A pull's progress from a worker thread to one trio task (gactor/actors/pull_progress.py)."""

from __future__ import annotations

import trio

from gactor.actors.pull_progress import PullProgress

TOTAL = 1000


def pull(progress: PullProgress) -> None:
    """As ``images.prepare`` reports: every layer first, then the bytes of each."""
    progress.report("sha256:a", 0, TOTAL)
    progress.report("sha256:b", 0, 10)
    for done in range(1, TOTAL + 1):
        progress.report("sha256:a", done, TOTAL)
    progress.report("sha256:b", 10, 10)


async def test_a_reader_that_lags_gets_each_layers_latest_once() -> None:
    progress = PullProgress()
    await trio.to_thread.run_sync(pull, progress)
    progress.finish()
    batches = [[(layer.digest, layer.done, layer.total) for layer in batch] async for batch in progress.updates()]
    assert batches == [[("sha256:a", TOTAL, TOTAL), ("sha256:b", 10, 10)]]  # first-reported order


async def test_a_layer_first_reported_done_is_cached_however_late_it_is_read() -> None:
    progress = PullProgress()

    def pull_again() -> None:
        progress.report("sha256:a", 5, 5)  # the store has it
        progress.report("sha256:b", 0, 7)
        progress.report("sha256:b", 7, 7)  # fetched now

    await trio.to_thread.run_sync(pull_again)
    progress.finish()
    [batch] = [batch async for batch in progress.updates()]
    assert [(layer.digest, layer.done, layer.cached) for layer in batch] == [("sha256:a", 5, True),
                                                                           ("sha256:b", 7, False)]


async def test_a_live_reader_sees_monotone_progress_to_the_end() -> None:
    progress = PullProgress()
    seen: dict[str, list[int]] = {}

    async def read() -> None:
        async for batch in progress.updates():
            assert len({layer.digest for layer in batch}) == len(batch)
            for layer in batch:
                seen.setdefault(layer.digest, []).append(layer.done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.to_thread.run_sync(pull, progress)
        progress.finish()
    # A reader slower than the puller skips values (the first one included), never the last.
    assert seen["sha256:a"] == sorted(seen["sha256:a"])
    assert (seen["sha256:a"][-1], seen["sha256:b"][-1]) == (TOTAL, 10)


async def test_finish_without_reports_ends_the_updates() -> None:
    progress = PullProgress()
    progress.finish()
    assert [batch async for batch in progress.updates()] == []
