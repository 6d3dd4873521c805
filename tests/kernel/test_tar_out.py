"""StreamOut's tar writer (gactor.kernel.tar_out) on the host, in a forked child as the
shim runs it: GNU tar --xattrs reads back the tree it archived; errors as GNU tar's."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

from gactor.kernel import tar_out

from .test_tar_in import tree


def archive(name: str, cwd: Path) -> tuple[int, bytes, bytes]:
    """``tar_out.main([name])`` in a forked child in ``cwd``: exit status, stdout, stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.chdir(cwd)
            os._exit(tar_out.main(["-cf", "-", name]))
        finally:
            os._exit(127)
    os.close(out_w)
    os.close(err_w)
    errors = bytearray()
    reader = threading.Thread(target=lambda: errors.extend(os.fdopen(err_r, "rb").read()))
    reader.start()
    with os.fdopen(out_r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    reader.join()
    return os.waitstatus_to_exitcode(status), data, bytes(errors)


def test_gnu_tar_reads_back_the_tree_with_its_xattrs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    (src / "a" / "tool").write_text("#!/bin/sh\n")
    (src / "a" / "tool").chmod(0o4755)
    os.setxattr(src / "a" / "b" / "file", "user.k", b"\x00binary\xff")
    os.setxattr(src / "a", "user.dir", b"yes")
    (src / "link").symlink_to("a/tool")
    os.link(src / "a" / "tool", src / "hard")
    os.mkfifo(src / "fifo")
    code, data, errors = archive("src", tmp_path)
    assert (code, errors) == (0, b"")
    assert len(data) % 10240 == 0  # whole records, as tar writes them
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xpf", "-"], cwd=back, input=data, check=True)
    assert tree(back / "src") == tree(src)
    assert os.lstat(back / "src" / "hard").st_ino == os.lstat(back / "src" / "a" / "tool").st_ino
    listing = subprocess.run(["tar", "-tf", "-"], input=data, check=True, capture_output=True).stdout.split()
    assert listing[0] == b"src/"  # the directory before what is in it, as tar writes it


def test_the_contents_of_dot_are_named_dot_slash(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    code, data, _ = archive(".", tmp_path)
    assert code == 0
    listing = subprocess.run(["tar", "-tf", "-"], input=data, check=True, capture_output=True).stdout.split()
    assert listing == [b"./", b"./f"]


def test_a_missing_path_fails_with_no_archive(tmp_path: Path) -> None:
    code, data, errors = archive("nothing-here", tmp_path)
    assert (code, data) == (tar_out.EXIT_FAILURE, b"")
    assert b"nothing-here: No such file or directory" in errors, errors
