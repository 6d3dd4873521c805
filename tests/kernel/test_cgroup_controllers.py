"""``--mount-cgroup-controllers``: the v1 controllers the host enables but left unmounted
get mounted. Checked in a private mount namespace over a scratch v1 layout, so the host's
own /sys/fs/cgroup is not changed."""

from __future__ import annotations

import os

import pytest

from gactor.kernel import cgroups
from gactor.kernel import linux as L

from .forked import in_child

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(not cgroups.unmounted_v1_controllers(), reason="every v1 controller is mounted here"),
]


def test_the_unmounted_controllers_get_mounted(tmp_path) -> None:
    root = str(tmp_path / "cgroup")

    def check() -> dict[str, object]:
        L.unshare(L.CLONE_NEWNS)
        L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
        L.mount("tmpfs", root, "tmpfs", 0, "mode=755")
        os.mkdir(os.path.join(root, "memory"))  # a v1 layout, as /sys/fs/cgroup here
        mounted = cgroups.mount_missing_v1(root)
        with open("/proc/self/mountinfo") as f:
            types = {line.split()[4]: line.split(" - ")[1].split()[0] for line in f}
        return {"mounted": mounted,
                "types": {name: types.get(os.path.join(root, name)) for name in mounted}}

    os.makedirs(root)
    wanted = cgroups.unmounted_v1_controllers()  # before: the child's mounts are host-wide hierarchies while they last
    got = in_child(check)
    assert got["mounted"] == wanted
    assert got["types"] == {name: "cgroup" for name in got["mounted"]}
    assert not os.listdir(root)  # nothing of it outside the child's namespace


def test_a_cgroup2_root_is_left_alone(tmp_path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    assert cgroups.mount_missing_v1(str(tmp_path)) == []
