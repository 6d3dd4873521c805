"""``spawn.Forker`` against real namespaces and a real cgroup, without a server.

The namespaces are a warm shim's prepared pid 1's (``PreparedInit``: user with Garden's
uid map, UTS, IPC, network, pid; the mount and cgroup namespaces stay the host's).
Everything runs in a forked child, which plays the shim: it owns pid 1 (a child
subreaper) and the forker's processes are its children (CLONE_PARENT).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gactor.kernel import linux as L
from gactor.kernel.container_init import PreparedInit, confinement
from gactor.kernel.spawn import Forker, ForkerGone, make_stdio

from .forked import in_child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _pids_hierarchy() -> str:
    for path in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(path, "cgroup.procs")):
            return path
    pytest.skip("no cgroup hierarchy with cgroup.procs")


@pytest.fixture
def cgroup() -> Iterator[str]:
    path = os.path.join(_pids_hierarchy(), f"gactor-test-forker-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        if os.path.isdir(path):
            os.rmdir(path)


def _spawn_and_wait(forker: Forker, script: str) -> dict[str, Any]:
    stdio = make_stdio(None)
    pid = forker.spawn({"path": "/bin/sh", "args": ["-c", script], "dir": "/tmp"}, stdio)
    os.close(stdio.stdin)
    with os.fdopen(stdio.stdout, "rb") as f:
        out = f.read().decode()
    os.close(stdio.stderr or -1)
    got, status = os.waitpid(pid, 0)  # CLONE_PARENT: the caller's child, not the forker's
    return {"pid": got == pid, "code": os.waitstatus_to_exitcode(status), "out": out}


PREPARED = ("user", "ipc", "uts", "net", "pid")


def _with_forker(conf: Any, cgroup: str, body: Any) -> Any:
    L.set_child_subreaper()
    init = PreparedInit(conf)
    try:
        ns_fds = {name: os.open(f"/proc/{init.pid}/ns/{name}", os.O_RDONLY) for name in PREPARED}
        forker = Forker(ns_fds, [os.path.join(cgroup, "cgroup.procs")], conf, "gactor-forker test")
        try:
            return body(forker, init.pid)
        finally:
            forker.close()
    finally:
        # As the shim's destroy: pid 1's end waits until every process of its pid
        # namespace is reaped (a failed one is our zombie), so reap them all.
        os.kill(init.pid, signal.SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        init.pid = 0
        init.close()


def test_a_process_lands_in_the_namespaces_and_the_cgroup(cgroup: str) -> None:
    conf = confinement()

    def check(forker: Forker, init: int) -> dict[str, Any]:
        result = _spawn_and_wait(forker, "readlink /proc/self/ns/net; readlink /proc/self/ns/pid; echo $$; "
                                         "cat /proc/self/cgroup")
        result["init_net"] = os.readlink(f"/proc/{init}/ns/net")
        result["init_pidns"] = os.readlink(f"/proc/{init}/ns/pid")
        return result

    result = check_in_child(lambda: _with_forker(conf, cgroup, check))
    net, pidns, pid, cgroups = result["out"].split("\n", 3)
    assert result["pid"], "the process was not the caller's child"
    assert result["code"] == 0, result
    assert net == result["init_net"]
    assert pidns == result["init_pidns"]
    # /proc is the host's here (the host's mount namespace), so $$ shows the pid as the
    # new pid namespace numbers it (pid 1's staging child had 2), and the cgroup line
    # names the test's cgroup.
    assert 1 < int(pid) < 10, "not numbered by pid 1's pid namespace"
    assert "/" + os.path.basename(cgroup) + "\n" in cgroups, cgroups


def test_a_cgroup_the_kernel_refuses_gives_up_the_forker_and_keeps_stdio(cgroup: str) -> None:
    """A refused cgroup.procs write (here: the cgroup was removed after the forker opened
    its file; before Linux 5.16, the writer's cgroup namespace) ends in ForkerGone for
    good with the caller's stdio intact, so the shim starts the process the cold way."""
    conf = confinement()

    def check(forker: Forker, init: int) -> dict[str, Any]:
        os.rmdir(cgroup)
        stdio = make_stdio(None)
        try:
            forker.spawn({"path": "/bin/true", "dir": "/tmp"}, stdio)
        except ForkerGone as err:
            outcome = {"for_good": err.for_good, "message": str(err)}
        else:
            outcome = {"for_good": None, "message": "started"}
        for fd in (*stdio.child, *stdio.kept):
            os.fstat(fd)  # every fd still open
        return outcome

    outcome = check_in_child(lambda: _with_forker(conf, cgroup, check))
    assert outcome["for_good"] is True, outcome
    assert "refused a forked process its cgroup" in outcome["message"]


def check_in_child(fn: Any) -> Any:
    result = in_child(lambda: _guarded(fn))
    assert "error" not in result, result.get("error")
    return result["value"]


def _guarded(fn: Any) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except BaseException as err:  # noqa: BLE001 - reported to the test in the parent
        return {"error": f"{type(err).__name__}: {err}"}
