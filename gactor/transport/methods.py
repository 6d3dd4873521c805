"""The API's calls, independent of the wire: argument validation and dispatch to actors.

Both front ends (msgpack websocket, and later Garden HTTP) call ``Api.call``.
Streaming calls (run, attach) are ``Api.start_process``: they return the process
and the caller pumps it. Every error leaving here is a ``GardenError``.
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..actors import metrics
from ..actors.process import ProcessActor
from ..actors.registry import Registry, check_name
from ..errors import ContainerNotFoundError, GardenError
from ..types import (
    BandwidthLimits,
    ContainerInfoEntry,
    ContainerMetricsEntry,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    MemoryLimits,
    ProcessSpec,
    TTYSpec,
    from_wire,
    to_wire,
)

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
        handler = METHODS.get(method)
        if handler is None:
            raise GardenError(f"unknown method '{method}'")
        return await handler(self, args)

    async def start_process(self, method: str, args: dict[str, Any]) -> ProcessActor:
        handle = arg(args, "handle", str)
        async with self.registry.using(handle) as container:
            if method == "run":
                spec = from_wire(ProcessSpec, arg(args, "spec", dict), "process spec")
                process_id = spec.id or str(uuid.uuid4())
                check_name("process id", process_id)
                return await container.run_process(spec, process_id)
            return container.process(arg(args, "process_id", str))


def _container_call(fn: Callable[[Any, dict[str, Any]], Any]) -> Handler:
    """A handler for one container, with its grace timer paused while it runs."""

    async def handler(api: Api, args: dict[str, Any]) -> Any:
        async with api.registry.using(arg(args, "handle", str)) as container:
            result = fn(container, args)
            if hasattr(result, "__await__"):
                result = await result
            return result

    return handler


async def _create(api: Api, args: dict[str, Any]) -> Any:
    spec = from_wire(ContainerSpec, arg(args, "spec", dict), "container spec")
    container = await api.registry.create(spec)
    return {"handle": container.handle}


async def _bulk(api: Api, args: dict[str, Any], one: Callable[[Any], Awaitable[Any]], key: str) -> Any:
    handles = arg(args, "handles", list)
    out = {}
    for handle in handles:
        if not isinstance(handle, str):
            raise GardenError("argument 'handles' must be a list of strings")
        try:
            out[handle] = {key: to_wire(await one(api.registry.lookup(handle))), "err": None}
        except GardenError as err:
            from ..errors import error_to_wire

            out[handle] = {key: None, "err": error_to_wire(err)}
    return out


def _lookup(api: Api, args: dict[str, Any]) -> Any:
    return {"handle": api.registry.lookup(arg(args, "handle", str)).handle}


async def _properties_filter(api: Api, args: dict[str, Any]) -> Any:
    props = arg(args, "properties", dict, None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
        raise GardenError("argument 'properties' must map strings to strings")
    return api.registry.list(props)


async def _set_grace_time(api: Api, args: dict[str, Any]) -> None:
    seconds = arg(args, "seconds", float)
    if not 0 <= seconds < 1e9:
        raise GardenError(f"argument 'seconds' out of range: {seconds}")
    api.registry.set_grace_time(arg(args, "handle", str), seconds)


async def _property(c: Any, args: dict[str, Any]) -> str:
    name = arg(args, "name", str)
    if name not in c.properties:
        raise GardenError(f"property does not exist: {name}")
    return str(c.properties[name])


async def _set_property(c: Any, args: dict[str, Any]) -> None:
    c.properties[arg(args, "name", str)] = arg(args, "value", str)
    c.persist()


async def _remove_property(c: Any, args: dict[str, Any]) -> None:
    c.properties.pop(arg(args, "name", str), None)
    c.persist()


async def _signal(c: Any, args: dict[str, Any]) -> None:
    signal = arg(args, "signal", int)
    if signal not in _SIGNALS:
        raise GardenError(f"invalid signal {signal}: must be 0 (terminate) or 1 (kill)")
    await c.process(arg(args, "process_id", str)).signal(_SIGNALS[signal])


async def _set_tty(c: Any, args: dict[str, Any]) -> None:
    tty = from_wire(TTYSpec, arg(args, "tty", dict), "tty spec")
    proc = c.process(arg(args, "process_id", str))
    if tty.window_size is not None:
        await proc.resize(tty.window_size.columns, tty.window_size.rows)


async def _limit_memory(c: Any, args: dict[str, Any]) -> None:
    limits = from_wire(MemoryLimits, arg(args, "limits", dict), "memory limits")
    c.spec.limits.memory = limits
    c.cgroup.set_memory_limit(limits.limit_in_bytes)
    c.persist()


async def _limit_cpu(c: Any, args: dict[str, Any]) -> None:
    limits = from_wire(CPULimits, arg(args, "limits", dict), "cpu limits")
    c.spec.limits.cpu = limits
    c.apply_cpu_limits(c.cgroup, limits)
    c.persist()


async def _limit_bandwidth(c: Any, args: dict[str, Any]) -> None:
    raise GardenError("bandwidth limits need container networking, which this server does not have yet")


def _unsupported(what: str) -> Handler:
    async def handler(api: Api, args: dict[str, Any]) -> Any:
        api.registry.lookup(arg(args, "handle", str))
        raise GardenError(f"{what} is not supported by this server yet")

    return handler


async def _ping(api: Api, args: dict[str, Any]) -> None:
    return None


METHODS: dict[str, Handler] = {
    "ping": _ping,
    "capacity": lambda api, args: _now(to_wire(api.registry.capacity(api.pool_containers))),
    "create": _create,
    "destroy": lambda api, args: api.registry.destroy(arg(args, "handle", str)),
    "containers": _properties_filter,
    "lookup": lambda api, args: _now(_lookup(api, args)),
    "bulk_info": lambda api, args: _bulk(api, args, lambda c: _now(c.info()), "info"),
    "bulk_metrics": lambda api, args: _bulk(api, args, metrics.collect, "metrics"),
    "set_grace_time": _set_grace_time,
    "stop": _container_call(lambda c, a: c.stop(arg(a, "kill", bool, False))),
    "info": _container_call(lambda c, a: to_wire(c.info())),
    "metrics": _container_call(lambda c, a: _then(metrics.collect(c), to_wire)),
    "properties": _container_call(lambda c, a: dict(c.properties)),
    "property": _container_call(_property),
    "set_property": _container_call(_set_property),
    "remove_property": _container_call(_remove_property),
    "signal": _container_call(_signal),
    "set_tty": _container_call(_set_tty),
    "limit_memory": _container_call(_limit_memory),
    "current_memory_limits": _container_call(lambda c, a: to_wire(c.current_memory_limits())),
    "limit_cpu": _container_call(_limit_cpu),
    "current_cpu_limits": _container_call(lambda c, a: to_wire(c.current_cpu_limits())),
    "limit_bandwidth": _container_call(_limit_bandwidth),
    "current_bandwidth_limits": _container_call(lambda c, a: to_wire(BandwidthLimits())),
    "current_disk_limits": _container_call(lambda c, a: to_wire(DiskLimits())),
    "net_in": _unsupported("net_in"),
    "net_out": _unsupported("net_out"),
    "bulk_net_out": _unsupported("bulk_net_out"),
    "stream_in": _unsupported("stream_in"),
    "stream_out": _unsupported("stream_out"),
}


async def _now(value: T) -> T:
    return value


async def _then(awaitable: Awaitable[Any], fn: Callable[[Any], Any]) -> Any:
    return fn(await awaitable)


__all__ = ["Api", "ContainerInfoEntry", "ContainerMetricsEntry", "ContainerNotFoundError", "time"]
