"""The timed scenarios, each against one client connection to the bench's server.

Every container is named by :class:`Handles` and recorded as possibly alive *before*
its create is sent, so the harness can destroy it whatever happens. Only the awaited
client call is inside the timer.
"""

from __future__ import annotations

import glob
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


def _container_cpu_ms(handle: str) -> float | None:
    """CPU the container's cgroup has used so far (every process in it), in ms; None
    where no cgroup of that name is found (v1 ``cpuacct.usage``, v2 ``cpu.stat``)."""
    for path in glob.glob(f"/sys/fs/cgroup/cpuacct/gactor-*/{handle}/cpuacct.usage"):
        with open(path) as f:
            return int(f.read()) / 1e6
    for path in glob.glob(f"/sys/fs/cgroup/gactor-*/{handle}/cpu.stat"):
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("usage_usec")) / 1e3
    return None


class _Timed:
    """Wall time (into a MB/s series) and the container's CPU (into an ms series) of a block."""

    def __init__(self, container: Any, size: int, rate: Series, cpu: Series) -> None:
        self.container, self.size, self.rate, self.cpu = container, size, rate, cpu

    def __enter__(self) -> None:
        self.cpu_start = _container_cpu_ms(self.container.handle)
        self.start = perf_counter()

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            return
        self.rate.samples.append(self.size / 1e6 / (perf_counter() - self.start))
        end = _container_cpu_ms(self.container.handle)
        if end is not None and self.cpu_start is not None:
            self.cpu.samples.append(end - self.cpu_start)


async def stream_throughput(container: Any, runs: int, mib: int) -> list[Series]:
    """StreamIn of a tar holding one ``mib`` MiB file, then StreamOut of that file: decimal
    MB/s of the file's size, and the CPU the container's cgroup spent (the tar process,
    and the shim's helper that forked it). Interleaved, the same through ``run`` of the
    image's busybox ``tar -xf -`` (the tar as stdin) and ``tar -cf - blob`` (stdout into
    a counting sink): what StreamIn and StreamOut ran before issue 9, fed the same way, so
    the rows compare within one run."""
    rows = {
        "in": (Series("stream_in", f"StreamIn {mib} MiB", "MB/s"),
               Series("stream_in_cpu", f"StreamIn {mib} MiB: container CPU", "ms")),
        "in_busybox": (Series("stream_in_busybox", f"busybox tar -x {mib} MiB via run", "MB/s"),
                       Series("stream_in_busybox_cpu", f"busybox tar -x {mib} MiB: container CPU", "ms")),
        "out": (Series("stream_out", f"StreamOut {mib} MiB", "MB/s"),
                Series("stream_out_cpu", f"StreamOut {mib} MiB: container CPU", "ms")),
        "out_busybox": (Series("stream_out_busybox", f"busybox tar -c {mib} MiB via run", "MB/s"),
                        Series("stream_out_busybox_cpu", f"busybox tar -c {mib} MiB: container CPU", "ms")),
    }  # fmt: skip
    size = mib * MiB

    def timed(kind: str) -> _Timed:
        return _Timed(container, size, *rows[kind])

    async def run(spec: ProcessSpec, io: ProcessIO, what: str) -> None:
        code = await (await container.run(spec, io)).wait()
        if code != 0:
            raise BenchError(f"{what} exited with {code}")

    for _ in range(runs):
        with trio.fail_after(OP_TIMEOUT * 5):
            with timed("in"):
                await container.stream_in(StreamInSpec(path="/tmp/bench-in", tar_stream=_one_file_tar(mib)))
            with timed("in_busybox"):
                await run(ProcessSpec(path="tar", args=["-xf", "-"], dir="/tmp/bench-busybox"),
                          ProcessIO(stdin=_one_file_tar(mib)), "busybox tar -x")
            got = 0
            with timed("out"):
                async with await container.stream_out(StreamOutSpec(path="/tmp/bench-in/blob")) as chunks:
                    async for chunk in chunks:
                        got += len(chunk)
            sink = CountingSink()
            with timed("out_busybox"):
                await run(ProcessSpec(path="tar", args=["-cf", "-", "blob"], dir="/tmp/bench-in"),
                          ProcessIO(stdout=sink), "busybox tar -c")
            if min(got, sink.count) < size:
                raise BenchError(f"an archive had {min(got, sink.count)} bytes, less than the {size}-byte file")
            await run(ProcessSpec(path="rm", args=["-rf", "/tmp/bench-in", "/tmp/bench-busybox"]), ProcessIO(), "rm")
    return [series for pair in rows.values() for series in pair if series.samples]


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
