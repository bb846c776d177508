"""Tree objects: one per directory, content-addressed, forming a Merkle tree.

Binary layout (all integers big-endian)::

    b"SNT1"
    repeated, sorted by name bytes:
        kind u8 | mode u16 | size u64 | name_len u16 | name | payload
    payload: FILE -> oid (16 bytes) of the content
             DIR  -> oid (16 bytes) of the child tree
             LINK -> target_len u32 | target bytes

Names are raw bytes, so names that are not valid UTF-8 round-trip unchanged. The tree's oid is the
XXH3-128 of the encoded bytes, so a change to one file rewrites only the trees on its path.
"""

from __future__ import annotations

import enum
import functools
import struct
from typing import NamedTuple

from ._errors import StateCorrupt
from ._hashing import OID_LEN, Oid, hash_bytes

MAGIC = b"SNT1"
_HEAD = struct.Struct(">BHQH")
_LINKLEN = struct.Struct(">I")


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2
    LINK = 3


_KINDS = {k.value: k for k in Kind}  # a dict lookup is ~10x cheaper than Kind(value)


class Entry(NamedTuple):
    """One name in a directory. ``oid`` is the content (FILE) or child tree (DIR).

    A NamedTuple rather than a frozen dataclass: scans create one per file, and tuples are
    several times cheaper to build.
    """

    name: bytes
    kind: Kind
    mode: int  # permission bits, st_mode & 0o7777
    size: int = 0
    oid: Oid = b""
    target: bytes = b""  # symlink target

    def same_content(self, other: Entry) -> bool:
        return self.kind == other.kind and self.oid == other.oid and self.target == other.target


def encode(entries: list[Entry]) -> bytes:
    parts = [MAGIC]
    for e in sorted(entries, key=lambda e: e.name):
        parts.append(_HEAD.pack(e.kind, e.mode, e.size, len(e.name)))
        parts.append(e.name)
        if e.kind == Kind.LINK:
            parts.append(_LINKLEN.pack(len(e.target)))
            parts.append(e.target)
        else:
            parts.append(e.oid)
    return b"".join(parts)


def tree_oid(data: bytes) -> Oid:
    return hash_bytes(data)


_new_entry = functools.partial(tuple.__new__, Entry)  # C-level: no Python frame per entry
_BAD_NAMES = frozenset((b"", b".", b".."))


def records(data: bytes) -> dict[bytes, bytes]:
    """Each name of an encoded tree with the raw bytes of its entry, undecoded.

    Two trees can be compared record by record, decoding only the entries that differ: a
    diff of two large, similar directories costs about half as much as decoding both.
    Raises StateCorrupt on a malformed layout; names are checked when a record is decoded.
    """
    if data[:4] != MAGIC:
        raise StateCorrupt("A tree object is damaged (bad header).")
    out: dict[bytes, bytes] = {}
    unpack, head, link_len, end = _HEAD.unpack_from, _HEAD.size, _LINKLEN.unpack_from, len(data)
    pos = 4
    try:
        while pos < end:
            kind, _mode, _size, nlen = unpack(data, pos)
            name_end = pos + head + nlen
            if kind == Kind.LINK:
                (tlen,) = link_len(data, name_end)
                nxt = name_end + _LINKLEN.size + tlen
            else:
                nxt = name_end + OID_LEN
            if nxt > end:
                raise ValueError("short entry")
            out[data[pos + head : name_end]] = data[pos:nxt]
            pos = nxt
    except (struct.error, ValueError) as exc:
        raise StateCorrupt("A tree object is damaged (truncated or malformed).") from exc
    return out


def decode_record(record: bytes) -> Entry:
    """The entry of one raw record from :func:`records`, checked as :func:`decode` checks it."""
    (entry,) = decode(MAGIC + record)
    return entry


def decode(data: bytes) -> list[Entry]:
    """Parse an encoded tree. Raises StateCorrupt on anything malformed."""
    if data[:4] != MAGIC:
        raise StateCorrupt("A tree object is damaged (bad header).")
    out: list[Entry] = []
    append, unpack, head, kinds, link = out.append, _HEAD.unpack_from, _HEAD.size, _KINDS, Kind.LINK
    pos = 4
    end = len(data)
    try:
        while pos < end:
            kind, mode, size, nlen = unpack(data, pos)
            pos += head
            name = data[pos : pos + nlen]
            pos += nlen
            k = kinds[kind]
            if name in _BAD_NAMES or b"/" in name:
                raise ValueError("bad name")
            if k is link:
                (tlen,) = _LINKLEN.unpack_from(data, pos)
                pos += _LINKLEN.size
                target = data[pos : pos + tlen]
                pos += tlen
                if len(target) != tlen:
                    raise ValueError("short link target")
                append(_new_entry((name, k, mode, size, b"", target)))
            else:
                oid = data[pos : pos + OID_LEN]
                pos += OID_LEN
                if len(oid) != OID_LEN:
                    raise ValueError("short oid")
                append(_new_entry((name, k, mode, size, oid, b"")))
    except (struct.error, ValueError, KeyError) as exc:
        raise StateCorrupt("A tree object is damaged (truncated or malformed).") from exc
    return out
