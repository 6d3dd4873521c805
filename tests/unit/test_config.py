"""The server's configuration (a TOML file, flags over it, ``--print-config``) and the
systemd unit, without a server: precedence, every kind of invalid config as one error
with exit status 2, the printed config read back, ``systemd-analyze verify``."""

from __future__ import annotations

import configparser
import dataclasses
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gactor.cli import cli
from gactor.ops import config as ops_config
from gactor.server import ServerConfig

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "gactor.service"
EXAMPLE = REPO / "contrib" / "gactor.toml"


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Every ServerConfig ``gactor server`` hands to ``gactor.server.run``."""
    from gactor import server

    configs: list[ServerConfig] = []
    monkeypatch.setattr(server, "run", configs.append)
    return configs


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gactor.toml"
    path.write_text(text)
    return path


def test_every_server_flag_is_a_config_key() -> None:
    """Each option of ``gactor server`` but --config/--print-config names a field; the one
    field without a flag (cgroup-parent) is for the file alone."""
    command = cli.commands["server"]
    flags = {p.name for p in command.params} - {"config_file", "print_config", "help"}
    assert set(ops_config.field_names()) - flags == {"cgroup_parent"}
    assert flags <= set(ops_config.field_names())


def test_precedence_defaults_then_file_then_flags(
    tmp_path: Path, captured: list[ServerConfig]
) -> None:
    path = write(
        tmp_path,
        'metrics-listen = "127.0.0.1:9100"\nlog_format = "json"\nlog-level = "debug"\n'
        'max-containers = 7\ndefault-grace-time = 5\ndeny-network = ["10.0.0.0/8"]\n',
    )
    result = CliRunner().invoke(
        cli,
        [
            "server",
            "--config",
            str(path),
            "--log-level",
            "warning",
            "--deny-network",
            "192.0.2.0/24",
        ],
    )
    assert result.exit_code == 0, result.output
    [config] = captured
    expected = ServerConfig(
        metrics_listen="127.0.0.1:9100",
        log_format="json",
        log_level="warning",
        max_containers=7,
        default_grace_time=5.0,
        deny_networks=["192.0.2.0/24"],
    )
    assert dataclasses.asdict(config) == dataclasses.asdict(expected)


def test_the_file_token_wins_over_the_global_one(
    tmp_path: Path, captured: list[ServerConfig]
) -> None:
    path = write(tmp_path, 'token = "from-file"\n')
    result = CliRunner().invoke(cli, ["--token", "global", "server", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert captured[0].token == "from-file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen-harder = true\n", "unknown key 'listen-harder'"),
        ('[server]\nlisten = "x"\n', "unknown key 'server'"),
        ('max-containers = "5"\n', "max-containers must be an integer, not a string"),
        ("max-containers = 5.5\n", "max-containers must be an integer, not a number"),
        ("max-containers = true\n", "max-containers must be an integer, not a boolean"),
        ('insecure = "yes"\n', "insecure must be true or false, not a string"),
        ('default-grace-time = "1m"\n', "default-grace-time must be a number, not a string"),
        ('deny-network = "10.0.0.0/8"\n', "deny-network must be a list of strings, not a string"),
        ("allow-origin = [1]\n", "allow-origin must be a list of strings, not an array"),
        ("tls-cert = 3\n", "tls-cert must be a string, not an integer"),
        ("listen = \n", "is not valid TOML"),
        (
            'log-level = "loud"\n',
            "log-level 'loud': must be one of debug, info, warning, error, critical",
        ),
        ('log-format = "xml"\n', "log-format 'xml': must be one of auto, json, console"),
        (
            'metrics-listen = "nowhere"\n',
            "metrics-listen: listen address 'nowhere' must be HOST:PORT",
        ),
    ],
)
def test_an_invalid_config_is_one_error_and_exit_2(
    tmp_path: Path, captured: list[ServerConfig], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    result = CliRunner().invoke(cli, ["server", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert message in result.stderr
    assert captured == []


def test_invalid_flag_values_are_refused_the_same_way(captured: list[ServerConfig]) -> None:
    result = CliRunner().invoke(cli, ["server", "--log-format", "yaml"])
    assert (result.exit_code, result.stderr) == (
        2,
        "error: log-format 'yaml': must be one of auto, json, console\n",
    )
    result = CliRunner().invoke(cli, ["server", "--metrics-listen", "unix://rel.sock"])
    assert result.exit_code == 2
    assert "a unix socket needs an absolute path" in result.stderr
    assert captured == []


def test_the_real_entry_point_exits_2_before_anything_starts(tmp_path: Path) -> None:
    path = write(tmp_path, 'port-pool-size = "many"\n')
    result = subprocess.run(
        [sys.executable, "-m", "gactor", "server", "--config", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (2, b"")
    assert (
        result.stderr
        == f"error: {path}: port-pool-size must be an integer, not a string\n".encode()
    )


def test_print_config_prints_the_effective_config_and_reads_back(
    tmp_path: Path, captured: list[ServerConfig]
) -> None:
    path = write(
        tmp_path,
        'depot = "/srv/gactor"\nallow-origin = ["https://a.example"]\n'
        'default-grace-time = 2.5\ntoken = "hunter2-secret"\n',
    )
    result = CliRunner().invoke(
        cli, ["server", "--config", str(path), "--max-containers", "9", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    assert captured == [], "--print-config must not start the server"
    assert "hunter2-secret" not in result.stdout
    assert "# token: set (not shown)" in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["depot"] == "/srv/gactor"
    assert printed["max-containers"] == 9
    assert printed["allow-origins"] == ["https://a.example"]
    # Read back, the printed file is the same config (but for the token it hides).
    again = ops_config.build(ops_config.from_mapping(printed, "printed"), {})
    expected = ServerConfig(
        depot="/srv/gactor",
        allow_origins=["https://a.example"],
        default_grace_time=2.5,
        max_containers=9,
    )
    assert dataclasses.asdict(again) == dataclasses.asdict(expected)


@pytest.mark.parametrize(
    "text", ['listen = "tricky \\"quoted\\" \\\\ \\u00e9 \\t"\n', "mtu = 1400\n"]
)
def test_render_round_trips_awkward_values(tmp_path: Path, text: str) -> None:
    config = ops_config.build(ops_config.load(write(tmp_path, text)), {})
    back = ops_config.build(
        ops_config.from_mapping(tomllib.loads(ops_config.render(config)), "x"), {}
    )
    assert back == config


def test_print_config_works_without_root_or_a_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gactor", "server", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["metrics-listen"] == "127.0.0.1:7778"


def test_the_example_config_is_valid() -> None:
    values = ops_config.load(EXAMPLE)
    config = ops_config.build(values, {})
    assert config.depot == "/var/lib/gactor"
    assert config.metrics_listen == "127.0.0.1:7778"


# ---- the systemd unit ------------------------------------------------------------------


def _unit() -> Any:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_the_unit_is_notify_and_leaves_containers_running() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"  # a shim cannot send READY=1 for us
    assert service["KillMode"] == "process"  # the shims (in the unit's cgroup) survive a restart
    assert service["ExecStart"].split()[1:] == ["server", "--config", "/etc/gactor/gactor.toml"]


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(
            "systemd-analyze is not installed (scripts/setup.sh installs the systemd package)"
        )
    unit = tmp_path / "gactor.service"
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    gactor = Path(sys.executable).parent / "gactor"
    unit.write_text(unit_text.replace("/usr/local/bin/gactor", str(gactor)))
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported."""
    result = _verify(UNIT.read_text().replace("KillMode=process", "KillMode=procss"), tmp_path)
    assert "kill mode" in result.stderr.lower()
