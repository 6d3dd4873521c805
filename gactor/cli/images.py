"""``images``, ``images prune`` and ``pull``: the server's image store.

They use the image store API of the client (``Client.images()``, ``Client.pull(uri,
username, password)``, ``Client.prune_images()``, from the images work, issue 9); against
a client without it each fails with one clear ``error:`` line. The output is what the
images branch's CLI printed (its tests read it): ``images`` one line per image, ``SIZE
N layers  users: H,H  SOURCE``; ``pull`` ``SOURCE: SIZE, N layers``; ``prune`` one line
per removed image or layer, or ``nothing to prune``.

A pull shows the server's per-layer progress (``Client.pull(progress=)``): bars on a
terminal, one line per layer on stderr otherwise (``render.PullProgress``).
"""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec

from . import render
from ._app import CommandError, Options, call, cli, echo_json, examples, json_option, pass_options


def _api(client: Any, method: str) -> Any:
    found = getattr(client, method, None)
    if found is None:
        raise CommandError(f"this gactor client has no image store API yet (Client.{method})")
    return found


def _layers(n: int) -> str:
    return f"{n} layer{'' if n == 1 else 's'}"


def image_line(record: dict[str, Any]) -> str:
    """One image (ImageInfo's fields: path, source, bytes, layers, users) on one line."""
    users = ",".join(record.get("users") or []) or "-"
    return (f"{render.size(int(record.get('bytes') or 0)):>9}  {_layers(int(record.get('layers') or 0))}  "
            f"users: {users}  {record.get('source') or record.get('path') or '?'}")


def _print_lines(opts: Options, found: list[Any], lines: list[str], none: str) -> None:
    """``found`` as JSON with --json, else ``lines``, or ``none`` when there are none."""
    if opts.json:
        echo_json(found)
        return
    for line in lines or [none]:
        click.echo(line)


@examples("gactor images", "gactor --json images | jq -r '.[] | select(.users == []) | .source'",
          "gactor images prune")
@cli.group(invoke_without_command=True)
@json_option
@pass_options
@click.pass_context
def images(ctx: click.Context, opts: Options) -> None:
    """List the image store: one line per image with its size, layers, users and source."""
    if ctx.invoked_subcommand is not None:
        return
    found = [msgspec.to_builtins(i) for i in call(opts, lambda client: _api(client, "images")())]
    _print_lines(opts, found, [image_line(record) for record in found], "no images")


@examples("gactor images prune", "gactor --json images prune")
@images.command()
@json_option
@pass_options
def prune(opts: Options) -> None:
    """Remove every image and layer no container uses; print what was removed."""
    removed = list(call(opts, lambda client: _api(client, "prune_images")()))
    _print_lines(opts, removed, [str(item) for item in removed], "nothing to prune")


@examples("gactor pull oci:///srv/images/app.tar#v2",
          "gactor pull docker://registry.local:5000/busybox#latest",
          "GACTOR_REGISTRY_PASSWORD=s3cret gactor pull --username ci docker://registry.local:5000/app")
@cli.command()
@click.argument("uri")
@click.option("--username", default="", help="Registry login for docker:// images.")
@click.option("--password", default="", envvar="GACTOR_REGISTRY_PASSWORD",
              help="Its password [env GACTOR_REGISTRY_PASSWORD, which keeps it out of ps].")
@json_option
@pass_options
def pull(opts: Options, uri: str, username: str, password: str) -> None:
    """Fetch the image URI into the store. On a terminal, a progress bar for the image
    and each of its layers; otherwise one line per layer on stderr as it is done."""

    with render.PullProgress(f"pull {uri}", sys.stdout, sys.stderr) as progress:
        login = {"username": username, "password": password} if username or password else {}
        image = call(opts, lambda client: _api(client, "pull")(uri, progress=progress.update, **login))
    record = msgspec.to_builtins(image)
    if opts.json:
        echo_json(record)
    elif isinstance(record, dict):
        click.echo(f"{record.get('source') or uri}: {render.size(int(record.get('bytes') or 0))}, "
                   f"{_layers(int(record.get('layers') or 0))}")
    else:
        click.echo(uri)
