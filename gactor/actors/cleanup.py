"""A retryable undo stack for kernel objects.

Like ``contextlib.ExitStack`` (steps registered the moment an object exists, run in
reverse), except that a step is forgotten only once it has succeeded: a teardown that
fails half-way can be run again and picks up exactly where it stopped. That is what
makes destroy idempotent and retryable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger("gactor.cleanup")


class Cleanup:
    def __init__(self) -> None:
        self._steps: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callback(self, fn: Callable[..., Any], *args: Any) -> None:
        self._steps.append((fn, args))

    def pop_all(self) -> Cleanup:
        """Hand every registered step to a new owner; this stack is left empty."""
        taken = Cleanup()
        taken._steps, self._steps = self._steps, []
        return taken

    def close(self) -> None:
        """Run the remaining steps, newest first. Every step is tried; failed ones stay
        registered for the next ``close``, and the first failure is raised."""
        failures: list[BaseException] = []
        for step in reversed(list(self._steps)):
            fn, args = step
            try:
                fn(*args)
            except Exception as err:  # noqa: BLE001 - keep tearing down the rest
                failures.append(err)
                continue
            self._steps.remove(step)
        if failures:
            raise failures[0]

    @property
    def pending(self) -> int:
        return len(self._steps)

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("rollback after a failed step left something behind")
