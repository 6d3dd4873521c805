"""The depot: one directory per container, the source of truth for its state.

Layout of ``<depot>/containers/<handle>/``: ``container.json`` (spec, properties,
state, events, grace time), ``rootfs`` (overlay mount point), ``upper``/``work``,
``hosts``, ``shim.sock``, ``shim.pid``, ``shim.log`` and ``processes/<id>`` (exit
codes written by the shim). Every write is atomic: write, fsync, rename.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

CONTAINERS = "containers"
IMAGES = "images"


def write_json(path: str, obj: Any) -> None:
    """Replace ``path`` atomically and durably with the JSON of ``obj``."""
    tmp = f"{path}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def remove_tree(path: str) -> None:
    """Remove a container directory; already gone is fine."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        shutil.rmtree(path)  # second pass raises and names what could not be removed


def disk_usage(path: str) -> tuple[int, int]:
    """Bytes and inodes used under ``path`` (not following symlinks or mounts)."""
    total_bytes = inodes = 0
    dev = os.lstat(path).st_dev
    for top, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(top, d)).st_dev == dev]
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:
                continue
            total_bytes += st.st_blocks * 512
            inodes += 1
    return total_bytes, inodes
