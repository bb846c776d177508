"""Filesystem primitives: reflink, link strategy, durable writes, dir-fd path resolution.

Everything that writes into a project goes through a directory file descriptor opened with
``O_NOFOLLOW`` from the project root, so a symlink planted (or swapped in by a race) inside the
project can never redirect a write outside it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import _faults
from ._errors import UnsafePath

if TYPE_CHECKING:
    from ._threads import Pool

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h

# errnos that mean "this filesystem (pair) can't do that"; anything else is a real error.
NOT_SUPPORTED = frozenset(
    {
        errno.EXDEV,
        errno.EOPNOTSUPP,
        errno.ENOTSUP,
        errno.EINVAL,
        errno.ENOTTY,
        errno.ENOSYS,
        errno.EPERM,
        errno.EMLINK,
    }
)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

KeepFn = Callable[[bytes], bool]


class LinkMode(str, enum.Enum):
    """How file content gets into the object store (and back out on restore)."""

    AUTO = "auto"
    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"


def stat_changed(a: os.stat_result, b: os.stat_result) -> bool:
    """Did the file behind two stats of it change in between (content, inode or metadata)?"""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) != (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )


def reflink_fd(src_fd: int, dst_fd: int) -> None:
    """Share src's extents with dst (copy-on-write). Raises OSError on unsupported filesystems."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        import ctypes  # on first use

        # The process's own symbols, libc's among them. Not ctypes.util.find_library: importing
        # it (it pulls in subprocess) and asking cost ~4.5 ms, a restore's worth of renames.
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.sync_file_range.argtypes = [
            ctypes.c_int,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_uint,
        ]
    return _libc


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a file range to disk without waiting (``sync_file_range``).

    Not a durability guarantee by itself: it spreads the write-out of a long download over its
    lifetime, so the fdatasync before the final rename has little left to wait for.
    """
    try:
        _c().sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the fdatasync does it all
        pass


def syncfs(fd: int) -> None:
    """Flush every dirty page and inode of the filesystem holding ``fd``.

    One syncfs after writing many objects is far cheaper than an fsync per object and gives the
    same guarantee for what came before it.
    """
    _faults.hit("fsync", fd=fd)
    if _c().syncfs(fd) != 0:  # pragma: no cover - syncfs only fails on EBADF
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# Up to this many files, fsync each one; beyond it one syncfs is cheaper. syncfs also flushes
# other programs' dirty data on that filesystem, so small changes must not pay for it.
FSYNC_EACH_MAX = 64


def make_durable(
    files: list[str | bytes], dirs: list[str | bytes], fs_fd: int, *, each: bool = False
) -> None:
    """Make the content of ``files`` and the entries of ``dirs`` durable, cheapest way first.
    ``each``: fsync them one by one, never ``syncfs`` on ``fs_fd`` (for files that may live on
    another file system)."""
    if not each and len(files) + len(dirs) > FSYNC_EACH_MAX:
        syncfs(fs_fd)
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        except OSError as exc:
            named(exc, f)
            raise
        finally:
            os.close(fd)
    for d in dirs:
        fsync_dir(d)


def named(exc: OSError, path: str | bytes | os.PathLike[str]) -> OSError:
    """``exc`` with ``path`` as its filename if it had none: an error from a call on a file
    descriptor (write, fsync, ioctl...) names no file, and the user must be told which."""
    if exc.filename is None:
        exc.filename = os.fsdecode(os.fspath(path))
    return exc


def fsync_dir(path: str | bytes | os.PathLike[str]) -> None:
    """fsync a directory, so renames and creations inside it survive power loss."""
    fd = os.open(path, DIR_FLAGS)
    try:
        os.fsync(fd)
    except OSError as exc:
        named(exc, path)
        raise
    finally:
        os.close(fd)


def write_file_atomic(path: str | bytes | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the whole new file."""
    path = os.fsencode(os.fspath(path))
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, b".tmp-" + name + b"-" + str(os.getpid()).encode())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            named(exc, path)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    # fsync the directory after the rename, or the rename may not survive power loss.
    fsync_dir(directory or b".")


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quiet(path: str | bytes) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_tree(path: str | bytes | os.PathLike[str]) -> None:
    """Remove a directory of snapfs's own (staging, a batch's temp dir) and all it holds, quietly.

    Usually it is empty or absent, so one ``rmdir`` does: ``shutil`` is imported only when
    there is something inside (importing it costs every command ~4 ms, for bz2 and lzma).
    A symlink is never followed (``rmtree`` refuses one), as before."""
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # not empty, or not a directory: rmtree decides
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def split_relpath(relpath: bytes) -> list[bytes]:
    """Split a project-relative POSIX path, refusing anything that could leave the root."""
    if not relpath or relpath.startswith(b"/"):
        raise UnsafePath(f"Refusing path {os.fsdecode(relpath)!r}: it must be project-relative.")
    parts = relpath.split(b"/")
    for part in parts:
        if part in (b"", b".", b"..") or b"\0" in part:
            raise UnsafePath(f"Refusing path {os.fsdecode(relpath)!r}: it would leave the project.")
    return parts


@contextmanager
def open_parent(
    root_fd: int, relpath: bytes, *, create: bool = False
) -> Iterator[tuple[int, bytes]]:
    """Yield (fd of the parent directory, final name) of ``relpath`` under ``root_fd``.

    Each component is opened with O_NOFOLLOW, so a symlink anywhere on the way fails with ELOOP
    or ENOTDIR instead of being followed out of the project. With ``create``, missing parent
    directories are made (mode 0o755, adjusted later by the caller's plan).
    """
    parts = split_relpath(relpath)
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(
                        f"Refusing to follow {os.fsdecode(part)!r} in {os.fsdecode(relpath)!r}:"
                        " it is not a real directory inside the project."
                    ) from exc
                raise
            os.close(fd)
            fd = nfd
        yield fd, parts[-1]
    finally:
        os.close(fd)


def remove_entry(
    dir_fd: int,
    name: bytes,
    keep: KeepFn | None = None,
    relpath: bytes = b"",
    pool: Pool | None = None,
) -> bool:
    """Remove ``name`` (file, symlink or whole directory) inside ``dir_fd`` without following links.

    ``keep(relpath)`` protects paths (ignored files) from deletion; a directory that still holds a
    kept path is left in place. Returns True if the entry is gone. With a ``pool``, a directory's
    files are unlinked by its threads (see ``_TreeRemover``).
    """
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode):
        if keep is not None and keep(relpath):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    if keep is not None and keep(relpath + b"/"):
        return False
    if pool is not None:
        return _TreeRemover(pool, keep).remove(dir_fd, name, st, relpath)
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    emptied = True
    try:
        # A read-only directory can't have entries removed: open it up first.
        if not st.st_mode & stat.S_IWUSR:
            os.chmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
        for child in os.listdir(fd):
            childb = os.fsencode(child)
            emptied &= remove_entry(fd, childb, keep, relpath + b"/" + childb)
    finally:
        os.close(fd)
    if emptied:
        os.rmdir(name, dir_fd=dir_fd)
    return emptied


class _Frame:
    """A directory being removed: its fd, where it sits, and whether it can go."""

    __slots__ = ("fd", "parent_fd", "name", "relpath", "emptied", "subdirs", "up", "depth")

    def __init__(self, fd: int, parent_fd: int, name: bytes, relpath: bytes, up: _Frame | None):
        self.fd, self.parent_fd, self.name, self.relpath, self.up = fd, parent_fd, name, relpath, up
        self.emptied = True
        self.subdirs: list[bytes] = []
        self.depth: int = 0 if up is None else up.depth + 1


class _TreeRemover:
    """Remove a directory tree with a thread pool doing the unlinks.

    An unlink costs this kind of disk ~0.1 ms of journal work, most of it waiting, so a few at
    once go several times faster. The walk stays in the calling thread, depth first through
    ``O_NOFOLLOW`` directory fds; files are queued as (dir fd, name) and unlinked in batches;
    each finished directory is removed after the batch holding its files, children before
    parents. At most ``MAX_OPEN`` finished directories keep their fds before a batch runs.
    """

    BATCH = 512
    MAX_OPEN = 64
    CHUNK = 64  # unlinks per task

    def __init__(self, pool: Pool, keep: KeepFn | None) -> None:
        self.pool, self.keep = pool, keep
        self.files: list[tuple[int, bytes]] = []
        self.finished: list[_Frame] = []  # post-order: children before parents

    def remove(self, dir_fd: int, name: bytes, st: os.stat_result, relpath: bytes) -> bool:
        top = self._enter(dir_fd, name, st.st_mode, relpath, None)
        stack = [top]
        try:
            while stack:
                frame = stack[-1]
                if frame.subdirs:
                    child = frame.subdirs.pop()
                    sub = self._enter_child(frame, child)
                    if sub is not None:
                        stack.append(sub)
                    continue
                stack.pop()
                if not frame.emptied and frame.up is not None:
                    frame.up.emptied = False
                self.finished.append(frame)
                if len(self.finished) >= self.MAX_OPEN or len(self.files) >= self.BATCH:
                    self._flush()
            self._flush()
        finally:
            for frame in stack + self.finished:
                os.close(frame.fd)
        return top.emptied

    def _enter_child(self, parent: _Frame, name: bytes) -> _Frame | None:
        try:
            st = os.lstat(name, dir_fd=parent.fd)
        except FileNotFoundError:
            return None
        relpath = parent.relpath + b"/" + name
        if not stat.S_ISDIR(st.st_mode):  # replaced since it was listed
            if self.keep is not None and self.keep(relpath):
                parent.emptied = False
            else:
                self.files.append((parent.fd, name))
            return None
        if self.keep is not None and self.keep(relpath + b"/"):
            parent.emptied = False
            return None
        return self._enter(parent.fd, name, st.st_mode, relpath, parent)

    def _enter(
        self, parent_fd: int, name: bytes, mode: int, relpath: bytes, up: _Frame | None
    ) -> _Frame:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        frame = _Frame(fd, parent_fd, name, relpath, up)
        try:
            if not mode & stat.S_IWUSR:  # a read-only directory can't have entries removed
                os.chmod(fd, stat.S_IMODE(mode) | stat.S_IRWXU)
            with os.scandir(fd) as it:
                for entry in it:
                    child = os.fsencode(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        frame.subdirs.append(child)
                    elif self.keep is not None and self.keep(relpath + b"/" + child):
                        frame.emptied = False
                    else:
                        self.files.append((fd, child))
        except BaseException:
            os.close(fd)
            raise
        return frame

    def _flush(self) -> None:
        files, self.files = self.files, []
        chunks = [files[i : i + self.CHUNK] for i in range(0, len(files), self.CHUNK)]
        if len(chunks) > 1:
            for _ in self.pool.map(_unlink_all, chunks):
                pass
        elif chunks:
            _unlink_all(chunks[0])
        finished, self.finished = self.finished, []
        # Deepest first; directories at one depth are never each other's ancestors, so each
        # depth's are removed at once.
        levels: dict[int, list[_Frame]] = {}
        for frame in finished:
            levels.setdefault(frame.depth, []).append(frame)
        try:
            for depth in sorted(levels, reverse=True):
                frames = levels[depth]
                for frame in frames:
                    os.close(frame.fd)
                    frame.fd = -1
                gone = [f for f in frames if f.emptied]
                if len(gone) > 1:
                    for _ in self.pool.map(_rmdir, gone):
                        pass
                elif gone:
                    _rmdir(gone[0])
        finally:
            self.finished = [f for f in finished if f.fd >= 0]


def _rmdir(frame: _Frame) -> None:
    os.rmdir(frame.name, dir_fd=frame.parent_fd)


def _unlink_all(files: list[tuple[int, bytes]]) -> None:
    for dir_fd, name in files:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
