"""The ``gactor`` command line end to end: a subprocess per command against the real server."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import tarfile
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from ..oci_images import Entry, busybox_layer, sha256, tar_bytes, write_layout
from ..registry_server import STEP, LocalRegistry
from .helpers import E2E_MARKS
from .servers import ServerProcess, gactor_command

pytestmark = E2E_MARKS
TIMEOUT = 60.0


def gactor(
    server: ServerProcess, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m gactor --target URL ARGS...``, stdout and stderr captured."""
    return subprocess.run(
        gactor_command("--target", server.url, *args),
        input=stdin if stdin is not None else b"", capture_output=True, timeout=TIMEOUT,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


@pytest.fixture
def owner() -> str:
    """A property value no other test uses, so ``list --property`` sees only ours."""
    return f"cli-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def handle(gactor_server: ServerProcess, owner: str) -> Iterator[str]:
    """A container created by ``gactor create``; destroyed by ``gactor destroy`` after."""
    created = ok(gactor(gactor_server, "create", "--property", f"owner={owner}"))
    handle = created.strip()
    assert handle
    assert "\n" not in handle
    try:
        yield handle
    finally:
        gactor(gactor_server, "destroy", handle)


def test_ping_and_capacity(gactor_server: ServerProcess) -> None:
    assert ok(gactor(gactor_server, "ping")).strip() == "ok"
    capacity = json.loads(ok(gactor(gactor_server, "--json", "capacity")))
    assert capacity["memory_in_bytes"] > 0


def test_list_finds_by_property(gactor_server: ServerProcess, handle: str, owner: str) -> None:
    listed = ok(gactor(gactor_server, "list", "--quiet", "--property", f"owner={owner}"))
    assert listed.splitlines() == [handle]
    assert ok(gactor(gactor_server, "list", "-q", "--property", f"owner={owner}-not")) == ""
    assert json.loads(ok(gactor(gactor_server, "--json", "list", "-q", "--property", f"owner={owner}"))) == [handle]


def test_list_is_a_table_and_json(gactor_server: ServerProcess, handle: str, owner: str) -> None:
    info = json.loads(ok(gactor(gactor_server, "--json", "info", handle)))
    header, *rows = ok(gactor(gactor_server, "list", "--property", f"owner={owner}")).splitlines()
    assert header.split() == ["HANDLE", "STATE", "IP", "PROCESSES", "AGE", "PROPERTIES"]
    [row] = rows
    assert row.split() == [handle, "active", info["container_ip"], "0", row.split()[4], f"owner={owner}"]
    assert row.split()[4][-1] in "sm"  # an age: 850ms, 3s, 1m02s
    [listed] = json.loads(ok(gactor(gactor_server, "--json", "list", "--property", f"owner={owner}")))
    assert listed["handle"] == handle
    assert listed["state"] == "active"
    assert listed["container_ip"] == info["container_ip"]
    assert listed["properties"]["owner"] == owner
    assert listed["process_ids"] == []
    assert 0 < listed["age"] < TIMEOUT
    [empty] = ok(gactor(gactor_server, "list", "--property", f"owner={owner}-not")).splitlines()
    assert empty.split() == header.split()
    assert json.loads(ok(gactor(gactor_server, "--json", "list", "--property", f"owner={owner}-not"))) == []


def test_info_and_properties(gactor_server: ServerProcess, handle: str, owner: str) -> None:
    info = json.loads(ok(gactor(gactor_server, "--json", "info", handle)))
    assert info["state"] == "active"
    assert info["properties"]["owner"] == owner
    assert f"owner {owner}" in ok(gactor(gactor_server, "properties", handle)).splitlines()
    assert json.loads(ok(gactor(gactor_server, "--json", "properties", handle)))["owner"] == owner


def test_run_wires_stdout_stderr_and_exit_code(gactor_server: ServerProcess, handle: str) -> None:
    result = gactor(gactor_server, "run", handle, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_run_streams_piped_stdin(gactor_server: ServerProcess, handle: str) -> None:
    data = b"hello through the pipe\n" * 5000
    result = gactor(gactor_server, "run", handle, "--", "cat", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data


def test_run_into_a_closed_pipe_ends_quietly(gactor_server: ServerProcess, handle: str) -> None:
    """``gactor run ... | head -1``: the reader goes, the command ends as SIGPIPE would end
    it (141), with nothing on stderr."""
    command = " ".join(gactor_command("--target", gactor_server.url, "run", handle, "--", "yes"))
    result = subprocess.run(["bash", "-c", f'{command} | head -1; echo "status ${{PIPESTATUS[0]}}"'],
                            capture_output=True, timeout=TIMEOUT, check=False)
    assert (result.stdout, result.stderr) == (b"y\nstatus 141\n", b"")


def test_stream_out_into_a_closed_pipe_ends_quietly(gactor_server: ServerProcess, handle: str) -> None:
    command = " ".join(gactor_command("--target", gactor_server.url, "stream-out", handle, "--from", "/bin"))
    result = subprocess.run(["bash", "-c", f'{command} | head -c 10 >/dev/null; echo "status ${{PIPESTATUS[0]}}"'],
                            capture_output=True, timeout=TIMEOUT, check=False)
    assert (result.stdout, result.stderr) == (b"status 141\n", b"")
    assert ok(gactor(gactor_server, "run", handle, "--", "echo", "still usable")) == "still usable\n"


def test_run_env_dir_and_user(gactor_server: ServerProcess, handle: str) -> None:
    out = ok(gactor(gactor_server, "run", handle, "--env", "GREETING=hi", "--dir", "/tmp",
                    "--user", "root", "--", "sh", "-c", 'echo "$GREETING $(pwd) $(id -u)"'))
    assert out == "hi /tmp 0\n"


def test_stream_in_then_out(gactor_server: ServerProcess, handle: str) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        payload = b"payload\n"
        member = tarfile.TarInfo("greeting.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    result = gactor(gactor_server, "stream-in", handle, "--to", "/tmp/in", stdin=archive.getvalue())
    if b"not supported by this server yet" in result.stderr:
        pytest.skip("the server does not implement stream-in yet")
    ok(result)
    assert ok(gactor(gactor_server, "run", handle, "--", "cat", "/tmp/in/greeting.txt")) == "payload\n"

    result = gactor(gactor_server, "stream-out", handle, "--from", "/tmp/in/greeting.txt")
    assert result.returncode == 0, result.stderr
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        [member] = tar.getmembers()
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == b"payload\n"


def test_errors_are_one_line_and_exit_1(gactor_server: ServerProcess, handle: str) -> None:
    ok(gactor(gactor_server, "destroy", handle))
    result = gactor(gactor_server, "info", handle)
    assert result.returncode == 1
    assert result.stderr.decode() == f"error: unknown handle: {handle}\n"
    assert result.stdout == b""
    result = gactor(gactor_server, "run", handle, "--", "true")
    assert result.returncode == 1
    assert result.stderr.decode() == f"error: unknown handle: {handle}\n"


def test_info_table_shows_the_memory_limit(gactor_server: ServerProcess, owner: str) -> None:
    handle = ok(gactor(gactor_server, "create", "--memory", "64M", "--property", f"owner={owner}")).strip()
    try:
        info = json.loads(ok(gactor(gactor_server, "--json", "info", handle)))
        assert (info["handle"], info["state"], info["memory_limit_in_bytes"]) == (handle, "active", 64 << 20)
        assert 0 < info["memory_usage_in_bytes"] < 64 << 20
        assert info["age"] > 0
        lines = ok(gactor(gactor_server, "info", handle)).splitlines()
        table = {line[:14].strip(): line[14:].strip() for line in lines if line[:1] != " "}
        assert table["handle"] == handle
        assert table["state"] == "active"
        assert table["container ip"] == info["container_ip"]
        assert table["host ip"] == info["host_ip"]
        assert table["memory"].endswith(" / 64 MiB (0%)"), table["memory"]
        assert f"owner={owner}" in " ".join(lines)
    finally:
        ok(gactor(gactor_server, "destroy", handle))


def test_metrics_table_and_json(gactor_server: ServerProcess, owner: str) -> None:
    handle = ok(gactor(gactor_server, "create", "--memory", str(32 << 20), "--property", f"owner={owner}")).strip()
    try:
        # 4 MiB in /dev/shm counts toward the limit; the tables must show it in MiB.
        ok(gactor(gactor_server, "run", handle, "--", "dd", "if=/dev/zero", "of=/dev/shm/x", "bs=1M", "count=4"))
        found = json.loads(ok(gactor(gactor_server, "--json", "metrics", handle)))
        assert found["handle"] == handle
        assert found["memory_limit_in_bytes"] == 32 << 20
        assert found["memory_stat"]["total_usage_toward_limit"] >= 4 << 20
        assert found["cpu_stat"]["usage"] > 0
        assert found["pid_stat"]["current"] >= 1
        assert found["age"] > 0
        lines = ok(gactor(gactor_server, "metrics", handle)).splitlines()
        rows = {line[:22].strip(): line[22:].strip() for line in lines}
        assert set(rows) == {"memory", "rss / cache / swap", "cpu", "pids", "disk", "network", "age"}
        assert " MiB / 32 MiB (" in rows["memory"], rows["memory"]
        assert rows["cpu"].startswith(("0.", "1.", "2."))
        assert "(user " in rows["cpu"]
        assert "inodes" in rows["disk"]
        assert rows["network"].startswith("rx ")
    finally:
        ok(gactor(gactor_server, "destroy", handle))


def test_every_change_prints_json(gactor_server: ServerProcess, owner: str) -> None:
    assert json.loads(ok(gactor(gactor_server, "--json", "ping"))) == {"ok": True}
    assert json.loads(ok(gactor(gactor_server, "ping", "--json"))) == {"ok": True}  # either place
    created = json.loads(ok(gactor(gactor_server, "--json", "create", "--property", f"owner={owner}")))
    handle = created["handle"]
    try:
        assert json.loads(ok(gactor(gactor_server, "--json", "set-grace-time", handle, "120"))) == {
            "handle": handle, "grace_time": 120.0}
        forwarded = json.loads(ok(gactor(gactor_server, "--json", "net-in", handle, "--container-port", "8080")))
        assert forwarded["handle"] == handle
        assert forwarded["container_port"] == 8080
        assert forwarded["host_port"] > 0
        info = json.loads(ok(gactor(gactor_server, "info", handle, "--json")))
        assert info["mapped_ports"] == [{"host_port": forwarded["host_port"], "container_port": 8080}]
        assert f"{forwarded['host_port']}->8080" in ok(gactor(gactor_server, "info", handle))
        assert json.loads(ok(gactor(gactor_server, "--json", "stop", handle))) == {"handle": handle, "stopped": True}
        capacity_rows = ok(gactor(gactor_server, "capacity")).splitlines()
        assert [row.split("  ")[0] for row in capacity_rows] == [
            "memory", "disk", "schedulable disk", "max containers"]
    finally:
        assert json.loads(ok(gactor(gactor_server, "--json", "destroy", handle))) == {
            "handle": handle, "destroyed": True}
    assert gactor(gactor_server, "info", handle).returncode == 1


def test_attach_follows_a_running_process(gactor_server: ServerProcess, handle: str) -> None:
    """The process waits for a line that only the attached client sends, so the attach is
    live before there is anything to see; both clients then get its output and exit code."""
    runner = subprocess.Popen(
        gactor_command("--target", gactor_server.url, "run", "--id", "job", handle, "--",
                       "sh", "-c", 'read line; echo "got $line"; exit 5'),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while "job" not in json.loads(ok(gactor(gactor_server, "--json", "info", handle)))["process_ids"]:
            assert time.monotonic() < deadline, "the process never showed up"
            assert runner.poll() is None, runner.communicate()
        attached = gactor(gactor_server, "attach", handle, "job", stdin=b"from attach\n")
        assert (attached.returncode, attached.stdout, attached.stderr) == (5, b"got from attach\n", b"")
    finally:
        out, err = runner.communicate(timeout=TIMEOUT)
    assert (runner.returncode, out, err) == (5, b"got from attach\n", b"")
    result = gactor(gactor_server, "attach", handle, "no-such-process")
    assert result.returncode == 1
    assert result.stderr.startswith(b"error: ")


def test_stream_in_json_counts_the_bytes(gactor_server: ServerProcess, handle: str) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        payload = os.urandom(300_000)
        member = tarfile.TarInfo("blob")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    data = archive.getvalue()
    done = json.loads(ok(gactor(gactor_server, "--json", "stream-in", handle, "--to", "/tmp/blob", stdin=data)))
    assert done == {"handle": handle, "path": "/tmp/blob", "bytes": len(data)}
    result = gactor(gactor_server, "stream-out", handle, "--from", "/tmp/blob/blob")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # no progress bar without a terminal
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        extracted = tar.extractfile(tar.getmembers()[0])
        assert extracted is not None
        assert extracted.read() == payload


def test_stream_in_shows_progress_on_a_terminal(gactor_server: ServerProcess, handle: str,
                                                 tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, mode="w") as tar:
        member = tarfile.TarInfo("big")
        member.size = 4 << 20
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    with archive.open("rb") as stdin, Pty() as term:
        code = term.run(gactor_command("--target", gactor_server.url, "stream-in", handle, "--to", "/tmp/big"),
                        stdin=stdin)
    assert code == 0, term.output
    assert b"stream-in " + handle.encode() in term.output
    assert b"MiB" in term.output  # the bar's "done/total MiB"
    assert ok(gactor(gactor_server, "run", handle, "--", "stat", "-c", "%s", "/tmp/big/big")) == f"{4 << 20}\n"


def _next_event(follower: subprocess.Popen[bytes], handle: str) -> dict[str, Any]:
    """The next event of ``handle`` a ``--json events`` follower prints (other tests'
    containers have events of their own), parsed back."""
    assert follower.stdout is not None
    while True:
        line = follower.stdout.readline()
        assert line, "the follower ended"
        event = json.loads(line)
        assert event["time"].endswith("Z")
        assert isinstance(event["seq"], int)
        if event["handle"] == handle:
            return dict(event)


def _kinds_until(follower: subprocess.Popen[bytes], handle: str, last: str) -> list[str]:
    """The kinds of the events of ``handle``, up to the first ``last``."""
    seen = [_next_event(follower, handle)["kind"]]
    while seen[-1] != last:
        seen.append(_next_event(follower, handle)["kind"])
    return seen


VICTIM = "Out of memory: killed process "


def _oom_and_stop(follower: subprocess.Popen[bytes], handle: str) -> list[dict[str, Any]]:
    """The events of an OOM-killed ``dd`` run: it starts; Garden's "Out of memory" comes
    before the stop it causes and before the event naming the victim; dd exits 137."""
    seen: list[dict[str, Any]] = []
    while not {"oom", "stopped", "oom_victim", "process_exited"} <= {e["kind"] for e in seen}:
        seen.append(_next_event(follower, handle))
    kinds = [e["kind"] for e in seen]
    assert sorted(kinds) == ["oom", "oom_victim", "process_exited", "process_started", "stopped"], kinds
    assert kinds[0] == "process_started"
    assert kinds.index("oom") < kinds.index("stopped")
    assert kinds.index("oom") < kinds.index("oom_victim")
    by_kind = {e["kind"]: e for e in seen}
    assert by_kind["oom"]["event"] == "Out of memory"
    assert by_kind["stopped"]["reason"] == "oom"
    assert by_kind["oom_victim"]["event"].startswith(VICTIM)
    assert "(dd)" in by_kind["oom_victim"]["event"]
    assert by_kind["oom_victim"]["task"] == "dd"
    assert by_kind["process_exited"]["exit_status"] == 137
    assert by_kind["process_exited"]["process_id"] == by_kind["process_started"]["process_id"]
    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(seqs)
    return seen


def _follow(server: ServerProcess, *args: str) -> subprocess.Popen[bytes]:
    """``gactor --json events ARGS`` once its subscription is live (it says so on stderr)."""
    follower = subprocess.Popen(gactor_command("--target", server.url, "--json", "events", *args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follower.stderr is not None
    what = args[0] if args else "every container"
    assert follower.stderr.readline() == f"following events of {what}; ^C to stop\n".encode()
    return follower


def test_stream_out_shows_progress_on_a_terminal_stderr(gactor_server: ServerProcess, handle: str,
                                                        tmp_path: Path) -> None:
    ok(gactor(gactor_server, "run", handle, "--", "dd", "if=/dev/zero", "of=/tmp/big", "bs=1M", "count=4"))
    with (tmp_path / "out.tar").open("wb") as stdout, Pty() as term:
        code = term.run(gactor_command("--target", gactor_server.url, "stream-out", handle, "--from", "/tmp/big"),
                        stdin=subprocess.DEVNULL, stdout=stdout)
    assert code == 0, term.output
    assert b"stream-out " + handle.encode() in term.output
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert tar.getmember("big").size == 4 << 20


def test_events_follow_one_container_until_destroyed(gactor_server: ServerProcess, owner: str) -> None:
    handle = ok(gactor(gactor_server, "create", "--memory", "32M", "--property", f"owner={owner}")).strip()
    follower = _follow(gactor_server, handle)
    try:
        oom = gactor(gactor_server, "run", handle, "--", "dd", "if=/dev/zero", "of=/dev/shm/x", "bs=1M", "count=48")
        assert oom.returncode == 137
        _oom_and_stop(follower, handle)
        ok(gactor(gactor_server, "destroy", handle))
        destroyed = _next_event(follower, handle)
        assert (destroyed["kind"], destroyed["event"], destroyed["reason"]) == ("destroyed", "destroyed", "client")
        assert follower.wait(timeout=TIMEOUT) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()
        gactor(gactor_server, "destroy", handle)


def test_events_follow_every_container_until_interrupted(gactor_server: ServerProcess, owner: str) -> None:
    follower = _follow(gactor_server)
    handle = ""
    try:
        handle = ok(gactor(gactor_server, "create", "--memory", "32M", "--property", f"owner={owner}")).strip()
        assert _kinds_until(follower, handle, "created") == ["created"]
        gactor(gactor_server, "run", handle, "--", "dd", "if=/dev/zero", "of=/dev/shm/x", "bs=1M", "count=48")
        _oom_and_stop(follower, handle)
        ok(gactor(gactor_server, "destroy", handle))
        assert _kinds_until(follower, handle, "destroyed") == ["destroyed"]
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=TIMEOUT) == 130
        assert follower.stderr is not None
        assert b"Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()
        if handle:
            gactor(gactor_server, "destroy", handle)


def test_events_in_plain_text(gactor_server: ServerProcess, handle: str) -> None:
    follower = subprocess.Popen(gactor_command("--target", gactor_server.url, "events", handle),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stderr is not None
        assert follower.stdout is not None
        assert follower.stderr.readline().startswith(b"following events of ")
        assert gactor(gactor_server, "run", "--id", "plain-one", handle, "--", "sh", "-c", "exit 3").returncode == 3
        ok(gactor(gactor_server, "destroy", handle))
        lines = [line.decode().rstrip("\n").split("  ") for line in follower.stdout]
        assert follower.wait(timeout=TIMEOUT) == 0
        assert [source for _, source, _ in lines] == [handle] * 3
        started, exited, destroyed = (event for _, _, event in lines)
        assert re.fullmatch(r"process plain-one started \(pid \d+\)", started), started
        assert (exited, destroyed) == ("process plain-one exited with status 3", "destroyed")
        for when, _, _ in lines:
            assert when[:4].isdigit()
            assert when.endswith("Z")
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()


def test_events_of_an_unknown_container(gactor_server: ServerProcess) -> None:
    result = gactor(gactor_server, "events", "no-such-container")
    assert (result.returncode, result.stderr) == (1, b"error: unknown handle: no-such-container\n")


def test_shell_completion(gactor_server: ServerProcess, handle: str) -> None:
    script = subprocess.run(gactor_command(), env={**os.environ, "_GACTOR_COMPLETE": "bash_source"},
                            capture_output=True, timeout=TIMEOUT, check=True).stdout.decode()
    assert "complete -o nosort -F _gactor_completion gactor" in script
    words = f"gactor --target {gactor_server.url} info {handle[:-3]}"
    completed = subprocess.run(
        gactor_command(), capture_output=True, timeout=TIMEOUT, check=True,
        env={**os.environ, "_GACTOR_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "4"})
    assert completed.stdout.decode().splitlines() == [f"plain,{handle}"]
    runner = subprocess.Popen(gactor_command("--target", gactor_server.url, "run", "--id", "completed-proc",
                                             handle, "--", "sh", "-c", "read line"),
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while "completed-proc" not in json.loads(ok(gactor(gactor_server, "--json", "info", handle)))["process_ids"]:
            assert time.monotonic() < deadline, "the process never showed up"
        words = f"gactor --target {gactor_server.url} attach {handle} completed-"
        completed = subprocess.run(
            gactor_command(), capture_output=True, timeout=TIMEOUT, check=True,
            env={**os.environ, "_GACTOR_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "5"})
        assert completed.stdout.decode().splitlines() == ["plain,completed-proc"]
    finally:
        runner.communicate(b"done\n", timeout=TIMEOUT)
    commands = subprocess.run(
        gactor_command(), capture_output=True, timeout=TIMEOUT, check=True,
        env={**os.environ, "_GACTOR_COMPLETE": "bash_complete", "COMP_WORDS": "gactor stream-", "COMP_CWORD": "1"})
    assert commands.stdout.decode().splitlines() == ["plain,stream-in", "plain,stream-out"]


def test_images_say_what_is_missing(gactor_server: ServerProcess) -> None:
    """Until the image store API exists, the image commands fail with one clear line."""
    from gactor.client import Client

    if hasattr(Client, "images"):
        pytest.skip("this client has the image store API: see test_images_list_prune_and_pull")
    for args in (["images"], ["images", "prune"], ["pull", "docker://127.0.0.1:1/none"]):
        result = gactor(gactor_server, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(b"error: this gactor client has no image store API yet"), result.stderr


def test_images_list_prune_and_pull(gactor_server: ServerProcess, handle: str) -> None:
    """With the image store API: the container's image is listed with it as a user,
    ``images prune`` keeps an image in use, and pulling its source again works."""
    from gactor.client import Client

    if not hasattr(Client, "images"):
        pytest.skip("no image store API in this client yet (test_images_say_what_is_missing)")
    listed = json.loads(ok(gactor(gactor_server, "--json", "images")))
    assert isinstance(listed, list)
    [ours] = [image for image in listed if handle in image["users"]]
    lines = ok(gactor(gactor_server, "images")).splitlines()
    assert len(lines) == len(listed)  # one line per image
    [line] = [line for line in lines if handle in line]
    assert f"users: {','.join(ours['users'])}  {ours['source'] or ours['path']}" in line
    assert " layer" in line
    removed = json.loads(ok(gactor(gactor_server, "--json", "images", "prune")))
    assert isinstance(removed, list)
    after = json.loads(ok(gactor(gactor_server, "--json", "images")))
    assert any(handle in image["users"] for image in after), (ours, after)
    pulled = ok(gactor(gactor_server, "pull", ours["source"] or ours["path"]))
    assert pulled.startswith(f"{ours['source'] or ours['path']}: ")


# ---------------------------------------------------------------- --tty through a pty

class Pty:
    """A pseudo-terminal the test owns: the CLI runs with it as stdin, stdout and stderr.

    The test keeps the slave side open, so it can read the terminal's mode while the CLI
    runs and after it exits (``mode()``), and resize it. ``output`` gathers everything
    the master side read.
    """

    def __init__(self, rows: int = 24, columns: int = 80) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(rows, columns)
        self.output = b""
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Pty:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def mode(self) -> list[Any]:
        return termios.tcgetattr(self.slave)

    def start(self, command: list[str], stdin: Any = None, stdout: Any = None, stderr: Any = None,
              controlling: bool = False, **env: str) -> subprocess.Popen[bytes]:
        """Start ``command`` in a session of its own; ``controlling`` makes this pty its
        controlling terminal, so the kernel signals it (SIGWINCH, SIGHUP) as a shell's."""

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(command, stdin=stdin if stdin is not None else self.slave,
                                     stdout=stdout if stdout is not None else self.slave,
                                     stderr=stderr if stderr is not None else self.slave,
                                     start_new_session=True, env={**os.environ, **env},
                                     preexec_fn=take_terminal if controlling else None)
        return self.proc

    def hang_up(self) -> None:
        """Close the master side, as a terminal emulator does when its window closes."""
        os.close(self.master)
        self.master = os.open("/dev/null", os.O_RDONLY)  # so that __exit__ closes something

    def run(self, command: list[str], stdin: Any = None, stdout: Any = None, **env: str) -> int:
        proc = self.start(command, stdin, stdout, **env)
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        self._read(0)
        return proc.wait(timeout=1)

    def expect(self, text: bytes, within: float = TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while text not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} never appeared in {self.output!r}"
            assert self.proc is not None
            assert self.proc.poll() is None or self._read(0), f"exited before {text!r}: {self.output!r}"
            self._read(remaining)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=TIMEOUT)
        self._read(0)
        return code

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout`` for the first bytes)."""
        got = False
        while select.select([self.master], [], [], timeout)[0]:
            chunk = os.read(self.master, 65536)
            if not chunk:
                break
            self.output += chunk
            got = True
            timeout = 0
        return got


def raw(mode: list[Any]) -> bool:
    return not mode[3] & (termios.ICANON | termios.ECHO)


def tty_command(server: ServerProcess, handle: str, *command: str) -> list[str]:
    return gactor_command("--target", server.url, "run", "--tty", handle, "--", *command)


def test_run_tty_sends_term_and_window_size(gactor_server: ServerProcess, handle: str) -> None:
    with Pty(rows=33, columns=101) as term:
        before = term.mode()
        code = term.run(tty_command(gactor_server, handle, "sh", "-c", 'echo "term=$TERM"; stty size'),
                        TERM="xterm-256color")
        assert code == 0, term.output
        assert b"term=xterm-256color" in term.output
        assert b"33 101" in term.output
        assert term.mode() == before


def test_run_tty_without_term_gets_xterm(gactor_server: ServerProcess, handle: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TERM"}
    with Pty() as term:
        term.proc = subprocess.Popen(tty_command(gactor_server, handle, "sh", "-c", 'echo "term=$TERM"'),
                                     stdin=term.slave, stdout=term.slave, stderr=term.slave,
                                     start_new_session=True, env=env)
        assert term.wait() == 0
        assert b"term=xterm\r\n" in term.output
    with Pty() as term:  # --env TERM=... wins over ours
        code = term.run(gactor_command("--target", gactor_server.url, "run", "--tty", "--env", "TERM=vt100",
                                       handle, "--", "sh", "-c", 'echo "term=$TERM"'), TERM="xterm-256color")
        assert code == 0
        assert b"term=vt100\r\n" in term.output


def test_run_tty_is_raw_while_it_runs_and_restored_after(gactor_server: ServerProcess, handle: str) -> None:
    with Pty() as term:
        before = term.mode()
        assert not raw(before)
        term.start(tty_command(gactor_server, handle, "sh", "-c", 'echo ready; read line; echo "got:$line"; exit 4'))
        term.expect(b"ready")
        assert raw(term.mode())
        term.write(b"hello\r")
        term.expect(b"got:hello")
        assert term.wait() == 4
        assert term.mode() == before


def test_run_tty_sends_ctrl_c_to_the_process(gactor_server: ServerProcess, handle: str) -> None:
    """Raw mode: ^C is a byte for the container's terminal, whose line discipline turns
    it into SIGINT for the process; our CLI just reports the process's exit."""
    with Pty() as term:
        before = term.mode()
        term.start(tty_command(gactor_server, handle, "sh", "-c",
                               "trap 'echo caught; exit 42' INT; echo ready; while :; do sleep 0.1; done"))
        term.expect(b"ready")
        term.write(b"\x03")
        term.expect(b"caught")
        assert term.wait() == 42
        assert term.mode() == before


def test_run_tty_forwards_resizes(gactor_server: ServerProcess, handle: str) -> None:
    with Pty(rows=24, columns=80) as term:
        proc = term.start(tty_command(gactor_server, handle, "sh", "-c",
                                      "echo ready; while read line; do stty size; done"))
        term.expect(b"ready")
        term.resize(40, 132)
        proc.send_signal(signal.SIGWINCH)  # the kernel would, were this its controlling terminal
        deadline = time.monotonic() + TIMEOUT
        while b"40 132" not in term.output:  # the resize and the next line race; ask again
            assert time.monotonic() < deadline, term.output
            term.write(b"\r")
            term._read(0.1)
        term.write(b"\x04")  # ^D: read fails, the loop and the shell end
        assert term.wait() == 0


def test_attach_tty_takes_our_window_size(gactor_server: ServerProcess, handle: str) -> None:
    with Pty(rows=20, columns=70) as first:
        first.start(gactor_command("--target", gactor_server.url, "run", "--tty", "--id", "shell", handle, "--",
                                   "sh", "-c", "echo ready; while read line; do stty size; done"))
        first.expect(b"ready")
        with Pty(rows=50, columns=160) as second:
            before = second.mode()
            second.start(gactor_command("--target", gactor_server.url, "attach", "--tty", handle, "shell"))
            deadline = time.monotonic() + TIMEOUT
            while b"50 160" not in second.output:  # the attach and the line race; ask again
                assert time.monotonic() < deadline, second.output
                first.write(b"\r")
                second._read(0.1)
            first.write(b"\x04")
            assert second.wait() == 0
            assert second.mode() == before
        assert first.wait() == 0


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_run_tty_restores_the_terminal_when_signalled(gactor_server: ServerProcess, handle: str,
                                                     signum: int, code: int) -> None:
    with Pty() as term:
        before = term.mode()
        proc = term.start(tty_command(gactor_server, handle, "sh", "-c", "echo ready; exec sleep 60"))
        term.expect(b"ready")
        assert raw(term.mode())
        proc.send_signal(signum)
        assert term.wait() == code
        assert term.mode() == before
        assert b"Traceback" not in term.output


def test_run_tty_resizes_and_hangs_up_as_under_a_shell(gactor_server: ServerProcess, handle: str) -> None:
    """With the pty as its controlling terminal the kernel sends the CLI SIGWINCH on a
    resize and SIGHUP when the terminal goes away: the session ends with 129, quietly."""
    with Pty(rows=24, columns=80) as term:
        proc = term.start(tty_command(gactor_server, handle, "sh", "-c",
                                      "echo ready; while read line; do stty size; done"),
                          stderr=subprocess.PIPE, controlling=True)
        term.expect(b"ready")
        term.resize(41, 133)  # no signal sent by the test: the kernel does it
        deadline = time.monotonic() + TIMEOUT
        while b"41 133" not in term.output:
            assert time.monotonic() < deadline, term.output
            term.write(b"\r")
            term._read(0.1)
        term.hang_up()
        _, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 129, stderr
        assert b"Traceback" not in stderr


def test_run_tty_restores_the_terminal_on_an_error(gactor_server: ServerProcess) -> None:
    with Pty() as term:
        before = term.mode()
        code = term.run(tty_command(gactor_server, "no-such-container", "sh"))
        assert code == 1
        assert b"error: unknown handle: no-such-container" in term.output
        assert term.mode() == before


async def test_run_tty_restores_the_terminal_when_the_server_goes(
    own_servers: Callable[..., ServerProcess],
) -> None:
    server = own_servers("cli-gone", "10.245.60.0/24")
    await server.start()
    async with server.connect() as client:
        container = await client.create()
    with Pty() as term:
        before = term.mode()
        term.start(tty_command(server, container.handle, "sh", "-c", "echo ready; exec sleep 60"))
        await trio.to_thread.run_sync(term.expect, b"ready")
        assert raw(term.mode())
        await server.kill()
        assert await trio.to_thread.run_sync(term.wait) == 1
        assert b"error: connection to gactor server lost" in term.output, term.output
        assert term.mode() == before
    await server.start()  # a fresh server on the depot cleans up after the killed one


# ---------------------------------------------------------------- pull's progress

@pytest.fixture
def pull_registry(tmp_path: Path) -> Iterator[tuple[str, LocalRegistry, list[bytes]]]:
    """A loopback registry with an image of its own (layers no other test has): its URI,
    the registry, its layers' blobs."""
    blobs = [busybox_layer([Entry("which", data=uuid.uuid4().bytes)]),
             tar_bytes([Entry("big", data=os.urandom(3 << 20))])]
    root = str(tmp_path / "layout")
    write_layout(root, {"latest": (blobs, None)})
    registry = LocalRegistry({"cli-pull": root}).start()
    try:
        yield f"docker://{registry.host}/cli-pull#latest", registry, blobs
    finally:
        registry.stop()


def _short(digest: str) -> str:
    return digest[:len("sha256:") + 12]


def test_pull_shows_a_bar_per_layer_on_a_terminal(gactor_server: ServerProcess,
                                                  pull_registry: tuple[str, LocalRegistry, list[bytes]]) -> None:
    uri, registry, blobs = pull_registry
    digests = [sha256(b) for b in blobs]
    steps = registry.step_blobs[digests[1]] = threading.Semaphore(0)  # the big layer waits
    try:
        with Pty(columns=120) as term:
            term.start(gactor_command("--target", gactor_server.url, "pull", uri))
            for digest in digests:
                term.expect(_short(digest).encode())  # a bar for each layer
            term.expect(b"0.0/3.0 MiB")  # the big layer's: nothing of it yet
            steps.release(len(blobs[1]) // STEP + 1)
            assert term.wait() == 0, term.output
    finally:
        steps.release(len(blobs[1]) // STEP + 1)
    assert f"pull {uri}".encode() in term.output
    assert term.output.rstrip().endswith(b", 2 layers"), term.output[-300:]


def test_pull_prints_a_line_per_layer_without_a_terminal(
        gactor_server: ServerProcess, pull_registry: tuple[str, LocalRegistry, list[bytes]]) -> None:
    from gactor.cli import render

    uri, _, blobs = pull_registry
    digests = [sha256(b) for b in blobs]
    first = gactor(gactor_server, "pull", uri)
    assert first.returncode == 0, first.stderr
    assert first.stdout.decode().startswith(f"{uri}: ")
    lines = [line.split("  ") for line in first.stderr.decode().splitlines()]
    assert [(name, how) for name, _, how in lines] == [(_short(d), "pulled") for d in digests]
    assert [size for _, size, _ in lines] == [render.size(len(b)) for b in blobs]
    again = gactor(gactor_server, "--json", "pull", uri)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["layers"] == 2
    assert [line.split("  ")[2] for line in again.stderr.decode().splitlines()] == ["in the store"] * 2


def test_create_from_a_registry_shows_the_pull_on_a_terminal(
        gactor_server: ServerProcess, pull_registry: tuple[str, LocalRegistry, list[bytes]]) -> None:
    uri, registry, blobs = pull_registry
    digests = [sha256(b) for b in blobs]
    steps = registry.step_blobs[digests[1]] = threading.Semaphore(0)
    handle = f"cli-pull-{uuid.uuid4().hex[:8]}"
    try:
        with Pty(columns=120) as term:
            term.start(gactor_command("--target", gactor_server.url, "create", "--handle", handle, "--image", uri))
            for digest in digests:
                term.expect(_short(digest).encode())
            steps.release(len(blobs[1]) // STEP + 1)
            assert term.wait() == 0, term.output
        assert term.output.rstrip().endswith(handle.encode()), term.output[-300:]
        assert ok(gactor(gactor_server, "run", handle, "--", "stat", "-c", "%s", "/big")) == f"{3 << 20}\n"
    finally:
        steps.release(len(blobs[1]) // STEP + 1)
        gactor(gactor_server, "destroy", handle)
