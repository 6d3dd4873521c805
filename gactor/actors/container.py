"""The container actor: one per container, owning its cgroup, rootfs mount, depot
directory, shim link and process actors.

Creation happens inside ``run`` before ``task_status.started``: every kernel object
is pushed onto one Cleanup stack the moment it exists, so a failure anywhere unwinds
exactly what was made; on success the actor takes ownership (``pop_all``) and
releases it all in ``destroy``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..errors import GardenError, ProcessNotFoundError
from ..kernel import depot, rootfs, shims
from ..kernel.cgroups import Cgroup, CgroupDriver
from ..kernel.errors import KernelError
from ..types import (
    ContainerInfo,
    ContainerSpec,
    CPULimits,
    MemoryLimits,
    ProcessSpec,
    from_wire,
    to_wire,
)
from .cleanup import Cleanup
from .process import ProcessActor, Subscription
from .shim_link import ShimLink
from .spawner_client import SpawnerClient

log = logging.getLogger("gactor.container")

STOP_GRACE = 10.0
OOM_EVENT = "Out of memory"  # Garden's text in ContainerInfo.events
OOM_POLL = 2.0  # seconds between reads of the oom_kill counter when nothing else prompts one
DEVICE_ALLOW = ["c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm", "c 10:200 rwm"]


@dataclass
class Environment:
    """What every container actor shares: the depot, the cgroup driver, the spawner."""

    depot: str
    cgroups: CgroupDriver
    spawner: SpawnerClient
    image_store: str
    cpu_quota_per_share: int = 0
    # Percent of a CPU per share, Garden's default: cores * 100 / host memory in MiB.
    entitlement_per_share: float = 0.0
    image_locks: dict[str, trio.Lock] = field(default_factory=dict)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    init_binary: str = ""  # the static garden-init; empty means pid 1 stays a forked Python
    tar_binary: str = "/bin/busybox"  # static, so it runs in any image (as Garden ships its tar)
    # How a container reports an event (e.g. an OOM); the registry delivers it.
    publish: Callable[[str, str], None] = lambda handle, event: None


class ContainerActor:
    def __init__(self, env: Environment, spec: ContainerSpec, rootfs_path: str) -> None:
        self.env = env
        self.spec = spec
        self.handle = spec.handle
        self.dir = os.path.join(env.depot, depot.CONTAINERS, spec.handle)
        self.rootfs_source = rootfs_path
        self.properties = dict(spec.properties)
        self.grace_time = spec.grace_time
        self.state = "active"
        self.events: list[str] = []
        self.created_at = time.time()
        self.processes: dict[str, ProcessActor] = {}
        self._early_exits: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._link: ShimLink | None = None
        self._cgroup: Cgroup | None = None
        self._owned = Cleanup()
        self._init_pid = 0
        self._gone = trio.Event()
        self.image_bytes = self.image_inodes = 0
        self._oom_pokes = trio.open_memory_channel[None](1)
        self.serving = False  # creation finished; failures from here on are crashes, not errors
        self._oom_seen = 0
        self._stop_lock = trio.Lock()
        self._save_lock = trio.Lock()  # a Run waits for a stop in progress, or the stop would kill it

    # ---- lifecycle -------------------------------------------------------------

    @classmethod
    def restore(cls, env: Environment, handle: str) -> ContainerActor:
        """A container from its depot record, to be re-adopted with ``run(adopt=True)``."""
        record = depot.read_json(os.path.join(env.depot, depot.CONTAINERS, handle, "container.json"))
        spec = from_wire(ContainerSpec, record["spec"])
        actor = cls(env, spec, record["rootfs"])
        actor.properties = dict(record["properties"])
        actor.grace_time = float(record["grace_time"])
        actor.state = record["state"]
        actor.events = list(record["events"])
        actor.created_at = float(record["created_at"])
        return actor

    async def run(self, *, adopt: bool = False,
                  task_status: trio.TaskStatus[ContainerActor] = trio.TASK_STATUS_IGNORED) -> None:
        """Create (or re-adopt) the container and serve it until destroyed.

        Raises GardenError if creation fails, after undoing every step taken.
        """
        with Cleanup() as undo:
            try:
                if adopt:
                    await self._reconnect(undo)
                else:
                    await self._create(undo)
            except (OSError, ValueError, KeyError, KernelError) as err:
                raise GardenError(f"creating container {self.handle}: {err}") from err
            self._owned = undo.pop_all()
        assert self._link is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._link.run)
            nursery.start_soon(self._watch_oom)
            if adopt:
                await self._adopt_processes()
            self.serving = True
            task_status.started(self)
            await self._gone.wait()
            nursery.cancel_scope.cancel()

    async def _create(self, undo: Cleanup) -> None:
        started = trio.current_time()
        lower = await self._image()
        image = trio.current_time()
        cfg = await trio.to_thread.run_sync(self._prepare, lower, undo)
        prepared = trio.current_time()
        status = await self.env.spawner.start_shim(cfg)
        self._init_pid = int(status["init"])
        self._own_shim(int(status["shim"]), undo)
        self._link = await ShimLink.connect(self.handle, self.dir, self._on_exit)
        log.debug("container %s created in %.1f ms (image %.1f, depot+cgroup+mount %.1f, shim+init %.1f)",
                  self.handle, *((t * 1000) for t in (trio.current_time() - started, image - started,
                                                      prepared - image, trio.current_time() - prepared)))

    def _own_shim(self, pid: int, undo: Cleanup) -> None:
        # A pidfd, not the pid: the shim's pid may be reused once it has exited.
        shim_fd = os.pidfd_open(pid)
        undo.callback(os.close, shim_fd)
        undo.callback(_kill_quietly, shim_fd)

    async def _reconnect(self, undo: Cleanup) -> None:
        """Take over a container a previous server process created."""
        undo.callback(depot.remove_tree, self.dir)
        self._cgroup = self.env.cgroups.open(self.handle)
        undo.callback(self._destroy_cgroup, self._cgroup)
        undo.callback(rootfs.unmount, os.path.join(self.dir, "rootfs"))
        self._link = await ShimLink.connect(self.handle, self.dir, self._on_exit)
        # The shim's pid from the socket it listens on, never from shim.pid: after a crash
        # or a reboot that file may name an unrelated process.
        self._own_shim(self._link.peer_pid(), undo)
        lower = self.rootfs_source if self.spec.privileged else None
        self.image_bytes, self.image_inodes = self.env.image_sizes.get(lower or "", (0, 0))

    async def _adopt_processes(self) -> None:
        assert self._link is not None
        self._init_pid, entries = await self._link.list_processes()
        for entry in entries:
            try:
                found = await self._link.attach(entry["id"])
            except ProcessNotFoundError:
                continue  # collected and forgotten since the listing (bounded history)
            await self._adopt(entry["id"], found.pid, found.tty, found.fds, found.exit, found.stdin_open)

    async def _image(self) -> str:
        """The overlay's lower dir: the source itself, or (unprivileged) its uid-shifted copy."""
        lower = self.rootfs_source
        if not self.spec.privileged:
            async with self.env.image_locks.setdefault(lower, trio.Lock()):
                lower = await trio.to_thread.run_sync(rootfs.shifted_image, lower, self.env.image_store)
        if lower not in self.env.image_sizes:
            self.env.image_sizes[lower] = await trio.to_thread.run_sync(depot.disk_usage, lower)
        self.image_bytes, self.image_inodes = self.env.image_sizes[lower]
        return lower

    def _prepare(self, lower: str, undo: Cleanup) -> dict[str, Any]:
        """Depot dir, cgroup with limits, rootfs overlay, hosts file (in a worker thread)."""
        os.makedirs(os.path.dirname(self.dir), mode=0o711, exist_ok=True)
        os.mkdir(self.dir, 0o711)
        undo.callback(depot.remove_tree, self.dir)
        self.persist()
        cgroup = self.env.cgroups.create(self.handle)
        undo.callback(self._destroy_cgroup, cgroup)
        self._cgroup = cgroup
        cgroup.setup_devices(DEVICE_ALLOW)
        self._apply_limits(cgroup)
        merged = rootfs.mount_overlay(lower, self.dir, self.spec.privileged)
        undo.callback(rootfs.unmount, merged)
        hosts = os.path.join(self.dir, "hosts")
        with open(hosts, "w") as f:
            f.write(f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 {self.hostname}\n")
        return {
            "dir": self.dir,
            "rootfs": merged,
            "hostname": self.hostname,
            "privileged": self.spec.privileged,
            "cgroup_procs": list(cgroup.procs_files),
            "hosts_file": hosts,
            "init_binary": self.env.init_binary,
            "bind_mounts": [
                {"src": bm.src_path, "dst": bm.dst_path, "ro": bm.mode == 0, "from_container": bm.origin == 1}
                for bm in self.spec.bind_mounts
            ],
        }

    def _apply_limits(self, cgroup: Cgroup) -> None:
        limits = self.spec.limits
        if limits.memory.limit_in_bytes:
            cgroup.set_memory_limit(limits.memory.limit_in_bytes)
        self.apply_cpu_limits(cgroup, limits.cpu)
        if limits.pid.max:
            cgroup.set_pids_max(limits.pid.max)

    def apply_cpu_limits(self, cgroup: Cgroup, limits: CPULimits) -> None:
        """Weight wins over limit_in_shares; with --cpu-quota-per-share also a hard cap."""
        shares = limits.weight or limits.limit_in_shares
        if shares:
            cgroup.set_cpu_shares(shares)
            if self.env.cpu_quota_per_share:
                cgroup.set_cpu_quota(max(1000, shares * self.env.cpu_quota_per_share))

    @property
    def hostname(self) -> str:
        return self.handle[-49:]

    @staticmethod
    def _destroy_cgroup(cgroup: Cgroup) -> None:
        cgroup.kill_all()
        cgroup.destroy()

    def _record(self) -> dict[str, Any]:
        """The depot record: a snapshot, so it can be written from another thread."""
        return {
            "spec": to_wire(self.spec),
            "rootfs": self.rootfs_source,
            "properties": dict(self.properties),
            "grace_time": self.grace_time,
            "state": self.state,
            "events": list(self.events),
            "created_at": self.created_at,
        }

    def persist(self) -> None:
        """Write the container's state to the depot (atomically, durably). Blocking."""
        depot.write_json(os.path.join(self.dir, "container.json"), self._record())

    async def save(self) -> None:
        """``persist`` without blocking the event loop on fsync. Returns once the state as
        it was at the call is on disk; saves of one container never interleave."""
        record = self._record()
        async with self._save_lock:
            await trio.to_thread.run_sync(depot.write_json, os.path.join(self.dir, "container.json"), record)

    async def destroy(self) -> None:
        """Kill everything and remove every trace. Safe to retry after a failure."""
        if self._link is not None:
            try:
                with trio.move_on_after(10):
                    await self._link.request("destroy")
            except GardenError:
                pass  # the shim is already gone; the cgroup kill below still ends everything
        for proc in list(self.processes.values()):
            proc.set_exit(137)
        with trio.move_on_after(5):
            for proc in list(self.processes.values()):
                await proc.done.wait()
        await trio.to_thread.run_sync(self._owned.close)
        self._gone.set()

    # ---- events ----------------------------------------------------------------

    async def _watch_oom(self) -> None:
        """Record an OOM kill as Garden does, tell subscribers, and stop the container.

        The kernel's notification (v1 eventfd, v2 inotify) does not fire for every OOM
        path (a tmpfs write charged in a syscall, for one), so the cgroup's oom_kill
        counter is also read when any process exits, before info and metrics, and every
        OOM_POLL seconds.
        """
        cgroup = self.cgroup
        try:
            fd = await trio.to_thread.run_sync(cgroup.oom_events_fd)
        except KernelError as err:
            log.warning("container %s: no OOM notifications: %s", self.handle, err)
            fd = -1
        try:
            self._oom_seen = cgroup.oom_kill_count()
            async with trio.open_nursery() as nursery:
                if fd >= 0:
                    nursery.start_soon(self._poke_when_readable, fd)
                while True:
                    with trio.move_on_after(OOM_POLL):
                        await self._oom_pokes[1].receive()
                    await self.check_oom()
        except* KernelError:
            pass  # the cgroup is being removed: the container is going away
        finally:
            if fd >= 0:
                trio.lowlevel.notify_closing(fd)
                os.close(fd)

    async def check_oom(self) -> None:
        """Record an OOM kill the counter shows and we have not seen yet; then stop."""
        count = self.cgroup.oom_kill_count()
        if count <= self._oom_seen:
            return
        self._oom_seen = count
        self.state = "stopped"  # now, not when the kill sweep below gets going
        await self._record_event(OOM_EVENT)
        assert self._nursery is not None
        self._nursery.start_soon(self.stop, True)

    async def _poke_when_readable(self, fd: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 4096)  # drain the eventfd / inotify records
            self._poke_oom_watch()

    def _poke_oom_watch(self) -> None:
        with contextlib.suppress(trio.WouldBlock):
            self._oom_pokes[0].send_nowait(None)

    async def _record_event(self, event: str) -> None:
        """Persist the event, then hand it to the registry, which delivers it to subscribers."""
        self.events.append(event)
        await self.save()
        self.env.publish(self.handle, event)

    # ---- processes -------------------------------------------------------------

    def _on_exit(self, process_id: str, code: int) -> None:
        self._poke_oom_watch()  # an OOM kill of this process or of one of its children?
        proc = self.processes.get(process_id)
        if proc is None:
            self._early_exits[process_id] = code
        else:
            proc.set_exit(code)

    async def run_process(self, spec: ProcessSpec, process_id: str,
                          subscriber: Subscription | None = None, host_exe: str = "",
                          dir_must_exist: bool = False) -> ProcessActor:
        """Start a process; ``host_exe`` runs a binary of the host's (the server's own tar)
        under the name ``spec.path`` instead of looking ``spec.path`` up in the image."""
        if process_id in self.processes:
            raise GardenError(f"process ID '{process_id}' already in use")
        if not spec.path:
            raise GardenError("invalid process spec: path must not be empty")
        if spec.bind_mounts and not spec.image.uri:
            raise GardenError("Running a process with bind mounts and no image provided is not allowed")
        assert self._link is not None
        assert self._nursery is not None
        limits = {k: v for k, v in to_wire(spec.limits).items() if v is not None}
        tty = None
        if spec.tty is not None:
            ws = spec.tty.window_size
            tty = {"columns": ws.columns if ws else 0, "rows": ws.rows if ws else 0}
        wire_spec = {
            "path": spec.path, "args": spec.args, "env": spec.env, "dir": spec.dir, "user": spec.user,
            "rlimits": limits, "container_env": self.spec.env,
            "host_exe": host_exe, "dir_must_exist": dir_must_exist,
        }
        async with self._stop_lock:
            reply, fds = await self._link.request("spawn", id=process_id, spec=wire_spec, tty=tty)
        return await self._adopt(process_id, int(reply["pid"]), tty is not None, fds,
                                 subscriber=subscriber)

    async def _adopt(self, process_id: str, pid: int, tty: bool, fds: list[int],
                     exit_code: int | None = None, stdin_open: bool = True,
                     subscriber: Subscription | None = None) -> ProcessActor:
        assert self._link is not None
        assert self._nursery is not None
        proc = ProcessActor(process_id, pid, tty, fds, self._link, exit_code, stdin_open, subscriber)
        self.processes[process_id] = proc
        if process_id in self._early_exits:
            proc.set_exit(self._early_exits.pop(process_id))
        await self._nursery.start(proc.run)
        return proc

    def process(self, process_id: str) -> ProcessActor:
        proc = self.processes.get(process_id)
        if proc is None:
            raise ProcessNotFoundError(process_id)
        return proc

    async def stop(self, kill: bool) -> None:
        """Garden's stop: TERM every process but init, KILL survivors after 10 s."""
        assert self._cgroup is not None
        cgroup = self._cgroup
        self.state = "stopped"  # from the first signal on: no caller should see it "active"
        async with self._stop_lock:
            deadline = trio.current_time() + (0 if kill else STOP_GRACE)
            next_term = trio.current_time()
            while True:
                pids = [p for p in await trio.to_thread.run_sync(cgroup.pids) if p != self._init_pid]
                if not pids:
                    break
                now = trio.current_time()
                if now >= deadline:
                    _signal_all(pids, signal.SIGKILL)
                elif now >= next_term:
                    _signal_all(pids, signal.SIGTERM)  # again each second, for children forked meanwhile
                    next_term = now + 1
                await trio.sleep(0.05)
            await self.save()

    # ---- reads -----------------------------------------------------------------

    def info(self) -> ContainerInfo:
        return ContainerInfo(
            state=self.state,
            events=list(self.events),
            container_path=self.dir,
            process_ids=[pid for pid, p in self.processes.items() if p.running],
            properties=dict(self.properties),
        )

    def current_memory_limits(self) -> MemoryLimits:
        return MemoryLimits(limit_in_bytes=self.cgroup.memory_limit())

    def current_cpu_limits(self) -> CPULimits:
        """Garden's answer: the applied value (v1 shares, v2 weight) in limit_in_shares,
        all zero when no CPU limit was ever given (the kernel default is not reported)."""
        cpu = self.spec.limits.cpu
        return CPULimits(limit_in_shares=self.cgroup.cpu_shares() if cpu.weight or cpu.limit_in_shares else 0)

    @property
    def cgroup(self) -> Cgroup:
        assert self._cgroup is not None
        return self._cgroup


def remove_orphan(env: Environment, handle: str, shim_pid: int | None = None) -> None:
    """Remove every trace of a container no actor owns (a crash mid-create or mid-destroy).

    ``shim_pid`` comes from ``shims.find`` (never from a pid file, which may be stale).
    Killing everything in the cgroup takes pid 1, and with it the pid namespace. Synchronous;
    each step tolerates "already gone".
    """
    container_dir = os.path.join(env.depot, depot.CONTAINERS, handle)
    if shim_pid is not None:
        shims.kill(shim_pid, container_dir)
    with contextlib.suppress(KernelError):
        ContainerActor._destroy_cgroup(env.cgroups.open(handle))
    rootfs.unmount(os.path.join(container_dir, "rootfs"))
    depot.remove_tree(container_dir)


def _kill_quietly(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

