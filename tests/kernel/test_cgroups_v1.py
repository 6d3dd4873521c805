"""The cgroup v1 driver against this machine's kernel (root only).

Every test works under a fresh ``gactor-test-<random>`` parent; the fixture kills what
is left, removes every container cgroup and the parent in each hierarchy, and fails
the test if anything stays behind.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from gactor.kernel.cgroups import discover, parse_mountinfo
from gactor.kernel.cgroups_v1 import CgroupV1, CgroupV1Driver
from gactor.kernel.cgroups_v2 import CgroupV2Driver
from gactor.kernel.errors import CgroupError

MiB = 1 << 20


def _mounts() -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read()).v1


pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(
        not {"memory", "cpu", "cpuacct", "pids", "freezer"} <= _mounts().keys(),
        reason="needs cgroup v1 memory, cpu, cpuacct, pids and freezer hierarchies",
    ),
]


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def driver() -> Iterator[CgroupV1Driver]:
    parent = f"gactor-test-{secrets.token_hex(4)}"
    found = discover(parent=parent)
    assert isinstance(found, CgroupV1Driver)
    parent_dirs = sorted({os.path.join(m, parent) for m in found.mounts.values()})
    try:
        yield found
    finally:
        leftovers = found.names()
        for name in leftovers:
            cgroup = found.open(name)
            cgroup.kill_all()
            cgroup.destroy()
        for directory in parent_dirs:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
        assert not [d for d in parent_dirs if os.path.exists(d)]
        assert leftovers == [], "test left container cgroups behind"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_limits_read_back(driver: CgroupV1Driver) -> None:
    cgroup = driver.create("limits")
    try:
        memsw = os.path.join(cgroup.dirs["memory"], "memory.memsw.limit_in_bytes")
        cgroup.set_memory_limit(64 * MiB)
        assert cgroup.memory_limit() == 64 * MiB
        assert int(_read(memsw)) == 64 * MiB
        cgroup.set_memory_limit(32 * MiB)  # lowering: limit first, then memsw
        assert (cgroup.memory_limit(), int(_read(memsw))) == (32 * MiB, 32 * MiB)
        cgroup.set_memory_limit(128 * MiB)  # raising: memsw first, then limit
        assert (cgroup.memory_limit(), int(_read(memsw))) == (128 * MiB, 128 * MiB)
        cgroup.set_memory_limit(16 * MiB, swap=False)
        assert cgroup.memory_limit() == 16 * MiB
        assert int(_read(memsw)) >= 2**62
        cgroup.set_memory_limit(0)
        assert cgroup.memory_limit() == 0

        cgroup.set_cpu_shares(50)
        assert cgroup.cpu_shares() == 50
        cgroup.set_cpu_quota(50000)
        assert _read(os.path.join(cgroup.dirs["cpu"], "cpu.cfs_quota_us")) == "50000"
        cgroup.set_cpu_quota(0)
        assert _read(os.path.join(cgroup.dirs["cpu"], "cpu.cfs_quota_us")) == "-1"

        cgroup.set_pids_max(50)
        assert cgroup.pids_max() == 50
        cgroup.set_pids_max(0)
        assert cgroup.pids_max() == 0
        assert cgroup.pids_current() == 0

        if "devices" in cgroup.dirs:
            cgroup.setup_devices(["c 1:3 rwm", "c 1:5 rwm"])
            assert _read(os.path.join(cgroup.dirs["devices"], "devices.list")).split("\n") == [
                "c 1:3 rwm",
                "c 1:5 rwm",
            ]
        if "cpuset" in cgroup.dirs:  # inherited, or no task could join
            assert _read(os.path.join(cgroup.dirs["cpuset"], "cpuset.cpus"))
    finally:
        cgroup.destroy()


def test_process_joins_is_measured_and_killed(
    driver: CgroupV1Driver, sleeper: subprocess.Popen[bytes]
) -> None:
    cgroup = driver.create("proc")
    assert driver.names() == ["proc"]
    assert driver.open("proc") == cgroup

    cgroup.add_process(sleeper.pid)

    assert cgroup.pids() == [sleeper.pid]
    assert cgroup.pids_current() == 1
    usage, user, system = cgroup.cpu_stat()
    assert all(isinstance(v, int) and v >= 0 for v in (usage, user, system))
    stat = cgroup.memory_stat()
    assert all(isinstance(v, int) for v in stat.values())
    assert stat["total_usage_toward_limit"] >= 0

    cgroup.kill_all()

    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert cgroup.pids() == []
    cgroup.destroy()
    assert not any(os.path.exists(d) for d in cgroup.unique_dirs)
    cgroup.destroy()  # idempotent
    assert driver.names() == []
    with pytest.raises(CgroupError) as info:
        driver.open("proc")
    assert info.value.errno == errno.ENOENT


def test_oom_kill_is_counted_and_signalled(driver: CgroupV1Driver) -> None:
    cgroup: CgroupV1 = driver.create("oom")
    fd = cgroup.oom_events_fd()
    try:
        cgroup.set_memory_limit(32 * MiB)
        # Join from inside the child before exec, the way the spawner does.
        script = 'for f in "$@"; do echo $$ > "$f"; done; exec "$0" -c "x = b\'1\' * (100 << 20)"'
        proc = subprocess.Popen(["sh", "-c", script, sys.executable, *cgroup.procs_files])

        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert cgroup.oom_kill_count() >= 1
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert int.from_bytes(os.read(fd, 8), sys.byteorder) >= 1
    finally:
        os.close(fd)
        cgroup.kill_all()
        cgroup.destroy()


def test_kill_all_reaches_forked_children(driver: CgroupV1Driver) -> None:
    cgroup = driver.create("forks")
    try:
        script = 'for f in "$@"; do echo $$ > "$f"; done; sleep 30 & sleep 30 & wait'
        proc = subprocess.Popen(["sh", "-c", script, "sh", *cgroup.procs_files])
        assert _wait_for(lambda: len(cgroup.pids()) == 3, timeout=5)

        cgroup.kill_all()

        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert cgroup.pids() == []
    finally:
        cgroup.kill_all()
        cgroup.destroy()


@pytest.mark.skipif(
    not os.path.exists("/sys/fs/cgroup/unified/cgroup.procs"), reason="no cgroup2 mount"
)
def test_v2_driver_on_the_controller_free_unified_hierarchy(
    sleeper: subprocess.Popen[bytes],
) -> None:
    # The hybrid host's cgroup2 mount has no controllers, but membership, cgroup.kill
    # and rmdir are real v2: exercise them with the v2 driver.
    parent = f"gactor-test-{secrets.token_hex(4)}"
    driver = CgroupV2Driver(root="/sys/fs/cgroup/unified", parent=parent)
    try:
        cgroup = driver.create("c1")
        cgroup.add_process(sleeper.pid)
        assert cgroup.pids() == [sleeper.pid]

        cgroup.kill_all()

        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        cgroup.destroy()
        cgroup.destroy()
        assert driver.names() == []
    finally:
        for name in driver.names():
            driver.open(name).kill_all()
            driver.open(name).destroy()
        try:
            os.rmdir(os.path.join(driver.root, parent))
        except FileNotFoundError:
            pass
