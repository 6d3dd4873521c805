"""``shims.find``: which process is a container's shim, by its title."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from gactor.kernel import shims

# Titled like a shim, then forks a child that keeps the title (as the shim's spawn helper
# does until the process it forks execs); prints the child's pid once both are titled.
TITLED_PARENT_AND_CHILD = """
import os, sys, time, setproctitle
setproctitle.setproctitle(sys.argv[1])
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_carrying_the_shims_title_is_not_the_shim(tmp_path: Path) -> None:
    """Found by the chaos test (seed 106): a shim forking a process at that moment had
    its helper reported as the shim, so killing "the shim" killed the helper."""
    root = str(tmp_path / "containers")
    shim = subprocess.Popen([sys.executable, "-c", TITLED_PARENT_AND_CHILD, shims.title(f"{root}/c1")],
                            stdout=subprocess.PIPE, text=True)
    assert shim.stdout is not None
    child = int(shim.stdout.readline())
    try:
        assert shims.find(root) == {"c1": shim.pid}
    finally:
        os.kill(child, signal.SIGKILL)
        shim.kill()
        shim.wait()
