"""The retryable undo stack behind create's rollback and destroy's idempotence."""

from __future__ import annotations

import pytest

from gactor.actors.cleanup import Cleanup


class Step:
    """A teardown step that records its calls and fails the first ``failures`` times."""

    def __init__(self, name: str, log: list[str], failures: int = 0) -> None:
        self.name = name
        self.log = log
        self.failures = failures

    def __call__(self, *args: object) -> None:
        self.log.append(self.name + "".join(f":{a}" for a in args))
        if self.failures:
            self.failures -= 1
            raise OSError(16, f"{self.name} busy")


def test_steps_run_newest_first_with_their_arguments():
    log: list[str] = []
    undo = Cleanup()
    undo.callback(Step("rmdir", log), "/depot/h")
    undo.callback(Step("cgroup", log))
    undo.callback(Step("umount", log), "/depot/h/rootfs")
    assert undo.pending == 3
    undo.close()
    assert log == ["umount:/depot/h/rootfs", "cgroup", "rmdir:/depot/h"]
    assert undo.pending == 0


def test_a_failing_step_stays_and_only_it_is_retried():
    log: list[str] = []
    undo = Cleanup()
    undo.callback(Step("rmdir", log))
    undo.callback(Step("cgroup", log, failures=1))
    undo.callback(Step("umount", log))
    with pytest.raises(OSError, match="cgroup busy"):
        undo.close()
    # Every step was tried even though one failed in the middle.
    assert log == ["umount", "cgroup", "rmdir"]
    assert undo.pending == 1
    log.clear()
    undo.close()
    assert log == ["cgroup"]
    assert undo.pending == 0
    undo.close()  # closing an empty stack again is a no-op
    assert log == ["cgroup"]


def test_the_first_failure_is_raised_and_all_failures_stay():
    log: list[str] = []
    undo = Cleanup()
    undo.callback(Step("a", log, failures=2))
    undo.callback(Step("b", log, failures=1))
    with pytest.raises(OSError, match="b busy"):  # newest first, so b failed first
        undo.close()
    assert undo.pending == 2
    with pytest.raises(OSError, match="a busy"):
        undo.close()
    assert undo.pending == 1
    undo.close()
    assert log == ["b", "a", "b", "a", "a"]


def test_pop_all_transfers_every_step():
    log: list[str] = []
    undo = Cleanup()
    undo.callback(Step("first", log))
    undo.callback(Step("second", log))
    owned = undo.pop_all()
    assert (undo.pending, owned.pending) == (0, 2)
    undo.close()
    assert log == []
    owned.close()
    assert log == ["second", "first"]


def test_exit_with_an_exception_rolls_back_and_the_error_propagates():
    log: list[str] = []
    undo = Cleanup()

    def create() -> None:
        with undo:
            undo.callback(Step("one", log))
            undo.callback(Step("two", log))
            raise ValueError("step 3 failed")

    with pytest.raises(ValueError, match="step 3 failed"):
        create()
    assert log == ["two", "one"]
    assert undo.pending == 0


def test_exit_without_an_exception_keeps_the_steps():
    log: list[str] = []
    with Cleanup() as undo:
        undo.callback(Step("kept", log))
    assert log == []
    assert undo.pending == 1


def test_success_hands_over_with_pop_all_so_nothing_is_undone():
    log: list[str] = []
    with Cleanup() as undo:
        undo.callback(Step("cgroup", log))
        owned = undo.pop_all()
    assert log == []
    owned.close()
    assert log == ["cgroup"]


def test_a_failing_rollback_step_does_not_mask_the_original_error():
    log: list[str] = []
    undo = Cleanup()

    def create() -> None:
        with undo:
            undo.callback(Step("fine", log))
            undo.callback(Step("broken", log, failures=5))
            raise KeyError("original")

    with pytest.raises(KeyError, match="original"):
        create()
    assert log == ["broken", "fine"]
    assert undo.pending == 1  # the failed step can still be retried
    with pytest.raises(OSError, match="broken busy"):
        undo.close()
