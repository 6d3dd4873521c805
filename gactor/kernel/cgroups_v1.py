"""cgroup v1: one directory per hierarchy, each hierarchy mounted on its own.

A container cgroup is ``<mount>/<parent>/<name>`` in every mounted hierarchy. Controllers
that share a mount (``cpu,cpuacct`` on many hosts, separate on ours) share a directory, so
every directory-wise loop goes over ``unique`` directories.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gactor.kernel import cgroups as cg
from gactor.kernel.errors import CgroupError

_CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")


@dataclass(frozen=True)
class CgroupV1(cg.Cgroup):
    """A container cgroup on v1; ``dirs`` maps each controller to its directory."""

    name: str
    dirs: Mapping[str, str] = field(hash=False)
    procs_files: tuple[str, ...]

    @property
    def unique_dirs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.dirs.values()))

    def _knob(self, controller: str, filename: str) -> str:
        directory = self.dirs.get(controller)
        if directory is None:
            raise CgroupError(f"cgroup.{controller}", errno.ENOENT, f"{controller} not mounted")
        return os.path.join(directory, filename)

    def set_memory_limit(self, limit_bytes: int, swap: bool = True) -> None:
        limit = self._knob("memory", "memory.limit_in_bytes")
        memsw = self._knob("memory", "memory.memsw.limit_in_bytes")
        value = str(limit_bytes) if limit_bytes > 0 else "-1"
        op = "cgroup.set_memory_limit"
        if not cg.exists(memsw):  # kernel without swap accounting
            cg.write_file(op, limit, value)
            return
        if not swap:
            # Unlimited memsw first: it can never be below the limit we are about to set.
            cg.write_file(op, memsw, "-1")
            cg.write_file(op, limit, value)
            return
        # The kernel insists memsw >= limit at every moment: when lowering move the limit
        # first, when raising move memsw first.
        lowering = 0 < limit_bytes < cg.read_int(op, limit)
        for path in (limit, memsw) if lowering else (memsw, limit):
            cg.write_file(op, path, value)

    def memory_limit(self) -> int:
        path = self._knob("memory", "memory.limit_in_bytes")
        return cg.limit_from_kernel(cg.read_int("cgroup.memory_limit", path))

    def set_cpu_shares(self, shares: int) -> None:
        cg.write_file("cgroup.set_cpu_shares", self._knob("cpu", "cpu.shares"), str(shares))

    def cpu_shares(self) -> int:
        return cg.read_int("cgroup.cpu_shares", self._knob("cpu", "cpu.shares"))

    def set_cpu_quota(self, quota_us: int, period_us: int = 100000) -> None:
        op = "cgroup.set_cpu_quota"
        cg.write_file(op, self._knob("cpu", "cpu.cfs_period_us"), str(period_us))
        quota = str(quota_us) if quota_us > 0 else "-1"
        cg.write_file(op, self._knob("cpu", "cpu.cfs_quota_us"), quota)

    def set_pids_max(self, n: int) -> None:
        value = str(n) if n > 0 else "max"
        cg.write_file("cgroup.set_pids_max", self._knob("pids", "pids.max"), value)

    def pids_max(self) -> int:
        return cg.read_int("cgroup.pids_max", self._knob("pids", "pids.max"))

    def pids_current(self) -> int:
        return cg.read_int("cgroup.pids_current", self._knob("pids", "pids.current"))

    def memory_stat(self) -> dict[str, int]:
        path = self._knob("memory", "memory.stat")
        stat = cg.parse_keyed(cg.read_file("cgroup.memory_stat", path))
        for key in cg.GARDEN_MEMORY_KEYS:
            stat.setdefault(key, 0)  # e.g. swap/total_swap exist only with memsw
        stat["total_usage_toward_limit"] = cg.total_usage_toward_limit_v1(stat)
        return stat

    def cpu_stat(self) -> tuple[int, int, int]:
        op = "cgroup.cpu_stat"
        usage = cg.read_int(op, self._knob("cpuacct", "cpuacct.usage"))
        ticks = cg.parse_keyed(cg.read_file(op, self._knob("cpuacct", "cpuacct.stat")))
        # cpuacct.stat counts USER_HZ ticks; Garden wants nanoseconds.
        hz = os.sysconf("SC_CLK_TCK")
        return usage, ticks.get("user", 0) * 10**9 // hz, ticks.get("system", 0) * 10**9 // hz

    def oom_events_fd(self) -> int:
        op = "cgroup.oom_events_fd"
        oom_control = self._knob("memory", "memory.oom_control")
        event_control = self._knob("memory", "cgroup.event_control")
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                ofd = os.open(oom_control, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                raise CgroupError.from_os_error(op, err, oom_control) from err
            try:
                # The kernel keeps its own reference to the eventfd; the oom_control fd is
                # only needed while registering. The eventfd is also signalled when the
                # cgroup is removed, hence "check oom_kill_count()" on the caller's side.
                cg.write_file(op, event_control, f"{efd} {ofd}")
            finally:
                os.close(ofd)
        except BaseException:
            os.close(efd)
            raise
        return efd

    def oom_kill_count(self) -> int:
        path = self._knob("memory", "memory.oom_control")
        return cg.parse_keyed(cg.read_file("cgroup.oom_kill_count", path)).get("oom_kill", 0)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        # Frozen tasks cannot fork, so one pass over cgroup.procs reaches them all; they
        # act on the signal once thawed. Without a freezer, repeated rounds catch forks.
        freezer = self.dirs.get("freezer")
        for _ in range(cg.KILL_ROUNDS):
            if not self.pids():
                return
            if freezer is not None:
                self._set_freezer_state(freezer, "FROZEN")
            try:
                cg.signal_pids(self.pids(), sig)
            finally:
                if freezer is not None:
                    self._set_freezer_state(freezer, "THAWED")
            if sig != signal.SIGKILL:
                return
            if cg.wait_until_empty(self.procs_files, cg.KILL_WAIT_SECONDS):
                return
        raise CgroupError("cgroup.kill_all", errno.EBUSY, f"{self.name} still has processes")

    @staticmethod
    def _set_freezer_state(directory: str, state: str) -> None:
        path = os.path.join(directory, "freezer.state")
        cg.write_file("cgroup.freeze", path, state)
        if state != "FROZEN":
            return
        # FREEZING until every task stopped; a task stuck in the kernel can keep it there,
        # so give up waiting after a bound and signal anyway.
        deadline = time.monotonic() + cg.KILL_WAIT_SECONDS
        while cg.read_file("cgroup.freeze", path).strip() != "FROZEN":
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)

    def destroy(self) -> None:
        for directory in self.unique_dirs:
            cg.rmdir("cgroup.destroy", directory)

    def setup_devices(self, allow: list[str]) -> None:
        op = "cgroup.setup_devices"
        cg.write_file(op, self._knob("devices", "devices.deny"), "a")
        for rule in allow:
            cg.write_file(op, self._knob("devices", "devices.allow"), rule)


class CgroupV1Driver(cg.CgroupDriver):
    """Container cgroups under ``<mount>/<parent>`` for each controller in ``mounts``."""

    version = 1

    def __init__(self, mounts: Mapping[str, str], parent: str = "gactor") -> None:
        cg.check_name(parent)
        self.mounts = dict(mounts)
        self.parent = parent

    def _cgroup(self, name: str) -> CgroupV1:
        cg.check_name(name)
        dirs = {c: os.path.join(m, self.parent, name) for c, m in self.mounts.items()}
        unique = tuple(dict.fromkeys(dirs.values()))
        procs = tuple(os.path.join(d, "cgroup.procs") for d in unique)
        return CgroupV1(name=name, dirs=dirs, procs_files=procs)

    def parent_dirs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(os.path.join(m, self.parent) for m in self.mounts.values()))

    def create(self, name: str) -> CgroupV1:
        cgroup = self._cgroup(name)
        cpuset = cgroup.dirs.get("cpuset")
        made: list[str] = []
        try:
            for directory in self.parent_dirs():
                cg.mkdir("cgroup.create", directory)  # shared by all containers; kept
                if cpuset is not None and directory == os.path.dirname(cpuset):
                    _inherit_cpuset(directory)
            for directory in cgroup.unique_dirs:
                if cg.mkdir("cgroup.create", directory):
                    made.append(directory)
                if directory == cpuset:
                    _inherit_cpuset(directory)
        except CgroupError:
            for directory in reversed(made):
                try:
                    cg.rmdir("cgroup.create", directory)
                except CgroupError:
                    pass  # best effort; the original error is the one worth reporting
            raise
        return cgroup

    def open(self, name: str) -> CgroupV1:
        cgroup = self._cgroup(name)
        if not any(cg.exists(d) for d in cgroup.unique_dirs):
            raise CgroupError("cgroup.open", errno.ENOENT, name)
        return cgroup

    def names(self) -> list[str]:
        found: set[str] = set()
        for directory in self.parent_dirs():
            found |= cg.child_names("cgroup.names", directory)
        return sorted(found)


def _inherit_cpuset(directory: str) -> None:
    """A new v1 cpuset starts with empty cpus and mems, and no task can join it until they
    are set: copy them from the parent unless already set."""
    op = "cgroup.create"
    for filename in _CPUSET_FILES:
        path = os.path.join(directory, filename)
        if not cg.read_file(op, path).strip():
            upstream = cg.read_file(op, os.path.join(os.path.dirname(directory), filename))
            cg.write_file(op, path, upstream.strip())
