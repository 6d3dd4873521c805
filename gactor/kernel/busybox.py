"""Default rootfs, laid out as Docker's busybox image: ``python -m gactor.kernel.busybox DEST``.

Docker's ``busybox`` (its default, glibc variant, which Garden's tests were written against)
is a dynamically linked busybox in /bin, Debian's ``getconf``, and in /lib the glibc
libraries they load plus glibc's NSS modules and libpthread (/lib64 a symlink to lib), with
buildroot's /etc/passwd, group and shadow. This builds the same from Debian's dynamic
``busybox`` package (not installable next to busybox-static: scripts/setup.sh extracts it
to ``GLIBC_BUSYBOX``'s tree) and this host's glibc. As in Docker's image every applet is in
/bin (symlinks to /bin/busybox; Docker's are hard links), and /usr/bin/env links to /bin/env;
so a PATH of /bin alone finds them all, which matters as this build's sh does not run
applets without a PATH lookup (Debian's static one does). The host's static /bin/busybox
stays the server's tar for StreamIn/StreamOut.

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
# Debian's dynamic busybox, extracted (dpkg-deb -x) from the package of the same version as
# the installed busybox-static by scripts/setup.sh (which honours the same variable).
GLIBC_BUSYBOX = Path(os.environ.get("GACTOR_BUSYBOX_GLIBC_DIR", "/var/lib/gactor/busybox-glibc"), "bin/busybox")
GETCONF = Path("/usr/bin/getconf")
# What Docker's image adds to the binaries' own libraries: glibc's NSS modules (glibc
# resolves names through them even in a static binary) and libpthread.
_EXTRA_LIBS = ("libnss_compat.so.2", "libnss_dns.so.2", "libnss_files.so.2", "libnss_hesiod.so.2",
               "libpthread.so.0")
DIRS = {  # mode -> directories
    0o755: "bin sbin lib usr/bin usr/sbin usr/local/bin dev home etc run var",
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
    # Debian's default, which Docker's image copies from its Debian build stage.
    "nsswitch.conf": "".join(f"{db + ':':<15} {src}\n" for db, src in (
        ("passwd", "files"), ("group", "files"), ("shadow", "files"), ("gshadow", "files"),
        ("hosts", "files dns"), ("networks", "files"), ("protocols", "db files"),
        ("services", "db files"), ("ethers", "db files"), ("rpc", "db files"), ("netgroup", "nis"))),
}
# Debian's busybox builds lack adduser/addgroup, yet Garden tests run `adduser -D alice`: this is
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


def libraries(binaries: list[Path]) -> list[Path]:
    """The shared libraries ``binaries`` load (their interpreter included), found by
    ``ldd`` as Docker's image build does, plus ``_EXTRA_LIBS`` and what those load; empty
    for static binaries. Resolved paths, in the order found."""
    found: dict[str, Path] = {}
    todo = list(binaries)
    extras_added = False
    while todo:
        binary = todo.pop(0)
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            if "not a dynamic executable" in out.stdout + out.stderr and binary in binaries:
                continue  # a static binary loads nothing
            raise RuntimeError(f"ldd {binary}: {(out.stderr or out.stdout).strip()}")
        for line in out.stdout.splitlines():
            fields = line.split()
            path = fields[2] if len(fields) > 2 and fields[1] == "=>" else fields[0] if fields else ""
            if path.startswith("/") and os.path.basename(path) not in found:
                found[os.path.basename(path)] = Path(os.path.realpath(path))
                todo.append(found[os.path.basename(path)])
        if not todo and not extras_added and "libc.so.6" in found:
            extras_added = True
            libdir = found["libc.so.6"].parent
            for name in _EXTRA_LIBS:
                if name not in found and (libdir / name).is_file():
                    found[name] = libdir / name
                    todo.append(libdir / name)
    return list(found.values())


def _inputs(busybox: Path) -> list[tuple[str, Path]]:
    """(path in the rootfs, host file) of every binary and library the rootfs carries."""
    binaries = [busybox] + ([GETCONF] if GETCONF.is_file() else [])
    return ([("bin/busybox", busybox)] + [(f"bin/{b.name}", b) for b in binaries[1:]]
            + [(f"lib/{lib.name}", lib) for lib in libraries(binaries)])


def _version(inputs: list[tuple[str, Path]]) -> str:
    """Changes with any binary or library copied in and with this module, so any of them
    forces a rebuild."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for rel, host in inputs:
        digest.update(rel.encode() + b"\0" + host.read_bytes())
    return digest.hexdigest()


def build_rootfs(dest: Path, busybox: Path = GLIBC_BUSYBOX) -> Path:
    """Make ``dest`` a busybox rootfs (see the module docstring) and return ``dest``; a
    no-op when its version is current. Killed midway, it leaves a ``.<name>.build-*``
    directory that the next rebuild removes, and ``dest`` as it was."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} missing: scripts/setup.sh extracts Debian's busybox "
                                f"package there (apt-get download busybox; dpkg-deb -x)")
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    if "sh" not in applets:
        raise RuntimeError(f"{busybox} --list has no sh: not a usable busybox")
    inputs = _inputs(busybox)
    version = _version(inputs)
    stamp = dest / VERSION_FILE
    if stamp.is_file() and stamp.read_text().strip() == version:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.build-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        _fill(tmp, inputs, applets, version)
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


def _fill(tmp: Path, inputs: list[tuple[str, Path]], applets: list[str], version: str) -> None:
    tmp.mkdir()
    for mode, names in DIRS.items():
        for rel in names.split():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            (tmp / rel).chmod(mode)
    tmp.chmod(0o755)
    (tmp / "lib64").symlink_to("lib")  # the interpreter is /lib64/ld-linux-x86-64.so.2
    for rel, host in inputs:
        shutil.copy(host, tmp / rel)  # keeps the mode
    for name in applets:
        if "/" not in name and not os.path.lexists(tmp / "bin" / name):
            (tmp / "bin" / name).symlink_to("/bin/busybox")
    (tmp / "usr/bin/env").symlink_to("../../bin/env")
    for name, text in ETC.items():
        (tmp / "etc" / name).write_text(text)
    (tmp / "etc/shadow").chmod(0o640)
    (tmp / "bin/adduser").write_text(ADDUSER)
    (tmp / "bin/adduser").chmod(0o755)
    (tmp / "bin/addgroup").symlink_to("adduser")
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
