"""``rootfs.overlay_tree``: a container's overlay as a detached mount, attached in a mount
namespace of its own, never in the host's mount table; over several layers in order,
and over paths longer than ``fsconfig`` takes (the mount-and-clone way)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gactor.kernel import linux as L
from gactor.kernel import rootfs
from gactor.kernel.errors import KernelError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def host_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


def layers(base: Path, n: int) -> list[str]:
    """``n`` layers, top first: each has its own file and its own version of ``who``."""
    made = []
    for i in range(n):
        layer = base / f"layer{i}"
        layer.mkdir(parents=True)
        (layer / f"only{i}").write_text(str(i))
        (layer / "who").write_text(f"layer{i}")
        made.append(str(layer))
    return made


def attached_view(tree: int, target: Path) -> dict[str, str]:
    """What the tree holds, read in a forked child that attaches it in a new mount
    namespace (as pid 1 does), so the host's mount table never sees it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            L.unshare(L.CLONE_NEWNS)
            L.mount("", "/", None, L.MS_REC | L.MS_PRIVATE)
            L.move_mount(tree, str(target))
            found = {name: (target / name).read_text() for name in sorted(os.listdir(target))}
            os.write(w, repr(found).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    assert text, "the child failed to attach the tree"
    return eval(text)  # noqa: S307 - our own child's repr of a dict of str


@pytest.mark.parametrize("depth", [1, 4])
def test_layers_in_order_and_nothing_in_the_host_mount_table(tmp_path: Path, depth: int) -> None:
    lowers = layers(tmp_path / "image", depth)
    container = tmp_path / "c"
    tree = rootfs.overlay_tree(lowers, str(container), privileged=True)
    try:
        assert host_mounts_under(tmp_path) == []
        view = attached_view(tree, container / "rootfs")
    finally:
        os.close(tree)
    assert view == {"who": "layer0", **{f"only{i}": str(i) for i in range(depth)}}
    assert host_mounts_under(tmp_path) == []


def test_paths_longer_than_fsconfig_takes(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    lowers = layers(deep / "image", 2)
    assert len(lowers[0]) > 255
    container = deep / "c"
    tree = rootfs.overlay_tree(lowers, str(container), privileged=True)
    try:
        assert host_mounts_under(tmp_path) == []  # mounted and cloned, then unmounted again
        view = attached_view(tree, container / "rootfs")
    finally:
        os.close(tree)
    assert view == {"who": "layer0", "only0": "0", "only1": "1"}


def test_a_missing_lower_dir_is_an_error_naming_the_overlay(tmp_path: Path) -> None:
    lowers = layers(tmp_path / "image", 1)
    with pytest.raises(KernelError, match="mount overlay"):
        rootfs.overlay_tree([lowers[0], str(tmp_path / "missing")], str(tmp_path / "c"), privileged=True)
    assert host_mounts_under(tmp_path) == []
