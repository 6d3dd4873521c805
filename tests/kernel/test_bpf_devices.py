"""The cgroup v2 device program for real: a cgroup in this host's cgroup2 mount (on a v1
host that is the controller-less ``/sys/fs/cgroup/unified``, where BPF programs attach
all the same), the program attached, and a forked child in that cgroup trying devices."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator

import pytest

from gactor.actors.container import DEVICE_ALLOW
from gactor.kernel import bpf_devices, cgroups
from gactor.kernel.errors import CgroupError

from .forked import in_child

pytestmark = pytest.mark.kernel


def cgroup2_root() -> str:
    with open("/proc/self/mountinfo") as f:
        mounts = cgroups.parse_mountinfo(f.read())
    if mounts.v2 is None:
        pytest.skip("no cgroup2 mount on this host")
    return mounts.v2


def host_disk() -> tuple[str, int, int]:
    for name in sorted(os.listdir("/sys/block")):
        if not name.startswith(("loop", "ram", "zram", "nbd")):
            with open(f"/sys/block/{name}/dev") as f:
                major, minor = f.read().strip().split(":")
            return name, int(major), int(minor)
    pytest.skip("no block device besides loop/ram/zram")


@pytest.fixture
def cgroup() -> Iterator[str]:
    path = os.path.join(cgroup2_root(), f"gactor-test-bpf-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)  # the program goes with the cgroup


def in_cgroup(path: str, tries: list[tuple[str, str, int, int]]) -> list[int]:
    """Fork a child into cgroup ``path``; it makes each (op, kind, major, minor) try:
    mknod of that node, or open (read, then write) of one made beforehand. 0 or the errno."""
    workdir = tempfile.mkdtemp(prefix="gactor-bpf-")
    # Made before the child joins the cgroup, so an "open" try tests open alone.
    for i, (op, kind, major, minor) in enumerate(tries):
        if op != "mknod":
            mode = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
            os.mknod(os.path.join(workdir, str(i)), mode | 0o600, os.makedev(major, minor))

    def child() -> list[int]:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        results = []
        for i, (op, kind, major, minor) in enumerate(tries):
            node = os.path.join(workdir, str(i))
            try:
                if op == "mknod":
                    mode = stat.S_IFBLK if kind == "b" else stat.S_IFCHR
                    os.mknod(node, mode | 0o600, os.makedev(major, minor))
                else:
                    os.close(os.open(node, os.O_RDONLY if op == "read" else os.O_WRONLY))
                results.append(0)
            except OSError as err:
                results.append(err.errno or -1)
        return results

    try:
        return list(in_child(child))
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


def test_with_gardens_allowlist_host_disks_cannot_be_opened_but_dev_null_can(cgroup):
    _, major, minor = host_disk()
    bpf_devices.attach(cgroup, DEVICE_ALLOW)
    results = in_cgroup(
        cgroup,
        [
            ("read", "c", 1, 3),
            ("write", "c", 1, 3),  # /dev/null
            ("read", "c", 1, 9),
            ("read", "c", 5, 2),  # urandom, ptmx
            ("read", "c", 136, 7),  # a pts (major only)
            ("read", "b", major, minor),
            ("write", "b", major, minor),
            ("read", "c", 1, 1),  # /dev/mem
            ("mknod", "b", major, minor),  # "b *:* m": mknod yes, open no
            ("read", "c", 10, 229),  # fuse: not in the list
        ],
    )
    # The program answers EPERM; anything else (ptmx outside a devpts gives ENOENT, an
    # unopened pts EIO) came from the device itself, past the program.
    denied = [r == errno.EPERM for r in results]
    assert denied == [False] * 5 + [True] * 3 + [False, True], results
    assert results[:3] == [0, 0, 0]
    assert results[8] == 0


def test_without_an_m_rule_mknod_is_denied_too(cgroup):
    _, major, minor = host_disk()
    bpf_devices.attach(cgroup, ["c 1:3 rw"])
    results = in_cgroup(
        cgroup,
        [
            ("mknod", "b", major, minor),
            ("mknod", "c", 1, 3),
            ("read", "c", 1, 3),
            ("read", "c", 1, 5),
        ],
    )
    assert results == [errno.EPERM, errno.EPERM, 0, errno.EPERM]


def test_access_bits_are_honoured(cgroup):
    bpf_devices.attach(cgroup, ["c 1:5 r", "a *:* m"])
    results = in_cgroup(cgroup, [("read", "c", 1, 5), ("write", "c", 1, 5), ("mknod", "b", 7, 0)])
    assert results == [0, errno.EPERM, 0]


def test_an_empty_list_denies_everything(cgroup):
    bpf_devices.attach(cgroup, [])
    assert in_cgroup(cgroup, [("read", "c", 1, 3)]) == [errno.EPERM]


@pytest.mark.parametrize("rule", ["x 1:3 rwm", "c 1:3", "c 1 rwm", "c a:b r", "c 1:3 rwz"])
def test_bad_rules_name_themselves(rule):
    with pytest.raises(ValueError, match="bad device rule"):
        bpf_devices.assemble([rule])


def test_attaching_to_a_missing_cgroup_is_a_cgroup_error():
    with pytest.raises(CgroupError) as raised:
        bpf_devices.attach(os.path.join(cgroup2_root(), "gactor-test-no-such-cgroup"), DEVICE_ALLOW)
    assert raised.value.errno == errno.ENOENT


def test_the_v2_driver_attaches_the_program(cgroup):
    from gactor.kernel.cgroups_v2 import CgroupV2

    cg = CgroupV2(
        name=os.path.basename(cgroup),
        path=cgroup,
        procs_files=(os.path.join(cgroup, "cgroup.procs"),),
    )
    cg.setup_devices(["c 1:3 rwm"])
    assert in_cgroup(cgroup, [("read", "c", 1, 3), ("read", "c", 1, 5)]) == [0, errno.EPERM]
