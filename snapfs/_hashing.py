"""Content digests. An ``oid`` is always the 16-byte XXH3-128 digest of an object's content."""

from __future__ import annotations

import os

import xxhash

Oid = bytes
OID_LEN = 16
READ_BLOCK = 1 << 20


def hash_bytes(data: bytes | memoryview) -> Oid:
    return xxhash.xxh3_128_digest(data)


def hash_fd(fd: int) -> tuple[Oid, int]:
    """Hash a file from its current offset to EOF. Returns (oid, bytes read)."""
    h = xxhash.xxh3_128()
    total = 0
    while True:
        block = os.read(fd, READ_BLOCK)
        if not block:
            return h.digest(), total
        h.update(block)
        total += len(block)


def read_all(fd: int, expect: int = -1) -> bytes:
    """Everything from the current offset to EOF. ``expect``: the size the caller saw; one
    read of one byte more then usually proves EOF, which saves a second read per small file
    (a snapshot of a new venv reads 1,500 of them). A shorter read than expected is never
    trusted as EOF: the loop goes on until a read returns nothing."""
    chunks: list[bytes] = []
    if expect >= 0:
        first = os.read(fd, expect + 1)
        if len(first) == expect or not first:
            return first
        chunks.append(first)
    while True:
        block = os.read(fd, READ_BLOCK)
        if not block:
            return b"".join(chunks)
        chunks.append(block)


def unread_oid(relpath: bytes) -> Oid:
    """A placeholder for content a read-only scan did not read (a file new since the scan's
    base); never the digest of real content, since no tree holds it as a file's."""
    return hash_bytes(b"\0snapfs:unread\0" + relpath)
