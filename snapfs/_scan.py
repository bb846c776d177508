"""Walking a project tree into tree objects, reusing the stat cache so unchanged files aren't read.

The walk goes through directory file descriptors opened with ``O_NOFOLLOW``: a directory swapped
for a symlink mid-walk is never followed out of the project. Files that need hashing are opened by
the walker (so the inode hashed is the inode listed) and handed to a small thread pool.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

from ._errors import ProjectPathError, SnapfsError, from_oserror
from ._fsops import DIR_FLAGS, READ_FLAGS, stat_changed
from ._hashing import Oid, hash_bytes, hash_fd, read_all
from ._ignore import STATE_DIR
from ._index import CacheEntry
from ._objects import IngestBatch, Ingested
from ._threads import executor
from ._tree import Entry, Kind, decode, encode, tree_oid

# Timestamps within this distance of the scan's start may share a clock tick with a write we
# haven't seen (the "racy clean" problem): such cache entries are re-hashed next time.
_IFMT = 0o170000
_IFDIR = stat.S_IFDIR
RACY_NS = 20_000_000
RACY_COARSE_NS = 2_000_000_000  # filesystems with whole-second timestamps
MAX_OPEN = 128  # files opened by the walker and not yet hashed


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report from a long operation. ``total`` is None when unknown."""

    phase: str
    done: int
    total: int | None = None
    path: str | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class Hint:
    """A change journal's proven account since tree ``base``: only ``dirty_dirs`` can differ.

    Directories in ``new_dirs`` appeared meanwhile and are walked in full (a journal can miss
    events in a directory created faster than it could be watched). Every other directory
    outside the dirty ones is taken from ``base`` without being read.
    """

    base: Oid
    load: Callable[[Oid], bytes | None]
    dirty_dirs: frozenset[bytes]
    new_dirs: frozenset[bytes]
    everything: bool = False  # no journal: read every directory, but compare with the base

    def descend_set(self) -> set[bytes]:
        """Every directory that must be listed: the dirty and new ones and their ancestors."""
        out: set[bytes] = set()
        for d in self.dirty_dirs | self.new_dirs:
            while d not in out:
                out.add(d)
                if not d:
                    break
                d = d.rpartition(b"/")[0]
        return out

    def is_new(self, rel: bytes) -> bool:
        while rel:
            if rel in self.new_dirs:
                return True
            rel = rel.rpartition(b"/")[0]
        return False


def no_progress(_: Progress) -> None:
    pass


@dataclass
class ScanResult:
    root: Oid
    trees: dict[Oid, bytes]
    files: int = 0
    nbytes: int = 0
    stored: int = 0
    hashed: int = 0
    cache_updates: list[tuple[bytes, CacheEntry]] = field(default_factory=list)
    cache_deletes: list[bytes] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _Pending:
    """A file whose oid is being computed."""

    __slots__ = ("name", "relpath", "mode", "st", "future", "cached")

    def __init__(
        self,
        name: bytes,
        relpath: bytes,
        mode: int,
        st: os.stat_result,
        future: Future[Ingested],
        cached: CacheEntry | None,
    ) -> None:
        self.name = name
        self.relpath = relpath
        self.mode = mode
        self.st = st
        self.future = future
        self.cached = cached

    def logical_mode(self, got: Ingested) -> int:
        """The mode to record. A sealed hardlink is read-only on disk but keeps its own mode."""
        c = self.cached
        if (
            c is not None
            and c.ino == got.st.st_ino
            and c.oid == got.oid
            and self.mode == c.mode & ~0o222
        ):
            return c.mode
        return self.mode


class _Frame:
    __slots__ = ("fd", "relpath", "subdirs", "i")

    def __init__(self, fd: int, relpath: bytes, subdirs: list[tuple[bytes, int]]) -> None:
        self.fd = fd
        self.relpath = relpath
        self.subdirs = subdirs
        self.i = 0


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def unread_oid(relpath: bytes) -> Oid:
    """A placeholder for content that was not read; never the digest of real content."""
    return hash_bytes(b"\0snapfs:unread\0" + relpath)


def _cache_entry(st: os.stat_result, mode: int, oid: Oid, racy: bool) -> CacheEntry:
    return CacheEntry(
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode, oid, racy
    )


def is_racy(st: os.stat_result, start_ns: int) -> bool:
    latest = max(st.st_mtime_ns, st.st_ctime_ns)
    margin = RACY_COARSE_NS if st.st_mtime_ns % 1_000_000_000 == 0 else RACY_NS
    return latest >= start_ns - margin


def scan(
    root: Path,
    *,
    ignore: Callable[[bytes], bool],
    cache: dict[bytes, CacheEntry],
    batch: IngestBatch | None,
    workers: int = 4,
    inline_max: int = 1 << 20,
    progress: ProgressFn = no_progress,
    hint: Hint | None = None,
    lazy_new: bool = False,
    lazy_added: bool = False,
) -> ScanResult:
    """Build the tree objects for ``root``. With ``batch`` new content is stored, else only hashed.

    Files smaller than ``inline_max`` are read and hashed by the walker itself; larger ones go
    to a pool of ``workers`` threads. With a ``hint`` from a change journal, only the directories
    it names are read; the rest of the tree is taken from the hint's base tree. With
    ``lazy_new`` (never when storing), files inside the hint's new directories are not read at
    all: they get a placeholder oid. Comparing with the base only needs their names there.
    ``lazy_added`` goes further for a rollback to the base: no file absent from the base is read.
    """
    descend = hint.descend_set() if hint is not None else set()
    if hint is not None and not hint.everything and b"" not in descend:
        return ScanResult(root=hint.base, trees={})  # nothing happened anywhere
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except NotADirectoryError:
        raise ProjectPathError(f"{root} is not a directory.") from None
    except OSError as exc:
        raise from_oserror(exc, "Reading the project", root) from exc
    start_ns = time.time_ns()
    check_ignore = bool(ignore)  # an Ignore with no rules is falsy: skip a call per file
    # dir relpath -> its entries (complete Entry, a _Pending file, or a subdir placeholder)
    listing: dict[bytes, list[Entry | _Pending | tuple[bytes, int]]] = {}
    postorder: list[bytes] = []
    pool: ThreadPoolExecutor | None = None
    gate = threading.BoundedSemaphore(MAX_OPEN)
    result = ScanResult(root=b"", trees={})
    seen: set[bytes] = set()
    fsencode = os.fsencode
    seen_add = seen.add
    FILE = Kind.FILE
    counter = 0
    listed: set[bytes] = set()
    base_of: dict[bytes, Oid] = {b"": hint.base} if hint is not None else {}

    def base_entries(rel: bytes) -> dict[bytes, Entry]:
        oid = base_of.get(rel)
        if hint is None or oid is None or hint.is_new(rel):
            return {}
        data = hint.load(oid)
        return {e.name: e for e in decode(data)} if data is not None else {}

    def work(fd: int, st: os.stat_result, link_src: tuple[int, bytes] | None) -> Ingested:
        try:
            if batch is not None:
                return batch.ingest(fd, st, link_src)
            oid, size = hash_fd(fd)
            return Ingested(oid, size, 0, st, stat_changed(st, os.fstat(fd)))
        finally:
            os.close(fd)
            if link_src is not None:
                os.close(link_src[0])
            gate.release()

    def list_dir(fd: int, rel: bytes) -> list[tuple[bytes, int]]:
        nonlocal pool, counter
        items: list[Entry | _Pending | tuple[bytes, int]] = []
        subdirs: list[tuple[bytes, int]] = []
        try:
            it = os.scandir(fd)
        except OSError as exc:
            raise from_oserror(exc, "Reading the project", root / os.fsdecode(rel)) from exc
        prefix = rel + b"/" if rel else b""
        get_cached = cache.get
        listed.add(rel)
        base = base_entries(rel) if hint is not None else {}
        unread = lazy_new and hint is not None and hint.is_new(rel)
        with it:
            for de in it:
                name = fsencode(de.name)
                if name == STATE_DIR:
                    continue  # snapfs state (this project's or a nested one's) is never snapshotted
                relpath = prefix + name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and stat: not part of this snapshot
                m = st.st_mode
                if m & _IFMT == _IFDIR:
                    if check_ignore and ignore(relpath + b"/"):
                        continue
                    if hint is not None:
                        old = base.get(name)
                        if old is not None and old.kind == Kind.DIR:
                            if (
                                not hint.everything
                                and relpath not in descend
                                and not hint.is_new(relpath)
                            ):
                                # Untouched since the base: reuse its subtree unread.
                                items.append(Entry(name, Kind.DIR, stat.S_IMODE(m), 0, old.oid))
                                continue
                            base_of[relpath] = old.oid
                    subdirs.append((name, stat.S_IMODE(m)))
                    items.append((name, stat.S_IMODE(m)))
                    continue
                if check_ignore and ignore(relpath):
                    continue
                if stat.S_ISLNK(m):
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    items.append(Entry(name, Kind.LINK, stat.S_IMODE(m), 0, b"", target))
                    continue
                if not stat.S_ISREG(m):
                    result.skipped.append((os.fsdecode(relpath), "not a regular file"))
                    continue
                counter += 1
                if counter % 2048 == 0:
                    progress(Progress("scan", counter, None, os.fsdecode(relpath)))
                seen_add(relpath)
                result.files += 1
                result.nbytes += st.st_size
                if unread or (lazy_added and hint is not None and name not in base):
                    # Placeholder content: new since the base (the whole directory, or with
                    # lazy_added this file), so only its name matters to the caller.
                    items.append(
                        Entry(name, FILE, stat.S_IMODE(m), st.st_size, unread_oid(relpath))
                    )
                    continue
                c = get_cached(relpath)
                if (
                    c is not None
                    and c[1] == st.st_ino  # fields by index: this is the hottest loop
                    and c[3] == st.st_mtime_ns
                    and c[4] == st.st_ctime_ns
                    and c[2] == st.st_size
                    and c[0] == st.st_dev
                    and not c[7]
                ):
                    items.append(Entry(name, FILE, c[5], c[2], c[6]))
                    continue
                try:
                    ffd = os.open(name, READ_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP):
                        result.files -= 1
                        result.nbytes -= st.st_size
                        seen.discard(relpath)
                        continue  # vanished or replaced by a symlink: gone for this snapshot
                    raise from_oserror(
                        exc, "Reading the project", root / os.fsdecode(relpath)
                    ) from exc
                if st.st_size < inline_max:
                    # Small files are cheaper to handle right here than to hand to a thread.
                    try:
                        data = read_all(ffd)
                        after = os.fstat(ffd)
                    finally:
                        os.close(ffd)
                    oid = hash_bytes(data)
                    if batch is not None:
                        batch.add_small(oid, data)
                    result.hashed += 1
                    result.nbytes += len(data) - st.st_size  # it may have changed since listed
                    mode = stat.S_IMODE(m)
                    items.append(Entry(name, FILE, mode, len(data), oid))
                    racy = (
                        stat_changed(st, after)
                        or len(data) != st.st_size
                        or is_racy(after, start_ns)
                    )
                    result.cache_updates.append((relpath, _cache_entry(after, mode, oid, racy)))
                    continue
                gate.acquire()
                if pool is None:
                    pool = executor(max_workers=workers, thread_name_prefix="snapfs-scan")
                # Hardlinking needs the name; the walker's dir fd closes before the job runs.
                link_src = (
                    (os.dup(fd), name) if batch is not None and batch.may_hardlink(st) else None
                )
                fut = pool.submit(work, ffd, st, link_src)
                items.append(_Pending(name, relpath, stat.S_IMODE(m), st, fut, c))
        listing[rel] = items
        return subdirs

    stack: list[_Frame] = []
    try:
        stack.append(_Frame(root_fd, b"", list_dir(root_fd, b"")))
        while stack:
            top = stack[-1]
            if top.i < len(top.subdirs):
                name, _mode = top.subdirs[top.i]
                top.i += 1
                child = _join(top.relpath, name)
                try:
                    cfd = os.open(name, DIR_FLAGS, dir_fd=top.fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        listing[top.relpath] = [
                            x
                            for x in listing[top.relpath]
                            if not (isinstance(x, tuple) and x[0] == name)
                        ]
                        continue  # vanished or swapped for a symlink mid-walk
                    raise from_oserror(
                        exc, "Reading the project", root / os.fsdecode(child)
                    ) from exc
                stack.append(_Frame(cfd, child, []))
                try:
                    stack[-1].subdirs = list_dir(cfd, child)
                except BaseException:
                    raise
                continue
            os.close(top.fd)
            stack.pop()
            postorder.append(top.relpath)
        result.root = _build_trees(listing, postorder, result, start_ns)
    except BaseException:
        for frame in stack:
            os.close(frame.fd)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if hint is None:
        result.cache_deletes = [p for p in cache if p not in seen]
    else:  # only directories that were read can say a file is gone
        result.cache_deletes = [
            p for p in cache if p not in seen and p.rpartition(b"/")[0] in listed
        ]
    progress(Progress("scan", counter, counter))
    return result


def _build_trees(
    listing: dict[bytes, list[Entry | _Pending | tuple[bytes, int]]],
    postorder: list[bytes],
    result: ScanResult,
    start_ns: int,
) -> Oid:
    tree_of: dict[bytes, Oid] = {}
    for rel in postorder:
        entries: list[Entry] = []
        for item in listing[rel]:
            if isinstance(item, Entry):
                entries.append(item)
            elif isinstance(item, tuple):
                name, mode = item
                entries.append(Entry(name, Kind.DIR, mode, 0, tree_of[_join(rel, name)]))
            else:
                try:
                    got = item.future.result()
                except SnapfsError:
                    raise
                except OSError as exc:
                    raise from_oserror(exc, "Snapshotting", os.fsdecode(item.relpath)) from exc
                result.hashed += 1
                result.stored += got.stored
                st = got.st
                mode = item.logical_mode(got)
                # Record what was hashed: the file may have grown or shrunk since it was listed.
                result.nbytes += got.size - item.st.st_size
                entries.append(Entry(item.name, Kind.FILE, mode, got.size, got.oid))
                result.cache_updates.append(
                    (
                        item.relpath,
                        CacheEntry(
                            st.st_dev,
                            st.st_ino,
                            st.st_size,
                            st.st_mtime_ns,
                            st.st_ctime_ns,
                            mode,
                            got.oid,
                            got.racy or is_racy(st, start_ns),
                        ),
                    )
                )
        data = encode(entries)
        oid = tree_oid(data)
        result.trees[oid] = data
        tree_of[rel] = oid
    return tree_of[b""]
