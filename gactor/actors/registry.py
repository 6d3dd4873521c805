"""The registry actor: the one owner of the handle table, capacity and grace timers.

Container actors run in the registry's nursery. Every container-scoped request
goes through ``using(handle)``, which pauses that container's grace timer while
it runs (Garden's "bomberman"); the countdown restarts in full when the last
pause ends, and an expired timer destroys the container.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import uuid
from collections.abc import AsyncIterator

import trio

from ..errors import ContainerNotFoundError, GardenError
from ..kernel import depot, shims
from ..kernel.errors import KernelError
from ..types import Capacity, ContainerSpec
from .container import ContainerActor, Environment, collect_images, release_image, remove_orphan

log = logging.getLogger("gactor.registry")

_BAD_HANDLE = re.compile(r"[/\x00]")
MAX_HANDLE_BYTES = 200
EVENT_QUEUE = 64  # per subscriber; one that falls this far behind is dropped
ADOPT_TIMEOUT = 5.0  # seconds a shim gets to answer at startup before its container is removed


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
        self.scope.deadline = trio.current_time() + self.seconds if idle else math.inf

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


class Registry:
    def __init__(self, env: Environment, default_rootfs: str, default_grace_time: float,
                 max_containers: int) -> None:
        self.env = env
        self.default_rootfs = default_rootfs
        self.default_grace_time = default_grace_time
        self.max_containers = max_containers
        self.containers: dict[str, ContainerActor] = {}
        self._creating: set[str] = set()
        self._destroying: set[str] = set()
        self._timers: dict[str, GraceTimer] = {}
        self._nursery: trio.Nursery | None = None
        # Event subscribers by handle; the key None subscribes to every container.
        self._subscribers: dict[str | None, set[trio.MemorySendChannel[tuple[str, str]]]] = {}
        env.publish = self.publish

    async def run(self, *, destroy_existing: bool = False,
                  task_status: trio.TaskStatus[Registry] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._restore(destroy_existing)
            task_status.started(self)
            await trio.sleep_forever()

    async def _restore(self, destroy_existing: bool) -> None:
        """Re-adopt every container in the depot, concurrently; remove what cannot be
        re-adopted (within ADOPT_TIMEOUT each), then every shim and cgroup no container owns."""
        root = os.path.join(self.env.depot, depot.CONTAINERS)
        handles = sorted(os.listdir(root)) if os.path.isdir(root) else []
        live_shims = await trio.to_thread.run_sync(shims.find, root)
        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(self._readopt, handle, live_shims.get(handle))
        for handle, pid in live_shims.items():
            if handle not in self.containers:
                log.warning("killing the shim of %s: no container owns it", handle)
                await trio.to_thread.run_sync(remove_orphan, self.env, handle, pid)
        for name in set(self.env.cgroups.names()) - set(self.containers):
            log.warning("removing cgroup %s: no container owns it", name)
            await trio.to_thread.run_sync(remove_orphan, self.env, name)
        await collect_images(self.env)  # image references: exactly the re-adopted containers'
        log.info("re-adopted %d containers", len(self.containers))
        if destroy_existing:
            for handle in list(self.containers):
                await self.destroy(handle)

    async def _readopt(self, handle: str, shim_pid: int | None) -> None:
        assert self._nursery is not None
        reason: object = f"its shim did not answer within {ADOPT_TIMEOUT} s"
        with trio.move_on_after(ADOPT_TIMEOUT):
            try:
                actor = ContainerActor.restore(self.env, handle)
                container: ContainerActor = await self._nursery.start(self._supervise, actor, True)
            except (GardenError, OSError, ValueError, KeyError) as err:
                reason = err
            else:
                self._add(container)
                return
        log.warning("removing container %s: it cannot be re-adopted: %s", handle, reason)
        self.env.image_users.pop(handle, None)
        await trio.to_thread.run_sync(remove_orphan, self.env, handle, shim_pid)

    async def _supervise(self, actor: ContainerActor, adopt: bool,
                         task_status: trio.TaskStatus[ContainerActor] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a container actor; a crash after creation is logged, never fatal to the server.

        The crashed container stays listed, so a destroy can still clean it up.
        """
        try:
            await actor.run(adopt=adopt, task_status=task_status)
        except Exception:  # ExceptionGroups from the actor's nursery included
            if not actor.serving:
                raise  # a creation error, which nursery.start hands to the caller as it is
            log.exception("container %s: its actor crashed", actor.handle)

    def _add(self, container: ContainerActor) -> None:
        assert self._nursery is not None
        self.containers[container.handle] = container
        timer = self._timers[container.handle] = GraceTimer(container.grace_time)
        self._nursery.start_soon(self._reap_when_idle, container.handle, timer)

    # ---- create / destroy ------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> ContainerActor:
        assert self._nursery is not None
        spec.handle = spec.handle or str(uuid.uuid4())
        check_name("handle", spec.handle)
        if spec.handle in self.containers or spec.handle in self._creating:
            raise GardenError(f"Handle '{spec.handle}' already in use")
        if spec.rootfs_path and spec.image.uri:
            raise GardenError("Cannot provide both Image.URI and RootFSPath")
        if self.max_containers and len(self.containers) + len(self._creating) >= self.max_containers:
            raise GardenError("max containers reached")
        source = spec.image.uri or spec.rootfs_path or self.default_rootfs
        source = source.removeprefix("raw://")
        if not source:
            raise GardenError("no rootfs given and the server has no default rootfs")
        if not os.path.isdir(source):
            raise GardenError(f"rootfs {source!r} is not a directory (images are not supported yet)")
        for mount in spec.bind_mounts:
            if not mount.dst_path.startswith("/"):
                raise GardenError(f"bind mount destination {mount.dst_path!r} must be an absolute path")
            if mount.origin == 0 and not os.path.exists(mount.src_path):
                raise GardenError(f"bind mount source {mount.src_path!r} does not exist")
        spec.grace_time = spec.grace_time or self.default_grace_time
        self._creating.add(spec.handle)
        try:
            container: ContainerActor = await self._nursery.start(
                self._supervise, ContainerActor(self.env, spec, source), False)
        except BaseException:
            await release_image(self.env, spec.handle)
            raise
        finally:
            self._creating.discard(spec.handle)
        self._add(container)
        return container

    async def destroy(self, handle: str) -> None:
        container = self.lookup(handle)
        if handle in self._destroying:
            raise GardenError("container already being destroyed")
        self._destroying.add(handle)
        try:
            try:
                await container.destroy()
            except (OSError, KernelError) as err:
                # The container stays listed; a retry resumes with the steps that failed.
                raise GardenError(f"destroying {handle}: {err}") from err
            del self.containers[handle]
            await release_image(self.env, handle)
            self._end_subscriptions(handle)
            timer = self._timers.pop(handle, None)
            if timer is not None:
                timer.defuse()
        finally:
            self._destroying.discard(handle)

    async def _reap_when_idle(self, handle: str, timer: GraceTimer) -> None:
        if await timer.expired() and handle in self.containers and handle not in self._destroying:
            log.info("container %s: grace time expired, destroying it", handle)
            try:
                await self.destroy(handle)
            except GardenError as err:
                log.warning("container %s: reaping failed (it stays listed): %s", handle, err)

    # ---- events ------------------------------------------------------------------

    def subscribe(self, handle: str | None) -> trio.MemoryReceiveChannel[tuple[str, str]]:
        """``(handle, event)`` pairs from now on, for one container or (None) for all.

        A one-container subscription ends when the container is destroyed; a subscriber
        that falls EVENT_QUEUE events behind is dropped (its channel closes)."""
        if handle is not None:
            self.lookup(handle)
        send, receive = trio.open_memory_channel[tuple[str, str]](EVENT_QUEUE)
        self._subscribers.setdefault(handle, set()).add(send)
        return receive

    def publish(self, handle: str, event: str) -> None:
        for key in (handle, None):
            channels = self._subscribers.get(key, set())
            for channel in list(channels):
                try:
                    channel.send_nowait((handle, event))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    channels.discard(channel)  # the subscriber left
                except trio.WouldBlock:
                    log.warning("dropping an event subscriber that stopped reading")
                    channel.close()
                    channels.discard(channel)

    def _end_subscriptions(self, handle: str) -> None:
        for channel in self._subscribers.pop(handle, set()):
            channel.close()

    # ---- lookups -----------------------------------------------------------------

    def lookup(self, handle: str) -> ContainerActor:
        container = self.containers.get(handle)
        if container is None:
            raise ContainerNotFoundError(handle)
        return container

    @contextlib.asynccontextmanager
    async def using(self, handle: str) -> AsyncIterator[ContainerActor]:
        """The container, with its grace timer paused for the duration."""
        container = self.lookup(handle)
        timer = self._timers.get(handle)
        if timer is not None:
            timer.pause()
        try:
            yield container
        finally:
            if timer is not None:
                timer.unpause()

    async def set_grace_time(self, handle: str, seconds: float) -> None:
        container = self.lookup(handle)
        container.grace_time = seconds
        self._timers[handle].reset(seconds)
        await container.save()

    def list(self, properties: dict[str, str] | None) -> list[str]:
        wanted = properties or {}
        return [
            handle for handle, c in self.containers.items()
            if handle not in self._destroying
            and all(c.properties.get(k, "") == v for k, v in wanted.items())
        ]

    def capacity(self, pool_containers: int) -> Capacity:
        with open("/proc/meminfo") as f:
            mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        st = os.statvfs(self.env.depot)
        limit = min(self.max_containers, pool_containers) if self.max_containers else pool_containers
        return Capacity(
            memory_in_bytes=mem_kib * 1024,
            disk_in_bytes=st.f_blocks * st.f_frsize,
            schedulable_disk_in_bytes=st.f_bavail * st.f_frsize,
            max_containers=limit,
        )
