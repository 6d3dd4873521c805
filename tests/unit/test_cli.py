"""The command line without a server: help, server configuration, connection failures."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gactor.cli import cli

COMMAND_OPTIONS = {
    "server": ["--config", "--listen", "--garden-listen", "--debug-listen", "--depot", "--default-rootfs",
               "--network-pool", "--port-pool-start", "--port-pool-size",
               "--default-grace-time", "--max-containers", "--deny-network", "--external-ip",
               "--log-level", "--log-format", "--metrics-listen", "--print-config", "--cpu-quota-per-share", "--destroy-containers-on-startup",
               "--token", "--tls-cert", "--tls-key", "--insecure", "--allow-origin"],
    "ping": [],
    "capacity": [],
    "create": ["--handle", "--rootfs", "--property", "--memory", "--env", "--grace-time",
               "--privileged"],
    "list": ["--property", "--quiet"],
    "info": [],
    "destroy": [],
    "run": ["--tty", "--user", "--env", "--dir", "--id"],
    "attach": ["--tty"],
    "stream-in": ["--to", "--user"],
    "stream-out": ["--from", "--user"],
    "net-in": ["--host-port", "--container-port"],
    "metrics": [],
    "properties": [],
    "set-grace-time": [],
    "stop": ["--kill"],
    "events": [],
    "images": ["prune"],
    "images prune": [],
    "pull": ["--username", "--password"],
}


def test_global_help_lists_options_and_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for word in ["--target", "--json", "--token", *(c for c in COMMAND_OPTIONS if " " not in c)]:
        assert word in result.output


@pytest.mark.parametrize(("command", "options"), COMMAND_OPTIONS.items())
def test_command_help_lists_its_options(command: str, options: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output


@pytest.mark.parametrize("command", [*COMMAND_OPTIONS])
def test_every_command_help_has_examples(command: str) -> None:
    """Each --help ends with runnable examples that start with the command itself."""
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    examples = result.output.split("Examples:\n", 1)[1].splitlines()
    assert examples
    assert any(line.strip().startswith(f"gactor {command.split()[0]}") for line in examples), examples


JSON_HERE = ["ping", "capacity", "create", "list", "info", "destroy", "stream-in", "net-in", "metrics",
             "properties", "set-grace-time", "stop", "events", "images", "images prune", "pull"]


@pytest.mark.parametrize("command", JSON_HERE)
def test_json_is_also_a_command_option(command: str) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert "--json" in result.output


def test_global_help_documents_completion() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert 'eval "$(_GACTOR_COMPLETE=bash_source gactor)"' in result.output


@pytest.fixture
def captured_config(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ServerConfig that ``gactor server`` hands to ``gactor.server.run``."""
    server = pytest.importorskip("gactor.server")
    configs: list[Any] = []
    monkeypatch.setattr(server, "run", configs.append)
    return configs


def test_server_config_file_is_overridden_by_flags(
    captured_config: list[Any], tmp_path: Path
) -> None:
    config_file = tmp_path / "gactor.toml"
    config_file.write_text(
        'listen = "127.0.0.1:9000"\n'
        'depot = "/srv/depot"\n'
        'cpu-quota-per-share = 100\n'
        'default_grace_time = 30\n'
        'allow-origin = ["https://a.example"]\n'
        'destroy-containers-on-startup = true\n'
        'tls-key = "/etc/gactor/key.pem"\n'
    )
    result = CliRunner().invoke(cli, [
        "server", "--config", str(config_file), "--listen", "127.0.0.1:9001",
        "--allow-origin", "https://b.example", "--allow-origin", "http://localhost:3000",
        "--max-containers", "5", "--token", "s3cret", "--tls-cert", "/etc/gactor/cert.pem",
        "--insecure",
    ])
    assert result.exit_code == 0, result.output
    [config] = captured_config
    expected = type(config)(
        listen="127.0.0.1:9001", depot="/srv/depot", cpu_quota_per_share=100,
        default_grace_time=30.0, allow_origins=["https://b.example", "http://localhost:3000"],
        destroy_containers_on_startup=True, max_containers=5, token="s3cret",
        tls_cert="/etc/gactor/cert.pem", tls_key="/etc/gactor/key.pem", insecure=True,
    )
    assert dataclasses.asdict(config) == dataclasses.asdict(expected)


def test_server_network_flags_reach_the_config(captured_config: list[Any]) -> None:
    result = CliRunner().invoke(cli, ["server", "--port-pool-start", "40000", "--port-pool-size", "10",
                                      "--deny-network", "10.0.0.0/8", "--external-ip", "192.0.2.1",
                                      "--mtu", "1400"])
    assert result.exit_code == 0, result.output
    [config] = captured_config
    assert (config.port_pool_start, config.port_pool_size, config.deny_networks, config.external_ip,
            config.mtu) == (40000, 10, ["10.0.0.0/8"], "192.0.2.1", 1400)


def test_server_defaults_and_global_token(captured_config: list[Any]) -> None:
    result = CliRunner().invoke(cli, ["--token", "t0k", "server"])
    assert result.exit_code == 0, result.output
    [config] = captured_config
    assert dataclasses.asdict(config) == dataclasses.asdict(type(config)(token="t0k"))


def test_server_passes_garden_and_debug_listen(captured_config: list[Any]) -> None:
    result = CliRunner().invoke(cli, ["server", "--garden-listen", "127.0.0.1:7778",
                                      "--debug-listen", "127.0.0.1:17778"])
    assert result.exit_code == 0, result.output
    [config] = captured_config
    assert (config.garden_listen, config.debug_listen) == ("127.0.0.1:7778", "127.0.0.1:17778")


def test_server_process_refuses_an_open_garden_listen_with_exit_2() -> None:
    """The real entry point, before it checks for root or forks anything: the Garden
    listener follows --listen's access rules."""
    result = subprocess.run(
        [sys.executable, "-m", "gactor", "server", "--garden-listen", "0.0.0.0:7778"],
        capture_output=True, timeout=60, check=False,
    )
    assert (result.returncode, result.stdout) == (2, b"")
    assert b"refusing to serve on 0.0.0.0 without" in result.stderr


def test_the_server_module_refuses_them_too() -> None:
    server = pytest.importorskip("gactor.server")
    server.check_implemented(server.ServerConfig())
    for name, flag in server.NOT_IMPLEMENTED.items():
        value = {"deny_networks": ["10.0.0.0/8"], "garden_listen": "127.0.0.1:1",
                 "external_ip": "192.0.2.1"}.get(name, 1)
        with pytest.raises(server.ConfigError, match=f"^{flag} is not implemented yet$"):
            server.check_implemented(server.ServerConfig(**{name: value}))


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "0.0.0.0:7777"], "refusing to serve on 0.0.0.0 without --tls-cert/--tls-key and --token"),
    (["--listen", "0.0.0.0:7777", "--token", "t"], "refusing to serve on 0.0.0.0 without --tls-cert/--tls-key:"),
    (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
    (["--listen", "unix:///run/x.sock", "--tls-cert", "/c", "--tls-key", "/k"],
     "a unix socket is protected by its file mode"),
    (["--listen", "unix://relative.sock"], "a unix socket needs an absolute path"),
    (["--listen", "localhost"], "must be HOST:PORT or unix:///PATH"),
])
def test_server_access_rules_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["server", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert message in result.stderr


def test_server_unknown_config_key_is_named(tmp_path: Path) -> None:
    config_file = tmp_path / "gactor.toml"
    config_file.write_text('listen = "127.0.0.1:9000"\nlisten-harder = true\n')
    result = CliRunner().invoke(cli, ["server", "--config", str(config_file)])
    assert result.exit_code == 2
    assert "unknown key" in result.stderr
    assert "listen-harder" in result.stderr


def test_server_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["server", "--config", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot read config file")


def test_bad_property_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["create", "--property", "novalue"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ping_closed_port_reports_cannot_connect() -> None:
    pytest.importorskip("gactor.client")
    target = f"ws://127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "gactor", "--target", target, "ping"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot connect to {target}")
    assert "Traceback" not in result.stderr


class FakeContainer:
    def __init__(self, handle: str) -> None:
        self.handle = handle

    async def properties(self) -> dict[str, str]:
        return {"owner": "me", "team": "garden"}

    async def info(self) -> Any:
        from gactor.types import ContainerInfo, PortMapping

        return ContainerInfo(state="active", process_ids=["p1"], properties={"owner": "me"},
                             mapped_ports=[PortMapping(61001, 8080)])

    async def net_in(self, host_port: int = 0, container_port: int = 0) -> tuple[int, int]:
        return host_port or 61001, container_port


class FakeClient:
    """Stands in for ``gactor.connect``'s client; records the specs it is given."""

    def __init__(self) -> None:
        self.specs: list[Any] = []

    async def create(self, spec: Any) -> FakeContainer:
        self.specs.append(spec)
        return FakeContainer(spec.handle or "generated")

    async def lookup(self, handle: str) -> FakeContainer:
        from gactor.errors import ContainerNotFoundError

        if handle == "missing":
            raise ContainerNotFoundError(handle)
        return FakeContainer(handle)


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    from contextlib import asynccontextmanager

    client_module = pytest.importorskip("gactor.client")
    fake = FakeClient()

    @asynccontextmanager
    async def connect(url: str, token: str | None = None, ssl: Any = None) -> Any:
        yield fake

    monkeypatch.setattr(client_module, "connect", connect)
    return fake


def test_create_builds_the_spec(fake_client: FakeClient) -> None:
    result = CliRunner().invoke(cli, [
        "create", "--handle", "h1", "--rootfs", "/images/busybox", "--property", "a=b=c",
        "--memory", "1048576", "--env", "X=1", "--grace-time", "2.5", "--privileged",
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout == "h1\n"
    [spec] = fake_client.specs
    assert (spec.handle, spec.image.uri, spec.properties, spec.env) == (
        "h1", "/images/busybox", {"a": "b=c"}, ["X=1"])
    assert (spec.limits.memory.limit_in_bytes, spec.grace_time, spec.privileged) == (
        1048576, 2.5, True)


def test_properties_human_and_json(fake_client: FakeClient) -> None:
    result = CliRunner().invoke(cli, ["properties", "h1"])
    assert result.stdout == "owner me\nteam garden\n"
    result = CliRunner().invoke(cli, ["--json", "properties", "h1"])
    assert json.loads(result.stdout) == {"owner": "me", "team": "garden"}


def test_net_in_prints_the_host_port(fake_client: FakeClient) -> None:
    result = CliRunner().invoke(cli, ["net-in", "h1", "--container-port", "8080"])
    assert result.stdout == "61001\n"


def test_garden_error_is_one_line_exit_1(fake_client: FakeClient) -> None:
    result = CliRunner().invoke(cli, ["info", "missing"])
    assert result.exit_code == 1
    assert result.stderr == "error: unknown handle: missing\n"
    assert result.stdout == ""


def test_server_token_from_the_environment(captured_config: list[Any]) -> None:
    """GACTOR_TOKEN protects the server without putting the token on its command line."""
    result = CliRunner().invoke(cli, ["server"], env={"GACTOR_TOKEN": "fr0m-env"})
    assert result.exit_code == 0, result.output
    [config] = captured_config
    assert config.token == "fr0m-env"


def test_favordynmods_can_be_turned_off(captured_config: list[Any]) -> None:
    result = CliRunner().invoke(cli, ["server", "--no-cgroup-favordynmods"])
    assert result.exit_code == 0, result.output
    assert captured_config[0].cgroup_favordynmods is False


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (64 << 20, "64 MiB"),
    ((5 << 30) + (300 << 20), "5.3 GiB"), (3 << 40, "3 TiB"),
])
def test_sizes_in_binary_units(n: int, text: str) -> None:
    from gactor.cli import render

    assert render.size(n) == text


@pytest.mark.parametrize(("text", "n"), [
    ("1048576", 1 << 20), ("512K", 512 << 10), ("64M", 64 << 20), ("64MiB", 64 << 20),
    ("64mb", 64 << 20), ("1.5G", 3 << 29), ("2T", 2 << 40),
])
def test_parse_size(text: str, n: int) -> None:
    from gactor.cli import render

    assert render.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "-1", "12Q", "1.2.3M", "64 M B"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    from gactor.cli import render

    with pytest.raises(ValueError, match="not a size"):
        render.parse_size(text)


def test_memory_option_takes_units_and_names_a_bad_one() -> None:
    result = CliRunner().invoke(cli, ["create", "--memory", "lots"])
    assert result.exit_code == 2
    assert "not a size: 'lots'" in result.stderr


@pytest.mark.parametrize(("seconds", "text"), [
    (0.25, "250ms"), (5, "5s"), (59.9, "59s"), (62, "1m02s"), (3 * 3600 + 7 * 60, "3h07m"),
    (2 * 86400 + 5 * 3600, "2d05h"),
])
def test_durations(seconds: float, text: str) -> None:
    from gactor.cli import render

    assert render.duration(seconds) == text


def test_usage_next_to_the_limit() -> None:
    from gactor.cli import render

    assert render.usage_of(16 << 20, 64 << 20) == "16 MiB / 64 MiB (25%)"
    assert render.usage_of(16 << 20, 0) == "16 MiB (no limit)"
    assert render.usage_of(16 << 20, render.NO_LIMIT) == "16 MiB (no limit)"
    assert render.cpu_time(12_000_000) == "0.012s"
    assert render.cpu_time(3_400_000_000) == "3.40s"


def test_a_table_on_a_pipe_is_plain_and_never_folds(capsys: pytest.CaptureFixture[str]) -> None:
    from gactor.cli import render

    long_value = "x" * 500
    render.table(["handle", "properties"], [["a", long_value], ["bb", "-"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["HANDLE  PROPERTIES", f"a       {long_value}", "bb      -"]


def test_progress_is_silent_off_a_terminal(tmp_path: Path) -> None:
    from gactor.cli import render

    with (tmp_path / "out").open("w") as file, render.Progress("x", 10, file) as progress:
        progress.advance(4)
        progress.advance(6)
        assert not progress.shown
    assert progress.transferred == 10
    assert (tmp_path / "out").read_text() == ""


def test_image_lines_from_image_records() -> None:
    from gactor.cli import images

    record = {"path": "/depot/images/ab", "source": "oci:///srv/app.tar#v2", "bytes": 5 << 20,
              "layers": 3, "users": ["web", "db"]}
    assert images.image_line(record) == "    5 MiB  3 layers  users: web,db  oci:///srv/app.tar#v2"
    assert images.image_line({"path": "/depot/images/cd", "bytes": 512, "layers": 1, "users": []}) == (
        "    512 B  1 layer  users: -  /depot/images/cd")
