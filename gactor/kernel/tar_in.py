"""StreamIn's tar extractor, run inside the container as the stream's user; it keeps xattrs.

The shim starts it like any process of the container (``spawn.py``): a helper joins the
container's cgroup and namespaces, the process becomes the user under the container's
seccomp filter and capabilities and changes into the destination, and then, where another
process would ``execve``, it calls ``main`` instead. So every path it writes resolves in
the container's mount namespace, with the user's permissions: a symlink to ``/etc`` is the
container's ``/etc``. The code must be imported in the shim before the fork (the
container's file system has none of the server's files); the shim does that on the first
StreamIn of the container (``spawn.spawn``).

It does what ``tar --no-same-owner --xattrs --xattrs-include='*' -xf -`` does there (as
Garden runs it), with the member parsing of the image layer unpacker
(``images/unpack.py``: names, PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` records):

- files belong to the user (``--no-same-owner``); modes are kept whole, setuid, setgid and
  sticky bits included, as busybox tar kept them (GNU tar with ``--no-same-permissions``
  would drop them and apply the umask);
- every xattr is set: ``user.*`` always works on what the user made; ``security.*`` and
  ``trusted.*`` where the user's capabilities in the container's user namespace allow
  (an unprivileged container's root may set ``security.capability``, the kernel stores
  it namespaced; nobody there may set ``trusted.*``); one that may not be set is a
  warning on stderr, as in GNU tar, never a failure; ``trusted.overlay.*`` is dropped;
- names with ``..`` are refused, a leading ``/`` is dropped; a member (or hard link
  target) that goes through a symlink the same archive made pointing out of the tree
  (absolute, or with ``..``) is refused, as GNU tar defers such symlinks to the end;
  symlinks that were already there are followed;
- device nodes are made only where the container may (else the extraction fails, as
  GNU tar's does); directories' modes and times are set once their contents are in.

Memory stays bounded: members are not kept (only the directories, for their modes, and
the names of the symlinks made), and file data goes from stdin to the file with
``splice`` (or 1 MiB reads where the file system cannot splice). Errors go to stderr as
``tar: ...`` and the exit status is 2; a killed extraction leaves what it wrote.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
import sys
import tarfile
from types import ModuleType
from typing import TYPE_CHECKING

import setproctitle

from . import linux as L


def _layer_unpacker() -> ModuleType:
    """``images/unpack.py``, loaded on its own: it is stdlib-only, made to run without its
    package (``layers`` runs it as a script), and the package would cost every shim that
    streams about 28 ms and 3 MiB more (it imports the image store)."""
    name = f"{__package__}.images.unpack"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(f"{__name__}._unpack",
                                                  os.path.join(os.path.dirname(__file__), "images", "unpack.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from .images.unpack import CHUNK, LayerError, _xattrs, clean_name
else:
    _unpack = _layer_unpacker()
    CHUNK, LayerError, _xattrs, clean_name = _unpack.CHUNK, _unpack.LayerError, _unpack._xattrs, _unpack.clean_name

EXIT_FAILURE = 2  # GNU tar's status for a fatal error
_ATTR_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


class _Input:
    """stdin as the forward-only file tarfile reads headers from (``tell`` and forward
    ``seek`` are all it needs), which can also hand a member's data straight to a file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._pos = 0  # bytes of the stream consumed
        self._splice = True

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            data = os.read(self._fd, max(CHUNK, size - len(self._buf)))
            if not data:
                break
            self._buf += data
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._pos += n
        return out

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise OSError(errno.ESPIPE, "the archive is a stream: it cannot be read backwards")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, CHUNK)):
                raise tarfile.ReadError("unexpected end of data")
        return self._pos

    def copy_to(self, out: int, size: int) -> None:
        """The next ``size`` bytes of the stream, written to ``out``."""
        left = size
        if self._buf:
            n = min(left, len(self._buf))
            _write_all(out, memoryview(self._buf)[:n])
            del self._buf[:n]
            left -= n
        if left and self._splice:
            moved, self._splice = L.splice_up_to(self._fd, out, left)
            left -= moved
            if left and self._splice:
                raise tarfile.ReadError("unexpected end of data")
        while left:
            data = os.read(self._fd, min(left, CHUNK))
            if not data:
                raise tarfile.ReadError("unexpected end of data")
            _write_all(out, data)
            left -= len(data)
        self._pos += size


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Extraction:
    """One archive extracted into the working directory; ``warnings`` go to ``warn``."""

    def __init__(self, tar: tarfile.TarFile, source: _Input) -> None:
        self.tar = tar
        self.source = source
        self.made_links: set[str] = set()  # symlinks out of the tree this archive made
        self.dirs: list[tuple[str, int, int]] = []  # path, mode, mtime: set once filled

    def run(self) -> None:
        while (member := self.tar.next()) is not None:
            self.tar.members.clear()  # type: ignore[attr-defined]  # else tarfile keeps every member
            try:
                self.member(member)
            except OSError as err:
                raise LayerError(f"{member.name}: {os.strerror(err.errno or 0)}") from None
        for path, mode, mtime in reversed(self.dirs):  # after their contents changed them
            self.attrs(path, mode, mtime, is_dir=True)

    def member(self, member: tarfile.TarInfo) -> None:
        name = clean_name(member.name, "member")
        path = name or "."
        self.check_through(name, "member")
        if name and "/" in name:
            os.makedirs(os.path.dirname(name), 0o755, exist_ok=True)
        if member.isdir():
            self.directory(path, name, member)
        elif member.isreg():
            self.make_room(path, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if member.sparse is not None:
                    data = self.tar.extractfile(member)
                    assert data is not None
                    while chunk := data.read(CHUNK):
                        _write_all(fd, chunk)
                else:
                    self.source.copy_to(fd, member.size)
                self.xattrs(fd, path, member)
                os.fchmod(fd, member.mode & 0o7777)  # after the xattrs: setuid stays
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)
        elif member.issym():
            self.make_room(path, name)
            os.symlink(member.linkname, path)
            if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
                self.made_links.add(name)  # GNU tar defers exactly these
            self.xattrs(path, path, member)
        elif member.islnk():
            target = clean_name(member.linkname, "hard link target")
            self.check_through(target, "hard link target")
            self.make_room(path, name)
            os.link(target or ".", path, follow_symlinks=False)  # the attributes are the target's
        elif member.ischr() or member.isblk() or member.isfifo():
            self.make_room(path, name)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            try:
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            except OSError as err:
                raise LayerError(f"{name}: cannot create the node: {os.strerror(err.errno or 0)}") from None
            self.attrs(path, member.mode, member.mtime, is_dir=False)
        else:
            warn(f"{name}: skipped: unsupported member type {member.type!r}")

    def directory(self, path: str, name: str, member: tarfile.TarInfo) -> None:
        if (os.path.lexists(path) and not os.path.isdir(path)) or name in self.made_links:
            self.make_room(path, name)
        if not os.path.isdir(path):
            os.mkdir(path, 0o700)  # its own mode once its contents are in: it may forbid writing
        self.xattrs(path, path, member)
        self.dirs.append((path, member.mode, int(member.mtime)))

    def check_through(self, name: str, what: str) -> None:
        """Refuse a name below a symlink out of the tree this archive made (``evil -> /etc``,
        then ``evil/x``): within the container it would be allowed, but it is never meant."""
        if not self.made_links:
            return
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self.made_links:
                raise LayerError(f"{what} {name!r} goes through the symlink {parent!r} the archive made")

    def make_room(self, path: str, name: str) -> None:
        """Remove what is at ``path`` (an empty directory at most) so a member can take it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)  # one with contents is an error, as in GNU tar
        else:
            os.unlink(path)
        self.made_links.discard(name)

    def xattrs(self, target: int | str, path: str, member: tarfile.TarInfo) -> None:
        for key, value in _xattrs(member):
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as err:
                if err.errno not in _ATTR_REFUSED:
                    raise
                warn(f"{path}: cannot set the extended attribute {key!r}: {os.strerror(err.errno or 0)}")

    def attrs(self, path: str, mode: int, mtime: float, is_dir: bool) -> None:
        """Mode and times; a directory that was already there and is not the user's keeps
        its own, with a warning (GNU tar would fail the whole stream for it)."""
        try:
            os.chmod(path, mode & 0o7777)
            os.utime(path, (mtime, mtime))
        except OSError as err:
            if not is_dir or err.errno not in _ATTR_REFUSED:
                raise
            warn(f"{path}: cannot set its mode and time: {os.strerror(err.errno or 0)}")


def warn(message: str) -> None:
    _write_all(2, f"tar: {message}\n".encode(errors="surrogateescape"))


def main(args: list[str]) -> int:
    """Extract the tar on stdin into the working directory (``args``, tar's, are not
    read); the exit status. Called in
    the forked process instead of ``execve``: it first closes every fd the shim had (the
    spawn error pipe among them, which tells the shim the process started)."""
    os.closerange(3, 1 << 20)
    setproctitle.setproctitle("tar -x")
    L.set_process_name("tar")
    source = _Input(0)
    try:
        tar = tarfile.TarFile(fileobj=source, mode="r")  # type: ignore[arg-type]  # it only reads
        Extraction(tar, source).run()
        while source.read(CHUNK):  # the rest (the end blocks' padding): the sender must not see EPIPE
            pass
    except (LayerError, OSError, tarfile.TarError, EOFError, ValueError) as err:
        warn(_describe(err))
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - nothing above this frame can report it any more
        warn(f"internal error: {type(err).__name__}: {err}")
        return EXIT_FAILURE
    return 0


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError):
        return os.strerror(err.errno or 0) if err.filename is None else f"{err.filename}: {err.strerror}"
    if isinstance(err, tarfile.TarError):
        return f"not a valid tar archive: {err}"
    return str(err) or type(err).__name__
