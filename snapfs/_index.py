"""The stat cache ("index"): path -> (dev, ino, size, mtime_ns, ctime_ns, mode, oid, racy).

It lets a snapshot skip reading every file whose inode and timestamps are unchanged. It lives in
one binary file, ``.snapfs/index``, loaded in a few C-level calls::

    b"SNIX2" | files u32 | dirs u32 | rules 16 bytes | xxh3_64 of the rest u64
    files + dirs fixed-size records (struct RECORD), files first
    files + dirs paths, each followed by a NUL byte

Directory records are the same tuple for a directory: its own stat, its permission bits and the
oid of its tree as last built, under the ignore rules whose fingerprint is ``rules``. They let a
scan that finds a directory unchanged (its stat, every file in it, every subdirectory) take its
tree oid instead of encoding and hashing the tree again; every file is still lstat-ed.

``SNIX1`` files (files only, no directory records) are still read.

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
from pathlib import Path
from typing import NamedTuple

import xxhash

from ._hashing import Oid

MAGIC = b"SNIX2"
MAGIC_V1 = b"SNIX1"
HEADER = struct.Struct("<5sII16sQ")
HEADER_V1 = struct.Struct("<5sIQ")
RECORD = struct.Struct("<QQQqqI16sB")


class CacheEntry(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # the logical mode recorded in trees (sealed files are read-only on disk)
    oid: Oid  # a file's content, or a directory's tree
    racy: bool


Index = dict[bytes, CacheEntry]


class Loaded(NamedTuple):
    files: Index
    dirs: Index
    rules: bytes  # fingerprint of the ignore rules the directory records were built under


_entry = functools.partial(tuple.__new__, CacheEntry)  # C-level: no Python frame per record


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


def load_index(path: Path) -> Loaded:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return Loaded({}, {}, b"")
    if data[:5] == MAGIC_V1 and len(data) >= HEADER_V1.size:
        _magic, nfiles, check = HEADER_V1.unpack_from(data)
        ndirs, rules, start = 0, b"", HEADER_V1.size
    elif data[:5] == MAGIC and len(data) >= HEADER.size:
        _magic, nfiles, ndirs, rules, check = HEADER.unpack_from(data)
        start = HEADER.size
    else:
        return Loaded({}, {}, b"")
    body = memoryview(data)[start:]
    if xxhash.xxh3_64_intdigest(body) != check:
        return Loaded({}, {}, b"")  # damaged: start over (only costs re-hashing)
    count = nfiles + ndirs
    split = count * RECORD.size
    if split > len(body):
        return Loaded({}, {}, b"")
    paths = bytes(body[split:]).split(b"\0")
    if len(paths) != count + 1 or paths[-1] != b"":
        return Loaded({}, {}, b"")
    with paused_gc():
        records = map(_entry, RECORD.iter_unpack(body[:split]))
        files = dict(zip(paths[:nfiles], records, strict=False))
        dirs = dict(zip(paths[nfiles:count], records, strict=False))
    return Loaded(files, dirs, rules)


def save_index(path: Path, files: Index, dirs: Index | None = None, rules: bytes = b"") -> None:
    """Replace the index atomically. No fsync: losing it to a power cut only costs re-hashing."""
    dirs = dirs or {}
    fpaths, dpaths = sorted(files), sorted(dirs)
    pack = RECORD.pack
    body = b"".join(
        [
            *(pack(*files[p][:7], int(files[p][7])) for p in fpaths),
            *(pack(*dirs[p][:7], int(dirs[p][7])) for p in dpaths),
            *(p + b"\0" for p in fpaths),
            *(p + b"\0" for p in dpaths),
        ]
    )
    rules = rules.ljust(16, b"\0")[:16]
    tmp = path.with_name(f".index-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(
                HEADER.pack(MAGIC, len(fpaths), len(dpaths), rules, xxhash.xxh3_64_intdigest(body))
            )
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
