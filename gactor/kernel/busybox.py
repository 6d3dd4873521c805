"""Default test rootfs from Debian's static busybox: ``python -m gactor.kernel.busybox DEST``."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION_FILE = ".gactor-rootfs-version"
DIRS = {  # mode -> directories
    0o755: "bin sbin usr/bin usr/sbin usr/local/bin dev home etc run var",
    0o555: "proc sys",
    0o1777: "tmp var/tmp",
    0o700: "root",
}
ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "group": "root:x:0:\ntty:x:5:\nusers:x:100:\nnogroup:x:65534:\n",
    "shadow": "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
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
    """Build (or reuse) a busybox rootfs at ``dest`` and return ``dest``."""
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
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for mode, names in DIRS.items():
        for rel in names.split():
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            (tmp / rel).chmod(mode)
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
    old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    if dest.exists() or dest.is_symlink():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gactor.kernel.busybox DEST", file=sys.stderr)
        return 2
    dest = Path(argv[0]).absolute()
    stamp = dest / VERSION_FILE
    before = stamp.stat().st_ino if stamp.exists() else None
    build_rootfs(dest)
    print(f"busybox rootfs {'up to date' if stamp.stat().st_ino == before else 'built'}: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
