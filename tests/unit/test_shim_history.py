"""The shim's bounded process history and paged ``list``, on a Shim with no container:
processes are entered as the spawn op would enter them, with real pipes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from gactor.kernel import shim_wire as wire
from gactor.kernel.shim import KEEP_COLLECTED, LIST_PAGE, Process, Shim
from gactor.kernel.spawn import make_stdio


@pytest.fixture
def shim(tmp_path: Path) -> Iterator[Shim]:
    (tmp_path / "processes").mkdir()
    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    s = Shim({}, dir_fd)
    yield s
    for proc in s.procs.values():
        if not proc.drained:
            for fd in proc.stdio.kept:
                if fd != proc.stdio.stdin or proc.stdin_open:
                    os.close(fd)
    os.close(s.procs_dir)
    os.close(dir_fd)


def add(shim: Shim, proc_id: str, pid: int = 0) -> Process:
    """What op_spawn records (the child's fds closed, as after a fork)."""
    stdio = make_stdio(None)
    for fd in stdio.child:
        os.close(fd)
    shim.seq += 1
    proc = Process(proc_id, shim.seq, pid or 10_000 + shim.seq, stdio, False)
    shim.procs[proc_id] = proc
    return proc


def finish(shim: Shim, proc: Process, code: int = 0) -> None:
    proc.exit = code
    with open(f"/proc/self/fd/{shim.procs_dir}/{proc.id}", "w") as f:
        f.write(str(code))
    assert shim.op_drained({"id": proc.id}) == ({}, [])


def all_pages(shim: Shim, limit: int | None = None) -> tuple[list[str], int]:
    ids, pages, after = [], 0, None
    while True:
        msg: dict[str, object] = {"op": "list"}
        if after is not None:
            msg["after"] = after
        if limit is not None:
            msg["limit"] = limit
        reply, fds = shim.op_list(msg)
        assert fds == []
        assert len(wire.pack(reply)) <= wire.MAX_MESSAGE
        pages += 1
        ids += [p["id"] for p in reply["processes"]]
        after = reply["next"]
        if after is None:
            return ids, pages


def test_collected_processes_beyond_the_cap_are_forgotten_with_their_files(shim: Shim) -> None:
    running = add(shim, "running")
    exited_not_drained = add(shim, "exited")
    exited_not_drained.exit = 1
    for n in range(KEEP_COLLECTED + 250):
        finish(shim, add(shim, f"p{n}"), n % 5)
    kept = [f"p{n}" for n in range(250, KEEP_COLLECTED + 250)]
    assert list(shim.procs) == ["running", "exited", *kept]
    files = set(os.listdir(f"/proc/self/fd/{shim.procs_dir}"))
    assert files == set(kept)
    # The newest still answer attach with their exit code; a forgotten one is unknown.
    reply, fds = shim.op_attach({"id": kept[-1]})
    assert (reply["exit"], reply["fds"], fds) == ((KEEP_COLLECTED + 249) % 5, [], [])
    with pytest.raises(Exception, match="unknown process: p0"):
        shim.op_attach({"id": "p0"})
    # Processes not yet collected are never pruned.
    assert running.exit is None
    assert "running" in shim.procs
    assert "exited" in shim.procs


def test_list_pages_cover_every_process_once_in_spawn_order(shim: Shim) -> None:
    for n in range(1234):
        add(shim, f"p{n}")
    ids, pages = all_pages(shim)
    assert ids == [f"p{n}" for n in range(1234)]
    assert pages == -(-1234 // LIST_PAGE)
    ids, pages = all_pages(shim, limit=100)
    assert ids == [f"p{n}" for n in range(1234)]
    assert pages == 13


def test_list_cursor_survives_pruning_and_new_processes(shim: Shim) -> None:
    procs = [add(shim, f"p{n}") for n in range(10)]
    reply, _ = shim.op_list({"op": "list", "limit": 4})
    assert [p["id"] for p in reply["processes"]] == ["p0", "p1", "p2", "p3"]
    del shim.procs["p4"]  # forgotten between pages
    add(shim, "late")
    reply, _ = shim.op_list({"op": "list", "after": reply["next"], "limit": 100})
    assert [p["id"] for p in reply["processes"]] == ["p5", "p6", "p7", "p8", "p9", "late"]
    assert reply["next"] is None
    assert procs[0].seq < procs[9].seq


def test_a_page_of_long_ids_stays_under_the_message_size(shim: Shim) -> None:
    for n in range(40):
        add(shim, f"{n}-" + "x" * 20_000)
    ids, pages = all_pages(shim)
    assert len(ids) == 40
    assert pages > 1


def test_attach_sends_only_the_fds_it_holds(shim: Shim) -> None:
    proc = add(shim, "cat")
    reply, fds = shim.op_attach({"id": "cat"})
    assert reply["fds"] == ["stdin", "stdout", "stderr"]
    assert fds == [proc.stdio.stdin, proc.stdio.stdout, proc.stdio.stderr]
    shim.op_close_stdin({"id": "cat"})
    reply, fds = shim.op_attach({"id": "cat"})
    assert (reply["fds"], reply["stdin"]) == (["stdout", "stderr"], False)
    assert fds == [proc.stdio.stdout, proc.stdio.stderr]
    for fd in fds:
        os.fstat(fd)  # open: every fd sent is one the shim holds


def test_bad_list_arguments_are_refused(shim: Shim) -> None:
    for msg in ({"after": "x"}, {"after": None}, {"limit": 0}, {"limit": [1]}):
        with pytest.raises(Exception, match="after and limit"):
            shim.op_list(msg)


def test_message_too_large_is_refused_before_sending() -> None:
    with pytest.raises(wire.MessageTooLarge, match="more than"):
        wire.encode({"blob": b"x" * wire.MAX_MESSAGE})
    assert len(msgpack.packb({"blob": b"x" * 100})) < wire.MAX_MESSAGE


def test_a_reply_that_cannot_be_sent_becomes_an_error_reply(shim: Shim) -> None:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        shim.conns.add(ours)
        r, w = os.pipe()
        os.close(r)
        os.close(w)  # a closed fd: sendmsg fails with EBADF
        shim._reply(ours, {"rid": 3, "pid": 1}, [w])
        got = wire.recv(theirs)
        assert got is not None
        reply, fds = got
        assert fds == []
        assert reply["rid"] == 3
        assert "Bad file descriptor" in reply["error"]["message"]
        shim._reply(ours, {"rid": 4, "blob": b"x" * wire.MAX_MESSAGE}, [])
        got = wire.recv(theirs)
        assert got is not None
        assert got[0]["rid"] == 4
        assert "more than the" in got[0]["error"]["message"]
        assert ours in shim.conns  # the connection stays
        shim.conns.discard(ours)
