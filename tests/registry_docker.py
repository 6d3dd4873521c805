"""A real registry for tests, and real tools to check gactor's images against.

``DockerRegistry(base).start()`` runs Debian's ``docker-registry`` (distribution 2.8)
with a config of its own, written here: it listens on 127.0.0.1 (a free port) only,
stores in ``base`` and has no auth, no debug server, no notifications. Its package's
default config listens on every interface: it is never used (scripts/setup.sh masks the
package's service). ``push`` feeds it an OCI layout with ``skopeo copy``; ``stop`` ends
it by pid. The small Python registry (``registry_server.py``) stays for what this one
cannot be made to do: auth challenges, faults, held and resumed downloads.

``umoci_unpack`` (umoci's own unpacker, as root: owners applied) is the oracle for a
rootfs, and ``tree`` describes a rootfs as a comparable map, owners mapped through a
container's uid/gid maps when given, for a test to compare gactor's overlay with it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

START_TIMEOUT = 15.0
TOOL_TIMEOUT = 120.0

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(*cmd: str) -> str:
    """Run skopeo/umoci; its stdout, or AssertionError with its stderr."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr.strip()}"
    return result.stdout


def skopeo(*args: str) -> str:
    # --insecure-policy: the images are the tests' own (no /etc/containers/policy.json needed).
    return tool("skopeo", "--insecure-policy", *args)


@dataclass
class DockerRegistry:
    base: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DockerRegistry:
        storage = os.path.join(self.base, "storage")
        os.makedirs(storage, exist_ok=True)
        for _ in range(5):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            config = os.path.join(self.base, "config.yml")
            with open(config, "w") as f:
                f.write(CONFIG.format(storage=storage, port=self.port, secret=secrets.token_hex(16)))
            # REGISTRY_* variables would override the config file: none reach it.
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with open(os.path.join(self.base, "registry.log"), "ab") as log:
                self.proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=log,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            if self._wait_ready():
                return self
            self.stop()
        raise AssertionError(f"docker-registry did not start: {self.log_text()[-2000:]}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        return False

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.base, "registry.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def push(self, layout: str, tag: str, repo: str, dest_tag: str = "", *args: str) -> str:
        """``skopeo copy oci:LAYOUT:TAG docker://HOST/REPO:DEST_TAG``; returns the
        ``docker://`` URI gactor names it by."""
        dest_tag = dest_tag or tag
        skopeo("copy", "--dest-tls-verify=false", *args, f"oci:{layout}:{tag}",
               f"docker://{self.host}/{repo}:{dest_tag}")
        return f"docker://{self.host}/{repo}#{dest_tag}"


def umoci_unpack(layout: str, tag: str, bundle: str) -> str:
    """``umoci unpack`` (as root, owners applied) of LAYOUT:TAG; returns its rootfs."""
    tool("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    return os.path.join(bundle, "rootfs")


def pull_layout(registry_uri: str, layout: str, tag: str) -> None:
    """``skopeo copy docker://... oci:LAYOUT:TAG``: the registry's image, as it serves it."""
    host, _, rest = registry_uri.removeprefix("docker://").partition("/")
    repo, _, ref = rest.partition("#")
    skopeo("copy", "--src-tls-verify=false", f"docker://{host}/{repo}:{ref or 'latest'}", f"oci:{layout}:{tag}")


# ---- comparing trees -------------------------------------------------------------------


@dataclass(frozen=True)
class IdMap:
    """A /proc/PID/{uid,gid}_map: (inside, outside, count) ranges; empty = identity."""

    ranges: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of(cls, pid: int, which: str) -> IdMap:
        with open(f"/proc/{pid}/{which}_map") as f:
            return cls(tuple(tuple(int(x) for x in line.split()) for line in f if line.strip()))  # type: ignore[misc]

    def outside(self, inside: int) -> int:
        if not self.ranges:
            return inside
        for start, out, count in self.ranges:
            if start <= inside < start + count:
                return out + inside - start
        return 65534  # unmapped: the overflow id


@dataclass(frozen=True)
class Node:
    kind: str  # dir, file, symlink, fifo, char, block, socket
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    content: str  # a file's sha256, a symlink's target, a device's numbers
    mtime: int  # seconds (a directory's: 0, see tree)
    nlink: int  # hard links (a directory's: 0)
    xattrs: tuple[tuple[str, bytes], ...] = field(default=())


KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
         stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFSOCK: "socket"}


def tree(root: str, *, uids: IdMap = IdMap(), gids: IdMap = IdMap(), skip: Sequence[str] = ()) -> dict[str, Node]:
    """Every path below ``root`` (relative, "/"-rooted) but ``skip`` and what is under
    them: kind, mode, owner (mapped to the outside through ``uids``/``gids``: how the
    host sees an image's owners in a container with those maps), content, mtime, links and the
    ``user.``/``security.capability`` xattrs. Directory mtimes are left out (0): an
    overlay shows the upper-most layer's directory, whose mtime the container's own
    writes and a layer's implicitly created parents change."""
    found: dict[str, Node] = {}
    skipped = {p.rstrip("/") or "/" for p in skip}
    for top, dirs, files in os.walk(root):
        rel_top = "/" + os.path.relpath(top, root).removeprefix(".").lstrip("/")
        dirs[:] = [d for d in dirs if os.path.join(rel_top, d) not in skipped]
        for name in dirs + files:
            rel = os.path.join(rel_top, name)
            if rel in skipped:
                continue
            path = os.path.join(top, name)
            st = os.lstat(path)
            kind = KINDS[stat.S_IFMT(st.st_mode)]
            content = ""
            if kind == "file":
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
            elif kind == "symlink":
                content = os.readlink(path)
            elif kind in ("char", "block"):
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            xattrs = []
            if kind != "symlink":
                for key in sorted(os.listxattr(path, follow_symlinks=False)):
                    if key.startswith("user.") or key == "security.capability":
                        xattrs.append((key, os.getxattr(path, key, follow_symlinks=False)))
            found[rel] = Node(kind, stat.S_IMODE(st.st_mode), uids.outside(st.st_uid), gids.outside(st.st_gid),
                               content, 0 if kind == "dir" else int(st.st_mtime), 0 if kind == "dir" else st.st_nlink,
                               tuple(xattrs))
    return found


def differences(expected: dict[str, Node], got: dict[str, Node]) -> list[str]:
    """What differs, one line per path: missing, extra, or each differing field."""
    lines = []
    for path in sorted(expected.keys() | got.keys()):
        a, b = expected.get(path), got.get(path)
        if a is None:
            lines.append(f"{path}: not in the oracle's tree ({b})")
        elif b is None:
            lines.append(f"{path}: missing ({a})")
        elif a != b:
            fields = [f"{k} {getattr(a, k)!r} != {getattr(b, k)!r}" for k in a.__dataclass_fields__
                      if getattr(a, k) != getattr(b, k)]
            lines.append(f"{path}: {', '.join(fields)}")
    return lines
