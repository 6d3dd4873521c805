"""Default test rootfs from Debian's static busybox: ``python -m gactor.kernel.busybox DEST``.

``DEST`` is a symlink to the current generation, a sibling ``.<name>.gen-<version>-<id>``
directory that is never modified once built: a rebuild builds a new generation and
switches the symlink atomically (rename), so whatever resolved ``DEST`` before (a server
copying the image, an overlay) keeps a complete tree. ``DEST`` as a plain directory (the
layout before generations) is renamed aside as a generation of its own, never deleted.
Old generations are removed by later rebuilds: never the current one or the one it
replaced, and never one an overlay in this mount namespace has as a lower dir.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .image_copies import mounted_lower_dirs

VERSION_FILE = ".gactor-rootfs-version"
DIRS = {  # mode -> directories
    0o755: "bin sbin usr/bin usr/sbin usr/local/bin dev home etc run var",
    0o555: "proc sys",
    0o1777: "tmp var/tmp",
    0o700: "root",
}
# The users and groups of Docker's busybox image, which Garden's tests (GATS) and images
# built for Garden expect (operator, uid 37, for one).
_USERS = [
    ("root", 0, 0, "root", "/root", "/bin/sh"), ("daemon", 1, 1, "daemon", "/usr/sbin", "/bin/false"),
    ("bin", 2, 2, "bin", "/bin", "/bin/false"), ("sys", 3, 3, "sys", "/dev", "/bin/false"),
    ("sync", 4, 100, "sync", "/bin", "/bin/sync"), ("mail", 8, 8, "mail", "/var/spool/mail", "/bin/false"),
    ("www-data", 33, 33, "www-data", "/var/www", "/bin/false"), ("operator", 37, 37, "Operator", "/var", "/bin/false"),
    ("nobody", 65534, 65534, "nobody", "/nonexistent", "/bin/false"),
]
_GROUPS = [
    ("root", 0), ("daemon", 1), ("bin", 2), ("sys", 3), ("adm", 4), ("tty", 5), ("disk", 6), ("lp", 7),
    ("mail", 8), ("kmem", 9), ("wheel", 10), ("cdrom", 11), ("dialout", 18), ("floppy", 19), ("video", 28),
    ("audio", 29), ("tape", 32), ("www-data", 33), ("operator", 37), ("utmp", 43), ("plugdev", 46),
    ("staff", 50), ("lock", 54), ("netdev", 82), ("users", 100), ("nogroup", 65534),
]
ETC = {
    "passwd": "".join(f"{n}:x:{u}:{g}:{gecos}:{home}:{shell}\n" for n, u, g, gecos, home, shell in _USERS),
    "group": "".join(f"{n}:x:{g}:{'root' if n == 'wheel' else ''}\n" for n, g in _GROUPS),
    "shadow": "".join(f"{n}:*:19000:0:99999:7:::\n" for n, *_ in _USERS),
    "hosts": "",
    "resolv.conf": "",
    "os-release": 'NAME="gactor busybox"\nID=busybox\nPRETTY_NAME="gactor busybox rootfs"\n',
}
# Debian's busybox-static lacks adduser/addgroup, yet Garden tests run `adduser -D alice`: this is
# a busybox-compatible subset (adduser [-DHS] [-h D] [-g GECOS] [-s SH] [-G GRP] [-u UID] USER [GRP]).
ADDUSER = r"""#!/bin/sh
set -e
PATH=/usr/sbin:/usr/bin:/sbin:/bin
me=${0##*/} home= shell=/bin/sh gecos="Linux User,,," group= id= nohome= first=1000
while getopts h:g:s:G:u:k:DHS o; do case $o in
  h) home=$OPTARG;; s) shell=$OPTARG;; G) group=$OPTARG;; u) id=$OPTARG;; H) nohome=1;;
  g) if [ "$me" = addgroup ]; then id=$OPTARG; else gecos=$OPTARG; fi;; S) first=100;;
  D|k) ;; *) echo "usage: $me [-DHS] [-h DIR] [-g GECOS|GID] [-s SHELL] [-G GROUP] [-u UID] NAME [GROUP]" >&2; exit 1;;
esac; done
shift $((OPTIND - 1))
name=${1:?"$me: missing name"}
free_id() { i=$1; while cut -d: -f3 "$2" | grep -qx "$i"; do i=$((i + 1)); done; echo "$i"; }
if [ $# -ge 2 ]; then  # add an existing user to an existing group
  grep -q "^$2:" /etc/group || { echo "$me: unknown group $2" >&2; exit 1; }
  sed -i -e "/^$2:/s/[^:]\$/&,$1/" -e "/^$2:/s/:\$/:$1/" /etc/group; exit 0
fi
if [ "$me" = addgroup ]; then
  grep -q "^$name:" /etc/group && { echo "$me: group '$name' in use" >&2; exit 1; }
  echo "$name:x:${id:-$(free_id "$first" /etc/group)}:" >>/etc/group; exit 0
fi
grep -q "^$name:" /etc/passwd && { echo "$me: user '$name' in use" >&2; exit 1; }
uid=${id:-$(free_id "$first" /etc/passwd)}
if [ -n "$group" ]; then
  gid=$(grep "^$group:" /etc/group | cut -d: -f3)
  [ -n "$gid" ] || { echo "$me: unknown group $group" >&2; exit 1; }
else
  grep -q "^$name:" /etc/group || echo "$name:x:$(free_id "$uid" /etc/group):" >>/etc/group
  gid=$(grep "^$name:" /etc/group | cut -d: -f3)
fi
home=${home:-/home/$name}
echo "$name:x:$uid:$gid:$gecos:$home:$shell" >>/etc/passwd
echo "$name:!:$(($(date +%s) / 86400)):0:99999:7:::" >>/etc/shadow
[ -n "$nohome" ] || { mkdir -p "$home"; chown "$uid:$gid" "$home"; }
"""


def _version(busybox: Path) -> str:
    """Changes with the busybox binary and with this module, so either forces a rebuild."""
    return hashlib.sha256(busybox.read_bytes() + Path(__file__).read_bytes()).hexdigest()


def build_rootfs(dest: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    """Make ``dest`` a busybox rootfs (see the module docstring) and return ``dest``; a
    no-op when its version is current. Killed midway, it leaves a ``.<name>.build-*``
    directory that the next rebuild removes, and ``dest`` as it was."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} missing: apt-get install busybox-static")
    applets = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    if "bin/sh" not in applets:
        raise RuntimeError(f"{busybox} --list-full has no bin/sh: not a usable busybox")
    version = _version(busybox)
    stamp = dest / VERSION_FILE
    if stamp.is_file() and stamp.read_text().strip() == version:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.build-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        _fill(tmp, busybox, applets, version)
        generation = dest.with_name(f".{dest.name}.gen-{version[:12]}-{os.urandom(3).hex()}")
        tmp.rename(generation)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = _current(dest)
    if dest.is_dir() and not dest.is_symlink():
        replaced = dest.with_name(f".{dest.name}.gen-moved-{os.urandom(3).hex()}")
        dest.rename(replaced)  # a directory cannot be replaced by a symlink in one rename
    link = dest.with_name(f".{dest.name}.link-{os.getpid()}-{os.urandom(3).hex()}")
    link.symlink_to(generation.name)
    link.replace(dest)
    _remove_old_generations(dest, keep={generation, replaced})
    return dest


def _fill(tmp: Path, busybox: Path, applets: list[str], version: str) -> None:
    tmp.mkdir()
    for mode, names in DIRS.items():
        for rel in names.split():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            (tmp / rel).chmod(mode)
    tmp.chmod(0o755)
    shutil.copy(busybox, tmp / "bin/busybox")  # keeps the 0755 mode
    for rel in applets:
        if "/" in rel and rel != "bin/busybox":
            (tmp / rel).symlink_to("/bin/busybox")
    for name, text in ETC.items():
        (tmp / "etc" / name).write_text(text)
    (tmp / "etc/shadow").chmod(0o640)
    (tmp / "usr/sbin/adduser").write_text(ADDUSER)
    (tmp / "usr/sbin/adduser").chmod(0o755)
    (tmp / "usr/sbin/addgroup").symlink_to("adduser")
    (tmp / VERSION_FILE).write_text(version + "\n")


def _current(dest: Path) -> Path | None:
    """The generation ``dest`` points to, if it is a symlink."""
    return dest.parent / os.readlink(dest) if dest.is_symlink() else None


def generations(dest: Path) -> list[Path]:
    """Every generation directory of ``dest``, and half-built ones, sorted by name."""
    return sorted(p for p in dest.parent.glob(f".{dest.name}.*")
                  if p.name.startswith((f".{dest.name}.gen-", f".{dest.name}.build-")))


def _remove_old_generations(dest: Path, keep: set[Path | None]) -> None:
    mounted = mounted_lower_dirs()
    for old in generations(dest):
        if old in keep or any(m == str(old) or m.startswith(f"{old}/") for m in mounted):
            continue
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gactor.kernel.busybox DEST", file=sys.stderr)
        return 2
    dest = Path(argv[0]).absolute()
    before = os.path.realpath(dest) if dest.exists() else None
    build_rootfs(dest)
    print(f"busybox rootfs {'up to date' if os.path.realpath(dest) == before else 'built'}: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
