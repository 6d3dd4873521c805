"""StreamIn keeps xattrs (gactor issue 9), as Garden's GNU tar ``--xattrs`` does, with
ownership, modes, links and confinement as before. Every effect is read from outside:
the container's root through ``/proc/<garden-init>/root`` on the host."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from gactor import ContainerSpec, GardenError, StreamInSpec, StreamOutSpec

from .helpers import (
    E2E_MARKS,
    container_pids,
    ensure_user,
    init_pid,
    proc_name,
    sh_ok,
    unique_handle,
    wait_for,
)
from .test_security import target_dir, tree_digest

pytestmark = E2E_MARKS

# A v2 file capability: cap_net_raw (bit 13) permitted and effective.
CAP_NET_RAW = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
          pax: dict[str, str] | None = None, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, 1_600_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.pax_headers = dict(pax or {})
    return info, data


def pax_tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """An archive with PAX headers, as Python's tarfile writes them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def xattr(name: str, value: bytes) -> dict[str, str]:
    """A PAX record for one xattr, as tarfile needs it (bytes through surrogateescape)."""
    return {f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")}


def xattrs_of(path: str) -> dict[str, bytes]:
    return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}


async def root_of(container: Any) -> str:
    """The container's root as the host sees it."""
    return f"/proc/{await init_pid(container.handle)}/root"


async def uid_of(container: Any, user: str) -> int:
    return int(await sh_ok(container, f"id -u {user}"))


async def test_pax_xattrs_are_kept_on_files_and_directories(container):
    archive = pax_tar(
        entry("d", tarfile.DIRTYPE, mode=0o755, pax=xattr("user.dir", b"on a directory")),
        entry("d/f", data=b"body", pax={**xattr("user.plain", b"value"), **xattr("user.binary", b"\x00\xff\x01")}),
        # libarchive's spelling: base64 values.
        entry("d/g", data=b"gee", pax={"LIBARCHIVE.xattr.user.b64": base64.b64encode(b"from bsdtar").decode()}),
    )
    await container.stream_in(StreamInSpec(path="/root/x", tar_stream=archive))
    root = await root_of(container)
    assert xattrs_of(f"{root}/root/x/d") == {"user.dir": b"on a directory"}
    assert xattrs_of(f"{root}/root/x/d/f") == {"user.plain": b"value", "user.binary": b"\x00\xff\x01"}
    assert xattrs_of(f"{root}/root/x/d/g") == {"user.b64": b"from bsdtar"}
    with open(f"{root}/root/x/d/f", "rb") as f:
        assert f.read() == b"body"


@contextlib.contextmanager
def gnu_tar_tree() -> Iterator[bytes]:
    """An archive GNU tar made on the host with ``--xattrs``: a directory, a setuid file,
    a setgid directory, a sticky one, a symlink, a hard link, each file with user.* xattrs."""
    top = tempfile.mkdtemp(prefix="gactor-xattrs-")
    try:
        src = os.path.join(top, "tree")
        os.makedirs(f"{src}/sub")
        os.makedirs(f"{src}/shared")
        os.makedirs(f"{src}/sticky")
        with open(f"{src}/sub/tool", "w") as f:
            f.write("#!/bin/sh\necho tool\n")
        os.chmod(f"{src}/sub/tool", 0o4755)
        os.chmod(f"{src}/shared", 0o2775)
        os.chmod(f"{src}/sticky", 0o1777)
        os.setxattr(f"{src}/sub/tool", "user.origin", b"gnu tar")
        os.setxattr(f"{src}/sub", "user.kind", b"dir")
        os.symlink("sub/tool", f"{src}/link")
        os.link(f"{src}/sub/tool", f"{src}/hard")
        yield subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", src, "-cf", "-", "."],
                             check=True, capture_output=True).stdout
    finally:
        shutil.rmtree(top)


async def test_a_gnu_tar_archive_as_a_user_keeps_xattrs_modes_and_links(container):
    await ensure_user(container, "alice")
    alice = await uid_of(container, "alice")
    with gnu_tar_tree() as archive:
        assert b"SCHILY.xattr.user.origin" in archive  # GNU tar wrote them: the test means something
        await container.stream_in(StreamInSpec(path="/home/alice/in", user="alice", tar_stream=archive))
    top = f"{await root_of(container)}/home/alice/in"
    assert xattrs_of(f"{top}/sub/tool") == {"user.origin": b"gnu tar"}
    assert xattrs_of(f"{top}/sub") == {"user.kind": b"dir"}
    tool = os.lstat(f"{top}/sub/tool")
    for path in ("", "/sub", "/sub/tool", "/shared", "/sticky", "/link"):
        assert os.lstat(top + path).st_uid == alice, path  # --no-same-owner: the user's
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(f"{top}/shared").st_mode) == 0o2775
    assert stat.S_IMODE(os.lstat(f"{top}/sticky").st_mode) == 0o1777
    assert os.readlink(f"{top}/link") == "sub/tool"
    hard = os.lstat(f"{top}/hard")
    assert (hard.st_ino, hard.st_nlink) == (tool.st_ino, 2)
    # And inside, alice runs what she streamed in.
    assert await sh_ok(container, "/home/alice/in/link", user="alice") == "tool\n"


async def test_security_capability_is_kept_for_root_only(container):
    await ensure_user(container, "alice")
    archive = pax_tar(entry("ping", data=b"#!/bin/sh\n", mode=0o755,
                            pax={**xattr("security.capability", CAP_NET_RAW), **xattr("user.a", b"1")}))
    await container.stream_in(StreamInSpec(path="/root/caps", user="root", tar_stream=archive))
    await container.stream_in(StreamInSpec(path="/home/alice/caps", user="alice", tar_stream=archive))
    root = await root_of(container)
    as_root = xattrs_of(f"{root}/root/caps/ping")
    # The container's root may set it; the kernel stores it for that user namespace (v3,
    # with the namespace's root as its owner), with the same capability bits.
    cap = as_root["security.capability"]
    assert cap[4:8] == CAP_NET_RAW[4:8], cap.hex()
    assert as_root["user.a"] == b"1"
    # alice may not (GNU tar only warns): her file has its user.* xattr and no capability.
    assert xattrs_of(f"{root}/home/alice/caps/ping") == {"user.a": b"1"}


async def test_trusted_xattrs_need_a_privileged_container(create_container):
    archive = pax_tar(entry("f", data=b"x", pax={**xattr("trusted.gactor", b"t"), **xattr("user.u", b"u"),
                                                 **xattr("trusted.overlay.opaque", b"y")}))
    found = {}
    for privileged in (False, True):
        c = await create_container(ContainerSpec(handle=unique_handle(), privileged=privileged))
        await c.stream_in(StreamInSpec(path="/root/t", tar_stream=archive))
        found[privileged] = xattrs_of(f"{await root_of(c)}/root/t/f")
    assert found[False] == {"user.u": b"u"}  # trusted.* needs CAP_SYS_ADMIN of the host
    assert found[True] == {"user.u": b"u", "trusted.gactor": b"t"}  # overlay's own never


async def test_members_through_a_symlink_the_archive_made_are_refused(container):
    with target_dir() as target:
        before = tree_digest(target)
        archive = pax_tar(entry("evil", tarfile.SYMTYPE, link=target),
                          entry("evil/planted", data=b"escaped"),
                          entry("hard", tarfile.LNKTYPE, link="evil/precious"))
        with pytest.raises(GardenError) as raised:
            await container.stream_in(StreamInSpec(path="/tmp/in", user="root", tar_stream=archive))
        assert "error streaming in" in raised.value.message
        assert "goes through the symlink 'evil'" in raised.value.message
        assert tree_digest(target) == before
        # A symlink the container already had is followed, inside the container.
        await sh_ok(container, f"mkdir -p {target} && ln -s {target} /tmp/there", user="root")
        await container.stream_in(StreamInSpec(path="/tmp/there", user="root",
                                               tar_stream=pax_tar(entry("planted", data=b"inside"))))
        assert tree_digest(target) == before
        with open(f"{await root_of(container)}{target}/planted", "rb") as f:
            assert f.read() == b"inside"


async def test_a_cancelled_stream_in_kills_the_extractor_and_keeps_what_it_wrote(container):
    size, sent = 64 << 20, trio.Event()
    header = tarfile.TarInfo("partial")
    header.size = size

    async def slow() -> Any:
        yield header.tobuf(format=tarfile.PAX_FORMAT)
        for i in range(size >> 20):
            yield b"\xab" * (1 << 20)
            if i == 7:
                sent.set()
                await trio.sleep_forever()

    root = await root_of(container)

    def written() -> int:
        try:
            return os.lstat(f"{root}/tmp/cut/partial").st_size
        except FileNotFoundError:
            return 0

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            async def cancel_once_written() -> None:
                await sent.wait()
                await wait_for(lambda: written() >= 4 << 20, within=20, what="data written")
                scope.cancel()

            nursery.start_soon(cancel_once_written)
            await container.stream_in(StreamInSpec(path="/tmp/cut", tar_stream=slow()))
    assert scope.cancelled_caught
    await wait_for(lambda: not [p for p in container_pids(container.handle) if proc_name(p) == "tar"],
                   within=15, what="the extractor to end")
    kept = written()
    assert 4 << 20 <= kept <= 8 << 20
    with open(f"{root}/tmp/cut/partial", "rb") as f:
        assert set(f.read()) == {0xAB}


async def stream_out(container: Any, path: str, user: str = "") -> bytes:
    data = bytearray()
    with trio.fail_after(30):
        async with await container.stream_out(StreamOutSpec(path=path, user=user)) as chunks:
            async for chunk in chunks:
                data += chunk
    return bytes(data)


async def test_stream_out_keeps_xattrs_and_gnu_tar_restores_them(container, tmp_path):
    await ensure_user(container, "alice")
    with gnu_tar_tree() as archive:
        await container.stream_in(StreamInSpec(path="/home/alice/src", user="alice", tar_stream=archive))
    out = await stream_out(container, "/home/alice/src", user="alice")
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["src/sub/tool"].pax_headers["SCHILY.xattr.user.origin"] == "gnu tar"
    assert members["src/sub"].pax_headers["SCHILY.xattr.user.kind"] == "dir"
    assert (members["src/sub/tool"].uname, members["src/sub/tool"].mode) == ("alice", 0o4755)
    assert members["src/link"].issym()
    assert members["src/link"].linkname == "sub/tool"
    linked = [m for m in members.values() if m.islnk()]  # the second name of the tool
    assert [(m.name, m.linkname) for m in linked] in ([("src/sub/tool", "src/hard")], [("src/hard", "src/sub/tool")])
    # What Garden's clients do with it: GNU tar --xattrs gets the xattrs back.
    await trio.run_process(["tar", "--xattrs", "--xattrs-include=*", "-xpf", "-"], cwd=tmp_path, stdin=out)
    assert xattrs_of(str(tmp_path / "src/sub/tool")) == {"user.origin": b"gnu tar"}
    # And a round trip through StreamIn keeps them.
    await container.stream_in(StreamInSpec(path="/root/copy", tar_stream=out))
    assert xattrs_of(f"{await root_of(container)}/root/copy/src/sub/tool") == {"user.origin": b"gnu tar"}


async def test_stream_out_of_a_file_with_a_capability_carries_it(container):
    archive = pax_tar(entry("ping", data=b"#!/bin/sh\n", mode=0o755, pax=xattr("security.capability", CAP_NET_RAW)))
    await container.stream_in(StreamInSpec(path="/root/caps", tar_stream=archive))
    with tarfile.open(fileobj=io.BytesIO(await stream_out(container, "/root/caps/ping"))) as tar:
        (member,) = tar.getmembers()
    value = member.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert value[4:8] == CAP_NET_RAW[4:8], value.hex()
