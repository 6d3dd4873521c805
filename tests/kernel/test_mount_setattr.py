"""``linux.mount_setattr`` for real: one call makes a mount and every mount below it
read-only and leaves its other flags alone (checked from statvfs, in a private mount
namespace of a child interpreter)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

SCENARIO = """
import json, os, sys, tempfile
from gactor.kernel import linux as L
L.unshare(L.CLONE_NEWNS)
L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
top = tempfile.mkdtemp(prefix="fast-create-setattr-")
L.mount("tmpfs", top, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC, "size=64k")
os.mkdir(top + "/sub")
L.mount("tmpfs", top + "/sub", "tmpfs", L.MS_NODEV, "size=64k")
before = [os.statvfs(p).f_flag for p in (top, top + "/sub")]
L.mount_setattr(top, L.MOUNT_ATTR_RDONLY)
after = [os.statvfs(p).f_flag for p in (top, top + "/sub")]
try:
    open(top + "/sub/x", "w")
    wrote = True
except OSError:
    wrote = False
L.umount(top, L.MNT_DETACH)
os.rmdir(top)
print(json.dumps({"before": before, "after": after, "wrote": wrote}))
"""


def test_mount_setattr_makes_the_subtree_read_only_and_keeps_other_flags() -> None:
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    got = json.loads(out)
    assert got["wrote"] is False
    for before, after in zip(got["before"], got["after"], strict=True):
        assert not before & os.ST_RDONLY
        assert after == before | os.ST_RDONLY
    assert got["after"][0] & os.ST_NOSUID
    assert got["after"][0] & os.ST_NOEXEC
    assert got["after"][1] & os.ST_NODEV
