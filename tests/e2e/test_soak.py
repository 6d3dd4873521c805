"""Soak: N create -> run (stdout and stderr streamed) -> wait -> destroy cycles against the
shared session server, then nothing may be left: cgroups, mounts, depot entries, shims,
inits, and the server's fd count back at its baseline.

``GACTOR_SOAK_CYCLES`` sets N (default 100); cycles run ``SOAK_CONCURRENCY`` at a time,
each worker over its own connection.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import trio

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec

from .helpers import (
    E2E_MARKS,
    Sink,
    host_snapshot,
    wait_until_nothing_left,
)

pytestmark = E2E_MARKS

CYCLES = int(os.environ.get("GACTOR_SOAK_CYCLES", "100"))
SOAK_CONCURRENCY = 4


async def _cycle(client: Any, handle: str) -> None:
    container = await client.create(ContainerSpec(handle=handle))
    try:
        out, err = Sink(), Sink()
        process = await container.run(
            ProcessSpec(path="sh", args=["-c", "echo out; echo err >&2"]),
            ProcessIO(stdout=out, stderr=err),
        )
        code = await process.wait()
        assert (code, bytes(out.data), bytes(err.data)) == (0, b"out\n", b"err\n"), handle
    finally:
        await client.destroy(handle)


async def test_soak_create_run_destroy(gactor_server, client):
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    await _cycle(client, f"{prefix}-warm")  # the first container may build caches
    before = host_snapshot(gactor_server)
    todo = iter(range(CYCLES))
    done: list[int] = []

    async def worker() -> None:
        async with gactor.connect(gactor_server.url) as own:
            for i in todo:  # the workers share one iterator: each cycle runs once
                await _cycle(own, f"{prefix}-{i}")
                done.append(i)

    with trio.fail_after(max(60.0, CYCLES * 1.0)):
        async with trio.open_nursery() as nursery:
            for _ in range(SOAK_CONCURRENCY):
                nursery.start_soon(worker)
    assert sorted(done) == list(range(CYCLES))
    assert not [c.handle for c in await client.containers() if c.handle.startswith(prefix)]
    await wait_until_nothing_left(gactor_server, before)
