"""Image copies: immutable, generation-addressed snapshots of rootfs directories.

A container's overlay never uses an image directory itself as its lower dir: overlayfs
leaves the result of changing a lower layer under a mounted overlay undefined, and an
image directory is the operator's to change (or the busybox builder's to rebuild) at any
time. Instead ``prepare`` returns a copy in the image store, uid-shifted for a user
namespace (``shift=True``: uid/gid 0 become ``MAX_UID``, as Garden's grootfs does at
unpack) or not (privileged containers), laid out as::

    <store>/<key>/rootfs      the lower dir (ImageCopy.path)
    <store>/<key>/image.json  what it was copied from, its size
    <store>/<key>.tmp-*       a copy being built, or being removed

A copy is never modified once it has its name. Its key is a hash of the source's real
path, ``shift`` and the source's generation (``generations``: the dev, inode, mtime and
ctime of every directory), so a changed tree gets a new key and a new copy, while
containers keep the copy they mounted. What the key does not see is a file rewritten in
place (same inode, no rename). Image tools write a new file and rename it, which the key
sees; an in-place rewrite only means later containers get the copy from before it, never
that a running container's files change. An unchanged source costs a create one read of
an inotify fd (or one lstat per directory), never a walk of the tree.

Who uses which copy is the caller's (the registry's) to know: ``collect`` removes every
copy not in the set it is given, except one still the lower dir of a mounted overlay (a
safety net, e.g. for records older than this scheme) and one that is still current for
its source (a cache: creating and destroying containers of an unchanged image copies it
once). It must not run concurrently with ``prepare`` on the same store, whose result is
not referenced yet.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import generations
from .container_init import MAX_UID
from .errors import KernelError

ROOTFS = "rootfs"
META = "image.json"
TMP = ".tmp-"
# Names in the store that are not copies: the layer store and layered images' records
# (``gactor.kernel.images``); ``collect`` leaves them alone.
RESERVED = frozenset({"layers", "manifests", "mnt"})
COPY_ATTEMPTS = 5  # a source changing under every attempt is refused, not chased forever
_KNOWN_SOURCES = 256  # cached signatures; beyond this the oldest is forgotten (and rescanned)
# Sources watched with inotify. Each takes an inotify instance, of which a user has 128
# (fs.inotify.max_user_instances), shared with every container's OOM watch (cgroup v2).
WATCHED_SOURCES = 4


@dataclass(frozen=True)
class ImageCopy:
    """A copy in the store. ``path`` is the overlay lower dir; the store owns the files
    until ``collect`` is called without it."""

    path: str
    key: str
    source: str  # the real path it was copied from
    shifted: bool
    bytes: int  # allocated bytes and inodes under ``path``, for metrics
    inodes: int


@dataclass
class _Known:
    """A source's last scan: its directories, its copy, and an inotify fd watching every
    one of those directories since before it was listed (-1: check them with lstat)."""

    dirs: tuple[generations.DirStat, ...]
    copy: ImageCopy
    watch: int


_known: dict[tuple[str, str, bool], _Known] = {}
_known_lock = threading.Lock()


def known(source: str, store: str, *, shift: bool = True) -> ImageCopy | None:
    """The copy ``prepare`` would return without scanning, or None (then call ``prepare``).

    Only a copy this process prepared whose source's inotify watch saw no event since:
    a few lstat calls and one non-blocking read, and it never waits for the cache's
    lock (busy: None), so the event loop may call it (saving a thread hop per create).
    A watch that saw an event is forgotten here as in ``prepare``, which then rescans."""
    if not _known_lock.acquire(blocking=False):
        return None
    try:
        cached = _known.get((os.path.realpath(store), os.path.realpath(source), shift))
        if cached is None or cached.watch < 0:
            return None
        if not generations.quiet(cached.watch):
            _forget((os.path.realpath(store), os.path.realpath(source), shift))
            return None
    finally:
        _known_lock.release()
    return cached.copy if os.path.isdir(cached.copy.path) else None


def prepare(source: str, store: str, *, shift: bool = True) -> ImageCopy:
    """The copy of ``source`` as it is now; built (in a temp dir, then renamed) only if
    no copy of this generation exists. Blocking; safe to call from several threads and
    processes at once (a builder that loses the rename race uses the winner's copy).

    Unchanged since the last call in this process, it costs one read of an inotify fd
    that watches the tree's directories (for the WATCHED_SOURCES most recent sources;
    older ones, or with inotify unavailable: one lstat per directory).
    Raises KernelError if ``source`` is not a directory, the copy fails, or the source
    kept changing while it was copied. Interrupted (the process killed), it leaves a
    ``.tmp-`` directory that ``collect`` removes.
    """
    store = os.path.realpath(store)
    for _ in range(COPY_ATTEMPTS):
        real = os.path.realpath(source)
        if not os.path.isdir(real):
            raise KernelError("image copy", errno.ENOENT, f"rootfs {source} is not a directory")
        cache_key = (store, real, shift)
        with _known_lock:  # checked and forgotten in one step: one reader sees the events
            cached = _known.get(cache_key)
            if cached is not None and cached.watch >= 0 and not generations.quiet(cached.watch):
                _forget(cache_key)
                cached = None
        if (cached is not None and (cached.watch >= 0 or generations.unchanged(real, cached.dirs))
                and os.path.isdir(cached.copy.path)):
            return cached.copy
        watch = -1
        started = time.time_ns()
        try:
            dirs, watch = generations.scan(real, generations.watcher())
            wait = generations.unsettled_ns(dirs, started)
            if wait:  # changed just now: wait until a further change would show, then rescan
                generations.close(watch)
                time.sleep(wait / 1e9)
                continue
            key = generations.key(real, shift, dirs)
            copy = _existing(store, key) or _build(source, real, store, shift, dirs)
        except OSError as err:
            generations.close(watch)
            raise KernelError.from_os_error("image copy", err, f"{source}: {err}") from err
        except BaseException:
            generations.close(watch)
            raise
        if copy is None:
            generations.close(watch)
            continue
        with _known_lock:
            _forget(cache_key)
            _known[cache_key] = _Known(dirs, copy, watch)
            watched = [k for k in _known.values() if k.watch >= 0]
            for old in watched[:max(0, len(watched) - WATCHED_SOURCES)]:  # scarce: 128 a user
                generations.close(old.watch)
                old.watch = -1
            while len(_known) > _KNOWN_SOURCES:
                _forget(next(iter(_known)))
        return copy
    raise KernelError("image copy", errno.EAGAIN, f"{source} kept changing while it was copied")


def forget_sources() -> None:
    """Drop every cached scan and close its watch; each source is scanned again by its
    next ``prepare``."""
    with _known_lock:
        while _known:
            _forget(next(iter(_known)))


def read(path: str) -> ImageCopy:
    """The copy whose lower dir is ``path`` (from a container record), from its metadata.
    Raises KernelError if ``path`` is not a copy in a store (e.g. a record older than
    this scheme)."""
    meta_path = os.path.join(os.path.dirname(path), META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return ImageCopy(path, meta["key"], meta["source"], bool(meta["shifted"]),
                         int(meta["bytes"]), int(meta["inodes"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KernelError("image copy", getattr(err, "errno", 0) or 0, f"no image copy at {path}: {err}") from err


def collect(store: str, in_use: Iterable[str], *, keep_current: bool = True) -> list[str]:
    """Remove every copy in ``store`` whose lower dir is not in ``in_use``, and every
    half-built or half-removed one; return the removed paths. The caller guarantees no
    ``prepare`` on this store runs meanwhile. Kept whatever ``in_use`` says: a copy that
    is still the lower dir of a mounted overlay in this mount namespace, and (with
    ``keep_current``) an unused copy that is what ``prepare`` of the path it was built
    for would return now, so create/destroy cycles on an unchanged image copy it once;
    it goes at the first collect after its source changes or disappears. A container's
    overlay is mounted in its own mount namespace only (``rootfs.overlay_tree``), so its
    copy is kept by ``in_use`` alone; this namespace holds the overlays of peas.

    Each copy is first renamed to a ``.tmp-`` name, so one interrupted mid-removal is
    never found again under its key, only removed by the next collect.
    """
    store = os.path.realpath(store)
    try:
        names = sorted(os.listdir(store))
    except FileNotFoundError:
        return []
    keep = {os.path.basename(os.path.dirname(os.path.realpath(p))) for p in in_use}
    mounted = mounted_lower_dirs()
    removed = []
    for name in names:
        path = os.path.join(store, name)
        if name in RESERVED or name in keep or any(m == path or m.startswith(path + os.sep) for m in mounted):
            continue
        if keep_current and TMP not in name and _current(path):
            continue
        doomed = path if TMP in name else f"{path}{TMP}gc-{os.urandom(4).hex()}"
        try:
            if doomed != path:
                os.rename(path, doomed)
            if os.path.isdir(doomed) and not os.path.islink(doomed):
                shutil.rmtree(doomed)
            else:
                os.unlink(doomed)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise KernelError.from_os_error("image collect", err, doomed) from err
        removed.append(path)
    with _known_lock:  # the scans of removed copies' sources, and their watches, go too
        for cache_key in [k for k, known in _known.items() if os.path.dirname(known.copy.path) in removed]:
            _forget(cache_key)
    return removed


def mounted_lower_dirs(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Every lower dir of every overlay mounted in this mount namespace."""
    with open(mountinfo) as f:
        lines = f.read().splitlines()
    found: set[str] = set()
    for line in lines:
        _, sep, tail = line.partition(" - ")
        fields = tail.split(" ", 2)
        if not sep or len(fields) < 3 or fields[0] != "overlay":
            continue
        for option in fields[2].split(","):
            name, _, value = option.partition("=")
            if name in ("lowerdir", "lowerdir+"):
                found.update(_unescape(layer) for layer in value.split(":") if layer)
    return found


def _current(path: str) -> bool:
    """Whether the copy at ``<store>/<key>`` is what its requested source gives now."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        real = os.path.realpath(meta["requested"])
        dirs = tuple(tuple(d) for d in meta["dirs"])
        return bool(real == meta["source"] and generations.unchanged(real, dirs)
                    and os.path.basename(path) == generations.key(real, bool(meta["shifted"]), dirs))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _forget(cache_key: tuple[str, str, bool]) -> None:
    known = _known.pop(cache_key, None)
    if known is not None:
        generations.close(known.watch)


# ---- building -------------------------------------------------------------------------


def _existing(store: str, key: str) -> ImageCopy | None:
    path = os.path.join(store, key, ROOTFS)
    return read(path) if os.path.isdir(os.path.join(store, key)) else None


def _build(source: str, real: str, store: str, shift: bool, dirs: tuple[generations.DirStat, ...]) -> ImageCopy | None:
    """Copy, shift, check the source did not change meanwhile (None if it did), rename."""
    key = generations.key(real, shift, dirs)
    os.makedirs(store, mode=0o711, exist_ok=True)
    tmp = os.path.join(store, f"{key}{TMP}{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(tmp, 0o711)
    try:
        os.chmod(tmp, 0o711)  # the umask may have taken bits the container root needs
        lower = os.path.join(tmp, ROOTFS)
        result = subprocess.run(["cp", "-a", "--reflink=auto", real, lower], capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelError("image copy", errno.EIO, f"copying {real}: {result.stderr.strip()}")
        used_bytes, inodes = _shift_and_count(lower, shift)
        if generations.scan(real)[0] != dirs:
            shutil.rmtree(tmp)
            return None
        copy = ImageCopy(os.path.join(store, key, ROOTFS), key, real, shift, used_bytes, inodes)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"key": key, "source": real, "shifted": shift, "bytes": used_bytes,
                       "inodes": inodes, "requested": os.path.abspath(source), "dirs": dirs}, f)
        try:
            os.rename(tmp, os.path.join(store, key))
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)  # another builder got there first: its copy is the same
            return read(copy.path)
        return copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shift_and_count(lower: str, shift: bool) -> tuple[int, int]:
    """Shift uid/gid 0 to MAX_UID (if ``shift``); allocated bytes and inodes under ``lower``."""
    used_bytes = inodes = 0
    # Each directory but the top is one of its parent's ``dirs``: seen once, as an entry.
    for top, dirs, files in os.walk(lower):
        for name in ((lower,) if top == lower else ()) + tuple(os.path.join(top, n) for n in dirs + files):
            st = os.lstat(name)
            if name != lower:
                used_bytes += st.st_blocks * 512
                inodes += 1
            if shift and (st.st_uid == 0 or st.st_gid == 0):
                os.lchown(name, MAX_UID if st.st_uid == 0 else -1, MAX_UID if st.st_gid == 0 else -1)
                if not os.path.islink(name) and st.st_mode & 0o6000:
                    os.chmod(name, st.st_mode & 0o7777)  # chown clears setuid/setgid; put them back
    return used_bytes, inodes


def _unescape(path: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path
