"""Running processes against a real server (GARDEN_REFERENCE §4.6 "Running processes",
§4.7, §4.14 rlimits and capabilities, §5.4): streaming, exit codes, attach, signals,
TTYs, stdin, working directory, environment, users, ids, rlimits, capabilities and
flow control with a slow reader.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest
import trio

import gactor
from gactor import (
    ExecutableNotFoundError,
    GardenError,
    ProcessIO,
    ProcessNotFoundError,
    ProcessSpec,
    ResourceLimits,
    Signal,
    TTYSpec,
    WindowSize,
)

from .helpers import (
    E2E_MARKS,
    ROOT_PATH,
    ROOTFS,
    USER_PATH,
    CountingSink,
    Sink,
    SlowSink,
    StdinGate,
    container_pids,
    ensure_user,
    proc_name,
    rss_bytes,
    run,
    server_shims,
    sh,
    sh_ok,
    wait_for,
)

pytestmark = E2E_MARKS

MiB = 1 << 20
UNPRIVILEGED_CAPS = "00000000a80425fb"
NO_CAPS = "0000000000000000"


async def _start_until_ready(container, script, **spec_kwargs):
    """Start ``sh -c script``; returns (process, stdout sink) once it printed ``ready``."""
    out = Sink()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", script], **spec_kwargs),
        ProcessIO(stdout=out, stderr=Sink()),
    )
    await wait_for(lambda: b"ready" in out.data, 10, what="the process to print ready")
    return process, out


# ---- output, exit status, stdin ---------------------------------------------------------


async def test_whoami_root(container):
    assert await run(container, "whoami") == (0, b"root\n", b"")
    assert await run(container, "whoami", user="root") == (0, b"root\n", b"")


async def test_whoami_alice(container):
    await ensure_user(container)
    assert await run(container, "whoami", user="alice") == (0, b"alice\n", b"")


async def test_streams_output_and_exit_status(container):
    script = "sleep 0.1; echo $FIRST; sleep 0.1; echo $SECOND >&2; sleep 0.1; exit 42"
    code, out, err = await sh(container, script, env=["FIRST=hello", "SECOND=goodbye"])
    assert (code, out, err) == (42, b"hello\n", b"goodbye\n")


async def test_cat_dev_stdin_echoes(container):
    assert await run(container, "cat", ["/dev/stdin"], stdin=b"potato") == (0, b"potato", b"")


async def test_dev_stdout_and_dev_stderr(container):
    code, out, err = await sh(container, "echo potato > /dev/stdout; echo cake > /dev/stderr")
    assert (code, out, err) == (0, b"potato\n", b"cake\n")


async def test_stdin_is_streamed(container):
    code, out, _ = await sh(container, "cat <&0", stdin=b"hello\nworld")
    assert (code, out) == (0, b"hello\nworld")


async def test_stdin_from_async_iterable_with_large_chunks(container):
    payload = [os.urandom(MiB), os.urandom(MiB + 1), os.urandom(100)]

    async def chunks():
        for chunk in payload:
            yield chunk

    code, out, _ = await run(container, "cat", stdin=chunks())
    assert code == 0
    assert len(out) == sum(map(len, payload))
    assert out == b"".join(payload)


async def test_large_stdin_round_trip(container):
    data = os.urandom(3 * MiB)
    code, out, _ = await run(container, "cat", stdin=data)
    assert code == 0
    assert out == data


async def test_full_output_when_process_exits_at_once(container):
    for _ in range(20):
        assert await run(container, "echo", ["hi", "stdout"]) == (0, b"hi stdout\n", b"")


async def test_exit_status_forwarded_while_stdin_is_written(container):
    for _ in range(5):
        code, _, _ = await run(container, "ls", stdin=b"x" * 1024)
        assert code == 0


async def test_exit_status_forwarded_while_stdin_stays_open(container):
    gate = StdinGate(first=b"x" * 1024)
    try:
        with trio.fail_after(10):
            process = await container.run(ProcessSpec(path="ls"), ProcessIO(stdin=gate))
            assert await process.wait() == 0
    finally:
        gate.release()


async def test_large_output_counted_exactly(container):
    out = CountingSink(check=lambda chunk: not chunk.strip(b"\0"))
    process = await container.run(
        ProcessSpec(path="dd", args=["if=/dev/zero", "bs=1M", "count=20"]),
        ProcessIO(stdout=out, stderr=Sink()),
    )
    with trio.fail_after(30):
        assert await process.wait() == 0
    assert out.count == 20 * MiB
    assert out.bad_chunks == 0


async def test_slow_reader_gets_everything_with_bounded_server_memory(gactor_server, container):
    """A reader stalling for 2 s while dd produces 128 MiB: nothing is lost, and neither
    the server nor the container's shim buffers the backlog (the process is paused)."""
    total = 128 * MiB
    depot = gactor_server.depot
    server_pid = gactor_server.proc.pid
    shims = server_shims(depot)
    base_server = rss_bytes(server_pid)
    base_shims = {pid: rss_bytes(pid) for pid in shims}
    peak = {"server": 0, "shim": 0}

    async def sample():
        while True:
            peak["server"] = max(peak["server"], rss_bytes(server_pid) - base_server)
            for pid in server_shims(depot):
                growth = rss_bytes(pid) - base_shims.get(pid, rss_bytes(pid))
                peak["shim"] = max(peak["shim"], growth)
            await trio.sleep(0.05)

    out = SlowSink(delay=0.05, slow_for=2.0)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            process = await container.run(
                ProcessSpec(path="dd", args=["if=/dev/zero", "bs=1M", f"count={total // MiB}"]),
                ProcessIO(stdout=out, stderr=Sink()),
            )
            assert await process.wait() == 0
            nursery.cancel_scope.cancel()
    assert out.count == total
    assert out.bad_chunks == 0
    assert peak["server"] < 64 * MiB, f"server RSS grew by {peak['server'] / MiB:.0f} MiB"
    assert peak["shim"] < 64 * MiB, f"shim RSS grew by {peak['shim'] / MiB:.0f} MiB"


# ---- attach and wait ----------------------------------------------------------------


async def test_six_concurrent_attaches_get_the_exit_code(container):
    gate = StdinGate()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", "read x; exit 12"]), ProcessIO(stdin=gate)
    )
    codes = []
    attached = []

    async def attach_and_wait():
        other = await container.attach(process.id, ProcessIO())
        attached.append(other.id)
        codes.append(await other.wait())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(attach_and_wait)
            await wait_for(lambda: len(attached) == 6, 10, what="six attaches")
            gate.release(b"go\n")
    assert attached == [process.id] * 6
    assert codes == [12] * 6
    assert await process.wait() == 12


async def test_wait_many_times_and_concurrently(container):
    process = await container.run(ProcessSpec(path="sh", args=["-c", "exit 12"]), ProcessIO())
    with trio.fail_after(10):
        assert [await process.wait() for _ in range(3)] == [12, 12, 12]

    gate = StdinGate()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", "read x; exit 12"]), ProcessIO(stdin=gate)
    )
    codes = []

    async def waiter():
        codes.append(await process.wait())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(waiter)
            gate.release(b"go\n")
    assert codes == [12, 12, 12]
    with trio.fail_after(10):
        # A later attach still reads the kept exit status.
        assert await (await container.attach(process.id, ProcessIO())).wait() == 12


async def test_run_and_attach_clients_both_get_all_output(gactor_server, container):
    gate = StdinGate()
    script = "read x; for i in $(seq 1 10); do echo $i; echo $i >&2; done"
    run_out, run_err, att_out, att_err = Sink(), Sink(), Sink(), Sink()
    process = await container.run(
        ProcessSpec(path="sh", args=["-c", script]),
        ProcessIO(stdin=gate, stdout=run_out, stderr=run_err),
    )
    with trio.fail_after(20):
        async with gactor.connect(gactor_server.url) as other:
            theirs = await other.lookup(container.handle)
            attached = await theirs.attach(process.id, ProcessIO(stdout=att_out, stderr=att_err))
            gate.release(b"go\n")
            assert await process.wait() == 0
            assert await attached.wait() == 0
    expected = "".join(f"{i}\n" for i in range(1, 11)).encode()
    assert bytes(run_out.data) == expected
    assert bytes(run_err.data) == expected
    assert bytes(att_out.data) == expected
    assert bytes(att_err.data) == expected


async def test_attach_unknown_process(container):
    with pytest.raises(ProcessNotFoundError) as raised:
        await container.attach("idontexist", ProcessIO())
    assert raised.value.process_id == "idontexist"
    assert raised.value.message == "unknown process: idontexist"


async def test_explicit_process_id_and_duplicate(container):
    pid = f"some-id-{uuid.uuid4().hex[:8]}"
    gate = StdinGate()
    process = await container.run(
        ProcessSpec(id=pid, path="sh", args=["-c", "read x"]), ProcessIO(stdin=gate)
    )
    assert process.id == pid
    with pytest.raises(GardenError) as raised:
        await container.run(ProcessSpec(id=pid, path="true"), ProcessIO())
    assert "already in use" in raised.value.message
    gate.release(b"go\n")
    with trio.fail_after(10):
        assert await process.wait() == 0


async def test_generated_process_ids_are_unique(container):
    ids = set()
    for _ in range(5):
        process = await container.run(ProcessSpec(path="true"), ProcessIO())
        assert process.id
        ids.add(process.id)
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert len(ids) == 5


# ---- signals ------------------------------------------------------------------------

TRAP_TERM = "trap 'echo termed; exit 42' TERM; echo ready; while :; do sleep 0.05; done"


@pytest.mark.parametrize("user", ["root", "alice"])
async def test_signal_terminate_triggers_trap(container, user):
    await ensure_user(container)
    process, out = await _start_until_ready(container, TRAP_TERM, user=user)
    await process.signal(Signal.TERMINATE)
    with trio.fail_after(10):
        assert await process.wait() == 42
    assert b"termed" in out.data


async def test_signals_do_not_need_the_containers_kill_binary(container):
    await sh_ok(container, "rm /bin/kill")
    # The container's rootfs is its own: the shared image still has its kill.
    assert (
        await trio.Path(ROOTFS, "bin", "kill").is_symlink()
        or await trio.Path(ROOTFS, "bin", "kill").exists()
    )
    with pytest.raises(ExecutableNotFoundError):
        await container.run(ProcessSpec(path="kill", args=["-0", "1"]), ProcessIO())

    tag = uuid.uuid4().hex
    process, _ = await _start_until_ready(
        container, f": {tag}; echo ready; while :; do sleep 0.05; done"
    )
    await process.signal(Signal.KILL)
    with trio.fail_after(10):
        assert await process.wait() == 137
    code, out, _ = await run(container, "ps", ["-o", "args"])
    assert code == 0
    assert tag.encode() not in out

    tag = uuid.uuid4().hex
    process, _ = await _start_until_ready(
        container, f": {tag}; echo ready; while :; do sleep 0.05; done"
    )
    await process.signal(Signal.TERMINATE)
    with trio.fail_after(10):
        assert await process.wait() != 0
    code, out, _ = await run(container, "ps", ["-o", "args"])
    assert tag.encode() not in out


async def test_kill_immediately_after_run(container):
    # `sleep` itself, not a shell: no orphan keeps the output pipe open after the kill.
    for _ in range(20):
        process = await container.run(ProcessSpec(path="sleep", args=["2"]), ProcessIO())
        await process.signal(Signal.KILL)
        with trio.fail_after(10):
            assert await process.wait() != 0


async def test_term_immediately_after_run(container):
    for _ in range(3):
        process = await container.run(
            ProcessSpec(path="sh", args=["-c", "sleep 2; exit 12"]), ProcessIO()
        )
        await process.signal(Signal.TERMINATE)
        with trio.fail_after(10):
            assert await process.wait() not in (0, 12)


async def test_signal_to_exited_process_is_harmless(container):
    process = await container.run(ProcessSpec(path="true"), ProcessIO())
    with trio.fail_after(10):
        assert await process.wait() == 0
    try:
        await process.signal(Signal.KILL)
    except GardenError:
        pass  # a clean error is acceptable; a crash or a hang is not
    assert await process.wait() == 0
    assert await run(container, "echo", ["still", "fine"]) == (0, b"still fine\n", b"")


# ---- tty --------------------------------------------------------------------------------


async def test_tty_collects_all_output(container):
    for _ in range(10):
        code, out, _ = await run(container, "seq", ["-s", " ", "10000"], tty=TTYSpec())
        assert code == 0
        assert b"9999 10000" in out


async def test_tty_default_window_size(container):
    code, out, _ = await run(container, "stty", ["-a"], tty=TTYSpec())
    assert code == 0
    assert b"rows 24; columns 80;" in out


async def test_tty_explicit_window_size(container):
    tty = TTYSpec(window_size=WindowSize(columns=123, rows=456))
    code, out, _ = await run(container, "stty", ["-a"], tty=tty)
    assert code == 0
    assert b"rows 456; columns 123;" in out


async def test_tty_applies_onlcr_and_merges_stderr(container):
    code, out, err = await sh(container, 'echo -e "new\\nline"; echo oops >&2', tty=TTYSpec())
    assert code == 0
    assert b"new\r\nline\r\n" in out
    assert b"oops\r\n" in out
    assert err == b""


async def test_set_tty_resizes_and_sends_sigwinch(container):
    process, out = await _start_until_ready(
        container,
        "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done",
        tty=TTYSpec(),
    )
    await process.set_tty(TTYSpec(window_size=WindowSize(columns=123, rows=456)))
    with trio.fail_after(10):
        assert await process.wait() == 0
    assert b"456 123" in out.data


async def test_tty_stdin(container):
    code, out, _ = await sh(container, "read x; echo got $x", stdin=b"potato\n", tty=TTYSpec())
    assert code == 0
    assert b"got potato" in out


# ---- working directory, environment, users ------------------------------------------


async def test_dir(container):
    assert await run(container, "pwd", dir="/usr") == (0, b"/usr\n", b"")


async def test_missing_dir_is_created(container):
    path = f"/root/nonexistent-{uuid.uuid4().hex[:6]}/deeper"
    out = await sh_ok(container, "pwd; stat -c %u:%g .", dir=path)
    assert out.split() == [path, "0:0"]


async def test_missing_dir_is_created_for_the_user(container):
    await ensure_user(container)
    out = await sh_ok(
        container, "pwd; stat -c %U .; touch f", dir="/home/alice/new/dir", user="alice"
    )
    assert out.split() == ["/home/alice/new/dir", "alice"]


async def test_default_dir_is_the_users_home(container):
    await ensure_user(container)
    assert await run(container, "pwd") == (0, b"/root\n", b"")
    assert await run(container, "pwd", user="alice") == (0, b"/home/alice\n", b"")
    assert await run(container, "pwd", user="1002:1002") == (0, b"/\n", b"")


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def test_default_environment_for_root(container):
    env = _env(await sh_ok(container, "env"))
    assert env["PATH"] == ROOT_PATH
    assert env["USER"] == "root"
    assert env["HOME"] == "/root"


async def test_default_environment_for_alice(container):
    await ensure_user(container)
    env = _env(await sh_ok(container, "env", user="alice"))
    assert env["PATH"] == USER_PATH
    assert env["USER"] == "alice"
    assert env["HOME"] == "/home/alice"


async def test_environment_overrides(container):
    await ensure_user(container)
    env = _env(await sh_ok(container, "env", user="alice", env=["HOME=/tmp", "PATH=/bin"]))
    assert (env["HOME"], env["PATH"], env["USER"]) == ("/tmp", "/bin", "alice")
    env = _env(await sh_ok(container, "env", user="alice", env=["USER=nobody"]))
    assert (env["USER"], env["HOME"]) == ("nobody", "/home/alice")


async def test_process_env_wins_over_container_env(create_container):
    container = await create_container(env=["CONTAINER_ENV=1", "TEST=hi"])
    code, out, _ = await run(container, "env", env=["TEST=hello", "FRUIT=banana"])
    assert code == 0
    text = out.decode()
    assert "CONTAINER_ENV=1\nTEST=hello\nFRUIT=banana" in text, text
    assert len(re.findall(r"^TEST=", text, re.M)) == 1, text


async def test_numeric_user_and_group(container):
    out = await sh_ok(container, "echo $(id -u):$(id -g)", user="1001:1002")
    assert out == "1001:1002\n"
    code, out, _ = await run(container, "id", user="1000:1000")
    assert code == 0
    assert re.match(rb"uid=1000\b.* gid=1000\b", out), out


async def test_a_user_without_a_passwd_entry_has_no_supplementary_groups(container):
    """As runc does (GATS: "users has a sufficiently large UID/GID range")."""
    out = await sh_ok(container, "grep -E '^(Uid|Gid|Groups):' /proc/self/status", user="1000000000:1000000000")
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in out.splitlines()}
    assert fields == {"Uid": ["1000000000"] * 4, "Gid": ["1000000000"] * 4, "Groups": []}


async def test_unknown_user(container):
    with pytest.raises(GardenError) as raised:
        await container.run(ProcessSpec(path="whoami", user="bob-nope"), ProcessIO())
    assert (
        "unable to find user bob-nope: no matching entries in passwd file" in raised.value.message
    )


async def test_missing_executable_fails_run(container):
    with pytest.raises(ExecutableNotFoundError) as raised:
        await container.run(ProcessSpec(path="potato-nope"), ProcessIO())
    assert "executable file not found in $PATH" in raised.value.message
    # The container still works afterwards.
    assert await run(container, "true") == (0, b"", b"")


async def test_path_lookup_uses_the_process_path(container):
    await ensure_user(container)
    # A program only in /sbin: on root's PATH, not on alice's.
    await sh_ok(container, "printf '#!/bin/sh\\necho found\\n' >/sbin/only-in-sbin; chmod 755 /sbin/only-in-sbin")
    assert await run(container, "only-in-sbin") == (0, b"found\n", b"")
    with pytest.raises(GardenError):
        await container.run(ProcessSpec(path="only-in-sbin", user="alice"), ProcessIO())
    assert await run(container, "only-in-sbin", user="alice", env=["PATH=/sbin"]) == (0, b"found\n", b"")


# ---- rlimits and capabilities -------------------------------------------------------


async def test_rlimit_nofile(container):
    out = await sh_ok(container, "ulimit -n; ulimit -Hn", limits=ResourceLimits(nofile=100))
    assert out.split() == ["100", "100"]


async def test_rlimit_nproc(container):
    out = await sh_ok(container, "ulimit -a", limits=ResourceLimits(nproc=4567))
    assert re.search(r"processes\s+\(-u\)\s+4567\b", out), out


def _caps(text: str) -> dict[str, str]:
    return {k: v for k, v in _env(text.replace(":\t", "=")).items() if k.startswith("Cap")}


async def test_capabilities_of_root_and_init(container):
    root = _caps(await sh_ok(container, "grep Cap /proc/self/status"))
    assert root == {
        "CapInh": UNPRIVILEGED_CAPS,
        "CapPrm": UNPRIVILEGED_CAPS,
        "CapEff": UNPRIVILEGED_CAPS,
        "CapBnd": UNPRIVILEGED_CAPS,
        "CapAmb": NO_CAPS,
    }
    init = _caps(await sh_ok(container, "grep Cap /proc/1/status"))
    assert init == root


async def test_capabilities_of_non_root(container):
    await ensure_user(container)
    alice = _caps(await sh_ok(container, "grep Cap /proc/self/status", user="alice"))
    assert alice == {
        "CapInh": UNPRIVILEGED_CAPS,
        "CapPrm": NO_CAPS,
        "CapEff": NO_CAPS,
        "CapBnd": UNPRIVILEGED_CAPS,
        "CapAmb": NO_CAPS,
    }


async def test_processes_run_in_the_containers_cgroup(container):
    process, _ = await _start_until_ready(container, "echo ready; exec sleep 1000")
    names = await wait_for(
        lambda: "sleep" in (n := {proc_name(p) for p in container_pids(container.handle)}) and n,
        10,
        what="sleep in the container's cgroups",
    )
    assert "garden-init" in names
    await process.signal(Signal.KILL)
    with trio.fail_after(10):
        assert await process.wait() == 137
