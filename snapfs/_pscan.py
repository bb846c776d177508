"""Helper processes that check unchanged subtrees while the walker lists the rest.

A full walk must lstat every entry of the project, and in Python that work is bound to one
core: threads contend for the interpreter lock on each entry. A walk with directory records
(see ``_index``) mostly asks one question per directory: does it still match its record, so
that its tree can be reused unread? That question needs nothing but the records, the ignore
rules and the file system, so a forked copy of the walker can answer it for part of the tree
while the walker itself lists the rest.

The answer for a delegated subtree is all or nothing: either every directory in it matches its
record by exactly the test ``scan`` applies (so the subtree's recorded tree stands), or the
walker lists that subtree itself, as if there had been no helper. A helper only reads: it opens
directories with ``O_NOFOLLOW`` below the project's own descriptor, lists and lstats them, and
writes one message to a pipe. A helper that fails, is killed or answers nonsense costs only
the time it took; its subtrees are then walked the ordinary way.
"""

from __future__ import annotations

import errno
import marshal
import os
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

from ._errors import SnapfsError
from ._fsops import DIR_FLAGS, open_parent
from ._index import DirIndex, DirRecord

_IFMT = 0o170000
_IFDIR = stat.S_IFDIR
_IFREG = stat.S_IFREG
_IFLNK = stat.S_IFLNK

MIN_DIRS = 256  # below this many recorded directories a fork costs more than it saves
# A subtree larger than this share of the tree is split into its subdirectories, so that one
# change costs the walker a re-walk of a small subtree, and the shares come out even.
SPLIT_SHARE = 0.05

# (relpath, the directory's own stat as (ino, dev, ctime_ns, mtime_ns, size, mode), files,
#  bytes, directories verified, skipped (path, reason)) for a subtree that matched, or
# (relpath, None) for one that did not.
Verdict = tuple[bytes, Any]


def procs_available() -> int:
    """How many processes a walk may use here: 1 where helpers are unsafe or pointless."""
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        # fork() copies only the calling thread; with others running, a lock one of them held
        # stays held in the child forever. Helpers are for single-threaded callers (the CLI).
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover
        cpus = os.cpu_count() or 1
    return max(1, cpus)


def plan(dirs: DirIndex, procs: int) -> list[list[bytes]]:
    """Subtrees for ``procs - 1`` helpers, sized by their recorded directories.

    Returns one list of subtree roots per helper (the walker keeps the rest). Empty when the
    tree is too small to be worth it.
    """
    if procs < 2 or len(dirs) < MIN_DIRS:
        return []
    # Sizes bottom-up. A folder without a record (racy when last snapshotted: the project's
    # root often is, after any change at the top) still links its recorded subfolders in.
    size: dict[bytes, int] = {}
    by_depth: dict[int, list[bytes]] = {}
    for rel in dirs:
        if rel:
            size[rel] = 1
            by_depth.setdefault(rel.count(b"/"), []).append(rel)
    children: dict[bytes, list[bytes]] = {}
    for depth in range(max(by_depth, default=-1), -1, -1):
        for rel in by_depth.get(depth, ()):
            parent = rel.rpartition(b"/")[0]
            children.setdefault(parent, []).append(rel)
            if parent:
                if parent not in size:
                    size[parent] = 0
                    by_depth.setdefault(depth - 1, []).append(parent)
                size[parent] += size[rel]
    total = len(dirs)
    limit = max(1, int(total * SPLIT_SHARE))
    roots: list[bytes] = []
    todo = list(children.get(b"", []))
    while todo:
        rel = todo.pop()
        kids = children.get(rel)
        if kids and (size[rel] > limit or rel not in dirs):
            todo.extend(kids)  # the walker lists this one; its subdirectories are shared out
        else:  # (an unrecorded folder is only ever an ancestor, so it always has kids)
            roots.append(rel)
    # Largest first, each to the least loaded; the walker (bin 0) also lists every directory
    # above the roots, so it takes its share last.
    bins: list[list[bytes]] = [[] for _ in range(procs)]
    load = [0] * procs
    load[0] = total - sum(size[r] for r in roots)
    for rel in sorted(roots, key=lambda r: size[r], reverse=True):
        i = load.index(min(load))
        bins[i].append(rel)
        load[i] += size[rel]
    return [b for b in bins[1:] if b]


class Helper:
    """One forked helper checking ``roots``; ``verdicts()`` collects its answer."""

    def __init__(self, pid: int, fd: int, roots: list[bytes]) -> None:
        self.pid, self.fd, self.roots = pid, fd, roots

    def verdicts(self) -> dict[bytes, Any]:
        """{root: verdict or None}; every root the helper did not vouch for maps to None."""
        chunks = []
        try:
            while True:
                data = os.read(self.fd, 1 << 20)
                if not data:
                    break
                chunks.append(data)
        except OSError:
            chunks = []
        finally:
            os.close(self.fd)
            _reap(self.pid)
        out: dict[bytes, Any] = dict.fromkeys(self.roots)
        try:
            answer = marshal.loads(b"".join(chunks)) if chunks else []
        except (EOFError, ValueError, TypeError):
            return out
        for item in answer if isinstance(answer, list) else []:
            if isinstance(item, tuple) and len(item) == 2 and item[0] in out:
                out[item[0]] = item[1]
        return out

    def abandon(self) -> None:
        """The walk failed: don't wait for an answer nobody will read."""
        try:
            os.kill(self.pid, 9)
        except OSError:  # pragma: no cover - already gone
            pass
        try:
            os.close(self.fd)
        except OSError:  # already answered (its verdicts were read)
            pass
        _reap(self.pid)


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - retried by Python since 3.5
            continue


def start(
    root_fd: int,
    shares: list[list[bytes]],
    check: Callable[[int, bytes], Verdict],
) -> list[Helper]:
    """Fork one helper per share. ``check(root_fd, rel)`` runs in the helper for each root."""
    helpers: list[Helper] = []
    for roots in shares:
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            break  # fewer helpers: the walker lists what they would have checked
        if pid == 0:  # the helper: answer, then leave without running any of the parent's
            code = 0  # cleanup (atexit, finalizers, buffered output belong to the walker)
            try:
                os.close(r)
                out = marshal.dumps([check(root_fd, rel) for rel in roots])
                view = memoryview(out)
                while view:
                    view = view[os.write(w, view) :]
            except BaseException:  # noqa: BLE001 - whatever happens, the walker decides alone
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        helpers.append(Helper(pid, r, roots))
    return helpers


def check_subtree(
    root_fd: int,
    rel: bytes,
    dirs: DirIndex,
    ignore: Callable[[bytes], bool],
    check_ignore: bool,
    files_key: Callable[[list[int]], bytes],
    state_dir: str,
) -> Verdict:
    """Does every directory of the subtree at ``rel`` still match its record?

    The test is ``scan``'s for a directory whose tree it reuses: its own stat equals its
    record, the (dev, ino, size, mtime, ctime) of its files in listing order give the record's
    digest (so every file still matches its stat cache entry), and each subdirectory, stat'ed
    as listed and again once opened, passes in turn. The same entries are left out as there:
    the state directory and what the ignore rules exclude.
    """
    try:
        with open_parent(root_fd, rel) as (pfd, name):
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    except (OSError, SnapfsError):  # gone, or a symlink on the way now: the walker will see
        return rel, None
    try:
        dst = os.fstat(fd)
        totals = [0, 0]
        verified: list[bytes] = []
        skipped: list[tuple[str, str]] = []
        if not _check_dir(fd, rel, dst, dirs, ignore, check_ignore, files_key, state_dir,
                          totals, verified, skipped):  # fmt: skip
            return rel, None
    except OSError:
        return rel, None
    finally:
        os.close(fd)
    return rel, (stat_key(dst), totals[0], totals[1], verified, skipped)


def _check_dir(
    fd: int,
    rel: bytes,
    dst: os.stat_result,
    dirs: DirIndex,
    ignore: Callable[[bytes], bool],
    check_ignore: bool,
    files_key: Callable[[list[int]], bytes],
    state_dir: str,
    totals: list[int],
    verified: list[bytes],
    skipped: list[tuple[str, str]],
) -> bool:
    e = dirs.get(rel)
    if e is None or not e[7] or not record_matches(e, dst):
        return False
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    prefix = rel + b"/"
    keys: list[int] = []
    size = 0
    subdirs: list[tuple[str, os.stat_result]] = []
    with os.scandir(fd) as it:
        for de in it:
            sname = de.name
            if sname == state_dir:
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            fmt = st.st_mode & _IFMT
            if fmt == _IFREG:
                if check_ignore and ignore(prefix + sname.encode(fs_encoding, fs_errors)):
                    continue
                keys += (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                size += st.st_size
                continue
            relpath = prefix + sname.encode(fs_encoding, fs_errors)
            if fmt == _IFDIR:
                if check_ignore and ignore(relpath + b"/"):
                    continue
                subdirs.append((sname, st))
                continue
            if check_ignore and ignore(relpath):
                continue
            if fmt != _IFLNK:
                skipped.append((os.fsdecode(relpath), "not a regular file"))
    if files_key(keys) != e[7]:
        return False
    totals[0] += len(keys) // 5
    totals[1] += size
    verified.append(rel)
    for sname, listed in subdirs:
        try:
            cfd = os.open(sname, DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return False
            raise
        try:
            cst = os.fstat(cfd)
            if stat_key(listed) != stat_key(cst):
                return False
            child = prefix + sname.encode(fs_encoding, fs_errors)
            if not _check_dir(cfd, child, cst, dirs, ignore, check_ignore, files_key,
                              state_dir, totals, verified, skipped):  # fmt: skip
                return False
        finally:
            os.close(cfd)
    return True


def record_matches(e: DirRecord, st: os.stat_result) -> bool:
    """The folder's stat is the one its record was made from (fields by index: hot)."""
    return (
        e[1] == st.st_ino
        and e[4] == st.st_ctime_ns
        and e[3] == st.st_mtime_ns
        and e[2] == st.st_size
        and e[0] == st.st_dev
    )


def stat_key(s: os.stat_result) -> tuple[int, int, int, int, int, int]:
    """What must not differ between two stats of one unchanged directory; a helper sends its
    directories' stats in this form."""
    return (s.st_ino, s.st_dev, s.st_ctime_ns, s.st_mtime_ns, s.st_size, s.st_mode)
