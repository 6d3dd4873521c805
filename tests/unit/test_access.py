"""The access rules without a server: listen addresses, the handshake check, the
off-loopback rule."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from gactor.server import ConfigError, ServerConfig, check_access
from gactor.transport.listeners import (
    ListenError,
    TcpAddress,
    UnixAddress,
    bind_unix_socket,
    parse_listen,
    remove_unix_socket,
)
from gactor.transport.ws_server import Access, check_handshake


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:7777", TcpAddress("127.0.0.1", 7777)),
    (":7777", TcpAddress("127.0.0.1", 7777)),
    ("[::1]:80", TcpAddress("::1", 80)),
    ("0.0.0.0:0", TcpAddress("0.0.0.0", 0)),
    ("unix:///run/gactor.sock", UnixAddress("/run/gactor.sock")),
    ("unix:///run//x/../gactor.sock", UnixAddress("/run/gactor.sock")),
])
def test_parse_listen(text: str, parsed: object) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.parametrize("text", ["localhost", "127.0.0.1:http", "1.2.3.4:70000", "unix://rel.sock",
                                  "unix://"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="listen address"):
        parse_listen(text)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.0.1", True),
                                                ("::1", True), ("localhost", True),
                                                ("0.0.0.0", False), ("::", False),
                                                ("10.0.0.1", False), ("example.org", False)])
def test_loopback(host: str, loopback: bool) -> None:
    assert TcpAddress(host, 1).is_loopback is loopback


HEADERS = [(b"host", b"127.0.0.1:7777")]


def test_handshake_path_origin_then_token() -> None:
    access = Access(token="tok", allow_origins=frozenset({"https://ok.example"}))
    bearer = [(b"Authorization", b"Bearer tok")]
    assert check_handshake("/", HEADERS + bearer, access) is None
    assert check_handshake("/?x=1", HEADERS + bearer, access) is None
    assert check_handshake("/api", HEADERS + bearer, access)[0] == 404  # type: ignore[index]
    assert check_handshake("/", HEADERS, access)[0] == 401  # type: ignore[index]
    assert check_handshake("/", [(b"authorization", b"Bearer tok2")], access)[0] == 401  # type: ignore[index]
    assert check_handshake("/", [(b"Origin", b"https://ok.example"), *bearer], access) is None
    refused = check_handshake("/", [(b"Origin", b"https://evil.example"), *bearer], access)
    assert refused is not None
    assert refused[0] == 403
    assert b"https://evil.example" in refused[1]
    # the origin is checked first: a page gets 403 even without the token
    assert check_handshake("/", [(b"origin", b"https://evil.example")], access)[0] == 403  # type: ignore[index]


def test_no_token_configured_lets_programs_in() -> None:
    assert check_handshake("/", HEADERS, Access()) is None
    assert check_handshake("/", [(b"Origin", b"null")], Access())[0] == 403  # type: ignore[index]


@pytest.mark.parametrize(("listen", "kwargs", "error"), [
    ("127.0.0.1:1", {}, None),
    ("unix:///x.sock", {}, None),
    ("0.0.0.0:1", {"insecure": True}, None),
    ("0.0.0.0:1", {"token": "t", "tls_cert": "c", "tls_key": "k"}, None),
    ("0.0.0.0:1", {}, "without --tls-cert/--tls-key and --token"),
    ("10.0.0.1:1", {"token": "t"}, "without --tls-cert/--tls-key:"),
    ("[::]:1", {"tls_cert": "c", "tls_key": "k"}, "on :: without --token:"),
    ("127.0.0.1:1", {"tls_cert": "c"}, "go together"),
    ("unix:///x.sock", {"tls_cert": "c", "tls_key": "k"}, "file mode"),
])
def test_check_access(listen: str, kwargs: dict[str, object], error: str | None) -> None:
    config = ServerConfig(listen=listen, **kwargs)  # type: ignore[arg-type]
    if error is None:
        check_access(config, parse_listen(listen))
    else:
        with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
            check_access(config, parse_listen(listen))


def test_unix_socket_mode_replacement_and_removal(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # closed without unlinking: a stale socket file
    sock, identity = bind_unix_socket(path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert sorted(os.listdir(tmp_path)) == ["api.sock"]
        with pytest.raises(ListenError, match="another server is listening on it"):
            bind_unix_socket(path)
    finally:
        sock.close()
        remove_unix_socket(path, identity)
    assert not os.path.lexists(path)


def test_unix_socket_never_replaces_a_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("keep")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        bind_unix_socket(str(path))
    assert path.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["api.sock"]
