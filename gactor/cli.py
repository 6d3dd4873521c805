"""The ``gactor`` command line: the server entry point and a thin client over ``gactor.connect``.

trio, the client and the server are imported inside the commands that use them: the
server forks a helper before trio may exist in the process, and ``gactor ping`` or
``gactor --help`` should not pay for imports they do not need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from click.core import ParameterSource

from gactor.errors import GardenError

T = TypeVar("T")
READ_CHUNK = 65536  # bytes read from our stdin per stdin frame


class CommandError(click.ClickException):
    """A failure reported as ``error: <message>`` on stderr with exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class ConfigurationError(CommandError):
    """A server configuration that cannot be served: ``error: <message>``, exit status 2."""

    exit_code = 2


@dataclasses.dataclass(frozen=True)
class Options:
    target: str
    json: bool
    token: str | None
    tls_ca: str | None = None


pass_options = click.make_pass_decorator(Options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", envvar="GACTOR_TARGET", default="ws://127.0.0.1:7777",
              show_default=True, metavar="URL",
              help="Server to talk to: ws://HOST:PORT, wss://HOST:PORT or unix:///PATH.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--token", envvar="GACTOR_TOKEN", help="Bearer token for the server.")
@click.option("--tls-ca", envvar="GACTOR_TLS_CA", type=click.Path(dir_okay=False), metavar="FILE",
              help="CA certificate(s) to verify a wss:// server by [the system's].")
@click.pass_context
def cli(ctx: click.Context, target: str, as_json: bool, token: str | None,
        tls_ca: str | None) -> None:
    """gactor: a Garden-compatible container server and its client."""
    ctx.obj = Options(target=target, json=as_json, token=token, tls_ca=tls_ca)


def main() -> None:
    cli(prog_name="gactor")


# ---------------------------------------------------------------- running client calls

def _sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _call(opts: Options, action: Callable[[Any], Awaitable[T]]) -> T:
    """Connect to the target, run ``action(client)`` under trio and return its result.

    GardenErrors become ``CommandError``; so does a failure to connect, which is
    named as such because the server's absence is the usual cause.
    """
    import trio

    from gactor.client import connect

    async def session() -> T:
        async with AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(
                    connect(opts.target, token=opts.token, ssl=_tls_context(opts)))
            except Exception as err:  # any failure here means we never reached the server
                raise CommandError(_connect_failure(opts.target, err)) from err
            return await action(client)

    try:
        return trio.run(session)
    except BaseException as exc:
        leaf = _sole_exception(exc)
        if isinstance(leaf, CommandError):
            raise leaf from None
        if isinstance(leaf, GardenError):
            raise CommandError(leaf.message) from None
        if isinstance(leaf, KeyboardInterrupt):
            raise click.exceptions.Exit(130) from None
        raise


def _tls_context(opts: Options) -> Any:
    """The ssl.SSLContext for a wss:// target verified by ``--tls-ca``; None otherwise
    (the client then uses the system's trust store for wss://)."""
    if opts.tls_ca is None:
        return None
    import ssl

    try:
        return ssl.create_default_context(cafile=opts.tls_ca)
    except (OSError, ssl.SSLError) as err:
        raise CommandError(f"cannot read --tls-ca {opts.tls_ca}: {err}") from err


def _connect_failure(target: str, err: Exception) -> str:
    message = str(err).rstrip().rstrip(":")  # the client may already say "cannot connect"
    return message if message.startswith("cannot connect") else f"cannot connect to {target}: {message}"


def _with_container(opts: Options, handle: str, action: Callable[[Any], Awaitable[T]]) -> T:
    async def lookup_then(client: Any) -> T:
        return await action(await client.lookup(handle))

    return _call(opts, lookup_then)


def _flatten(value: Any, prefix: str = "") -> Iterator[str]:
    """``dotted.key value`` lines of a builtins tree; lists stay compact JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        yield f"{prefix} {json.dumps(value)}"
    else:
        yield f"{prefix} {'' if value is None else value}".rstrip()


def _show(opts: Options, value: Any, text: str | None = None) -> None:
    """Print ``value`` as JSON with ``--json``, else ``text`` or ``key value`` lines."""
    import msgspec

    plain = msgspec.to_builtins(value)
    if opts.json:
        click.echo(json.dumps(plain, indent=2))
    elif text is not None:
        click.echo(text)
    elif isinstance(plain, list):
        for item in plain:
            click.echo(item)
    else:
        for line in _flatten(plain):
            click.echo(line)


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    for value in values:
        if "=" not in value:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", ctx, param)
    return list(values)


# ---------------------------------------------------------------- the server

@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.toml", help="TOML file of these options; flags override it.")
@click.option("--print-config", is_flag=True,
              help="Print the effective configuration as TOML (the token hidden) and exit.")
@click.option("--listen", metavar="HOST:PORT|unix:///PATH",
              help="Websocket API address [127.0.0.1:7777]; a unix socket gets mode 0660.")
@click.option("--garden-listen", metavar="HOST:PORT", help="Garden HTTP API address [off].")
@click.option("--depot", metavar="DIR", help="State directory [/var/lib/gactor].")
@click.option("--default-rootfs", metavar="PATH|URI", help="Image used when a spec names none.")
@click.option("--network-pool", metavar="CIDR", help="Container subnets [10.254.0.0/22].")
@click.option("--port-pool-start", type=int, metavar="N", help="First net-in host port [61001].")
@click.option("--port-pool-size", type=int, metavar="N", help="Number of host ports [4534].")
@click.option("--default-grace-time", type=float, metavar="SECONDS",
              help="Reap idle containers after this long [0 = never].")
@click.option("--max-containers", type=int, metavar="N", help="[0 = limited by the pools].")
@click.option("--deny-network", "deny_networks", multiple=True, metavar="CIDR",
              help="Network containers may never reach; repeatable.")
@click.option("--external-ip", metavar="IP", help="[the host's primary address].")
@click.option("--cgroup-favordynmods/--no-cgroup-favordynmods", default=True,
              help="Remount a cgroup hierarchy with favordynmods: ~10 ms faster creates and runs, "
                   "host-wide until reboot [on].")
@click.option("--mtu", type=int, metavar="BYTES",
              help="MTU of container interfaces [that of the host's default-route interface].")
@click.option("--log-level", metavar="LEVEL", help="debug, info, warning or error [info].")
@click.option("--log-format", metavar="json|console",
              help="JSON lines or lines for people [console when stderr is a terminal, else json].")
@click.option("--metrics-listen", metavar="HOST:PORT|unix:///PATH|off",
              help="Where /metrics, /healthz and /readyz are served [127.0.0.1:7778].")
@click.option("--cpu-quota-per-share", type=int, metavar="USEC",
              help="CPU quota per share of limit_in_shares [0 = no quota].")
@click.option("--destroy-containers-on-startup", is_flag=True,
              help="Destroy containers left by a previous run instead of restoring them.")
@click.option("--token", help="Require this bearer token [the global --token].")
@click.option("--tls-cert", metavar="FILE", help="Serve wss://: the certificate chain (PEM).")
@click.option("--tls-key", metavar="FILE", help="The private key of --tls-cert (PEM).")
@click.option("--insecure", is_flag=True,
              help="Allow a non-loopback --listen without TLS and a token (logged loudly).")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A browser origin allowed to open the websocket (https://host:port); "
                   "repeatable. Handshakes from any other origin get 403.")
@click.pass_context
def server(ctx: click.Context, /, config_file: Path | None, print_config: bool, **flags: Any) -> None:
    """Run the server in the foreground until SIGTERM.

    \b
    Examples:
      gactor server --config /etc/gactor/gactor.toml
      gactor server --listen unix:///run/gactor.sock --metrics-listen off
      gactor server --config gactor.toml --log-level debug --print-config
    """
    from gactor import server as server_module
    from gactor.ops import config as ops_config

    try:
        file_values = ops_config.load(config_file) if config_file else {}
    except ops_config.ConfigFileError as err:
        raise ConfigurationError(str(err)) from None
    values: dict[str, Any] = {}
    for name, value in flags.items():
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT):
            values[name] = list(value) if isinstance(value, tuple) else value
    # A token given to gactor itself also protects the server it starts.
    options = ctx.find_object(Options)
    if "token" not in values and "token" not in file_values and options is not None and options.token:
        values["token"] = options.token
    for flag in server_module.unimplemented_options({**file_values, **values}):
        raise ConfigurationError(f"{flag} is not implemented yet")
    try:
        config = ops_config.build(file_values, values)
    except ops_config.ConfigFileError as err:
        raise ConfigurationError(str(err)) from None
    if print_config:
        click.echo(ops_config.render(config), nl=False)
        return
    try:
        server_module.run(config)
    except server_module.ConfigError as err:
        raise ConfigurationError(str(err)) from None


# ---------------------------------------------------------------- containers

@cli.command()
@pass_options
def ping(opts: Options) -> None:
    """Check that the server answers."""
    _call(opts, lambda client: client.ping())
    _show(opts, {"ok": True}, "ok")


@cli.command()
@pass_options
def capacity(opts: Options) -> None:
    """Show the server's capacity."""
    _show(opts, _call(opts, lambda client: client.capacity()))


@cli.command()
@click.option("--handle", default="", help="Handle to use [generated].")
@click.option("--rootfs", default="", metavar="URI", help="Image: directory, tar, oci:// or docker://.")
@click.option("--property", "properties", multiple=True, metavar="K=V", callback=_pairs)
@click.option("--memory", type=int, default=0, metavar="BYTES", help="Memory limit.")
@click.option("--env", multiple=True, metavar="K=V", callback=_pairs)
@click.option("--grace-time", type=float, default=0.0, metavar="SECONDS",
              help="Destroy the container after this long without a client.")
@click.option("--privileged", is_flag=True, help="Do not map container root to an unprivileged user.")
@pass_options
def create(opts: Options, handle: str, rootfs: str, properties: list[str], memory: int,
           env: list[str], grace_time: float, privileged: bool) -> None:
    """Create a container and print its handle."""
    from gactor.types import ContainerSpec, ImageRef, Limits, MemoryLimits

    spec = ContainerSpec(
        handle=handle, image=ImageRef(uri=rootfs), env=env, grace_time=grace_time,
        privileged=privileged, properties=dict(p.split("=", 1) for p in properties),
        limits=Limits(memory=MemoryLimits(limit_in_bytes=memory)))
    container = _call(opts, lambda client: client.create(spec))
    _show(opts, {"handle": container.handle}, container.handle)


@cli.group(invoke_without_command=True)
@click.pass_context
def images(ctx: click.Context) -> None:
    """List the server's image store: one line per image (size, layers, users, source)."""
    if ctx.invoked_subcommand is not None:
        return
    opts = ctx.find_object(Options)
    assert opts is not None
    found = _call(opts, lambda client: client.images())
    lines = [f"{_size(i.bytes):>9}  {i.layers} layer{'s' if i.layers != 1 else ''}  "
             f"users: {','.join(i.users) or '-'}  {i.source or i.path}" for i in found]
    _show(opts, found, "\n".join(lines) if lines else "no images")


@images.command(name="prune")
@pass_options
def images_prune(opts: Options) -> None:
    """Remove every image and layer no container uses; print what was removed."""
    removed = _call(opts, lambda client: client.prune_images())
    _show(opts, removed, "\n".join(removed) if removed else "nothing to prune")


@cli.command()
@click.argument("uri")
@click.option("--username", default="", help="Registry login for docker:// images.")
@click.option("--password", default="", envvar="GACTOR_REGISTRY_PASSWORD", help="[env GACTOR_REGISTRY_PASSWORD]")
@pass_options
def pull(opts: Options, uri: str, username: str, password: str) -> None:
    """Fetch an image into the server's image store."""
    image = _call(opts, lambda client: client.pull(uri, username, password))
    _show(opts, image, f"{image.source}: {_size(image.bytes)}, {image.layers} layer{'s' if image.layers != 1 else ''}")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@cli.command(name="list")
@click.option("--property", "properties", multiple=True, metavar="K=V", callback=_pairs,
              help="Only containers with this property; repeatable, ANDed.")
@pass_options
def list_containers(opts: Options, properties: list[str]) -> None:
    """Print the handles of the containers, one a line."""
    wanted = dict(p.split("=", 1) for p in properties) or None
    containers = _call(opts, lambda client: client.containers(properties=wanted))
    _show(opts, [c.handle for c in containers])


@cli.command()
@click.argument("handle")
@pass_options
def info(opts: Options, handle: str) -> None:
    """Show a container's state, addresses, processes and properties."""
    _show(opts, _with_container(opts, handle, lambda c: c.info()))


@cli.command()
@click.argument("handle")
@pass_options
def destroy(opts: Options, handle: str) -> None:
    """Destroy a container and everything running in it."""
    _call(opts, lambda client: client.destroy(handle))


@cli.command()
@click.argument("handle")
@pass_options
def metrics(opts: Options, handle: str) -> None:
    """Show a container's memory, CPU, disk, network and pid counters."""
    _show(opts, _with_container(opts, handle, lambda c: c.metrics()))


@cli.command()
@click.argument("handle")
@pass_options
def properties(opts: Options, handle: str) -> None:
    """Print a container's properties as ``key value`` lines."""
    _show(opts, _with_container(opts, handle, lambda c: c.properties()))


@cli.command(name="set-grace-time")
@click.argument("handle")
@click.argument("seconds", type=float)
@pass_options
def set_grace_time(opts: Options, handle: str, seconds: float) -> None:
    """Destroy the container after SECONDS without a client (0 = never)."""
    _with_container(opts, handle, lambda c: c.set_grace_time(seconds))


@cli.command()
@click.argument("handle")
@click.option("--kill", is_flag=True, help="SIGKILL at once instead of SIGTERM first.")
@pass_options
def stop(opts: Options, handle: str, kill: bool) -> None:
    """Stop every process in a container."""
    _with_container(opts, handle, lambda c: c.stop(kill=kill))


@cli.command(name="net-in")
@click.argument("handle")
@click.option("--host-port", type=int, default=0, metavar="N", help="[a free pool port].")
@click.option("--container-port", type=int, required=True, metavar="N")
@pass_options
def net_in(opts: Options, handle: str, host_port: int, container_port: int) -> None:
    """Forward a host port to the container and print the host port."""
    host, inside = _with_container(
        opts, handle, lambda c: c.net_in(host_port=host_port, container_port=container_port))
    _show(opts, {"host_port": host, "container_port": inside}, str(host))


# ---------------------------------------------------------------- stdio and processes

class _Sink:
    """A ProcessIO sink onto one of our binary files.

    Writes happen in a thread: a terminal or pipe that is slow to drain must not stall
    the event loop, and making a shared descriptor non-blocking would break the shell.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    async def send_all(self, data: bytes) -> None:
        import trio

        await trio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """Our stdin until EOF, read in a thread because regular files cannot be polled.

    The read is abandoned on cancellation: the process may exit while we wait for a key.
    """
    import trio

    fd = sys.stdin.fileno()
    while chunk := await trio.to_thread.run_sync(os.read, fd, READ_CHUNK, abandon_on_cancel=True):
        yield chunk


def _stdio() -> Any:
    from gactor.client import ProcessIO

    return ProcessIO(stdin=_stdin_chunks() if sys.stdin is not None else None,
                            stdout=_Sink(sys.stdout.buffer), stderr=_Sink(sys.stderr.buffer))


def _window_size() -> Any:
    from gactor.types import WindowSize

    for fd in (0, 1):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return WindowSize(columns=size.columns, rows=size.lines)
    return None


@contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """Raw mode on our terminal so every key (Ctrl-C too) reaches the remote pty as typed."""
    if not enabled or sys.stdin is None or not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _wait(process: Any, tty: bool) -> int:
    """The exit code; meanwhile, with a tty, forward our window size as it changes."""
    if not tty:
        return int(await process.wait())
    import signal

    import trio

    from gactor.types import TTYSpec

    async def forward_resizes() -> None:
        with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
            async for _ in resizes:
                if (size := _window_size()) is not None:
                    await process.set_tty(TTYSpec(window_size=size))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward_resizes)
        code = int(await process.wait())
        nursery.cancel_scope.cancel()
    return code


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("handle")
@click.option("--tty", is_flag=True, help="Give the process a pseudo-terminal.")
@click.option("--user", default="", metavar="U", help="User to run as [the image's].")
@click.option("--env", multiple=True, metavar="K=V", callback=_pairs)
@click.option("--dir", "directory", default="", metavar="D", help="Working directory.")
@click.option("--id", "process_id", default="", metavar="ID", help="Process id [generated].")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_options
def run(opts: Options, handle: str, tty: bool, user: str, env: list[str], directory: str,
        process_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a container with our stdio, like ``docker exec``; exit with its code.

    Put ``--`` before COMMAND when it has options of its own.
    """
    from gactor.types import ProcessSpec, TTYSpec

    spec = ProcessSpec(id=process_id, path=command[0], args=list(command[1:]), env=env,
                       dir=directory, user=user,
                       tty=TTYSpec(window_size=_window_size()) if tty else None)

    async def action(container: Any) -> int:
        return await _wait(await container.run(spec, _stdio()), tty)

    with _raw_terminal(tty):
        code = _with_container(opts, handle, action)
    raise click.exceptions.Exit(code)


@cli.command()
@click.argument("handle")
@click.argument("process_id")
@click.option("--tty", is_flag=True, help="The process has a pseudo-terminal: go raw, forward resizes.")
@pass_options
def attach(opts: Options, handle: str, process_id: str, tty: bool) -> None:
    """Wire our stdio to a running process; exit with its code."""

    async def action(container: Any) -> int:
        return await _wait(await container.attach(process_id, _stdio()), tty)

    with _raw_terminal(tty):
        code = _with_container(opts, handle, action)
    raise click.exceptions.Exit(code)


@cli.command(name="stream-in")
@click.argument("handle")
@click.option("--to", "path", required=True, metavar="PATH", help="Directory to extract into.")
@click.option("--user", default="", metavar="U", help="Owner of the extracted files.")
@pass_options
def stream_in(opts: Options, handle: str, path: str, user: str) -> None:
    """Extract the tar stream on stdin into the container."""
    from gactor.types import StreamInSpec

    spec = StreamInSpec(path=path, user=user, tar_stream=_stdin_chunks())
    _with_container(opts, handle, lambda c: c.stream_in(spec))


@cli.command(name="stream-out")
@click.argument("handle")
@click.option("--from", "path", required=True, metavar="PATH", help="File or directory to copy.")
@click.option("--user", default="", metavar="U", help="User to read as.")
@pass_options
def stream_out(opts: Options, handle: str, path: str, user: str) -> None:
    """Write a tar stream of PATH in the container to stdout."""
    from gactor.types import StreamOutSpec

    if sys.stdout.isatty():
        raise CommandError("refusing to write a tar stream to a terminal; redirect stdout")
    sink = _Sink(sys.stdout.buffer)

    async def action(container: Any) -> None:
        stream = await container.stream_out(StreamOutSpec(path=path, user=user))
        async with stream:
            async for chunk in stream:
                await sink.send_all(chunk)

    _with_container(opts, handle, action)
