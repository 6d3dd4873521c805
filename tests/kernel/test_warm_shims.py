"""The spawner's warm shims, against the real spawner, shims and kernel.

A warm shim is forked ahead of time and waits, with a pid 1 forked ahead too in a fresh
user, UTS, IPC, network and pid namespace, for one container. Checked from outside (/proc): the
pool is there and nobody's child; each container a warm shim starts has namespaces of
its own (none shared with another container or with the host); its network namespace
reaches the caller before the container is up; a privileged container from a warm shim
has no user namespace; and once the spawner is gone, so is every warm process. The
spawner must be forked before any thread exists, so the scenario runs in a fresh
interpreter (this file run as a script) and reports back as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")
NAMESPACES = ("user", "ipc", "uts", "net", "pid_for_children", "cgroup", "mnt")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="shims need root"),
    pytest.mark.skipif(not os.path.isdir(ROOTFS), reason=f"no busybox rootfs at {ROOTFS}"),
]


def test_warm_shims_start_fresh_containers_and_end_with_the_spawner():
    cgroup_parent = f"gactor-test-{uuid.uuid4().hex[:10]}"
    # Unprivileged container roots must traverse every ancestor (pytest's tmp_path: 0700).
    base = tempfile.mkdtemp(prefix="gactor-warm-", dir="/tmp")
    os.chmod(base, 0o711)
    try:
        result = subprocess.run(
            [sys.executable, __file__, base, cgroup_parent],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        if not any(line.split()[4].startswith(base) for line in open("/proc/self/mountinfo")):
            shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 0, f"scenario failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.splitlines()[-1])
    # The pool: two warm shims, each with its prepared pid 1; none is the spawner's child.
    assert report["pool_size"] == 4, report
    assert report["pool_children_of_spawner"] == [], report
    # Warm processes wait at a lower priority; a container's shim and pid 1 run at the server's.
    assert report["pool_nice"] == [os.getpriority(os.PRIO_PROCESS, 0) + 10], report
    assert report["containers_nice"] == [[os.getpriority(os.PRIO_PROCESS, 0)] * 2] * 4, report
    # Every container came from a warm shim, and its shim then served it.
    assert report["from_pool"] == report["containers"] == 4, report
    assert report["own_shim"] == 4, report
    # Each namespace of each container is its own: no two containers share one, and none
    # is the host's (a privileged container keeps the host's user namespace, as in Garden).
    for name in NAMESPACES:
        inodes = [c[name] for c in report["namespaces"] if name != "user" or not c["privileged"]]
        assert len(set(inodes)) == len(inodes), (name, report)
        assert report["host"][name] not in inodes, (name, report)
    assert report["privileged_user_is_host"] is True, report
    # The network namespace arrived before the report, and it is the container's.
    assert report["early_netns"] == 4, report
    # The spawner gone, every warm process exits by itself.
    assert report["warm_left_after_spawner"] == [], report
    assert report["pids_at_end"] == [], report
    assert not os.path.exists(os.path.join("/proc/self/root/sys/fs/cgroup", cgroup_parent))


# ---- the scenario, in its own interpreter ----------------------------------------------


def _titled(title: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0", 1)[0].decode(errors="replace").rstrip() == title:
                        found.append(int(entry))
            except OSError:
                pass
    return sorted(found)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19: nice


def _ns(pid: int | str) -> dict[str, int]:
    return {name: os.stat(f"/proc/{pid}/ns/{name}").st_ino for name in NAMESPACES}


def _wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _scenario(base: str, cgroup_parent: str) -> dict[str, object]:
    from gactor.kernel.spawner import fork_spawner

    handle = fork_spawner(warm=2)  # before trio, which may start threads
    import trio

    from gactor.actors.spawner_client import SpawnerClient
    from gactor.kernel import cgroups, rootfs, shim_wire, shims
    from gactor.kernel.shim import warm_title

    title = warm_title(handle.pid)
    driver = cgroups.discover(parent=cgroup_parent)
    cgroup = driver.create("c")
    client = SpawnerClient(handle.sock)
    report: dict[str, object] = {"from_pool": 0, "own_shim": 0, "early_netns": 0, "namespaces": [],
                                 "host": _ns("self"), "containers": 0}
    scratch = os.path.join(base, "mnt")
    dirs: list[str] = []

    def new_dir(n: int, privileged: bool) -> dict[str, object]:
        d = os.path.join(base, "containers", f"c{n}")
        os.makedirs(d)
        dirs.append(d)
        merged = rootfs.mount_overlay(ROOTFS, d, privileged, idmapped=not privileged, scratch=scratch)
        hosts = os.path.join(d, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n")
        return {"dir": d, "rootfs": merged, "hostname": f"c{n}", "privileged": privileged,
                "cgroup_procs": list(cgroup.procs_files), "hosts_file": hosts, "init_binary": "",
                "bind_mounts": []}

    def destroy(d: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(os.path.join(d, "shim.sock"))
            shim_wire.send(s, {"op": "destroy", "rid": 1})
            assert shim_wire.recv(s) is not None

    async def main() -> None:
        assert _wait_for(lambda: len(_titled(title)) == 4), _titled(title)
        report["pool_size"] = len(_titled(title))
        report["pool_children_of_spawner"] = [p for p in _titled(title) if _ppid(p) == handle.pid]
        report["pool_nice"] = sorted({_nice(p) for p in _titled(title)})
        report["containers_nice"] = []
        for n, privileged in enumerate((False, False, True, False)):
            pool = set(_titled(title))
            netns: list[int] = []
            status = await client.start_shim(new_dir(n, privileged), netns.append)
            shim, init = int(status["shim"]), int(status["init"])
            report["containers"] += 1  # type: ignore[operator]
            report["from_pool"] += shim in pool  # type: ignore[operator]
            d = dirs[-1]
            report["own_shim"] += (shims.find(os.path.dirname(d)).get(os.path.basename(d)) == shim  # type: ignore[operator]
                                   and _ppid(init) == shim)
            namespaces = _ns(init)
            report["containers_nice"].append([_nice(shim), _nice(init)])  # type: ignore[attr-defined]
            report["namespaces"].append({**namespaces, "privileged": privileged})  # type: ignore[attr-defined]
            if privileged:
                report["privileged_user_is_host"] = namespaces["user"] == report["host"]["user"]  # type: ignore[index]
            report["early_netns"] += len(netns) == 1 and os.fstat(netns[0]).st_ino == namespaces["net"]  # type: ignore[operator]
            for fd in netns:
                os.close(fd)
            # Wait until the pool is whole again, so the next container also comes from it.
            assert _wait_for(lambda: len(_titled(title)) == 4), _titled(title)
        # Containers alive together: their namespaces were compared above; now end them.
        for d in dirs:
            destroy(d)
        _wait_for(lambda: not shims.find(os.path.join(base, "containers")) and not cgroup.pids())

    try:
        trio.run(main)
        handle.sock.close()
        os.kill(handle.pid, signal.SIGKILL)
        os.waitpid(handle.pid, 0)
        _wait_for(lambda: not _titled(title), timeout=10)
        report["warm_left_after_spawner"] = _titled(title)
    finally:
        containers = os.path.join(base, "containers")
        report["pids_at_end"] = cgroup.pids()
        for name, pid in shims.find(containers).items():  # only after a failure
            shims.kill(pid, os.path.join(containers, name))
        for pid in _titled(title):  # only after a failure
            os.kill(pid, signal.SIGKILL)
        cgroup.kill_all()
        cgroup.destroy()
        driver.remove_parent()
        for d in dirs:
            rootfs.unmount(os.path.join(d, "rootfs"))
        rootfs.reclaim_mount_points(scratch)
        if handle.sock.fileno() >= 0:
            handle.sock.close()
            os.kill(handle.pid, signal.SIGKILL)
            os.waitpid(handle.pid, 0)
    return report


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1], sys.argv[2])))
