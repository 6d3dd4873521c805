"""Finding shims by their process title, ``gactor-shim <container dir>``.

Pid files can go stale (a crash, a reboot); the title names exactly one container, so
startup reconcile finds every shim of its depot, including one that died before it
could listen on its socket, and never mistakes another process for one.
"""

from __future__ import annotations

import contextlib
import os
import signal

PREFIX = "gactor-shim "


def title(container_dir: str) -> str:
    return PREFIX + container_dir


def forker_title(container_dir: str) -> str:
    """The title of a shim's process forker (spawn.Forker): never taken for a shim."""
    return "gactor-forker " + container_dir


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        # setproctitle pads with NULs; the title is the text before them.
        return f.read().split(b"\0", 1)[0].decode(errors="replace").rstrip()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"


def find(containers_root: str) -> dict[str, int]:
    """Container handle -> pid of every live shim whose container is under ``containers_root``.

    A process the shim forks carries its title until it execs or retitles itself (the
    spawn helper, a process about to exec, pid 1 before it becomes garden-init): a
    titled process whose parent has the same title is such a child, never the shim."""
    titled: dict[int, str] = {}
    prefix = title(containers_root.rstrip("/") + "/")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = _cmdline(int(entry))
            if cmdline.startswith(prefix) and "/" not in cmdline[len(prefix):]:
                titled[int(entry)] = cmdline[len(prefix):]
    found: dict[str, int] = {}
    for pid, name in titled.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if titled.get(_ppid(pid)) != name:
                found[name] = pid
    return found


def kill(pid: int, container_dir: str) -> None:
    """SIGKILL ``pid`` if it is still the shim of ``container_dir``."""
    with contextlib.suppress(OSError):
        if _cmdline(pid) == title(container_dir):
            os.kill(pid, signal.SIGKILL)
