"""A prepared pid 1's /proc, /sys and /dev, made ahead (``container_init._staged``): three
detached trees that carry the container's mounts with them (its own proc, read-only
sysfs, the masks and read-only paths, the device nodes, devpts), attached elsewhere later
as pid 1 does at the create. Without them pid 1 silently builds the same itself, so only
a test of the trees themselves shows the staging works."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gactor.kernel import container_init as ci
from gactor.kernel import linux as L

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def _pid1_attaching_staged_trees(target: Path, report: int) -> None:
    """As pid 1 of a new pid namespace (with a network namespace of its own): stage, then
    attach the trees under ``target`` in a new mount namespace and report what is there."""
    trees = ci._staged()
    found: dict[str, object] = {"trees": len(trees)}
    if len(trees) == len(ci._STAGED):
        L.unshare(L.CLONE_NEWNS)
        L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
        for path, tree in zip(ci._STAGED, trees, strict=True):
            L.move_mount(tree, str(target) + path)
        kcore = os.stat(target / "proc/kcore") if (target / "proc/kcore").exists() else None
        found.update({
            "proc_self": os.readlink(target / "proc/self"),
            "kcore_is_null": kcore is not None and stat.S_ISCHR(kcore.st_mode)
                             and kcore.st_rdev == os.makedev(1, 3),
            "proc_sys_ro": bool(os.statvfs(target / "proc/sys").f_flag & os.ST_RDONLY),
            "sys_ro": bool(os.statvfs(target / "sys").f_flag & os.ST_RDONLY),
            "dev_null": stat.S_ISCHR(os.stat(target / "dev/null").st_mode),
            "ptmx": os.path.islink(target / "dev/ptmx") and (target / "dev/pts/ptmx").exists(),
            "shm": os.path.ismount(target / "dev/shm"),
        })
    os.write(report, json.dumps(found).encode())


def test_staged_trees_carry_proc_sys_and_dev_with_their_masks(tmp_path: Path) -> None:
    for name in ("proc", "sys", "dev"):
        (tmp_path / name).mkdir()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            L.unshare(L.CLONE_NEWPID | L.CLONE_NEWNET)
            pid1 = os.fork()
            if pid1 == 0:
                try:
                    _pid1_attaching_staged_trees(tmp_path, w)
                finally:
                    os._exit(0)
            os.waitpid(pid1, 0)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(child, 0)
    assert text, "pid 1 died before reporting"
    assert json.loads(text) == {"trees": 3, "proc_self": "1", "kcore_is_null": os.path.exists("/proc/kcore"),
                                "proc_sys_ro": True, "sys_ro": True, "dev_null": True, "ptmx": True, "shm": True}
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()  # attached in pid 1's namespace only
