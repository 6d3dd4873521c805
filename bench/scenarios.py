"""The timed scenarios, each against one client connection to the bench's server.

Every container is named by :class:`Handles` and recorded as possibly alive *before*
its create is sent, so the harness can destroy it whatever happens. Only the awaited
client call is inside the timer.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import trio

import gactor
from gactor import ContainerSpec, ProcessIO, ProcessSpec, StreamInSpec, StreamOutSpec

from .report import Series

OP_TIMEOUT = 60.0
BULK_TIMEOUT = 600.0


class BenchError(Exception):
    """A scenario could not produce a valid measurement."""


class Handles:
    """Unique container handles under one prefix, and the set that may still exist."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.live: set[str] = set()
        self._n = itertools.count()

    def new(self, kind: str) -> str:
        return f"{self.prefix}-{kind}-{next(self._n)}"


class CountingSink:
    """A ProcessIO sink that only counts bytes."""

    def __init__(self) -> None:
        self.count = 0

    async def send_all(self, data: bytes) -> None:
        self.count += len(data)


async def create(client: Any, handles: Handles, kind: str) -> tuple[Any, float]:
    """Create a container; return it and the create latency in ms."""
    handle = handles.new(kind)
    handles.live.add(handle)
    with trio.fail_after(OP_TIMEOUT):
        start = perf_counter()
        container = await client.create(ContainerSpec(handle=handle))
        return container, (perf_counter() - start) * 1e3


async def destroy(client: Any, handles: Handles, handle: str) -> float:
    """Destroy a container; return the latency in ms."""
    with trio.fail_after(OP_TIMEOUT):
        start = perf_counter()
        await client.destroy(handle)
        elapsed = (perf_counter() - start) * 1e3
    handles.live.discard(handle)
    return elapsed


async def create_destroy(client: Any, handles: Handles, runs: int) -> list[Series]:
    """Serial create then destroy, timed separately; the first create (image import) apart."""
    first = Series("create_first", "create, first (image import)", "ms")
    creates = Series("create", "create (serial)", "ms")
    destroys = Series("destroy", "destroy (serial)", "ms")
    container, ms = await create(client, handles, "serial")
    first.samples.append(ms)
    await destroy(client, handles, container.handle)
    for _ in range(runs):
        container, ms = await create(client, handles, "serial")
        creates.samples.append(ms)
        destroys.samples.append(await destroy(client, handles, container.handle))
    return [first, creates, destroys]


async def run_true(container: Any, runs: int) -> Series:
    """``true`` + wait in one long-lived container (one untimed warm-up run)."""
    series = Series("run", "run `true` + wait", "ms")
    for i in range(runs + 1):
        with trio.fail_after(OP_TIMEOUT):
            start = perf_counter()
            process = await container.run(ProcessSpec(path="true"), ProcessIO())
            code = await process.wait()
            elapsed = (perf_counter() - start) * 1e3
        if code != 0:
            raise BenchError(f"`true` exited with {code}")
        if i:
            series.samples.append(elapsed)
    return series


async def stdout_throughput(container: Any, runs: int, mib: int) -> Series:
    """``dd if=/dev/zero bs=1M count=<mib>`` into a counting sink, in decimal MB/s."""
    series = Series("stdout", f"stdout {mib} MiB (dd)", "MB/s")
    spec = ProcessSpec(path="dd", args=["if=/dev/zero", "bs=1M", f"count={mib}"])
    for _ in range(runs):
        sink = CountingSink()
        with trio.fail_after(OP_TIMEOUT * 5):
            start = perf_counter()
            process = await container.run(spec, ProcessIO(stdout=sink))
            code = await process.wait()
            elapsed = perf_counter() - start
        if code != 0 or sink.count != mib << 20:
            raise BenchError(f"dd exited with {code} after {sink.count} of {mib << 20} bytes")
        series.samples.append(sink.count / 1e6 / elapsed)
    return series


MiB = 1 << 20


async def _one_file_tar(mib: int) -> Any:
    """An uncompressed tar holding one ``mib`` MiB file ``blob``, in 1 MiB chunks."""
    header = tarfile.TarInfo("blob")
    header.size, header.mode = mib * MiB, 0o644
    yield header.tobuf(format=tarfile.PAX_FORMAT)
    chunk = b"\xa5" * MiB
    for _ in range(mib):
        yield chunk
    yield bytes(2 * tarfile.BLOCKSIZE)


async def stream_throughput(container: Any, runs: int, mib: int) -> list[Series]:
    """StreamIn of a tar holding one ``mib`` MiB file, then StreamOut of that file, in
    decimal MB/s of the file's size; interleaved, the same tar into the image's busybox
    ``tar -xf -`` through ``run`` with the tar as stdin (how StreamIn extracted before
    issue 9: busybox tar fed the same way), so the rows compare within one run."""
    into = Series("stream_in", f"StreamIn {mib} MiB", "MB/s")
    out = Series("stream_out", f"StreamOut {mib} MiB", "MB/s")
    busybox = Series("stream_in_busybox", f"busybox tar -x {mib} MiB via run", "MB/s")
    size = mib * MiB
    for _ in range(runs):
        with trio.fail_after(OP_TIMEOUT * 5):
            start = perf_counter()
            await container.stream_in(StreamInSpec(path="/tmp/bench-in", tar_stream=_one_file_tar(mib)))
            into.samples.append(size / 1e6 / (perf_counter() - start))
            got = 0
            start = perf_counter()
            async with await container.stream_out(StreamOutSpec(path="/tmp/bench-in/blob")) as chunks:
                async for chunk in chunks:
                    got += len(chunk)
            elapsed = perf_counter() - start
            if got < size:
                raise BenchError(f"StreamOut gave {got} bytes, less than the {size}-byte file")
            out.samples.append(size / 1e6 / elapsed)
            spec = ProcessSpec(path="tar", args=["-xf", "-"], dir="/tmp/bench-busybox")
            start = perf_counter()
            process = await container.run(spec, ProcessIO(stdin=_one_file_tar(mib)))
            code = await process.wait()
            elapsed = perf_counter() - start
            if code != 0:
                raise BenchError(f"busybox tar -x exited with {code}")
            busybox.samples.append(size / 1e6 / elapsed)
            rm = await container.run(ProcessSpec(path="rm", args=["-rf", "/tmp/bench-in", "/tmp/bench-busybox"]),
                                     ProcessIO())
            await rm.wait()
    return [into, out, busybox]


async def concurrent(
    client: Any, handles: Handles, n: int, runs: int, while_alive: Callable[[], Awaitable[None]]
) -> list[Series]:
    """``n`` creates at once in a nursery, ``while_alive()``, then ``n`` destroys at once."""
    creates = Series("concurrent_create", f"{n} concurrent creates", "s")
    destroys = Series("concurrent_destroy", f"{n} concurrent destroys", "s")
    ping_p99 = Series("ping_p99_during_destroys", f"ping p99 during {n} concurrent destroys", "ms")
    for _ in range(runs):
        names = [handles.new("conc") for _ in range(n)]
        handles.live.update(names)
        creates.samples.append(
            await _all_at_once(lambda h: client.create(ContainerSpec(handle=h)), names)
        )
        await while_alive()
        pings: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ping_until_cancelled, client, pings)
            destroys.samples.append(await _all_at_once(client.destroy, names))
            nursery.cancel_scope.cancel()
        if pings:
            ping_p99.samples.append(sorted(pings)[min(len(pings) - 1, int(len(pings) * 0.99))])
        handles.live.difference_update(names)
    return [creates, destroys, ping_p99]


async def _ping_until_cancelled(client: Any, latencies: list[float]) -> None:
    """The event loop's responsiveness: ping latencies (ms), one ping at a time."""
    while True:
        start = perf_counter()
        await client.ping()
        latencies.append((perf_counter() - start) * 1e3)


async def _all_at_once(call: Callable[[str], Awaitable[object]], handles: list[str]) -> float:
    """Wall time in s of ``call(h)`` for every handle at once; raises if any failed."""
    errors: list[str] = []

    async def one(handle: str) -> None:
        try:
            await call(handle)
        except gactor.GardenError as err:
            errors.append(f"{handle}: {err}")

    with trio.fail_after(BULK_TIMEOUT):
        start = perf_counter()
        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(one, handle)
        elapsed = perf_counter() - start
    if errors:
        raise BenchError(f"{len(errors)} of {len(handles)} failed, e.g. {errors[0]}")
    return elapsed
