"""The API's calls, independent of the wire: argument validation and dispatch to actors.

Both front ends (msgpack websocket, and later Garden HTTP) call ``Api.call``.
Streaming calls are the context managers ``Api.process`` (run, attach) and ``Api.tar``
(stream_in, stream_out): they yield the process and its subscription with the grace
timer paused, and the front end pumps them. Every error leaving here is a ``GardenError``.

Each entry point (``call``, ``process``, ``stream_in``, ``stream_out``) takes the name of
the front end calling it (``front_end``, default ``WEBSOCKET``) and runs under the
``CallObserver`` the Api was built with (metrics and request logs, ``gactor/ops``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Protocol, TypeVar

import trio

from ..actors import metrics
from ..actors.container import ContainerRef
from ..actors.process import ProcessActor, Subscription
from ..actors.registry import RegistryRef, check_name
from ..errors import ContainerNotFoundError, GardenError, error_to_wire
from ..kernel import images
from ..kernel.errors import KernelError
from ..kernel.spawn import TAR_CREATE, TAR_EXTRACT
from ..types import (
    BandwidthLimits,
    ContainerSpec,
    CPULimits,
    ImageInfo,
    MemoryLimits,
    NetOutRule,
    ProcessSpec,
    TTYSpec,
    to_wire,
)
from . import schema

T = TypeVar("T")
Handler = Callable[["Api", dict[str, Any]], Awaitable[Any]]
_SIGNALS = {0: 15, 1: 9}
WEBSOCKET = "websocket"  # the ``front_end`` of the msgpack websocket API's calls


class CallObserver(Protocol):
    """Watches every API call (metrics, request logs): ``observe`` returns a context
    manager entered around the call (for a stream: until its reply), which sees any
    exception the call raises. It must not raise or block."""

    def observe(self, method: str, front_end: str, args: dict[str, Any]) -> AbstractContextManager[None]: ...


class _Unobserved:
    def observe(self, method: str, front_end: str, args: dict[str, Any]) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


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
    """Every Garden call as a coroutine over the registry's handle: validation, then
    commands to actors. Front ends decode, call and encode; nothing here knows a wire."""

    def __init__(self, registry: RegistryRef, network_pool: str, observer: CallObserver | None = None) -> None:
        self.registry = registry
        self.pool_containers = ipaddress.ip_network(network_pool).num_addresses // 4
        self.observer: CallObserver = observer or _Unobserved()

    async def call(self, method: str, args: dict[str, Any], front_end: str = WEBSOCKET) -> Any:
        """The result of ``method``; ``front_end`` names the caller's API for the observer."""
        with self.observer.observe(method, front_end, args):
            return await self._dispatch(method, args)

    async def _dispatch(self, method: str, args: dict[str, Any]) -> Any:
        args = schema.check(method, args)  # map arguments decoded: handlers take them as they are
        if method in API_METHODS:
            return await API_METHODS[method](self, args)
        if method in CONTAINER_METHODS:
            async with self.registry.using(arg(args, "handle", str)) as container:
                return await CONTAINER_METHODS[method](container, args)
        raise GardenError(f"unknown method '{method}'")

    def _observed(self, method: str, front_end: str, args: dict[str, Any],
                  opening: AbstractAsyncContextManager[T]) -> AbstractAsyncContextManager[T]:
        """``opening`` entered under the observer: a stream is timed until it opens."""
        return _Observed(self.observer.observe(method, front_end, args), opening)

    def process(self, method: str, args: dict[str, Any], front_end: str = WEBSOCKET
                ) -> AbstractAsyncContextManager[tuple[ProcessActor, Subscription]]:
        """``open_process`` (see there), observed until the process is started or found."""
        return self._observed(method, front_end, args, self.open_process(method, args))

    @contextlib.asynccontextmanager
    async def open_process(self, method: str, args: dict[str, Any]) -> AsyncIterator[tuple[ProcessActor, Subscription]]:
        """Run a process (``run``) or find one (``attach``), subscribed to the output the
        caller asked for, with the container's grace timer paused until the context ends
        (Garden: for the whole life of a Run or Attach connection). A run's subscription
        exists before the process does, so not even the first byte of a process that
        exits at once is missed. Leaving the context early (a detach, a cancelled
        caller) unsubscribes; the process keeps running."""
        args = schema.check(method, args)
        handle = arg(args, "handle", str)
        sub = Subscription(arg(args, "stdout", bool, False), arg(args, "stderr", bool, False))
        async with self.registry.using(handle) as container:
            if method == "run":
                spec = arg(args, "spec", ProcessSpec)
                check_process_spec(spec)
                process_id = spec.id or new_process_id()
                check_name("process id", process_id)
                process = await container.run(spec, process_id, sub)
            else:
                process = await container.process(arg(args, "process_id", str))
                await process.subscribe(sub)
            try:
                yield process, sub
            finally:
                with trio.CancelScope(shield=True):
                    await process.unsubscribe(sub)

    @contextlib.asynccontextmanager
    async def tar(self, args: dict[str, Any], extract: bool) -> AsyncIterator[tuple[ProcessActor, Subscription]]:
        """Run tar in the container as ``user``: extracting stdin into ``path`` (created,
        owned by the user, as Garden does) or archiving ``path`` to stdout, with the grace
        timer paused until the context ends. The shim's own tar does it
        (``kernel/tar_in.py``, ``tar_out.py``: xattrs kept both ways); a shim older than
        them runs the server's static busybox tar. A relative path is relative to the
        user's home; ``path/`` streams out its contents. Leaving the context before tar
        ended kills tar."""
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
        async with self.registry.using(arg(args, "handle", str)) as container:
            process = await container.run(spec, f"gactor-tar-{uuid.uuid4()}", sub,
                                          host_exe=container.env.tar_binary, dir_must_exist=not extract,
                                          builtin=TAR_EXTRACT if extract else TAR_CREATE)
            try:
                yield process, sub
            finally:
                with trio.CancelScope(shield=True):
                    if process.running:
                        await process.signal(9)
                    await process.unsubscribe(sub)


    async def stream_in(self, args: dict[str, Any], chunks: AsyncIterable[bytes],
                        front_end: str = WEBSOCKET) -> None:
        """StreamIn: extract the uncompressed tar ``chunks`` carry into ``path`` as ``user``;
        returns once it is all written (observed until then). Raises GardenError ("error
        streaming in: ...", with tar's exit status and output; ContainerNotFoundError as
        it is). Cancelled (the client went away): tar is killed; what it extracted so far
        stays."""
        with self.observer.observe("stream_in", front_end, args):
            await self._stream_in(args, chunks)

    async def _stream_in(self, args: dict[str, Any], chunks: AsyncIterable[bytes]) -> None:
        try:
            async with self.tar(args, extract=True) as (process, sub):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(feed_stdin, process, chunks)
                    output = await _collect(sub)
                    code = await process.wait()
                    nursery.cancel_scope.cancel()
            # busybox tar (which a shim older than kernel/tar_in.py runs) only warns about a
            # device node it may not make (an unprivileged container cannot), and exits 0;
            # GNU tar, which Garden runs, and tar_in fail.
            if code != 0 or _TAR_NODE_REFUSED in output:
                raise GardenError(f"exit status {code}. Output: {output.decode(errors='replace').strip()}")
        except* GardenError as group:
            raise stream_error(first_error(group), "in") from None

    async def pull(self, args: dict[str, Any], progress: images.Progress, front_end: str = WEBSOCKET) -> Any:
        """``pull`` (observed as one), telling ``progress(digest, done, total)`` how each
        layer goes, from the pulling thread (``RegistryRef.pull``). Cancelled: the pull
        goes on, still reporting."""
        with self.observer.observe("pull", front_end, args):
            return await _pull(self, schema.check("pull", args), progress)

    def stream_out(self, args: dict[str, Any], front_end: str = WEBSOCKET
                   ) -> AbstractAsyncContextManager[AsyncIterator[list[bytes]]]:
        """``open_stream_out`` (see there), observed until the archive is known readable."""
        return self._observed("stream_out", front_end, args, self.open_stream_out(args))

    @contextlib.asynccontextmanager
    async def open_stream_out(self, args: dict[str, Any]) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """StreamOut: a tar of ``path`` read as ``user``. The context opens once the
        archive is known to be readable (else GardenError, "error streaming out: ..."):
        tar writes an empty archive even for a missing path, so it waits for a member or
        tar's exit. It yields chunks, each handed over in a one-item list (a "parcel" the
        consumer empties, so no reference outlives the chunk's encoding); iterating raises
        GardenError if tar fails after some output. Leaving early kills tar."""
        try:
            async with self.tar(args, extract=False) as (process, sub):
                errors = bytearray()
                async with sub.receive:
                    first = await _first_archive_bytes(sub, errors)
                    if (first is None or len(first) <= _TAR_END_MARKER) and await process.wait() != 0:
                        raise GardenError(errors.decode(errors="replace").strip())
                    yield _archive(process, sub, first, errors)
        except* GardenError as group:
            raise stream_error(first_error(group), "out") from None


class _Observed(AbstractAsyncContextManager[T]):
    """``opening`` whose entering (only) runs under ``observation`` (a class, not a
    generator and an exit stack: it wraps every run and attach)."""

    def __init__(self, observation: AbstractContextManager[None], opening: AbstractAsyncContextManager[T]) -> None:
        self._observation = observation
        self._opening = opening

    async def __aenter__(self) -> T:
        with self._observation:
            return await self._opening.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._opening.__aexit__(*exc_info)


_TAR_NODE_REFUSED = b"tar: can't create node "
TAR_OUTPUT_LIMIT = 64 << 10  # bytes of tar's stderr kept for an error message
_TAR_END_MARKER = 1024  # two zero blocks end every tar archive


async def feed_stdin(process: ProcessActor, chunks: AsyncIterable[bytes]) -> None:
    """Write ``chunks`` to the process's stdin in order, then close it. Each write returns
    once written (backpressure reaches the iterator). The process going away ends the
    feeding quietly (what is left is dropped, as Garden drops stdin after exit)."""
    with contextlib.suppress(GardenError):
        async for data in chunks:
            await process.write_stdin(data)
        await process.close_stdin()


async def _archive(process: ProcessActor, sub: Subscription, first: bytes | None,
                   errors: bytearray) -> AsyncIterator[list[bytes]]:
    if first is not None:
        parcel = [first]
        del first
        yield parcel
    async for fd, data in sub.receive:
        if fd == 1:
            parcel = [data]
            del data
            yield parcel
        elif len(errors) < TAR_OUTPUT_LIMIT:
            errors += data
    code = await process.wait()
    if code != 0:
        raise GardenError(f"exit status {code}: {errors.decode(errors='replace').strip()}")


async def _collect(sub: Subscription) -> bytes:
    """Everything a subscription delivers, up to TAR_OUTPUT_LIMIT bytes (the rest is dropped)."""
    output = bytearray()
    async with sub.receive:
        async for _, data in sub.receive:
            output += data[: max(0, TAR_OUTPUT_LIMIT - len(output))]
    return bytes(output)


async def _first_archive_bytes(sub: Subscription, errors: bytearray) -> bytes | None:
    """The start of the archive (more than its 1024-byte end marker), gathering stderr
    meanwhile; None if tar ends first. tar writes an empty archive even when the path is
    missing, so only an archive with a member in it proves the path could be read."""
    head = bytearray()
    async for fd, data in sub.receive:
        if fd == 1:
            head += data
            if len(head) > _TAR_END_MARKER:
                return bytes(head)
        elif len(errors) < TAR_OUTPUT_LIMIT:
            errors += data
    return bytes(head) or None


def stream_error(err: GardenError, direction: str) -> GardenError:
    """Garden's wording for a failed StreamIn/StreamOut; a missing container stays itself."""
    if isinstance(err, ContainerNotFoundError) or str(err).startswith("error streaming"):
        return err
    return GardenError(f"error streaming {direction}: {err}")


def first_error(group: BaseExceptionGroup[GardenError]) -> GardenError:
    """The first GardenError of an ``except* GardenError`` group (nested or not)."""
    first = group.exceptions[0]
    return first if isinstance(first, GardenError) else first_error(first)



def new_process_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives, without building
    a ``uuid.UUID`` (this runs on every ``run`` without an id)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_process_spec(spec: ProcessSpec) -> None:
    for bm in spec.bind_mounts:
        if not bm.src_path or not bm.dst_path:
            raise GardenError("invalid process spec: a bind mount needs src_path and dst_path")


async def _create(api: Api, args: dict[str, Any]) -> Any:
    spec = arg(args, "spec", ContainerSpec)
    spec.handle = spec.handle or str(uuid.uuid4())
    check_name("handle", spec.handle)
    if spec.rootfs_path and spec.image.uri:
        raise GardenError("Cannot provide both Image.URI and RootFSPath")
    source = (spec.image.uri or spec.rootfs_path or api.registry.default_rootfs).removeprefix("raw://")
    if not source:
        raise GardenError("no rootfs given and the server has no default rootfs")
    try:
        images.check_source(source)
    except images.ImageError as err:
        raise GardenError(str(err)) from None
    for mount in spec.bind_mounts:
        if not mount.dst_path.startswith("/"):
            raise GardenError(f"bind mount destination {mount.dst_path!r} must be an absolute path")
        if mount.origin == 0 and not os.path.exists(mount.src_path):
            raise GardenError(f"bind mount source {mount.src_path!r} does not exist")
    spec.grace_time = spec.grace_time or api.registry.default_grace_time
    container = await api.registry.create(spec, source)
    return {"handle": container.handle}


async def _destroy(api: Api, args: dict[str, Any]) -> None:
    await api.registry.destroy(arg(args, "handle", str))


async def _ping(api: Api, args: dict[str, Any]) -> None:
    return None


async def _images(api: Api, args: dict[str, Any]) -> Any:
    return [to_wire(ImageInfo(i.path, i.source, i.bytes, i.layers, list(i.users))) for i in await api.registry.images()]


async def _pull(api: Api, args: dict[str, Any], progress: images.Progress | None = None) -> Any:
    i = await api.registry.pull(arg(args, "uri", str), args.get("username", ""), args.get("password", ""), progress)
    return to_wire(ImageInfo(i.path, i.source, i.bytes, i.layers, list(i.users)))


async def _prune_images(api: Api, args: dict[str, Any]) -> Any:
    return await api.registry.prune_images()


async def _capacity(api: Api, args: dict[str, Any]) -> Any:
    return to_wire(api.registry.capacity(api.pool_containers))


async def _lookup(api: Api, args: dict[str, Any]) -> Any:
    return {"handle": (await api.registry.lookup(arg(args, "handle", str))).handle}


async def _containers(api: Api, args: dict[str, Any]) -> Any:
    props = arg(args, "properties", dict, None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in props.items()):
        raise GardenError("argument 'properties' must map strings to strings")
    return await api.registry.list(props)


async def _set_grace_time(api: Api, args: dict[str, Any]) -> None:
    seconds = arg(args, "seconds", float)
    if not 0 <= seconds < 1e9:
        raise GardenError(f"argument 'seconds' out of range: {seconds}")
    await api.registry.set_grace_time(arg(args, "handle", str), seconds)


async def _bulk_info(api: Api, args: dict[str, Any]) -> Any:
    """Per-handle results in one call; an error for one handle is reported in its entry."""
    out: dict[str, Any] = {}

    async def one(handle: str) -> None:
        try:
            info = await (await api.registry.lookup(handle)).info()
            out[handle] = {"info": to_wire(info), "err": None}
        except GardenError as err:
            out[handle] = {"info": None, "err": error_to_wire(err)}

    handles = _handles(args)
    async with trio.open_nursery() as nursery:
        for handle in handles:
            nursery.start_soon(one, handle)
    return {handle: out[handle] for handle in handles}


async def _bulk_metrics(api: Api, args: dict[str, Any]) -> Any:
    handles = _handles(args)
    found: dict[str, ContainerRef] = {}
    out: dict[str, Any] = {}
    for handle in handles:
        try:
            found[handle] = await api.registry.lookup(handle)
        except GardenError as err:
            pea = api.registry.find_pea(handle)  # Garden also answers for a pea's process id
            if pea is None:
                out[handle] = {"metrics": None, "err": error_to_wire(err)}
                continue
            try:
                out[handle] = {"metrics": to_wire(await trio.to_thread.run_sync(metrics.read_pea, *pea)),
                               "err": None}
            except KernelError as gone:
                out[handle] = {"metrics": None, "err": error_to_wire(GardenError(f"metrics of {handle}: {gone}"))}
    for handle, result in zip(found, await metrics.collect_many(list(found.values())), strict=True):
        if isinstance(result, KernelError):
            out[handle] = {"metrics": None, "err": error_to_wire(GardenError(f"metrics of {handle}: {result}"))}
        else:
            out[handle] = {"metrics": to_wire(result), "err": None}
    return {handle: out[handle] for handle in handles}


def _handles(args: dict[str, Any]) -> list[str]:
    handles = arg(args, "handles", list)
    if not all(isinstance(h, str) for h in handles):
        raise GardenError("argument 'handles' must be a list of strings")
    return list(dict.fromkeys(handles))


async def _stop(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.stop(arg(args, "kill", bool, False))


async def _info(c: ContainerRef, args: dict[str, Any]) -> Any:
    return to_wire(await c.info())


async def _metrics(c: ContainerRef, args: dict[str, Any]) -> Any:
    await c.check_oom()
    return to_wire(await metrics.collect(c))


async def _properties(c: ContainerRef, args: dict[str, Any]) -> Any:
    return dict(c.properties)


async def _property(c: ContainerRef, args: dict[str, Any]) -> str:
    name = arg(args, "name", str)
    if name not in c.properties:
        raise GardenError(f"property does not exist: {name}")
    return str(c.properties[name])


async def _set_property(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.set_property(arg(args, "name", str), arg(args, "value", str))


async def _remove_property(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.remove_property(arg(args, "name", str))


async def _signal(c: ContainerRef, args: dict[str, Any]) -> None:
    signal = arg(args, "signal", int)
    if signal not in _SIGNALS:
        raise GardenError(f"invalid signal {signal}: must be 0 (terminate) or 1 (kill)")
    await (await c.process(arg(args, "process_id", str))).signal(_SIGNALS[signal])


async def _set_tty(c: ContainerRef, args: dict[str, Any]) -> None:
    tty = arg(args, "tty", TTYSpec)
    proc = await c.process(arg(args, "process_id", str))
    if tty.window_size is not None:
        await proc.resize(tty.window_size.columns, tty.window_size.rows)


async def _limit_memory(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.limit_memory(arg(args, "limits", MemoryLimits))


async def _current_memory_limits(c: ContainerRef, args: dict[str, Any]) -> Any:
    return to_wire(await c.current_memory_limits())


async def _limit_cpu(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.limit_cpu(arg(args, "limits", CPULimits))


async def _current_cpu_limits(c: ContainerRef, args: dict[str, Any]) -> Any:
    return to_wire(await c.current_cpu_limits())


async def _limit_bandwidth(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.limit_bandwidth(arg(args, "limits", BandwidthLimits))


async def _current_bandwidth_limits(c: ContainerRef, args: dict[str, Any]) -> Any:
    return to_wire(c.current_bandwidth_limits())


async def _net_in(c: ContainerRef, args: dict[str, Any]) -> Any:
    host_port, container_port = await c.net_in(arg(args, "host_port", int, 0), arg(args, "container_port", int, 0))
    return [host_port, container_port]


async def _net_out(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.net_out([arg(args, "rule", NetOutRule)])


async def _bulk_net_out(c: ContainerRef, args: dict[str, Any]) -> None:
    await c.net_out(arg(args, "rules", list))  # NetOutRules: decoded by schema.check


async def _current_disk_limits(c: ContainerRef, args: dict[str, Any]) -> Any:
    return to_wire(c.disk_limits)  # as given at create: all zero (Garden's "{}") when none was


ContainerHandler = Callable[[ContainerRef, dict[str, Any]], Awaitable[Any]]

# Calls that name no container, or do not pause its grace timer (Garden's bulk calls,
# destroy, set_grace_time).
API_METHODS: dict[str, Handler] = {
    "ping": _ping,
    "capacity": _capacity,
    "images": _images,
    "prune_images": _prune_images,
    "pull": _pull,
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
    "limit_bandwidth": _limit_bandwidth,
    "current_bandwidth_limits": _current_bandwidth_limits,
    "current_disk_limits": _current_disk_limits,
    "net_in": _net_in,
    "net_out": _net_out,
    "bulk_net_out": _bulk_net_out,
}
