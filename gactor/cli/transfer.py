"""``stream-in`` and ``stream-out``: tar streams between our stdio and a container.

A progress bar shows while the bytes move, on a terminal only: stream-in draws it on
stdout (the archive comes from stdin), stream-out on stderr (stdout is the archive).
When stdin is a regular file its size makes the bar a bar; a pipe shows bytes and rate.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

import click

from . import render
from ._app import (
    CommandError,
    Options,
    cli,
    echo_json,
    examples,
    handle_argument,
    json_option,
    pass_options,
    with_container,
)
from .processes import Sink, stdin_chunks


def _stdin_size() -> int | None:
    """The bytes left on stdin when it is a regular file; None for a pipe or terminal."""
    try:
        info = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    try:
        return max(0, info.st_size - os.lseek(sys.stdin.fileno(), 0, os.SEEK_CUR))
    except OSError:
        return info.st_size


@examples("gactor stream-in web --to /srv < site.tar", "tar -c -C build . | gactor stream-in web --to /srv",
          "gactor stream-in web --to /home/vcap --user vcap < app.tar")
@cli.command(name="stream-in")
@handle_argument()
@click.option("--to", "path", required=True, metavar="PATH", help="Directory to extract into.")
@click.option("--user", default="", metavar="U", help="Owner of the extracted files.")
@json_option
@pass_options
def stream_in(opts: Options, handle: str, path: str, user: str) -> None:
    """Extract the (uncompressed) tar stream on stdin into the container."""
    from gactor.types import StreamInSpec

    if sys.stdin is None or sys.stdin.isatty():
        raise CommandError("stream-in reads a tar stream from stdin; redirect it from a file or pipe")
    with render.Progress(f"stream-in {handle}:{path}", _stdin_size(), sys.stdout) as progress:
        spec = StreamInSpec(path=path, user=user, tar_stream=stdin_chunks(progress))
        with_container(opts, handle, lambda c: c.stream_in(spec))
    if opts.json:
        echo_json({"handle": handle, "path": path, "bytes": progress.transferred})


@examples("gactor stream-out web --from /var/log > logs.tar",
          "gactor stream-out web --from /etc/hosts | tar -xO")
@cli.command(name="stream-out")
@handle_argument()
@click.option("--from", "path", required=True, metavar="PATH",
              help="File or directory to copy (PATH/ for a directory's contents).")
@click.option("--user", default="", metavar="U", help="User to read as.")
@pass_options
def stream_out(opts: Options, handle: str, path: str, user: str) -> None:
    """Write a tar stream of PATH in the container to stdout.

    stdout is the archive, so --json changes nothing here.
    """
    from gactor.types import StreamOutSpec

    if sys.stdout.isatty():
        raise CommandError("refusing to write a tar stream to a terminal; redirect stdout")
    with render.Progress(f"stream-out {handle}:{path}", None, sys.stderr) as progress:

        async def action(container: Any) -> None:
            import trio

            sink = Sink(sys.stdout.buffer, trio.Event())
            stream = await container.stream_out(StreamOutSpec(path=path, user=user))
            async with stream:
                async for chunk in stream:
                    await sink.send_all(chunk)
                    if sink.exit_code is not None:  # the reader left: stop the stream
                        raise click.exceptions.Exit(sink.exit_code)
                    progress.advance(len(chunk))

        with_container(opts, handle, action)
