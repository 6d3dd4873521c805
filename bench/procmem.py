"""Memory of the server, its spawner, the shims and container inits, read from /proc.

Only processes belonging to the bench's own server are counted: the server pid, its
``gactor-spawner`` children, the shims whose pid is in ``<depot>/containers/*/shim.pid``
and the ``garden-init`` children of those shims (other gactor servers may be running).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Mem:
    """Bytes from ``/proc/<pid>/smaps_rollup``; ``private`` is Private_Clean+Private_Dirty."""

    rss: int
    pss: int
    private: int


def process_name(pid: int) -> str | None:
    status = _status(pid)
    return status.get("Name") if status else None


def parent_pid(pid: int) -> int | None:
    status = _status(pid)
    return int(status["PPid"]) if status and "PPid" in status else None


def read_mem(pid: int) -> Mem | None:
    """The process's memory, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            kb[key] = int(parts[0]) * 1024
    return Mem(
        kb.get("Rss", 0), kb.get("Pss", 0), kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    )


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children_named(parent: int, name: str) -> list[int]:
    return [pid for pid in all_pids() if parent_pid(pid) == parent and process_name(pid) == name]


def shim_pids(depot: str) -> list[int]:
    """Live ``gactor-shim`` processes of the containers in ``depot``."""
    pids = []
    for pid_file in Path(depot, "containers").glob("*/shim.pid"):
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            continue
        if process_name(pid) == "gactor-shim":
            pids.append(pid)
    return pids


@dataclass(frozen=True)
class Snapshot:
    server: Mem
    spawners: list[Mem]
    shims: list[Mem]
    inits: list[Mem]


def snapshot(server_pid: int, depot: str) -> Snapshot:
    """Memory of one server and everything it runs; processes that vanish are skipped."""
    shims = shim_pids(depot)
    shim_set = set(shims)
    inits = [
        p for p in all_pids() if parent_pid(p) in shim_set and process_name(p) == "garden-init"
    ]
    server = read_mem(server_pid) or Mem(0, 0, 0)
    spawners = children_named(server_pid, "gactor-spawner")
    return Snapshot(server, _mems(spawners), _mems(shims), _mems(inits))


def _mems(pids: list[int]) -> list[Mem]:
    return [m for m in map(read_mem, pids) if m is not None]


def _status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields
