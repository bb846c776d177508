"""The stat cache ("index"): path -> (dev, ino, size, mtime_ns, ctime_ns, mode, oid, racy).

It lets a snapshot skip reading every file whose inode and timestamps are unchanged. It lives in
one binary file, ``.snapfs/index``, loaded in a few C-level calls::

    b"SNIX1" | count u32 | xxh3_64 of the rest u64
    count fixed-size records (struct RECORD)
    count paths, each followed by a NUL byte

It is only a cache: a missing, torn or damaged file means "hash everything again", never a wrong
answer. It is written after the objects it names are durable, so every oid in it is stored.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

import xxhash

from ._hashing import Oid

MAGIC = b"SNIX1"
HEADER = struct.Struct("<5sIQ")
RECORD = struct.Struct("<QQQqqI16sB")


class CacheEntry(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # the logical mode recorded in trees (sealed files are read-only on disk)
    oid: Oid
    racy: bool


Index = dict[bytes, CacheEntry]


def load_index(path: Path) -> Index:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if len(data) < HEADER.size:
        return {}
    magic, count, check = HEADER.unpack_from(data)
    body = memoryview(data)[HEADER.size :]
    if magic != MAGIC or xxhash.xxh3_64_intdigest(body) != check:
        return {}  # damaged: start over (only costs re-hashing)
    split = count * RECORD.size
    paths = bytes(body[split:]).split(b"\0")
    if len(paths) != count + 1 or paths[-1] != b"":
        return {}
    new = tuple.__new__
    return {
        p: new(CacheEntry, rec)
        for p, rec in zip(paths, RECORD.iter_unpack(body[:split]), strict=False)
    }


def save_index(path: Path, index: Index) -> None:
    """Replace the index atomically. No fsync: losing it to a power cut only costs re-hashing."""
    paths = sorted(index)
    pack = RECORD.pack
    records = b"".join(pack(*index[p][:7], int(index[p][7])) for p in paths)
    body = records + b"".join(p + b"\0" for p in paths)
    tmp = path.with_name(f".index-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, len(paths), xxhash.xxh3_64_intdigest(body)))
        f.write(body)
    os.replace(tmp, path)
