"""Bearer-token authentication, and what a listener beyond loopback requires: TLS and a
token, or ``--insecure`` said loudly. The token never appears in the server's log."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import gactor

from .helpers import E2E_MARKS
from .servers import ServerProcess, running_server
from .tls import self_signed

pytestmark = E2E_MARKS

TOKEN = "s3cret-7f1c9a2e5b"


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerProcess]:
    # debug: the most the server ever logs, and the token must not be in it
    with running_server("auth", "10.249.1.0/24", "--log-level", "debug", token=TOKEN) as server:
        yield server


async def test_the_right_token_is_let_in(token_server: ServerProcess) -> None:
    async with gactor.connect(token_server.url, token=TOKEN) as client:
        await client.ping()


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x"])
async def test_a_missing_or_wrong_token_is_refused(
    token_server: ServerProcess, token: str | None
) -> None:
    with pytest.raises(gactor.GardenError, match=r"cannot connect.*refused the handshake \(401\)"):
        async with gactor.connect(token_server.url, token=token) as client:
            await client.ping()


async def test_the_token_is_never_logged(token_server: ServerProcess) -> None:
    async with gactor.connect(token_server.url, token=TOKEN) as client:
        await client.ping()
        with pytest.raises(gactor.GardenError):
            await client.lookup(f"no-such-{TOKEN}")  # an error that would echo it back
    with pytest.raises(gactor.GardenError):
        async with gactor.connect(token_server.url, token=TOKEN + "x"):
            pass
    log = token_server.log_text()
    assert "gactor serving the websocket API" in log  # the log is the server's
    assert "refused a websocket handshake (401)" in log
    assert TOKEN not in log


async def _refused_at_startup(server: ServerProcess, host: str) -> str:
    server.spawn(host=host)
    assert await server.wait_exit(20), server.log_tail()
    assert server.returncode == 2, server.log_tail()
    return server.log_text()


async def test_no_token_means_loopback_only(own_servers: Callable[..., ServerProcess]) -> None:
    log = await _refused_at_startup(own_servers("auth-open", "10.249.2.0/24"), "0.0.0.0")
    assert "refusing to serve on 0.0.0.0 without --tls-cert/--tls-key and --token" in log


async def test_a_token_without_tls_is_not_enough_off_loopback(
    own_servers: Callable[..., ServerProcess],
) -> None:
    server = own_servers("auth-notls", "10.249.3.0/24", token=TOKEN)
    log = await _refused_at_startup(server, "0.0.0.0")
    assert "refusing to serve on 0.0.0.0 without --tls-cert/--tls-key:" in log
    assert TOKEN not in log


async def test_tls_without_a_token_is_not_enough_off_loopback(
    own_servers: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tls = self_signed(str(tmp_path_factory.mktemp("tls")))
    log = await _refused_at_startup(own_servers("auth-notoken", "10.249.4.0/24", tls=tls), "::")
    assert "refusing to serve on :: without --token:" in log


async def test_tls_and_a_token_serve_off_loopback_quietly(
    own_servers: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tls = self_signed(str(tmp_path_factory.mktemp("tls")))
    server = own_servers("auth-wide", "10.249.5.0/24", token=TOKEN, tls=tls)
    server.spawn(host="0.0.0.0")
    await server.wait_ready()
    async with server.connect() as client:
        await client.ping()
    await server.stop()
    log = server.log_text()
    assert "serving the websocket API on wss://0.0.0.0:" in log
    assert "INSECURE" not in log
    assert TOKEN not in log


async def test_insecure_serves_off_loopback_with_a_loud_warning(
    own_servers: Callable[..., ServerProcess],
) -> None:
    # A token still guards it: only TLS is waived here.
    server = own_servers("auth-insecure", "10.249.6.0/24", "--insecure", token=TOKEN)
    server.spawn(host="0.0.0.0")
    await server.wait_ready()
    await server.stop()
    log = server.log_text()
    assert "WARNING gactor.server: INSECURE: --insecure serves the root API on 0.0.0.0:" in log
    assert "without TLS" in log
    assert TOKEN not in log
