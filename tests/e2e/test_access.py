"""How clients reach the API: browser origins, a unix socket, TLS.

Browsers send ``Origin`` on websocket handshakes and let any web page open one, so a
handshake carrying one is refused (403) unless ``--allow-origin`` lists it. The unix
socket listener is checked from outside (its mode, its removal, what it replaces); TLS
with a self-signed certificate made for the test.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator

import pytest
import trio

import gactor

from .helpers import E2E_MARKS
from .servers import ServerProcess, gactor_command, running_server
from .tls import TlsFiles, self_signed

pytestmark = E2E_MARKS

TOKEN = "0rigin-t0ken-93c1"
ALLOWED = "https://console.example:8443"


async def handshake(url: str, *headers: str) -> tuple[int, bytes]:
    """A websocket handshake by hand (a browser's, given an ``Origin``): the HTTP status
    and the response body."""
    host_port = url.removeprefix("ws://").rstrip("/")
    host, port = host_port.rsplit(":", 1)
    request = "\r\n".join([
        "GET / HTTP/1.1", f"Host: {host_port}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *headers,
        "", "",
    ])  # fmt: skip
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request.encode())
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed mid-response: {response!r}"
                response += chunk
            head, _, body = response.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = next((int(line.split(":", 1)[1]) for line in lines
                           if line.lower().startswith("content-length:")), 0)
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                assert chunk, f"connection closed mid-body: {body!r}"
                body += chunk
    return status, body


# ---- browser origins ----------------------------------------------------------------


@pytest.fixture(scope="module")
def origin_server() -> Iterator[ServerProcess]:
    with running_server("origin", "10.249.8.0/24", "--allow-origin", ALLOWED,
                        "--allow-origin", "http://localhost:3000", token=TOKEN) as server:
        yield server


async def test_a_browser_origin_not_listed_is_refused(origin_server: ServerProcess) -> None:
    status, body = await handshake(origin_server.url, "Origin: https://evil.example",
                                   f"Authorization: Bearer {TOKEN}")
    assert status == 403
    assert b"origin https://evil.example is not allowed" in body
    assert b"--allow-origin" in body


@pytest.mark.parametrize("origin", [ALLOWED + "/", "https://console.example", "null",
                                    ALLOWED.upper(), "http://localhost:3001"])
async def test_only_the_exact_origin_is_allowed(origin_server: ServerProcess, origin: str) -> None:
    status, _ = await handshake(origin_server.url, f"Origin: {origin}",
                                f"Authorization: Bearer {TOKEN}")
    assert status == 403


@pytest.mark.parametrize("origin", [ALLOWED, "http://localhost:3000"])
async def test_a_listed_origin_still_needs_the_token(origin_server: ServerProcess, origin: str) -> None:
    assert (await handshake(origin_server.url, f"Origin: {origin}",
                            f"Authorization: Bearer {TOKEN}"))[0] == 101
    assert (await handshake(origin_server.url, f"Origin: {origin}"))[0] == 401


async def test_two_origin_headers_are_refused(origin_server: ServerProcess) -> None:
    status, _ = await handshake(origin_server.url, f"Origin: {ALLOWED}", f"Origin: {ALLOWED}",
                                f"Authorization: Bearer {TOKEN}")
    assert status == 403


async def test_no_origin_is_a_program_and_is_let_in(origin_server: ServerProcess) -> None:
    assert (await handshake(origin_server.url, f"Authorization: Bearer {TOKEN}"))[0] == 101
    async with origin_server.connect() as client:
        await client.ping()


async def test_without_allow_origin_every_browser_is_refused(gactor_server: ServerProcess) -> None:
    status, body = await handshake(gactor_server.url, "Origin: http://127.0.0.1:7777")
    assert status == 403
    assert b"origin http://127.0.0.1:7777 is not allowed" in body
    assert (await handshake(gactor_server.url))[0] == 101


# ---- the unix socket ----------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_server() -> Iterator[ServerProcess]:
    with running_server("unix", "10.249.9.0/24", unix_socket=True) as server:
        yield server


def test_the_socket_is_mode_0660(unix_server: ServerProcess) -> None:
    assert unix_server.socket_path is not None
    st = os.lstat(unix_server.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.listdir(os.path.dirname(unix_server.socket_path)).count("api.sock") == 1
    assert not [n for n in os.listdir(unix_server.base) if n.endswith(".tmp")]


@pytest.mark.parametrize("scheme", ["unix://", "ws+unix://"])
async def test_the_client_connects_over_the_socket(unix_server: ServerProcess, scheme: str) -> None:
    assert unix_server.socket_path is not None
    async with gactor.connect(scheme + unix_server.socket_path) as client:
        await client.ping()
        container = await client.create()
        try:
            out = await container.run(gactor.ProcessSpec(path="echo", args=["over unix"]))
            assert await out.wait() == 0
        finally:
            await client.destroy(container.handle)


def test_the_cli_target_takes_the_socket(unix_server: ServerProcess) -> None:
    result = subprocess.run(gactor_command("--target", unix_server.url, "ping"),
                            capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ok\n", b"")


async def test_a_missing_socket_is_a_connect_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("nosock") / "absent.sock"
    with pytest.raises(gactor.GardenError, match=f"cannot connect to unix://{path}"):
        async with gactor.connect(f"unix://{path}"):
            pass


async def test_the_socket_goes_with_the_server_and_a_stale_one_is_replaced(
    own_servers: Callable[..., ServerProcess],
) -> None:
    server = own_servers("unix-stale", "10.249.10.0/24", unix_socket=True)
    path = server.socket_path
    assert path is not None
    # What a server killed with -9 leaves: a socket file nobody listens on.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)
    stale_inode = os.lstat(path).st_ino
    await server.start()
    assert os.lstat(path).st_ino != stale_inode
    async with server.connect() as client:
        await client.ping()
    await server.stop()
    assert server.returncode == 0, server.log_tail()
    assert not os.path.lexists(path)


async def test_a_file_that_is_not_a_socket_is_never_replaced(
    own_servers: Callable[..., ServerProcess],
) -> None:
    server = own_servers("unix-file", "10.249.11.0/24", unix_socket=True)
    path = server.socket_path
    assert path is not None
    with open(path, "w") as f:
        f.write("precious\n")
    server.spawn()
    assert await server.wait_exit(20), server.log_tail()
    assert server.returncode == 2
    assert f"cannot listen on unix://{path}: it exists and is not a socket" in server.log_text()
    with open(path) as f:
        assert f.read() == "precious\n"


async def test_a_live_socket_is_not_taken_over(
    unix_server: ServerProcess, own_servers: Callable[..., ServerProcess],
) -> None:
    second = own_servers("unix-second", "10.249.12.0/24", unix_socket=True)
    second.socket_path = unix_server.socket_path
    second.spawn()
    assert await second.wait_exit(20), second.log_tail()
    assert second.returncode == 2
    assert "another server is listening on it" in second.log_text()
    async with unix_server.connect() as client:  # the first still serves on it
        await client.ping()


async def test_a_relative_socket_path_is_refused(own_servers: Callable[..., ServerProcess]) -> None:
    server = own_servers("unix-relative", "10.249.13.0/24", "--listen", "unix://api.sock")
    server.spawn()
    assert await server.wait_exit(20), server.log_tail()
    assert server.returncode == 2
    assert "a unix socket needs an absolute path" in server.log_text()


# ---- TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return self_signed(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[ServerProcess]:
    with running_server("tls", "10.249.14.0/24", tls=tls_files) as server:
        yield server


async def test_wss_with_the_servers_certificate(tls_server: ServerProcess, tls_files: TlsFiles) -> None:
    assert tls_server.url.startswith("wss://127.0.0.1:")
    async with gactor.connect(tls_server.url, ssl=tls_files.client_context()) as client:
        await client.ping()
        container = await client.create()
        try:
            proc = await container.run(gactor.ProcessSpec(path="true"))
            assert await proc.wait() == 0
        finally:
            await client.destroy(container.handle)


async def test_an_untrusted_certificate_is_refused(tls_server: ServerProcess) -> None:
    with pytest.raises(gactor.GardenError, match="CERTIFICATE_VERIFY_FAILED"):
        async with gactor.connect(tls_server.url):  # the system's trust store
            pass


async def test_plain_ws_to_the_tls_port_fails_cleanly(tls_server: ServerProcess) -> None:
    with pytest.raises(gactor.GardenError, match="cannot connect"):
        async with gactor.connect(tls_server.url.replace("wss://", "ws://")):
            pass
    async with tls_server.connect() as client:  # and the server is unharmed
        await client.ping()


def test_the_cli_verifies_wss_with_tls_ca(tls_server: ServerProcess, tls_files: TlsFiles) -> None:
    result = subprocess.run(
        gactor_command("--target", tls_server.url, "--tls-ca", tls_files.cert, "ping"),
        capture_output=True, timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ok\n", b"")
    result = subprocess.run(gactor_command("--target", tls_server.url, "ping"),
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert b"CERTIFICATE_VERIFY_FAILED" in result.stderr


async def test_a_bad_key_is_refused_at_startup(
    own_servers: Callable[..., ServerProcess], tls_files: TlsFiles,
) -> None:
    wrong = TlsFiles(cert=tls_files.cert, key=tls_files.cert)  # no private key in it
    server = own_servers("tls-badkey", "10.249.15.0/24", tls=wrong)
    server.spawn()
    assert await server.wait_exit(20), server.log_tail()
    assert server.returncode == 2
    assert f"cannot load --tls-cert {tls_files.cert}" in server.log_text()
