"""``gactor events [HANDLE]``: follow containers' events until interrupted.

The server publishes what a container records in ``ContainerInfo.events`` (Garden's
``Out of memory``). One container's stream ends when it is destroyed, which is printed
as a ``destroyed`` event before the command exits 0. ^C ends it with 130.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from ._app import Options, call, cli, examples, handle_argument, pass_options

DESTROYED = "destroyed"  # printed when one container's event stream ends


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _emit(opts: Options, handle: str, event: str) -> None:
    """One line per event; click.echo flushes, so a pipe sees it at once."""
    when = _now()
    if opts.json:
        click.echo(json.dumps({"time": when, "handle": handle, "event": event}))
    else:
        click.echo(f"{when}  {handle}  {event}")


@examples("gactor events", "gactor events web", "gactor --json events | jq -r 'select(.event == \"Out of memory\") | .handle'")
@cli.command()
@handle_argument(required=False)
@pass_options
def events(opts: Options, handle: str | None) -> None:
    """Follow OOM and lifecycle events (of HANDLE, or of every container) until ^C.

    Prints "TIME  HANDLE  EVENT" lines; with --json, one JSON object a line
    ({"time", "handle", "event"}). Once the subscription is live it says so on stderr,
    so a script can wait for that line before it does what it wants to watch.
    """

    async def follow(client: Any) -> None:
        if handle:
            container = await client.lookup(handle)
            async with container.events() as stream:
                click.echo(f"following events of {handle}; ^C to stop", err=True)
                async for event in stream:
                    _emit(opts, handle, event)
            _emit(opts, handle, DESTROYED)
            return
        async with client.events() as stream:
            click.echo("following events of every container; ^C to stop", err=True)
            async for source, event in stream:
                _emit(opts, source, event)

    call(opts, follow)
