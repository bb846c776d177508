"""Walking a project tree into tree objects, reusing the stat cache so unchanged files aren't read.

The walk goes through directory file descriptors opened with ``O_NOFOLLOW``: a directory swapped
for a symlink mid-walk is never followed out of the project. Files that need hashing are opened by
the walker (so the inode hashed is the inode listed) and handed to a small thread pool.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

from . import _pscan
from ._diff import cached_records
from ._errors import ProjectPathError, SnapfsError, UnsafePath, from_oserror
from ._fsops import DIR_FLAGS, READ_FLAGS, open_parent, stat_changed
from ._hashing import Oid, hash_bytes, hash_fd, read_all, unread_oid
from ._ignore import STATE_DIR
from ._index import (
    RACY_NS,
    CacheEntry,
    DirIndex,
    DirRecord,
    FileRecords,
    Index,
    paused_gc,
    recent,
)
from ._objects import IngestBatch, Ingested
from ._pscan import record_matches, stat_key
from ._threads import executor
from ._tree import Entry, Kind, decode_record, encode, tree_oid

__all__ = ["RACY_NS"]  # re-exported: restore and place wait out the same window

_IFMT = 0o170000
_IFDIR = stat.S_IFDIR
_IFREG = stat.S_IFREG
_IFLNK = stat.S_IFLNK
MAX_OPEN = 128  # files opened by the walker and not yet hashed


# No dataclasses on the command path (why: the note on _config.Config).
class Progress(NamedTuple):
    """A progress report from a long operation. ``total`` is None when unknown."""

    phase: str
    done: int
    total: int | None = None
    path: str | None = None


ProgressFn = Callable[[Progress], None]


class Hint(NamedTuple):
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


class ScanResult:
    """What a scan found: the root tree and the trees it built, with counts and the stat cache
    and directory record changes to keep."""

    __slots__ = (
        "root", "trees", "files", "nbytes", "stored", "hashed", "cache_updates",
        "cache_deletes", "skipped", "dirs", "helped", "sealed_orders",
    )  # fmt: skip

    def __init__(self, root: Oid, trees: dict[Oid, bytes]) -> None:
        self.root = root
        self.trees = trees
        self.files = 0
        self.nbytes = 0
        self.stored = 0
        self.hashed = 0
        self.cache_updates: list[tuple[bytes, CacheEntry]] = []
        self.cache_deletes: list[bytes] = []
        self.skipped: list[tuple[str, str]] = []
        self.dirs: DirIndex | None = None  # directory records for every directory built (scan)
        self.helped = 0  # subtrees a helper process found unchanged (see _pscan)
        # The files (in listing order) of recorded directories holding a file sealed by this
        # scan: their records' key is computed again once the store's commit has moved the
        # seals' ctime.
        self.sealed_orders: dict[bytes, list[CacheEntry]] = {}

    def resealed(self, moved: dict[tuple[int, int], tuple[int, int]]) -> None:
        """Carry the ctime that storing a sealed hardlink moved (``IngestBatch.resealed``)
        into this scan's cache entries and its directories' records, so that the next scan
        finds those files unchanged and reads none of them."""
        if not moved:
            return

        def moved_on(e: CacheEntry) -> CacheEntry:
            change = moved.get((e.dev, e.ino))
            return e._replace(ctime_ns=change[1]) if change and e.ctime_ns == change[0] else e

        stale: set[bytes] = set()
        for i, (relpath, e) in enumerate(self.cache_updates):
            now = moved_on(e)
            if now is not e:
                self.cache_updates[i] = (relpath, now)
                stale.add(relpath.rpartition(b"/")[0])
        if self.dirs is not None:
            for rel in stale & self.dirs.keys():
                order = self.sealed_orders.get(rel)
                key = _order_key([moved_on(e) for e in order]) if order is not None else b""
                self.dirs[rel] = self.dirs[rel]._replace(files=key)


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

    def __init__(
        self, fd: int, relpath: bytes, subdirs: list[tuple[bytes, os.stat_result]]
    ) -> None:
        self.fd = fd
        self.relpath = relpath
        self.subdirs = subdirs
        self.i = 0


class _Dir:
    """What listing one directory found, kept until its tree is built (children first)."""

    __slots__ = (
        "entries",
        "hits",
        "subdirs",
        "regular",
        "regular_st",
        "order",
        "files",
        "st",
        "cached",
        "clean",
        "inherited",
    )

    def __init__(self, st: os.stat_result | None, cached: Oid | None) -> None:
        self.entries: list[Entry] = []  # complete entries: symlinks, files hashed inline
        self.hits: list[tuple[bytes, CacheEntry]] = []  # files the stat cache vouches for
        self.subdirs: list[tuple[bytes, int]] = []  # (name, mode); their trees come later
        self.regular: list[str] = []  # names of the regular files, in listing order
        self.regular_st: list[os.stat_result] = []  # and their lstat, until they are handled
        self.order: list[CacheEntry | _Pending] = []  # their cache entries, listing order
        self.files = b""  # the files' key, when the directory record vouched for them all
        self.st = st  # the directory's own stat, taken before it was listed
        self.cached = cached  # its tree oid, if its directory record matches that stat
        self.clean = True  # every entry is as the stat cache has it (files) or unread (dirs)
        # A subtree a helper process found unchanged: the records of all its directories.
        self.inherited: DirIndex | None = None


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _cache_entry(st: os.stat_result, mode: int, oid: Oid, racy: bool) -> CacheEntry:
    return CacheEntry(
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode, oid, racy
    )


def is_racy(st: os.stat_result, start_ns: int, ctime_ns: int = 0) -> bool:
    """Could a change in the same clock tick as ``st`` have left it unchanged?

    Each timestamp is judged by its own granularity: an mtime of a whole second is common on
    a fine-grained filesystem (set by tar, cp -p, an unpacker), and taking it as a sign of a
    coarse clock for ctime as well made such files racy, and re-hashed, for 2 s after any
    change to them.

    ``ctime_ns``, when given, is the ctime to judge instead of st's: the file's ctime before
    snapfs sealed it. Our own chmod and rename make every fresh seal's ctime "now", and a
    write after them moves mtime as well, which is judged.
    """
    return recent(st.st_mtime_ns, start_ns) or recent(ctime_ns or st.st_ctime_ns, start_ns)


def is_racy_mtime(st: os.stat_result, start_ns: int) -> bool:
    """``is_racy`` for a file whose ctime only snapfs moved since a check of the whole inode
    (a sealed object's, just linked into place): any write since moves mtime."""
    return recent(st.st_mtime_ns, start_ns)


def scan(
    root: Path,
    *,
    ignore: Callable[[bytes], bool],
    cache: Index | FileRecords,
    batch: IngestBatch | None,
    workers: int = 4,
    helpers: int = 0,
    inline_max: int = 1 << 20,
    progress: ProgressFn = no_progress,
    hint: Hint | None = None,
    lazy_new: bool = False,
    lazy_added: bool = False,
    dirs: DirIndex | None = None,
) -> ScanResult:
    """Build the tree objects for ``root``. With ``batch`` new content is stored, else only hashed.

    Files smaller than ``inline_max`` are read and hashed by the walker itself; larger ones go
    to a pool of ``workers`` threads. With a ``hint`` from a change journal, only the directories
    it names are read; the rest of the tree is taken from the hint's base tree. With
    ``lazy_new`` (never when storing), files inside the hint's new directories are not read at
    all: they get a placeholder oid. Comparing with the base only needs their names there.
    ``lazy_added`` goes further for a rollback to the base: no file absent from the base is read.

    ``dirs`` (directory records, see ``_index``) lets a full walk (no ``hint``) skip building
    the tree of a directory whose own stat matches its record, whose files all match the stat
    cache and whose subdirectories all qualify in turn: the directory's names are then the same
    (any create, delete or rename in it moves its ctime), and so are its entries. Every file is
    still lstat-ed: writing a file in place does not touch its directory. A full walk with
    ``dirs`` returns fresh records in ``result.dirs``. Up to ``helpers`` forked processes check
    subtrees against those records meanwhile (see ``_pscan``).
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
    listing: dict[bytes, _Dir] = {}
    postorder: list[bytes] = []
    pool: ThreadPoolExecutor | None = None
    gate = threading.BoundedSemaphore(MAX_OPEN)
    result = ScanResult(root=b"", trees={})
    seen: set[bytes] = set()
    seen_add = seen.add
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    state_dir = os.fsdecode(STATE_DIR)
    FILE = Kind.FILE
    counter = 0  # regular files listed
    nbytes = 0
    known = 0  # listed files that have a cache entry
    listed: set[bytes] = set()
    vouched: set[bytes] = set()  # directories whose files a directory record vouched for
    files_of = cache.view if isinstance(cache, FileRecords) else lambda: cache
    ncached = len(cache)
    base_of: dict[bytes, Oid] = {b"": hint.base} if hint is not None else {}
    use_dirs = dirs is not None and hint is None
    get_dir = (dirs or {}).get

    def base_entries(rel: bytes) -> dict[bytes, bytes]:
        """The raw records by name (``_tree.records``) of ``rel`` in the hint's base: the
        diff that follows a journal-guided scan reads the same trees from the same cache."""
        # Also for a directory the journal saw created: deleted and made again, it may hold
        # what the base held (a subtree is reused only where the journal saw nothing).
        oid = base_of.get(rel)
        if hint is None or oid is None:
            return {}
        return cached_records(hint.load, oid) or {}

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

    def list_dir(
        fd: int, rel: bytes, listed_as: os.stat_result | None
    ) -> list[tuple[bytes, os.stat_result]]:
        """List one directory into ``listing[rel]``; returns the subdirectories to descend
        with their lstat. ``listed_as`` is the lstat its parent's listing saw (None: root)."""
        nonlocal counter, nbytes, known
        rec: DirRecord | None = None
        dst = None
        if use_dirs:
            dst = os.fstat(fd)
            # The parent's tree records this directory's mode as its listing saw it; only a
            # record taken from that same stat can stand for it (a chmod in between differs).
            if listed_as is not None and stat_key(listed_as) != stat_key(dst):
                dst = None  # neither trusted nor recorded
            e = get_dir(rel) if dst is not None else None
            if e is not None and dst is not None and record_matches(e, dst):
                rec = e
        d = _Dir(dst, rec[6] if rec is not None else None)
        entries, subdirs = d.entries, d.subdirs
        regular, regular_st = d.regular, d.regular_st
        # With a matching record, the files' stats are checked all at once (see _files_key).
        keys: list[int] | None = [] if rec is not None and rec[7] else None
        size = 0
        descend_into: list[tuple[bytes, os.stat_result]] = []
        try:
            it = os.scandir(fd)
        except OSError as exc:
            raise from_oserror(exc, "Reading the project", root / os.fsdecode(rel)) from exc
        prefix = rel + b"/" if rel else b""
        listed.add(rel)
        base = base_entries(rel) if hint is not None else {}
        # The hottest loop of a no-change snapshot: one iteration per entry of the project.
        # Locals, inline type tests and tuple indexing keep it close to a bare scandir + lstat.
        with it:
            for de in it:
                sname = de.name
                if sname == state_dir:
                    continue  # snapfs state (this project's or a nested one's) is never snapshotted
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and stat: not part of this snapshot
                m = st.st_mode
                fmt = m & _IFMT
                if fmt == _IFREG:
                    if check_ignore and ignore(prefix + sname.encode(fs_encoding, fs_errors)):
                        continue
                    regular.append(sname)
                    if keys is not None:  # only the digest's ints are kept, not the stat
                        keys += (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                        size += st.st_size
                    else:
                        regular_st.append(st)
                    continue
                name = sname.encode(fs_encoding, fs_errors)
                relpath = prefix + name
                if fmt == _IFDIR:
                    if check_ignore and ignore(relpath + b"/"):
                        continue
                    if hint is not None:
                        raw = base.get(name)
                        old = decode_record(raw) if raw is not None else None
                        if old is not None and old.kind == Kind.DIR:
                            if (
                                not hint.everything
                                and relpath not in descend
                                and not hint.is_new(relpath)
                            ):
                                # Untouched since the base: reuse its subtree unread.
                                d.clean = False
                                entries.append(Entry(name, Kind.DIR, m & 0o7777, 0, old.oid))
                                continue
                            base_of[relpath] = old.oid
                    subdirs.append((name, m & 0o7777))
                    descend_into.append((name, st))
                    continue
                if check_ignore and ignore(relpath):
                    continue
                if fmt == _IFLNK:
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
                    entries.append(Entry(name, Kind.LINK, m & 0o7777, 0, b"", target))
                    continue
                result.skipped.append((os.fsdecode(relpath), "not a regular file"))
        listing[rel] = d
        n = len(regular)
        if n and (counter + n) // 2048 != counter // 2048:
            progress(Progress("scan", counter + n, None, os.fsdecode(rel)))
        if keys is not None and rec is not None and _files_key(keys) == rec[7]:
            # Every file has the stat its cache entry had when the record was made, and those
            # entries still stand (replacing one drops this record): all hits, nothing to read.
            d.files = rec[7]
            counter += n
            known += n
            nbytes += size
            vouched.add(rel)
        else:
            if keys is not None:  # the stats weren't kept: take them again
                d.regular = []
                for sname in regular:
                    try:
                        st = os.lstat(sname, dir_fd=fd)
                    except FileNotFoundError:
                        continue  # vanished since it was listed
                    if st.st_mode & _IFMT == _IFREG:  # (else replaced since: left out)
                        d.regular.append(sname)
                        regular_st.append(st)
            list_files(fd, rel, d, base)
        return descend_into

    def list_files(fd: int, rel: bytes, d: _Dir, base: dict[bytes, bytes]) -> None:
        """Each regular file of a directory: from the stat cache, hashed inline, or pooled.
        ``base`` is the directory's entries in the hint's base tree (empty without a hint)."""
        nonlocal pool, counter, nbytes, known
        entries, hits, order = d.entries, d.hits, d.order
        prefix = rel + b"/" if rel else b""
        get_cached = files_of().get
        unread = lazy_new and hint is not None and hint.is_new(rel)
        clean = d.clean
        for sname, st in zip(d.regular, d.regular_st, strict=True):
            name = sname.encode(fs_encoding, fs_errors)
            relpath = prefix + name
            m = st.st_mode
            counter += 1
            seen_add(relpath)
            nbytes += st.st_size
            if unread or (lazy_added and hint is not None and name not in base):
                # Placeholder content: new since the base (the whole directory, or with
                # lazy_added this file), so only its name matters to the caller.
                clean = False
                entries.append(Entry(name, FILE, m & 0o7777, st.st_size, unread_oid(relpath)))
                continue
            c = get_cached(relpath)
            if c is not None:
                known += 1
                if (
                    c[1] == st.st_ino  # fields by index: this is a hot loop
                    and c[3] == st.st_mtime_ns
                    and c[4] == st.st_ctime_ns
                    and c[2] == st.st_size
                    and c[0] == st.st_dev
                    and not c[7]
                ):
                    hits.append((name, c))
                    order.append(c)
                    continue
            clean = False
            try:
                ffd = os.open(name, READ_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP):
                    counter -= 1
                    nbytes -= st.st_size
                    seen.discard(relpath)
                    if c is not None:
                        known -= 1
                    continue  # vanished or replaced by a symlink: gone for this snapshot
                raise from_oserror(exc, "Reading the project", root / os.fsdecode(relpath)) from exc
            if st.st_size < inline_max:
                # Small files are cheaper to handle right here than to hand to a thread.
                try:
                    data = read_all(ffd, st.st_size)
                    after = os.fstat(ffd)
                finally:
                    os.close(ffd)
                oid = hash_bytes(data)
                if batch is not None:
                    batch.add_small(oid, data)
                result.hashed += 1
                nbytes += len(data) - st.st_size  # it may have changed since listed
                mode = m & 0o7777
                entries.append(Entry(name, FILE, mode, len(data), oid))
                racy = (
                    stat_changed(st, after) or len(data) != st.st_size or is_racy(after, start_ns)
                )
                entry = _cache_entry(after, mode, oid, racy)
                result.cache_updates.append((relpath, entry))
                order.append(entry)
                continue
            gate.acquire()
            if pool is None:
                pool = executor(max_workers=workers, thread_name_prefix="snapfs-scan")
            # Hardlinking needs the name; the walker's dir fd closes before the job runs.
            link_src = (os.dup(fd), name) if batch is not None and batch.may_hardlink(st) else None
            fut = pool.submit(work, ffd, st, link_src)
            pending = _Pending(name, relpath, m & 0o7777, st, fut, c)
            order.append(pending)
        d.clean = clean
        d.regular_st = []  # handled

    def vanished(parent_rel: bytes, name: bytes) -> None:
        parent = listing[parent_rel]
        parent.subdirs = [x for x in parent.subdirs if x[0] != name]
        parent.clean = False

    # Subtrees that helper processes check meanwhile (see _pscan).
    running: list[_pscan.Helper] = []
    delegated: set[bytes] = set()
    anchor = -1  # the root, still open once the walk has closed its own descriptor
    deferred: list[tuple[bytes, os.stat_result]] = []  # (root, its stat as listed)
    if use_dirs and dirs:
        shares = _pscan.plan(dirs, min(helpers + 1, _pscan.procs_available()))
        if shares:
            records = dirs

            def check(fd: int, rel: bytes) -> _pscan.Verdict:
                return _pscan.check_subtree(
                    fd, rel, records, ignore, check_ignore, _files_key, state_dir
                )

            running = _pscan.start(root_fd, shares, check)
            delegated = {rel for h in running for rel in h.roots}
            if running:
                anchor = os.dup(root_fd)

    def walk(stack: list[_Frame], out: list[bytes]) -> None:
        """Walk the subtrees on ``stack`` depth-first, appending each directory to ``out``
        after its subdirectories. A delegated subtree is only noted for later."""
        while stack:
            top = stack[-1]
            if top.i < len(top.subdirs):
                name, listed_as = top.subdirs[top.i]
                top.i += 1
                child = _join(top.relpath, name)
                if child in delegated:
                    listing[child] = _Dir(None, None)  # filled in or walked once it's answered
                    deferred.append((child, listed_as))
                    out.append(child)
                    continue
                try:
                    cfd = os.open(name, DIR_FLAGS, dir_fd=top.fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        vanished(top.relpath, name)
                        continue  # vanished or swapped for a symlink mid-walk
                    raise from_oserror(
                        exc, "Reading the project", root / os.fsdecode(child)
                    ) from exc
                stack.append(_Frame(cfd, child, []))
                stack[-1].subdirs = list_dir(cfd, child, listed_as)
                continue
            os.close(top.fd)
            stack.pop()
            out.append(top.relpath)

    def settle_delegated() -> None:
        """Take each helper's answer: a subtree it vouched for is reused as recorded; any other
        is walked here, its directories spliced into ``postorder`` where it was noted."""
        nonlocal counter, known, nbytes
        answers: dict[bytes, object] = {}
        for h in running:
            answers.update(h.verdicts())
        running.clear()
        walked: dict[bytes, list[bytes]] = {}
        for rel, listed_as in deferred:
            v = answers.get(rel)
            if isinstance(v, tuple) and v[0] == stat_key(listed_as):
                _own, nfiles, nb, verified, skipped = v
                d = listing[rel]
                d.cached = dirs[rel].oid  # type: ignore[index]
                d.inherited = {r: dirs[r] for r in verified}  # type: ignore[index]
                counter += nfiles
                known += nfiles
                nbytes += nb
                vouched.update(verified)
                result.skipped.extend(skipped)
                result.helped += 1
                continue
            walked[rel] = []
            parent_rel, _sep, name = rel.rpartition(b"/")
            try:
                with open_parent(anchor, rel) as (pfd, name):
                    cfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            except UnsafePath:  # an ancestor is a symlink now: gone from where it was listed
                vanished(parent_rel, name)
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    vanished(parent_rel, name)
                    continue
                raise from_oserror(exc, "Reading the project", root / os.fsdecode(rel)) from exc
            stack.append(_Frame(cfd, rel, []))  # closed by the cleanup below if listing fails
            stack[-1].subdirs = list_dir(cfd, rel, listed_as)
            walk(stack, walked[rel])
        if walked:
            postorder[:] = [x for rel in postorder for x in walked.get(rel, (rel,))]

    stack: list[_Frame] = []
    try:
        with paused_gc():  # the walk allocates much and makes no reference cycles
            stack.append(_Frame(root_fd, b"", list_dir(root_fd, b"", None)))
            walk(stack, postorder)
            if deferred or running:
                settle_delegated()
            result.files, result.nbytes = counter, nbytes
            result.root = _build_trees(listing, postorder, result, start_ns, use_dirs, files_of)
    except BaseException:
        for frame in stack:
            os.close(frame.fd)
        for h in running:
            h.abandon()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if anchor >= 0:
            os.close(anchor)
    if hint is None:
        # Every relpath is listed once, so when as many listed files had an entry as the cache
        # holds, every entry was seen and nothing is gone.
        if known != ncached:  # (a vouched-for directory's files are exactly its entries)
            result.cache_deletes = [
                p for p in files_of() if p not in seen and p.rpartition(b"/")[0] not in vouched
            ]
    else:  # only directories that were read can say a file is gone
        result.cache_deletes = [
            p for p in files_of() if p not in seen and p.rpartition(b"/")[0] in listed
        ]
    progress(Progress("scan", counter, counter))
    return result


def _build_trees(
    listing: dict[bytes, _Dir],
    postorder: list[bytes],
    result: ScanResult,
    start_ns: int,
    record: bool,
    files_of: Callable[[], Index | FileRecords],
) -> Oid:
    tree_of: dict[bytes, Oid] = {}
    reused: set[bytes] = set()
    records: DirIndex = {}
    fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    FILE, DIR = Kind.FILE, Kind.DIR
    for rel in postorder:
        d = listing[rel]
        prefix = rel + b"/" if rel else b""
        if d.inherited is not None:  # a helper found the whole subtree as recorded
            tree_of[rel] = d.cached  # type: ignore[assignment]
            reused.add(rel)
            if record:
                records.update(d.inherited)
            continue
        if (
            d.cached is not None
            and d.clean
            and all(prefix + name in reused for name, _mode in d.subdirs)
        ):
            # Unchanged since its tree was built: same names, same entries, same subtrees.
            tree_of[rel] = d.cached
            reused.add(rel)
            if record:
                records[rel] = _dir_record(d, d.cached, d.files or _order_key(d.order))
            continue
        if d.files:  # vouched for, but a subdirectory changed: the entries are needed now
            cache = files_of()
            for sname in d.regular:
                name = sname.encode(fs_encoding, fs_errors)
                d.hits.append((name, cache[prefix + name]))
        entries = d.entries
        entries.extend([Entry(name, FILE, c[5], c[2], c[6]) for name, c in d.hits])
        entries.extend(
            [Entry(name, DIR, mode, 0, tree_of[prefix + name]) for name, mode in d.subdirs]
        )
        sealed = False
        for i, item in enumerate(d.order):
            if not isinstance(item, _Pending):
                continue
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
            entries.append(Entry(item.name, FILE, mode, got.size, got.oid))
            entry = CacheEntry(
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                mode,
                got.oid,
                got.racy or is_racy(st, start_ns, got.ctime_before),
            )
            result.cache_updates.append((item.relpath, entry))
            d.order[i] = entry
            sealed = sealed or got.ctime_before != 0
        data = encode(entries)
        oid = tree_oid(data)
        result.trees[oid] = data
        tree_of[rel] = oid
        if record and d.st is not None and not is_racy(d.st, start_ns):
            records[rel] = _dir_record(d, oid, d.files or _order_key(d.order))
            if sealed:
                result.sealed_orders[rel] = d.order  # type: ignore[assignment]
    if record:
        result.dirs = records
    return tree_of[b""]


def _files_key(stats: list[int]) -> bytes:
    """One digest of the (dev, ino, size, mtime_ns, ctime_ns) of a directory's files, in
    listing order: equal digests mean every file passes the stat cache's check."""
    try:
        packed = struct.pack(f"<{len(stats)}q", *stats)
    except struct.error:  # a value beyond int64: text is as exact, only slower
        packed = repr(stats).encode()
    return hash_bytes(packed)


def _order_key(order: list[CacheEntry | _Pending]) -> bytes:
    """The files' key for a new directory record, from the cache entries its files got in
    this scan; none (b"") if any of them is racy, as its next check must be a full one."""
    stats: list[int] = []
    for e in order:
        if isinstance(e, _Pending) or e[7]:
            return b""
        stats += e[:5]
    return _files_key(stats)


def _dir_record(d: _Dir, oid: Oid, files: bytes) -> DirRecord:
    st = d.st
    assert st is not None
    return DirRecord(
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_mode & 0o7777,
        oid,
        files,
    )
