"""Image copies (gactor.kernel.image_copies) on the real filesystem: keyed on the tree's
generation, never modified once built, collected only when unused and unmounted."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gactor.kernel import generations, image_copies
from gactor.kernel.busybox import build_rootfs
from gactor.kernel.container_init import MAX_UID
from gactor.kernel.depot import disk_usage
from gactor.kernel.errors import KernelError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chown and mount need root"),
    pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="/bin/busybox missing"),
]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return build_rootfs(tmp_path / "image")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "store")
    image_copies.forget_sources()


def inotify_fds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify" for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))


@pytest.fixture(params=["inotify", "lstat"])
def check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How an unchanged source is recognised: its inotify watch, or (no watch to be had)
    one lstat per directory."""
    if request.param == "lstat":
        monkeypatch.setattr(image_copies, "WATCHED_SOURCES", 0)
    return str(request.param)


def listing(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def tree(root: str) -> dict[str, tuple[int, int, int, int]]:
    """Every path under ``root`` with (inode, mode, uid, mtime_ns): what a container sees."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            found[os.path.relpath(os.path.join(top, name), root)] = (
                st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns)
    return found


def test_shifted_copy_owns_by_max_uid_and_counts_its_size(source: Path, store: str) -> None:
    suid = source / "bin/suid-tool"
    suid.write_bytes(b"x")
    suid.chmod(0o4755)
    copy = image_copies.prepare(str(source), store)
    assert copy.path == os.path.join(os.path.realpath(store), copy.key, "rootfs")
    assert copy.source == os.path.realpath(source)
    assert copy.shifted
    for rel in ("", "bin", "bin/busybox", "etc/passwd"):
        st = os.lstat(os.path.join(copy.path, rel))
        assert (st.st_uid, st.st_gid) == (MAX_UID, MAX_UID), rel
    assert stat.S_IMODE(os.lstat(os.path.join(copy.path, "bin/suid-tool")).st_mode) == 0o4755
    assert os.readlink(os.path.join(copy.path, "bin/sh")) == "/bin/busybox"
    assert (copy.bytes, copy.inodes) == disk_usage(copy.path)
    assert image_copies.read(copy.path) == copy
    assert listing(store) == [copy.key]  # no temp dir left


def test_privileged_copy_is_not_shifted_and_has_its_own_key(source: Path, store: str) -> None:
    shifted = image_copies.prepare(str(source), store, shift=True)
    plain = image_copies.prepare(str(source), store, shift=False)
    assert plain.key != shifted.key
    assert os.lstat(os.path.join(plain.path, "bin/busybox")).st_uid == 0
    assert listing(store) == sorted([plain.key, shifted.key])


def test_unchanged_source_reuses_the_copy(source: Path, store: str) -> None:
    first = image_copies.prepare(str(source), store)
    before = tree(first.path)
    image_copies.forget_sources()  # as after a restart: found again by scanning, not rebuilt
    assert image_copies.prepare(str(source), store) == first
    assert image_copies.prepare(str(source), store) == first
    assert tree(first.path) == before
    assert listing(store) == [first.key]


@pytest.mark.parametrize("change", ["add", "remove", "touch", "chmod", "nested", "replace"])
def test_a_change_makes_a_new_copy_and_leaves_the_old_one(
    source: Path, store: str, tmp_path: Path, change: str, check: str
) -> None:
    old = image_copies.prepare(str(source), store)
    old_tree = tree(old.path)
    link = tmp_path / "current"
    link.symlink_to(source)
    assert image_copies.prepare(str(link), store) == old  # a symlink to the same tree
    if change == "add":
        (source / "bin/new-tool").write_text("#!/bin/sh\n")
    elif change == "remove":
        (source / "bin/ls").unlink()
    elif change == "touch":
        os.utime(source / "bin")
    elif change == "chmod":
        (source / "var").chmod(0o700)
    elif change == "nested":
        (source / "usr/local/bin/deep").mkdir()
    else:  # the busybox builder's way: a new tree, the symlink switched
        other = build_rootfs(tmp_path / "other")
        (other / "bin/only-here").write_text("")
        link.unlink()
        link.symlink_to(other)
    new = image_copies.prepare(str(link), store)
    assert new.key != old.key
    assert image_copies.prepare(str(link), store) == new
    assert tree(old.path) == old_tree  # the old copy is exactly as it was
    assert listing(store) == sorted([old.key, new.key])
    names = set(os.listdir(os.path.join(new.path, "bin")))
    assert ("new-tool" in names) == (change == "add")
    assert ("ls" in names) == (change != "remove")
    assert ("only-here" in names) == (change == "replace")


def test_a_scan_is_trusted_only_once_the_tree_has_settled() -> None:
    """Within a clock tick of a change, another change can leave a directory's stamps as
    they were, so a scan taken then could miss it: prepare waits that window out."""
    settle = generations.SETTLE_NS
    start = 10**18

    def dirs(*ctimes: int) -> tuple[generations.DirStat, ...]:
        return tuple((f"d{i}", 1, i, 0, c) for i, c in enumerate(ctimes))

    assert generations.unsettled_ns(dirs(start - settle, start - 5 * settle), start) == 0
    assert generations.unsettled_ns(dirs(start - settle + 1, 0), start) == 1
    assert generations.unsettled_ns(dirs(0, start - 10), start) == settle - 10
    assert generations.unsettled_ns(dirs(start + 3), start) == settle + 3
    assert generations.unsettled_ns(dirs(start + settle), start) == 0  # clock set back


def test_a_fresh_change_is_in_the_copy(source: Path, store: str) -> None:
    (source / "bin/fresh").write_text("")
    copy = image_copies.prepare(str(source), store)
    assert os.path.exists(os.path.join(copy.path, "bin/fresh"))


def test_watches_are_bounded_and_closed(source: Path, store: str, tmp_path: Path) -> None:
    before = inotify_fds()
    image_copies.prepare(str(source), store)
    assert inotify_fds() == before + 1
    for n in range(image_copies.WATCHED_SOURCES + 2):
        image_copies.prepare(str(build_rootfs(tmp_path / f"more-{n}")), store)
    assert inotify_fds() == before + image_copies.WATCHED_SOURCES
    # The source that lost its watch is still checked, by lstat.
    old = image_copies.prepare(str(source), store)
    (source / "usr/local/bin/new").write_text("")
    assert image_copies.prepare(str(source), store).key != old.key
    image_copies.forget_sources()
    assert inotify_fds() == before
    image_copies.prepare(str(source), store)
    assert inotify_fds() == before + 1
    image_copies.collect(store, set(), keep_current=False)  # removes its copy: and its watch
    assert inotify_fds() == before


def test_a_touched_file_rescans_and_keeps_the_copy(source: Path, store: str) -> None:
    first = image_copies.prepare(str(source), store)
    os.utime(source / "etc/passwd")  # an event on /etc's watch, but no directory changed
    assert image_copies.prepare(str(source), store) == first
    assert listing(store) == [first.key]


def test_collect_removes_unused_copies_and_temp_dirs(source: Path, store: str) -> None:
    old = image_copies.prepare(str(source), store)
    (source / "bin/x").write_text("")
    current = image_copies.prepare(str(source), store)
    half_built = os.path.join(store, f"{current.key}.tmp-1-abcd")
    os.makedirs(os.path.join(half_built, "rootfs/bin"))
    legacy = os.path.join(store, "0123456789abcdef01234567")  # the layout before generations
    os.makedirs(os.path.join(legacy, "bin"))
    real_store = os.path.realpath(store)
    removed = image_copies.collect(store, {old.path})
    assert sorted(removed) == sorted(os.path.join(real_store, n) for n in (half_built, legacy))
    assert listing(store) == sorted([old.key, current.key])  # in use; current for its source
    assert image_copies.collect(store, {old.path}) == []
    assert image_copies.collect(store, set()) == [os.path.dirname(old.path)]  # unused and stale
    assert listing(store) == [current.key]
    assert image_copies.prepare(str(source), store) == current
    (source / "bin/y").write_text("")
    assert image_copies.collect(store, set()) == [os.path.dirname(current.path)]  # stale now
    # A collected copy is rebuilt, not found in the cache.
    newest = image_copies.prepare(str(source), store)
    assert os.path.isdir(os.path.join(newest.path, "bin"))
    assert image_copies.collect(store, set(), keep_current=False) == [os.path.dirname(newest.path)]
    assert listing(store) == []
    assert image_copies.collect(os.path.join(store, "never-made"), set()) == []


def test_a_copy_whose_source_is_gone_is_collected(source: Path, store: str, tmp_path: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(source)
    copy = image_copies.prepare(str(link), store)
    assert image_copies.collect(store, set()) == []
    link.unlink()
    link.symlink_to(build_rootfs(tmp_path / "next"))  # the link now names another tree
    assert image_copies.collect(store, set()) == [os.path.dirname(copy.path)]
    other = image_copies.prepare(str(link), store)
    shutil.rmtree((tmp_path / "next").resolve())  # the tree it was copied from is gone
    assert image_copies.collect(store, set()) == [os.path.dirname(other.path)]


def test_collect_keeps_a_copy_a_mounted_overlay_uses(source: Path, store: str, tmp_path: Path) -> None:
    copy = image_copies.prepare(str(source), store)
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={copy.path},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        assert copy.path in image_copies.mounted_lower_dirs()
        assert image_copies.collect(store, set(), keep_current=False) == []
        assert (merged / "bin/busybox").is_file()
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert image_copies.collect(store, set(), keep_current=False) == [os.path.dirname(copy.path)]


def test_concurrent_prepares_make_one_copy(source: Path, store: str) -> None:
    results: list[image_copies.ImageCopy] = []

    def prepare() -> None:
        results.append(image_copies.prepare(str(source), store))

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.path for r in results}) == 1
    assert listing(store) == [results[0].key]


def test_not_a_directory(tmp_path: Path, store: str) -> None:
    with pytest.raises(KernelError, match="is not a directory"):
        image_copies.prepare(str(tmp_path / "missing"), store)


def test_mountinfo_lower_dirs(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "90 1 0:50 / /d/c/rootfs rw,relatime - overlay overlay "
        "rw,lowerdir=/d/images/k\\040x/rootfs:/other,upperdir=/d/c/upper,workdir=/d/c/work\n"
        "91 1 0:51 / /e rw - overlay overlay rw,lowerdir+=/new/api,datadir+=/data\n"
    )
    assert image_copies.mounted_lower_dirs(str(info)) == {"/d/images/k x/rootfs", "/other", "/new/api"}
