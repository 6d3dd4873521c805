"""``gactor events [HANDLE]``: follow containers' events until interrupted.

The server publishes them (``Client.watch``): ``created``, ``stopped``, ``broken``,
``destroyed`` (with why), Garden's ``Out of memory`` and the process it killed, and each
process started and exited, in the order they happened, as they happen. A follower too
slow to keep up is told how many events it missed (``missed N events``).

One container's stream ends after its ``destroyed``: the command then exits 0. ^C ends
it with 130.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from ._app import Options, call, cli, examples, handle_argument, json_option, pass_options

# What a plain line adds to an event's words, by reason.
_REASONS = {"grace_time": "grace time expired", "oom": "out of memory", "shim_died": "its shim died",
            "destroy_failed": "a destroy failed"}
# JSON lines carry these fields of a ContainerEvent when they are set.
_DETAILS = ("reason", "process_id", "pid", "task", "exit_status", "missed")


def _when(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def line(event: Any) -> str:
    """A ContainerEvent as ``TIME  HANDLE  EVENT`` (``-`` for no handle: a ``missed``)."""
    words = event.event or event.kind
    if event.reason in _REASONS:
        words += f" ({_REASONS[event.reason]})"
    return f"{_when(event.time)}  {event.handle or '-'}  {words}"


def json_line(event: Any) -> str:
    """A ContainerEvent as one JSON object: ``time`` (ISO 8601, UTC), ``handle``,
    ``event`` (its words), ``kind``, ``seq``, and whichever of _DETAILS it has."""
    record: dict[str, Any] = {"time": _when(event.time), "handle": event.handle, "event": event.event,
                              "kind": event.kind, "seq": event.seq}
    for name in _DETAILS:
        value = getattr(event, name)
        if value not in ("", 0, None) or (name == "exit_status" and value is not None):
            record[name] = value
    return json.dumps(record)


@examples("gactor events", "gactor events web",
          "gactor --json events | jq -r 'select(.kind == \"oom\") | .handle'")
@cli.command()
@handle_argument(required=False)
@json_option
@pass_options
def events(opts: Options, handle: str | None) -> None:
    """Follow lifecycle and OOM events (of HANDLE, or of every container) until ^C.

    Prints "TIME  HANDLE  EVENT" lines; with --json, one JSON object a line ({"time",
    "handle", "event", "kind", "seq"} and, where set, "reason", "process_id", "pid",
    "task", "exit_status", "missed"). Once the subscription is live it says so on stderr,
    so a script can wait for that line before it does what it wants to watch.
    """

    async def follow(client: Any) -> None:
        async with client.watch(handle or None) as stream:
            click.echo(f"following events of {handle or 'every container'}; ^C to stop", err=True)
            async for event in stream:
                # click.echo flushes, so a pipe sees each line at once.
                click.echo(json_line(event) if opts.json else line(event))

    call(opts, follow)
