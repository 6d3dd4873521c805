"""Log lines for people (console) or for machines (JSON lines), never with the token.

Every line carries the request context bound where it was logged: ``request_id``,
``handle`` and ``process_id`` of the API call being served (``bind``, a context
variable, so trio tasks and worker threads started inside a call inherit it). A JSON
line is one object: ``time``, ``level``, ``logger``, ``event`` (the message), the
context fields, and ``exception`` with the traceback when there is one.

The token (``--token``) is replaced by ``<token>`` in every field of every line,
tracebacks included, before the line is encoded.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import types
from collections.abc import Mapping

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "json", "console")  # auto: console when stderr is a terminal, else json
CONTEXT_FIELDS = ("request_id", "handle", "process_id")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "<token>"

_NOTHING: Mapping[str, str] = types.MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "gactor_log_context", default=_NOTHING
)


def bind(**fields: str | None) -> Binding:
    """Add ``fields`` (those not None or empty) to every line logged in this context
    until the block ends; tasks and threads started meanwhile keep them."""
    return Binding({k: v for k, v in fields.items() if v})


class Binding:
    """``bind``'s context manager (a class: the API observer enters one per call). Entered
    once; its exit restores the context as it was before."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, str]] | None = None

    def __enter__(self) -> None:
        self._token = _context.set({**_context.get(), **self._fields})

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _context.reset(self._token)
            self._token = None


def tag_task(**fields: str | None) -> None:
    """Add ``fields`` to every line the current task logs from now on, and the tasks it
    starts later: for an actor's own task (its handle, its process id). Never call it in
    a task shared with others, such as a request's."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})


def context() -> Mapping[str, str]:
    """The fields bound here now."""
    return _context.get()


def _fields(record: logging.LogRecord) -> dict[str, str]:
    """The bound context, overridden by ``extra={"handle": ...}`` given to the call."""
    fields = dict(_context.get())
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value:
            fields[name] = str(value)
    return fields


class _Redactor:
    def __init__(self, secret: str | None) -> None:
        self._secret = secret or None

    def __call__(self, text: str) -> str:
        return text.replace(self._secret, REDACTED) if self._secret else text


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id=... handle=...]``, the token redacted."""

    def __init__(self, secret: str | None = None) -> None:
        super().__init__(CONSOLE_FORMAT)
        self._redact = _Redactor(secret)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields:
            suffix = " ".join(f"{k}={v}" for k, v in fields.items())
            first, newline, rest = line.partition("\n")
            line = f"{first} [{suffix}]{newline}{rest}"
        return self._redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object a line; every string field redacted before encoding (so an
    escaped form of the token cannot slip through either)."""

    def __init__(self, secret: str | None = None) -> None:
        super().__init__()
        self._redact = _Redactor(secret)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        redacted = {k: self._redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        return json.dumps(redacted, ensure_ascii=False, default=str)


def resolve_format(log_format: str, stream: object = None) -> str:
    """``json`` or ``console``: ``auto`` is console when ``stream`` (stderr) is a terminal."""
    if log_format != "auto":
        return log_format
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


def configure(level: str, log_format: str, secret: str | None) -> None:
    """Send the server's log to stderr at ``level`` in ``log_format`` (see FORMATS),
    replacing any handler installed before; the caller has validated both names."""
    formatter: logging.Formatter = (
        JsonFormatter(secret) if resolve_format(log_format) == "json" else ConsoleFormatter(secret)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_quiet_libraries)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


# trio-websocket's debug lines describe every frame; they never help an operator. So do
# pyroute2's (every netlink message; it resets its loggers' levels when imported, hence a
# filter on the handler) and asyncio's (pyroute2 runs a loop per thread).
_NOISY = ("trio-websocket", "pyroute2", "asyncio")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.INFO or not record.name.startswith(_NOISY)
