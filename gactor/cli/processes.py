"""``run`` and ``attach``: our stdio wired to a process in a container, like ``docker exec``.

With ``--tty`` the process gets a pseudo-terminal: it is sent our ``TERM`` (as
``docker exec -it`` does) and window size, our terminal goes raw so every key (^C and
^Z too) reaches it as typed, and SIGWINCH forwards resizes. The terminal's mode is put
back on every way out: the process exits, the server answers an error, the
connection drops, we get SIGINT, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import IO, Any

import click

from ._app import (
    Options,
    cli,
    complete_process_id,
    examples,
    handle_argument,
    pairs,
    pass_options,
    with_container,
)

READ_CHUNK = 65536  # bytes read from our stdin per stdin frame
DEFAULT_TERM = "xterm"  # what docker gives a tty process when the client has no TERM
# Signals that end a --tty session cleanly (terminal restored, exit 128+N) instead of
# killing us with the terminal left raw. SIGINT arrives as KeyboardInterrupt.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Sink:
    """A ProcessIO sink onto one of our binary files.

    Writes happen in a thread: a terminal or pipe that is slow to drain must not stall
    the event loop, and making a shared descriptor non-blocking would break the shell.

    When the reader is gone, ``gone`` is set and ``exit_code`` says how the command
    should end, as a shell tool would: a closed pipe (EPIPE, ``gactor run ... | head
    -1``) 141, as if killed by SIGPIPE; a terminal that hung up (EIO) 129, as if by
    SIGHUP. What comes after has nowhere to go and is discarded; whoever owns the sink
    watches ``gone`` and ends the command (the process in the container runs on,
    unattached).
    """

    def __init__(self, file: IO[bytes], gone: Any) -> None:
        self._file = file
        self.gone = gone  # a trio.Event, shared by the sinks of one command
        self.exit_code: int | None = None

    async def send_all(self, data: bytes) -> None:
        import trio

        if self.gone.is_set():
            return
        code = await trio.to_thread.run_sync(self._write, data)
        if code is not None:
            self.exit_code = code
            self.gone.set()

    def _write(self, data: bytes) -> int | None:
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.EIO):
                raise
            # Python flushes the file once more at exit; let that find somewhere to go.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._file.fileno())
            os.close(devnull)
            return 128 + (signal.SIGPIPE if err.errno == errno.EPIPE else signal.SIGHUP)
        return None


async def stdin_chunks(progress: Any = None) -> AsyncIterator[bytes]:
    """Our stdin until EOF, read in a thread because regular files cannot be polled.

    The read is abandoned on cancellation: the process may exit while we wait for a key.
    A read error (a terminal that hung up) ends the input like EOF.
    ``progress.advance(n)`` is told of every chunk.
    """
    import trio

    fd = sys.stdin.fileno()
    while True:
        try:
            chunk = await trio.to_thread.run_sync(os.read, fd, READ_CHUNK, abandon_on_cancel=True)
        except OSError:  # EIO: our terminal hung up; the process's stdin ends as at EOF
            return
        if not chunk:
            return
        if progress is not None:
            progress.advance(len(chunk))
        yield chunk


def _stdio() -> tuple[Any, list[Sink]]:
    """Our stdio as a ProcessIO, and its sinks (sharing one ``gone`` event)."""
    import trio

    from gactor.client import ProcessIO

    gone = trio.Event()
    sinks = [Sink(sys.stdout.buffer, gone), Sink(sys.stderr.buffer, gone)]
    return ProcessIO(stdin=stdin_chunks() if sys.stdin is not None else None,
                     stdout=sinks[0], stderr=sinks[1]), sinks


async def _wait_or_gone(process: Any, sinks: list[Sink]) -> int:
    """The process's exit code, or the exit code for a reader gone (see Sink)."""
    import trio

    code: int | None = None
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            nonlocal code
            code = int(await process.wait())
            nursery.cancel_scope.cancel()

        async def gone() -> None:
            await sinks[0].gone.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait)
        nursery.start_soon(gone)
    if code is None:
        raise click.exceptions.Exit(next(s.exit_code for s in sinks if s.exit_code is not None))
    return code


def window_size() -> Any:
    """Our terminal's size (stdin's, else stdout's) as a WindowSize; None without one."""
    from gactor.types import WindowSize

    for fd in (0, 1):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return WindowSize(columns=size.columns, rows=size.lines)
    return None


@contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Raw mode on our terminal (stdin) for the block; its saved mode restored however
    the block ends. Nothing happens when stdin is not a terminal."""
    if not enabled or sys.stdin is None or not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        # TCSADRAIN: what the process printed last reaches the screen in its raw form.
        # A terminal that hung up (SIGHUP) cannot be restored, nor does it need to be.
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _session(container: Any, start: Any, tty: bool, resize_now: bool = False) -> int:
    """Start the process with ``start(container, io)`` (our stdio) and return its exit code.

    With a tty, meanwhile: SIGWINCH sends our window size; SIGTERM or SIGHUP ends the
    session (the process runs on, unattached, as with ``docker attach``) with 128+N.
    The signal receivers open before the process starts, so no resize is missed;
    ``resize_now`` sends our size at once (attach: the terminal is not the one the
    process was started with).
    """
    io, sinks = _stdio()
    if not tty:
        return await _wait_or_gone(await start(container, io), sinks)
    import trio

    from gactor.types import TTYSpec

    with trio.open_signal_receiver(signal.SIGWINCH, *ENDING_SIGNALS) as signals:
        process = await start(container, io)
        if resize_now and (size := window_size()) is not None:
            await process.set_tty(TTYSpec(window_size=size))

        ended_by: list[int] = []

        async def follow_signals(nursery: trio.Nursery) -> None:
            async for signum in signals:
                if signum != signal.SIGWINCH:
                    ended_by.append(signum)
                    nursery.cancel_scope.cancel()
                    return
                if (size := window_size()) is not None:
                    await process.set_tty(TTYSpec(window_size=size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_signals, nursery)
            code = await _wait_or_gone(process, sinks)
            nursery.cancel_scope.cancel()
        if ended_by:
            raise click.exceptions.Exit(128 + ended_by[0])
    return code


def _run_session(opts: Options, handle: str, start: Any, tty: bool, resize_now: bool = False) -> None:
    with raw_terminal(tty):
        code = with_container(opts, handle, lambda c: _session(c, start, tty, resize_now))
    raise click.exceptions.Exit(code)


@examples("gactor run web -- ls -l /", "gactor run --tty web -- sh",
          "gactor run --user root --env DEBUG=1 --dir /tmp web -- sh -c 'env; pwd'",
          "tar -c . | gactor run web -- tar -x -C /srv")
@cli.command(context_settings={"ignore_unknown_options": True})
@handle_argument()
@click.option("--tty", is_flag=True,
              help="Give the process a pseudo-terminal (with our TERM and window size); "
                   "our terminal goes raw until it exits.")
@click.option("--user", default="", metavar="U", help="User to run as [the image's].")
@click.option("--env", multiple=True, metavar="K=V", callback=pairs,
              help="Environment variable; repeatable.")
@click.option("--dir", "directory", default="", metavar="D", help="Working directory.")
@click.option("--id", "process_id", default="", metavar="ID",
              help="Process id, to attach to it later [generated].")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_options
def run(opts: Options, handle: str, tty: bool, user: str, env: list[str], directory: str,
        process_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a container with our stdin, stdout and stderr; exit with its code.

    Put -- before COMMAND when it has options of its own. ^C in a --tty session
    goes to the process; outside one, it ends this command (exit 130) and the process
    runs on. The output is the process's, so --json changes nothing here.
    """
    from gactor.types import ProcessSpec, TTYSpec

    if tty and not any(e.startswith("TERM=") for e in env):
        env = [f"TERM={os.environ.get('TERM') or DEFAULT_TERM}", *env]
    spec = ProcessSpec(id=process_id, path=command[0], args=list(command[1:]), env=env,
                       dir=directory, user=user,
                       tty=TTYSpec(window_size=window_size()) if tty else None)
    _run_session(opts, handle, lambda c, io: c.run(spec, io), tty)


@examples("gactor run --id job web -- sh -c 'sleep 5; echo done' &", "gactor attach web job",
          "gactor attach --tty web shell")
@cli.command()
@handle_argument()
@click.argument("process_id", shell_complete=complete_process_id)
@click.option("--tty", is_flag=True,
              help="The process has a pseudo-terminal: go raw, forward resizes.")
@pass_options
def attach(opts: Options, handle: str, process_id: str, tty: bool) -> None:
    """Wire our stdio to a running process; exit with its code.

    With --tty our terminal goes raw and the process's terminal takes our window size,
    as with run --tty; the process keeps its TERM.
    """
    _run_session(opts, handle, lambda c, io: c.attach(process_id, io), tty, resize_now=True)
