"""The container actor: one per container, owning its cgroup, rootfs mount, depot
directory, shim link and process actors.

One task owns the state (``_serve``: commands from the mailbox, one at a time); long
work (spawning, a stop's grace period, teardown) runs in tasks of the actor's own
nursery, which report back through the same mailbox, so a caller that goes away
cancels only its wait. Creation happens inside ``run`` before ``task_status.started``:
every kernel object is pushed onto one Cleanup stack the moment it exists, so a failure
anywhere unwinds exactly what was made; on success the actor takes ownership
(``pop_all``) and releases it all on destroy.

Lifecycle (the table below is the whole truth; anything else is a bug):

    CREATING --created--> ACTIVE --stop/oom--> STOPPED
    ACTIVE, STOPPED --shim_died--> BROKEN      (the shim is gone: no process can run)
    ACTIVE, STOPPED, BROKEN --destroy--> DESTROYING --destroyed--> DESTROYED
                                         DESTROYING --destroy_failed--> BROKEN (retry)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import trio

from ..errors import ContainerNotFoundError, GardenError, ProcessNotFoundError
from ..kernel import depot, disk_limits, images, rootfs, shim_wire, shims
from ..kernel.cgroups import Cgroup, CgroupDriver
from ..kernel.container_init import MAX_UID
from ..kernel.errors import KernelError
from ..kernel.netmodel import ContainerNet, NetworkError
from ..ops import logs
from ..types import (
    BandwidthLimits,
    ContainerEvent,
    ContainerInfo,
    ContainerSpec,
    CPULimits,
    DiskLimits,
    DiskLimitScope,
    MemoryLimits,
    NetOutRule,
    PortMapping,
    ProcessLimits,
    ProcessSpec,
    from_wire,
    to_wire,
)
from .cleanup import Cleanup
from .events import event
from .mailbox import DEFERRED, ActorGone, Mailbox, Request, acquire
from .network import Networking, check_net_out
from .process import ProcessActor, Subscription
from .shim_link import ShimLink, fetch_netns
from .spawner_client import SpawnerClient

log = logging.getLogger("gactor.container")


class State(enum.Enum):
    CREATING = "creating"
    ACTIVE = "active"
    STOPPED = "stopped"
    BROKEN = "broken"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


class Event(enum.Enum):
    CREATED = enum.auto()
    STOP = enum.auto()  # a Stop call, or an OOM kill
    SHIM_DIED = enum.auto()
    DESTROY = enum.auto()
    DESTROY_FAILED = enum.auto()
    DESTROYED = enum.auto()


_S = State
TRANSITIONS: dict[State, dict[Event, State]] = {
    _S.CREATING: {Event.CREATED: _S.ACTIVE},
    _S.ACTIVE: {Event.STOP: _S.STOPPED, Event.SHIM_DIED: _S.BROKEN, Event.DESTROY: _S.DESTROYING},
    _S.STOPPED: {Event.STOP: _S.STOPPED, Event.SHIM_DIED: _S.BROKEN, Event.DESTROY: _S.DESTROYING},
    _S.BROKEN: {Event.STOP: _S.BROKEN, Event.SHIM_DIED: _S.BROKEN, Event.DESTROY: _S.DESTROYING},
    _S.DESTROYING: {Event.DESTROY_FAILED: _S.BROKEN, Event.DESTROYED: _S.DESTROYED,
                    Event.STOP: _S.DESTROYING, Event.SHIM_DIED: _S.DESTROYING},
    _S.DESTROYED: {},
}

STOP_GRACE = 10.0
OOM_EVENT = "Out of memory"  # Garden's text in ContainerInfo.events
# A pea's own cgroup is "<container's name>%pea<n>": '%' before a non-hex letter never
# comes out of depot.dir_name, so no container has that name.
PEA_CGROUP = "%pea"


def oom_victim_event(pid: int, task: str, process_id: str | None) -> str:
    """The event that follows OOM_EVENT and names who was killed (Garden names no one)."""
    named = f", process id {process_id!r}" if process_id is not None else ""
    return f"{OOM_EVENT}: killed process {pid} ({task}){named}"
SHIM_DIED_EVENT = "container shim exited unexpectedly: its processes are lost"
_LOST_WITH_SHIM = "the shim of container {} died: the exit status is lost"
TAR_PROCESS_PREFIX = "gactor-tar-"  # the process ids of Api.tar's tar (no lifecycle events)
OOM_POLL = 2.0  # seconds between reads of the oom_kill counter when nothing else prompts one
KEEP_EXITED = shim_wire.KEEP_COLLECTED  # exited processes remembered, newest first, as in the shim
DEVICE_ALLOW = ["c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm"]


_remove_tree = depot.remove_tree  # (the field ``depot`` below hides the module)


@dataclass
class Environment:
    """What every container actor shares, read-only: the depot, the cgroup driver, the
    spawner, and how to publish an event (the registry delivers it)."""

    depot: str
    cgroups: CgroupDriver
    spawner: SpawnerClient
    image_store: str
    cpu_quota_per_share: int = 0
    # Percent of a CPU per share, Garden's default: cores * 100 / host memory in MiB.
    entitlement_per_share: float = 0.0
    init_binary: str = ""  # the static garden-init; empty means pid 1 stays a forked Python
    tar_binary: str = "/bin/busybox"  # static, so it runs in any image (as Garden ships its tar)
    allow_privileged: bool = True  # False: --disable-privileged-containers
    publish: Callable[[ContainerEvent], Awaitable[None]] = field(default=lambda event: _nothing())
    # How a container gets its image, ``(handle, source, unprivileged) -> Image``: the
    # registry owns image references (it prepares the image and records the reference).
    acquire_image: Callable[[str, str, bool], Awaitable[images.Image]] = field(
        default=lambda handle, source, shift: _no_images())
    network: Networking | None = None  # None: containers get only a loopback interface
    # Host ports for NetIn, ``(requested or 0) -> port``, and giving one back: registry-owned.
    acquire_port: Callable[[int], Awaitable[int]] = field(default=lambda port: _no_ports())
    release_port: Callable[[int], Awaitable[None]] = field(default=lambda port: _nothing())
    # Dropping an image reference taken with acquire_image (a pea's, when it has finished).
    release_image: Callable[[str], Awaitable[None]] = field(default=lambda key: _nothing())
    # How a container directory goes (synchronous): the server's depot.Janitor moves it
    # aside and removes it in the background.
    discard: Callable[[str], None] = _remove_tree


async def _nothing() -> None:
    return None


async def _no_images() -> images.Image:
    raise GardenError("no image store")


async def _no_ports() -> int:
    raise GardenError("this server has no container networking")


# ---- commands --------------------------------------------------------------------------

@dataclass(frozen=True)
class GetInfo:
    pass


@dataclass(frozen=True)
class CheckOom:
    pass


@dataclass(frozen=True)
class OomKilled:
    """The kernel log named a victim of an OOM kill in this container (host pid)."""

    pid: int
    task: str


@dataclass(frozen=True)
class SetProperty:
    name: str
    value: str


@dataclass(frozen=True)
class RemoveProperty:
    name: str


@dataclass(frozen=True)
class SetGraceTime:
    seconds: float


@dataclass(frozen=True)
class LimitMemory:
    limits: MemoryLimits


@dataclass(frozen=True)
class LimitCpu:
    limits: CPULimits


@dataclass(frozen=True)
class NetIn:
    host_port: int
    container_port: int


@dataclass(frozen=True)
class NetOut:
    rules: tuple[NetOutRule, ...]


@dataclass(frozen=True)
class LimitBandwidth:
    limits: BandwidthLimits


@dataclass(frozen=True)
class Run:
    spec: ProcessSpec
    process_id: str
    subscriber: Subscription | None
    host_exe: str
    dir_must_exist: bool
    builtin: str = ""


@dataclass(frozen=True)
class FindProcess:
    process_id: str


@dataclass(frozen=True)
class Stop:
    kill: bool


@dataclass(frozen=True)
class Destroy:
    pass


# Reports from the actor's own tasks.
@dataclass(frozen=True)
class _Spawned:
    reply_to: Request[ProcessActor]
    process: ProcessActor
    pea: Pea | None = None


@dataclass(frozen=True)
class _PeaDone:
    process_id: str


@dataclass(frozen=True)
class Pea:
    """A process with its own image (Garden's "pea"): its overlay root and image reference."""

    key: str  # the registry's image reference
    dir: str  # <container>/peas/<n>: upper, work (the overlay is in the pea's mount namespace only)
    cgroup: Cgroup | None = None  # with override_container_limits: its own, else the container's
    config: images.ImageConfig = field(default_factory=lambda: images.ImageConfig())  # its image's Env, User, WorkingDir


@dataclass(frozen=True)
class _ProcessExited:
    process_id: str
    code: int


@dataclass(frozen=True)
class _ShimDied:
    pass


@dataclass(frozen=True)
class _PortMapped:
    reply_to: Request[tuple[int, int]]
    mapping: tuple[int, int]


@dataclass(frozen=True)
class _TornDown:
    reply_to: Request[None]
    error: BaseException | None


class ContainerActor:
    """Holds the state; only its own task reads or changes the mutable part. The
    registry and the front ends use it through ``ContainerRef``."""

    def __init__(self, env: Environment, spec: ContainerSpec, rootfs_path: str, name: str = "",
                 net: ContainerNet | None = None) -> None:
        self.env = env
        self.spec = spec
        self.handle = spec.handle
        self.name = name or depot.dir_name(spec.handle)  # of its depot directory and cgroup
        self.dir = os.path.join(env.depot, depot.CONTAINERS, self.name)
        self.rootfs_source = rootfs_path
        self.image_copy = ""  # the overlay's lower dir: an immutable copy in env.image_store
        self.properties = dict(spec.properties)
        self.net = net
        self._netns_fd = -1
        if net is not None:
            self.properties.update(self._network_properties())
        self.grace_time = spec.grace_time
        self.state = State.CREATING
        self._record_state = State.ACTIVE  # what the depot record says (restored containers)
        self.events: list[str] = []
        self.created_at = time.time()
        self.processes: dict[str, ProcessActor] = {}
        self._early_exits: dict[str, int] = {}
        self._exit_order: dict[str, None] = {}  # process ids in the order they exited
        self._peas: dict[str, Pea] = {}  # by process id, until the process is done
        self._pea_seq = 0
        self._link: ShimLink | None = None
        self._cgroup: Cgroup | None = None
        self._shim_fd = -1
        self._owned = Cleanup()
        self._init_pid = 0
        self._rootfs_tree = -1  # the detached overlay, from _prepare until pid 1 has it
        self._shim_gone = False  # its death taken in (_shim_died): processes started since are lost too
        self.image_bytes = self.image_inodes = 0
        self.image_config = images.ImageConfig()  # Env, User, WorkingDir defaults for processes
        self._oom_seen = 0
        self._oom_fd = -1  # opened during a create, until the OOM watcher takes it
        self._stop_lock = trio.Lock()  # a Run waits for a stop in progress, or the stop would kill it
        self._save_lock = trio.Lock()
        self.mailbox = Mailbox(f"container {self.handle}", gone=self._gone)
        self._nursery: trio.Nursery | None = None
        # Exits as the shim link reports them (synchronously) go straight to the mailbox;
        # when it is full, to this overflow, which a task forwards: one entry per process
        # that ended, so bounded by the processes started.
        self._exits = trio.open_memory_channel[tuple[str, int]](math.inf)
        self.ref = ContainerRef(self)

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def restore(cls, env: Environment, name: str) -> ContainerActor:
        """A container from its depot record (directory ``name``), to be re-adopted
        with ``run(adopt=True)``."""
        record = depot.read_json(os.path.join(env.depot, depot.CONTAINERS, name, "container.json"))
        spec = from_wire(ContainerSpec, record["spec"])
        spec.handle = record.get("handle", spec.handle or name)
        net = ContainerNet.from_record(spec.handle, record["net"]) if record.get("net") else None
        actor = cls(env, spec, record["rootfs"], name, net)
        # Records older than image copies have none: their overlay's lower dir is protected
        # from collection by being mounted (image_copies.collect).
        actor.image_copy = record.get("image_copy", "")
        actor.properties = dict(record["properties"])
        actor.grace_time = float(record["grace_time"])
        actor._record_state = State(record["state"])
        actor.events = list(record["events"])
        actor.created_at = float(record["created_at"])
        return actor

    def _transition(self, event: Event) -> None:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise GardenError(f"container {self.handle} is {self.state.value}: cannot {event.name.lower()}") from None
        self.ref._publish()

    async def run(self, *, adopt: bool = False,
                  task_status: trio.TaskStatus[ContainerRef] = trio.TASK_STATUS_IGNORED) -> None:
        """Create (or re-adopt) the container and serve it until destroyed.

        Raises GardenError if creation fails, after undoing every step taken (in a
        worker thread, shielded: a cancelled create still rolls back completely).
        """
        logs.tag_task(handle=self.handle)  # this task is the actor's alone
        undo = Cleanup()
        try:
            if adopt:
                await self._reconnect(undo)
            else:
                await self._create(undo)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(undo.__exit__, type(err), err, None)
            if isinstance(err, (OSError, ValueError, KeyError, KernelError)):
                raise GardenError(f"creating container {self.handle}: {err}") from err
            raise
        self._owned = undo.pop_all()
        assert self._link is not None
        # Opened before the create is answered (a create opens it while the shim starts):
        # a container comes back with every fd of its own already open (a watcher opening
        # it later raced the caller's view).
        if adopt:
            self._oom_fd = await trio.to_thread.run_sync(self._open_oom_fd)
        oom_fd, self._oom_fd = self._oom_fd, -1  # the watcher's from here on: it closes it
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._link.run)
                nursery.start_soon(self._forward_exits, self._exits[1])
                nursery.start_soon(self._watch_shim)
                nursery.start_soon(self._watch_oom, oom_fd)
                if adopt:
                    await self._adopt_processes()
                self._transition(Event.CREATED)
                if adopt and self._record_state is State.STOPPED:
                    self._transition(Event.STOP)
                task_status.started(self.ref)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self.mailbox.close()

    async def _serve(self) -> None:
        """The owning loop: until destroyed, one command at a time."""
        await self.mailbox.serve(self._handle, until=lambda: self.state is State.DESTROYED)

    async def _handle(self, request: Request[Any]) -> Any:  # noqa: C901 - one case per command
        match request.command:
            case GetInfo():
                await self._check_oom()  # an OOM the kernel did not announce still shows
                return self._info()
            case CheckOom():
                await self._check_oom()
            case OomKilled(pid, task):
                await self._check_oom()  # Garden's "Out of memory" first, if not recorded yet
                process_id = self._process_id_of(pid)
                await self._record_event(oom_victim_event(pid, task, process_id), "oom_victim", pid=pid, task=task,
                                         process_id=process_id or "")
            case SetProperty(name, value):
                self.properties[name] = value
                self.ref._publish()
                await self._save()
            case RemoveProperty(name):
                self.properties.pop(name, None)
                self.ref._publish()
                await self._save()
            case SetGraceTime(seconds):
                self.grace_time = seconds
                await self._save()
            case LimitMemory(limits):
                await self._limit_memory(limits)
            case LimitCpu(limits):
                await self._limit_cpu(limits)
            case NetIn(host_port, container_port):
                self._networked()
                # In a task: the port comes from the registry, which may itself be
                # waiting for this actor (a grace time being saved).
                self._spawn(self._map_port, host_port, container_port, request)
                return DEFERRED
            case _PortMapped(reply_to, mapping):
                self._add_mapping(mapping)
                await self._save()
                reply_to.reply(mapping)
            case NetOut(rules):
                await self._net_out(rules)
            case LimitBandwidth(limits):
                await self._limit_bandwidth(limits)
            case Run() as run:
                self._check_run(run)
                self._spawn(self._spawn_process, run, request)
                return DEFERRED
            case _Spawned(reply_to, process, pea):
                if pea is not None:
                    self._peas[process.id] = pea
                    self.ref._publish()
                early_exit = self._early_exits.get(process.id)
                try:
                    reply_to.reply(await self._add_process(process))
                except BaseException as err:
                    reply_to.fail(err)
                    raise
                await self._announce_process("process_started", process, pid=process.pid)
                if early_exit is not None:
                    await self._announce_process("process_exited", process, exit_status=early_exit)
                elif self._shim_gone:
                    # Started just before the shim died, whose death this actor took in
                    # first: lost like every other process of the container.
                    await process.lost(_LOST_WITH_SHIM.format(self.handle))
            case _PeaDone(process_id):
                if (pea := self._peas.pop(process_id, None)) is not None:
                    self.ref._publish()
                    self._spawn(self._drop_pea, pea)
            case FindProcess(process_id):
                return self._process(process_id)
            case Stop(kill):
                was = self.state
                self._transition(Event.STOP)
                await self._save()
                if self.state is not was:
                    await self._announce("stopped", reason="stop")
                self._spawn(self._stop, kill, request)
                return DEFERRED
            case Destroy():
                self._transition(Event.DESTROY)
                self._spawn(self._teardown, request)
                return DEFERRED
            case _TornDown(reply_to, error):
                if error is None:
                    self._transition(Event.DESTROYED)
                    reply_to.reply(None)
                else:
                    self._transition(Event.DESTROY_FAILED)
                    await self._announce("broken", reason="destroy_failed")
                    reply_to.fail(GardenError(f"destroying {self.handle}: {error}"))
            case _ProcessExited(process_id, code):
                self._exit_order[process_id] = None
                proc = self.processes.get(process_id)
                if proc is None:
                    self._early_exits[process_id] = code  # announced once it is added
                else:
                    await proc.exited(code)
                    await self._announce_process("process_exited", proc, exit_status=code)
                await self._check_oom()  # an OOM kill of this process or of one of its children?
            case _ShimDied():
                await self._shim_died()
            case command:
                raise GardenError(f"unknown command {command!r}")
        return None

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _create(self, undo: Cleanup) -> None:
        started = trio.current_time()
        source_image = await self._image()
        image = trio.current_time()
        cfg = await trio.to_thread.run_sync(self._prepare, source_image, undo)
        prepared = trio.current_time()
        net, network = self.net, self.env.network
        netns = trio.Event()

        def got_netns(fd: int) -> None:
            self._netns_fd = fd
            undo.callback(os.close, fd)
            netns.set()

        async def prepare_and_attach() -> None:
            # The host side first (it needs no namespace), then the veth as soon as the
            # container's network namespace exists, while its pid 1 builds its root.
            assert net is not None
            assert network is not None
            await network.prepare(net)
            await netns.wait()
            await self._attach_network(undo, release=False)

        try:
            async with trio.open_nursery() as nursery:
                # The depot record, durably (an fsync: milliseconds), while the shim starts;
                # written before the create returns. A crash before that leaves a directory
                # without a record, which the next start removes (remove_orphan) as it removes
                # any half-made container.
                nursery.start_soon(trio.to_thread.run_sync, depot.write_json,
                                   os.path.join(self.dir, "container.json"), self._record())
                # The OOM notification fd too (its cgroup exists): off the create's path.
                nursery.start_soon(self._open_oom_fd_during_create, undo)
                if net is not None:
                    nursery.start_soon(prepare_and_attach)
                await self._start_shim(cfg, undo, got_netns if net is not None else None)
                if net is not None and not netns.is_set():  # a shim that did not send it: ask it
                    await self._open_netns(undo)
                    netns.set()
        except BaseException as exc:
            if net is not None and network is not None:
                with trio.CancelScope(shield=True):
                    await network.release(net)
            # One failure (the shim's "bind mount source ... does not exist", say) reaches
            # the caller as itself, not as a group the API would call an internal error.
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1 \
                    and isinstance(exc.exceptions[0], Exception):
                raise exc.exceptions[0] from None
            raise
        networked = trio.current_time()
        log.debug("container %s created in %.1f ms (image %.1f, depot+cgroup+mount %.1f, shim+init+network %.1f, "
                  "rest %.1f)", self.handle,
                  *((t * 1000) for t in (trio.current_time() - started, image - started, prepared - image,
                                         networked - prepared, trio.current_time() - networked)))

    def _open_oom_fd(self) -> int:
        """The cgroup's OOM notification fd (``Cgroup.oom_events_fd``), or -1 without one
        (logged): the watcher then polls; then the OOM kill count as of now, which the
        watcher's checks compare with (read after the fd exists, so no kill falls between).
        In a worker thread: a cgroup file read, off the event loop."""
        try:
            fd = self.cgroup.oom_events_fd()
        except KernelError as err:
            log.warning("container %s: no OOM notifications: %s", self.handle, err)
            fd = -1
        with contextlib.suppress(KernelError):  # the cgroup is going: so is the container
            self._oom_seen = self.cgroup.oom_kill_count()
        return fd

    async def _open_oom_fd_during_create(self, undo: Cleanup) -> None:
        # Not abandoned on cancellation: the fd is stored (and so closed by ``undo`` if the
        # create fails) before the cancellation is delivered.
        self._oom_fd = await trio.to_thread.run_sync(self._open_oom_fd)
        undo.callback(self._close_unwatched_oom_fd)

    def _close_unwatched_oom_fd(self) -> None:
        """A failed create's rollback closes the fd; once the watcher took it, nothing."""
        if self._oom_fd >= 0:
            os.close(self._oom_fd)
            self._oom_fd = -1

    async def _start_shim(self, cfg: dict[str, Any], undo: Cleanup,
                          on_netns: Callable[[int], None] | None = None) -> None:
        try:
            status = await self.env.spawner.start_shim(cfg, on_netns, self._rootfs_tree)
        finally:
            self._close_rootfs_tree()  # pid 1 holds the overlay now (or the create failed)
        self._init_pid = int(status["init"])
        self._own_shim(int(status["shim"]), undo)
        self._link = await ShimLink.connect(self.handle, self.dir, self._on_exit)

    def _close_rootfs_tree(self) -> None:
        if self._rootfs_tree >= 0:
            os.close(self._rootfs_tree)
            self._rootfs_tree = -1

    async def _open_netns(self, undo: Cleanup) -> None:
        self._netns_fd = await trio.to_thread.run_sync(fetch_netns, self.handle, self.dir)
        undo.callback(os.close, self._netns_fd)

    async def _attach_network(self, undo: Cleanup, release: bool = True) -> None:
        """The veth (the firewall state is in place, and ``_netns_fd`` open), then the spec's
        bandwidth, NetIn and NetOut. Any failure (or cancellation) removes the network
        again before it propagates (``release``; else the caller does); the registry gives
        the address and ports back once the create has failed."""
        net, network = self.net, self.env.network
        assert net is not None
        assert network is not None
        try:
            await network.attach(net, self._netns_fd)
            bandwidth = self.spec.limits.bandwidth
            if bandwidth.rate_in_bytes_per_second:
                await self._limit_bandwidth(bandwidth, save=False)
            for wanted in self.spec.net_in:
                self._add_mapping(await self._apply_port_mapping(wanted.host_port, wanted.container_port))
            if self.spec.net_out:
                await self._net_out(tuple(self.spec.net_out), save=False)
        except BaseException:
            if release:
                with trio.CancelScope(shield=True):
                    await network.release(net)
            raise

    def _own_shim(self, pid: int, undo: Cleanup) -> None:
        # A pidfd, not the pid: the shim's pid may be reused once it has exited.
        self._shim_fd = os.pidfd_open(pid)
        undo.callback(os.close, self._shim_fd)
        undo.callback(_kill_quietly, self._shim_fd)

    async def _reconnect(self, undo: Cleanup) -> None:
        """Take over a container a previous server process created."""
        undo.callback(self.env.discard, self.dir)
        self._cgroup = self.env.cgroups.open(self.name)
        undo.callback(self._destroy_cgroup, self._cgroup)
        undo.callback(rootfs.unmount, os.path.join(self.dir, "rootfs"))
        undo.callback(_unmount_peas, self.dir)
        self._link = await ShimLink.connect(self.handle, self.dir, self._on_exit)
        # The shim's pid from the socket it listens on, never from shim.pid: after a crash
        # or a reboot that file may name an unrelated process.
        self._own_shim(self._link.peer_pid(), undo)
        if self.net is not None:
            await self._open_netns(undo)
        if self.image_copy:
            with contextlib.suppress(KernelError, OSError):
                copy = await trio.to_thread.run_sync(images.read, self.image_copy)
                self.image_bytes, self.image_inodes = copy.bytes, copy.inodes
                self.image_config = copy.config

    async def _adopt_processes(self) -> None:
        assert self._link is not None
        self._init_pid, entries = await self._link.list_processes()
        for entry in entries:
            try:
                found = await self._link.attach(entry["id"])
            except ProcessNotFoundError:
                continue  # collected and forgotten since the listing (bounded history)
            if found.exit is not None:
                self._exit_order[entry["id"]] = None
            await self._add_process(self._process_actor(
                entry["id"], found.pid, found.tty, found.fds, found.exit, found.stdin_open))

    async def _image(self) -> images.Image:
        """The overlay's lower dirs: the image's layers, or a copy of a rootfs directory as
        it is now, which never change, so no container sees later changes to its source.
        The registry holds this container's reference to it from here on and releases it
        when the container is destroyed or its creation fails."""
        copy = await self.env.acquire_image(self.handle, self.rootfs_source, not self.spec.privileged)
        self.image_copy = copy.path
        self.image_bytes, self.image_inodes = copy.bytes, copy.inodes
        self.image_config = copy.config
        return copy

    def _prepare(self, image: images.Image, undo: Cleanup) -> dict[str, Any]:
        """Depot dir, cgroup with limits, rootfs overlay, hosts file (in a worker thread);
        the depot record comes in ``_create``, while the shim starts."""
        os.makedirs(os.path.dirname(self.dir), mode=0o711, exist_ok=True)
        os.mkdir(self.dir, 0o711)
        undo.callback(self.env.discard, self.dir)
        cgroup = self.env.cgroups.create(self.name)
        undo.callback(self._destroy_cgroup, cgroup)
        self._cgroup = cgroup
        cgroup.setup_devices(DEVICE_ALLOW)
        self._apply_limits(cgroup)
        limited = self._disk_limit(image) if self.spec.limits.disk.byte_hard else None
        if limited:
            undo.callback(disk_limits.detach, limited)
        self._rootfs_tree = rootfs.overlay_tree(
            image.layers, self.dir, self.spec.privileged, idmapped=not image.shifted,
            scratch=os.path.join(self.env.image_store, rootfs.MOUNT_POINTS), upper_root=limited or "")
        undo.callback(self._close_rootfs_tree)
        undo.callback(_unmount_peas, self.dir)
        if limited:
            disk_limits.detach(limited)  # the overlay holds it: it lives as long as the rootfs
        resolv = ""
        if self.net is not None and self.env.network is not None:
            owner = 0 if self.spec.privileged else MAX_UID  # the container's root
            hosts, resolv = self.env.network.write_dns_files(self.dir, self.hostname, self.net, owner)
        else:
            hosts = os.path.join(self.dir, "hosts")
            with open(hosts, "w") as f:
                f.write(f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 {self.hostname}\n")
        return {
            "dir": self.dir,
            "rootfs": os.path.join(self.dir, "rootfs"),  # where pid 1 attaches the tree
            "hostname": self.hostname,
            "privileged": self.spec.privileged,
            "cgroup_procs": list(cgroup.procs_files),
            "hosts_file": hosts,
            "resolv.conf_file": resolv,
            "init_binary": self.env.init_binary,
            "bind_mounts": [
                {"src": bm.src_path, "dst": bm.dst_path, "ro": bm.mode == 0, "from_container": bm.origin == 1}
                for bm in self.spec.bind_mounts
            ],
        }

    def _disk_limit(self, image: images.Image) -> str:
        """The limited file system for the upper dir (docs/images.md): the limit itself
        (exclusive scope) or what the image leaves of it (total scope)."""
        disk = self.spec.limits.disk
        size = disk.byte_hard - (image.bytes if disk.scope == DiskLimitScope.TOTAL else 0)
        if size <= 0:
            raise GardenError(f"disk limit of {disk.byte_hard} bytes (total scope) is not above the image's "
                              f"{image.bytes} bytes")
        try:
            return disk_limits.create(self.dir, size, disk.inode_hard)
        except KernelError as err:
            raise GardenError(f"cannot apply the disk limit: {err}") from err

    def _apply_limits(self, cgroup: Cgroup) -> None:
        limits = self.spec.limits
        if limits.memory.limit_in_bytes:
            cgroup.set_memory_limit(limits.memory.limit_in_bytes)
        self._apply_cpu_limits(cgroup, limits.cpu)
        if limits.pid.max:
            cgroup.set_pids_max(limits.pid.max)

    def _apply_cpu_limits(self, cgroup: Cgroup, limits: CPULimits) -> None:
        """Weight wins over limit_in_shares; with --cpu-quota-per-share also a hard cap."""
        shares = limits.weight or limits.limit_in_shares
        if shares:
            cgroup.set_cpu_shares(shares)
            if self.env.cpu_quota_per_share:
                cgroup.set_cpu_quota(max(1000, shares * self.env.cpu_quota_per_share))

    async def _limit_memory(self, limits: MemoryLimits) -> None:
        try:
            await trio.to_thread.run_sync(self.cgroup.set_memory_limit, limits.limit_in_bytes)
        except KernelError as err:
            raise GardenError(f"cannot set a memory limit of {limits.limit_in_bytes} bytes: "
                              f"{os.strerror(err.errno) if err.errno else err} (is usage above it?)") from err
        self.spec.limits.memory = limits
        await self._save()

    async def _limit_cpu(self, limits: CPULimits) -> None:
        try:
            await trio.to_thread.run_sync(self._apply_cpu_limits, self.cgroup, limits)
        except KernelError as err:
            raise GardenError(f"cannot set cpu limits {limits}: {err}") from err
        self.spec.limits.cpu = limits
        self.ref._publish()  # current_cpu_limits reads the published snapshot
        await self._save()

    # ---- network -------------------------------------------------------------------------

    def _network_properties(self) -> dict[str, str]:
        """Garden's ``garden.network.*`` properties (system properties, listed with the user's)."""
        net, network = self.net, self.env.network
        assert net is not None
        mapped = [{"HostPort": h, "ContainerPort": c} for h, c in net.net_in]
        return {
            "garden.network.container-ip": str(net.alloc.container_ip),
            "garden.network.host-ip": str(net.alloc.gateway_ip),
            "garden.network.external-ip": network.config.external_ip if network is not None else "",
            "garden.network.mapped-ports": json.dumps(mapped, separators=(",", ":")),
        }

    def _networked(self) -> tuple[ContainerNet, Networking]:
        if self.net is None or self.env.network is None:
            raise GardenError(f"container {self.handle} has no network")
        if self.state not in (State.CREATING, State.ACTIVE, State.STOPPED):
            raise GardenError(f"container {self.handle} is {self.state.value}")
        return self.net, self.env.network

    async def _apply_port_mapping(self, host_port: int, container_port: int) -> tuple[int, int]:
        """Garden's NetIn: host port 0 takes the next port of the pool; container port 0
        means the host port. The port goes back to the pool if the rule cannot be made."""
        net, network = self._networked()
        port = await self.env.acquire_port(host_port)
        mapping = (port, container_port or port)
        try:
            await network.add_net_in(net, *mapping)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await self.env.release_port(port)
            if isinstance(err, NetworkError):
                raise GardenError(f"net in {port}:{mapping[1]}: {err}") from err
            raise
        return mapping

    async def _map_port(self, host_port: int, container_port: int, request: Request[tuple[int, int]]) -> None:
        try:
            mapping = await self._apply_port_mapping(host_port, container_port)
        except GardenError as err:
            request.fail(err)
            return
        if not await self.mailbox.tell(_PortMapped(request, mapping)):
            request.fail(GardenError(f"container {self.handle} was destroyed while mapping the port"))

    def _add_mapping(self, mapping: tuple[int, int]) -> None:
        assert self.net is not None
        self.net.net_in.append(mapping)
        self.properties.update(self._network_properties())
        self.ref._publish()

    async def _net_out(self, rules: tuple[NetOutRule, ...], save: bool = True) -> None:
        net, network = self._networked()
        wire_rules = [to_wire(rule) for rule in rules]
        for rule in wire_rules:
            check_net_out(rule)
        try:
            await network.add_net_out(net, wire_rules)
        except NetworkError as err:
            raise GardenError(f"net out: {err}") from err
        net.net_out.extend(wire_rules)
        if save:
            await self._save()

    async def _limit_bandwidth(self, limits: BandwidthLimits, save: bool = True) -> None:
        net, network = self._networked()
        rate, burst = limits.rate_in_bytes_per_second, limits.burst_rate_in_bytes_per_second
        try:
            await network.set_bandwidth(net, self._netns_fd, rate, burst)
        except NetworkError as err:
            raise GardenError(f"cannot limit bandwidth to {rate} bytes/s (burst {burst}): {err}") from err
        net.bandwidth = (rate, burst)
        self.ref._publish()
        if save:
            await self._save()

    @property
    def hostname(self) -> str:
        return self.handle[-49:]

    @staticmethod
    def _destroy_cgroup(cgroup: Cgroup) -> None:
        cgroup.kill_all()
        cgroup.destroy()

    def _record(self) -> dict[str, Any]:
        """The depot record: a snapshot, so it can be written from another thread."""
        state = self.state if self.state in (State.STOPPED, State.BROKEN) else State.ACTIVE
        return {
            "handle": self.handle,
            "spec": to_wire(self.spec),
            "rootfs": self.rootfs_source,
            "image_copy": self.image_copy,
            "properties": dict(self.properties),
            "grace_time": self.grace_time,
            "state": state.value,
            "events": list(self.events),
            "created_at": self.created_at,
            "net": self.net.to_record() if self.net is not None else None,
        }

    async def _save(self) -> None:
        """Persist the state as it is now (atomically, durably) without blocking the event
        loop on fsync; saves of one container never interleave."""
        record = self._record()
        async with self._save_lock:
            await trio.to_thread.run_sync(depot.write_json, os.path.join(self.dir, "container.json"), record)

    # ---- destroy -----------------------------------------------------------------------

    async def _teardown(self, request: Request[None]) -> None:
        """Kill everything and remove every trace (retryable, shielded: a shutdown of the
        server never leaves a destroy half-done); reports ``_TornDown``."""
        error: BaseException | None = None
        with trio.CancelScope(shield=True):
            try:
                if self._link is not None and not self._link.closed.is_set():
                    try:
                        with trio.move_on_after(10):
                            await self._link.request("destroy")
                    except GardenError:
                        pass  # the shim is already gone; the cgroup kill below still ends everything
                for proc in list(self.processes.values()):
                    await proc.exited(137)
                with trio.move_on_after(5):
                    for proc in list(self.processes.values()):
                        await proc.done.wait()
                peas, self._peas = list(self._peas.values()), {}
                self.ref._publish()
                for pea in peas:
                    await self._drop_pea(pea)
                # Trio must forget an fd before it is closed, or a new fd given the same
                # number (another container's pipe) would confuse its epoll registrations.
                if self._shim_fd >= 0:
                    trio.lowlevel.notify_closing(self._shim_fd)
                    self._shim_fd = -1  # closed by the Cleanup stack below
                await trio.to_thread.run_sync(self._owned.close)
            except (OSError, KernelError) as err:
                error = err
            await self.mailbox.tell(_TornDown(request, error))

    # ---- the shim ----------------------------------------------------------------------

    async def _watch_shim(self) -> None:
        """The shim's pidfd turns readable when it exits: tell the owner. Ends quietly
        when teardown is about to close the pidfd (``notify_closing``)."""
        try:
            await trio.lowlevel.wait_readable(self._shim_fd)
        except trio.ClosedResourceError:
            return
        await self.mailbox.tell(_ShimDied())

    async def _shim_died(self) -> None:
        if self.state is State.DESTROYING:
            return  # we killed it
        log.error("container %s: its shim died; its processes are lost (destroy it)", self.handle)
        self._shim_gone = True
        self._transition(Event.SHIM_DIED)
        for proc in self.processes.values():
            if proc.running:
                await proc.lost(_LOST_WITH_SHIM.format(self.handle))
        await self._record_event(SHIM_DIED_EVENT, "broken", reason="shim_died")

    def _on_exit(self, process_id: str, code: int) -> None:
        if not self.mailbox.tell_nowait(_ProcessExited(process_id, code)):
            _forward_exit(self._exits[0], process_id, code)

    async def _forward_exits(self, exits: trio.MemoryReceiveChannel[tuple[str, int]]) -> None:
        async for process_id, code in exits:
            await self.mailbox.tell(_ProcessExited(process_id, code))

    # ---- events ------------------------------------------------------------------------

    async def _watch_oom(self, fd: int) -> None:
        """Prompt an OOM check when the kernel says so (``fd``: the v1 eventfd or v2
        inotify, -1 for none; closed here) and every OOM_POLL seconds: the notification
        does not fire for every OOM path (a tmpfs write charged in a syscall, for one).
        Exits prompt a check too."""
        try:
            while True:
                with trio.move_on_after(OOM_POLL):
                    if fd >= 0:
                        await trio.lowlevel.wait_readable(fd)
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 4096)  # drain the eventfd / inotify records
                    else:
                        await trio.sleep_forever()
                await self.mailbox.tell(CheckOom())
        finally:
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)

    def _gone(self) -> BaseException:
        """What a caller is told once this actor has ended: a caller that looked the
        container up just before its destroy finished gets Garden's answer for a handle
        that is not there, not that an actor is gone (ServiceUnavailableError)."""
        if self.state is State.DESTROYED:
            return ContainerNotFoundError(self.handle)
        return ActorGone(self.mailbox.owner)

    async def _check_oom(self) -> None:
        """Record an OOM kill the counter shows and we have not seen yet; then stop."""
        if self.state not in (State.ACTIVE, State.STOPPED):
            return
        try:
            count = self.cgroup.oom_kill_count()
        except KernelError:
            return
        if count <= self._oom_seen:
            return
        self._oom_seen = count
        was = self.state
        self._transition(Event.STOP)  # now, not when the kill sweep below gets going
        await self._record_event(OOM_EVENT, "oom")
        if self.state is not was:
            await self._announce("stopped", reason="oom")
        self._spawn(self._stop, True)

    async def _record_event(self, text: str, kind: str, **fields: Any) -> None:
        """Persist the event (``ContainerInfo.events``), then publish it as a ``kind``
        event, which the registry's event hub delivers to subscribers."""
        self.events.append(text)
        await self._save()
        await self.env.publish(event(kind, self.handle, text, **fields))

    async def _announce(self, kind: str, words: str = "", **fields: Any) -> None:
        """Publish a lifecycle event that is not recorded (a state change, a process)."""
        await self.env.publish(event(kind, self.handle, words, **fields))

    async def _announce_process(self, kind: str, proc: ProcessActor, **fields: Any) -> None:
        # The tar behind stream_in/stream_out (``Api.tar``) is the server's, not a client's.
        if proc.id.startswith(TAR_PROCESS_PREFIX):
            return
        if kind == "process_started":
            words = f"process {proc.id} started (pid {proc.pid})"
        else:
            words = f"process {proc.id} exited with status {fields['exit_status']}"
        await self._announce(kind, words, process_id=proc.id, **fields)

    # ---- processes ---------------------------------------------------------------------

    def _check_run(self, run: Run) -> None:
        spec = run.spec
        if self.state not in (State.ACTIVE, State.STOPPED):
            raise GardenError(f"cannot run a process in container {self.handle}: it is {self.state.value}")
        if run.process_id in self.processes:
            raise GardenError(f"process ID '{run.process_id}' already in use")
        if not spec.path:
            raise GardenError("invalid process spec: path must not be empty")
        if spec.bind_mounts and not spec.image.uri:
            raise GardenError("Running a process with bind mounts and no image provided is not allowed")

    async def _spawn_process(self, run: Run, request: Request[ProcessActor]) -> None:
        """Ask the shim for the process (after any stop in progress), then hand it to the
        owner (``_Spawned``), which registers it and replies. If this task is cancelled
        (server shutdown) after the shim spawned it, the process runs on in the shim and
        is re-adopted at the next start."""
        assert self._link is not None
        spec = run.spec
        limits = {k: v for k, v in to_wire(spec.limits).items() if v is not None}
        tty = None
        if spec.tty is not None:
            ws = spec.tty.window_size
            tty = {"columns": ws.columns if ws else 0, "rows": ws.rows if ws else 0}
        wire_spec = {
            "path": spec.path, "args": spec.args, "env": spec.env, "dir": spec.dir or self.image_config.working_dir,
            "user": spec.user or self.image_config.user, "rlimits": limits,
            "image_env": list(self.image_config.env), "container_env": self.spec.env,
            "host_exe": run.host_exe, "dir_must_exist": run.dir_must_exist, "builtin": run.builtin,
        }
        pea, pea_tree = None, -1
        if spec.image.uri:
            try:
                pea, pea_tree = await self._prepare_pea(run.process_id, spec.image.uri.removeprefix("raw://"),
                                              spec.override_container_limits)
            except GardenError as err:
                request.fail(err)
                return
            wire_spec["pea_rootfs"] = os.path.join(pea.dir, "rootfs")  # the tree rides on the request
            wire_spec["pea_binds"] = [{"src": bm.src_path, "dst": bm.dst_path, "ro": bm.mode == 0,
                                       "from_container": bm.origin == 1} for bm in spec.bind_mounts]
            # Its own image's config, not the container's; Garden's peas start in "/".
            wire_spec["dir"] = spec.dir or pea.config.working_dir or "/"
            wire_spec["user"] = spec.user or pea.config.user
            wire_spec["image_env"] = list(pea.config.env)
            if pea.cgroup is not None:
                wire_spec["cgroup_procs"] = list(pea.cgroup.procs_files)
        try:
            await acquire(self._stop_lock)
            try:
                reply, fds = await self._link.request("spawn", id=run.process_id, spec=wire_spec, tty=tty,
                                                      send_fds=[pea_tree] if pea_tree >= 0 else ())
            finally:
                self._stop_lock.release()
        except BaseException as err:
            if pea is not None:
                with trio.CancelScope(shield=True):
                    await self._drop_pea(pea)
            if not isinstance(err, GardenError):
                raise
            request.fail(err)
            return
        finally:
            if pea_tree >= 0:
                os.close(pea_tree)  # the pea's mount namespace holds it (or the spawn failed)
        proc = self._process_actor(run.process_id, int(reply["pid"]), tty is not None, fds,
                                   subscriber=run.subscriber)
        if not await self.mailbox.tell(_Spawned(request, proc, pea)):  # the owner ended meanwhile
            request.fail(GardenError(f"container {self.handle} was destroyed while the process started"))

    async def _prepare_pea(self, process_id: str, source: str, limits: ProcessLimits | None) -> tuple[Pea, int]:
        """The pea's image (a registry reference, as for a container) and an overlay over
        it with its upper dir in ``<container>/peas/<n>``, as a detached mount (the fd, the
        caller's to close), which the pea attaches in its own mount namespace; with ``limits`` (Garden's OverrideContainerLimits,
        even empty) a cgroup of its own, a sibling of the container's, with just those
        limits. On failure nothing is left."""
        self._pea_seq += 1
        while os.path.lexists(os.path.join(self.dir, "peas", str(self._pea_seq))):
            self._pea_seq += 1  # a pea from before a restart still has it
        n = self._pea_seq
        pea = Pea(f"{self.handle}\0pea\0{process_id}", os.path.join(self.dir, "peas", str(n)))
        try:
            if limits is not None:
                pea = dataclasses.replace(pea, cgroup=await trio.to_thread.run_sync(self._pea_cgroup, n, limits))
            image = await self.env.acquire_image(pea.key, source, not self.spec.privileged)
            tree = await trio.to_thread.run_sync(self._mount_pea, pea, image)
            pea = dataclasses.replace(pea, config=image.config)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await self._drop_pea(pea)
            if isinstance(err, (OSError, KernelError)):
                raise GardenError(f"process {process_id}: preparing its image {source!r}: {err}") from err
            raise
        return pea, tree

    def _pea_cgroup(self, n: int, limits: ProcessLimits) -> Cgroup:
        cgroup = self.env.cgroups.create(f"{self.name}{PEA_CGROUP}{n}")
        try:
            cgroup.setup_devices(DEVICE_ALLOW)
            if limits.memory is not None and limits.memory.limit_in_bytes:
                cgroup.set_memory_limit(limits.memory.limit_in_bytes)
            if limits.cpu is not None:
                self._apply_cpu_limits(cgroup, limits.cpu)
        except BaseException:
            self._destroy_cgroup(cgroup)
            raise
        return cgroup

    def _mount_pea(self, pea: Pea, image: images.Image) -> int:
        os.makedirs(pea.dir, mode=0o711)
        return rootfs.overlay_tree(image.layers, pea.dir, self.spec.privileged, idmapped=not image.shifted,
                             scratch=os.path.join(self.env.image_store, rootfs.MOUNT_POINTS))

    async def _drop_pea(self, pea: Pea) -> None:
        """Unmount a pea's root, remove its directory, drop its image reference (shielded)."""
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(_remove_pea_dir, pea.dir, self.env.discard)
                if pea.cgroup is not None:
                    await trio.to_thread.run_sync(self._destroy_cgroup, pea.cgroup)
            except (OSError, KernelError) as err:
                log.warning("container %s: removing pea %s: %s", self.handle, pea.dir, err)
            await self.env.release_image(pea.key)

    async def _run_pea(self, proc: ProcessActor) -> None:
        try:
            await proc.run()
        finally:
            with trio.CancelScope(shield=True):
                await self.mailbox.tell(_PeaDone(proc.id))

    def _process_actor(self, process_id: str, pid: int, tty: bool, fds: list[int],
                       exit_code: int | None = None, stdin_open: bool = True,
                       subscriber: Subscription | None = None) -> ProcessActor:
        assert self._link is not None
        return ProcessActor(process_id, pid, tty, fds, self._link, exit_code, stdin_open, subscriber)

    async def _add_process(self, proc: ProcessActor) -> ProcessActor:
        assert self._nursery is not None
        self.processes[proc.id] = proc
        # Not ``start``: its mailbox queues commands until it serves, and the caller gets
        # the process one scheduling round sooner.
        if proc.id in self._peas:
            self._nursery.start_soon(self._run_pea, proc)
        else:
            self._nursery.start_soon(proc.run)
        if proc.id in self._early_exits:
            await proc.exited(self._early_exits.pop(proc.id))
        self._forget_exited()
        return proc

    def _forget_exited(self) -> None:
        """Forget the oldest exits beyond KEEP_EXITED, once their processes are done
        (output drained). Looks only at the excess, not at every process: this runs on
        every ``run``."""
        excess = len(self._exit_order) - KEEP_EXITED
        if excess <= 0:
            return
        for process_id in list(itertools.islice(self._exit_order, excess)):
            proc = self.processes.get(process_id)
            if proc is None or proc.done.is_set():
                del self._exit_order[process_id]
                self.processes.pop(process_id, None)

    def _process_id_of(self, pid: int) -> str | None:
        """The Run process with host pid ``pid`` (its children have no process id)."""
        return next((p.id for p in self.processes.values() if p.pid == pid), None)

    def _process(self, process_id: str) -> ProcessActor:
        proc = self.processes.get(process_id)
        if proc is None:
            raise ProcessNotFoundError(process_id)
        return proc

    async def _stop(self, kill: bool, request: Request[None] | None = None) -> None:
        """Garden's stop: TERM every process but init, KILL survivors after 10 s; then
        reply to ``request``."""
        try:
            await self._stop_all(kill)
        finally:
            if request is not None:
                request.reply(None)

    async def _stop_all(self, kill: bool) -> None:
        cgroup = self.cgroup
        async with self._stop_lock:
            deadline = trio.current_time() + (0 if kill else STOP_GRACE)
            next_term = trio.current_time()
            while True:
                try:
                    pids = [p for p in await trio.to_thread.run_sync(cgroup.pids) if p != self._init_pid]
                except KernelError:
                    return  # the cgroup is gone: destroyed meanwhile
                if not pids:
                    break
                now = trio.current_time()
                if now >= deadline:
                    _signal_all(pids, signal.SIGKILL)
                elif now >= next_term:
                    _signal_all(pids, signal.SIGTERM)  # again each second, for children forked meanwhile
                    next_term = now + 1
                await trio.sleep(0.05)

    # ---- reads -------------------------------------------------------------------------

    def _info(self) -> ContainerInfo:
        info = ContainerInfo(
            state=self.state.value,
            events=list(self.events),
            container_path=self.dir,
            # Once the shim's death is taken in, nothing runs, whether or not each process
            # actor has handled its "lost" yet.
            process_ids=[] if self._shim_gone else [pid for pid, p in self.processes.items() if p.running],
            properties=dict(self.properties),
        )
        if self.net is not None:
            info.container_ip = str(self.net.alloc.container_ip)
            info.host_ip = str(self.net.alloc.gateway_ip)
            info.external_ip = self.env.network.config.external_ip if self.env.network is not None else ""
            info.mapped_ports = [PortMapping(h, c) for h, c in self.net.net_in]
        return info

    @property
    def cgroup(self) -> Cgroup:
        assert self._cgroup is not None
        return self._cgroup


class ContainerRef:
    """What the registry and the front ends hold: each coroutine sends the actor a
    command and waits for its reply (cancelling that wait never cancels the command).
    ``properties``, ``state`` and ``cpu_limits`` are snapshots the actor publishes on
    every change; the rest is fixed once the container exists."""

    def __init__(self, actor: ContainerActor) -> None:
        self._actor = actor
        self.handle = actor.handle
        self.name = actor.name
        self.dir = actor.dir
        self.env = actor.env
        self._mailbox = actor.mailbox
        self._publish()

    def _publish(self) -> None:
        """Called by the owner only, after a change."""
        actor = self._actor
        self.properties: MappingProxyType[str, str] = MappingProxyType(dict(actor.properties))
        self.peas: MappingProxyType[str, Pea] = MappingProxyType(dict(actor._peas))
        self.state = actor.state
        self.cpu_limits = CPULimits(actor.spec.limits.cpu.weight, actor.spec.limits.cpu.limit_in_shares)
        net = actor.net
        self.net = None if net is None else ContainerNet(
            net.handle, net.alloc, net.host_ifname, net.mtu, list(net.net_in), list(net.net_out), net.bandwidth)

    # Fixed after creation, so safe to read from any task.
    @property
    def cgroup(self) -> Cgroup:
        return self._actor.cgroup

    @property
    def disk_limits(self) -> DiskLimits:
        return self._actor.spec.limits.disk

    @property
    def created_at(self) -> float:
        return self._actor.created_at

    @property
    def image_usage(self) -> tuple[int, int]:
        return self._actor.image_bytes, self._actor.image_inodes

    @property
    def grace_time(self) -> float:
        return self._actor.grace_time

    @property
    def image_copy(self) -> str:
        return self._actor.image_copy

    @property
    def root(self) -> str:
        """The container's root file system as the host reaches it: through pid 1, whose
        mount namespace alone holds the overlay (containers of older servers had it
        mounted at ``<dir>/rootfs``, which is then what this names)."""
        pid = self._actor._init_pid
        return f"/proc/{pid}/root" if pid else os.path.join(self.dir, "rootfs")

    async def info(self) -> ContainerInfo:
        info: ContainerInfo = await self._mailbox.ask(GetInfo())
        return info

    async def check_oom(self) -> None:
        await self._mailbox.ask(CheckOom())

    async def oom_killed(self, pid: int, task: str) -> None:
        """Report a victim the kernel log named (the registry watches the log); not waited for."""
        await self._mailbox.tell(OomKilled(pid, task))

    async def set_property(self, name: str, value: str) -> None:
        await self._mailbox.ask(SetProperty(name, value))

    async def remove_property(self, name: str) -> None:
        await self._mailbox.ask(RemoveProperty(name))

    async def set_grace_time(self, seconds: float) -> None:
        """Persist the grace time (the registry owns the timer itself)."""
        await self._mailbox.ask(SetGraceTime(seconds))

    async def limit_memory(self, limits: MemoryLimits) -> None:
        await self._mailbox.ask(LimitMemory(limits))

    async def limit_cpu(self, limits: CPULimits) -> None:
        await self._mailbox.ask(LimitCpu(limits))

    async def current_memory_limits(self) -> MemoryLimits:
        return MemoryLimits(limit_in_bytes=await trio.to_thread.run_sync(self.cgroup.memory_limit))

    async def current_cpu_limits(self) -> CPULimits:
        """Garden's answer: the applied value (v1 shares, v2 weight) in limit_in_shares,
        all zero when no CPU limit was ever given (the kernel default is not reported)."""
        cpu = self.cpu_limits
        if not (cpu.weight or cpu.limit_in_shares):
            return CPULimits()
        return CPULimits(limit_in_shares=await trio.to_thread.run_sync(self.cgroup.cpu_shares))

    async def net_in(self, host_port: int, container_port: int) -> tuple[int, int]:
        """Map a host port to a container port (0: the next pool port / the host port).
        Cancelled: the mapping may still be made, and is then listed in the info."""
        mapping: tuple[int, int] = await self._mailbox.ask(NetIn(host_port, container_port))
        return mapping

    async def net_out(self, rules: list[NetOutRule]) -> None:
        """Allow traffic out (all rules in one transaction). Cancelled: applied or not, whole."""
        await self._mailbox.ask(NetOut(tuple(rules)))

    async def limit_bandwidth(self, limits: BandwidthLimits) -> None:
        await self._mailbox.ask(LimitBandwidth(limits))

    def current_bandwidth_limits(self) -> BandwidthLimits:
        rate, burst = self.net.bandwidth if self.net is not None else (0, 0)
        return BandwidthLimits(rate, burst)

    async def run(self, spec: ProcessSpec, process_id: str, subscriber: Subscription | None = None,
                  host_exe: str = "", dir_must_exist: bool = False, builtin: str = "") -> ProcessActor:
        """Start a process; ``host_exe`` runs a binary of the host's (the server's own tar)
        under the name ``spec.path`` instead of looking ``spec.path`` up in the image;
        ``builtin`` names code of the shim's that runs instead of any binary (a shim too
        old to know it runs ``host_exe``). Cancelled: the process may still start, and is
        then listed and attachable."""
        proc: ProcessActor = await self._mailbox.ask(Run(spec, process_id, subscriber, host_exe, dir_must_exist,
                                                         builtin))
        return proc

    async def process(self, process_id: str) -> ProcessActor:
        proc: ProcessActor = await self._mailbox.ask(FindProcess(process_id))
        return proc

    async def stop(self, kill: bool) -> None:
        """Garden's Stop; returns when no process but init is left. Cancelled: the stop
        goes on."""
        await self._mailbox.ask(Stop(kill))

    async def destroy(self) -> None:
        """Kill everything and remove every trace; the actor then ends. Raises
        GardenError if teardown failed half-way (a retry resumes). Cancelled: the
        destroy goes on."""
        await self._mailbox.ask(Destroy())


def _forward_exit(exits: trio.MemorySendChannel[tuple[str, int]], process_id: str, code: int) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        exits.send_nowait((process_id, code))


def remove_orphan(env: Environment, name: str, shim_pid: int | None = None) -> None:
    """Remove every trace of a container (directory and cgroup ``name``) no actor owns
    (a crash mid-create or mid-destroy).

    ``shim_pid`` comes from ``shims.find`` (never from a pid file, which may be stale).
    Killing everything in the cgroup takes pid 1, and with it the pid namespace. Synchronous;
    each step tolerates "already gone".
    """
    path = os.path.join(env.depot, depot.CONTAINERS, name)
    if shim_pid is not None:
        shims.kill(shim_pid, path)
    with contextlib.suppress(KernelError):
        ContainerActor._destroy_cgroup(env.cgroups.open(name))
    _unmount_peas(path)
    rootfs.unmount(os.path.join(path, "rootfs"))
    env.discard(path)


def _remove_pea_dir(directory: str, discard: Callable[[str], None]) -> None:
    rootfs.unmount(os.path.join(directory, "rootfs"))
    discard(directory)


def _unmount_peas(container_dir: str) -> None:
    """Unmount every pea root of a container (its destroy; also peas a restart forgot)."""
    peas = os.path.join(container_dir, "peas")
    for name in os.listdir(peas) if os.path.isdir(peas) else ():
        rootfs.unmount(os.path.join(peas, name, "rootfs"))


def _kill_quietly(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
