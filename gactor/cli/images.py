"""``images``, ``images prune`` and ``pull``: the server's image store.

These need the image store API of the client (``Client.images()``,
``Client.prune_images()``, ``Client.pull(uri)``), which comes with the images work
(issue 9). A ``pull`` that takes ``progress=`` is given a callback ``(done_bytes,
total_bytes or None)`` that moves the bar. Against a client or server without it each command fails with
one clear ``error:`` line instead of a traceback. Image records are shown through the
fields they are expected to carry (the source URI, the layer count, the size in bytes,
the handles using it); a record of another shape is still printed, as its JSON.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

import click
import msgspec

from . import render
from ._app import CommandError, Options, call, cli, echo_json, examples, json_option, pass_options

_URI_FIELDS = ("uri", "source", "name", "key")
_SIZE_FIELDS = ("size_in_bytes", "size", "bytes")
_USER_FIELDS = ("users", "handles", "containers")


def _api(client: Any, method: str) -> Any:
    found = getattr(client, method, None)
    if found is None:
        raise CommandError(f"this gactor client has no image store API yet (Client.{method})")
    return found


def _first(record: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((record[n] for n in names if n in record), None)


HEADERS = ["image", "layers", "size", "users"]


def _row(record: dict[str, Any]) -> list[str]:
    uri, size, users = (_first(record, f) for f in (_URI_FIELDS, _SIZE_FIELDS, _USER_FIELDS))
    if isinstance(users, list):
        users_text = ", ".join(map(str, users)) or "-"
    else:
        users_text = "-" if users is None else str(users)
    layers = record.get("layers")
    return [str(uri) if uri else json.dumps(record), str(layers) if layers is not None else "-",
            render.size(size) if isinstance(size, int) else "-", users_text]


@examples("gactor images", "gactor --json images", "gactor images prune")
@cli.group(invoke_without_command=True)
@json_option
@pass_options
@click.pass_context
def images(ctx: click.Context, opts: Options) -> None:
    """List the image store: one line per image with its size and the containers using it."""
    if ctx.invoked_subcommand is not None:
        return
    found = [msgspec.to_builtins(i) for i in call(opts, lambda client: _api(client, "images")())]
    if opts.json:
        echo_json(found)
        return
    render.table(HEADERS, [_row(r) for r in found])


@examples("gactor images prune", "gactor --json images prune")
@images.command()
@json_option
@pass_options
def prune(opts: Options) -> None:
    """Remove the images no container uses; print what was removed."""
    removed = call(opts, lambda client: _api(client, "prune_images")())
    plain = msgspec.to_builtins(removed)
    if opts.json:
        echo_json(plain)
        return
    for item in plain or []:
        click.echo(_row(item)[0] if isinstance(item, dict) else str(item))


@examples("gactor pull docker://registry.local:5000/busybox#latest",
          "gactor pull oci:///srv/images/app.tar#v2")
@cli.command()
@click.argument("uri")
@json_option
@pass_options
def pull(opts: Options, uri: str) -> None:
    """Fetch the image URI into the store, with a progress bar on a terminal."""
    with render.Progress(f"pull {uri}", None, sys.stdout) as progress:
        seen = [0]

        def advance(done: int, total: int | None = None) -> None:
            if total:
                progress.set_total(total)
            progress.advance(max(0, done - seen[0]))
            seen[0] = max(seen[0], done)

        async def fetch(client: Any) -> Any:
            method = _api(client, "pull")
            if "progress" in inspect.signature(method).parameters:
                return await method(uri, progress=advance)
            return await method(uri)

        result = call(opts, fetch)
    plain = msgspec.to_builtins(result)
    if opts.json:
        echo_json(plain if plain is not None else {"uri": uri})
    elif isinstance(plain, dict):
        render.table(HEADERS, [_row(plain)])
    else:
        click.echo(uri)
