"""Which remount turns favordynmods on, from mountinfo (pure)."""

from gactor.kernel.cgroups import favordynmods_plan

V1_HOST = """\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_the_cgroup2_mount_comes_first_with_its_own_options_kept():
    assert favordynmods_plan(V1_HOST) == [
        ("/sys/fs/cgroup/unified", "nsdelegate,favordynmods"),
        ("/sys/fs/cgroup/cpu", "cpu,favordynmods"),
    ]


def test_nothing_to_do_when_a_mount_shows_it_already():
    assert favordynmods_plan(V1_HOST.replace("rw,nsdelegate", "rw,nsdelegate,favordynmods")) == []


def test_no_cgroup_mounts_no_plan():
    assert favordynmods_plan("22 1 0:5 / /proc rw - proc proc rw\n") == []


def test_unmounted_v1_controllers_are_the_enabled_ones_in_hierarchy_zero(tmp_path) -> None:
    from gactor.kernel.cgroups import unmounted_v1_controllers

    proc = tmp_path / "cgroups"
    proc.write_text("#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
                    "cpuset\t3\t2\t1\nmemory\t4\t196\t1\nnet_cls\t0\t1\t1\n"
                    "perf_event\t0\t1\t1\nrdma\t0\t1\t0\n")
    assert unmounted_v1_controllers(str(proc)) == ["net_cls", "perf_event"]


def test_a_dormant_hierarchy_no_mount_shows_counts_as_unmounted(tmp_path) -> None:
    """A hierarchy the kernel keeps after the mount namespace that mounted it went (an id,
    no mount here) is mounted again; one mounted here is not, whatever its options order."""
    from gactor.kernel.cgroups import unmounted_v1_controllers

    proc = tmp_path / "cgroups"
    proc.write_text("#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
                    "cpu\t1\t3\t1\ncpuacct\t2\t3\t1\nmemory\t4\t9\t1\nnet_cls\t62\t1\t1\nhugetlb\t0\t1\t1\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n"
        "31 25 0:27 / /sys/fs/cgroup/cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory,favordynmods\n"
        "33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n")
    assert unmounted_v1_controllers(str(proc), str(mountinfo)) == ["net_cls", "hugetlb"]
