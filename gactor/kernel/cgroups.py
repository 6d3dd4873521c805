"""Container cgroups: one interface over cgroup v1 and cgroup v2.

``discover()`` reads ``/proc/self/mountinfo`` and returns the driver for this host:
``CgroupV1Driver`` when v1 controller hierarchies are mounted (each controller mapped to its
own mount point; never assume ``cpu,cpuacct`` are joined), else ``CgroupV2Driver`` on a
cgroup2 mount that offers controllers. A driver creates and opens ``Cgroup`` objects under
one parent directory (``gactor``) in every hierarchy.

Everything here is synchronous and trio-free: small reads and writes of cgroupfs files.
Actors call it through ``trio.to_thread``. Every ``OSError`` becomes a ``CgroupError``
(a ``KernelError``) naming the file. Numbers follow Garden's conventions: a limit of 0
means unlimited, both when setting and when reading back.
"""

from __future__ import annotations

import abc
import errno
import math
import os
import re
import signal
import time
from dataclasses import dataclass

from gactor.kernel.errors import CgroupError

# cgroup v1 controllers a container joins. Named hierarchies (``name=systemd``) are
# bookkeeping of the init system, not resource controllers, and are left alone.
V1_CONTROLLERS = frozenset(
    "cpu cpuacct cpuset memory devices freezer blkio pids net_cls net_prio perf_event "
    "hugetlb rdma misc".split()
)
# Controllers enabled for containers on cgroup v2, in the order they are written.
V2_CONTROLLERS = ("memory", "cpu", "pids")

# What v1 reports for "no limit": PAGE_COUNTER_MAX pages, rounded down to the page size
# (9223372036854771712 with 4 KiB pages). v2 reports the same number in memory.stat
# so both drivers hand the metrics code one convention.
UNLIMITED_BYTES = (2**63 - 1) // os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PAGE_SIZE")
# Any v1 limit at or above this is the kernel's "unlimited".
_UNLIMITED_THRESHOLD = 2**62

# Bounds for teardown: rounds of freeze/kill/thaw, how long each round waits for the
# cgroup to empty, how often rmdir retries EBUSY, and the poll interval for all of them.
KILL_ROUNDS = 5
KILL_WAIT_SECONDS = 1.0
RMDIR_ATTEMPTS = 50
_POLL_INTERVAL = 0.01

# Garden's ContainerMemoryStat keys: always present in memory_stat(), 0 when the
# kernel has no such counter.
GARDEN_MEMORY_KEYS = tuple(
    """
    active_anon active_file cache hierarchical_memory_limit inactive_anon inactive_file
    mapped_file pgfault pgmajfault pgpgin pgpgout rss total_active_anon total_active_file
    total_cache total_inactive_anon total_inactive_file total_mapped_file total_pgfault
    total_pgmajfault total_pgpgin total_pgpgout total_rss total_unevictable unevictable swap
    hierarchical_memsw_limit total_swap anon file swapcached
    """.split()
)


# ---------------------------------------------------------------------------------------
# cgroupfs file access


def read_file(op: str, path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError as err:
        raise CgroupError.from_os_error(op, err, path) from err


def write_file(op: str, path: str, value: str) -> None:
    """One ``write(2)`` per value: cgroupfs parses each write call on its own."""
    try:
        # No O_CREAT: a missing knob is an error (wrong controller or kernel), not a file
        # to create. O_TRUNC does nothing on cgroupfs and keeps plain-file fakes honest.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode("ascii"))
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError.from_os_error(op, err, f"{path} <- {value!r}") from err


def read_int(op: str, path: str) -> int:
    """An integer knob; ``max`` (v2 and pids.max) reads as 0, Garden's "unlimited"."""
    text = read_file(op, path).strip()
    return 0 if text == "max" else int(text)


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files (memory.stat, cpu.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def exists(path: str) -> bool:
    return os.path.exists(path)


def mkdir(op: str, path: str) -> bool:
    """Create a cgroup directory; returns False when it already existed."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except OSError as err:
        raise CgroupError.from_os_error(op, err, path) from err
    return True


def rmdir(op: str, path: str) -> None:
    """Remove a cgroup directory. Missing is fine (idempotent teardown); EBUSY means tasks
    are still exiting, so retry for a bounded time before giving up."""
    for attempt in range(RMDIR_ATTEMPTS):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY or attempt == RMDIR_ATTEMPTS - 1:
                raise CgroupError.from_os_error(op, err, path) from err
        time.sleep(_POLL_INTERVAL)


def child_names(op: str, path: str) -> set[str]:
    try:
        with os.scandir(path) as it:
            return {e.name for e in it if e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise CgroupError.from_os_error(op, err, path) from err


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # exited between reading cgroup.procs and the kill


def wait_until_empty(procs_files: tuple[str, ...], timeout: float) -> bool:
    """Poll cgroup.procs until no process is left; False when ``timeout`` passes first.
    The kernel offers no wait on v1, and v2's cgroup.events is overkill for a teardown."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(read_file("cgroup.pids", p).strip() for p in procs_files if exists(p)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)


def check_name(name: str) -> None:
    # A name is one path component: "..", "a/b" or "" would escape or alias the parent.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise CgroupError("cgroup.name", errno.EINVAL, repr(name))


# ---------------------------------------------------------------------------------------
# Pure conversions


def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` to v2 ``cpu.weight`` with runc's conversion.

    Maps the v1 range [2, 262144] onto [1, 10000] so that 1024 (the v1 default) lands on
    100 (the v2 default); 0 stays 0, meaning "not set".
    """
    if shares == 0:
        return 0
    if shares <= 2:
        return 1
    if shares >= 262144:
        return 10000
    log = math.log2(shares)
    return math.ceil(10 ** ((log * log + 125 * log) / 612.0 - 7.0 / 34.0))


def total_usage_toward_limit_v1(stat: dict[str, int]) -> int:
    """Usage the way v1 enforces the limit: rss + cache + swap, less reclaimable file cache."""
    used = stat.get("total_rss", 0) + stat.get("total_cache", 0) + stat.get("total_swap", 0)
    return max(0, used - stat.get("total_inactive_file", 0))


def total_usage_toward_limit_v2(stat: dict[str, int]) -> int:
    """Guardian's v2 formula: file + anon + swapcached, less inactive file cache."""
    used = stat.get("file", 0) + stat.get("anon", 0) + stat.get("swapcached", 0)
    return max(0, used - stat.get("inactive_file", 0))


def limit_from_kernel(value: int) -> int:
    """A v1 byte limit as Garden reports it: the kernel's huge "unlimited" becomes 0."""
    return 0 if value >= _UNLIMITED_THRESHOLD or value < 0 else value


# ---------------------------------------------------------------------------------------
# Interface


class Cgroup(abc.ABC):
    """One container's cgroup, in every hierarchy the driver manages.

    Holds paths only, no fds: it is cheap to pass between threads and to rebuild with
    ``driver.open(name)``. ``procs_files`` is a plain tuple so a forked child can write
    its own pid into each file before exec without calling back into Python objects.
    """

    name: str
    procs_files: tuple[str, ...]

    def add_process(self, pid: int) -> None:
        for path in self.procs_files:
            write_file("cgroup.add_process", path, str(pid))

    def pids(self) -> list[int]:
        """Processes in the cgroup, in any hierarchy, sorted."""
        found: set[int] = set()
        for path in self.procs_files:
            if exists(path):
                found.update(int(p) for p in read_file("cgroup.pids", path).split())
        return sorted(found)

    @abc.abstractmethod
    def set_memory_limit(self, limit_bytes: int, swap: bool = True) -> None:
        """Limit memory; with ``swap``, memory+swap too (Garden: no swap beyond the limit).
        0 removes the limit."""

    @abc.abstractmethod
    def memory_limit(self) -> int:
        """The memory limit in bytes, 0 when unlimited."""

    @abc.abstractmethod
    def set_cpu_shares(self, shares: int) -> None:
        """Relative CPU weight in v1 shares units (v2 converts with ``shares_to_weight``)."""

    @abc.abstractmethod
    def cpu_shares(self) -> int:
        """v1 ``cpu.shares`` or v2 ``cpu.weight``: Garden's ``CurrentCPULimits`` value."""

    @abc.abstractmethod
    def set_cpu_quota(self, quota_us: int, period_us: int = 100000) -> None:
        """CFS hard cap: ``quota_us`` per ``period_us``; ``quota_us <= 0`` removes it."""

    @abc.abstractmethod
    def set_pids_max(self, n: int) -> None:
        """Maximum number of tasks; 0 means unlimited."""

    @abc.abstractmethod
    def pids_max(self) -> int:
        """The pids limit, 0 when unlimited."""

    @abc.abstractmethod
    def pids_current(self) -> int: ...

    @abc.abstractmethod
    def memory_stat(self) -> dict[str, int]:
        """Raw memory.stat plus every ``GARDEN_MEMORY_KEYS`` key (v1 names) and
        ``total_usage_toward_limit``."""

    @abc.abstractmethod
    def cpu_stat(self) -> tuple[int, int, int]:
        """Cumulative (usage, user, system) CPU time in nanoseconds."""

    @abc.abstractmethod
    def oom_events_fd(self) -> int:
        """A new non-blocking fd that becomes readable on OOM events.

        The caller owns the fd: it waits for readability, drains it with ``os.read``,
        checks ``oom_kill_count()`` (a readable fd is a hint, not a count) and closes it.
        """

    @abc.abstractmethod
    def oom_kill_count(self) -> int:
        """How many processes the OOM killer has killed in this cgroup."""

    @abc.abstractmethod
    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process, including ones forked meanwhile.

        With SIGKILL, returns once the cgroup is empty; raises ``CgroupError(EBUSY)`` when
        it is still populated after a bounded number of rounds.
        """

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove the cgroup from every hierarchy. Idempotent: a missing directory is fine.
        Retries EBUSY briefly (exiting tasks), then raises ``CgroupError``."""

    @abc.abstractmethod
    def setup_devices(self, allow: list[str]) -> None:
        """Deny every device, then allow each rule, e.g. ``"c 1:3 rwm"``."""


class CgroupDriver(abc.ABC):
    """Creates and finds container cgroups under ``parent`` in every hierarchy."""

    version: int
    parent: str

    @abc.abstractmethod
    def create(self, name: str) -> Cgroup:
        """Create (or adopt an existing) cgroup ``name``. On failure, removes what it made
        and raises ``CgroupError``; on success the caller owns it and must ``destroy()``."""

    @abc.abstractmethod
    def open(self, name: str) -> Cgroup:
        """An existing cgroup; ``CgroupError(ENOENT)`` when it exists in no hierarchy."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Container cgroups under the parent in any hierarchy, sorted (startup reconcile)."""

    @abc.abstractmethod
    def parent_dirs(self) -> tuple[str, ...]:
        """The parent directory in every hierarchy."""

    def remove_parent(self) -> None:
        """Remove the parent directories if no container cgroup is left (server shutdown)."""
        if self.names():
            return
        for directory in self.parent_dirs():
            try:
                os.rmdir(directory)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise CgroupError("cgroup.remove_parent", err.errno or 0, directory) from err


# ---------------------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True)
class CgroupMounts:
    """What mountinfo says: v1 controller -> mount point, and the first cgroup2 mount."""

    v1: dict[str, str]
    v2: str | None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> CgroupMounts:
    """Find cgroup mounts in ``/proc/<pid>/mountinfo`` text. The first mount of a
    hierarchy wins (later ones are usually bind mounts of it)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        mount_point, fstype = _unescape(fields[4]), fields[sep + 1]
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup" and len(fields) > sep + 3:
            for option in fields[sep + 3].split(","):
                if option in V1_CONTROLLERS:
                    v1.setdefault(option, mount_point)
    return CgroupMounts(v1=v1, v2=v2)


def discover(mountinfo: str = "/proc/self/mountinfo", parent: str = "gactor") -> CgroupDriver:
    """The driver for this host: v1 when any v1 controller is mounted, else v2 when the
    cgroup2 mount offers controllers. Raises ``CgroupError(ENOENT)`` when neither."""
    # The driver modules import this module's helpers, so import them only when used.
    from gactor.kernel.cgroups_v1 import CgroupV1Driver
    from gactor.kernel.cgroups_v2 import CgroupV2Driver

    mounts = parse_mountinfo(read_file("cgroup.discover", mountinfo))
    if mounts.v1:
        return CgroupV1Driver(mounts=mounts.v1, parent=parent)
    if mounts.v2 is not None:
        controllers_file = os.path.join(mounts.v2, "cgroup.controllers")
        if exists(controllers_file) and read_file("cgroup.discover", controllers_file).split():
            return CgroupV2Driver(root=mounts.v2, parent=parent)
    raise CgroupError("cgroup.discover", errno.ENOENT, f"no usable cgroup hierarchy in {mountinfo}")


# ---------------------------------------------------------------------------------------
# v1 controllers the host enables but does not mount

def unmounted_v1_controllers(proc_cgroups: str = "/proc/cgroups",
                             mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Controllers ``/proc/cgroups`` lists as enabled that no cgroup v1 mount we can see
    carries: in no hierarchy (hierarchy 0), or in a hierarchy mounted nowhere here (one a
    mount namespace that has gone left behind, which the kernel keeps, dormant, while
    anything still refers to it; mounting it again takes it back)."""
    mounted: set[str] = set()
    for line in read_file("cgroup.controllers", mountinfo).splitlines():
        _, _, tail = line.partition(" - ")
        fields = tail.split()
        if len(fields) >= 3 and fields[0] == "cgroup":
            mounted.update(fields[2].split(","))
    names = []
    for line in read_file("cgroup.controllers", proc_cgroups).splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#") and fields[3] == "1" \
                and (fields[1] == "0" or fields[0] not in mounted):
            names.append(fields[0])
    return names


def mount_missing_v1(root: str = "/sys/fs/cgroup") -> list[str]:
    """Mount each enabled but unmounted v1 controller at ``<root>/<name>``, as Garden's
    server does; returns the ones mounted. Only where ``root`` holds v1 hierarchies (a
    tmpfs); the mounts stay after the server exits. Every container then also gets a
    cgroup in each (one more directory per create, one more migration per create and per
    process each)."""
    from gactor.kernel import linux as L

    if not os.path.isdir(os.path.join(root, "memory")) or os.path.exists(os.path.join(root, "cgroup.controllers")):
        return []  # not a v1 layout (a cgroup2 root has cgroup.controllers)
    mounted = []
    for name in unmounted_v1_controllers():
        target = os.path.join(root, name)
        os.makedirs(target, exist_ok=True)
        try:
            L.mount("cgroup", target, "cgroup", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, name)
        except OSError as err:
            raise CgroupError("mount", err.errno or 0, f"cgroup {name} on {target}: {err}") from err
        mounted.append(name)
    return mounted


# ---------------------------------------------------------------------------------------
# favordynmods

def favordynmods_plan(text: str) -> list[tuple[str, str]]:
    """Remounts that would turn on ``favordynmods``, best first, from mountinfo ``text``;
    empty when a cgroup mount already shows it.

    Moving a task between cgroups (every create and run writes ``cgroup.procs``) takes the
    global threadgroup rwsem, whose writer waits for an RCU grace period: 6–24 ms here.
    ``favordynmods`` on any hierarchy switches the kernel to a per-threadgroup rwsem
    (0.5 ms), at the cost of slightly costlier forks and exits; on 6.18 it cannot be
    turned off again until reboot. A remount must repeat the hierarchy's other options
    (a cgroup2 remount resets the flags it is not given; a v1 one must name its
    controllers), so each plan carries them; v1 hierarchies with a release agent are left
    alone (it cannot be given again)."""
    plans: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2") or len(fields) <= sep + 3:
            continue
        options = [o for o in fields[sep + 3].split(",") if o not in ("rw", "ro")]
        if "favordynmods" in options:
            return []
        if any(o.startswith("release_agent=") for o in options):
            continue
        plan = (_unescape(fields[4]), ",".join([*options, "favordynmods"]))
        plans.insert(0, plan) if fstype == "cgroup2" else plans.append(plan)
    return plans


def favor_dynmods(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Turn ``favordynmods`` on (see ``favordynmods_plan``); the mount point remounted,
    None when it was on already. Raises CgroupError when no remount worked."""
    from gactor.kernel import linux as L

    plans = favordynmods_plan(read_file("cgroup.favordynmods", mountinfo))
    if not plans:
        return None
    errors = []
    for point, options in plans:
        try:
            L.mount("", point, None, L.MS_REMOUNT, options)
            return point
        except OSError as err:
            errors.append(f"{point}: {err}")
    raise CgroupError("cgroup.favordynmods", errno.EINVAL, "; ".join(errors) or "no cgroup mount")
