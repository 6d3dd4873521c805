"""A directory tree's generation: what image copies are keyed on (``image_copies``).

A scan records (st_dev, st_ino, mtime_ns, ctime_ns) of every directory in the tree: any
entry created, removed or renamed anywhere changes its directory's mtime and ctime, a
chmod/chown/touch of a directory its ctime, and a directory replaced by another (``rm -rf
&& cp``, a symlink switched to a new generation) its inode or the real path. Files are not
scanned: statting every file is a walk of the whole tree, which a create must not pay.

A scan is trusted only once its newest ctime is SETTLE_NS old (``unsettled_ns``): the
kernel stamps changes with a clock that advances once a tick (1-10 ms), so a directory
changed within a tick before it is statted could change again with the same stamps.
Filesystems with coarser timestamps (FAT, ext3: 1-2 s) are not covered.

Whether a tree is still as scanned is answered without a walk by an inotify fd that
``scan`` adds a watch to on each directory before statting and listing it (``quiet``), or,
without one, by one lstat per directory (``unchanged``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os

DirStat = tuple[str, int, int, int, int]  # relative path, st_dev, st_ino, mtime_ns, ctime_ns

SETTLE_NS = 50_000_000
_IN_CHANGED = 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800  # attrib, moved from/to,
# create, delete, delete self, move self: whatever changes a directory's mtime or ctime
_IN_ONLYDIR_DONT_FOLLOW = 0x01000000 | 0x02000000
_libc = ctypes.CDLL(None, use_errno=True)


def scan(real: str, watch: int = -1) -> tuple[tuple[DirStat, ...], int]:
    """Every directory under ``real`` (sorted), not following symlinks; and ``watch``
    watching each one from before it is statted and listed, or -1 if a watch could not
    be added (``watch`` is then closed)."""
    found: list[DirStat] = []
    stack = [""]
    try:
        while stack:
            rel = stack.pop()
            top = os.path.join(real, rel) if rel else real
            mask = _IN_CHANGED | _IN_ONLYDIR_DONT_FOLLOW
            if watch >= 0 and _libc.inotify_add_watch(watch, os.fsencode(top), mask) < 0:
                close(watch)  # e.g. fs.inotify.max_user_watches reached
                watch = -1
            st = os.lstat(top)
            found.append((rel, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
            with os.scandir(top) as entries:
                stack.extend(os.path.join(rel, e.name) for e in entries if e.is_dir(follow_symlinks=False))
    except BaseException:
        close(watch)
        raise
    return tuple(sorted(found)), watch


def watcher() -> int:
    """A non-blocking inotify fd, or -1 if there is none to be had."""
    return max(-1, int(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)))


def quiet(watch: int) -> bool:
    """Whether no event (an overflow is one too) arrived since the watches were added."""
    try:
        return not os.read(watch, 4096)
    except BlockingIOError:
        return True


def close(watch: int) -> None:
    if watch >= 0:
        os.close(watch)


def unsettled_ns(dirs: tuple[DirStat, ...], started: int) -> int:
    """How long (ns) to wait before a scan started at ``started`` (``time.time_ns()``)
    can be trusted: 0 once the newest directory ctime is SETTLE_NS older than the start.
    A ctime more than SETTLE_NS ahead means the clock was set back, where waiting would
    not help: 0 too."""
    newest = max(d[4] for d in dirs)
    return newest + SETTLE_NS - started if started - SETTLE_NS < newest < started + SETTLE_NS else 0


def unchanged(real: str, dirs: tuple[DirStat, ...]) -> bool:
    """Whether every directory scanned last time is still exactly as it was. No
    directory can have appeared unless one of these changed its mtime."""
    for rel, dev, ino, mtime, ctime in dirs:
        try:
            st = os.lstat(os.path.join(real, rel) if rel else real)
        except OSError:
            return False
        if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) != (dev, ino, mtime, ctime):
            return False
    return True


def key(real: str, shift: bool, dirs: tuple[DirStat, ...]) -> str:
    digest = hashlib.sha256(f"gactor image copy v1\0{real}\0{int(shift)}\0".encode())
    for entry in dirs:
        digest.update("\0".join(map(str, entry)).encode() + b"\n")
    return digest.hexdigest()[:32]
