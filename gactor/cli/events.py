"""``gactor events [HANDLE]``: follow containers' events until interrupted.

Two sources, merged in the order they are seen:

- the server's event stream: what a container records in ``ContainerInfo.events``
  (Garden's ``Out of memory``), delivered as it happens;
- lifecycle: ``created``, a new state (``stopped``, ``broken``, ...), ``destroyed``. The
  server does not publish these, so the command notices them by asking for the
  containers' states every POLL_INTERVAL (one ``containers`` and one ``bulk_info`` call);
  they are printed up to that long after they happened.

One container's event stream ends when it is destroyed: that is printed as
``destroyed`` and the command exits 0. ^C ends it with 130.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from ._app import Options, call, cli, examples, handle_argument, json_option, pass_options

CREATED, DESTROYED = "created", "destroyed"
POLL_INTERVAL = 1.0  # seconds between two looks at the containers' states


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
@json_option
@pass_options
def events(opts: Options, handle: str | None) -> None:
    """Follow OOM and lifecycle events (of HANDLE, or of every container) until ^C.

    Prints "TIME  HANDLE  EVENT" lines; with --json, one JSON object a line
    ({"time", "handle", "event"}). Once the subscription is live it says so on stderr,
    so a script can wait for that line before it does what it wants to watch.
    """

    async def follow(client: Any) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            if handle:
                container = await client.lookup(handle)
                async with container.events() as stream:
                    nursery.start_soon(_follow_states, client, handle, opts)
                    click.echo(f"following events of {handle}; ^C to stop", err=True)
                    async for event in stream:
                        _emit(opts, handle, event)
                nursery.cancel_scope.cancel()
                _emit(opts, handle, DESTROYED)
                return
            async with client.events() as stream:
                nursery.start_soon(_follow_states, client, None, opts)
                click.echo("following events of every container; ^C to stop", err=True)
                async for source, event in stream:
                    _emit(opts, source, event)

    call(opts, follow)


async def _states(client: Any, handle: str | None) -> dict[str, str]:
    """``handle -> state`` of HANDLE, or of every container."""
    handles = [handle] if handle else [c.handle for c in await client.containers()]
    if not handles:
        return {}
    infos = await client.bulk_info(handles)
    return {h: e.info.state for h, e in infos.items() if e.info is not None}


async def _follow_states(client: Any, handle: str | None, opts: Options) -> None:
    """Print lifecycle changes seen between two looks, POLL_INTERVAL apart, forever.

    Following one container, its disappearance is left to the event stream's end (which
    prints ``destroyed`` once, whichever notices first).
    """
    import trio

    known = await _states(client, handle)
    while True:
        await trio.sleep(POLL_INTERVAL)
        now = await _states(client, handle)
        for name in sorted(now.keys() - known.keys()):
            _emit(opts, name, CREATED)
            if now[name] != "active":  # it changed already: stopped by an OOM, say
                _emit(opts, name, now[name])
        for name, state in sorted(now.items()):
            if name in known and known[name] != state:
                _emit(opts, name, state)
        if handle is None:
            for name in sorted(known.keys() - now.keys()):
                _emit(opts, name, DESTROYED)
        known = now
