"""Restart survival: ``kill -9`` of the server at any moment, then a new server on the same
depot re-adopts what is consistent and removes what is not (GARDEN_REFERENCE.md §3.8 for
the grace timers; issue "Registry and reliability").

Every test runs its OWN servers (never the shared session server) with its own depot
under /tmp and its own /24 in 10.248.0.0/16, and ends by destroying every container
through the API, stopping the server by pid and checking from outside that nothing is
left: no cgroup under the server's parent, no mount under the depot, no container
directory, no shim or garden-init of that depot.

The servers are ``servers.ServerProcess`` objects from the ``own_servers`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Any

import pytest
import trio

import gactor
from gactor import ContainerSpec, GardenError, ProcessIO, ProcessSpec
from gactor.errors import ConnectionLostError

from .helpers import (
    E2E_MARKS,
    Sink,
    container_pids,
    proc_cmdline,
    proc_name,
    server_inits,
    server_shims,
    sh_ok,
    wait_for,
    wait_until_equal,
)
from .servers import ServerProcess

pytestmark = E2E_MARKS


def pids_running(handle: str, marker: str) -> list[int]:
    """Host pids of processes started by Run (their parent, the shim, is outside the
    container) whose command line contains ``marker``. A shell's short-lived forks carry
    its command line until they exec, so they are left out by their parent."""
    pids = container_pids(handle)
    return sorted(p for p in pids if marker in proc_cmdline(p) and _ppid(p) not in pids)


def _ppid(pid: int) -> int:
    for line in _status_text(pid).splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return 0


def alive(pid: int) -> bool:
    return proc_name(pid) not in ("", None) and "State:\tZ" not in _status_text(pid)


def _status_text(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()
    except OSError:
        return ""


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# ---- kill -9 while idle --------------------------------------------------------------------


async def test_sigkill_while_idle_readopts_everything(own_servers):
    server = own_servers("idle", "10.248.1.0/24")
    await server.start()
    props = {"owner": "restart-test", "a": "b"}
    async with server.connect() as client:
        keep = await client.create(ContainerSpec(handle="keep", properties=props, grace_time=3600))
        out = Sink()
        waiter = await keep.run(
            ProcessSpec(id="waiter", path="sh", args=["-c",
                "echo started; while [ ! -e /tmp/go-waiter ]; do sleep 0.02; done; echo after; exit 7"]),
            ProcessIO(stdout=out),
        )  # fmt: skip
        await wait_for(lambda: out.data == b"started\n", what="the waiter to start")
        await keep.run(
            ProcessSpec(id="quitter", path="sh", args=["-c",
                "while [ ! -e /tmp/go-quitter ]; do sleep 0.02; done; exit 5"]),
            ProcessIO(),
        )  # fmt: skip
        assert waiter.id == "waiter"
        waiter_pid = await wait_for(lambda: pids_running("keep", "go-waiter"), what="waiter pid")
        quitter_pid = await wait_for(lambda: pids_running("keep", "go-quitter"), what="quitter pid")
        # Grace timers survive too: this one is re-armed in full at the restart.
        await client.create(ContainerSpec(handle="short", grace_time=3.0))

    shims_before = server_shims(server.depot)
    inits_before = server_inits(server.depot)
    await server.kill(signal.SIGKILL)

    # While the server is down: the shim keeps everything running and records exits.
    assert server_shims(server.depot) == shims_before
    assert server_inits(server.depot) == inits_before
    assert all(map(alive, waiter_pid + quitter_pid))
    rootfs_tmp = os.path.join(server.container_root("keep"), "tmp")
    with open(os.path.join(rootfs_tmp, "go-quitter"), "w"):
        pass  # through the overlay, from the host
    exit_file = os.path.join(server.container_dir("keep"), "processes", "quitter")
    await wait_for(lambda: read_int(exit_file) == 5, what="the shim to record the quitter's exit")

    restarted_at = trio.current_time()
    await server.start()
    async with server.connect() as client:
        listed = {c.handle for c in await client.containers()}
        assert listed == {"keep", "short"}
        keep = await client.lookup("keep")
        info = await keep.info()
        assert {k: info.properties.get(k) for k in props} == props
        assert await keep.property("a") == "b"

        # The process started before the kill still runs, under the same host pid ...
        assert pids_running("keep", "go-waiter") == waiter_pid
        ps = await sh_ok(keep, "ps")
        assert "go-waiter" in ps
        # ... and can be re-attached: output from then on, and its exit code.
        again = Sink()
        waiter = await keep.attach("waiter", ProcessIO(stdout=again))
        await sh_ok(keep, "touch /tmp/go-waiter")
        with trio.fail_after(15):
            assert await waiter.wait() == 7
        assert again.data == b"after\n"

        # The process that exited while the server was down reports its real code.
        quitter = await keep.attach("quitter", ProcessIO(stdout=Sink()))
        with trio.fail_after(15):
            assert await quitter.wait() == 5
            assert await quitter.wait() == 5

        # New processes run.
        assert await sh_ok(keep, "echo new; hostname") == "new\nkeep\n"

        # The 3 s timer was re-armed at the restart: "short" is reaped, "keep" is not.
        async def short_gone() -> bool:
            return "short" not in {c.handle for c in await client.containers()}

        await wait_for(short_gone, within=15, interval=0.1, what="'short' to be reaped")
        assert trio.current_time() - restarted_at >= 2.5
        assert {c.handle for c in await client.containers()} == {"keep"}
        # Unlisted as soon as its destroy starts; its directory goes when the destroy ends.
        await wait_for(lambda: not os.path.exists(server.container_dir("short")),
                       within=15, what="the reaped container's directory to go")
    await server.finish()


async def test_acknowledged_changes_survive_sigkill(own_servers):
    """Every state change is persisted before it is acknowledged."""
    server = own_servers("persist", "10.248.14.0/24")
    await server.start()
    async with server.connect() as client:
        c = await client.create(
            ContainerSpec(
                handle="changed",
                properties={"gone": "1", "kept": "1"},
                limits=gactor.Limits(memory=gactor.MemoryLimits(64 << 20)),
            )
        )
        await c.set_property("added", "yes")
        await c.remove_property("gone")
        await c.limit_memory(gactor.MemoryLimits(limit_in_bytes=96 << 20))
        await c.stop(kill=True)
        await c.set_grace_time(2.0)  # the last call: acknowledged, then the kill
        await server.kill(signal.SIGKILL)
    restarted_at = trio.current_time()
    await server.start()
    async with server.connect() as client:
        c = await client.lookup("changed")
        info = await c.info()
        assert info.state == "stopped"
        assert {k: info.properties.get(k) for k in ("added", "gone", "kept")} == {
            "added": "yes",
            "gone": None,
            "kept": "1",
        }
        assert (await c.current_memory_limits()).limit_in_bytes == 96 << 20

        async def reaped() -> bool:
            return "changed" not in {x.handle for x in await client.containers()}

        await wait_for(reaped, within=15, interval=0.1, what="the 2 s grace time to reap it")
        assert trio.current_time() - restarted_at >= 1.5
    await server.finish()


# ---- kill -9 while a process streams output -------------------------------------------------

COUNT_TO_400 = "i=0; while [ $i -lt 400 ]; do echo $i; i=$((i+1)); sleep 0.01; done; exit 9"


def _numbers(data: bytes) -> list[int]:
    return [int(line) for line in data.decode().split()]


async def test_sigkill_while_streaming_then_reattach(own_servers):
    server = own_servers("stream", "10.248.2.0/24")
    await server.start()
    before = Sink()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="streamer"))
        proc = await c.run(
            ProcessSpec(id="counter", path="sh", args=["-c", COUNT_TO_400]),
            ProcessIO(stdout=before),
        )
        await wait_for(lambda: before.data.count(b"\n") >= 20, what="20 lines of output")
        await server.kill(signal.SIGKILL)
        with trio.fail_after(10), pytest.raises(GardenError) as lost:
            await proc.wait()
        assert isinstance(lost.value, ConnectionLostError), repr(lost.value)
    seen = _numbers(before.data)
    assert seen == list(range(len(seen)))

    await server.start()
    after = Sink()
    async with server.connect() as client:
        c = await client.lookup("streamer")
        proc = await c.attach("counter", ProcessIO(stdout=after))
        with trio.fail_after(30):
            assert await proc.wait() == 9
    rest = _numbers(after.data)
    # Output from the attach on: a gap-free run that ends with the last line.
    assert rest, "the process finished before the re-attach: nothing left to check"
    assert rest == list(range(rest[0], 400))
    assert rest[0] > seen[-1]
    await server.finish()


# ---- kill -9 during create and during destroy ------------------------------------------------


@pytest.mark.parametrize("kill_after", [1, 6])
async def test_sigkill_during_concurrent_creates(own_servers, kill_after):
    server = own_servers("mkill", f"10.248.{3 + kill_after}.0/24")
    await server.start()
    created: list[str] = []
    failed: list[str] = []
    enough = trio.Event()

    async def create(client: Any, handle: str) -> None:
        try:
            await client.create(ContainerSpec(handle=handle))
        except GardenError:
            failed.append(handle)
            return
        created.append(handle)
        if len(created) >= kill_after:
            enough.set()

    async with server.connect() as client, trio.open_nursery() as nursery:
        for i in range(24):
            nursery.start_soon(create, client, f"c{i:02d}")
        with trio.fail_after(60):
            await enough.wait()
        await server.kill(signal.SIGKILL)
    assert len(created) >= kill_after, created
    assert failed, "every create finished before the kill"

    await server.start()
    async with server.connect() as client:
        listed = {c.handle for c in await client.containers()}
        # Acknowledged creates were persisted before the reply.
        assert set(created) <= listed
        for handle in sorted(listed):
            c = await client.lookup(handle)
            assert await sh_ok(c, "echo ok") == "ok\n"
    assert sorted(server.snapshot()["container dirs"]) == sorted(listed)
    destroyed = await server.destroy_all()
    assert sorted(destroyed) == sorted(listed)
    await server.finish()


async def test_sigkill_while_the_first_create_builds_the_image(own_servers):
    """The first create on a fresh depot builds the uid-shifted image copy; a kill then
    must not leave a half-built copy behind, nor break later creates."""
    server = own_servers("ikill", "10.248.10.0/24")
    await server.start()
    images = os.path.join(server.depot, "images")

    def building() -> bool:
        return any(".tmp-" in n for n in (os.listdir(images) if os.path.isdir(images) else []))

    async with server.connect() as client, trio.open_nursery() as nursery:
        nursery.start_soon(_create_quietly, client, "first")
        await wait_for(building, within=30, interval=0.002, what="the image copy to start")
        await server.kill(signal.SIGKILL)
    await server.start()
    async with server.connect() as client:
        assert await client.containers() == []
        c = await client.create(ContainerSpec(handle="second"))
        assert await sh_ok(c, "echo ok") == "ok\n"
    await server.finish()


async def _create_quietly(client: Any, handle: str) -> None:
    with contextlib.suppress(GardenError):
        await client.create(ContainerSpec(handle=handle))


async def test_sigkill_during_concurrent_destroys(own_servers):
    server = own_servers("dkill", "10.248.11.0/24")
    await server.start()
    handles = [f"d{i:02d}" for i in range(12)]
    async with server.connect() as client:
        async with trio.open_nursery() as nursery:
            for handle in handles:
                nursery.start_soon(client.create, ContainerSpec(handle=handle))
        for handle in handles:  # something to kill in every container
            c = await client.lookup(handle)
            await c.run(ProcessSpec(path="sleep", args=["1000"]), ProcessIO())

    destroyed: list[str] = []
    enough = trio.Event()

    async def destroy(client: Any, handle: str) -> None:
        with contextlib.suppress(GardenError):
            await client.destroy(handle)
            destroyed.append(handle)
            enough.set()

    async with server.connect() as client, trio.open_nursery() as nursery:
        for handle in handles:
            nursery.start_soon(destroy, client, handle)
        with trio.fail_after(60):
            await enough.wait()
        await server.kill(signal.SIGKILL)
    assert destroyed
    assert len(destroyed) < len(handles), "every destroy finished before the kill"

    await server.start()
    async with server.connect() as client:
        listed = {c.handle for c in await client.containers()}
    # An acknowledged destroy is final; nothing listed is a half-destroyed leftover.
    assert not listed & set(destroyed)
    assert sorted(server.snapshot()["container dirs"]) == sorted(listed)
    await server.destroy_all()
    await server.finish()


async def test_restart_empties_the_trash_a_crash_left(own_servers):
    """Destroyed containers' directories are removed in the background from
    ``<depot>/trash``; what a crash leaves there goes at the next start."""
    server = own_servers("trash", "10.248.30.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="t1"))
        await client.destroy("t1")
    trash = os.path.join(server.depot, "trash")
    await wait_for(lambda: not os.listdir(trash), what="the trash to be emptied after a destroy")
    await server.kill(signal.SIGKILL)
    left = os.path.join(trash, "t0.0123456789ab")
    os.makedirs(os.path.join(left, "upper", "etc", "work"))
    for name in ("container.json", "upper/etc/hosts"):
        with open(os.path.join(left, name), "w") as f:
            f.write("x")
    os.chmod(os.path.join(left, "upper", "etc", "work"), 0)
    await server.start()
    await wait_for(lambda: not os.listdir(trash), what="the trash to be emptied at start")
    await server.finish()


# ---- graceful stop, and --destroy-containers-on-startup ---------------------------------------


async def test_sigterm_leaves_containers_running_and_restart_readopts(own_servers):
    server = own_servers("term", "10.248.12.0/24")
    await server.start()
    async with server.connect() as client:
        c = await client.create(ContainerSpec(handle="survivor", properties={"k": "v"}))
        await c.run(ProcessSpec(id="sleeper", path="sleep", args=["1000"]), ProcessIO())
        sleeper = await wait_for(lambda: pids_running("survivor", "sleep 1000"), what="sleep pid")
    init_pid = read_int(os.path.join(server.container_dir("survivor"), "init.pid"))
    shim_pid = read_int(os.path.join(server.container_dir("survivor"), "shim.pid"))
    assert init_pid
    assert shim_pid

    await server.kill(signal.SIGTERM)
    assert server.proc is not None
    assert server.proc.returncode == 0, server.log_tail()
    assert proc_name(init_pid) == "garden-init"
    assert alive(init_pid)
    assert proc_name(shim_pid) == "gactor-shim"
    assert alive(shim_pid)
    assert all(map(alive, sleeper))

    await server.start()
    async with server.connect() as client:
        assert [c.handle for c in await client.containers()] == ["survivor"]
        c = await client.lookup("survivor")
        assert (await c.info()).properties.get("k") == "v"
        assert pids_running("survivor", "sleep 1000") == sleeper
        proc = await c.attach("sleeper")
        await proc.signal(gactor.Signal.KILL)
        with trio.fail_after(10):
            assert await proc.wait() == 137
        await c.run(ProcessSpec(id="sleeper2", path="sleep", args=["1000"]), ProcessIO())

    await server.kill(signal.SIGTERM)
    assert alive(init_pid)
    await server.start("--destroy-containers-on-startup")
    async with server.connect() as client:
        assert await client.containers() == []
    await wait_until_empty(server)
    # The snapshot stops seeing a shim once its cmdline is gone, which happens while it
    # is still exiting: wait for it to be dead (or a zombie), not just untitled.
    await wait_for(lambda: not alive(init_pid) and not alive(shim_pid), what="init and shim gone")
    await server.finish()


async def wait_until_empty(server: ServerProcess, within: float = 10) -> None:
    await wait_until_equal(server.snapshot, server.empty(), within=within)


# ---- startup must never kill a process that is not this container's shim ---------------------


async def test_stale_shim_pid_is_not_killed_at_restart(own_servers):
    """After a reboot (or a shim crash) ``shim.pid`` may name an unrelated process that
    reuses the pid. Startup must remove the container without touching that process."""
    server = own_servers("stale", "10.248.13.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="stale"))
    await server.kill(signal.SIGKILL)
    cdir = server.container_dir("stale")
    shim_pid = read_int(os.path.join(cdir, "shim.pid"))
    assert shim_pid
    assert proc_name(shim_pid) == "gactor-shim"
    os.kill(shim_pid, signal.SIGKILL)  # the shim dies (as in a reboot); its init stays
    await wait_for(lambda: not alive(shim_pid), what="the shim to die")
    bystander = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 - returns at once
    try:
        with open(os.path.join(cdir, "shim.pid"), "w") as f:
            f.write(str(bystander.pid))  # the pid now belongs to someone else
        await server.start()
        async with server.connect() as client:
            assert await client.containers() == []
        assert bystander.poll() is None, (
            f"the restarted server killed pid {bystander.pid}, an unrelated process whose pid "
            f"was in a stale shim.pid:\n{server.log_tail()}"
        )
    finally:
        bystander.kill()
        bystander.wait()
    await server.finish()


async def test_stale_pid_files_naming_another_containers_helpers(own_servers):
    """A dead shim's pid may be reused by another container's shim (and its init's pid
    by another init): removing the dead container must not touch the healthy one.

    ``container.json`` is gone too, as after a kill in the middle of destroy's
    ``remove_tree``: the container cannot even be read, only removed as an orphan."""
    server = own_servers("reuse", "10.248.15.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="a-dead"))
        await client.create(ContainerSpec(handle="b-healthy"))
    await server.kill(signal.SIGKILL)
    dead, healthy = server.container_dir("a-dead"), server.container_dir("b-healthy")
    dead_shim = read_int(os.path.join(dead, "shim.pid"))
    assert dead_shim
    os.kill(dead_shim, signal.SIGKILL)
    await wait_for(lambda: not alive(dead_shim), what="the shim to die")
    for name in ("shim.pid", "init.pid"):  # as if the kernel had handed the pids on
        shutil.copy(os.path.join(healthy, name), os.path.join(dead, name))
    os.unlink(os.path.join(dead, "container.json"))
    healthy_shim = read_int(os.path.join(healthy, "shim.pid"))
    healthy_init = read_int(os.path.join(healthy, "init.pid"))
    assert healthy_shim
    assert healthy_init

    await server.start()
    async with server.connect() as client:
        listed = [c.handle for c in await client.containers()]
        assert alive(healthy_shim), f"the healthy container's shim was killed:\n{server.log_tail()}"
        assert alive(healthy_init), f"the healthy container's init was killed:\n{server.log_tail()}"
        assert listed == ["b-healthy"]
        c = await client.lookup("b-healthy")
        assert await sh_ok(c, "echo ok") == "ok\n"
    await server.finish()


async def test_shim_not_listening_at_restart_is_still_removed(own_servers):
    """A shim that does not answer on ``shim.sock`` when the new server scans the depot
    (one still starting when the old server died: it binds the socket last) must not be
    left running once its container is removed. Emulated by moving its socket away."""
    server = own_servers("deaf", "10.248.16.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="deaf"))
    await server.kill(signal.SIGKILL)
    cdir = server.container_dir("deaf")
    shim_pid = read_int(os.path.join(cdir, "shim.pid"))
    assert shim_pid
    os.rename(os.path.join(cdir, "shim.sock"), os.path.join(server.base, "shim.sock.away"))
    await server.start()
    async with server.connect() as client:
        listed = [c.handle for c in await client.containers()]
    if listed:  # re-adopted after all: then it must be destroyable
        await server.destroy_all()
    await wait_for(
        lambda: not alive(shim_pid),
        within=10,
        what=f"the shim {shim_pid} of a removed container to go",
    )
    await server.finish()


async def test_a_hung_shim_does_not_block_startup(own_servers):
    """One shim that accepts the connection but never answers (stopped, stuck) must not
    keep the server from serving its other containers."""
    server = own_servers("hung", "10.248.17.0/24")
    await server.start()
    async with server.connect() as client:
        await client.create(ContainerSpec(handle="a-hung"))
        await client.create(ContainerSpec(handle="b-fine"))
    await server.kill(signal.SIGKILL)
    shim_pid = read_int(os.path.join(server.container_dir("a-hung"), "shim.pid"))
    assert shim_pid
    os.kill(shim_pid, signal.SIGSTOP)
    try:
        server.spawn()
        with trio.move_on_after(20):
            await server.wait_ready()
        assert await server.pings(), f"no ping 20 s after the restart:\n{server.log_tail()}"
        async with server.connect() as client:
            assert "b-fine" in {c.handle for c in await client.containers()}
    finally:
        os.kill(shim_pid, signal.SIGCONT)
    await server.finish()
