"""Unpack one layer tar (stdin) into a directory, as a separate process chrooted into it.

Run as ``python -I -S unpack.py TARGET``; the parent (``layers.unpack``) feeds the blob on
stdin while it checks its digest, and reads one JSON line (the summary, or ``{"error"}``)
from stdout. This file imports nothing but the standard library (and, for a zstd layer
only, ``zstandard`` from the directory the parent names), so it starts in tens of
milliseconds and never imports the server. Decompression (gzip, bzip2, xz by tarfile,
zstd by zstandard's stream reader) happens here, in the confined process, as the blob
streams in.

Why a process of its own, chrooted: Python's ``tarfile`` resolves every path it writes
through the host's file system, so a member written through a symlink the same tar made
earlier (``evil -> /etc``, then ``evil/passwd``) lands outside the target. After
``chroot(TARGET)`` every path, absolute or with ``..``, resolves inside it; the checks
below then refuse such members outright, so a bad tar fails with its member named instead
of producing a surprising tree:

- names and hard-link targets are normalised (a leading ``/`` dropped) and refused if
  they contain ``..``; a member whose parent is a symlink is refused;
- device nodes are skipped (counted in ``skipped_devices``) except the char 0:0 that is an
  overlay whiteout; FIFOs are kept;
- ``.wh.NAME`` becomes an overlay whiteout (char 0:0) for NAME and ``.wh..wh..opq`` marks
  its directory opaque (``trusted.overlay.opaque=y``), as the OCI layer spec asks;
- owners are kept as numbers, the mode after the owner (so setuid/setgid survive the
  chown), and xattrs from PAX ``SCHILY.xattr.*`` records, except ``trusted.overlay.*``
  (a layer must not forge overlay metadata).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
import tarfile
from typing import Any, BinaryIO, cast

WHITEOUT = ".wh."
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame's first bytes (RFC 8878)
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
CHUNK = 1 << 20


class LayerError(Exception):
    pass


def clean_name(name: str, what: str) -> str:
    """``name`` relative to the root, or LayerError if it has a ``..`` component."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {name!r} points outside the layer")
    return "/".join(parts)


def _check_parents(path: str, made: set[str]) -> None:
    """Refuse a path whose existing parents include a symlink; create missing parents
    (added to ``made``)."""
    current = "/"
    for part in path.split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            made.add(current)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise LayerError(f"member {path!r} goes through the symlink {current!r}")
        if not stat.S_ISDIR(st.st_mode):
            raise LayerError(f"member {path!r} goes through the non-directory {current!r}")


def _remove(path: str, keep_dir: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        os.unlink(path)


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    found = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            found.append((key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            found.append((key[len("LIBARCHIVE.xattr."):], base64.b64decode(value + "==")))
    return [(k, v) for k, v in found if not k.startswith("trusted.overlay.")]


def _attrs(path: str, member: tarfile.TarInfo) -> None:
    os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)  # after the chown, which clears setuid/setgid
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)  # a symlink's own times too
    for key, value in _xattrs(member):
        os.setxattr(path, key, value, follow_symlinks=False)


def extract(tar: tarfile.TarFile, lowers: list[int] | None = None) -> dict[str, int]:
    """Extract every member below ``/`` (the chrooted target); return a summary.
    ``lowers``: directory fds of the layers below, top first (``inherit``)."""
    summary = {"entries": 0, "bytes": 0, "skipped_devices": 0, "whiteouts": 0, "implicit_dirs": 0,
               "inherited_dirs": 0}
    dir_times: list[tuple[str, float]] = []
    made: set[str] = set()  # parents created for members, not listed in the tar (yet)
    for member in tar:
        name = clean_name(member.name, "member")
        if not name:
            continue
        path = "/" + name
        base = os.path.basename(name)
        _check_parents(path, made)
        made.discard(path)  # listed after all, as whatever it is
        if base == OPAQUE:
            os.setxattr(os.path.dirname(path), OPAQUE_XATTR, b"y")
            summary["whiteouts"] += 1
            continue
        if base.startswith(WHITEOUT):
            hidden = os.path.join(os.path.dirname(path), base[len(WHITEOUT):])
            _remove(hidden, keep_dir=False)
            os.mknod(hidden, stat.S_IFCHR | 0o000, 0)
            summary["whiteouts"] += 1
            continue
        if member.ischr() or member.isblk():
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                _remove(path, keep_dir=False)
                os.mknod(path, stat.S_IFCHR, 0)
                summary["whiteouts"] += 1
            else:
                summary["skipped_devices"] += 1
            continue
        _remove(path, keep_dir=member.isdir())
        if member.isdir():
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            dir_times.append((path, member.mtime))
        elif member.isreg():
            source = tar.extractfile(member)
            assert source is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
            summary["bytes"] += member.size
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = "/" + clean_name(member.linkname, "hard link target")
            st = os.lstat(target)  # FileNotFoundError: names no earlier member
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"hard link {name!r} to the directory {target!r}")
            os.link(target, path, follow_symlinks=False)
            summary["entries"] += 1
            continue  # the attributes are the target's
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise LayerError(f"member {name!r} has an unknown type {member.type!r}")
        _attrs(path, member)
        summary["entries"] += 1
    for path, mtime in reversed(dir_times):  # after their contents changed them
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    implicit = sorted(p for p in made if _real_dir(p))
    summary["implicit_dirs"] = len(implicit)
    summary["inherited_dirs"] = inherit(implicit, lowers or [])
    return summary


def _real_dir(path: str) -> bool:
    """Whether ``path`` and each of its parents is a directory (no symlink on the way)."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def _opaque(path_or_fd: str | int) -> bool:
    try:
        return os.getxattr(path_or_fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _lower_dir(lowers: list[int], rel: str) -> int | None:
    """An fd of the directory ``rel`` as the layers ``lowers`` (top first) show it once
    stacked: the upper-most layer's, unless a whiteout, a non-directory or an opaque
    directory above hides it; None if they show none. Every component is opened with
    O_NOFOLLOW below the layer's fd: nothing outside the lower layers is looked at."""
    parts = rel.strip("/").split("/")
    for layer in lowers:
        current = os.dup(layer)
        hidden_below = False  # an opaque directory on the way, in this layer
        try:
            for part in parts:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                except FileNotFoundError:
                    break  # not in this layer: the next one down, unless opaque hides it
                except OSError:  # a whiteout, a file or a symlink: the path is hidden
                    return None
                os.close(current)
                current = nxt
                hidden_below = hidden_below or _opaque(current)
            else:
                found, current = current, -1
                return found
            if hidden_below:
                return None
        finally:
            if current >= 0:
                os.close(current)
    return None


def inherit(implicit: list[str], lowers: list[int]) -> int:
    """Give each directory the layer needed but did not list the mode, owner, times and
    xattrs the lower layers show for it, as an unpacker working on the stacked parents
    (umoci, containerd) leaves them: being the upper-most copy, this layer's directory is
    what the overlay shows. Directories below an opaque one of this layer keep their
    defaults (root, 0755). Returns how many were given lower attributes."""
    done = 0
    for path in implicit:
        ancestors = ["/".join(path.split("/")[:i]) for i in range(2, path.count("/") + 1)]
        if any(_opaque(a) for a in ancestors):
            continue
        fd = _lower_dir(lowers, path)
        if fd is None:
            continue
        try:
            st = os.fstat(fd)
            xattrs = [(k, os.getxattr(fd, k)) for k in os.listxattr(fd) if not k.startswith("trusted.overlay.")]
        finally:
            os.close(fd)
        os.lchown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))  # a directory, checked above: nothing to follow
        for key, value in xattrs:
            os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        done += 1
    return done


class _Prefixed:
    """A stream of ``head`` (bytes already read), then the rest of ``rest``."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n < 0:
            data, self._head = self._head + self._rest.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data


def _zstandard(path: str) -> Any:
    """The ``zstandard`` module, from ``path`` (the server's site-packages: this process
    runs without site)."""
    if not path:
        raise LayerError("a zstd layer, and no zstandard module to read it")
    sys.path.insert(0, path)
    import zstandard  # noqa: PLC0415 - only zstd layers need it

    return zstandard


def main(argv: list[str]) -> int:
    target = argv[1]
    zstd_path = argv[2] if len(argv) > 2 else ""
    # The layers below, top first: opened before the chroot, looked into only through
    # these fds (inherit).
    lowers = [os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for p in argv[3:]]
    stdin = os.fdopen(sys.stdin.fileno(), "rb", buffering=CHUNK, closefd=False)
    codec_errors: tuple[type[Exception], ...] = ()
    try:
        # tarfile reads gzip, bzip2 and xz itself; a zstd blob (its first bytes say so,
        # whatever its media type) is decoded as it streams, frames one after another.
        # Both import their decompressors here, before the chroot.
        head = stdin.read(len(ZSTD_MAGIC))
        stream = cast(BinaryIO, _Prefixed(head, stdin))  # read() is all tarfile and zstandard call
        if head.startswith(ZSTD_MAGIC):
            zstandard = _zstandard(zstd_path)
            codec_errors = (zstandard.ZstdError,)
            reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True, closefd=False)
            tar = tarfile.open(fileobj=reader, mode="r|")
        else:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        os.chroot(target)
        os.chdir("/")
        os.umask(0)
        summary = extract(tar, lowers)
        stdin.read()  # the rest (tar padding): the parent hashes every byte
    except (LayerError, OSError, tarfile.TarError, EOFError, ValueError) as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    except codec_errors as err:
        print(json.dumps({"error": f"bad zstd data: {err}"}), flush=True)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
