"""``--mount-cgroup-controllers`` with a real server: every container gets a cgroup in each
v1 controller the server mounted, sees it read-only, and loses it at destroy.

The server runs in a private mount namespace (``unshare --mount``), as docs/garden-compat.md
runs it for GATS, so other servers on this host never see the hierarchies. They are
host-wide while mounted (``/proc/cgroups`` gives them a hierarchy id) and go once nothing
holds them; only their mount-point directories stay on the shared /sys/fs/cgroup tmpfs,
which the test removes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gactor import ContainerSpec
from gactor.kernel import cgroups

from . import servers
from .helpers import init_pid, sh_ok, wait_for, wait_until_equal

CGROUP_ROOT = "/sys/fs/cgroup"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as root"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(CGROUP_ROOT, "memory")), reason="not a cgroup v1 host"),
    pytest.mark.skipif(not cgroups.unmounted_v1_controllers(), reason="every v1 controller is mounted here"),
]


def _proc_cgroups() -> list[list[str]]:
    with open("/proc/cgroups") as f:
        return [line.split() for line in f if not line.startswith("#")]


def _hierarchy_ids() -> dict[str, int]:
    return {row[0]: int(row[1]) for row in _proc_cgroups()}


def _cgroup_counts() -> dict[str, int]:
    return {row[0]: int(row[2]) for row in _proc_cgroups()}


@pytest.fixture
def in_private_mount_namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Servers started during the test run under ``unshare --mount --propagation private``
    (which execs: the pid is the server's); yields the controllers to be mounted, and
    afterwards removes the mount points the server made, if empty and unmounted."""
    wanted = cgroups.unmounted_v1_controllers()
    before = set(os.listdir(CGROUP_ROOT))
    command = servers.gactor_command
    monkeypatch.setattr(servers, "gactor_command",
                        lambda *args: ["unshare", "--mount", "--propagation", "private", *command(*args)])
    yield wanted
    for name in set(os.listdir(CGROUP_ROOT)) - before:
        path = os.path.join(CGROUP_ROOT, name)
        if name in wanted and not os.path.ismount(path):
            os.rmdir(path)
    assert set(os.listdir(CGROUP_ROOT)) == before


# in_private_mount_namespace first: set up before own_servers, so torn down after its servers.
async def test_each_mounted_controller_gets_a_cgroup_per_container(in_private_mount_namespace, own_servers):
    wanted = in_private_mount_namespace
    server = own_servers("cgmount", "10.253.91.0/24", "--mount-cgroup-controllers")
    await server.start()
    # The server's own view of /sys/fs/cgroup, through its mount namespace.
    view = f"/proc/{server.pid}/root{CGROUP_ROOT}"
    assert all(os.path.ismount(os.path.join(view, c)) for c in wanted)
    assert not any(os.path.ismount(os.path.join(CGROUP_ROOT, c)) for c in wanted)  # not on the host
    assert all(_hierarchy_ids()[c] > 0 for c in wanted)
    handle = "cgmount-1"
    async with server.connect() as client:
        container = await client.create(ContainerSpec(handle=handle))
        dirs = [os.path.join(view, c, server.cgroup_parent, handle) for c in wanted]
        init = await init_pid(handle)
        with open(f"/proc/{init}/cgroup") as f:
            joined = {line.split(":")[1]: line.split(":")[2].strip() for line in f}
        assert {c: joined.get(c) for c in wanted} == {c: f"/{server.cgroup_parent}/{handle}" for c in wanted}
        for directory in dirs:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                assert str(init) in f.read().split(), directory
        # Inside: each is a read-only mount of the container's own cgroup, and a process
        # run in the container joins it (its shell's pid is listed there).
        script = "; ".join(f"echo $$ $(cat /sys/fs/cgroup/{c}/cgroup.procs); grep ' /sys/fs/cgroup/{c} ' "
                           f"/proc/self/mountinfo | cut -d' ' -f6" for c in wanted)
        lines = (await sh_ok(container, script)).splitlines()
        for c, listing, options in zip(wanted, lines[0::2], lines[1::2], strict=True):
            shell, *procs = listing.split()
            assert shell in procs, (c, listing)
            assert options.split(",")[0] == "ro", (c, options)
        await client.destroy(handle)
    await wait_for(lambda: not any(os.path.exists(d) for d in dirs), what="the container's cgroups to go")
    assert all(os.path.isdir(os.path.join(view, c, server.cgroup_parent)) for c in wanted)
    await server.finish()  # nothing of the server left in the host's hierarchies either
    # The namespace is gone and the server removed its parent in each: only each root is
    # left (the kernel may keep a hierarchy no mount shows for a while, dormant, or free
    # it at once: hierarchy 0), and a later --mount-cgroup-controllers mounts it again.
    await wait_until_equal(lambda: {c: _cgroup_counts()[c] for c in wanted}, dict.fromkeys(wanted, 1))
    assert set(cgroups.unmounted_v1_controllers()) >= set(wanted)
