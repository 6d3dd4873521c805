"""Bearer-token authentication and the refusal to serve beyond loopback without one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

import gactor

from .helpers import E2E_MARKS, ROOTFS

pytestmark = E2E_MARKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gactor", "server", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def token_server() -> Iterator[str]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="gactor-auth-") as base:
        os.chmod(base, 0o711)
        proc = _server("--listen", f"127.0.0.1:{port}", "--depot", os.path.join(base, "depot"),
                       "--default-rootfs", ROOTFS, "--token", "s3cret")
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            yield f"ws://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


async def test_the_right_token_is_let_in(token_server: str) -> None:
    async with gactor.connect(token_server, token="s3cret") as client:
        await client.ping()


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_missing_or_wrong_token_is_refused(token_server: str, token: str | None) -> None:
    with pytest.raises(gactor.GardenError, match="cannot connect"):
        async with gactor.connect(token_server, token=token) as client:
            await client.ping()


def test_no_token_means_loopback_only() -> None:
    with tempfile.TemporaryDirectory(prefix="gactor-auth-") as base:
        proc = _server("--listen", f"0.0.0.0:{_free_port()}", "--depot", os.path.join(base, "depot"))
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert b"without --token" in out
