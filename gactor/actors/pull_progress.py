"""A pull's per-layer progress, carried from the thread that pulls to one trio task.

The puller (``images.prepare`` in a worker thread) calls ``report`` for every chunk it
reads; the reader (the front end sending progress frames to a client) takes the news in
batches with ``updates``. Only each layer's latest report is kept, so however slowly the
client reads, this holds one entry per layer, and the puller never waits for it: a
report takes a lock for a dict assignment and, when the reader has taken everything,
schedules one wake-up on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import trio

from ..types import LayerProgress


class PullProgress:
    """Made in the trio thread; ``report`` from any thread, ``updates`` from one task."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._latest: dict[str, LayerProgress] = {}  # by digest, in the order first reported
        self._seen: set[str] = set()  # digests reported at least once
        self._changed = trio.Event()
        self._finished = False

    def report(self, digest: str, done: int, total: int) -> None:
        """The layer ``digest`` has ``done`` of its ``total`` bytes (-1: unknown). Any thread.
        A layer first reported done is one the store had (``images._ensure_all``): that
        is kept as ``cached``, so a reader that skips values still knows it."""
        with self._lock:
            wake = None if self._latest else self._changed
            cached = digest not in self._seen and done == total
            self._seen.add(digest)
            self._latest[digest] = LayerProgress(digest, done, total, cached)
        if wake is not None:
            self._token.run_sync_soon(wake.set)

    def finish(self) -> None:
        """No more reports (trio thread): ``updates`` ends once it has handed out the last."""
        self._finished = True
        self._changed.set()

    async def updates(self) -> AsyncIterator[list[LayerProgress]]:
        """The latest report of every layer that changed since the last batch, oldest
        layer first, until ``finish`` (the last batch included)."""
        while True:
            await self._changed.wait()
            with self._lock:
                batch = list(self._latest.values())
                self._latest.clear()
                self._changed = trio.Event()
                finished = self._finished
            if batch:
                yield batch
            if finished:
                return
