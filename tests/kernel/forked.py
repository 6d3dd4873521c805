"""Running a check in a forked child: what it returns comes back through a pipe."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgpack


def in_child(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` in a forked child (which then exits) and return its msgpack-able result;
    an AssertionError if the child died before answering."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, msgpack.packb(fn()))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    assert data, "the child died before answering"
    return msgpack.unpackb(data)
