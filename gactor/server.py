"""The composition root: configuration, the spawner fork, and the actor tree.

``run(config)`` forks the spawner first (the only safe moment: no threads yet),
then starts trio with the registry actor and the websocket front end.
SIGTERM and SIGINT shut the server down gracefully and leave containers running.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field

from .kernel.spawner import SpawnerHandle, fork_spawner

log = logging.getLogger("gactor.server")


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1:7777"
    garden_listen: str | None = None
    depot: str = "/var/lib/gactor"
    default_rootfs: str = ""
    network_pool: str = "10.254.0.0/22"
    port_pool_start: int = 61001
    port_pool_size: int = 4534
    default_grace_time: float = 0.0
    max_containers: int = 0
    deny_networks: list[str] = field(default_factory=list)
    external_ip: str | None = None
    log_level: str = "info"
    cpu_quota_per_share: int = 0
    destroy_containers_on_startup: bool = False
    token: str | None = None
    cgroup_parent: str = ""  # default: derived from the depot, see cgroup_parent_for


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
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {address!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT. Blocks; raises SystemExit on bad configuration."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        raise SystemExit("gactor server must run as root")
    host, port = split_address(config.listen)
    if not config.token and not _is_loopback(host):
        raise SystemExit(f"refusing to serve on {host} without --token: anyone who can reach it could run code as root")
    # Traversable but not listable: unprivileged container roots must reach their rootfs mount.
    os.makedirs(config.depot, mode=0o711, exist_ok=True)
    os.chmod(config.depot, 0o711)
    _check_traversable(config.depot)
    spawner = fork_spawner()
    import trio  # noqa: PLC0415 - only after the spawner fork: trio may start threads

    try:
        trio.run(_serve, config, spawner, host, port)
    finally:
        spawner.sock.close()
        os.kill(spawner.pid, signal.SIGKILL)
        os.waitpid(spawner.pid, 0)


async def _serve(config: ServerConfig, spawner: SpawnerHandle, host: str, port: int) -> None:
    import trio

    from .actors.container import Environment
    from .actors.registry import Registry
    from .actors.spawner_client import SpawnerClient
    from .kernel import cgroups, depot, init_binary, rootfs
    from .transport import ws_server
    from .transport.methods import Api

    cpus = os.cpu_count() or 1
    with open("/proc/meminfo") as f:
        mem_mib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) // 1024
    env = Environment(
        depot=config.depot,
        cgroups=cgroups.discover(parent=cgroup_parent_for(config)),
        spawner=SpawnerClient(spawner.sock),
        image_store=os.path.join(config.depot, depot.IMAGES),
        cpu_quota_per_share=config.cpu_quota_per_share,
        entitlement_per_share=cpus * 100 / mem_mib,
    )
    await trio.to_thread.run_sync(rootfs.remove_partial_images, env.image_store)
    try:
        env.init_binary = await trio.to_thread.run_sync(init_binary.ensure, os.path.join(config.depot, "bin"))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("no C compiler for garden-init (%s): container pid 1 will be a Python process", err)
    async with trio.open_nursery() as nursery:
        registry = Registry(env, config.default_rootfs, config.default_grace_time, config.max_containers)
        registry_ref = await nursery.start(functools.partial(
            registry.run, destroy_existing=config.destroy_containers_on_startup))
        api = Api(registry_ref, config.network_pool)
        bound = await nursery.start(ws_server.serve, api, host, port, config.token)
        log.info("gactor serving the websocket API on ws://%s:%d/", host, bound)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down, containers keep running", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    try:
        env.cgroups.remove_parent()
    except OSError as err:
        log.warning("leaving the cgroup parent in place: %s", err)
