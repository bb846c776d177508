"""Comparing trees. Identical subtrees share an oid, so a diff only descends where things differ."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._errors import StateCorrupt
from ._hashing import Oid, unread_oid
from ._tree import Entry, Kind, decode, decode_record, records

TreeLoader = Callable[[Oid], bytes | None]


class _Lists:
    """Read-only lists of paths, compared by value (not a frozen dataclass: see the note on
    ``_config.Config``)."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, *lists: list[Any] | None) -> None:  # one per slot, None: empty
        for name, value in zip(self.__slots__, lists, strict=True):
            object.__setattr__(self, name, [] if value is None else value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # its lists are not hashable

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:  # pickle and copy, through __init__
        return type(self), tuple(getattr(self, n) for n in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Changes(_Lists):
    """Project-relative POSIX paths that differ. Directories end with ``/``.

    Names that are not valid UTF-8 are decoded with ``surrogateescape`` (PEP 383): each bad byte
    0xNN becomes the lone surrogate U+DCNN, which JSON writes as ``"\\udcNN"``. ``os.fsencode``
    turns such a string back into the original bytes.
    """

    __slots__ = ("added", "modified", "deleted")
    added: list[str]
    modified: list[str]
    deleted: list[str]

    def __init__(
        self,
        added: list[str] | None = None,
        modified: list[str] | None = None,
        deleted: list[str] | None = None,
    ) -> None:
        super().__init__(added, modified, deleted)

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted)

    def to_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "modified": self.modified, "deleted": self.deleted}


# Decoded trees by oid. A tree's oid is the digest of its bytes, so an entry can never go
# stale; a rollback or restore walks the same trees up to three times (what changed, the
# plan, what it undid), and decoding is most of a walk's cost. Bounded, and read-only: callers
# must not change the dicts they get.
_DECODED: dict[Oid, dict[bytes, Entry]] = {}
_DECODED_MAX = 16384


def load_entries(load: TreeLoader, oid: Oid) -> dict[bytes, Entry]:
    entries = _DECODED.get(oid)
    if entries is not None:
        return entries
    data = load(oid)
    if data is None:
        raise StateCorrupt(
            f"Tree {oid.hex()} is missing from the snapfs state.",
            hint="Run 'snapfs verify' to see which snapshots are affected.",
        )
    entries = {e.name: e for e in decode(data)}
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[oid] = entries
    return entries


# The same trees as raw records by name, for diffs (see ``records``); bounded like _DECODED.
_RECORDS: dict[Oid, dict[bytes, bytes]] = {}


def load_records(load: TreeLoader, oid: Oid) -> dict[bytes, bytes]:
    got = cached_records(load, oid)
    if got is None:
        raise StateCorrupt(
            f"Tree {oid.hex()} is missing from the snapfs state.",
            hint="Run 'snapfs verify' to see which snapshots are affected.",
        )
    return got


def cached_records(load: TreeLoader, oid: Oid) -> dict[bytes, bytes] | None:
    """:func:`load_records`, with None for a tree ``load`` doesn't have."""
    got = _RECORDS.get(oid)
    if got is not None:
        return got
    data = load(oid)
    if data is None:
        return None
    got = records(data)
    if len(_RECORDS) >= _DECODED_MAX:
        _RECORDS.clear()
    _RECORDS[oid] = got
    return got


def walk_diff(
    load: TreeLoader, old: Oid | None, new: Oid | None, base: bytes = b""
) -> Iterator[tuple[bytes, Entry | None, Entry | None]]:
    """Yield (relpath, old entry, new entry) for every entry that differs, parents first.

    Directories present on both sides with different content are descended into and also
    yielded when their mode differs. Entries of a directory present on one side only are not
    expanded: callers use :func:`walk_tree` for that.
    """
    stack: list[tuple[bytes, Oid | None, Oid | None]] = [(base, old, new)]
    while stack:
        rel, a_oid, b_oid = stack.pop()
        if a_oid == b_oid:
            continue
        a = load_records(load, a_oid) if a_oid is not None else {}
        b = load_records(load, b_oid) if b_oid is not None else {}
        subdirs = []
        # Byte-identical records are the same entry: only the names whose records differ
        # (found by a set operation, without a Python step per entry) are decoded.
        for name in sorted({name for name, _ in a.items() ^ b.items()}):
            ra, rb = a.get(name), b.get(name)
            ea = None if ra is None else decode_record(ra)
            eb = None if rb is None else decode_record(rb)
            path = rel + b"/" + name if rel else name
            if ea is not None and eb is not None and ea.kind == eb.kind == Kind.DIR:
                if ea.mode != eb.mode:
                    yield path, ea, eb
                if ea.oid != eb.oid:
                    subdirs.append((path, ea.oid, eb.oid))
                continue
            if ea is not None and eb is not None and ea.same_content(eb) and ea.mode == eb.mode:
                continue
            yield path, ea, eb
        stack.extend(reversed(subdirs))


def walk_tree(load: TreeLoader, oid: Oid, base: bytes) -> Iterator[tuple[bytes, Entry]]:
    """Every entry below tree ``oid``, parents before children."""
    stack = [(base, oid)]
    while stack:
        rel, t = stack.pop()
        subdirs = []
        for name, e in sorted(load_entries(load, t).items()):
            path = rel + b"/" + name
            yield path, e
            if e.kind == Kind.DIR:
                subdirs.append((path, e.oid))
        stack.extend(reversed(subdirs))


def _show(relpath: bytes, entry: Entry) -> str:
    s = os.fsdecode(relpath)
    return s + "/" if entry.kind == Kind.DIR else s


def changes(load: TreeLoader, old: Oid, new: Oid) -> Changes:
    """What changed going from tree ``old`` to tree ``new``."""
    out = Changes()
    for path, ea, eb in walk_diff(load, old, new):
        if ea is None and eb is not None:
            out.added.append(_show(path, eb))
            if eb.kind == Kind.DIR:
                out.added.extend(_show(p, e) for p, e in walk_tree(load, eb.oid, path))
        elif eb is None and ea is not None:
            out.deleted.append(_show(path, ea))
            if ea.kind == Kind.DIR:
                out.deleted.extend(_show(p, e) for p, e in walk_tree(load, ea.oid, path))
        elif ea is not None and eb is not None:
            if ea.kind != eb.kind:
                out.modified.append(os.fsdecode(path))
                if ea.kind == Kind.DIR:
                    out.deleted.extend(_show(p, e) for p, e in walk_tree(load, ea.oid, path))
                if eb.kind == Kind.DIR:
                    out.added.extend(_show(p, e) for p, e in walk_tree(load, eb.oid, path))
            else:
                out.modified.append(_show(path, eb))
    for lst in (out.added, out.modified, out.deleted):
        lst.sort()
    return out


class ChangeSet(_Lists):
    """What an operation changed: like :class:`Changes`, plus files that moved.

    A file deleted at one path and added with the same content at another is a move.
    """

    __slots__ = ("added", "modified", "deleted", "moved")
    added: list[str]
    modified: list[str]
    deleted: list[str]
    moved: list[tuple[str, str]]

    def __init__(
        self,
        added: list[str] | None = None,
        modified: list[str] | None = None,
        deleted: list[str] | None = None,
        moved: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(added, modified, deleted, moved)

    def __bool__(self) -> bool:
        return bool(self.added or self.modified or self.deleted or self.moved)

    def to_dict(self) -> dict[str, list[Any]]:
        return {
            "added": self.added,
            "modified": self.modified,
            "deleted": self.deleted,
            "moved": [list(m) for m in self.moved],
        }

    @classmethod
    def from_dict(cls, d: dict[str, list[Any]]) -> ChangeSet:
        return cls(
            list(d.get("added", [])),
            list(d.get("modified", [])),
            list(d.get("deleted", [])),
            [(a, b) for a, b in d.get("moved", [])],
        )

    def summary(self) -> str:
        parts = [
            f"{len(self.added)} added",
            f"{len(self.modified)} modified",
            f"{len(self.deleted)} deleted",
        ]
        if self.moved:
            parts.append(f"{len(self.moved)} moved")
        return ", ".join(parts)


def change_set(
    load: TreeLoader,
    old: Oid,
    new: Oid,
    resolve: Callable[[bytes], Oid | None] | None = None,
) -> ChangeSet:
    """:func:`changes` with moves paired up by content.

    ``new`` may hold files a read-only scan left unread (placeholder oids, see
    ``unread_oid``). ``resolve(relpath)`` then reads those that could be a move's destination,
    the ones as large as some file that went: pairing needs their real content.
    """
    plain = changes(load, old, new)
    gone: dict[Oid, list[str]] = {}
    sizes: set[int] = set()  # of the files that went
    came: list[tuple[bytes, Entry]] = []
    for path, ea, eb in walk_diff(load, old, new):
        for side, entry, went in ((path, ea, True), (path, eb, False)):
            if entry is None or (ea is not None and eb is not None and ea.kind == eb.kind):
                continue
            if entry.kind == Kind.FILE:
                files: Iterable[tuple[bytes, Entry]] = ((side, entry),)
            elif entry.kind == Kind.DIR:
                files = ((p, e) for p, e in walk_tree(load, entry.oid, side) if e.kind == Kind.FILE)
            else:
                continue
            if went:
                for p, e in files:
                    gone.setdefault(e.oid, []).append(os.fsdecode(p))
                    sizes.add(e.size)
            else:
                came.extend(files)
    arrived: dict[Oid, list[str]] = {}
    for p, e in came:
        oid = e.oid
        if resolve is not None and e.size in sizes and oid == unread_oid(p):
            oid = resolve(p) or oid
        arrived.setdefault(oid, []).append(os.fsdecode(p))
    moved: list[tuple[str, str]] = []
    for oid, srcs in gone.items():
        dsts = arrived.get(oid, [])
        if len(srcs) == 1 and len(dsts) == 1:  # only unambiguous pairs are moves
            moved.append((srcs[0], dsts[0]))
    src_set = {a for a, _ in moved}
    dst_set = {b for _, b in moved}
    return ChangeSet(
        [p for p in plain.added if p not in dst_set],
        plain.modified,
        [p for p in plain.deleted if p not in src_set],
        sorted(moved),
    )
