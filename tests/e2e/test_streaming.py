"""StreamIn and StreamOut (GATS lifecycle_test's StreamIn items, and StreamOut as Garden's
client sees it): tar archives moved in and out as a container user."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
import trio

import gactor
from gactor import StreamInSpec, StreamOutSpec

from .helpers import E2E_MARKS, ensure_user, sh, sh_ok, wait_for

pytestmark = E2E_MARKS


def gats_tar() -> bytes:
    """The archive GATS streams in: ./some-temp-dir/ and ./some-temp-dir/some-temp-file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        directory = tarfile.TarInfo("./some-temp-dir")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        body = b"some-body"
        member = tarfile.TarInfo("./some-temp-dir/some-temp-file")
        member.size, member.mode = len(body), 0o644
        tar.addfile(member, io.BytesIO(body))
    return buf.getvalue()


def members(archive: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                for m in tar.getmembers()}


async def stream_out(container: gactor.Container, path: str, user: str = "") -> bytes:
    data = bytearray()
    with trio.fail_after(30):
        async with await container.stream_out(StreamOutSpec(path=path, user=user)) as chunks:
            async for chunk in chunks:
                data += chunk
    return bytes(data)


async def test_stream_in_as_a_user_gives_the_user_the_files(container):
    await ensure_user(container, "alice")
    await container.stream_in(StreamInSpec(path="/home/alice", user="alice", tar_stream=gats_tar()))
    listing = await sh_ok(container, "ls -al /home/alice/some-temp-dir")
    assert " alice " in listing.splitlines()[-1]
    assert "some-temp-file" in listing
    assert await sh_ok(container, "cat /home/alice/some-temp-dir/some-temp-file") == "some-body"


async def test_stream_in_without_a_user_is_root(container):
    await container.stream_in(StreamInSpec(path="/root/in", tar_stream=gats_tar()))
    assert await sh_ok(container, "stat -c '%U %G' /root/in/some-temp-dir/some-temp-file") == "root root\n"


async def test_stream_in_to_slash(container):
    await container.stream_in(StreamInSpec(path="/", tar_stream=gats_tar()))
    assert await sh_ok(container, "cat /some-temp-dir/some-temp-file") == "some-body"


async def test_stream_in_relative_to_the_users_home(container):
    await ensure_user(container, "alice")
    await container.stream_in(StreamInSpec(path=".", user="alice", tar_stream=gats_tar()))
    assert await sh_ok(container, "cat /home/alice/some-temp-dir/some-temp-file") == "some-body"


async def test_stream_in_as_an_unknown_user_fails(container):
    with pytest.raises(gactor.GardenError, match="error streaming in"):
        await container.stream_in(StreamInSpec(path="/root", user="batman", tar_stream=gats_tar()))


async def test_stream_in_without_permission_fails(container):
    await ensure_user(container, "alice")
    await ensure_user(container, "bob")
    await sh_ok(container, "chmod 700 /home/alice")
    with pytest.raises(gactor.GardenError, match="Permission denied"):
        await container.stream_in(StreamInSpec(path="/home/alice", user="bob", tar_stream=gats_tar()))


async def test_stream_in_of_garbage_fails_and_the_server_keeps_serving(client, container):
    with pytest.raises(gactor.GardenError, match="error streaming in"):
        await container.stream_in(StreamInSpec(path="/root/x", tar_stream=b"not a tar" * 1000))
    await client.ping()
    assert await sh_ok(container, "echo fine") == "fine\n"


async def test_stream_out_of_a_directory_names_it(container):
    await container.stream_in(StreamInSpec(path="/root/out", tar_stream=gats_tar()))
    got = members(await stream_out(container, "/root/out/some-temp-dir"))
    assert got == {"some-temp-dir": None, "some-temp-dir/some-temp-file": b"some-body"}


async def test_stream_out_with_a_trailing_slash_gives_the_contents(container):
    await container.stream_in(StreamInSpec(path="/root/out", tar_stream=gats_tar()))
    got = members(await stream_out(container, "/root/out/some-temp-dir/"))
    assert got == {".": None, "./some-temp-file": b"some-body"}


async def test_stream_out_relative_to_the_users_home(container):
    await ensure_user(container, "alice")
    await sh_ok(container, "echo hi > /home/alice/note && chown alice /home/alice/note")
    assert members(await stream_out(container, "note", user="alice")) == {"note": b"hi\n"}


@pytest.mark.parametrize("path", ["/nonexistent", "/nonexistent/deeper", "/root/missing/"])
async def test_stream_out_of_a_missing_path_raises(container, path):
    with pytest.raises(gactor.GardenError, match="error streaming out"):
        await container.stream_out(StreamOutSpec(path=path))


async def test_stream_out_without_permission_raises(container):
    await ensure_user(container, "alice")
    await sh_ok(container, "mkdir -p /root/secret && echo x > /root/secret/f")
    with pytest.raises(gactor.GardenError, match="error streaming out"):
        await container.stream_out(StreamOutSpec(path="/root/secret", user="alice"))


async def test_a_large_round_trip_is_byte_exact(container):
    code, _, err = await sh(container, "dd if=/dev/urandom of=/root/big bs=1M count=24 2>&1")
    assert code == 0, err
    want = (await sh_ok(container, "md5sum /root/big")).split()[0]
    archive = await stream_out(container, "/root/big")
    assert hashlib.md5(members(archive)["big"] or b"").hexdigest() == want  # noqa: S324
    await container.stream_in(StreamInSpec(path="/root/copy", tar_stream=archive))
    assert (await sh_ok(container, "md5sum /root/copy/big")).split()[0] == want


async def test_a_slow_reader_pauses_tar_and_loses_nothing(container):
    await sh_ok(container, "dd if=/dev/zero of=/root/zeros bs=1M count=12 2>/dev/null")
    received = 0
    with trio.fail_after(60):
        async with await container.stream_out(StreamOutSpec(path="/root/zeros")) as chunks:
            async for chunk in chunks:
                received += len(chunk)
                await trio.sleep(0.01)
    assert received >= 12 << 20


async def test_leaving_a_stream_out_early_stops_it(client, container):
    await sh_ok(container, "dd if=/dev/zero of=/root/zeros bs=1M count=64 2>/dev/null")
    async with await container.stream_out(StreamOutSpec(path="/root/zeros")) as chunks:
        async for _ in chunks:
            break
    async def tar_gone() -> bool:
        return "tar" not in await sh_ok(container, "ps -o comm")

    await wait_for(tar_gone, within=20, what="tar to stop")
    await client.ping()


async def test_stream_in_from_an_async_iterable(container):
    archive = gats_tar()

    async def pieces():
        for i in range(0, len(archive), 100):
            yield archive[i:i + 100]

    await container.stream_in(StreamInSpec(path="/root/pieces", tar_stream=pieces()))
    assert os.path.basename(await sh_ok(container, "ls /root/pieces")).strip() == "some-temp-dir"
