"""The API's calls, independent of the wire: argument validation and dispatch to actors.

Both front ends (msgpack websocket, and later Garden HTTP) call ``Api.call``.
Streaming calls (run, attach) are ``Api.start_process``: they return the process
and the caller pumps it. Every error leaving here is a ``GardenError``.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..actors import metrics
from ..actors.container import ContainerActor
from ..actors.process import ProcessActor, Subscription
from ..actors.registry import Registry, check_name
from ..errors import GardenError, error_to_wire
from ..kernel.errors import KernelError
from ..types import (
    BandwidthLimits,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    MemoryLimits,
    ProcessSpec,
    TTYSpec,
    from_wire,
    to_wire,
)
from . import schema

T = TypeVar("T")
Handler = Callable[["Api", dict[str, Any]], Awaitable[Any]]
_SIGNALS = {0: 15, 1: 9}


def arg(args: dict[str, Any], key: str, kind: type[T], default: Any = ...) -> T:
    """``args[key]`` checked to be a ``kind``; raises GardenError naming the field."""
    if key not in args:
        if default is ...:
            raise GardenError(f"missing argument '{key}'")
        return default  # type: ignore[no-any-return]
    value = args[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GardenError(f"argument '{key}' must be {kind.__name__}, not {type(value).__name__}")
    return value


class Api:
    def __init__(self, registry: Registry, network_pool: str) -> None:
        self.registry = registry
        self.pool_containers = ipaddress.ip_network(network_pool).num_addresses // 4

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        schema.check(method, args)
        if method in API_METHODS:
            return await API_METHODS[method](self, args)
        if method in CONTAINER_METHODS:
            async with self.registry.using(arg(args, "handle", str)) as container:
                return await CONTAINER_METHODS[method](container, args)
        raise GardenError(f"unknown method '{method}'")

    async def start_process(self, method: str, args: dict[str, Any]) -> tuple[ProcessActor, Subscription]:
        """Run a process (``run``) or find one (``attach``), subscribed to the output the
        caller asked for. A run's subscription exists before the process does, so not
        even the first byte of a process that exits at once is missed."""
        schema.check(method, args)
        handle = arg(args, "handle", str)
        sub = Subscription(arg(args, "stdout", bool, False), arg(args, "stderr", bool, False))
        async with self.registry.using(handle) as container:
            if method == "run":
                spec = from_wire(ProcessSpec, arg(args, "spec", dict), "process spec")
                process_id = spec.id or str(uuid.uuid4())
                check_name("process id", process_id)
                return await container.run_process(spec, process_id, sub), sub
            process = container.process(arg(args, "process_id", str))
            process.add_subscriber(sub)
            return process, sub


TAR_OUTPUT_LIMIT = 64 << 10  # bytes of tar's stderr kept for an error message


async def start_tar(api: Api, args: dict[str, Any], extract: bool) -> tuple[ProcessActor, Subscription]:
    """Run the server's static tar in the container as ``user``: extracting stdin into
    ``path`` (created, owned by the user, as Garden does) or archiving ``path`` to stdout.
    A relative path is relative to the user's home; ``path/`` streams out its contents."""
    schema.check("stream_in" if extract else "stream_out", args)
    path = arg(args, "path", str)
    if not path:
        raise GardenError("invalid stream: 'path' must not be empty")
    if "\0" in path:
        raise GardenError("invalid stream: 'path' must not contain NUL")
    if extract:
        workdir, tar_args = path, ["-xof", "-"]
    elif path.endswith("/"):
        workdir, tar_args = path, ["-cf", "-", "."]
    else:
        workdir, tar_args = os.path.dirname(path) or ".", ["-cf", "-", os.path.basename(path)]
    sub = Subscription(stdout=not extract, stderr=True)
    spec = ProcessSpec(path="tar", args=tar_args, user=arg(args, "user", str, ""), dir=workdir)
    async with api.registry.using(arg(args, "handle", str)) as container:
        process = await container.run_process(
            spec, f"gactor-tar-{uuid.uuid4()}", sub, host_exe=container.env.tar_binary,
            dir_must_exist=not extract)
    return process, sub


async def _create(api: Api, args: dict[str, Any]) -> Any:
    spec = from_wire(ContainerSpec, arg(args, "spec", dict), "container spec")
    container = await api.registry.create(spec)
    return {"handle": container.handle}


async def _destroy(api: Api, args: dict[str, Any]) -> None:
    await api.registry.destroy(arg(args, "handle", str))


async def _ping(api: Api, args: dict[str, Any]) -> None:
    return None


async def _capacity(api: Api, args: dict[str, Any]) -> Any:
    return to_wire(api.registry.capacity(api.pool_containers))


async def _lookup(api: Api, args: dict[str, Any]) -> Any:
    return {"handle": api.registry.lookup(arg(args, "handle", str)).handle}


async def _containers(api: Api, args: dict[str, Any]) -> Any:
    props = arg(args, "properties", dict, None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
        raise GardenError("argument 'properties' must map strings to strings")
    return api.registry.list(props)


async def _set_grace_time(api: Api, args: dict[str, Any]) -> None:
    seconds = arg(args, "seconds", float)
    if not 0 <= seconds < 1e9:
        raise GardenError(f"argument 'seconds' out of range: {seconds}")
    await api.registry.set_grace_time(arg(args, "handle", str), seconds)


async def _bulk_info(api: Api, args: dict[str, Any]) -> Any:
    """Per-handle results in one call; an error for one handle is reported in its entry."""
    out: dict[str, Any] = {}
    for handle in _handles(args):
        try:
            out[handle] = {"info": to_wire(api.registry.lookup(handle).info()), "err": None}
        except GardenError as err:
            out[handle] = {"info": None, "err": error_to_wire(err)}
    return out


async def _bulk_metrics(api: Api, args: dict[str, Any]) -> Any:
    handles = _handles(args)
    found: dict[str, ContainerActor] = {}
    out: dict[str, Any] = {}
    for handle in handles:
        try:
            found[handle] = api.registry.lookup(handle)
        except GardenError as err:
            out[handle] = {"metrics": None, "err": error_to_wire(err)}
    for handle, result in zip(found, await metrics.collect_many(list(found.values())), strict=True):
        if isinstance(result, KernelError):
            out[handle] = {"metrics": None, "err": error_to_wire(GardenError(f"metrics of {handle}: {result}"))}
        else:
            out[handle] = {"metrics": to_wire(result), "err": None}
    return out


def _handles(args: dict[str, Any]) -> list[str]:
    handles = arg(args, "handles", list)
    if not all(isinstance(h, str) for h in handles):
        raise GardenError("argument 'handles' must be a list of strings")
    return list(dict.fromkeys(handles))


async def _stop(c: ContainerActor, args: dict[str, Any]) -> None:
    await c.stop(arg(args, "kill", bool, False))


async def _info(c: ContainerActor, args: dict[str, Any]) -> Any:
    await c.check_oom()  # so an OOM the kernel did not announce still shows in events
    return to_wire(c.info())


async def _metrics(c: ContainerActor, args: dict[str, Any]) -> Any:
    await c.check_oom()
    return to_wire(await metrics.collect(c))


async def _properties(c: ContainerActor, args: dict[str, Any]) -> Any:
    return dict(c.properties)


async def _property(c: ContainerActor, args: dict[str, Any]) -> str:
    name = arg(args, "name", str)
    if name not in c.properties:
        raise GardenError(f"property does not exist: {name}")
    return str(c.properties[name])


async def _set_property(c: ContainerActor, args: dict[str, Any]) -> None:
    c.properties[arg(args, "name", str)] = arg(args, "value", str)
    await c.save()


async def _remove_property(c: ContainerActor, args: dict[str, Any]) -> None:
    c.properties.pop(arg(args, "name", str), None)
    await c.save()


async def _signal(c: ContainerActor, args: dict[str, Any]) -> None:
    signal = arg(args, "signal", int)
    if signal not in _SIGNALS:
        raise GardenError(f"invalid signal {signal}: must be 0 (terminate) or 1 (kill)")
    await c.process(arg(args, "process_id", str)).signal(_SIGNALS[signal])


async def _set_tty(c: ContainerActor, args: dict[str, Any]) -> None:
    tty = from_wire(TTYSpec, arg(args, "tty", dict), "tty spec")
    proc = c.process(arg(args, "process_id", str))
    if tty.window_size is not None:
        await proc.resize(tty.window_size.columns, tty.window_size.rows)


async def _limit_memory(c: ContainerActor, args: dict[str, Any]) -> None:
    limits = from_wire(MemoryLimits, arg(args, "limits", dict), "memory limits")
    try:
        c.cgroup.set_memory_limit(limits.limit_in_bytes)
    except KernelError as err:
        raise GardenError(f"cannot set a memory limit of {limits.limit_in_bytes} bytes: "
                          f"{os.strerror(err.errno) if err.errno else err} (is usage above it?)") from err
    c.spec.limits.memory = limits
    await c.save()


async def _current_memory_limits(c: ContainerActor, args: dict[str, Any]) -> Any:
    return to_wire(c.current_memory_limits())


async def _limit_cpu(c: ContainerActor, args: dict[str, Any]) -> None:
    limits = from_wire(CPULimits, arg(args, "limits", dict), "cpu limits")
    try:
        c.apply_cpu_limits(c.cgroup, limits)
    except KernelError as err:
        raise GardenError(f"cannot set cpu limits {limits}: {err}") from err
    c.spec.limits.cpu = limits
    await c.save()


async def _current_cpu_limits(c: ContainerActor, args: dict[str, Any]) -> Any:
    return to_wire(c.current_cpu_limits())


async def _current_bandwidth_limits(c: ContainerActor, args: dict[str, Any]) -> Any:
    return to_wire(BandwidthLimits())  # bandwidth limits arrive with networking


async def _current_disk_limits(c: ContainerActor, args: dict[str, Any]) -> Any:
    return to_wire(DiskLimits())  # no disk limits yet: Garden's "{}"


def _not_yet(what: str) -> ContainerHandler:
    async def handler(c: ContainerActor, args: dict[str, Any]) -> Any:
        raise GardenError(f"{what} is not supported by this server yet")

    return handler


ContainerHandler = Callable[[ContainerActor, dict[str, Any]], Awaitable[Any]]

# Calls that name no container, or do not pause its grace timer (Garden's bulk calls,
# destroy, set_grace_time).
API_METHODS: dict[str, Handler] = {
    "ping": _ping,
    "capacity": _capacity,
    "create": _create,
    "destroy": _destroy,
    "containers": _containers,
    "lookup": _lookup,
    "bulk_info": _bulk_info,
    "bulk_metrics": _bulk_metrics,
    "set_grace_time": _set_grace_time,
}

# Calls on one container; its grace timer is paused while they run.
CONTAINER_METHODS: dict[str, ContainerHandler] = {
    "stop": _stop,
    "info": _info,
    "metrics": _metrics,
    "properties": _properties,
    "property": _property,
    "set_property": _set_property,
    "remove_property": _remove_property,
    "signal": _signal,
    "set_tty": _set_tty,
    "limit_memory": _limit_memory,
    "current_memory_limits": _current_memory_limits,
    "limit_cpu": _limit_cpu,
    "current_cpu_limits": _current_cpu_limits,
    "limit_bandwidth": _not_yet("limit_bandwidth (it needs container networking)"),
    "current_bandwidth_limits": _current_bandwidth_limits,
    "current_disk_limits": _current_disk_limits,
    "net_in": _not_yet("net_in"),
    "net_out": _not_yet("net_out"),
    "bulk_net_out": _not_yet("bulk_net_out"),
}
