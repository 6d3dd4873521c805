"""Shared pieces of the e2e suite: output sinks, a run helper, bounded waits and
host-side inspectors that look at what the server left in the kernel.

The inspectors read ``/proc`` and ``/sys/fs/cgroup`` directly, so a test checks the
effect of an API call from outside the server rather than trusting its answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import os
import re
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import pytest
import trio

from gactor import ProcessIO, ProcessSpec

ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_TIMEOUT = 30.0
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"

E2E_MARKS = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="e2e tests run the server as root"),
]


def unique_handle(prefix: str = "e2e") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- sinks and stdin sources -------------------------------------------------------


class Sink:
    """Collects every byte sent to it (a ProcessIO stdout/stderr)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.chunks = 0

    async def send_all(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


class CountingSink:
    """Counts bytes without keeping them; ``check`` sees every chunk (e.g. all zeros)."""

    def __init__(self, check: Callable[[bytes], bool] | None = None) -> None:
        self.count = 0
        self.chunks = 0
        self.bad_chunks = 0
        self._check = check

    async def send_all(self, data: bytes) -> None:
        self.count += len(data)
        self.chunks += 1
        if self._check is not None and not self._check(data):
            self.bad_chunks += 1


class SlowSink(CountingSink):
    """A slow reader: sleeps ``delay`` after each chunk for the first ``slow_for`` seconds."""

    def __init__(self, delay: float, slow_for: float) -> None:
        super().__init__(check=lambda chunk: not chunk.strip(b"\0"))
        self._delay = delay
        self._slow_for = slow_for
        self._slow_until: float | None = None

    async def send_all(self, data: bytes) -> None:
        await super().send_all(data)
        now = trio.current_time()
        if self._slow_until is None:
            self._slow_until = now + self._slow_for
        if now < self._slow_until:
            await trio.sleep(self._delay)


class StdinGate:
    """Stdin that sends ``first``, then holds the pipe open until ``release(data)``.

    Lets a test hold a process at a known point (blocked reading stdin) without sleeping.
    """

    def __init__(self, first: bytes = b"") -> None:
        self._first = first
        self._released = trio.Event()
        self._rest = b""

    def release(self, data: bytes = b"") -> None:
        self._rest = data
        self._released.set()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        await self._released.wait()
        if self._rest:
            yield self._rest

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()


def one_file_tar(name: str, data: bytes) -> bytes:
    """An uncompressed tar holding one regular file ``name`` (mode 0644) with ``data``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        entry = tarfile.TarInfo(name)
        entry.size, entry.mode = len(data), 0o644
        tar.addfile(entry, io.BytesIO(data))
    return buf.getvalue()


# ---- running processes -------------------------------------------------------------


async def run(
    container: Any,
    path: str,
    args: Sequence[str] = (),
    *,
    stdin: Any = None,
    seconds: float = DEFAULT_TIMEOUT,
    **spec_kwargs: Any,
) -> tuple[int, bytes, bytes]:
    """Run ``path args`` to completion; returns (exit code, stdout, stderr)."""
    out, err = Sink(), Sink()
    with trio.fail_after(seconds):
        process = await container.run(
            ProcessSpec(path=path, args=list(args), **spec_kwargs),
            ProcessIO(stdin=stdin, stdout=out, stderr=err),
        )
        code = await process.wait()
    return code, bytes(out.data), bytes(err.data)


async def sh(container: Any, script: str, **kwargs: Any) -> tuple[int, bytes, bytes]:
    return await run(container, "sh", ["-c", script], **kwargs)


async def sh_ok(container: Any, script: str, **kwargs: Any) -> str:
    """Run a shell script that must exit 0; returns its stdout as text."""
    code, out, err = await sh(container, script, **kwargs)
    assert code == 0, f"{script!r} exited {code}: stdout={out!r} stderr={err!r}"
    return out.decode()


async def ensure_user(container: Any, name: str = "alice") -> None:
    """GATS' createUser: ``id -u NAME || adduser -D NAME`` as root must exit 0."""
    await sh_ok(container, f"id -u {name} || adduser -D {name}", user="root")


async def wait_for(
    predicate: Callable[[], Any], within: float = 10.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; returns it.

    Fails the test after ``within`` seconds, showing the last value seen.
    """
    deadline = trio.current_time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if trio.current_time() >= deadline:
            pytest.fail(
                f"timed out after {within}s waiting for {what or predicate}: last {value!r}"
            )
        await trio.sleep(interval)


async def wait_until_equal(
    snapshot: Callable[[], Any], expected: Any, within: float = 10.0, interval: float = 0.05
) -> None:
    """Poll ``snapshot()`` until it equals ``expected``; fail with a diff-friendly assert."""
    deadline = trio.current_time() + within
    while True:
        current = snapshot()
        if current == expected:
            return
        if trio.current_time() >= deadline:
            if isinstance(current, dict) and isinstance(expected, dict):
                changed = {k: (expected.get(k), current.get(k)) for k in current.keys() | expected.keys()
                           if current.get(k) != expected.get(k)}
                pytest.fail(f"still different after {within}s (key: (expected, now)): {changed}")
            pytest.fail(f"still different after {within}s: expected {expected!r}, now {current!r}")
        await trio.sleep(interval)


# ---- host-side inspectors ------------------------------------------------------------


def _walk(top: str, max_depth: int, dirs_only: bool = True) -> list[str]:
    """Paths under ``top`` down to ``max_depth`` levels (directories only, by default),
    without following symlinks; whatever vanishes meanwhile is skipped."""
    found: list[str] = []
    stack = [(top, 0)]
    while stack:
        path, depth = stack.pop()
        if depth >= max_depth:
            continue
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if is_dir or not dirs_only:
                        found.append(entry.path)
                    if is_dir:
                        stack.append((entry.path, depth + 1))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return found


def cgroup_hierarchies() -> list[str]:
    try:
        names = sorted(os.listdir(CGROUP_ROOT))
    except FileNotFoundError:
        return []
    return [
        os.path.join(CGROUP_ROOT, n)
        for n in names
        if os.path.isdir(os.path.join(CGROUP_ROOT, n))
        and not os.path.islink(os.path.join(CGROUP_ROOT, n))
    ]


def cgroup_dirs(handle: str, max_depth: int = 4) -> list[str]:
    """Every cgroup directory named ``handle`` in any hierarchy, up to ``max_depth`` deep."""
    found = []
    for hierarchy in cgroup_hierarchies():
        found += [p for p in _walk(hierarchy, max_depth) if os.path.basename(p) == handle]
    return sorted(found)


def cgroup_parent_name(depot: str) -> str:
    """The cgroup parent a server with this (non-default) depot puts its containers in."""
    digest = hashlib.sha256(os.path.realpath(depot).encode()).hexdigest()[:10]
    return f"gactor-{digest}"


def server_cgroup_dirs(depot: str, max_depth: int = 5) -> set[str]:
    """Every cgroup directory under the server's parent, in every hierarchy."""
    parent = cgroup_parent_name(depot)
    found = set()
    for hierarchy in cgroup_hierarchies():
        for path in _walk(hierarchy, max_depth):
            parts = os.path.relpath(path, hierarchy).split(os.sep)
            if parent in parts[:-1]:
                found.add(path)
    return found


def _procs_in(dirs: Iterable[str]) -> set[int]:
    pids: set[int] = set()
    for path in dirs:
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue  # removed meanwhile
    return pids


def server_cgroup_pids(depot: str) -> set[int]:
    return _procs_in(server_cgroup_dirs(depot))


def container_pids(handle: str) -> set[int]:
    """Host pids of the processes in the container's cgroups (all hierarchies)."""
    return _procs_in(cgroup_dirs(handle))


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict; empty when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proc_name(pid: int) -> str:
    return proc_status(pid).get("Name", "")


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS), 0 when gone."""
    value = proc_status(pid).get("VmRSS", "0 kB").split()[0]
    return int(value) * 1024


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def processes_named(name: str, marker: str | None = None) -> set[int]:
    """Pids whose ``Name:`` is ``name`` and, if given, whose cmdline contains ``marker``.

    Shims are titled ``gactor-shim <container dir>``: the depot path as marker tells
    our server's apart from any other server's on the host.
    """
    found = set()
    for pid in all_pids():
        if proc_name(pid) != name:
            continue
        if marker is not None and marker not in proc_cmdline(pid):
            continue
        found.add(pid)
    return found


def server_shims(depot: str) -> set[int]:
    return processes_named("gactor-shim", depot)


def server_forkers(depot: str) -> set[int]:
    """The shims' process forkers (gactor.kernel.spawn.Forker), titled like their shim."""
    return processes_named("gactor-forker", depot)


def server_inits(depot: str) -> set[int]:
    """garden-init processes of this server's containers: children of its shims, or
    members of its cgroups (an init whose shim died is still found)."""
    shims = server_shims(depot)
    in_cgroups = server_cgroup_pids(depot)
    return {
        pid
        for pid in processes_named("garden-init")
        if pid in in_cgroups or int(proc_status(pid).get("PPid", "0")) in shims
    }


def mounts_containing(s: str, pid: int | str = "self") -> list[str]:
    """Lines of ``/proc/PID/mountinfo`` that mention ``s``."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return [line for line in f.read().splitlines() if s in line]
    except (FileNotFoundError, ProcessLookupError):
        return []


def server_fds(pid: int) -> int:
    """How many file descriptors the process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def paths_under(top: str, max_depth: int = 3, skip: Sequence[str] = ()) -> set[str]:
    """Relative paths of every file and directory under ``top``, up to ``max_depth``,
    leaving out ``skip`` entries and everything below them."""
    found = set()
    for path in _walk(top, max_depth, dirs_only=False):
        rel = os.path.relpath(path, top)
        if not any(rel == s or rel.startswith(s + os.sep) for s in skip):
            found.add(rel)
    return found


def link_names() -> set[str]:
    """Names of the network links in the host's network namespace."""
    result = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    )
    names = set()
    for line in result.stdout.splitlines():
        match = re.match(r"\d+:\s+([^:@]+)", line)
        if match:
            names.add(match.group(1))
    return names


def host_snapshot(server: Any) -> dict[str, object]:
    """What a server has on the host: cgroups, mounts, depot entries, its fds, shims, inits.

    Equal snapshots before and after some work mean the work left nothing behind."""
    depot, pid = server.depot, server.proc.pid
    return {
        "cgroups": sorted(server_cgroup_dirs(depot)),
        "mounts (host)": mounts_containing(depot),
        "mounts (server)": mounts_containing(depot, pid),
        # images/mnt/ is the image store's pool of empty, reusable mount points for idmapped
        # layers (it grows to the most concurrent creates seen): not a leak.
        # A shim writes shim.pid and init.pid after its create has returned (for people
        # looking at the depot), so a snapshot right after a create may or may not see them.
        "depot": sorted(p for p in paths_under(depot, max_depth=3)
                        if not p.startswith("images/mnt/") and not p.endswith(("/shim.pid", "/init.pid"))),
        "server fds": server_fds(pid),
        "gactor-shim": sorted(server_shims(depot)),
        "garden-init": sorted(server_inits(depot)),
        "loop devices": loop_devices_under(depot),
    }


def loop_devices_under(directory: str) -> list[str]:
    """Loop devices whose backing file lies under ``directory`` (disk-limited containers)."""
    import glob

    found = []
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError), open(backing) as f:
            if f.read().strip().startswith(directory):
                found.append(backing.split("/")[3])
    return sorted(found)


async def wait_until_nothing_left(server: Any, before: dict[str, object], within: float = 15.0) -> None:
    """Wait until the host looks as in ``before``. The server may hold fewer fds than then
    (a connection of an earlier test was still closing), never more."""

    # Directories in the trash then were on their way out (the janitor removes them in
    # the background): expect them gone, and nothing else in the trash either.
    depot_before = before.get("depot")
    if isinstance(depot_before, list):
        before = {**before, "depot": [p for p in depot_before if not p.startswith("trash/")]}

    def now() -> dict[str, object]:
        snap = host_snapshot(server)
        fds, baseline = snap["server fds"], before["server fds"]
        assert isinstance(fds, int)
        assert isinstance(baseline, int)
        snap["server fds"] = max(fds, baseline)  # fewer than before counts as "as before"
        return snap

    await wait_until_equal(now, before, within)


# ---- networking ------------------------------------------------------------------------


async def init_pid(handle: str) -> int:
    """Host pid of the container's garden-init, found through its cgroup."""

    def find() -> int:
        inits = [p for p in container_pids(handle) if proc_name(p) == "garden-init"]
        return inits[0] if len(inits) == 1 else 0

    return int(await wait_for(find, 10, what=f"the garden-init of {handle}"))


def ip_json(*args: str) -> Any:
    """``ip -j ARGS`` parsed (a list)."""
    import json

    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def in_netns(pid: int, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` on the host in the network namespace of ``pid`` (bounded in time)."""
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *cmd],
                          capture_output=True, text=True, timeout=timeout)
