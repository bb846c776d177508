"""The stat cache ("index"): path -> (dev, ino, size, mtime_ns, ctime_ns, mode, oid, racy).

It lets a snapshot skip reading every file whose inode and timestamps are unchanged. It lives in
one binary file, ``.snapfs/index``, loaded in a few C-level calls::

    b"SNIX2" | files u32 | dirs u32 | dirs_bytes u32 | rules 16 bytes | xxh3_64 of the rest u64
    dirs section (dirs_bytes long): dirs records (struct DIR_RECORD), then their paths, each
        followed by a NUL byte
    files section: files records (struct RECORD), then their paths, each followed by a NUL byte

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

import functools
import gc
import os
import struct
from collections.abc import Iterator
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
    """The file records of an index, decoded on first use."""

    __slots__ = ("_count", "_raw", "_data")

    def __init__(
        self, count: int, raw: bytes | memoryview = b"", data: Index | None = None
    ) -> None:
        self._count = count
        self._raw = raw  # the files section, checksummed with the rest of the index
        self._data = data

    def __len__(self) -> int:
        return self._count if self._data is None else len(self._data)

    def data(self) -> Index:
        if self._data is None:
            self._data = _decode_files(self._count, self._raw)
            self._raw = b""
        return self._data


def _decode_files(count: int, raw: bytes | memoryview) -> Index:
    split = count * RECORD.size
    paths = bytes(raw[split:]).split(b"\0")
    if split > len(raw) or len(paths) != count + 1 or paths[-1] != b"":
        return {}  # damaged: start over (only costs re-hashing)
    with paused_gc():
        return dict(zip(paths[:count], map(_entry, RECORD.iter_unpack(raw[:split])), strict=True))


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
    return Loaded(FileRecords(0, data={}), {}, b"")


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


def save_index(path: Path, files: Index, dirs: DirIndex | None = None, rules: bytes = b"") -> None:
    """Replace the index atomically. No fsync: losing it to a power cut only costs re-hashing."""
    dirs = dirs or {}
    fpaths, dpaths = sorted(files), sorted(dirs)
    # starmap and join: no Python-level loop over the records (22k for a 20k-file project).
    dirs_section = b"".join(
        [*starmap(DIR_RECORD.pack, [dirs[p] for p in dpaths]), *(p + b"\0" for p in dpaths)]
    )
    body = b"".join(
        [
            dirs_section,
            *starmap(RECORD.pack, [files[p] for p in fpaths]),  # racy packs as 0/1
            b"\0".join(fpaths) + b"\0" if fpaths else b"",
        ]
    )
    rules = rules.ljust(16, b"\0")[:16]
    header = HEADER.pack(
        MAGIC,
        len(fpaths),
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
