import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gactor.kernel.busybox import GLIBC_BUSYBOX, VERSION_FILE, build_rootfs, generations, libraries
from gactor.kernel.image_copies import mounted_lower_dirs

pytestmark = pytest.mark.skipif(
    not GLIBC_BUSYBOX.is_file(), reason=f"{GLIBC_BUSYBOX} missing (scripts/setup.sh extracts it)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return build_rootfs(tmp_path / "rootfs")


def _chroot(root: Path, script: str) -> str:
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", script],
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    return out.stdout


def test_applets_exist(rootfs: Path) -> None:
    assert (rootfs / "bin/busybox").is_file()
    for applet in ("sh", "ls", "cat", "sleep", "adduser", "id", "nc", "stty"):
        found = [
            d for d in ("bin", "sbin", "usr/bin", "usr/sbin") if (rootfs / d / applet).exists()
        ]
        assert found, f"applet {applet} missing"
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    # As in Docker's image: every applet in /bin (a PATH of /bin finds them), /usr/bin/env a link.
    names = subprocess.run([str(GLIBC_BUSYBOX), "--list"], check=True, capture_output=True,
                           text=True).stdout.split()
    assert all(os.path.lexists(rootfs / "bin" / n) for n in names)
    assert os.readlink(rootfs / "usr/bin/env") == "../../bin/env"


def test_passwd_and_group_parse(rootfs: Path) -> None:
    users = {
        f[0]: f for f in (ln.split(":") for ln in (rootfs / "etc/passwd").read_text().splitlines())
    }
    assert users["root"][2:4] == ["0", "0"]
    assert users["root"][5:] == ["/root", "/bin/sh"]
    assert users["nobody"][2] == "65534"
    groups = {
        f[0]: f for f in (ln.split(":") for ln in (rootfs / "etc/group").read_text().splitlines())
    }
    assert all(len(f) == 4 for f in groups.values())
    assert groups["root"][2] == "0"
    assert groups["tty"][2] == "5"
    assert {"nogroup", "users"} <= groups.keys()
    shadow = (rootfs / "etc/shadow").read_text().splitlines()
    assert {ln.split(":")[0] for ln in shadow} == set(users)
    # Docker's busybox users, which Garden's tests expect (operator is uid 37).
    assert users["operator"][2:4] == ["37", "37"]
    assert groups["operator"][2] == "37"


def test_directory_modes(rootfs: Path) -> None:
    assert stat.S_IMODE((rootfs / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((rootfs / "root").stat().st_mode) == 0o700
    for d in ("dev", "proc", "sys", "home", "etc", "var/tmp", "run", "usr/local/bin"):
        assert (rootfs / d).is_dir()
    assert "busybox" in (rootfs / "etc/os-release").read_text()


def test_rebuild_is_noop(rootfs: Path) -> None:
    before = (rootfs.stat().st_ino, (rootfs / VERSION_FILE).stat().st_ino)
    assert build_rootfs(rootfs) == rootfs
    assert (rootfs.stat().st_ino, (rootfs / VERSION_FILE).stat().st_ino) == before
    assert not list(rootfs.parent.glob("rootfs.*"))


def test_stale_version_is_rebuilt(rootfs: Path) -> None:
    old = rootfs.resolve()
    (rootfs / VERSION_FILE).write_text("stale\n")
    (rootfs / "junk").write_text("x")
    build_rootfs(rootfs)
    assert not (rootfs / "junk").exists()
    assert (rootfs / "bin/sh").is_symlink()
    assert not list(rootfs.parent.glob("rootfs.*"))
    assert rootfs.resolve() != old
    assert (old / "junk").read_text() == "x"  # the replaced generation is left as it was
    assert (old / "bin/sh").is_symlink()


def test_dest_is_a_symlink_to_a_generation(rootfs: Path) -> None:
    assert rootfs.is_symlink()
    target = os.readlink(rootfs)
    assert "/" not in target  # relative: the parent directory can move
    assert generations(rootfs) == [rootfs.parent / target]
    assert target.startswith(".rootfs.gen-")


def _stale_rebuild(rootfs: Path) -> Path:
    (rootfs / VERSION_FILE).write_text("stale\n")
    build_rootfs(rootfs)
    return rootfs.resolve()


def test_old_generations_go_two_rebuilds_later(rootfs: Path) -> None:
    first = rootfs.resolve()
    second = _stale_rebuild(rootfs)
    assert generations(rootfs) == sorted([first, second])
    third = _stale_rebuild(rootfs)
    assert generations(rootfs) == sorted([second, third])


@needs_root
def test_a_mounted_generation_is_never_removed(rootfs: Path, tmp_path: Path) -> None:
    lower = rootfs.resolve()
    before = sorted(p.name for p in (lower / "bin").iterdir())
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        assert str(lower) in mounted_lower_dirs()
        for _ in range(3):
            _stale_rebuild(rootfs)
        assert sorted(p.name for p in (merged / "bin").iterdir()) == before
        assert lower in generations(rootfs)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    _stale_rebuild(rootfs)
    assert lower not in generations(rootfs)


def test_plain_directory_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    dest = tmp_path / "rootfs"
    (dest / "bin").mkdir(parents=True)
    (dest / "bin/old-tool").write_text("x")
    build_rootfs(dest)
    assert dest.is_symlink()
    moved = [g for g in generations(dest) if g.name.startswith(".rootfs.gen-moved-")]
    assert len(moved) == 1
    assert (moved[0] / "bin/old-tool").read_text() == "x"
    assert not (dest / "bin/old-tool").exists()


def test_cli_reports_built_then_up_to_date(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "gactor.kernel.busybox", str(tmp_path / "bb")]
    first = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    second = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert first.startswith("busybox rootfs built:")
    assert second.startswith("busybox rootfs up to date:")


@needs_root
def test_chroot_runs_shell(rootfs: Path) -> None:
    assert _chroot(rootfs, "echo hi; id -u").split() == ["hi", "0"]


@needs_root
def test_adduser_in_chroot(rootfs: Path) -> None:
    out = _chroot(
        rootfs,
        "adduser -D alice && addgroup -g 2000 devs && adduser -D -H -u 1500 -G devs bob"
        " && addgroup alice devs && id alice && id bob && ls -ld /home/alice",
    )
    alice, bob, home = out.splitlines()
    assert alice == "uid=1000(alice) gid=1000(alice) groups=1000(alice),2000(devs)"
    assert bob == "uid=1500(bob) gid=2000(devs) groups=2000(devs)"
    assert home.split()[2:4] == ["alice", "alice"]
    assert not (rootfs / "home/bob").exists()
    assert "alice:!:" in (rootfs / "etc/shadow").read_text()


def _elf_interpreter(path: Path) -> str:
    out = subprocess.run(["readelf", "-l", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split("[Requesting program interpreter: ", 1)[1].split("]", 1)[0]


def test_docker_busybox_glibc_layout(rootfs: Path) -> None:
    """As Docker's busybox image: a dynamic busybox, its loader and libraries in /lib (with
    /lib64 -> lib), glibc's NSS modules and libpthread, and getconf."""
    busybox = rootfs / "bin/busybox"
    assert busybox.read_bytes() == GLIBC_BUSYBOX.read_bytes()
    assert _elf_interpreter(busybox) == "/lib64/ld-linux-x86-64.so.2"
    assert os.readlink(rootfs / "lib64") == "lib"
    libs = sorted(p.name for p in (rootfs / "lib").iterdir())
    for name in ("ld-linux-x86-64.so.2", "libc.so.6", "libresolv.so.2", "libnss_files.so.2",
                 "libnss_dns.so.2", "libnss_compat.so.2", "libnss_hesiod.so.2", "libpthread.so.0"):
        assert name in libs
    # Only what the binaries load, plus the NSS modules and libpthread (and what they load).
    assert libs == sorted(p.name for p in libraries([GLIBC_BUSYBOX, Path("/usr/bin/getconf")]))
    assert (rootfs / "bin/getconf").is_file()
    assert "passwd:" in (rootfs / "etc/nsswitch.conf").read_text()


def test_a_static_busybox_needs_no_libraries() -> None:
    assert libraries([Path("/bin/busybox")]) == []  # the host's static one (busybox-static)


def test_another_binary_is_another_version(tmp_path: Path) -> None:
    first = build_rootfs(tmp_path / "a")
    other = build_rootfs(tmp_path / "b", busybox=Path("/bin/busybox"))
    assert (first / VERSION_FILE).read_text() != (other / VERSION_FILE).read_text()
    assert (other / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()


@needs_root
def test_a_path_of_bin_finds_the_applets(rootfs: Path) -> None:
    out = subprocess.run(["/usr/sbin/chroot", str(rootfs), "/bin/sh", "-c",
                          "env | grep ^PATH=; command -v adduser; command -v ifconfig"],
                         check=True, capture_output=True, text=True, timeout=10,
                         env={"PATH": "/bin"}).stdout
    assert out.splitlines() == ["PATH=/bin", "/bin/adduser", "/bin/ifconfig"]


@needs_root
def test_chroot_runs_the_dynamic_busybox_and_getconf(rootfs: Path) -> None:
    out = _chroot(rootfs, "busybox --help | head -1; getconf PAGE_SIZE; id -un")
    first, page, user = out.splitlines()
    assert first.startswith("BusyBox v")
    assert int(page) == os.sysconf("SC_PAGE_SIZE")
    assert user == "root"  # through libc's NSS: nsswitch.conf and libnss_files
