"""Prometheus metrics: API calls as they happen, everything else read at scrape time.

``ApiObserver`` is the ``CallObserver`` the API is built with: it counts and times
every call by method, front end and outcome, and binds the call's request id, handle
and process id to the log lines logged meanwhile. ``Scraper.scrape`` renders the
exposition text: it asks the registry actor for its census (one mailbox round trip),
then, in one worker thread, reads the cgroups of the containers listed and renders
that sample through ``ServerCollector``, a custom collector. A destroyed container is
not in the next census, so its series are gone from the next scrape; nothing is kept
per container between scrapes.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..actors import metrics as container_metrics
from ..actors.container import ContainerRef, State
from ..actors.registry import Census, RegistryRef
from ..errors import GardenError
from ..kernel import cgroups, depot, image_copies, shims
from ..kernel.errors import KernelError
from ..transport import methods
from ..types import Metrics
from . import logs

log = logging.getLogger("gactor.ops.metrics")

# The method label takes only these values, so a client cannot mint series.
STREAM_METHODS = frozenset({"run", "attach", "stream_in", "stream_out"})
KNOWN_METHODS = (
    frozenset(methods.API_METHODS) | frozenset(methods.CONTAINER_METHODS) | STREAM_METHODS
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
try:
    _VERSION = importlib.metadata.version("gactor")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    _VERSION = "unknown"
CENSUS_TIMEOUT = 5.0  # seconds a scrape waits for the registry before it renders without it
# Request ids tell a call's log lines from another's: unique, not secret, so no syscall each.
_REQUEST_IDS = random.Random(os.urandom(16))
# A container's series are read only in these states: before, its cgroup may not exist yet.
_MEASURED = (State.ACTIVE, State.STOPPED, State.BROKEN, State.DESTROYING)


class ApiObserver:
    """Counts and times API calls into ``registry``; see ``methods.CallObserver``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gactor_api_requests",
            "API calls answered, by method, front end and outcome (ok, error, cancelled).",
            ["method", "front_end", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "gactor_api_request_duration_seconds",
            "Time to answer an API call; for run, attach "
            "and stream_out until the stream opens, for stream_in until the archive is written.",
            ["method", "front_end"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # The labelled children, looked up once per label set (``labels`` validates and
        # locks on every call). They are never removed, so a cached one stays current.
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, front_end: str, args: dict[str, Any]) -> _Observation:
        return _Observation(self, method if method in KNOWN_METHODS else "unknown", front_end, args)

    def _record(self, name: str, front_end: str, outcome: str, elapsed: float) -> None:
        counter = self._counted.get((name, front_end, outcome))
        if counter is None:
            counter = self._counted[name, front_end, outcome] = self.requests.labels(name, front_end, outcome)
        counter.inc()
        histogram = self._timed.get((name, front_end))
        if histogram is None:
            histogram = self._timed[name, front_end] = self.latency.labels(name, front_end)
        histogram.observe(elapsed)


class _Observation:
    """One call under an ``ApiObserver``: its request id (and handle, process id) bound
    to the log lines logged meanwhile; on exit, counted by outcome and timed. A class
    rather than a generator-based context manager: it is entered on every call."""

    __slots__ = ("_observer", "_name", "_front_end", "_binding", "_start")

    def __init__(self, observer: ApiObserver, name: str, front_end: str, args: dict[str, Any]) -> None:
        self._observer = observer
        self._name = name
        self._front_end = front_end
        handle = args.get("handle")
        process_id = args.get("process_id")
        self._binding = logs.bind(
            request_id=f"{_REQUEST_IDS.getrandbits(48):012x}",
            handle=handle if isinstance(handle, str) else None,
            process_id=process_id if isinstance(process_id, str) else None,
        )
        self._start = 0.0

    def __enter__(self) -> None:
        self._binding.__enter__()
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        elapsed = time.perf_counter() - self._start
        try:
            if err is None:
                outcome, detail = "ok", ""
            else:
                outcome = "cancelled" if _is_cancelled(err) else "error"
                detail = f" ({err})" if isinstance(err, GardenError) else ""
            self._observer._record(self._name, self._front_end, outcome, elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("api call %s via %s: %s%s in %.1f ms", self._name, self._front_end, outcome, detail,
                          elapsed * 1e3)
        finally:
            self._binding.__exit__(kind, err, tb)


def _is_cancelled(err: BaseException) -> bool:
    if isinstance(err, BaseExceptionGroup):
        return any(_is_cancelled(e) for e in err.exceptions)
    return isinstance(err, trio.Cancelled)


@dataclass
class Sample:
    """One scrape's reading, gathered before rendering."""

    census: Census | None = None
    stats: dict[str, Metrics] = field(default_factory=dict)
    oom_kills: dict[str, int] = field(default_factory=dict)
    read_errors: int = 0
    shims_alive: int = 0
    image_copies: int = 0
    image_bytes: int = 0
    ready: bool = False
    registry_answered: bool = False
    gather_seconds: float = 0.0


class ServerCollector(Collector):
    """Renders the ``Sample`` set for the scrape in progress (none outside a scrape)."""

    def __init__(self) -> None:
        self.sample: Sample | None = None

    def collect(self) -> Iterable[Metric]:
        sample = self.sample
        if sample is None:
            return
        info = GaugeMetricFamily(
            "gactor_build_info", "1, labelled with the server's version.", labels=["version"]
        )
        info.add_metric([_VERSION], 1)
        yield info
        yield _gauge(
            "gactor_ready",
            "1 once startup reconcile is done and the API listens.",
            int(sample.ready),
        )
        yield _gauge(
            "gactor_registry_answered",
            "1 if the registry actor answered this scrape's census in time (0 before it runs).",
            int(sample.registry_answered),
        )
        yield _gauge(
            "gactor_shims_alive",
            "Container shim processes of this depot found running.",
            sample.shims_alive,
        )
        yield _gauge(
            "gactor_metrics_read_errors",
            "Listed containers whose cgroup could not be read "
            "in this scrape (destroyed meanwhile, say).",
            sample.read_errors,
        )
        yield _gauge(
            "gactor_metrics_gather_seconds",
            "Time this scrape took to read its sample.",
            sample.gather_seconds,
        )
        yield _gauge(
            "gactor_image_copies",
            "Image copies in the image store (the overlay lower dirs containers run on).",
            sample.image_copies,
        )
        yield _gauge(
            "gactor_image_store_bytes",
            "Disk the image copies take (as measured when each was made).",
            sample.image_bytes,
        )
        census = sample.census
        if census is None:
            return  # the registry is not up yet: nothing to say about containers
        yield from _server_families(census)
        yield from _container_families(census, sample)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _server_families(census: Census) -> Iterator[Metric]:
    by_state = GaugeMetricFamily("gactor_containers", "Containers by state.", labels=["state"])
    counts = {state.value: 0 for state in State if state is not State.DESTROYED}
    counts[State.CREATING.value] = census.creating
    for container in census.containers:
        state = getattr(container, "state", State.ACTIVE)
        counts[state.value] = counts.get(state.value, 0) + 1
    for state_name, count in counts.items():
        by_state.add_metric([state_name], count)
    yield by_state
    yield _gauge(
        "gactor_subnet_pool_addresses_in_use",
        "Container addresses live or held (dynamic /30s and static-subnet members).",
        census.subnets_in_use,
    )
    yield _gauge(
        "gactor_subnet_pool_subnets",
        "/30 subnets in the dynamic range (--network-pool).",
        census.subnets_capacity,
    )
    yield _gauge(
        "gactor_port_pool_ports_in_use",
        "NetIn host ports not available to hand out.",
        census.ports_size - census.ports_available,
    )
    yield _gauge(
        "gactor_port_pool_ports", "Host ports in the pool (--port-pool-size).", census.ports_size
    )


def _container_families(census: Census, sample: Sample) -> Iterator[Metric]:
    def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["handle", *(extra or [])])

    def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=["handle", *(extra or [])])

    info = gauge(
        "gactor_container_info", "1 for every listed container, with its state.", ["state"]
    )
    memory = gauge(
        "gactor_container_memory_usage_bytes", "Memory charged to the container's limit."
    )
    rss = gauge("gactor_container_memory_rss_bytes", "Anonymous memory (RSS) of the container.")
    cache = gauge("gactor_container_memory_cache_bytes", "Page cache charged to the container.")
    limit = gauge("gactor_container_memory_limit_bytes", "The memory limit (containers with one).")
    cpu = counter("gactor_container_cpu_seconds", "CPU time, by mode (user, system).", ["mode"])
    cpu_usage = counter("gactor_container_cpu_usage_seconds", "CPU time in total.")
    pids = gauge("gactor_container_pids", "Processes and threads in the container.")
    pids_max = gauge("gactor_container_pids_max", "The pids limit (containers with one).")
    disk = gauge(
        "gactor_container_disk_bytes",
        "Disk used: exclusive (the writable layer) or total (with the image).",
        ["scope"],
    )
    inodes = gauge("gactor_container_disk_inodes", "Inodes used, as disk_bytes.", ["scope"])
    rx = counter("gactor_container_network_receive_bytes", "Bytes the container received.")
    tx = counter("gactor_container_network_transmit_bytes", "Bytes the container sent.")
    ooms = counter("gactor_container_oom_kills", "Processes the kernel's OOM killer killed in it.")
    age = gauge("gactor_container_age_seconds", "Time since the container was created.")
    for container in census.containers:
        handle = container.handle
        state = getattr(container, "state", State.ACTIVE)
        info.add_metric([handle, state.value], 1)
        stat = sample.stats.get(handle)
        if stat is None:
            continue
        mem = stat.memory_stat
        memory.add_metric([handle], mem.total_usage_toward_limit)
        rss.add_metric([handle], mem.total_rss)
        cache.add_metric([handle], mem.total_cache)
        if 0 < mem.hierarchical_memory_limit < cgroups.UNLIMITED_BYTES:
            limit.add_metric([handle], mem.hierarchical_memory_limit)
        cpu.add_metric([handle, "user"], stat.cpu_stat.user / 1e9)
        cpu.add_metric([handle, "system"], stat.cpu_stat.system / 1e9)
        cpu_usage.add_metric([handle], stat.cpu_stat.usage / 1e9)
        pids.add_metric([handle], stat.pid_stat.current)
        if stat.pid_stat.max:
            pids_max.add_metric([handle], stat.pid_stat.max)
        disk.add_metric([handle, "exclusive"], stat.disk_stat.exclusive_bytes_used)
        disk.add_metric([handle, "total"], stat.disk_stat.total_bytes_used)
        inodes.add_metric([handle, "exclusive"], stat.disk_stat.exclusive_inodes_used)
        inodes.add_metric([handle, "total"], stat.disk_stat.total_inodes_used)
        if stat.network_stat is not None:
            rx.add_metric([handle], stat.network_stat.rx_bytes)
            tx.add_metric([handle], stat.network_stat.tx_bytes)
        if handle in sample.oom_kills:
            ooms.add_metric([handle], sample.oom_kills[handle])
        age.add_metric([handle], stat.age)
    yield from (
        info,
        memory,
        rss,
        cache,
        limit,
        cpu,
        cpu_usage,
        pids,
        pids_max,
        disk,
        inodes,
        rx,
        tx,
        ooms,
        age,
    )


class Scraper:
    """Owns the metrics registry: the API observer's counters, the server collector and
    the process collector (this server's fds, memory and CPU). ``registry`` is set once
    the registry actor runs, ``ready`` once startup is complete."""

    def __init__(self, depot_dir: str) -> None:
        self.containers_root = os.path.join(depot_dir, depot.CONTAINERS)
        self.image_store = os.path.join(depot_dir, depot.IMAGES)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only double every counter's lines
        self.prometheus = CollectorRegistry()
        self.api = ApiObserver(self.prometheus)
        self.collector = ServerCollector()
        self.prometheus.register(self.collector)
        ProcessCollector(registry=self.prometheus)
        self.registry: RegistryRef | None = None
        self.ready = False
        self._lock = trio.Lock()  # one scrape at a time: the collector renders one sample

    async def scrape(self) -> bytes:
        """The exposition text (the Prometheus text format) as of now: the registry's
        census (a mailbox round trip), then one worker-thread trip that reads what it
        lists and renders. A registry that does not answer within CENSUS_TIMEOUT gives a
        scrape without container series (``gactor_registry_answered 0``). Cancelled while
        waiting for the census or the lock: returns at once; while the thread runs: when
        it is done (milliseconds; the reads are not abandoned). Either way the next scrape
        starts clean."""
        async with self._lock:
            started = time.perf_counter()
            census, answered = None, False
            if self.registry is not None:
                with trio.move_on_after(CENSUS_TIMEOUT):
                    census = await self.registry.census()
                answered = census is not None
            sample = Sample(census=census, ready=self.ready, registry_answered=answered)
            return await trio.to_thread.run_sync(self._read_and_render, sample, started)

    def _read_and_render(self, sample: Sample, started: float) -> bytes:
        census = sample.census
        for container in census.containers if census is not None else ():
            if getattr(container, "state", None) not in _MEASURED:
                continue
            ref: ContainerRef = container  # type: ignore[assignment]  # the registry holds ContainerRefs
            try:
                sample.stats[ref.handle] = container_metrics.read(ref)
                sample.oom_kills[ref.handle] = ref.cgroup.oom_kill_count()
            except (KernelError, OSError):  # destroyed since the census: cgroup or directory gone
                sample.read_errors += 1
        if os.path.isdir(self.containers_root):
            sample.shims_alive = len(shims.find(self.containers_root))
        self._read_image_store(sample)
        sample.gather_seconds = time.perf_counter() - started
        self.collector.sample = sample
        try:
            return generate_latest(self.prometheus)
        finally:
            self.collector.sample = None

    def _read_image_store(self, sample: Sample) -> None:
        """Each copy's size from its metadata (copies never change): one small file each."""
        try:
            names = os.listdir(self.image_store)
        except FileNotFoundError:
            return
        for name in names:
            if image_copies.TMP in name or ".old-" in name:
                continue  # being built or removed
            try:
                copy = image_copies.read(os.path.join(self.image_store, name, image_copies.ROOTFS))
            except KernelError:
                continue  # not a copy (the default depot also holds the busybox source)
            sample.image_copies += 1
            sample.image_bytes += copy.bytes
