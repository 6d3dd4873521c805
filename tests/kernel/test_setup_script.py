"""scripts/setup.sh on a machine where gactor has never run: nothing under its directories exists.

The first run on a fresh machine failed once because the busybox extraction wrote into a
/var/lib/gactor that did not exist yet; a host that had run gactor before hid it.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setup.sh runs as root")


def test_setup_creates_missing_parent_directories(tmp_path: Path) -> None:
    fresh = tmp_path / "var" / "lib" / "gactor"  # none of it exists
    env = dict(os.environ, GACTOR_BUSYBOX_GLIBC_DIR=str(fresh / "busybox-glibc"),
               GACTOR_ROOTFS_DIR=str(fresh / "images" / "busybox"))
    done = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (fresh / "busybox-glibc/bin/busybox").is_file()
    assert (fresh / "images/busybox/bin/busybox").is_file()
    # Run again: idempotent, and it says so.
    again = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "present in" in again.stdout
