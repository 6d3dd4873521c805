"""``gactor server``: the effective configuration (flags over the TOML file), then the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ._app import ConfigurationError, Options, cli


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.toml", help="TOML file of these options; flags override it.")
@click.option("--print-config", is_flag=True,
              help="Print the effective configuration as TOML (the token hidden) and exit.")
@click.option("--listen", metavar="HOST:PORT|unix:///PATH",
              help="Websocket API address [127.0.0.1:7777]; a unix socket gets mode 0660.")
@click.option("--garden-listen", metavar="HOST:PORT|unix:///PATH",
              help="Garden HTTP API address (Garden's Go client, GATS) [off]; same access rules as --listen.")
@click.option("--debug-listen", metavar="HOST:PORT|unix:///PATH",
              help="Serve /debug/vars (memstats, as gdn's debug server) here [off]; loopback only.")
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
@click.option("--mount-cgroup-controllers", is_flag=True,
              help="Mount the cgroup v1 controllers the host enables but left unmounted (net_cls, "
                   "perf_event, ...), as Garden's server does: host-wide, and one more cgroup per "
                   "container each.")
@click.option("--allow-host-access", is_flag=True,
              help="Let containers reach the host's own services (Garden's default: only replies get in).")
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
@click.option("--disable-privileged-containers", is_flag=True,
              help="Refuse to create privileged containers.")
@click.option("--no-new-privileges", is_flag=True,
              help="Set no_new_privs in unprivileged containers (setuid binaries stop working).")
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

