"""The stat cache ("index"): path -> (dev, ino, size, mtime_ns, ctime_ns, mode, oid, racy).

It lets a snapshot skip reading every file whose inode and timestamps are unchanged. It lives in
one binary file, ``.snapfs/index``, loaded in a few C-level calls::

    b"SNIX2" | files u32 | dirs u32 | dirs_bytes u32 | rules 16 bytes | xxh3_64 of the rest u64
    dirs section (dirs_bytes long): dirs records (struct DIR_RECORD), then their paths, each
        followed by a NUL byte
    files section: files records (struct RECORD), then their paths, each followed by a NUL byte;
        sorted by path (so an edit splices the section, see FileRecords)

A directory record holds a directory's own stat, its permission bits, the oid of its tree as last
built and a digest of its files' stats (see ``_scan``), under the ignore rules whose fingerprint
is ``rules``. They let a scan that finds a directory unchanged (its stat, every file in it, every
subdirectory) take its tree oid instead of building the tree again; every file is still
lstat-ed. A directory record vouches for the file records it was built from, so replacing or
dropping a file's record drops the records of the directories above it.

The file records are decoded on first use: when the directory records vouch for every file, a
scan never needs them. ``SNIX1`` files (files only, no directory records) are still read.

It is only a cache: a missing, torn or damaged file means "hash everything again", never a wrong
answer. It is written after the objects and trees it names are durable, so every oid in it is
stored.
"""

from __future__ import annotations

import bisect
import functools
import gc
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import starmap
from pathlib import Path
from typing import NamedTuple

import xxhash

from ._hashing import Oid

# The racy-clean window: a change within this long of a recorded timestamp may have left it
# unchanged (the filesystem's clock ticks coarser than its nanoseconds suggest).
RACY_NS = 20_000_000
RACY_COARSE_NS = 2_000_000_000  # filesystems with whole-second timestamps
# A file snapfs just wrote (restored, placed) is worth waiting out the window for only when it
# is this large: a smaller one is cheaper to record as racy and re-read at the next scan.
SETTLE_MIN_SIZE = 8 << 20


def recent(ns: int, now_ns: int) -> bool:
    """Is timestamp ``ns`` within the racy window of ``now_ns``? A whole-second timestamp may
    come from a filesystem with a coarse clock: it gets the wider margin."""
    return ns >= now_ns - (RACY_COARSE_NS if ns % 1_000_000_000 == 0 else RACY_NS)


MAGIC = b"SNIX2"
MAGIC_V1 = b"SNIX1"
HEADER = struct.Struct("<5sIII16sQ")
HEADER_V1 = struct.Struct("<5sIQ")
RECORD = struct.Struct("<QQQqqI16sB")
DIR_RECORD = struct.Struct("<QQQqqI16s16s")


class CacheEntry(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # the logical mode recorded in trees (sealed files are read-only on disk)
    oid: Oid
    racy: bool


class DirRecord(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    oid: Oid  # the directory's tree
    files: bytes  # digest of its files' stats when the tree was built; b"" if unknown


Index = dict[bytes, CacheEntry]
DirIndex = dict[bytes, DirRecord]


class FileRecords:
    """The file records of an index: the files section as read, decoded only as far as asked.

    The section is fixed-size records followed by their paths, sorted by path. A lookup splits
    the paths once and unpacks one record; past ``count / 2`` lookups (a scan reading most
    directories) every record is decoded at once, which is cheaper from there. Edits
    (``merged``) splice the raw section around the changed records, so a restore that changes
    150 of 20k files neither decodes nor re-encodes the other 19,850 (about 25 ms).

    Immutable: ``merged`` returns a new one, and the mapping ``data()`` returns must not be
    changed.
    """

    __slots__ = ("_count", "_raw", "_paths", "_pos", "_data", "_lookups")

    def __init__(self, count: int, raw: bytes | memoryview = b"") -> None:
        self._count = count
        self._raw = raw  # the files section, checksummed with the rest of the index
        self._paths: list[bytes] | None = None
        self._pos: dict[bytes, int] | None = None
        self._data: Index | None = None
        self._lookups = 0

    def __len__(self) -> int:
        return len(self.paths()) if self._paths is not None else self._count

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.paths())

    def __contains__(self, path: object) -> bool:
        return path in self._positions()

    def __getitem__(self, path: bytes) -> CacheEntry:
        got = self.get(path)
        if got is None:
            raise KeyError(path)
        return got

    def get(self, path: bytes, default: CacheEntry | None = None) -> CacheEntry | None:
        if self._data is not None:
            return self._data.get(path, default)
        i = self._positions().get(path)
        if i is None:
            return default
        self._lookups += 1
        if self._lookups > self._count >> 1:
            return self.data()[path]
        return _entry(RECORD.unpack_from(self._raw, i * RECORD.size))

    def view(self) -> Index | FileRecords:
        """The cheapest mapping to look records up in: the decoded dict, once there is one."""
        return self if self._data is None else self._data

    def paths(self) -> list[bytes]:
        """Every path, sorted. A damaged section reads as empty (only costs re-hashing)."""
        if self._paths is None:
            split = self._count * RECORD.size
            paths = bytes(self._raw[split:]).split(b"\0")
            if split > len(self._raw) or len(paths) != self._count + 1 or paths[-1] != b"":
                paths, self._count, self._raw = [b""], 0, b""
            del paths[-1]
            self._paths = paths
        return self._paths

    def under(self, relpaths: Iterable[bytes]) -> set[bytes]:
        """The recorded paths equal to or below any of ``relpaths``. The paths are sorted
        bytewise, so those below ``d`` lie together, between ``d/`` and ``d0`` ('0' follows
        '/'): two binary searches each, instead of a look at every record."""
        paths, found = self.paths(), set()
        for d in relpaths:
            i = bisect.bisect_left(paths, d)
            if i < len(paths) and paths[i] == d:
                found.add(d)
            lo, hi = bisect.bisect_left(paths, d + b"/", i), bisect.bisect_left(paths, d + b"0", i)
            found.update(paths[lo:hi])
        return found

    def _search(self, path: bytes) -> int | None:
        """The position of ``path`` by binary search, without building ``_positions``."""
        paths = self.paths()
        i = bisect.bisect_left(paths, path)
        return i if i < len(paths) and paths[i] == path else None

    def _positions(self) -> dict[bytes, int]:
        if self._pos is None:
            paths = self.paths()
            with paused_gc():
                self._pos = dict(zip(paths, range(len(paths)), strict=True))
        return self._pos

    def data(self) -> Index:
        """Every record, decoded: for callers that read most of them."""
        if self._data is None:
            paths = self.paths()
            records = memoryview(self._raw)[: len(paths) * RECORD.size]
            with paused_gc():
                self._data = dict(zip(paths, map(_entry, RECORD.iter_unpack(records)), strict=True))
        return self._data

    def section(self) -> bytes | memoryview:
        """The files section to write: records, then NUL-terminated paths."""
        self.paths()  # (validates it)
        return self._raw

    def merged(
        self, updates: Iterable[tuple[bytes, CacheEntry]], deletes: Iterable[bytes] = ()
    ) -> FileRecords:
        """A copy with ``deletes`` dropped, then ``updates`` set (added or replaced)."""
        paths, size = self.paths(), RECORD.size
        updates, deletes = list(updates), list(deletes)
        # A few edits search the sorted paths: building the position map costs ~10 ms at 20k
        # paths, about as much as 5k binary searches.
        few = self._pos is None and len(updates) + len(deletes) < len(paths) >> 3
        find = self._search if few else self._positions().get
        records = memoryview(self._raw)[: len(paths) * size]
        edits: dict[int, bytes | None] = {}  # old position -> its new record, or None: dropped
        for p in deletes:
            i = find(p)
            if i is not None:
                edits[i] = None
        added: dict[bytes, bytes] = {}
        for p, entry in updates:
            i = find(p)
            if i is None:
                added[p] = RECORD.pack(*entry)
            else:
                edits[i] = RECORD.pack(*entry)
        if not edits and not added:
            return self
        # New paths go in front of the first old path that sorts after them.
        inserts: dict[int, list[bytes]] = {}
        for p in sorted(added):
            inserts.setdefault(bisect.bisect_left(paths, p), []).append(p)
        out_paths: list[bytes] = []
        out_records: list[bytes | memoryview] = []
        start = 0
        for i in sorted(edits.keys() | inserts.keys()):
            if i > start:  # (a removed folder's files are a run of positions: nothing between)
                out_paths += paths[start:i]
                out_records.append(records[start * size : i * size])
            for p in inserts.get(i, ()):
                out_paths.append(p)
                out_records.append(added[p])
            start = i
            if i in edits:
                start = i + 1
                rec = edits[i]
                if rec is not None:
                    out_paths.append(paths[i])
                    out_records.append(rec)
        out_paths += paths[start:]
        out_records.append(records[start * size :])
        new = FileRecords(len(out_paths), b"".join([*out_records, _join_paths(out_paths)]))
        new._paths = out_paths
        return new


def _join_paths(paths: list[bytes]) -> bytes:
    return b"\0".join(paths) + b"\0" if paths else b""


class Loaded(NamedTuple):
    files: FileRecords
    dirs: DirIndex
    rules: bytes  # fingerprint of the ignore rules the directory records were built under


_entry = functools.partial(tuple.__new__, CacheEntry)  # C-level: no Python frame per record
_dir_record = functools.partial(tuple.__new__, DirRecord)


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection for the block.

    Loading the index and walking the tree allocate a few hundred thousand tuples and ints
    that form no cycles; collections triggered by the allocation count alone cost a no-change
    snapshot ~10%. Leaves the collector as it was (an application may have disabled it).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _empty() -> Loaded:
    return Loaded(FileRecords(0), {}, b"")


def load_index(path: Path) -> Loaded:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return _empty()
    if data[:5] == MAGIC_V1 and len(data) >= HEADER_V1.size:
        _magic, nfiles, check = HEADER_V1.unpack_from(data)
        ndirs = dirs_bytes = 0
        rules, start = b"", HEADER_V1.size
    elif data[:5] == MAGIC and len(data) >= HEADER.size:
        _magic, nfiles, ndirs, dirs_bytes, rules, check = HEADER.unpack_from(data)
        start = HEADER.size
    else:
        return _empty()
    body = memoryview(data)[start:]
    if xxhash.xxh3_64_intdigest(body) != check or dirs_bytes > len(body):
        return _empty()  # damaged: start over (only costs re-hashing)
    split = ndirs * DIR_RECORD.size
    paths = bytes(body[split:dirs_bytes]).split(b"\0")
    if split > dirs_bytes or len(paths) != ndirs + 1 or paths[-1] != b"":
        return _empty()
    dirs = dict(
        zip(paths[:ndirs], map(_dir_record, DIR_RECORD.iter_unpack(body[:split])), strict=True)
    )
    return Loaded(FileRecords(nfiles, body[dirs_bytes:]), dirs, rules)


def save_index(
    path: Path, files: FileRecords, dirs: DirIndex | None = None, rules: bytes = b""
) -> None:
    """Replace the index atomically. No fsync: losing it to a power cut only costs re-hashing."""
    dirs = dirs or {}
    dpaths = sorted(dirs)
    # starmap and join: no Python-level loop over the records (22k for a 20k-file project).
    dirs_section = b"".join(
        [*starmap(DIR_RECORD.pack, [dirs[p] for p in dpaths]), *(p + b"\0" for p in dpaths)]
    )
    body = b"".join([dirs_section, files.section()])
    rules = rules.ljust(16, b"\0")[:16]
    header = HEADER.pack(
        MAGIC,
        len(files),
        len(dpaths),
        len(dirs_section),
        rules,
        xxhash.xxh3_64_intdigest(body),
    )
    tmp = path.with_name(f".index-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
