"""The composition root: configuration, the spawner fork, and the actor tree.

``run(config)`` forks the spawner first (the only safe moment: no threads yet),
then starts trio with the registry actor and the websocket front end.
SIGTERM and SIGINT shut the server down gracefully and leave containers running.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import os
import signal
import ssl
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .kernel.container_init import Confinement, confinement
from .kernel.errors import KernelError
from .kernel.spawner import SpawnerHandle, fork_spawner
from .ops.notify import ServiceManager
from .transport import listeners

log = logging.getLogger("gactor.server")


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:7777"
    garden_listen: str | None = None
    debug_listen: str | None = None  # /debug/vars, as gdn's debug server (GATS reads it)
    depot: str = "/var/lib/gactor"
    default_rootfs: str = ""
    network_pool: str = "10.254.0.0/22"
    port_pool_start: int = 61001
    port_pool_size: int = 4534
    default_grace_time: float = 0.0
    max_containers: int = 0
    deny_networks: list[str] = field(default_factory=list)
    external_ip: str | None = None
    allow_host_access: bool = False  # Garden's default: containers reach no host service
    mount_cgroup_controllers: bool = False  # mount the v1 controllers the host left unmounted
    mtu: int = 0  # 0: the MTU of the host's default-route interface
    cgroup_favordynmods: bool = True  # faster cgroup migration, host-wide (docs/limits.md)
    log_level: str = "info"
    log_format: str = "auto"  # json, console, or auto: console when stderr is a terminal
    metrics_listen: str = "127.0.0.1:7778"  # /metrics, /healthz, /readyz; "off" for none
    cpu_quota_per_share: int = 0
    destroy_containers_on_startup: bool = False
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False  # allow a non-loopback listener without TLS and a token
    allow_origins: list[str] = field(default_factory=list)
    cgroup_parent: str = ""  # default: derived from the depot, see cgroup_parent_for
    disable_privileged_containers: bool = False
    no_new_privileges: bool = False  # for unprivileged containers; breaks setuid binaries (docs/security.md)


# Options the contract names and the command line parses, but that no code acts on yet:
# refused at startup, naming the flag, rather than silently ignored. Remove an entry in
# the change that implements it.
NOT_IMPLEMENTED: dict[str, str] = {}


class ConfigError(Exception):
    """The configuration cannot be served; the message names the option at fault."""


def unimplemented_options(given: Iterable[str]) -> list[str]:
    """The flags among the config fields ``given`` that are not implemented yet."""
    return [flag for name, flag in NOT_IMPLEMENTED.items() if name in set(given)]


def check_implemented(config: ServerConfig) -> None:
    """Raise ConfigError naming the first option set (to anything but its default) that
    the server does not implement yet."""
    default = ServerConfig()
    changed = [name for name in NOT_IMPLEMENTED if getattr(config, name) != getattr(default, name)]
    for flag in unimplemented_options(changed):
        raise ConfigError(f"{flag} is not implemented yet")


DEFAULT_DEPOT = "/var/lib/gactor"


def cgroup_parent_for(config: ServerConfig) -> str:
    """The cgroup directory this server's containers live in.

    Startup reconcile removes every cgroup under it that no container owns, so two
    servers with different depots (tests, benchmarks) must never share one.
    """
    if config.cgroup_parent:
        return config.cgroup_parent
    if os.path.realpath(config.depot) == DEFAULT_DEPOT:
        return "gactor"
    return "gactor-" + hashlib.sha256(os.path.realpath(config.depot).encode()).hexdigest()[:10]


def split_address(address: str) -> tuple[str, int]:
    """HOST and PORT of a TCP ``--listen`` value; ValueError for anything else."""
    parsed = listeners.parse_listen(address)
    if not isinstance(parsed, listeners.TcpAddress):
        raise ValueError(f"listen address {address!r} must be HOST:PORT")
    return parsed.host, parsed.port


def check_access(config: ServerConfig, address: listeners.ListenAddress) -> None:
    """Raise ConfigError unless the API is as private as its address requires.

    Anyone who can open the API runs code as root. A unix socket (mode 0660) and a
    loopback address reach only this host; any other address needs TLS (so the token
    is not sent in clear) and a token, or ``--insecure`` (which run() logs loudly).
    """
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if isinstance(address, listeners.UnixAddress):
        if config.tls_cert is not None:
            raise ConfigError("--tls-cert serves wss:// on a TCP --listen address; a unix socket "
                              "is protected by its file mode (0660) instead")
        return
    if address.is_loopback or config.insecure:
        return
    missing = [what for what, given in (("--tls-cert/--tls-key", config.tls_cert is not None),
                                        ("--token", bool(config.token))) if not given]
    if missing:
        raise ConfigError(
            f"refusing to serve on {address.host} without {' and '.join(missing)}: anyone who "
            f"can reach it could run code as root (give them, or --insecure to accept that)")


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load --tls-cert {config.tls_cert} / --tls-key "
                          f"{config.tls_key}: {err}") from None
    return context


def _metrics_address(config: ServerConfig) -> listeners.ListenAddress | None:
    """The operations listener's address (None: off); ConfigError if it is unusable."""
    from .ops import config as ops_config

    try:
        ops_config.validate(config)
        address = ops_config.metrics_address(config)
        if isinstance(address, listeners.UnixAddress):
            listeners.check_unix_socket_path(address.path)
    except (ops_config.ConfigFileError, listeners.ListenError) as err:
        raise ConfigError(str(err)) from None
    return address


def _check_traversable(depot: str) -> None:
    """Container roots (an unprivileged host uid) must walk down to their rootfs mounts."""
    path = os.path.realpath(depot)
    while True:
        if not os.stat(path).st_mode & 0o001:
            raise SystemExit(f"depot {depot}: {path} is not searchable by other users (mode o+x); "
                             f"unprivileged containers could not reach their root filesystems")
        if path == "/":
            return
        path = os.path.dirname(path)


def run(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT. Blocks; raises ConfigError on a configuration it
    cannot serve (an unimplemented option, an address too open for its protection, a
    bad TLS key) and SystemExit on a host it cannot run on."""
    check_implemented(config)
    try:
        address = listeners.parse_listen(config.listen)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_access(config, address)
    garden_address = debug_address = None
    try:
        if config.garden_listen:
            garden_address = listeners.parse_listen(config.garden_listen)
        if config.debug_listen:
            debug_address = listeners.parse_listen(config.debug_listen)
    except ValueError as err:
        raise ConfigError(f"--garden-listen/--debug-listen: {err}") from None
    if garden_address is not None:
        check_access(config, garden_address)  # the same rules: it is the same root API
    if isinstance(debug_address, listeners.TcpAddress) and not debug_address.is_loopback and not config.insecure:
        raise ConfigError(f"--debug-listen {config.debug_listen}: the debug server has no token or TLS; "
                          "give a loopback address or a unix socket (or --insecure)")
    ssl_context = _tls_context(config)
    for each in (address, garden_address, debug_address):
        if isinstance(each, listeners.UnixAddress):
            try:
                listeners.check_unix_socket_path(each.path)
            except listeners.ListenError as err:
                raise ConfigError(str(err)) from None
    metrics_address = _metrics_address(config)
    from .ops import logs

    logs.configure(config.log_level, config.log_format, config.token)
    if os.geteuid() != 0:
        raise SystemExit("gactor server must run as root")
    if config.insecure and isinstance(address, listeners.TcpAddress) and not address.is_loopback \
            and not (config.tls_cert and config.token):
        log.warning("INSECURE: --insecure serves the root API on %s without %s: anyone who can "
                    "reach this address can run code as root on this host", config.listen,
                    "TLS" if config.token else ("a token" if config.tls_cert else "TLS or a token"))
    # Traversable but not listable: unprivileged container roots must reach their rootfs mount.
    os.makedirs(config.depot, mode=0o711, exist_ok=True)
    os.chmod(config.depot, 0o711)
    _check_traversable(config.depot)
    service = ServiceManager.from_environment()  # before the fork: no helper inherits it
    if config.mount_cgroup_controllers:
        _mount_cgroup_controllers()
    spawner = fork_spawner(_confinement(config))
    import trio  # noqa: PLC0415 - only after the spawner fork: trio may start threads

    try:
        trio.run(_serve, config, spawner, address, ssl_context, metrics_address, service,
                 garden_address, debug_address)
    except listeners.ListenError as err:
        raise ConfigError(str(err)) from None
    except BaseExceptionGroup as group:
        # The address could not be bound (in use, a file in the way...): a configuration
        # error like the others, not a crash.
        matched, _ = group.split(listeners.ListenError)
        if matched is None:
            raise
        raise ConfigError(str(_first_leaf(matched))) from None
    finally:
        spawner.sock.close()
        os.kill(spawner.pid, signal.SIGKILL)
        os.waitpid(spawner.pid, 0)


def _confinement(config: ServerConfig) -> Confinement:
    """Seccomp program, capability sets and cgroup mounts for every container, built once
    here (docs/security.md). GACTOR_SECCOMP=off leaves seccomp out: for measuring its cost
    only."""
    seccomp_on = os.environ.get("GACTOR_SECCOMP", "on") != "off"
    if not seccomp_on:
        log.warning("GACTOR_SECCOMP=off: unprivileged containers run WITHOUT a seccomp filter")
    try:
        conf = confinement(seccomp_on=seccomp_on, no_new_privs=config.no_new_privileges)
    except KernelError as err:
        raise SystemExit(f"cannot build the seccomp profile of unprivileged containers: {err} "
                         f"(libseccomp2 is needed)") from None
    if conf.missing_privileged_caps:
        log.info("privileged containers get every capability but %s: this server's bounding "
                 "set lacks them", ", ".join(conf.missing_privileged_caps))
    if conf.seccomp is not None and conf.seccomp.unknown:
        log.warning("libseccomp does not know %s: the seccomp profile denies them",
                    " ".join(sorted(conf.seccomp.unknown)))
    return conf


def _mount_cgroup_controllers() -> None:
    from .kernel import cgroups
    from .kernel.errors import KernelError

    try:
        mounted = cgroups.mount_missing_v1()
    except KernelError as err:
        raise ConfigError(f"--mount-cgroup-controllers: {err}") from None
    if mounted:
        log.info("mounted the cgroup v1 controllers the host had left unmounted: %s (they stay "
                 "mounted; each container gets a cgroup in each)", ", ".join(mounted))


def _favor_dynmods() -> None:
    from .kernel import cgroups
    from .kernel.errors import KernelError

    try:
        point = cgroups.favor_dynmods()
    except KernelError as err:
        log.warning("cgroup favordynmods not enabled (creates and runs stay ~10 ms slower): %s", err)
        return
    if point is not None:
        log.info("enabled cgroup favordynmods on %s: task migration no longer waits for an RCU "
                 "grace period; this lasts until reboot (--no-cgroup-favordynmods leaves the host alone)", point)


async def _start_networking(config: ServerConfig, env: Any) -> tuple[Any, Any]:
    """The netlink thread, the firewall and the pools; ConfigError for bad settings."""
    import ipaddress

    import trio

    from .actors.network import NetworkConfig, Networking
    from .actors.pools import PortPool, SubnetPool
    from .kernel import netmodel
    from .kernel.firewall import Firewall
    from .kernel.netlink import Netlink
    from .kernel.nft import Nft

    try:
        pool = ipaddress.IPv4Network(config.network_pool)
        deny = [ipaddress.IPv4Network(cidr, strict=False) for cidr in config.deny_networks]
        if config.external_ip:
            ipaddress.IPv4Address(config.external_ip)
    except ValueError as err:
        raise ConfigError(f"network settings: {err}") from None
    if not (0 < config.port_pool_start and config.port_pool_size > 0
            and config.port_pool_start + config.port_pool_size - 1 <= 65535):
        raise ConfigError(f"--port-pool-start {config.port_pool_start} --port-pool-size "
                          f"{config.port_pool_size}: the ports must lie within 1-65535")
    if config.mtu and not 68 <= config.mtu <= 65535:
        raise ConfigError(f"--mtu {config.mtu}: must be within 68-65535")
    tag = netmodel.server_tag(os.path.realpath(config.depot))
    netlink = Netlink(netmodel.deletion_group(tag))
    netlink.start()
    mtu = config.mtu or await netlink.call(netlink.default_route_mtu)
    external_ip = config.external_ip or await netlink.call(netlink.primary_address) or "127.0.0.1"
    await trio.to_thread.run_sync(netlink.enable_forwarding)
    firewall = Firewall(Nft(), tag, pool, deny, external_ip, config.allow_host_access)
    env.network = Networking(NetworkConfig(tag, pool, deny, mtu, external_ip), netlink, firewall)
    log.info("networking: pool %s, mtu %d, external ip %s%s", pool, mtu, external_ip,
             f", denying {', '.join(map(str, deny))}" if deny else "")
    ports = await trio.to_thread.run_sync(
        PortPool, config.port_pool_start, config.port_pool_size, os.path.join(config.depot, "ports.json"))
    return SubnetPool(pool), ports


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _serve(config: ServerConfig, spawner: SpawnerHandle, address: listeners.ListenAddress,
                 ssl_context: ssl.SSLContext | None, metrics_address: listeners.ListenAddress | None,
                 service: ServiceManager, garden_address: listeners.ListenAddress | None = None,
                 debug_address: listeners.ListenAddress | None = None) -> None:
    import trio

    from .actors.container import Environment
    from .actors.registry import Registry
    from .actors.spawner_client import SpawnerClient
    from .kernel import cgroups, depot, init_binary, rootfs
    from .ops import http as ops_http
    from .ops.metrics import Scraper
    from .transport import garden_conn, garden_http, ws_server
    from .transport.methods import Api

    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as f:
        mem_mib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) // 1024
    janitor = depot.Janitor(config.depot)
    await trio.to_thread.run_sync(janitor.start)
    env = Environment(
        depot=config.depot,
        discard=janitor.discard,
        cgroups=cgroups.discover(parent=cgroup_parent_for(config)),
        spawner=SpawnerClient(spawner.sock),
        image_store=os.path.join(config.depot, depot.IMAGES),
        cpu_quota_per_share=config.cpu_quota_per_share,
        entitlement_per_share=cpus * 100 / mem_mib,
        allow_privileged=not config.disable_privileged_containers,
    )
    if config.cgroup_favordynmods:
        await trio.to_thread.run_sync(_favor_dynmods)
    subnets, ports = await _start_networking(config, env)
    await trio.to_thread.run_sync(rootfs.remove_partial_images, env.image_store)
    try:
        env.init_binary = await trio.to_thread.run_sync(init_binary.ensure, os.path.join(config.depot, "bin"))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("no C compiler for garden-init (%s): container pid 1 will be a Python process", err)
    async with trio.open_nursery() as nursery:
        # The operations listener answers /healthz (and /readyz: 503) during reconcile.
        scraper = Scraper(config.depot)
        if metrics_address is not None:
            metrics_url = await nursery.start(ops_http.serve, ops_http.OpsRoutes(scraper), metrics_address)
            log.info("serving /metrics, /healthz and /readyz on %s", metrics_url)
        registry = Registry(env, config.default_rootfs, config.default_grace_time, config.max_containers,
                            subnets, ports)
        registry_ref = await nursery.start(functools.partial(
            registry.run, destroy_existing=config.destroy_containers_on_startup))
        scraper.registry = registry_ref
        api = Api(registry_ref, config.network_pool, observer=scraper.api)
        access = ws_server.Access(token=config.token or None,
                                  allow_origins=frozenset(config.allow_origins))
        url = await nursery.start(ws_server.serve, api, address, access, ssl_context)
        log.info("gactor serving the websocket API on %s", url)
        if garden_address is not None:
            garden_url = await nursery.start(garden_http.serve, api, garden_address, access, ssl_context)
            log.info("gactor serving the Garden HTTP API on %s", garden_url)
        if debug_address is not None:
            debug_url = await nursery.start(garden_conn.serve_debug, debug_address)
            log.info("gactor serving /debug/vars on %s", debug_url)
        scraper.ready = True
        # What startup made (modules, the re-adopted containers) lives as long as the
        # server: out of the collector's sight, a full collection walks only what serving
        # allocates (each one cost 20-40 us per Run, averaged, walking the whole heap).
        gc.freeze()
        service.notify("READY=1", f"STATUS=serving the API on {url}")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down, containers keep running", signal.Signals(signum).name)
                service.notify("STOPPING=1")
                scraper.ready = False
                nursery.cancel_scope.cancel()
                break
    if env.network is not None:
        await env.network.shut_down(any_containers=bool(registry.containers))
    try:
        env.cgroups.remove_parent()
    except OSError as err:
        log.warning("leaving the cgroup parent in place: %s", err)
