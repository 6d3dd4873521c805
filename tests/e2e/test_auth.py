"""Bearer-token authentication and the refusal to serve beyond loopback without one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import gactor

from .helpers import E2E_MARKS
from .servers import running_server

pytestmark = E2E_MARKS

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def token_server() -> Iterator[str]:
    with running_server("auth", "10.249.1.0/24", token=TOKEN) as server:
        yield server.url


async def test_the_right_token_is_let_in(token_server: str) -> None:
    async with gactor.connect(token_server, token=TOKEN) as client:
        await client.ping()


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_a_missing_or_wrong_token_is_refused(token_server: str, token: str | None) -> None:
    with pytest.raises(gactor.GardenError, match="cannot connect"):
        async with gactor.connect(token_server, token=token) as client:
            await client.ping()


async def test_no_token_means_loopback_only(own_servers) -> None:
    server = own_servers("auth-open", "10.249.2.0/24")
    server.spawn(host="0.0.0.0")
    assert await server.wait_exit(20), server.log_tail()
    assert server.returncode != 0
    assert "without --token" in server.log_text()
