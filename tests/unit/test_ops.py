"""The operations pieces in one process, without a server: the HTTP listener on a real
loopback socket, the API call observer, log formatting and redaction, sd_notify."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gactor.actors.container import State
from gactor.actors.registry import Census
from gactor.errors import GardenError
from gactor.kernel.errors import KernelError
from gactor.ops import http as ops_http
from gactor.ops import logs
from gactor.ops.metrics import CENSUS_TIMEOUT, ApiObserver, Scraper
from gactor.ops.notify import ServiceManager
from gactor.transport.listeners import TcpAddress, UnixAddress

# ---- the HTTP listener -------------------------------------------------------------------


async def _serve(nursery: trio.Nursery, scraper: Scraper) -> int:
    url = await nursery.start(
        ops_http.serve, ops_http.OpsRoutes(scraper), TcpAddress("127.0.0.1", 0)
    )
    return int(url.rsplit(":", 1)[1])


async def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


def _get(path: str, method: str = "GET", close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_health_and_readiness(tmp_path: Path) -> None:
    scraper = Scraper(str(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, scraper)
        assert _status(await _exchange(port, _get("/healthz"))) == 200
        not_ready = await _exchange(port, _get("/readyz"))
        assert _status(not_ready) == 503
        assert not_ready.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        scraper.ready = True
        ready = await _exchange(port, _get("/readyz?verbose"))
        assert _status(ready) == 200
        assert ready.endswith(b"\r\n\r\nready\n")
        nursery.cancel_scope.cancel()


async def test_a_unix_socket_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "ops.sock")
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            ops_http.serve, ops_http.OpsRoutes(Scraper(str(tmp_path))), UnixAddress(path)
        )
        assert url == f"unix://{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(_get("/healthz"))
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 OK")
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)  # removed on the way out


async def test_metrics_before_the_registry_runs(tmp_path: Path) -> None:
    scraper = Scraper(str(tmp_path))
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, scraper)
        response = await _exchange(port, _get("/metrics"))
        nursery.cancel_scope.cancel()
    head, _, body = response.partition(b"\r\n\r\n")
    assert _status(response) == 200
    assert b"content-type: text/plain" in head.lower()
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {
        "gactor_ready",
        "gactor_shims_alive",
        "process_open_fds",
        "process_resident_memory_bytes",
    } <= names
    assert "gactor_containers" not in names  # nothing is said about containers before the census
    assert b'gactor_build_info{version="' in body


async def test_head_404_405_and_bad_requests(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, Scraper(str(tmp_path)))
        head = await _exchange(port, _get("/healthz", method="HEAD"))
        assert _status(head) == 200
        assert b"content-length: 3" in head.lower()
        assert head.endswith(b"\r\n\r\n")  # no body
        assert _status(await _exchange(port, _get("/nothing"))) == 404
        assert _status(await _exchange(port, _get("/metrics", method="POST"))) == 405
        assert _status(await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")) == 400
        huge = (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
            + b"a" * (2 * ops_http.MAX_HEAD_BYTES)
            + b"\r\n\r\n"
        )
        assert _status(await _exchange(port, huge)) == 431
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_on_one_connection(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, Scraper(str(tmp_path)))
        both = await _exchange(port, _get("/healthz", close=False) + _get("/readyz"))
        assert both.count(b"HTTP/1.1 ") == 2
        assert b"ok\n" in both
        assert b"starting" in both
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_is_closed(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, Scraper(str(tmp_path)))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            start = trio.current_time()
            # Closed by the server, having said nothing.
            assert await stream.receive_some(100) == b""
            assert trio.current_time() - start == pytest.approx(ops_http.IDLE_TIMEOUT, abs=0.1)
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_are_closed(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, Scraper(str(tmp_path)))
        held = [
            await trio.open_tcp_stream("127.0.0.1", port) for _ in range(ops_http.MAX_CONNECTIONS)
        ]
        # A request on each proves every held connection has its slot.
        for stream in held:
            await stream.send_all(_get("/healthz", close=False))
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        assert await _exchange(port, _get("/healthz")) == b""
        for stream in held:
            await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert _status(await _exchange(port, _get("/healthz"))) == 200
        nursery.cancel_scope.cancel()


async def test_shutting_down_drops_open_connections(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, Scraper(str(tmp_path)))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(_get("/healthz", close=False))
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        assert await stream.receive_some(4096) == b""  # closed by the server on its way out
    await stream.aclose()
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", port)  # and nothing listens any more


async def test_a_cancelled_scrape_leaves_the_next_one_clean(tmp_path: Path) -> None:
    scraper = Scraper(str(tmp_path))
    with trio.move_on_after(0) as scope:
        await scraper.scrape()
    assert scope.cancelled_caught
    assert scraper.collector.sample is None
    with trio.fail_after(10):
        text = (await scraper.scrape()).decode()
    assert "gactor_ready 0.0" in text


async def test_concurrent_scrapes_take_turns(tmp_path: Path) -> None:
    scraper = Scraper(str(tmp_path))
    texts: list[bytes] = []

    async def one() -> None:
        texts.append(await scraper.scrape())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert len(texts) == 5
    assert all(b"gactor_ready 0.0" in text for text in texts)


class _StuckRegistry:
    """A registry actor that never answers (its mailbox wedged, say)."""

    async def census(self) -> None:
        await trio.sleep_forever()


async def test_a_stuck_registry_does_not_hold_the_scrape(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    scraper = Scraper(str(tmp_path))
    scraper.registry = _StuckRegistry()  # type: ignore[assignment]
    scraper.ready = True
    start = trio.current_time()
    text = (await scraper.scrape()).decode()
    assert trio.current_time() - start == pytest.approx(CENSUS_TIMEOUT)
    assert "gactor_registry_answered 0.0" in text
    assert "gactor_ready 1.0" in text
    assert "gactor_containers" not in text


class _BrokenRegistry:
    async def census(self) -> None:
        raise RuntimeError("the census failed")


async def test_a_failing_scrape_is_a_500_and_the_listener_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scraper = Scraper(str(tmp_path))
    scraper.registry = _BrokenRegistry()  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, scraper)
        with caplog.at_level(logging.ERROR):
            failed = await _exchange(port, _get("/metrics"))
        assert _status(failed) == 500
        assert "the census failed" in caplog.text
        assert _status(await _exchange(port, _get("/healthz"))) == 200
        nursery.cancel_scope.cancel()


class _GoneContainer:
    """A listed container whose cgroup or directory vanished after the census."""

    def __init__(self, handle: str, error: Exception) -> None:
        self.handle = handle
        self.state = State.ACTIVE
        self._error = error

    @property
    def cgroup(self) -> None:
        raise self._error


class _Census:
    def __init__(self, *containers: object) -> None:
        self.containers = containers

    async def census(self) -> Census:
        return Census(self.containers, creating=1)  # type: ignore[arg-type]


async def test_containers_gone_since_the_census_are_read_errors(tmp_path: Path) -> None:
    scraper = Scraper(str(tmp_path))
    scraper.registry = _Census(  # type: ignore[assignment]
        _GoneContainer("cgroup-gone", KernelError("cgroup.memory_stat", errno.ENOENT, "gone")),
        _GoneContainer("dir-gone", FileNotFoundError(errno.ENOENT, "no such directory")),
    )
    parsed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families((await scraper.scrape()).decode())
        for s in f.samples
    }
    assert parsed[("gactor_metrics_read_errors", ())] == 2
    assert parsed[("gactor_containers", (("state", "active"),))] == 2
    assert parsed[("gactor_containers", (("state", "creating"),))] == 1
    # Listed (info), but no readings for either.
    assert parsed[("gactor_container_info", (("handle", "dir-gone"), ("state", "active")))] == 1
    assert not any(name == "gactor_container_pids" for name, _ in parsed)


# ---- the API call observer -------------------------------------------------------------


async def test_the_observer_counts_outcomes_and_bounds_the_method_label() -> None:
    registry = CollectorRegistry()
    observer = ApiObserver(registry)
    with observer.observe("ping", "websocket", {}):
        pass
    with pytest.raises(GardenError), observer.observe("info", "garden", {"handle": "h"}):
        raise GardenError("unknown handle: h")
    with trio.move_on_after(0) as scope, observer.observe("create", "websocket", {}):
        await trio.sleep(1)
    assert scope.cancelled_caught
    with pytest.raises(GardenError), observer.observe("no-such-method\n", "websocket", {}):
        raise GardenError("unknown method")

    def count(method: str, front_end: str, outcome: str) -> float | None:
        return registry.get_sample_value(
            "gactor_api_requests_total",
            {"method": method, "front_end": front_end, "outcome": outcome},
        )

    assert count("ping", "websocket", "ok") == 1
    assert count("info", "garden", "error") == 1
    assert count("create", "websocket", "cancelled") == 1
    assert count("unknown", "websocket", "error") == 1
    assert (
        registry.get_sample_value(
            "gactor_api_request_duration_seconds_count",
            {"method": "ping", "front_end": "websocket"},
        )
        == 1
    )


async def test_the_observer_binds_the_request_to_log_lines() -> None:
    observer = ApiObserver(CollectorRegistry())
    with observer.observe("signal", "websocket", {"handle": "h1", "process_id": "p1"}):
        inside = dict(logs.context())
        in_thread = await trio.to_thread.run_sync(lambda: dict(logs.context()))
    assert inside["handle"] == "h1"
    assert inside["process_id"] == "p1"
    assert len(inside["request_id"]) == 12
    assert in_thread == inside  # worker threads (and child tasks) inherit the context
    assert dict(logs.context()) == {}


# ---- log formatting ----------------------------------------------------------------------


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(message % args)
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord("gactor.test", logging.WARNING, __file__, 1, message, args, exc_info)


@pytest.mark.parametrize("secret", ["plain-secret-123", 'quo"te\\back\nnl'])
def test_json_lines_never_carry_the_token(secret: str) -> None:
    formatter = logs.JsonFormatter(secret)
    with logs.bind(handle=f"h-{secret}"):
        line = formatter.format(_record("token %s leaked", secret, exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "token <token> leaked"
    assert entry["handle"] == "h-<token>"
    assert "RuntimeError: token <token> leaked" in entry["exception"]
    assert secret not in line
    assert json.dumps(secret)[1:-1] not in line  # nor its escaped form
    assert {"time", "level", "logger", "pid"} <= entry.keys()
    assert entry["level"] == "warning"


def test_console_lines_show_the_context_and_hide_the_token() -> None:
    formatter = logs.ConsoleFormatter("s3cret")
    with logs.bind(request_id="abc", handle="h"), logs.bind(process_id="p"):
        line = formatter.format(_record("said s3cret"))
    assert line.endswith("gactor.test: said <token> [request_id=abc handle=h process_id=p]")
    plain = formatter.format(_record("nothing bound"))
    assert plain.endswith("gactor.test: nothing bound")


def test_extra_fields_override_the_bound_ones() -> None:
    record = _record("x")
    record.handle = "given"
    with logs.bind(handle="bound"):
        assert json.loads(logs.JsonFormatter().format(record))["handle"] == "given"


def test_auto_format_follows_the_terminal() -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as tty:
            assert logs.resolve_format("auto", tty) == "console"
    finally:
        os.close(leader)
        os.close(follower)
    assert logs.resolve_format("auto", io.StringIO()) == "json"
    assert logs.resolve_format("console", io.StringIO()) == "console"


# ---- sd_notify -----------------------------------------------------------------------


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        manager = ServiceManager.from_environment()
        assert "NOTIFY_SOCKET" not in os.environ  # no child inherits it
        assert manager.notify("READY=1", "STATUS=serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_to_an_abstract_socket() -> None:
    name = f"gactor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert ServiceManager("@" + name).notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_or_with_a_dead_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not ServiceManager.from_environment().notify("READY=1")
    with caplog.at_level(logging.WARNING):
        assert not ServiceManager(str(tmp_path / "absent.sock")).notify("READY=1")
    assert "cannot notify the service manager" in caplog.text
