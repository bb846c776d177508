"""Exactness check: a manifest of a tree (content hash, mode, symlink target, dirs incl. empty ones).

Two trees are "exact" when their manifests are equal.  mtimes/owners are deliberately not part of
the manifest: the brief asks for content, mode, symlink targets and the directory structure.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import xxhash

# (kind, permission bits, content hash / link target)
Entry = tuple[str, int, str]
Manifest = dict[str, Entry]

_CHUNK = 1 << 20


def _hash_file(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path, exclude_top: Iterable[str] = (".snapfs", ".git")) -> Manifest:
    """Describe every entry below `root` (not following symlinks), skipping top-level `exclude_top`."""
    excluded = set(exclude_top)
    out: Manifest = {}

    def walk(dirpath: str, rel: str) -> None:
        with os.scandir(dirpath) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if not rel and e.name in excluded:
                continue
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", 0, os.readlink(e.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", stat.S_IMODE(st.st_mode), "")
                walk(e.path, r)
            elif stat.S_ISREG(st.st_mode):
                out[r] = ("file", stat.S_IMODE(st.st_mode), _hash_file(e.path))
            else:
                out[r] = ("other", stat.S_IMODE(st.st_mode), "")

    walk(str(root), "")
    return out


def diff(expected: Manifest, actual: Manifest) -> list[str]:
    """Human-readable differences; empty list means the trees are identical."""
    out: list[str] = []
    for rel in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(rel), actual.get(rel)
        if e == a:
            continue
        if a is None:
            out.append(f"missing: {rel}")
        elif e is None:
            out.append(f"extra: {rel}")
        elif e[0] != a[0]:
            out.append(f"type {e[0]}->{a[0]}: {rel}")
        elif e[1] != a[1]:
            out.append(f"mode {e[1]:o}->{a[1]:o}: {rel}")
        else:
            out.append(f"content/target: {rel}")
    return out


def verdict(diffs: list[str]) -> str:
    """'exact', or 'NOT exact (N diffs: a missing, b mode, ...)' so the kind of damage shows."""
    if not diffs:
        return "exact"
    kinds = Counter(d.split(":", 1)[0].split(" ", 1)[0] for d in diffs)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return f"NOT exact ({len(diffs)} diffs: {detail})"
