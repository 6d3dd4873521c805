"""The cgroup drivers against a fake cgroupfs in tmp_path, plus the pure conversions.

The fake reproduces the v2 kernel's file names and starting values. A plain directory
does not grow interface files on mkdir, so each test creates what the kernel would show
(``make_cgroup``) before the driver runs; the driver tolerates existing directories and
never learns about the fake. Assertions read back what the driver wrote.
"""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

import pytest

from gactor.kernel.cgroups import (
    GARDEN_MEMORY_KEYS,
    UNLIMITED_BYTES,
    discover,
    parse_mountinfo,
    shares_to_weight,
)
from gactor.kernel.cgroups_v1 import CgroupV1Driver
from gactor.kernel.cgroups_v2 import CgroupV2, CgroupV2Driver
from gactor.kernel.errors import CgroupError, KernelError

ALL = ["cpu", "memory", "pids"]
MiB = 1 << 20

SAMPLE_MEMORY_STAT = """\
anon 4194304
file 8388608
kernel 917504
kernel_stack 49152
pagetables 94208
sock 0
shmem 0
file_mapped 2097152
file_dirty 0
file_writeback 0
swapcached 65536
anon_thp 0
inactive_anon 4096000
active_anon 98304
inactive_file 6291456
active_file 2097152
unevictable 0
slab_reclaimable 655360
slab_unreclaimable 118784
slab 774144
pgfault 5000
pgmajfault 12
workingset_refault_anon 0
"""


def make_cgroup(directory: Path, controllers: list[str], root: bool = False) -> Path:
    """The files a v2 kernel shows in a cgroup whose parent hands it ``controllers``."""
    directory.mkdir(exist_ok=True)
    files = {
        "cgroup.controllers": " ".join(controllers) + "\n",
        "cgroup.subtree_control": "\n",
        "cgroup.procs": "",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    }
    if not root:  # the root cgroup has no cgroup.kill, cgroup.events or limits
        files |= {"cgroup.kill": "", "cgroup.events": "populated 0\nfrozen 0\n"}
        if "memory" in controllers:
            files |= {
                "memory.max": "max\n",
                "memory.swap.max": "max\n",
                "memory.swap.current": "0\n",
                "memory.current": "0\n",
                "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
                "memory.stat": "anon 0\nfile 0\n",
            }
        if "cpu" in controllers:
            files |= {"cpu.weight": "100\n", "cpu.max": "max 100000\n"}
        if "pids" in controllers:
            files |= {"pids.max": "max\n", "pids.current": "0\n"}
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def read(path: Path) -> str:
    return path.read_text().strip()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_cgroup(tmp_path / "cgroup", ["cpuset", "cpu", "io", "memory", "pids"], root=True)


@pytest.fixture
def cgroup(root: Path) -> CgroupV2:
    make_cgroup(root / "gactor", ALL)
    make_cgroup(root / "gactor" / "c1", ALL)
    return CgroupV2Driver(root=str(root), parent="gactor").create("c1")


def test_create_enables_controllers_top_down_and_keeps_parent_empty(root: Path) -> None:
    make_cgroup(root / "gactor", ALL)
    make_cgroup(root / "gactor" / "c1", ALL)
    driver = CgroupV2Driver(root=str(root), parent="gactor")

    cg = driver.create("c1")
    cg.add_process(4242)

    assert driver.version == 2
    assert read(root / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert read(root / "gactor" / "cgroup.subtree_control") == "+memory +cpu +pids"
    assert cg.procs_files == (str(root / "gactor" / "c1" / "cgroup.procs"),)
    assert read(root / "gactor" / "c1" / "cgroup.procs") == "4242"
    assert read(root / "gactor" / "cgroup.procs") == ""
    assert read(root / "cgroup.procs") == ""


def test_create_enables_only_offered_and_missing_controllers(tmp_path: Path) -> None:
    root = make_cgroup(tmp_path / "cgroup", ["cpu", "io", "memory"], root=True)
    make_cgroup(root / "gactor", ["cpu", "memory"])
    (root / "gactor" / "cgroup.subtree_control").write_text("memory\n")
    make_cgroup(root / "gactor" / "c1", ["cpu", "memory"])

    CgroupV2Driver(root=str(root), parent="gactor").create("c1")

    assert read(root / "cgroup.subtree_control") == "+memory +cpu"
    assert read(root / "gactor" / "cgroup.subtree_control") == "+cpu"


def test_open_names_and_bad_names(root: Path, cgroup: CgroupV2) -> None:
    driver = CgroupV2Driver(root=str(root), parent="gactor")
    make_cgroup(root / "gactor" / "c2", ALL)

    assert driver.names() == ["c1", "c2"]
    assert driver.open("c1") == cgroup
    with pytest.raises(CgroupError) as info:
        driver.open("missing")
    assert info.value.errno == errno.ENOENT
    for bad in ("", "..", "a/b"):
        with pytest.raises(CgroupError):
            driver.create(bad)
    assert CgroupV2Driver(root=str(root), parent="nothing-here").names() == []


@pytest.mark.parametrize(
    ("shares", "weight"),
    [
        (0, 0),
        (2, 1),
        (100, 17),
        (123, 20),
        (280, 37),
        (1024, 100),
        (1028, 101),
        (262144, 10000),
        (500000, 10000),
    ],
)
def test_shares_to_weight(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


def test_memory_limit_with_swap(cgroup: CgroupV2) -> None:
    base = Path(cgroup.path)
    cgroup.set_memory_limit(64 * MiB)
    assert read(base / "memory.max") == str(64 * MiB)
    assert read(base / "memory.swap.max") == "0"
    assert cgroup.memory_limit() == 64 * MiB

    cgroup.set_memory_limit(0)
    assert read(base / "memory.max") == "max"
    assert read(base / "memory.swap.max") == "max"
    assert cgroup.memory_limit() == 0

    cgroup.set_memory_limit(32 * MiB, swap=False)
    assert read(base / "memory.swap.max") == "max"


def test_cpu_and_pids_knobs(cgroup: CgroupV2) -> None:
    base = Path(cgroup.path)
    cgroup.set_cpu_shares(1024)
    assert read(base / "cpu.weight") == "100"
    cgroup.set_cpu_shares(280)
    assert cgroup.cpu_shares() == 37
    cgroup.set_cpu_shares(0)  # "not set": the weight stays
    assert cgroup.cpu_shares() == 37

    cgroup.set_cpu_quota(50000)
    assert read(base / "cpu.max") == "50000 100000"
    cgroup.set_cpu_quota(0, period_us=200000)
    assert read(base / "cpu.max") == "max 200000"

    assert cgroup.pids_max() == 0
    cgroup.set_pids_max(50)
    assert read(base / "pids.max") == "50"
    assert cgroup.pids_max() == 50
    cgroup.set_pids_max(0)
    assert read(base / "pids.max") == "max"
    (base / "pids.current").write_text("3\n")
    assert cgroup.pids_current() == 3


def test_memory_stat_maps_to_garden_names(cgroup: CgroupV2) -> None:
    base = Path(cgroup.path)
    (base / "memory.stat").write_text(SAMPLE_MEMORY_STAT)
    (base / "memory.swap.current").write_text("4096\n")
    cgroup.set_memory_limit(1024 * MiB)

    stat = cgroup.memory_stat()

    assert set(GARDEN_MEMORY_KEYS) <= stat.keys()
    assert stat["rss"] == stat["total_rss"] == stat["anon"] == 4194304
    assert stat["cache"] == stat["total_cache"] == stat["file"] == 8388608
    assert stat["mapped_file"] == stat["total_mapped_file"] == 2097152
    assert stat["inactive_file"] == stat["total_inactive_file"] == 6291456
    assert stat["pgfault"] == stat["total_pgfault"] == 5000
    assert stat["pgmajfault"] == 12
    assert stat["pgpgin"] == stat["pgpgout"] == 0
    assert stat["swap"] == stat["total_swap"] == 4096
    assert stat["hierarchical_memory_limit"] == 1024 * MiB
    assert stat["hierarchical_memsw_limit"] == 1024 * MiB
    assert stat["kernel"] == 917504  # raw counters pass through
    assert stat["total_usage_toward_limit"] == 8388608 + 4194304 + 65536 - 6291456


def test_memory_stat_unlimited_and_clamped(cgroup: CgroupV2) -> None:
    (Path(cgroup.path) / "memory.stat").write_text("anon 10\nfile 10\ninactive_file 100\n")

    stat = cgroup.memory_stat()

    assert stat["total_usage_toward_limit"] == 0
    assert stat["hierarchical_memory_limit"] == UNLIMITED_BYTES
    assert stat["hierarchical_memsw_limit"] == UNLIMITED_BYTES


def test_cpu_stat_in_nanoseconds(cgroup: CgroupV2) -> None:
    (Path(cgroup.path) / "cpu.stat").write_text(
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nnr_throttled 0\n"
    )
    assert cgroup.cpu_stat() == (1_500_000, 1_000_000, 500_000)


def test_oom_kill_count_and_events_fd(cgroup: CgroupV2) -> None:
    events = Path(cgroup.path) / "memory.events"
    fd = cgroup.oom_events_fd()
    try:
        assert select.select([fd], [], [], 0)[0] == []
        events.write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 3\n")
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert os.read(fd, 4096)
    finally:
        os.close(fd)
    assert cgroup.oom_kill_count() == 3


def test_kill_all_on_empty_cgroup_writes_nothing(cgroup: CgroupV2) -> None:
    cgroup.kill_all()
    assert read(Path(cgroup.path) / "cgroup.kill") == ""


def test_destroy_is_idempotent_and_wraps_errors(root: Path, cgroup: CgroupV2) -> None:
    # A plain directory with files is not removable the way a cgroup is: the error
    # must come back as a CgroupError naming the path.
    with pytest.raises(KernelError) as info:
        cgroup.destroy()
    assert info.value.errno == errno.ENOTEMPTY
    assert info.value.op == "cgroup.destroy"
    assert cgroup.path in info.value.detail

    for entry in Path(cgroup.path).iterdir():
        entry.unlink()
    cgroup.destroy()
    cgroup.destroy()
    assert not Path(cgroup.path).exists()


def test_setup_devices_on_v2_attaches_a_program_not_files(cgroup: CgroupV2) -> None:
    # A plain directory is no cgroup: the attach fails, naming it, and writes nothing.
    # (tests/kernel/test_bpf_devices.py attaches to a real cgroup2 directory.)
    before = sorted(p.name for p in Path(cgroup.path).iterdir())
    with pytest.raises(CgroupError) as info:
        cgroup.setup_devices(["c 1:3 rwm"])
    assert info.value.op.startswith("bpf.")  # prog_load when not root, else prog_attach
    assert sorted(p.name for p in Path(cgroup.path).iterdir()) == before


# ---------------------------------------------------------------------------------------
# Discovery

V2_HOST = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 22 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""

V1_SEPARATE_HOST = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

V1_JOINED_HOST = """\
25 24 0:22 / /sys/fs/cgroup/systemd rw,nosuid shared:5 - cgroup cgroup rw,xattr,name=systemd
28 24 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
29 24 0:26 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
30 24 0:26 / /mnt/other\\040memory rw,nosuid shared:11 - cgroup cgroup rw,memory
"""


def test_parse_mountinfo_v2_only() -> None:
    mounts = parse_mountinfo(V2_HOST)
    assert mounts.v1 == {}
    assert mounts.v2 == "/sys/fs/cgroup"


def test_parse_mountinfo_v1_with_separate_cpu_and_cpuacct() -> None:
    mounts = parse_mountinfo(V1_SEPARATE_HOST)
    assert mounts.v1 == {
        "cpu": "/sys/fs/cgroup/cpu",
        "cpuacct": "/sys/fs/cgroup/cpuacct",
        "cpuset": "/sys/fs/cgroup/cpuset",
        "memory": "/sys/fs/cgroup/memory",
        "freezer": "/sys/fs/cgroup/freezer",
        "pids": "/sys/fs/cgroup/pids",
    }
    assert mounts.v2 == "/sys/fs/cgroup/unified"


def test_parse_mountinfo_joined_cpu_cpuacct_first_mount_wins() -> None:
    mounts = parse_mountinfo(V1_JOINED_HOST)
    assert mounts.v1 == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
    }


def test_parse_mountinfo_unescapes_mount_points() -> None:
    line = "30 24 0:26 / /mnt/my\\040cgroups rw - cgroup cgroup rw,memory,pids\n"
    assert parse_mountinfo(line).v1 == {"memory": "/mnt/my cgroups", "pids": "/mnt/my cgroups"}


def test_v1_joined_hierarchy_shares_one_directory(tmp_path: Path) -> None:
    joined, memory = tmp_path / "cpu,cpuacct", tmp_path / "memory"
    joined.mkdir()
    memory.mkdir()
    driver = CgroupV1Driver(
        mounts={"cpu": str(joined), "cpuacct": str(joined), "memory": str(memory)}, parent="gactor"
    )

    cg = driver.create("c1")

    assert driver.version == 1
    assert cg.procs_files == (
        str(joined / "gactor" / "c1" / "cgroup.procs"),
        str(memory / "gactor" / "c1" / "cgroup.procs"),
    )
    assert driver.names() == ["c1"]
    for directory in cg.unique_dirs:
        os.rmdir(directory)
    assert driver.names() == []
    with pytest.raises(CgroupError):
        driver.open("c1")


def test_discover_picks_the_driver(tmp_path: Path, root: Path) -> None:
    mountinfo = tmp_path / "mountinfo"

    mountinfo.write_text(V1_SEPARATE_HOST)
    v1 = discover(str(mountinfo), parent="p")
    assert isinstance(v1, CgroupV1Driver)
    assert v1.mounts["cpuacct"] == "/sys/fs/cgroup/cpuacct"
    assert v1.parent == "p"

    mountinfo.write_text(V2_HOST.replace("/sys/fs/cgroup", str(root)))
    v2 = discover(str(mountinfo))
    assert isinstance(v2, CgroupV2Driver)
    assert v2.root == str(root)
    assert v2.parent == "gactor"

    (root / "cgroup.controllers").write_text("\n")  # cgroup2 without controllers: unusable
    with pytest.raises(CgroupError) as info:
        discover(str(mountinfo))
    assert info.value.errno == errno.ENOENT
