"""A scan guided by a journal hint gives exactly the tree a full scan gives."""

from __future__ import annotations

import os
from pathlib import Path

import snapfs
from snapfs._ignore import Ignore
from snapfs._scan import Hint, scan
from tests.helpers import write


def _full(p: snapfs.Project) -> bytes:
    return scan(p.root, ignore=Ignore.load(p.root), cache=p.state.load_cache(), batch=None).root


def _partial(p: snapfs.Project, base: bytes, dirty: set[bytes], new: frozenset[bytes] = frozenset()) -> bytes:
    hint = Hint(base, p.state.tree, frozenset(dirty), frozenset(new))
    res = scan(p.root, ignore=Ignore.load(p.root), cache=p.state.load_cache(), batch=None, hint=hint)
    return res.root


def test_hinted_scan_matches_full_scan(project: snapfs.Project) -> None:
    root: Path = project.root
    for d in ("a/x", "a/y", "b/z", "c"):
        for i in range(5):
            write(root, f"{d}/f{i}", f"{d} {i}")
    base = bytes.fromhex(project.snapshot().root)
    assert _partial(project, base, set()) == base  # nothing dirty: the base, unread

    write(root, "a/x/f1", "changed")
    os.unlink(root / "b/z/f0")
    write(root, "new/deep/er/file", "n")
    full = _full(project)
    assert full != base
    got = _partial(project, base, {b"a/x", b"b/z", b""}, {b"new"})
    assert got == full


def test_hint_that_misses_a_dirty_dir_is_not_silently_right(project: snapfs.Project) -> None:
    """Proves the hint is what limits the work: an incomplete hint yields a different tree, which
    is why callers only use hints whose continuity the journal proved."""
    root = project.root
    write(root, "a/f", "1")
    write(root, "b/f", "1")
    base = bytes.fromhex(project.snapshot().root)
    write(root, "b/f", "2")
    assert _partial(project, base, {b"a", b""}) == base
    assert _partial(project, base, {b"b", b""}) == _full(project)
