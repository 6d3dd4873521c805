"""The operations listener of a real server: /metrics read while containers run and after
they are destroyed (checked against the cgroup files), /healthz and /readyz around a slow
startup reconcile, READY=1 over $NOTIFY_SOCKET, and JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import gactor
from gactor import ContainerSpec, Limits, MemoryLimits

from .helpers import E2E_MARKS, cgroup_dirs, sh, wait_for
from .servers import free_port

pytestmark = E2E_MARKS

MiB = 1 << 20


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def number(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The value of a sample that must be there."""
    found = value(parsed, name, **labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def handles_in(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    return {
        dict(labels)["handle"] for name, labels in parsed if name.startswith("gactor_container_")
    }


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    text: str


_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({})
)  # loopback only, never a proxy


def _get(url: str) -> Reply:
    try:
        with _OPENER.open(url, timeout=10) as response:
            return Reply(
                response.status, response.headers["content-type"], response.read().decode()
            )
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers["content-type"], err.read().decode())


class Ops:
    """The operations listener of one server, over HTTP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.flag = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> Reply:
        return await trio.to_thread.run_sync(_get, self.url + path)

    async def status(self, path: str) -> int | None:
        """The status of ``path``, None while nothing listens."""
        try:
            return (await self.get(path)).status
        except (urllib.error.URLError, OSError):
            return None

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        reply = await self.get("/metrics")
        assert reply.status == 200
        assert reply.content_type.startswith("text/plain")
        return samples(reply.text)


def read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def cgroup_file(handle: str, name: str) -> str:
    """The content of ``name`` in the container's cgroup (v2 layout, else the v1 one)."""
    for directory in cgroup_dirs(handle, max_depth=6):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
    pytest.fail(f"no {name} in any cgroup of {handle}")


async def test_metrics_follow_containers_and_their_destroy(own_servers):
    ops = Ops()
    server = own_servers("ops-metrics", "10.246.121.0/24", "--metrics-listen", ops.flag)
    await server.start()
    limit = 64 * MiB
    async with server.connect() as client:
        first = await client.create(
            ContainerSpec(handle="ops-a", limits=Limits(memory=MemoryLimits(limit_in_bytes=limit)))
        )
        second = await client.create(ContainerSpec(handle="ops-b"))
        # Something to count: a resident process, some memory and CPU, a file on disk.
        await first.run(gactor.ProcessSpec(path="sleep", args=["300"]), gactor.ProcessIO())
        code, _, _ = await sh(
            first,
            "dd if=/dev/zero of=/tmp/blob bs=1M count=4 2>/dev/null; "
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        )
        assert code == 0
        with pytest.raises(gactor.ContainerNotFoundError):
            await client.lookup("ops-missing")

        parsed = await ops.metrics()
        assert handles_in(parsed) == {"ops-a", "ops-b"}
        assert value(parsed, "gactor_containers", state="active") == 2
        assert value(parsed, "gactor_container_info", handle="ops-a", state="active") == 1
        # The limit as the kernel has it (rounded to pages), and no limit series without one.
        memory_max = (
            cgroup_file("ops-a", "memory.max")
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers")
            else cgroup_file("ops-a", "memory.limit_in_bytes")
        )
        assert value(parsed, "gactor_container_memory_limit_bytes", handle="ops-a") == int(
            memory_max
        )
        assert value(parsed, "gactor_container_memory_limit_bytes", handle="ops-b") is None
        usage = number(parsed, "gactor_container_memory_usage_bytes", handle="ops-a")
        assert 0 < usage < limit
        pids = number(parsed, "gactor_container_pids", handle="ops-a")
        assert pids >= 2  # init and sleep
        cpu = number(parsed, "gactor_container_cpu_usage_seconds_total", handle="ops-a")
        assert cpu > 0
        disk = number(parsed, "gactor_container_disk_bytes", handle="ops-a", scope="exclusive")
        assert disk >= 4 * MiB
        assert value(parsed, "gactor_container_oom_kills_total", handle="ops-a") == 0
        assert (
            value(parsed, "gactor_container_network_receive_bytes_total", handle="ops-a")
            is not None
        )
        assert value(parsed, "gactor_subnet_pool_addresses_in_use") == 2
        assert value(parsed, "gactor_subnet_pool_subnets") == 64
        assert value(parsed, "gactor_shims_alive") == 2
        assert value(parsed, "gactor_image_copies") == 1  # both run on one copy of the rootfs
        assert number(parsed, "gactor_image_store_bytes") > 1 * MiB
        assert value(parsed, "gactor_ready") == 1
        assert value(parsed, "gactor_registry_answered") == 1
        fds = number(parsed, "process_open_fds")
        assert fds > 0
        rss = number(parsed, "process_resident_memory_bytes")
        assert rss > 10 * MiB
        # The calls this test made, by method and outcome.
        assert (
            value(
                parsed,
                "gactor_api_requests_total",
                method="create",
                front_end="websocket",
                outcome="ok",
            )
            == 2
        )
        assert (
            value(
                parsed,
                "gactor_api_requests_total",
                method="lookup",
                front_end="websocket",
                outcome="error",
            )
            == 1
        )
        assert (
            value(
                parsed,
                "gactor_api_request_duration_seconds_count",
                method="run",
                front_end="websocket",
            )
            == 2
        )

        await client.destroy(first.handle)
        parsed = await ops.metrics()
        assert handles_in(parsed) == {"ops-b"}, "a destroyed container's series stayed"
        assert value(parsed, "gactor_containers", state="active") == 1
        assert value(parsed, "gactor_shims_alive") == 1
        await client.destroy(second.handle)
        parsed = await ops.metrics()
        assert handles_in(parsed) == set()
        assert value(parsed, "gactor_containers", state="active") == 0
    await server.finish()


async def test_oom_kills_are_counted(own_servers):
    ops = Ops()
    server = own_servers("ops-oom", "10.246.122.0/24", "--metrics-listen", ops.flag)
    await server.start()
    async with server.connect() as client:
        small = await client.create(
            ContainerSpec(
                handle="ops-oom", limits=Limits(memory=MemoryLimits(limit_in_bytes=32 * MiB))
            )
        )
        code, _, _ = await sh(small, "dd if=/dev/zero of=/dev/shm/x bs=1M count=48")
        assert code == 137
        parsed = await ops.metrics()
        assert value(parsed, "gactor_container_oom_kills_total", handle="ops-oom") == 1
        assert value(parsed, "gactor_containers", state="stopped") == 1
        await client.destroy(small.handle)
    await server.finish()


def _notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock


def _datagrams(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


async def test_readyz_flips_after_a_slow_reconcile_and_ready_is_notified(own_servers, monkeypatch):
    """A stopped shim holds startup reconcile for its adopt timeout: meanwhile /healthz is
    200 and /readyz 503; READY=1 reaches $NOTIFY_SOCKET only once /readyz is 200."""
    ops = Ops()
    server = own_servers("ops-ready", "10.246.123.0/24", "--metrics-listen", ops.flag)
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="ops-hung"))
    await server.kill(signal.SIGKILL)
    shim_pid = read_int(os.path.join(server.container_dir("ops-hung"), "shim.pid"))
    notify = _notify_socket(os.path.join(server.base, "notify.sock"))
    os.kill(shim_pid, signal.SIGSTOP)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(server.base, "notify.sock"))
        server.spawn()
        monkeypatch.delenv("NOTIFY_SOCKET")
        await wait_for(lambda: ops.status("/healthz"), within=30, what="/healthz to answer")
        assert await ops.status("/healthz") == 200
        assert await ops.status("/readyz") == 503
        assert (await ops.get("/readyz")).text.startswith("starting")
        assert value(await ops.metrics(), "gactor_ready") == 0
        assert [d for d in _datagrams(notify) if "READY=1" in d] == []

        async def ready() -> bool:
            return await ops.status("/readyz") == 200

        await wait_for(ready, within=30, what="/readyz to turn 200")
        await wait_for(
            lambda: [d for d in _datagrams(notify) if "READY=1" in d],
            within=5,
            what="READY=1 on $NOTIFY_SOCKET",
        )
        assert await server.pings()
        assert value(await ops.metrics(), "gactor_ready") == 1
    finally:
        os.kill(shim_pid, signal.SIGCONT)
        notify.close()
    await server.finish()


async def test_json_logs_carry_the_request_and_never_the_token(own_servers):
    token = "s3cr3t-0ps-t0ken"
    server = own_servers(
        "ops-json", "10.246.124.0/24", "--log-format", "json", "--log-level", "debug", token=token
    )
    await server.start()
    async with server.connect() as client:
        container = await client.create(ContainerSpec(handle="ops-json"))
        with pytest.raises(gactor.GardenError):
            await container.attach("no-such-process", gactor.ProcessIO())
        await client.destroy(container.handle)
    await server.finish()
    entries: list[dict[str, Any]] = []
    for line in server.log_text().splitlines():
        if line.startswith("==== "):
            continue  # the harness's own notes
        entries.append(json.loads(line))  # every line the server wrote is one JSON object
    assert entries
    assert all({"time", "level", "logger", "event", "pid"} <= entry.keys() for entry in entries)
    calls = [e for e in entries if e["event"].startswith("api call attach")]
    assert calls, "no debug line for the attach call"
    assert calls[0]["handle"] == "ops-json"
    assert calls[0]["process_id"] == "no-such-process"
    assert len(calls[0]["request_id"]) == 12
    assert "error" in calls[0]["event"]
    # The container actor's own lines carry its handle.
    assert any(e["logger"] == "gactor.container" and e.get("handle") == "ops-json" for e in entries)
    assert not any(e["logger"].startswith("pyroute2") and e["level"] == "debug" for e in entries)
    assert token not in server.log_text()


async def test_a_busy_metrics_address_is_a_configuration_error(own_servers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = own_servers("ops-busy", "10.246.125.0/24", "--metrics-listen", f"127.0.0.1:{port}")
        server.spawn()
        assert await server.wait_exit(30), server.log_tail()
    assert server.returncode == 2, server.log_tail()
    assert f"error: --metrics-listen: cannot listen on 127.0.0.1:{port}" in server.log_text()


async def test_scrapes_during_creates_and_destroys_never_fail(own_servers):
    """Containers destroyed between the census and the reads of their cgroups and
    directories are skipped (gactor_metrics_read_errors), never a failed scrape."""
    ops = Ops()
    server = own_servers("ops-churn", "10.246.126.0/24", "--metrics-listen", ops.flag)
    await server.start()
    scrapes: list[int] = []
    async with server.connect() as client:

        async def churn(worker: int) -> None:
            for i in range(8):
                handle = f"ops-churn-{worker}-{i}"
                await client.create(ContainerSpec(handle=handle))
                await client.destroy(handle)

        async def scrape_meanwhile(done: trio.Event) -> None:
            while not done.is_set():
                scrapes.append((await ops.get("/metrics")).status)

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape_meanwhile, done)
            async with trio.open_nursery() as workers:
                for worker in range(4):
                    workers.start_soon(churn, worker)
            done.set()
        parsed = await ops.metrics()
    assert len(scrapes) >= 5
    assert set(scrapes) == {200}
    assert handles_in(parsed) == set()
    await server.finish()
