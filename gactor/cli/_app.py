"""The ``gactor`` group, its global options, and running one client session per command.

trio, the client and the server are imported inside the functions that use them: the
server forks a helper before trio may exist in the process, and ``gactor ping`` or
``gactor --help`` should not pay for imports they do not need.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import IO, Any, TypeVar

import click
from click.shell_completion import CompletionItem

from gactor.errors import GardenError

T = TypeVar("T")
C = TypeVar("C", bound=click.Command)
COMPLETION_TIMEOUT = 2.0  # seconds a tab press may wait for the server's list of handles


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

HELP = """gactor: a Garden-compatible container server and its client.

\b
Start a server (as root), then talk to it from another terminal:
  gactor server
  gactor create --handle web --memory 64M
  gactor run web -- sh -c 'echo hello from $(hostname)'
  gactor run --tty web -- sh
  gactor list
  gactor destroy web

\b
Every command takes --help. --json (before the command) prints JSON instead of tables.
Shell completion (bash; zsh and fish likewise with zsh_source, fish_source):
  eval "$(_GACTOR_COMPLETE=bash_source gactor)"
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", envvar="GACTOR_TARGET", default="ws://127.0.0.1:7777",
              show_default=True, metavar="URL",
              help="Server to talk to: ws://HOST:PORT, wss://HOST:PORT or unix:///PATH "
                   "[env GACTOR_TARGET].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--token", envvar="GACTOR_TOKEN", help="Bearer token for the server [env GACTOR_TOKEN].")
@click.option("--tls-ca", envvar="GACTOR_TLS_CA", type=click.Path(dir_okay=False), metavar="FILE",
              help="CA certificate(s) to verify a wss:// server by [the system's].")
@click.version_option(package_name="gactor", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, target: str, as_json: bool, token: str | None,
        tls_ca: str | None) -> None:
    ctx.obj = Options(target=target, json=as_json, token=token, tls_ca=tls_ca)


def main() -> None:
    cli(prog_name="gactor")


def examples(*lines: str) -> Callable[[C], C]:
    """Append an ``Examples:`` block to a command's help (kept verbatim by click)."""

    def add(command: C) -> C:
        block = "\n".join(f"  {line}" for line in lines)
        command.epilog = f"\b\nExamples:\n{block}"
        return command

    return add


def _json_here(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        opts = ctx.find_object(Options)
        if opts is not None:
            ctx.obj = dataclasses.replace(opts, json=True)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``COMMAND --json``, the same as ``gactor --json COMMAND`` (which the contract names)."""
    return click.option("--json", "json_here", is_flag=True, expose_value=False, callback=_json_here,
                        help="Print JSON (the same as gactor --json COMMAND).")(function)


# ---------------------------------------------------------------- running client calls

def _sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def call(opts: Options, action: Callable[[Any], Awaitable[T]]) -> T:
    """Connect to the target, run ``action(client)`` under trio and return its result.

    GardenErrors become ``CommandError``; so does a failure to connect, which is
    named as such because the server's absence is the usual cause. ^C (SIGINT) ends
    the command with exit status 130.
    """
    import trio

    from gactor.client import connect

    async def session() -> T:
        async with AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(
                    connect(opts.target, token=opts.token, ssl=tls_context(opts)))
            except Exception as err:  # any failure here means we never reached the server
                raise CommandError(_connect_failure(opts.target, err)) from err
            return await action(client)

    try:
        return trio.run(session)
    except BaseException as exc:
        leaf = _sole_exception(exc)
        if isinstance(leaf, click.exceptions.Exit | CommandError):
            raise leaf from None
        if isinstance(leaf, GardenError):
            raise CommandError(leaf.message) from None
        if isinstance(leaf, KeyboardInterrupt):
            raise click.exceptions.Exit(130) from None
        raise


def with_container(opts: Options, handle: str, action: Callable[[Any], Awaitable[T]]) -> T:
    """``call`` with the container ``handle`` looked up first (so a typo fails fast)."""

    async def lookup_then(client: Any) -> T:
        return await action(await client.lookup(handle))

    return call(opts, lookup_then)


def tls_context(opts: Options) -> Any:
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


def echo_json(value: Any) -> None:
    """``value`` (dataclasses, enums and builtins) as indented JSON on stdout."""
    import msgspec

    click.echo(json.dumps(msgspec.to_builtins(value), indent=2))


def pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """Validate repeatable ``KEY=VALUE`` options."""
    for value in values:
        if "=" not in value:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", ctx, param)
    return list(values)


def as_dict(values: list[str]) -> dict[str, str]:
    return dict(value.split("=", 1) for value in values)


# ---------------------------------------------------------------- shell completion

def _complete(ctx: click.Context, incomplete: str, names: Callable[[Any], Awaitable[list[str]]]
              ) -> list[CompletionItem]:
    """``names(client)`` starting with ``incomplete``, for shell completion.

    Completion must never hang a shell or print errors into it: an unreachable
    server, a wrong token or a slow answer (over COMPLETION_TIMEOUT) completes nothing.
    """
    import trio

    from gactor.client import connect

    root = ctx.find_root().params
    target = root.get("target") or "ws://127.0.0.1:7777"

    async def ask() -> list[str]:
        with trio.move_on_after(COMPLETION_TIMEOUT):
            async with connect(target, token=root.get("token")) as client:
                return await names(client)
        return []

    try:
        found = trio.run(ask)
    except Exception:  # noqa: BLE001 - see the docstring: completion fails silently
        return []
    return [CompletionItem(name) for name in sorted(found) if name.startswith(incomplete)]


def complete_handle(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The server's handles."""

    async def handles(client: Any) -> list[str]:
        return [c.handle for c in await client.containers()]

    return _complete(ctx, incomplete, handles)


def complete_process_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The ids of the processes in the container named by the HANDLE before it."""
    handle = ctx.params.get("handle")
    if not handle:
        return []

    async def process_ids(client: Any) -> list[str]:
        return list((await (await client.lookup(handle)).info()).process_ids)

    return _complete(ctx, incomplete, process_ids)


def handle_argument(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A HANDLE argument that tab-completes from the server's containers."""
    return click.argument("handle", metavar="HANDLE" if required else "[HANDLE]",
                          required=required, shell_complete=complete_handle)
