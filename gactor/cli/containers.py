"""Container commands: ping, capacity, create, list, info, metrics, properties, destroy,
stop, set-grace-time, net-in. Tables for people, JSON with ``--json``."""

from __future__ import annotations

import sys
from typing import Any

import click
import msgspec

from . import render
from ._app import (
    Options,
    as_dict,
    call,
    cli,
    echo_json,
    examples,
    handle_argument,
    json_option,
    pairs,
    pass_options,
    with_container,
)


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | int) -> int:
    """A byte count: ``1048576``, ``512K``, ``64M``, ``1.5G`` (binary multiples)."""
    if isinstance(value, int):
        return value
    try:
        return render.parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


@examples("gactor ping", "gactor --target unix:///run/gactor.sock ping")
@cli.command()
@json_option
@pass_options
def ping(opts: Options) -> None:
    """Check that the server answers: prints "ok"."""
    call(opts, lambda client: client.ping())
    if opts.json:
        echo_json({"ok": True})
    else:
        click.echo("ok")


@examples("gactor capacity", "gactor --json capacity")
@cli.command()
@json_option
@pass_options
def capacity(opts: Options) -> None:
    """Show the server's memory, disk and container capacity."""
    found = call(opts, lambda client: client.capacity())
    if opts.json:
        echo_json(found)
        return
    render.fields([
        ("memory", render.size(found.memory_in_bytes)),
        ("disk", render.size(found.disk_in_bytes)),
        ("schedulable disk", render.size(found.schedulable_disk_in_bytes)),
        ("max containers", str(found.max_containers)),
    ])


@examples("gactor create", "gactor create --handle web --memory 64M --property team=garden",
          "gactor create --rootfs /var/lib/gactor/images/busybox --env LANG=C.UTF-8",
          "gactor create --rootfs docker://registry.local:5000/busybox#latest")
@cli.command()
@click.option("--handle", default="", help="Handle to use [generated].")
@click.option("--rootfs", "--image", "rootfs", default="", metavar="URI",
              help="Image: a directory, a tar, oci://PATH[#tag] or docker://HOST/REPO[#tag] "
                   "[the server's default].")
@click.option("--property", "properties", multiple=True, metavar="K=V", callback=pairs,
              help="A property; repeatable.")
@click.option("--memory", default="0", callback=_byte_size, metavar="BYTES",
              help="Memory limit: 67108864, 64M, 1G [none].")
@click.option("--env", multiple=True, metavar="K=V", callback=pairs,
              help="Environment of every process; repeatable.")
@click.option("--grace-time", type=float, default=0.0, metavar="SECONDS",
              help="Destroy the container after this long without a client [never].")
@click.option("--privileged", is_flag=True, help="Do not map container root to an unprivileged user.")
@json_option
@pass_options
def create(opts: Options, handle: str, rootfs: str, properties: list[str], memory: int,
           env: list[str], grace_time: float, privileged: bool) -> None:
    """Create a container and print its handle. On a terminal, a docker:// image is
    pulled first with a progress bar per layer (the create then finds its layers)."""
    from gactor.types import ContainerSpec, ImageRef, Limits, MemoryLimits

    spec = ContainerSpec(
        handle=handle, image=ImageRef(uri=rootfs), env=env, grace_time=grace_time,
        privileged=privileged, properties=as_dict(properties),
        limits=Limits(memory=MemoryLimits(limit_in_bytes=memory)))
    with render.PullProgress(f"pull {rootfs}", sys.stdout, sys.stderr) as progress:

        async def make(client: Any) -> Any:
            if rootfs.startswith("docker://") and progress.shown:
                await client.pull(rootfs, progress=progress.update)
            return await client.create(spec)

        container = call(opts, make)
    if opts.json:
        echo_json({"handle": container.handle})
    else:
        click.echo(container.handle)


async def _listing(client: Any, properties: dict[str, str] | None) -> list[dict[str, Any]]:
    """Info and age of every container (matching ``properties``), in handle order.

    A container destroyed between the listing and the bulk calls is left out: it is gone.
    """
    handles = sorted(c.handle for c in await client.containers(properties=properties))
    if not handles:
        return []
    infos = await client.bulk_info(handles)
    ages = await client.bulk_metrics(handles)
    listing = []
    for handle in handles:
        entry = infos.get(handle)
        if entry is None or entry.info is None:
            continue
        metrics = ages.get(handle)
        age = metrics.metrics.age if metrics is not None and metrics.metrics is not None else None
        listing.append({"handle": handle, **msgspec.to_builtins(entry.info), "age": age})
    return listing


def _ports(mapped: list[dict[str, int]]) -> str:
    return ", ".join(f"{m['host_port']}->{m['container_port']}" for m in mapped)


def _properties_text(properties: dict[str, str], separator: str = ", ") -> str:
    return separator.join(f"{k}={v}" for k, v in sorted(properties.items()))


@examples("gactor list", "gactor list --property team=garden", "gactor list -q | xargs -n1 gactor destroy",
          "gactor --json list")
@cli.command(name="list")
@click.option("--property", "properties", multiple=True, metavar="K=V", callback=pairs,
              help="Only containers with this property; repeatable, ANDed.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the handles, one a line.")
@json_option
@pass_options
def list_containers(opts: Options, properties: list[str], quiet: bool) -> None:
    """List containers: handle, state, IP, processes, age and properties.

    With --json, a list of objects: each container's info (as `info --json`) with its
    handle and age (seconds).
    """
    wanted = as_dict(properties) or None
    if quiet:
        containers = call(opts, lambda client: client.containers(properties=wanted))
        handles = sorted(c.handle for c in containers)
        if opts.json:
            echo_json(handles)
        else:
            for handle in handles:
                click.echo(handle)
        return
    listing = call(opts, lambda client: _listing(client, wanted))
    if opts.json:
        echo_json(listing)
        return
    render.table(["handle", "state", "ip", "processes", "age", "properties"], [
        [c["handle"], c["state"], c["container_ip"] or "-", str(len(c["process_ids"])),
         render.duration(c["age"]) if c["age"] is not None else "-",
         _properties_text(_own(c["properties"])) or "-"]
        for c in listing])


def _own(properties: dict[str, str]) -> dict[str, str]:
    """The properties a user set: Garden's own (``garden.*``, the addresses) are in ``info``."""
    return {k: v for k, v in properties.items() if not k.startswith("garden.")}


async def _info(container: Any) -> dict[str, Any]:
    """Info, then the memory limit and metrics; those two are None when the container
    cannot say (a broken one, whose cgroup is gone): info alone still describes it."""
    from gactor.errors import GardenError

    info = msgspec.to_builtins(await container.info())
    try:
        limit = (await container.current_memory_limits()).limit_in_bytes
        metrics = await container.metrics()
    except GardenError:
        return {"handle": container.handle, **info, "memory_limit_in_bytes": None,
                "memory_usage_in_bytes": None, "age": None}
    return {"handle": container.handle, **info, "memory_limit_in_bytes": limit,
            "memory_usage_in_bytes": metrics.memory_stat.total_usage_toward_limit, "age": metrics.age}


@examples("gactor info web", "gactor --json info web | jq -r .container_ip")
@cli.command()
@handle_argument()
@json_option
@pass_options
def info(opts: Options, handle: str) -> None:
    """Show a container's state, addresses, ports, processes, memory and properties.

    With --json: Garden's ContainerInfo fields, plus handle, age (seconds),
    memory_limit_in_bytes (0 = none) and memory_usage_in_bytes (null when the
    container cannot report them).
    """
    found = with_container(opts, handle, _info)
    if opts.json:
        echo_json(found)
        return
    render.fields([
        ("handle", found["handle"]),
        ("state", found["state"]),
        ("events", ", ".join(found["events"]) or "-"),
        ("age", render.duration(found["age"]) if found["age"] is not None else "-"),
        ("memory", render.usage_of(found["memory_usage_in_bytes"], found["memory_limit_in_bytes"])
         if found["memory_usage_in_bytes"] is not None else "-"),
        ("container ip", found["container_ip"] or "-"),
        ("host ip", found["host_ip"] or "-"),
        ("external ip", found["external_ip"] or "-"),
        ("ports", _ports(found["mapped_ports"]) or "-"),
        ("processes", " ".join(found["process_ids"]) or "-"),
        ("path", found["container_path"] or "-"),
        ("properties", _properties_text(found["properties"], "\n") or "-"),
    ])


async def _metrics(container: Any) -> dict[str, Any]:
    metrics = msgspec.to_builtins(await container.metrics())
    limit = await container.current_memory_limits()
    return {"handle": container.handle, **metrics, "memory_limit_in_bytes": limit.limit_in_bytes}


@examples("gactor metrics web", "gactor --json metrics web | jq .memory_stat.rss")
@cli.command()
@handle_argument()
@json_option
@pass_options
def metrics(opts: Options, handle: str) -> None:
    """Show a container's memory (next to its limit), CPU, pids, disk and network use.

    With --json: Garden's Metrics fields (CPU in ns, sizes in bytes, age in seconds)
    plus handle and memory_limit_in_bytes (0 = none).
    """
    found = with_container(opts, handle, _metrics)
    if opts.json:
        echo_json(found)
        return
    memory, cpu, pids, disk = found["memory_stat"], found["cpu_stat"], found["pid_stat"], found["disk_stat"]
    network = found["network_stat"]
    size = render.size
    render.fields([
        ("memory", render.usage_of(memory["total_usage_toward_limit"], found["memory_limit_in_bytes"])),
        ("  rss / cache / swap", f"{size(memory['rss'])} / {size(memory['cache'])} / {size(memory['swap'])}"),
        ("cpu", f"{render.cpu_time(cpu['usage'])} (user {render.cpu_time(cpu['user'])}, "
                f"system {render.cpu_time(cpu['system'])})"),
        ("pids", f"{pids['current']} / {pids['max']}" if pids["max"] else f"{pids['current']} (no limit)"),
        ("disk", f"{size(disk['total_bytes_used'])}, {disk['total_inodes_used']} inodes "
                 f"(exclusive {size(disk['exclusive_bytes_used'])}, {disk['exclusive_inodes_used']} inodes)"),
        ("network", f"rx {size(network['rx_bytes'])}, tx {size(network['tx_bytes'])}"
         if network is not None else "-"),
        ("age", render.duration(found["age"])),
    ], title=None)


@examples("gactor properties web", "gactor --json properties web")
@cli.command()
@handle_argument()
@json_option
@pass_options
def properties(opts: Options, handle: str) -> None:
    """Print a container's properties as "key value" lines."""
    found = with_container(opts, handle, lambda c: c.properties())
    if opts.json:
        echo_json(found)
        return
    for key, value in found.items():
        click.echo(f"{key} {value}")


def _done(opts: Options, handle: str, **facts: Any) -> None:
    """What a command that changes something prints: nothing, or JSON with --json."""
    if opts.json:
        echo_json({"handle": handle, **facts})


@examples("gactor destroy web", "gactor list -q --property team=garden | xargs -n1 gactor destroy")
@cli.command()
@handle_argument()
@json_option
@pass_options
def destroy(opts: Options, handle: str) -> None:
    """Destroy a container and everything running in it."""
    call(opts, lambda client: client.destroy(handle))
    _done(opts, handle, destroyed=True)


@examples("gactor set-grace-time web 300", "gactor set-grace-time web 0")
@cli.command(name="set-grace-time")
@handle_argument()
@click.argument("seconds", type=float)
@json_option
@pass_options
def set_grace_time(opts: Options, handle: str, seconds: float) -> None:
    """Destroy the container after SECONDS without a client (0 = never)."""
    with_container(opts, handle, lambda c: c.set_grace_time(seconds))
    _done(opts, handle, grace_time=seconds)


@examples("gactor stop web", "gactor stop --kill web")
@cli.command()
@handle_argument()
@click.option("--kill", is_flag=True, help="SIGKILL at once instead of SIGTERM first.")
@json_option
@pass_options
def stop(opts: Options, handle: str, kill: bool) -> None:
    """Stop every process in a container (SIGTERM, then SIGKILL after 10 s)."""
    with_container(opts, handle, lambda c: c.stop(kill=kill))
    _done(opts, handle, stopped=True)


@examples("gactor net-in web --container-port 8080",
          "gactor net-in web --host-port 61080 --container-port 80")
@cli.command(name="net-in")
@handle_argument()
@click.option("--host-port", type=int, default=0, metavar="N", help="[a free pool port].")
@click.option("--container-port", type=int, required=True, metavar="N")
@json_option
@pass_options
def net_in(opts: Options, handle: str, host_port: int, container_port: int) -> None:
    """Forward a host port to the container and print the host port."""
    host, inside = with_container(
        opts, handle, lambda c: c.net_in(host_port=host_port, container_port=container_port))
    if opts.json:
        echo_json({"handle": handle, "host_port": host, "container_port": inside})
    else:
        click.echo(str(host))
