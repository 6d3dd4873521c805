"""The ``gactor`` command line end to end: a subprocess per command against the real server."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import tarfile
import termios
import time
import uuid
from collections.abc import Iterator

import pytest

from .helpers import E2E_MARKS
from .servers import ServerProcess, gactor_command

pytestmark = E2E_MARKS
TIMEOUT = 60.0


def gactor(
    server: ServerProcess, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m gactor --target URL ARGS...``, stdout and stderr captured."""
    return subprocess.run(
        gactor_command("--target", server.url, *args),
        input=stdin if stdin is not None else b"", capture_output=True, timeout=TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


@pytest.fixture
def owner() -> str:
    """A property value no other test uses, so ``list --property`` sees only ours."""
    return f"cli-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def handle(gactor_server: ServerProcess, owner: str) -> Iterator[str]:
    """A container created by ``gactor create``; destroyed by ``gactor destroy`` after."""
    created = ok(gactor(gactor_server, "create", "--property", f"owner={owner}"))
    handle = created.strip()
    assert handle
    assert "\n" not in handle
    try:
        yield handle
    finally:
        gactor(gactor_server, "destroy", handle)


def test_ping_and_capacity(gactor_server: ServerProcess) -> None:
    assert ok(gactor(gactor_server, "ping")).strip() == "ok"
    capacity = json.loads(ok(gactor(gactor_server, "--json", "capacity")))
    assert capacity["memory_in_bytes"] > 0


def test_list_finds_by_property(gactor_server: ServerProcess, handle: str, owner: str) -> None:
    listed = ok(gactor(gactor_server, "list", "--property", f"owner={owner}"))
    assert listed.splitlines() == [handle]
    assert ok(gactor(gactor_server, "list", "--property", f"owner={owner}-not")) == ""
    assert json.loads(ok(gactor(gactor_server, "--json", "list", "--property", f"owner={owner}"))) == [handle]


def test_info_and_properties(gactor_server: ServerProcess, handle: str, owner: str) -> None:
    info = json.loads(ok(gactor(gactor_server, "--json", "info", handle)))
    assert info["state"] == "active"
    assert info["properties"]["owner"] == owner
    assert f"owner {owner}" in ok(gactor(gactor_server, "properties", handle)).splitlines()
    assert json.loads(ok(gactor(gactor_server, "--json", "properties", handle)))["owner"] == owner


def test_run_wires_stdout_stderr_and_exit_code(gactor_server: ServerProcess, handle: str) -> None:
    result = gactor(gactor_server, "run", handle, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_run_streams_piped_stdin(gactor_server: ServerProcess, handle: str) -> None:
    data = b"hello through the pipe\n" * 5000
    result = gactor(gactor_server, "run", handle, "--", "cat", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_run_env_dir_and_user(gactor_server: ServerProcess, handle: str) -> None:
    out = ok(gactor(gactor_server, "run", handle, "--env", "GREETING=hi", "--dir", "/tmp",
                    "--user", "root", "--", "sh", "-c", 'echo "$GREETING $(pwd) $(id -u)"'))
    assert out == "hi /tmp 0\n"


def test_stream_in_then_out(gactor_server: ServerProcess, handle: str) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        payload = b"payload\n"
        member = tarfile.TarInfo("greeting.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    result = gactor(gactor_server, "stream-in", handle, "--to", "/tmp/in", stdin=archive.getvalue())
    if b"not supported by this server yet" in result.stderr:
        pytest.skip("the server does not implement stream-in yet")
    ok(result)
    assert ok(gactor(gactor_server, "run", handle, "--", "cat", "/tmp/in/greeting.txt")) == "payload\n"

    result = gactor(gactor_server, "stream-out", handle, "--from", "/tmp/in/greeting.txt")
    assert result.returncode == 0, result.stderr
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        [member] = tar.getmembers()
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == b"payload\n"


def test_errors_are_one_line_and_exit_1(gactor_server: ServerProcess, handle: str) -> None:
    ok(gactor(gactor_server, "destroy", handle))
    result = gactor(gactor_server, "info", handle)
    assert result.returncode == 1
    assert result.stderr.decode() == f"error: unknown handle: {handle}\n"
    assert result.stdout == b""
    result = gactor(gactor_server, "run", handle, "--", "true")
    assert result.returncode == 1
    assert result.stderr.decode() == f"error: unknown handle: {handle}\n"


def _read_until_closed(fd: int, deadline: float) -> bytes:
    """Everything the pty master yields until the last slave closes (EIO) or the deadline."""
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the slave side is closed, the pty's EOF
            break
        if not chunk:
            break
        data += chunk
    return data


def test_run_tty_passes_window_size(gactor_server: ServerProcess, handle: str) -> None:
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        proc = subprocess.Popen(
            gactor_command("--target", gactor_server.url,
                           "run", "--tty", handle, "--", "stty", "size"),
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, start_new_session=True,
        )
        os.close(slave)
        slave = -1
        output = _read_until_closed(master, time.monotonic() + TIMEOUT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
        code = proc.returncode
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    if code != 0 and b"tty" in stderr.lower():
        pytest.skip(f"no tty support in this server: {stderr!r}")
    assert code == 0, (output, stderr)
    assert b"33 101" in output
