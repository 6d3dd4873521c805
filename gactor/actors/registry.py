"""The registry actor: the one owner of the handle table, capacity, grace timers and
image references, and of the event hub (``events.EventHub``, a child actor holding the
subscriptions), to which it publishes ``created`` and ``destroyed``.

One task (``_serve``) owns that state and answers typed commands from a bounded
mailbox; front ends hold a ``RegistryRef``. Creates and destroys run in tasks of the
registry's own nursery, never in the caller's: a client that disconnects mid-create
cancels only its wait, and the container is either listed when creation finishes
(its grace time then applies) or rolled back completely. Container actors run in the
registry's nursery too; a crashed one is logged, and its container stays listed so a
destroy can still clean it up.

Every container-scoped request pauses that container's grace timer while it runs
(Garden's "bomberman", ``RegistryRef.using``): the countdown restarts in full when the
last pause ends, and an expired timer destroys the container.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import re
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..errors import ContainerNotFoundError, GardenError
from ..kernel import depot, idmap, image_copies, images, kmsg, shims
from ..kernel.errors import KernelError
from ..kernel.images import Progress
from ..kernel.netmodel import ContainerNet
from ..types import Capacity, ContainerEvent, ContainerSpec
from .container import PEA_CGROUP, ContainerActor, ContainerRef, Environment, State, remove_orphan
from .events import EventHub, EventQueue, event
from .mailbox import DEFERRED, ActorGone, Mailbox, Request
from .pools import PoolError, PortPool, SubnetPool

log = logging.getLogger("gactor.registry")

_BAD_HANDLE = re.compile(r"[/\x00]")
MAX_HANDLE_BYTES = 200
ADOPT_TIMEOUT = 5.0  # seconds a shim gets to answer at startup before its container is removed
RELEASE_TIMEOUT = 5.0  # seconds an unpause may wait for room in the registry's mailbox


def check_name(kind: str, name: str) -> None:
    """Handles and process ids become file names: refuse what cannot be one."""
    if name in (".", "..") or _BAD_HANDLE.search(name) or len(name.encode()) > MAX_HANDLE_BYTES:
        raise GardenError(f"invalid {kind} {name!r}: must not be '.' or '..', contain '/' or NUL, "
                          f"or exceed {MAX_HANDLE_BYTES} bytes")


class GraceTimer:
    """Reaps a container after ``seconds`` without any request touching it (0 = never)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pauses = 0
        self.defused = False
        self.scope = trio.CancelScope()
        self._rearm()

    def _rearm(self) -> None:
        idle = self.pauses == 0 and self.seconds > 0
        deadline = trio.current_time() + self.seconds if idle else math.inf
        if deadline != self.scope.deadline:  # a timer that never reaps (0) stays as it is
            self.scope.deadline = deadline

    def pause(self) -> None:
        self.pauses += 1
        self._rearm()

    def unpause(self) -> None:
        self.pauses -= 1
        self._rearm()

    def reset(self, seconds: float) -> None:
        self.seconds = seconds
        self._rearm()

    def defuse(self) -> None:
        self.defused = True
        self.scope.cancel()

    async def expired(self) -> bool:
        """Sleep until the countdown runs out (True) or the timer is defused (False)."""
        with self.scope:
            await trio.sleep_forever()
        return not self.defused


class ImageStoreLock:
    """Who may work on the image store at once: prepares and pulls share it (one per
    source at a time, so concurrent creates from one new image unpack it once), while a
    collect or prune has it alone. A waiting collect or prune goes first: new prepares
    wait for it, so a stream of creates never starves a destroy's collect."""

    def __init__(self) -> None:
        self._changed = trio.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0
        self._sources: dict[str, trio.Lock] = {}

    @contextlib.asynccontextmanager
    async def shared(self, source: str) -> AsyncIterator[None]:
        async with self._changed:
            while self._alone or self._waiting_alone:
                await self._changed.wait()
            self._sharing += 1
        lock = self._sources.setdefault(source, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            with trio.CancelScope(shield=True):
                if not lock.locked() and lock.statistics().tasks_waiting == 0:
                    self._sources.pop(source, None)
                async with self._changed:
                    self._sharing -= 1
                    self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                while self._alone or self._sharing:
                    await self._changed.wait()
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._changed:
                    self._alone = False
                    self._changed.notify_all()


class Container(Protocol):
    """What the registry needs of a container (a ContainerRef; a fake in unit tests)."""

    handle: str
    name: str

    @property
    def properties(self) -> Mapping[str, str]: ...
    @property
    def grace_time(self) -> float: ...
    @property
    def image_copy(self) -> str: ...
    @property
    def net(self) -> ContainerNet | None: ...
    async def destroy(self) -> None: ...
    async def set_grace_time(self, seconds: float) -> None: ...
    async def oom_killed(self, pid: int, task: str) -> None: ...


# ---- commands ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Create:
    spec: ContainerSpec
    source: str


@dataclass(frozen=True)
class DestroyContainer:
    handle: str


@dataclass(frozen=True)
class ReleasePeaImage:
    key: str  # the reference a container's actor took for a pea with acquire_image


@dataclass(frozen=True)
class Pause:
    """Told: a request starts using the container (looked up in the snapshot)."""

    handle: str


@dataclass(frozen=True)
class Release:
    handle: str


@dataclass(frozen=True)
class ListHandles:
    properties: Mapping[str, str]


@dataclass(frozen=True)
class SetGraceTime:
    handle: str
    seconds: float


@dataclass(frozen=True)
class Subscribe:
    handle: str | None
    recorded_only: bool


@dataclass(frozen=True)
class TakeCensus:
    """Asked at every metrics scrape: what the registry holds right now."""


@dataclass(frozen=True)
class Census:
    """The registry's state at one moment, for metrics: the listed containers, creates
    under way, and the pools (zeros without networking)."""

    containers: tuple[Container, ...]
    creating: int
    subnets_in_use: int = 0
    subnets_capacity: int = 0
    ports_available: int = 0
    ports_size: int = 0


@dataclass(frozen=True)
class Adopted:
    """Startup, and unit tests: take a container that exists already."""

    container: Container


@dataclass(frozen=True)
class AcquireImage:
    handle: str
    source: str
    shift: bool


@dataclass(frozen=True)
class _ImageTaken:
    handle: str
    copy: images.Image


@dataclass(frozen=True)
class ListImages:
    pass


@dataclass(frozen=True)
class PruneImages:
    pass


@dataclass(frozen=True)
class PullImage:
    source: str
    username: str
    password: str
    progress: Progress | None = None  # called from the pulling thread


@dataclass(frozen=True)
class _ImageUsers:
    pass


@dataclass(frozen=True)
class _ImagesInUse:
    pass


@dataclass(frozen=True)
class _ReleaseImage:
    handle: str


@dataclass(frozen=True)
class AcquirePort:
    port: int  # 0: the next one of the pool


@dataclass(frozen=True)
class ReleasePort:
    port: int


@dataclass(frozen=True)
class _NetworkReleased:
    net: ContainerNet


@dataclass(frozen=True)
class _BridgeGone:
    subnet: str


@dataclass(frozen=True)
class _Created:
    reply_to: Request[Container]
    handle: str
    container: Container | None
    error: BaseException | None


@dataclass(frozen=True)
class _Destroyed:
    reply_to: Request[None] | None
    container: Container
    error: BaseException | None


@dataclass(frozen=True)
class _Expired:
    handle: str
    timer: GraceTimer


def _adopted_copy(path: str) -> images.Image:
    """A re-adopted container's image, as far as the registry needs it (its path; no
    source, so releasing it always collects)."""
    return images.Image(path, (path,), images.ImageConfig(), "", True, 0, 0)


@dataclass(frozen=True)
class ImageUsage:
    """One image in the store, and the containers using it."""

    path: str
    source: str
    bytes: int
    layers: int
    users: tuple[str, ...]


class Registry:
    """The registry actor's state and owning task; start it with ``nursery.start(run)``,
    which hands back a ``RegistryRef``."""

    def __init__(self, env: Environment, default_rootfs: str, default_grace_time: float,
                 max_containers: int, subnets: SubnetPool | None = None, ports: PortPool | None = None) -> None:
        self.env = env
        self.default_rootfs = default_rootfs
        self.default_grace_time = default_grace_time
        self.max_containers = max_containers
        self.containers: dict[str, Container] = {}
        self._named: dict[str, Container] = {}  # the same by depot (and cgroup) name: no scans
        self._creating: set[str] = set()
        self._destroying: set[str] = set()
        self._timers: dict[str, GraceTimer] = {}
        self._nursery: trio.Nursery | None = None
        self.hub = EventHub()  # the subscriptions' owner, started by run in the registry's nursery
        # Image references: the image each container uses. Images are prepared (sharing
        # _image_lock) and collected (alone) by registry tasks, so a collect never runs
        # between a prepare and the reference it leads to.
        self._image_users: dict[str, images.Image] = {}
        self._image_paths: collections.Counter[str] = collections.Counter()  # references per copy
        self._image_lock = ImageStoreLock()
        self._idmap = False  # whether unprivileged containers see unshifted layers idmapped
        self._credentials: dict[str, tuple[str, str]] = {}  # registry logins of creates under way
        # Collects and prunes under way (each with _image_lock alone): while one runs, from
        # its snapshot of the references to its end, no reference is taken without the lock.
        self._collecting = 0
        # Networking: the pools, and the bridges being deleted (a create on that subnet
        # waits until its bridge is gone, then makes a new one).
        self.subnets = subnets
        self.ports = ports
        self._bridges_going: dict[str, trio.Event] = {}
        # Set when a copy may have gone stale unused (a prepare that scanned, or startup):
        # until the next collect, a release always collects.
        self._collect_due = True
        self.mailbox = Mailbox("the registry")
        env.publish = self._publish
        env.acquire_image = self._acquire_image
        env.acquire_port = self._acquire_port
        env.release_port = self._release_port
        env.release_image = self._release_pea_image

    async def run(self, *, destroy_existing: bool = False,
                  task_status: trio.TaskStatus[RegistryRef] = trio.TASK_STATUS_IGNORED) -> None:
        ref = RegistryRef(self.mailbox, self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.hub.run)
                await self._restore()
                nursery.start_soon(self.mailbox.serve, self._handle)
                nursery.start_soon(self._watch_oom_kills)
                if destroy_existing:
                    for handle in list(self.containers):
                        await ref.destroy(handle)
                task_status.started(ref)
        finally:
            self.mailbox.close()

    async def _watch_oom_kills(self) -> None:
        """Hand each OOM victim the kernel log names in one of our containers to that
        container's actor, which records it as an event (after Garden's "Out of memory")."""
        try:
            klog = await trio.to_thread.run_sync(kmsg.KernelLog)
        except OSError as err:
            log.warning("OOM events will not name the killed process: cannot read %s: %s", kmsg.KMSG, err)
            return
        parent = os.path.basename(self.env.cgroups.parent.rstrip("/"))
        try:
            while True:
                await trio.lowlevel.wait_readable(klog.fd)
                for record in klog.read():
                    kill = kmsg.parse(record)
                    if kill is None or os.path.basename(os.path.dirname(kill.memcg)) != parent:
                        continue
                    container = self._named.get(kill.cgroup_name)
                    if container is not None:
                        await container.oom_killed(kill.pid, kill.task)
        finally:
            trio.lowlevel.notify_closing(klog.fd)
            klog.close()

    async def _handle(self, request: Request[Any]) -> Any:  # noqa: C901 - one case per command
        match request.command:
            case Pause(handle):
                timer = self._timers.get(handle)
                if timer is not None:  # destroyed meanwhile: nothing to pause
                    timer.pause()
            case Release(handle):
                timer = self._timers.get(handle)
                if timer is not None:
                    timer.unpause()
            case ListHandles(wanted):
                return [
                    handle for handle, c in self.containers.items()
                    if handle not in self._destroying
                    and all(c.properties.get(k, "") == v for k, v in wanted.items())
                ]
            case Create(spec, source):
                self._check_create(spec)
                net = self._allocate_network(spec)
                self._creating.add(spec.handle)
                if spec.image.username or spec.image.password:  # for a docker:// pull; gone once created
                    self._credentials[spec.handle] = (spec.image.username, spec.image.password)
                bridge_going = self._bridges_going.get(str(net.alloc.subnet)) if net is not None else None
                self._spawn(self._create, spec, source, net, bridge_going, request)
                return DEFERRED
            case AcquirePort(port):
                if self.ports is None:
                    raise GardenError("this server has no container networking")
                # Every change of the port pool is fsynced: in a worker thread, never on
                # the event loop (the owner still waits, so changes stay in order).
                try:
                    if port == 0:
                        return await trio.to_thread.run_sync(self.ports.acquire)
                    await trio.to_thread.run_sync(self.ports.reserve, port)
                    return port
                except PoolError as err:
                    raise GardenError(str(err)) from None
            case ReleasePort(port):
                if self.ports is not None:
                    await trio.to_thread.run_sync(self.ports.release, port)
            case _NetworkReleased(net):
                await self._free_network(net)
            case _BridgeGone(subnet):
                self._bridges_going.pop(subnet).set()
            case AcquireImage(handle, source, shift):
                # An image the cache knows, with no collect or prune under way, is taken
                # here in one step (also while a long pull holds the lock); anything else is
                # prepared by a task holding the lock.
                copy = None if self._collecting else self._known_copy(source, shift)
                if copy is None:
                    self._spawn(self._prepare_image, request)
                    return DEFERRED
                self._take_image(handle, copy)
                return copy
            case ReleasePeaImage(key):
                self._spawn(self._release_image, key)
            case _ImageTaken(handle, copy):
                self._take_image(handle, copy)
            case _ImagesInUse():
                return set(self._image_paths)
            case ListImages():
                self._spawn(self._list_images, request)
                return DEFERRED
            case PruneImages():
                self._spawn(self._prune_images, request)
                return DEFERRED
            case PullImage():
                self._spawn(self._pull_image, request)
                return DEFERRED
            case _ImageUsers():
                users: dict[str, list[str]] = {}
                for handle, image in self._image_users.items():
                    users.setdefault(image.path, []).append(handle)
                return users
            case _ReleaseImage(handle):
                # The copy when that was its last user, else None: only then can a collect
                # free it, so 50 destroys of containers sharing one image run no 50 collects.
                released = self._drop_image(handle)
                if released is None or self._image_paths[released.path]:
                    return None
                if released.layered:
                    return None  # layers are a cache: they go at a prune, not with their last user
                return released
            case _Created(reply_to, handle, container, error):
                self._creating.discard(handle)
                self._credentials.pop(handle, None)
                if container is None:
                    reply_to.fail(error or GardenError(f"creating {handle} failed"))
                else:
                    self._add(container)
                    await self._publish(event("created", handle))
                    reply_to.reply(container)
            case DestroyContainer(handle):
                self._start_destroy(self._lookup(handle), request)
                return DEFERRED
            case _Destroyed(reply_to, container, error):
                self._destroying.discard(container.handle)
                if error is None:
                    # No request: the grace timer's reaping (a client's destroy has one).
                    reason = "client" if reply_to is not None else "grace_time"
                    await self._publish(event("destroyed", container.handle, reason=reason))
                    await self.hub.end_of(container.handle)
                    self._forget(container.handle)
                    if container.net is not None:
                        self._spawn(self._release_network, container.net)
                    if reply_to is not None:
                        reply_to.reply(None)
                elif reply_to is not None:
                    reply_to.fail(error)
                else:
                    log.warning("container %s: reaping failed (it stays listed): %s", container.handle, error)
            case _Expired(handle, timer):
                if self._timers.get(handle) is timer and handle not in self._destroying:
                    log.info("container %s: grace time expired, destroying it", handle)
                    self._start_destroy(self.containers[handle], None)
            case SetGraceTime(handle, seconds):
                container = self._lookup(handle)
                self._timers[handle].reset(seconds)
                await container.set_grace_time(seconds)
            case Subscribe(handle, recorded_only):
                if handle is not None:
                    self._lookup(handle)
                queue = EventQueue(handle, recorded_only)
                await self.hub.subscribe(queue)  # the hub waits for no one: no cycle
                return queue
            case Adopted(container):
                self._add(container)
            case TakeCensus():
                return self._census()
            case command:
                raise GardenError(f"unknown registry command {command!r}")
        return None

    def _census(self) -> Census:
        census = Census(tuple(self.containers.values()), len(self._creating))
        if self.subnets is not None:
            census = dataclasses.replace(census, subnets_in_use=self.subnets.in_use(),
                                         subnets_capacity=self.subnets.capacity())
        if self.ports is not None:
            census = dataclasses.replace(census, ports_available=self.ports.available(),
                                         ports_size=self.ports.size)
        return census

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ---- startup ---------------------------------------------------------------------

    async def _restore(self) -> None:
        """Re-adopt every container in the depot, concurrently; remove what cannot be
        re-adopted (within ADOPT_TIMEOUT each), then every shim and cgroup no container owns.
        One container that cannot be re-adopted is logged and removed; it never stops the
        server."""
        root = os.path.join(self.env.depot, depot.CONTAINERS)
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        live_shims = await trio.to_thread.run_sync(shims.find, root)
        adopted: list[ContainerRef] = []
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._readopt, name, live_shims.get(name), adopted)
        for container in adopted:
            self._add(container)
            if container.image_copy:
                self._take_image(container.handle, _adopted_copy(container.image_copy))
            self._restore_network(container)
        if self.ports is not None:
            in_use = [host for c in adopted if c.net is not None for host, _ in c.net.net_in]
            await trio.to_thread.run_sync(self.ports.restore, in_use)
        owned = set(self._named)
        for name, pid in live_shims.items():
            if name not in owned:
                log.warning("killing the shim of %s: no container owns it", name)
                await trio.to_thread.run_sync(remove_orphan, self.env, name, pid)
        for name in set(self.env.cgroups.names()) - owned:
            if name.partition(PEA_CGROUP)[0] in owned:
                continue  # a pea's own cgroup: its container removes it
            log.warning("removing cgroup %s: no container owns it", name)
            await trio.to_thread.run_sync(remove_orphan, self.env, name)
        async with self._image_lock.alone():
            self._collect_due = False
            self._idmap = await trio.to_thread.run_sync(self._probe_idmap)
            await self._collect_images(set(self._image_paths))
        if self.env.network is not None:
            nets = [c.net for c in self.containers.values() if c.net is not None]
            await self.env.network.reconcile(nets)
        log.info("re-adopted %d containers", len(self.containers))

    async def _readopt(self, name: str, shim_pid: int | None, adopted: list[ContainerRef]) -> None:
        assert self._nursery is not None
        reason: object = f"its shim did not answer within {ADOPT_TIMEOUT} s"
        with trio.move_on_after(ADOPT_TIMEOUT):
            try:
                actor = ContainerActor.restore(self.env, name)
                adopted.append(await self._nursery.start(self._supervise, actor, True))
                return
            except Exception as err:  # noqa: BLE001 - one broken container must not stop the server
                reason = err
        # A GardenError or OSError says what is wrong; anything else (a group) is a bug to trace.
        trace = reason if isinstance(reason, BaseException) and not isinstance(reason, (GardenError, OSError)) else None
        log.warning("removing container %s: it cannot be re-adopted: %s", name, reason, exc_info=trace)
        await trio.to_thread.run_sync(remove_orphan, self.env, name, shim_pid)

    async def _supervise(self, actor: ContainerActor, adopt: bool,
                         task_status: trio.TaskStatus[ContainerRef] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a container actor; a crash after creation is logged, never fatal to the server.

        The crashed container stays listed, so a destroy can still clean it up.
        """
        try:
            await actor.run(adopt=adopt, task_status=task_status)
        except Exception:  # ExceptionGroups from the actor's nursery included
            if actor.state is State.CREATING:
                raise  # a creation error, which nursery.start hands to the caller as it is
            log.exception("container %s: its actor crashed", actor.handle)

    # ---- create / destroy --------------------------------------------------------------

    def _check_create(self, spec: ContainerSpec) -> None:
        if spec.handle in self.containers or spec.handle in self._creating:
            raise GardenError(f"Handle '{spec.handle}' already in use")
        if self.max_containers and len(self.containers) + len(self._creating) >= self.max_containers:
            raise GardenError("max containers reached")
        if spec.privileged and not self.env.allow_privileged:
            raise GardenError("privileged container creation is disabled")
        if depot.dir_name(spec.handle) in self._named:
            raise GardenError(f"Handle '{spec.handle}' already in use")  # cannot happen: names are injective

    async def _create(self, spec: ContainerSpec, source: str, net: ContainerNet | None,
                      bridge_going: trio.Event | None, request: Request[Container]) -> None:
        """Create in the registry's nursery: the caller leaving cancels only its wait."""
        assert self._nursery is not None
        container: Container | None = None
        error: BaseException | None = None
        try:
            if bridge_going is not None:
                await bridge_going.wait()
            actor = ContainerActor(self.env, spec, source, net=net)
            container = await self._nursery.start(self._supervise, actor, False)
        except Exception as err:  # noqa: BLE001 - reported to the caller; the actor rolled back
            error = err
            await self._release_image(spec.handle)
            if net is not None:
                # The actor removed its links; the address and any ports go back now.
                await self.mailbox.tell(_NetworkReleased(net))
        await self.mailbox.tell(_Created(request, spec.handle, container, error))

    def _start_destroy(self, container: Container, request: Request[None] | None) -> None:
        if container.handle in self._destroying:
            raise GardenError("container already being destroyed")
        self._destroying.add(container.handle)
        self._spawn(self._destroy, container, request)

    async def _destroy(self, container: Container, request: Request[None] | None) -> None:
        error: BaseException | None = None
        try:
            await container.destroy()
        except ActorGone:
            # Its actor crashed: clean up from outside, as startup does for orphans.
            live = await trio.to_thread.run_sync(shims.find, os.path.join(self.env.depot, depot.CONTAINERS))
            try:
                await trio.to_thread.run_sync(remove_orphan, self.env, container.name, live.get(container.name))
            except OSError as err:
                error = GardenError(f"destroying {container.handle}: {err}")
        except GardenError as err:
            error = err  # the container stays listed; a retry resumes with the steps that failed
        except OSError as err:
            error = GardenError(f"destroying {container.handle}: {err}")
        if error is None:
            await self._release_image(container.handle)
        await self.mailbox.tell(_Destroyed(request, container, error))

    # ---- network pools ---------------------------------------------------------------

    def _allocate_network(self, spec: ContainerSpec) -> ContainerNet | None:
        if self.env.network is None or self.subnets is None:
            if spec.network:
                raise GardenError("this server has no container networking: 'network' cannot be given")
            return None
        try:
            alloc = self.subnets.allocate(spec.network)
        except PoolError as err:
            raise GardenError(str(err)) from None
        return self.env.network.container_net(spec.handle, alloc)

    def _restore_network(self, container: Container) -> None:
        net = container.net
        if net is None or self.subnets is None:
            return
        try:
            self.subnets.restore(net.alloc)
        except PoolError as err:
            log.error("container %s: its network conflicts with another container's: %s", container.handle, err)

    async def _release_network(self, net: ContainerNet) -> None:
        """After a destroy, in the background: remove the links and firewall state, then
        give the address and ports back (never before they are gone)."""
        assert self.env.network is not None
        with trio.CancelScope(shield=True):
            await self.env.network.release(net)
            await self.mailbox.tell(_NetworkReleased(net))

    async def _free_network(self, net: ContainerNet) -> None:
        assert self.subnets is not None
        try:
            self.subnets.release(net.alloc)
        except PoolError as err:  # a restored container whose allocation conflicted
            log.warning("container %s: %s", net.handle, err)
        ports = self.ports
        if ports is not None and net.net_in:
            def release_all() -> None:
                for host, _ in net.net_in:
                    ports.release(host)

            await trio.to_thread.run_sync(release_all)
        subnet = str(net.alloc.subnet)
        if net.alloc.bridged and self.subnets.members(net.alloc.subnet) == 0 and subnet not in self._bridges_going:
            self._bridges_going[subnet] = trio.Event()
            self._spawn(self._delete_bridge, net)

    async def _delete_bridge(self, net: ContainerNet) -> None:
        network = self.env.network
        assert network is not None
        bridge = network.bridge_for(net.alloc)
        with trio.CancelScope(shield=True):
            if bridge is not None:
                try:
                    await network.netlink.delete_bridge(bridge)
                except Exception as err:  # noqa: BLE001 - reconcile removes it at the next start
                    log.warning("bridge %s left in place: %s", bridge, err)
            await self.mailbox.tell(_BridgeGone(str(net.alloc.subnet)))

    async def _acquire_port(self, port: int) -> int:
        got: int = await self.mailbox.ask(AcquirePort(port))
        return got

    async def _release_port(self, port: int) -> None:
        await self.mailbox.tell(ReleasePort(port))

    # ---- image references ----------------------------------------------------------

    def _probe_idmap(self) -> bool:
        os.makedirs(self.env.image_store, mode=0o711, exist_ok=True)
        supported = idmap.supported(self.env.image_store)
        log.info("image store %s: %s", self.env.image_store, "unshifted layers, idmapped for unprivileged containers"
                 if supported else "no idmapped mounts: unprivileged containers get uid-shifted copies")
        return supported

    async def _acquire_image(self, handle: str, source: str, shift: bool) -> images.Image:
        """``shift``: the container is unprivileged (its root is MAX_UID on the host)."""
        copy: images.Image = await self.mailbox.ask(AcquireImage(handle, source, shift))
        return copy

    async def _list_images(self, request: Request[list[ImageUsage]]) -> None:
        """Without the image lock, so a listing never waits for a pull: an image removed
        meanwhile is left out, one being unpacked shows once it is recorded."""
        try:
            users: dict[str, list[str]] = await self.mailbox.ask(_ImageUsers())
            found = await trio.to_thread.run_sync(images.listed, self.env.image_store)
        except (KernelError, OSError) as err:
            request.fail(GardenError(f"listing images: {err}"))
            return
        request.reply([ImageUsage(i.path, i.source, i.bytes, i.layers, tuple(sorted(users.get(i.path, ()))))
                       for i in found])

    async def _pull_image(self, request: Request[ImageUsage]) -> None:
        """Fetch and unpack an image into the store with no container using it (it stays
        until a prune). Shielded, under the image lock, like a create's prepare."""
        command: PullImage = request.command
        with trio.CancelScope(shield=True):
            async with self._image_lock.shared(command.source):
                try:
                    image = await trio.to_thread.run_sync(lambda: images.prepare(
                        command.source, self.env.image_store, privileged=True, idmap=self._idmap,
                        username=command.username, password=command.password, progress=command.progress))
                except images.ImageError as err:
                    request.fail(GardenError(str(err)))
                    return
                except (KernelError, OSError) as err:
                    request.fail(GardenError(f"pulling image {command.source!r}: {err}"))
                    return
                users: dict[str, list[str]] = await self.mailbox.ask(_ImageUsers())
        request.reply(ImageUsage(image.path, image.source, image.bytes, max(1, len(image.digests)),
                                 tuple(sorted(users.get(image.path, ())))))

    async def _prune_images(self, request: Request[list[str]]) -> None:
        """Remove every image and layer no container uses. Shielded: once started, a
        prune finishes (under the image lock, so no prepare runs meanwhile)."""
        with trio.CancelScope(shield=True):
            async with self._image_lock.alone():
                with self._no_fast_references():
                    in_use = await self.mailbox.ask(_ImagesInUse())
                    try:
                        removed: list[str] = await trio.to_thread.run_sync(images.prune, self.env.image_store, in_use)
                    except (KernelError, OSError) as err:
                        request.fail(GardenError(f"pruning images: {err}"))
                        return
        for item in removed:
            log.info("pruned %s: no container uses it", item)
        request.reply(removed)

    async def _prepare_image(self, request: Request[images.Image]) -> None:
        """Prepare the copy and record the reference before another collect can run.
        Shielded: a reference is never half-taken."""
        command: AcquireImage = request.command
        with trio.CancelScope(shield=True):
            async with self._image_lock.shared(command.source):
                privileged, store = not command.shift, self.env.image_store
                username, password = self._credentials.get(command.handle, ("", ""))
                try:
                    copy = images.known(command.source, store, privileged=privileged, idmap=self._idmap)
                    if copy is None:
                        self._collect_due = True  # a scan: the source may have changed
                        copy = await trio.to_thread.run_sync(lambda: images.prepare(
                            command.source, store, privileged=privileged, idmap=self._idmap,
                            username=username, password=password))
                except images.ImageError as err:
                    request.fail(GardenError(str(err)))
                    return
                except (KernelError, OSError) as err:
                    request.fail(GardenError(f"preparing image {command.source!r}: {err}"))
                    return
                await self.mailbox.ask(_ImageTaken(command.handle, copy))
            request.reply(copy)

    async def _release_pea_image(self, key: str) -> None:
        """A container's actor drops a reference it took for a pea (not waited for)."""
        await self.mailbox.tell(ReleasePeaImage(key))

    async def _release_image(self, handle: str) -> None:
        """Drop ``handle``'s image reference, then remove the copies nobody uses (so a
        destroy returns with the disk freed). Shielded; from registry tasks only."""
        with trio.CancelScope(shield=True):
            released: images.Image | None = await self.mailbox.ask(_ReleaseImage(handle))
            if released is None:
                return
            async with self._image_lock.alone():
                if not self._collect_due and self._current(released):
                    return  # a collect would keep it (keep_current) and nothing else is stale
                self._collect_due = False
                with self._no_fast_references():
                    await self._collect_images(await self.mailbox.ask(_ImagesInUse()))

    def _known_copy(self, source: str, shift: bool) -> images.Image | None:
        """``images.known`` (no scan, safe on the event loop); an error means "not
        known": the prepare that follows reports it."""
        try:
            return images.known(source, self.env.image_store, privileged=not shift, idmap=self._idmap)
        except (KernelError, OSError):
            return None

    def _current(self, copy: images.Image) -> bool:
        """Whether the directory copy ``copy`` is what a create from its source gets now,
        known without a scan (``image_copies.known``: no thread hop). Unknown counts as
        not current."""
        if not copy.source:
            return False
        try:
            now = image_copies.known(copy.source, self.env.image_store, shift=copy.shifted)
        except (KernelError, OSError):
            return False
        return now is not None and now.path == copy.path

    @contextlib.contextmanager
    def _no_fast_references(self) -> Iterator[None]:
        self._collecting += 1
        try:
            yield
        finally:
            self._collecting -= 1

    async def _collect_images(self, in_use: set[str]) -> None:
        """Remove every image copy no container references (and half-built ones); a
        failure is logged, never raised. Called with _image_lock held alone."""
        try:
            removed = await trio.to_thread.run_sync(image_copies.collect, self.env.image_store, in_use)
        except (KernelError, OSError) as err:
            log.warning("image copies left in place: %s", err)
            return
        for path in removed:
            log.info("removed image copy %s: no container uses it", path)

    def _take_image(self, key: str, copy: images.Image) -> None:
        self._drop_image(key)
        self._image_users[key] = copy
        self._image_paths[copy.path] += 1

    def _drop_image(self, key: str) -> images.Image | None:
        """Forget ``key``'s reference (None: it had none); the copy's count goes down."""
        copy = self._image_users.pop(key, None)
        if copy is not None:
            self._image_paths[copy.path] -= 1
            if not self._image_paths[copy.path]:
                del self._image_paths[copy.path]
        return copy

    def _add(self, container: Container) -> None:
        assert self._nursery is not None
        self.containers[container.handle] = container
        self._named[container.name] = container
        timer = self._timers[container.handle] = GraceTimer(container.grace_time)
        self._nursery.start_soon(self._reap_when_idle, container.handle, timer)

    def _forget(self, handle: str) -> None:
        self._named.pop(self.containers.pop(handle).name, None)
        timer = self._timers.pop(handle, None)
        if timer is not None:
            timer.defuse()

    async def _reap_when_idle(self, handle: str, timer: GraceTimer) -> None:
        if await timer.expired():
            await self.mailbox.tell(_Expired(handle, timer))

    def _lookup(self, handle: str) -> Container:
        container = self.containers.get(handle)
        if container is None:
            raise ContainerNotFoundError(handle)
        return container

    # ---- events ------------------------------------------------------------------------

    async def _publish(self, item: ContainerEvent) -> None:
        """Hand an event to the hub (containers' actors publish through this too): it
        waits only for room in the hub's mailbox, never for a subscriber."""
        await self.hub.publish(item)


class RegistryRef:
    """The handle front ends hold. Every coroutine sends the registry a command;
    cancelling the wait never cancels the command (a create or destroy goes on)."""

    def __init__(self, mailbox: Mailbox, registry: Registry) -> None:
        self._mailbox = mailbox
        # A read-only view of the registry's handle table (only its owner writes it): a
        # lookup needs no round trip through the mailbox.
        self._containers: Mapping[str, Container] = types.MappingProxyType(registry.containers)
        self.env = registry.env
        self.default_rootfs = registry.default_rootfs
        self.default_grace_time = registry.default_grace_time
        self.max_containers = registry.max_containers
        self._subnets = registry.subnets
        self._hub = registry.hub

    async def images(self) -> list[ImageUsage]:
        """Every image in the store, with the handles of the containers using it."""
        found: list[ImageUsage] = await self._mailbox.ask(ListImages())
        return found

    async def pull(self, source: str, username: str = "", password: str = "",
                   progress: Progress | None = None) -> ImageUsage:
        """Fetch ``source`` into the image store (no container uses it until one is
        created from it). ``progress(digest, done, total)`` hears of each layer, from the
        thread pulling (``images.prepare``): it must be quick and thread-safe
        (``PullProgress.report``). Raises GardenError naming the image. Cancelled: the
        pull goes on (and still reports to ``progress``)."""
        try:
            images.check_source(source)
        except images.ImageError as err:
            raise GardenError(str(err)) from None
        pulled: ImageUsage = await self._mailbox.ask(PullImage(source, username, password, progress))
        return pulled

    async def prune_images(self) -> list[str]:
        """Remove every image and layer no container uses; returns the removed image
        paths and layer digests. Cancelled: the prune goes on."""
        removed: list[str] = await self._mailbox.ask(PruneImages())
        return removed

    async def create(self, spec: ContainerSpec, source: str) -> ContainerRef:
        """Create the container ``spec.handle`` from the image ``source`` (CLIENT_API §4).
        Cancelled: creation goes on; the container is listed once it exists (and its
        grace time applies), or rolled back if it failed."""
        container: ContainerRef = await self._mailbox.ask(Create(spec, source))
        return container

    async def destroy(self, handle: str) -> None:
        """Raises ContainerNotFoundError, "container already being destroyed", or the
        teardown's error (the container stays listed). Cancelled: the destroy goes on."""
        await self._mailbox.ask(DestroyContainer(handle))

    async def lookup(self, handle: str) -> ContainerRef:
        """The listed container ``handle`` (from the table as it is now, no round trip);
        raises ContainerNotFoundError."""
        await trio.lowlevel.checkpoint()
        return self._find(handle)

    def find_pea(self, process_id: str) -> tuple[ContainerRef, Any] | None:
        """The container running pea ``process_id`` and the pea (Garden's BulkMetrics takes
        a pea's process id as a handle), from the owners' published views; None if none."""
        for container in self._containers.values():
            ref: ContainerRef = container  # type: ignore[assignment]  # the registry holds ContainerRefs
            pea = ref.peas.get(process_id)
            if pea is not None:
                return ref, pea
        return None

    def _find(self, handle: str) -> ContainerRef:
        container = self._containers.get(handle)
        if container is None:
            raise ContainerNotFoundError(handle)
        return container  # type: ignore[return-value]  # the registry holds ContainerRefs

    @contextlib.asynccontextmanager
    async def using(self, handle: str) -> AsyncIterator[ContainerRef]:
        """The container, with its grace timer paused for the duration.

        Pause and release are told, not asked: commands are handled in order, so the
        release never overtakes the pause, and the caller waits for neither (only for
        room in the mailbox). A container destroyed meanwhile answers its own error."""
        container = self._find(handle)
        await self._mailbox.tell(Pause(handle))
        try:
            yield container
        finally:
            if not self._mailbox.tell_nowait(Release(handle)):  # a full mailbox: wait for room
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
                    await self._mailbox.tell(Release(handle))

    async def list(self, properties: Mapping[str, str] | None) -> list[str]:
        handles: list[str] = await self._mailbox.ask(ListHandles(dict(properties or {})))
        return handles

    async def set_grace_time(self, handle: str, seconds: float) -> None:
        await self._mailbox.ask(SetGraceTime(handle, seconds))

    @contextlib.asynccontextmanager
    async def subscribe(self, handle: str | None, recorded_only: bool = False) -> AsyncIterator[EventQueue]:
        """The events of one container (or, None, of every container) from now on, as an
        ``EventQueue`` to iterate; ``recorded_only``: just those ``ContainerInfo.events``
        records (Garden's "Out of memory" and the like). Raises ContainerNotFoundError.

        A one-container subscription ends after the container's ``destroyed``. A
        subscriber that falls ``events.EVENT_QUEUE`` events behind is told how many it missed
        (``missed``), never dropped, and never slows the server. Leaving the context,
        however it is left (the subscriber disconnected, or was cancelled), removes the
        subscription."""
        queue: EventQueue = await self._mailbox.ask(Subscribe(handle, recorded_only))
        try:
            yield queue
        finally:
            await self._hub.unsubscribe(queue)

    async def adopt(self, container: Container) -> None:
        await self._mailbox.ask(Adopted(container))

    async def census(self) -> Census:
        """What the registry holds now (one round trip through its mailbox)."""
        census: Census = await self._mailbox.ask(TakeCensus())
        return census

    def capacity(self, pool_containers: int) -> Capacity:
        with open("/proc/meminfo") as f:
            mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        st = os.statvfs(self.env.depot)
        if self._subnets is not None:
            pool_containers = self._subnets.capacity()
        limit = min(self.max_containers, pool_containers) if self.max_containers else pool_containers
        return Capacity(
            memory_in_bytes=mem_kib * 1024,
            disk_in_bytes=st.f_blocks * st.f_frsize,
            schedulable_disk_in_bytes=st.f_bavail * st.f_frsize,
            max_containers=limit,
        )
