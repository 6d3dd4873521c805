"""The spawner exchange under cancellation, against the real spawner, shims and kernel.

``SpawnerClient.start_shim`` is cancelled at random moments (alone and several at a
time); each cancelled call must leave no shim and no pid 1 behind by the time it
returns, and every later start must get its own shim: the one titled with its own
container directory, listening on that directory's socket, parent of the pid 1 it
reported. The spawner must be forked before any thread exists, so the scenario runs in a
fresh interpreter (this file run as a script) and reports back as JSON.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import uuid

import pytest

ROOTFS = os.environ.get("GACTOR_ROOTFS_DIR", "/var/lib/gactor/images/busybox")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="shims need root"),
    pytest.mark.skipif(not os.path.isdir(ROOTFS), reason=f"no busybox rootfs at {ROOTFS}"),
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cancelled_starts_leave_nothing_and_never_confuse_later_ones(tmp_path, seed):
    cgroup_parent = f"gactor-test-{uuid.uuid4().hex[:10]}"
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), cgroup_parent, str(seed)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"scenario failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["cancelled"] >= 15, report  # the random delays did cut starts short
    assert report["leftovers"] == [], report
    assert report["good"] == report["wanted"], report
    assert "did not answer within 0.3 s" in report["stale"], report
    assert report["shims_at_end"] == {}, report
    assert report["pids_at_end"] == [], report
    assert not os.path.exists(os.path.join("/proc/self/root/sys/fs/cgroup", cgroup_parent))


# ---- the scenario, in its own interpreter ----------------------------------------------


def _peer_pid(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(path)
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


def _scenario(base: str, cgroup_parent: str, seed: int) -> dict[str, object]:
    from gactor.kernel.spawner import fork_spawner

    handle = fork_spawner()  # before trio, which may start threads
    import trio

    from gactor.actors import spawner_client
    from gactor.actors.spawner_client import SpawnerClient
    from gactor.errors import GardenError
    from gactor.kernel import cgroups, rootfs, shim_wire, shims

    rng = random.Random(seed)
    driver = cgroups.discover(parent=cgroup_parent)
    cgroup = driver.create("c")
    client = SpawnerClient(handle.sock)
    counter = iter(range(10_000))
    report: dict[str, object] = {"cancelled": 0, "leftovers": [], "good": 0, "wanted": 0}

    def new_dir() -> tuple[str, dict[str, object]]:
        d = os.path.join(base, "containers", f"c{next(counter)}")
        os.makedirs(d)
        merged = rootfs.mount_overlay(ROOTFS, d, True)
        hosts = os.path.join(d, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n")
        return d, {"dir": d, "rootfs": merged, "hostname": os.path.basename(d), "privileged": True,
                   "cgroup_procs": list(cgroup.procs_files), "hosts_file": hosts, "init_binary": "",
                   "bind_mounts": []}

    async def destroy(d: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(os.path.join(d, "shim.sock"))
            shim_wire.send(s, {"op": "destroy", "rid": 1})
            assert shim_wire.recv(s) is not None

    async def check_own(d: str, status: dict[str, object]) -> bool:
        shim, init = int(status["shim"]), int(status["init"])  # type: ignore[call-overload]
        return (shims.find(os.path.dirname(d)).get(os.path.basename(d)) == shim
                and _peer_pid(os.path.join(d, "shim.sock")) == shim and _ppid(init) == shim)

    async def cancelled_start(delay: float, alone: bool = False) -> float:
        d, cfg = new_dir()
        status = None
        started = trio.current_time()
        with trio.move_on_after(delay):
            status = await client.start_shim(cfg)
        if status is None:
            report["cancelled"] += 1  # type: ignore[operator]
            # By the time start_shim returned, its shim is gone, and (alone) so is its pid 1.
            if os.path.basename(d) in shims.find(os.path.dirname(d)) or (alone and cgroup.pids()):
                report["leftovers"].append(d)  # type: ignore[attr-defined]
        else:
            report["wanted"] += 1  # type: ignore[operator]
            report["good"] += await check_own(d, status)  # type: ignore[operator]
            await destroy(d)
        return trio.current_time() - started

    async def main() -> None:
        took = min([await cancelled_start(60) for _ in range(3)])  # how long a start takes here
        for _ in range(25):
            await cancelled_start(rng.uniform(0, took), alone=True)
        for _ in range(5):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(cancelled_start, rng.uniform(0, 4 * took))
        # A reply that comes after its request gave up (a stopped spawner) is never taken
        # by the next request, and its shim gives up once that reply is discarded.
        os.kill(handle.pid, signal.SIGSTOP)
        spawner_client.SPAWNER_REPLY_TIMEOUT = 0.3
        try:
            await cancelled_start(60)
            report["stale"] = "no error"
        except GardenError as err:
            report["stale"] = str(err)
        finally:
            spawner_client.SPAWNER_REPLY_TIMEOUT = 60.0
            os.kill(handle.pid, signal.SIGCONT)
        # Later starts, sequential and concurrent, each get their own shim.
        for _ in range(3):
            await cancelled_start(60)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(cancelled_start, 60)
        for _ in range(500):  # destroyed shims exit just after replying: up to 10 s
            if not shims.find(os.path.join(base, "containers")) and not cgroup.pids():
                break
            await trio.sleep(0.02)

    async def bounded_main() -> None:
        with trio.fail_after(150):
            await main()

    try:
        trio.run(bounded_main)
    finally:
        containers = os.path.join(base, "containers")
        report["shims_at_end"] = shims.find(containers)
        report["pids_at_end"] = cgroup.pids()
        for name, pid in shims.find(containers).items():  # only after a failure
            shims.kill(pid, os.path.join(containers, name))
        cgroup.kill_all()
        cgroup.destroy()
        driver.remove_parent()
        for d in os.listdir(containers):
            rootfs.unmount(os.path.join(containers, d, "rootfs"))
        handle.sock.close()
        os.kill(handle.pid, 9)
        os.waitpid(handle.pid, 0)
    return report


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
