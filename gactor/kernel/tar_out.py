"""StreamOut's tar writer, run inside the container as the stream's user; it keeps xattrs.

Started as ``tar_in`` is (see there): forked from the shim into the container's
namespaces, confined, as the user, in the directory holding the path; ``main`` runs where
another process would ``execve``. It writes what ``tar --xattrs --xattrs-include='*' -cf -
NAME`` writes there (Garden's StreamOut): NAME and, for a directory, everything below it,
depth first, symlinks not followed, hard links as links to the first name, in POSIX pax
format with each readable xattr as a ``SCHILY.xattr.*`` record (``trusted.*`` only where
the user may read them, as for GNU tar). Owners are numbers, with the names the
container's ``/etc/passwd`` and ``/etc/group`` give them.

A member that cannot be read (permission, vanished meanwhile) is a warning on stderr and
the exit status becomes 2 at the end, as in GNU tar; NAME itself missing fails at once,
with no output. File data goes from the file to stdout with ``splice`` (1 MiB reads where
that is refused), so memory stays bounded whatever the sizes; what is held grows only with
the depth of the tree and the number of files with several hard links.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile

import setproctitle

from . import linux as L

CHUNK = 1 << 20  # bytes per read where splice is refused
EXIT_FAILURE = 2
RECORD = 20 * tarfile.BLOCKSIZE  # archives end on a whole record, as tar writes them
_TYPES = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
          stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


def _names(path: str) -> dict[int, str]:
    """id -> name from a passwd or group file of the container ({} when there is none)."""
    found: dict[int, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                row = line.split(":")
                if len(row) >= 3 and row[2].isdigit():
                    found.setdefault(int(row[2]), row[0])
    except OSError:
        pass
    return found


class Archive:
    """Members written to ``out`` one by one; ``failed`` once any could not be read."""

    def __init__(self, out: int) -> None:
        self.out = out
        self.written = 0
        self.failed = False
        self.links: dict[tuple[int, int], str] = {}  # (dev, ino) of multiply-linked files
        self.users = _names("/etc/passwd")
        self.groups = _names("/etc/group")
        self._splice = True
        self.top = ""

    def add_tree(self, top: str) -> None:
        """``top`` and everything below it, depth first, each directory's entries by name;
        OSError if ``top`` itself cannot be read."""
        self.top = top
        pending = [top]  # what is left to write: the siblings along the current path
        while pending:
            path = pending.pop()
            try:
                st = os.lstat(path)
            except OSError as err:
                if path == top:
                    raise
                self.warn(path, err)
                continue
            if not self.add(path, st) or not stat.S_ISDIR(st.st_mode):
                continue
            try:
                names = os.listdir(path)
            except OSError as err:
                self.warn(path, err)
                continue
            pending.extend(f"{path}/{name}" for name in sorted(names, reverse=True))

    def add(self, path: str, st: os.stat_result) -> bool:
        """One member (not what is below it); False if it was skipped."""
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            _warn(f"{path}: socket ignored")
            return False
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = kind, stat.S_IMODE(st.st_mode), int(st.st_mtime)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname, info.gname = self.users.get(st.st_uid, ""), self.groups.get(st.st_gid, "")
        try:
            info.pax_headers = self.xattrs(path)
            if kind == tarfile.SYMTYPE:
                info.linkname = os.readlink(path)
            elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif kind == tarfile.REGTYPE and st.st_nlink > 1:
                first = self.links.setdefault((st.st_dev, st.st_ino), path)
                if first != path:
                    info.type, info.linkname = tarfile.LNKTYPE, first
            if info.type != tarfile.REGTYPE:
                self.emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
                return True
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if path == self.top:
                raise
            self.warn(path, err)
            return False
        try:
            info.size = os.fstat(fd).st_size
            self.emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            self.copy(fd, info.size, path)
        finally:
            os.close(fd)
        return True

    def xattrs(self, path: str) -> dict[str, str]:
        records = {}
        for key in os.listxattr(path, follow_symlinks=False):
            try:
                value = os.getxattr(path, key, follow_symlinks=False)
            except OSError as err:
                if err.errno not in (errno.ENODATA, errno.EPERM, errno.EACCES):
                    raise
                continue  # gone meanwhile, or not the user's to read
            records[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
        return records

    def copy(self, fd: int, size: int, path: str) -> None:
        """``size`` bytes of ``fd`` and the padding to a whole block; a file that shrank
        meanwhile is padded with zeros (the header is out already), as GNU tar does."""
        left = size
        if left and self._splice:
            moved, self._splice = L.splice_up_to(fd, self.out, left)
            left -= moved
            self.written += moved
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                break
            self.emit(data)
            left -= len(data)
        if left:
            _warn(f"{path}: file shrank by {left} bytes; padding with zeros")
            self.failed = True
            while left:
                self.emit(bytes(min(left, CHUNK)))
                left -= min(left, CHUNK)
        self.emit(bytes(-size % tarfile.BLOCKSIZE))

    def finish(self) -> None:
        self.emit(bytes(2 * tarfile.BLOCKSIZE))
        self.emit(bytes(-self.written % RECORD))

    def emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.out, view):]
        self.written += len(data)

    def warn(self, path: str, err: OSError) -> None:
        _warn(f"{path}: cannot read: {os.strerror(err.errno or 0)}")
        self.failed = True


def _warn(message: str) -> None:
    data = memoryview(f"tar: {message}\n".encode(errors="surrogateescape"))
    while data:
        data = data[os.write(2, data):]


def main(args: list[str]) -> int:
    """Archive ``args[-1]`` (relative to the working directory) to stdout; the exit status.
    Called in the forked process instead of ``execve`` (see ``tar_in.main``)."""
    os.closerange(3, 1 << 20)
    setproctitle.setproctitle("tar -c")
    L.set_process_name("tar")
    name = args[-1] if args else "."
    archive = Archive(1)
    try:
        archive.add_tree(name)
        archive.finish()
    except OSError as err:
        if err.errno == errno.EPIPE:
            return EXIT_FAILURE  # the reader went away
        _warn(f"{name}: {os.strerror(err.errno or 0)}")
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - nothing above this frame can report it any more
        _warn(f"internal error: {type(err).__name__}: {err}")
        return EXIT_FAILURE
    return EXIT_FAILURE if archive.failed else 0
