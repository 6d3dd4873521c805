"""The server's configuration: a TOML file (``--config``), flags over it, printed back.

Every ``ServerConfig`` field is a top-level key, spelt like its flag (``port-pool-start``)
or like the field (``port_pool_start``); the repeatable flags' keys are lists
(``deny-network = ["10.0.0.0/8"]``). ``load`` reads a file and checks every key and the
type of every value; ``build`` lays flags over it and checks the values that have a
fixed set of choices; ``render`` prints a config as TOML that ``load`` reads back (the
token only as a comment saying whether one is set). Everything wrong is a
``ConfigFileError`` naming the file, key and what was expected; the CLI exits 2 on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..server import ServerConfig
from ..transport import listeners
from . import logs

OFF = "off"  # --metrics-listen off: no operations listener
# TOML keys are the flag names with "-" or "_"; the repeatable flags are singular.
ALIASES = {"deny_network": "deny_networks", "allow_origin": "allow_origins"}
SECRETS = frozenset({"token"})
_TYPES: dict[str, Any] = typing.get_type_hints(ServerConfig)
_KIND = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


class ConfigFileError(Exception):
    """The configuration is invalid; the message names the file, the key and the fault."""


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ServerConfig)]


def _key(name: str) -> str:
    return name.replace("_", "-")


def _describe(kind: Any) -> str:
    if kind in _KIND:
        return _KIND[kind]
    if typing.get_origin(kind) is list:
        return "a list of strings"
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return _describe(args[0]) if len(args) == 1 else str(kind)


def _checked(kind: Any, value: Any) -> Any:
    """``value`` as the field type ``kind`` wants it; TypeError when it is not one."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is not list and len(args) == 1:  # X | None: TOML has no null
        kind = args[0]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if (
        typing.get_origin(kind) is list
        and isinstance(value, list)
        and all(isinstance(v, str) for v in value)
    ):
        return list(value)
    raise TypeError(_describe(kind))


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__
    )


def load(path: Path) -> dict[str, Any]:
    """The settings in the TOML file ``path`` by field name, each of its field's type."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as err:
        raise ConfigFileError(f"cannot read config file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigFileError(f"config file {path} is not valid TOML: {err}") from None
    return from_mapping(data, str(path))


def from_mapping(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``load`` for parsed TOML; ``source`` names it in errors."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in _TYPES:
            raise ConfigFileError(
                f"{source}: unknown key {key!r} (the keys are the server's flags: "
                f"{', '.join(_key(n) for n in field_names())})"
            )
        try:
            values[name] = _checked(_TYPES[name], value)
        except TypeError as err:
            raise ConfigFileError(
                f"{source}: {key} must be {err}, not {_toml_type(value)}"
            ) from None
    return values


def build(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> ServerConfig:
    """The effective config: defaults, then the file, then flags (already typed by the
    command line). Raises ConfigFileError for a value outside its choices."""
    config = ServerConfig(**{**file_values, **flag_values})
    validate(config)
    return config


def validate(config: ServerConfig) -> None:
    level = config.log_level.lower()
    if level not in logs.LEVELS:
        raise ConfigFileError(
            f"log-level {config.log_level!r}: must be one of {', '.join(logs.LEVELS)}"
        )
    if config.log_format not in logs.FORMATS:
        raise ConfigFileError(
            f"log-format {config.log_format!r}: must be one of {', '.join(logs.FORMATS)}"
        )
    metrics_address(config)


def metrics_address(config: ServerConfig) -> listeners.ListenAddress | None:
    """Where the operations listener listens; None for ``off``. ConfigFileError if unparsable."""
    if config.metrics_listen == OFF:
        return None
    try:
        return listeners.parse_listen(config.metrics_listen)
    except ValueError as err:
        raise ConfigFileError(f"metrics-listen: {err} (or 'off')") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are all valid in TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render(config: ServerConfig) -> str:
    """``config`` as a TOML file ``load`` reads back; unset options and secrets are
    comments (the token never appears)."""
    lines = ["# gactor server: effective configuration (defaults, then --config, then flags)"]
    for name in field_names():
        value = getattr(config, name)
        if name in SECRETS:
            lines.append(f"# {_key(name)}: {'set (not shown)' if value else 'not set'}")
        elif value is None:
            lines.append(f"# {_key(name)}: not set")
        else:
            lines.append(f"{_key(name)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
