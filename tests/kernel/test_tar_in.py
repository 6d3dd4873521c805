"""StreamIn's extractor (gactor.kernel.tar_in) on the host's file system, in a forked child
as the shim runs it: bounded memory, and GNU tar's results for the same archive."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gactor.kernel import tar_in

MiB = 1 << 20


def extract(archive: bytes | Iterator[bytes], into: Path) -> tuple[int, bytes, int]:
    """Run ``tar_in.main`` in a forked child in ``into`` with ``archive`` on stdin; its exit
    status, stderr and peak RSS (KiB)."""
    stdin_r, stdin_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdin_r, 0)
            os.dup2(err_w, 2)
            os.chdir(into)
            os._exit(tar_in.main([]))
        finally:
            os._exit(127)
    os.close(stdin_r)
    os.close(err_w)
    errors = bytearray()
    reader = threading.Thread(target=lambda: errors.extend(os.fdopen(err_r, "rb").read()))
    reader.start()
    with os.fdopen(stdin_w, "wb") as f:
        for piece in [archive] if isinstance(archive, bytes) else archive:
            f.write(piece)
    _, status, usage = os.wait4(pid, 0)
    reader.join()
    return os.waitstatus_to_exitcode(status), bytes(errors), usage.ru_maxrss


def many_files(n: int) -> Iterator[bytes]:
    """A PAX tar of ``n`` empty files, each with a user.* xattr, made as it is sent."""
    for i in range(n):
        info = tarfile.TarInfo(f"d{i % 100}/f{i}")
        info.pax_headers = {"SCHILY.xattr.user.n": str(i)}
        yield info.tobuf(format=tarfile.PAX_FORMAT)
    yield bytes(2 * tarfile.BLOCKSIZE)


def test_memory_does_not_grow_with_the_number_of_members(tmp_path: Path) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = extract(many_files(2_000), tmp_path / "small")
    large = extract(many_files(40_000), tmp_path / "large")
    assert small[:2] == large[:2] == (0, b"")
    assert os.getxattr(tmp_path / "large/d7/f39907", "user.n") == b"39907"
    # Kept members (tarfile's default) cost about 27 MiB more at 40,000 (measured).
    assert large[2] - small[2] < 8 * 1024, (small[2], large[2])


def gnu_tar(*args: str, cwd: Path, stdin: bytes = b"") -> bytes:
    return subprocess.run(["tar", *args], cwd=cwd, input=stdin, check=True, capture_output=True).stdout


def tree(top: Path) -> dict[str, tuple[str, int, dict[str, bytes], bytes]]:
    """Type, mode, xattrs and content (or link target) of everything below ``top``."""
    found = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        kind = ("l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode)
                else "f" if stat.S_ISREG(st.st_mode) else "other")
        xattrs = {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
        body = os.readlink(path).encode() if kind == "l" else path.read_bytes() if kind == "f" else b""
        found[str(path.relative_to(top))] = (kind, stat.S_IMODE(st.st_mode), xattrs, body)
    return found


def test_a_gnu_tar_archive_comes_out_as_gnu_tar_extracts_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(os.urandom(3 * MiB + 5))
    (src / "a" / "tool").write_text("#!/bin/sh\n")
    (src / "a" / "tool").chmod(0o4755)
    (src / "ro").mkdir(mode=0o555)  # filled before its mode is set, or nothing could go in
    os.setxattr(src / "a" / "b" / "file", "user.k", b"v")
    os.setxattr(src / "a", "user.dir", b"yes")
    (src / "link").symlink_to("a/tool")
    os.link(src / "a" / "tool", src / "hard")
    (src / "ro" / "inside").write_text("x")
    (src / "ro").chmod(0o555)
    archive = gnu_tar("--xattrs", "--xattrs-include=*", "-cf", "-", ".", cwd=src)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    code, errors, _ = extract(archive, ours)
    assert (code, errors) == (0, b"")
    # GNU tar as root with -p (exact modes, as tar_in keeps them) and --xattrs.
    gnu_tar("--xattrs", "--xattrs-include=*", "-xpf", "-", cwd=theirs, stdin=archive)
    assert tree(ours) == tree(theirs)
    assert tree(ours)["a/tool"][1] == 0o4755
    assert os.lstat(ours / "hard").st_ino == os.lstat(ours / "a" / "tool").st_ino


@pytest.mark.parametrize(("archive", "message"), [
    (b"", b"not a valid tar archive"),
    (b"garbage!" * 200, b"not a valid tar archive"),
])
def test_a_bad_archive_fails_with_the_reason(tmp_path: Path, archive: bytes, message: bytes) -> None:
    code, errors, _ = extract(archive, tmp_path)
    assert code == tar_in.EXIT_FAILURE
    assert message in errors, errors


def test_a_truncated_file_fails_and_keeps_what_came(tmp_path: Path) -> None:
    info = tarfile.TarInfo("cut")
    info.size = 2 * MiB
    code, errors, _ = extract(info.tobuf() + b"\x01" * MiB, tmp_path)
    assert code == tar_in.EXIT_FAILURE
    assert b"unexpected end of data" in errors, errors
    assert (tmp_path / "cut").read_bytes() == b"\x01" * MiB


def test_dotdot_names_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a/../../outside")
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "in").mkdir()
    code, errors, _ = extract(buf.getvalue(), tmp_path / "in")
    assert code == tar_in.EXIT_FAILURE
    assert b"points outside" in errors, errors
    assert not (tmp_path / "outside").exists()


def symlink_then_member(target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("lnk")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("lnk/x"), io.BytesIO(b""))
    return buf.getvalue()


@pytest.mark.parametrize("target", ["/tmp", "../..", "sub/../.."])
def test_a_member_below_a_symlink_out_of_the_tree_is_refused(tmp_path: Path, target: str) -> None:
    (tmp_path / "in").mkdir()
    code, errors, _ = extract(symlink_then_member(target), tmp_path / "in")
    assert code == tar_in.EXIT_FAILURE
    assert b"goes through the symlink 'lnk'" in errors, errors


def test_a_member_below_a_symlink_within_the_tree_is_written_through_it(tmp_path: Path) -> None:
    # As GNU tar does: only symlinks out of the tree (absolute, or with ..) are deferred.
    code, errors, _ = extract(symlink_then_member("sub"), tmp_path)
    assert (code, errors) == (0, b"")
    assert (tmp_path / "sub" / "x").is_file()
