"""cgroup v2: one unified hierarchy at ``root``; containers live in ``root/<parent>/<name>``.

v2's rules shape this driver: a controller is usable in a cgroup only when its parent
lists it in ``cgroup.subtree_control``, and a cgroup that hands controllers down may not
hold processes itself ("no internal processes"). So the driver enables memory, cpu and
pids in the root's and the parent's ``subtree_control`` and only ever puts processes in
the leaf container cgroups.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from dataclasses import dataclass

from gactor.kernel import bpf_devices
from gactor.kernel import cgroups as cg
from gactor.kernel.errors import CgroupError

_IN_MODIFY = 0x00000002
_libc = ctypes.CDLL(None, use_errno=True)

# v1 memory.stat names Garden reports, and the v2 counter each one is read from. v2
# counters already include descendants, so the v1 ``total_*`` twins get the same value.
_V1_NAMES = {
    "rss": "anon",
    "cache": "file",
    "mapped_file": "file_mapped",
    "active_anon": "active_anon",
    "inactive_anon": "inactive_anon",
    "active_file": "active_file",
    "inactive_file": "inactive_file",
    "unevictable": "unevictable",
    "pgfault": "pgfault",
    "pgmajfault": "pgmajfault",
}


@dataclass(frozen=True)
class CgroupV2(cg.Cgroup):
    """A container cgroup on v2: one directory, ``path``."""

    name: str
    path: str
    procs_files: tuple[str, ...]

    def _knob(self, filename: str) -> str:
        return os.path.join(self.path, filename)

    def set_memory_limit(self, limit_bytes: int, swap: bool = True) -> None:
        op = "cgroup.set_memory_limit"
        cg.write_file(op, self._knob("memory.max"), str(limit_bytes) if limit_bytes > 0 else "max")
        swap_max = self._knob("memory.swap.max")
        if cg.exists(swap_max):  # absent without swap accounting
            # v1's "memory+swap = limit" is v2's "no swap at all"; memory.max and
            # memory.swap.max are separate budgets.
            cg.write_file(op, swap_max, "0" if swap and limit_bytes > 0 else "max")

    def memory_limit(self) -> int:
        return cg.read_int("cgroup.memory_limit", self._knob("memory.max"))

    def set_cpu_shares(self, shares: int) -> None:
        weight = cg.shares_to_weight(shares)
        if weight == 0:
            return  # cpu.weight has no "unset" value (1..10000); 0 shares means "leave it"
        cg.write_file("cgroup.set_cpu_shares", self._knob("cpu.weight"), str(weight))

    def cpu_shares(self) -> int:
        return cg.read_int("cgroup.cpu_shares", self._knob("cpu.weight"))

    def set_cpu_quota(self, quota_us: int, period_us: int = 100000) -> None:
        quota = str(quota_us) if quota_us > 0 else "max"
        cg.write_file("cgroup.set_cpu_quota", self._knob("cpu.max"), f"{quota} {period_us}")

    def set_pids_max(self, n: int) -> None:
        cg.write_file("cgroup.set_pids_max", self._knob("pids.max"), str(n) if n > 0 else "max")

    def pids_max(self) -> int:
        return cg.read_int("cgroup.pids_max", self._knob("pids.max"))

    def pids_current(self) -> int:
        return cg.read_int("cgroup.pids_current", self._knob("pids.current"))

    def memory_stat(self) -> dict[str, int]:
        op = "cgroup.memory_stat"
        raw = cg.parse_keyed(cg.read_file(op, self._knob("memory.stat")))
        stat = dict(raw)
        for v1_name, v2_name in _V1_NAMES.items():
            stat[v1_name] = stat[f"total_{v1_name}"] = raw.get(v2_name, 0)
        swap_current = self._knob("memory.swap.current")
        swap = cg.read_int(op, swap_current) if cg.exists(swap_current) else 0
        stat["swap"] = stat["total_swap"] = swap
        limit = self.memory_limit()
        stat["hierarchical_memory_limit"] = limit or cg.UNLIMITED_BYTES
        swap_max_path = self._knob("memory.swap.max")
        swap_max = cg.read_file(op, swap_max_path).strip() if cg.exists(swap_max_path) else "max"
        unlimited = limit == 0 or swap_max == "max"
        stat["hierarchical_memsw_limit"] = (
            cg.UNLIMITED_BYTES if unlimited else limit + int(swap_max)
        )
        for key in cg.GARDEN_MEMORY_KEYS:
            stat.setdefault(key, 0)  # pgpgin/pgpgout have no v2 counterpart
        stat["total_usage_toward_limit"] = cg.total_usage_toward_limit_v2(raw)
        return stat

    def cpu_stat(self) -> tuple[int, int, int]:
        stat = cg.parse_keyed(cg.read_file("cgroup.cpu_stat", self._knob("cpu.stat")))
        return (
            stat.get("usage_usec", 0) * 1000,
            stat.get("user_usec", 0) * 1000,
            stat.get("system_usec", 0) * 1000,
        )

    def oom_events_fd(self) -> int:
        # v2 has no eventfd registration; memory.events raises a "modified" fsnotify event
        # whenever a counter (oom, oom_kill, ...) changes, which inotify delivers.
        path = self._knob("memory.events")
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise CgroupError("cgroup.oom_events_fd", ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise CgroupError("cgroup.oom_events_fd", err, path)
        return int(fd)

    def oom_kill_count(self) -> int:
        events = cg.read_file("cgroup.oom_kill_count", self._knob("memory.events"))
        return cg.parse_keyed(events).get("oom_kill", 0)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        kill_file = self._knob("cgroup.kill")
        for _ in range(cg.KILL_ROUNDS):
            if not self.pids():
                return
            if sig == signal.SIGKILL and cg.exists(kill_file):
                # cgroup.kill (5.14+) SIGKILLs every task, forks in flight included.
                cg.write_file("cgroup.kill_all", kill_file, "1")
            else:
                cg.signal_pids(self.pids(), sig)
            if sig != signal.SIGKILL:
                return
            if cg.wait_until_empty(self.procs_files, cg.KILL_WAIT_SECONDS):
                return
        raise CgroupError("cgroup.kill_all", errno.EBUSY, f"{self.name} still has processes")

    def destroy(self) -> None:
        cg.rmdir("cgroup.destroy", self.path)

    def setup_devices(self, allow: list[str]) -> None:
        """v2 has no devices.* files: attach an eBPF device program (``bpf_devices``) that
        denies every device ``allow`` does not list. It lives as long as the cgroup."""
        bpf_devices.attach(self.path, allow)


class CgroupV2Driver(cg.CgroupDriver):
    """Container cgroups under ``root/parent`` on a cgroup2 mount at ``root``."""

    version = 2

    def __init__(self, root: str, parent: str = "gactor") -> None:
        cg.check_name(parent)
        self.root = root
        self.parent = parent

    def parent_dirs(self) -> tuple[str, ...]:
        return (os.path.join(self.root, self.parent),)

    def _cgroup(self, name: str) -> CgroupV2:
        cg.check_name(name)
        path = os.path.join(self.root, self.parent, name)
        return CgroupV2(name=name, path=path, procs_files=(os.path.join(path, "cgroup.procs"),))

    def create(self, name: str) -> CgroupV2:
        cgroup = self._cgroup(name)
        parent_dir = os.path.dirname(cgroup.path)
        _enable_controllers(self.root)
        cg.mkdir("cgroup.create", parent_dir)  # shared by all containers; kept
        _enable_controllers(parent_dir)
        cg.mkdir("cgroup.create", cgroup.path)
        return cgroup

    def open(self, name: str) -> CgroupV2:
        cgroup = self._cgroup(name)
        if not cg.exists(cgroup.path):
            raise CgroupError("cgroup.open", errno.ENOENT, name)
        return cgroup

    def names(self) -> list[str]:
        return sorted(cg.child_names("cgroup.names", os.path.join(self.root, self.parent)))


def _enable_controllers(directory: str) -> None:
    """Hand memory, cpu and pids down to children, those this cgroup has and has not
    enabled yet. Writing only what is missing keeps this a no-op when nothing changes."""
    op = "cgroup.enable_controllers"
    available = cg.read_file(op, os.path.join(directory, "cgroup.controllers")).split()
    subtree_control = os.path.join(directory, "cgroup.subtree_control")
    enabled = cg.read_file(op, subtree_control).split()
    missing = [c for c in cg.V2_CONTROLLERS if c in available and c not in enabled]
    if missing:
        cg.write_file(op, subtree_control, " ".join(f"+{c}" for c in missing))
