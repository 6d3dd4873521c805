"""The depot: one directory per container, the source of truth for its state.

Layout of ``<depot>/containers/<handle>/``: ``container.json`` (spec, properties,
state, events, grace time), ``rootfs`` (overlay mount point), ``upper``/``work``,
``hosts``, ``shim.sock``, ``shim.pid``, ``shim.log`` and ``processes/<id>`` (exit
codes written by the shim). Every write is atomic: write, fsync, rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
from typing import Any

import msgspec

log = logging.getLogger("gactor.depot")

CONTAINERS = "containers"
IMAGES = "images"
TRASH = "trash"  # container directories being removed in the background

# Characters kept as they are in a container's directory name. Everything else is
# %-escaped: a handle may hold ',' or ':' (which overlay mount options cannot carry),
# trailing spaces (which process titles lose) or newlines.
_PLAIN = re.compile(rb"[A-Za-z0-9._@+=-]")
_MAX_NAME = 200  # escaped names longer than this are replaced by a digest


def dir_name(handle: str) -> str:
    """The directory (and cgroup) name of the container ``handle``: the handle itself
    when it is plain, else a %-escaped form; never '.', '..', '' or over 200 bytes.
    The handle itself is kept in the container's record."""
    raw = handle.encode()
    name = "".join(chr(b) if _PLAIN.fullmatch(bytes([b])) else f"%{b:02X}" for b in raw)
    if name in ("", ".", ".."):
        name = "".join(f"%{b:02X}" for b in raw) or "%"
    if len(name) > _MAX_NAME:
        name = "%" + hashlib.sha256(raw).hexdigest()
    return name


def write_json(path: str, obj: Any) -> None:
    """Replace ``path`` atomically and durably with the JSON of ``obj``."""
    tmp = f"{path}.tmp"
    data = msgspec.json.encode(obj)  # one C call; json.dump encodes in Python, chunk by chunk
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
        f.write(data)
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


class Janitor:
    """Removes discarded container directories in a thread of its own.

    Removing a container's directory (the former overlay mount point, upper and work
    dirs, the records) costs milliseconds of unlink and rmdir calls, which no destroy
    needs to wait for: ``discard`` renames the directory into ``<depot>/trash`` (one
    syscall; the name is free again at once) and the thread removes it from there.
    Whatever a crash leaves in the trash is removed at the next start (``start``).
    """

    def __init__(self, depot: str) -> None:
        self.trash = os.path.join(depot, TRASH)
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="gactor-janitor", daemon=True)

    def start(self) -> None:
        os.makedirs(self.trash, mode=0o700, exist_ok=True)
        for name in sorted(os.listdir(self.trash)):
            self._queue.put(os.path.join(self.trash, name))
        self._thread.start()

    def discard(self, path: str) -> None:
        """Remove ``path`` soon (already gone is fine); removes it here, raising what fails,
        when it cannot be moved (``path`` itself still a mount point: EBUSY)."""
        target = os.path.join(self.trash, f"{os.path.basename(path)}.{os.urandom(6).hex()}")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError:
            remove_tree(path)
            return
        self._queue.put(target)

    def _work(self) -> None:
        while True:
            path = self._queue.get()
            try:
                remove_tree(path)
            except OSError as err:
                log.warning("removing %s: %s", path, err)


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
