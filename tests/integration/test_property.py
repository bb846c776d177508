"""Hypothesis round trips on real directories: snapshot, mutate, restore, compare byte for byte.

Trees are random: files with random bytes (empty too) and modes, symlinks with random targets,
empty and nested directories, names that are unicode or not UTF-8 at all. Mutations are random
edits, deletes, adds, chmods and type changes. Restoring the snapshot must give back the first
tree exactly, and restoring the pre-restore snapshot must give back the mutated tree exactly.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapfs
from snapfs._diff import changes
from snapfs._ignore import Ignore
from snapfs._scan import scan
from tests.helpers import tree_state

FILE_MODES = (0o644, 0o755, 0o600, 0o444)
DIR_MODES = (0o755, 0o700, 0o750, 0o555)
RESERVED_AT_ROOT = (b".snapfs", b".snapfsignore")

PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _valid_name(name: bytes) -> bool:
    return (
        0 < len(name) <= 255
        and b"/" not in name
        and b"\0" not in name
        and name not in (b".", b"..")
        # snapfs ignores a .snapfs at any depth (a nested project's state), so it must not be
        # part of a tree that is expected to round-trip.
        and name != b".snapfs"
    )


# Unicode (including combining marks, RTL and astral characters), arbitrary bytes (mostly not
# valid UTF-8), and a few names known to be tricky.
names = st.one_of(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
        min_size=1,
        max_size=10,
    ).map(lambda s: s.encode("utf-8")),
    st.binary(min_size=1, max_size=10),
    st.sampled_from(
        [
            b"a",
            b"b.txt",
            b"caf\xc3\xa9",
            b"bad\xff\xfe",
            b"new\nline",
            b" space ",
            b"-dash",
            b".hidden",
            b"\xe6\x97\xa5\xe6\x9c\xac",
            b"x" * 255,
            b"\x80",
            b"a\\b",
        ]
    ),
).filter(_valid_name)

link_targets = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t),
    st.sampled_from([b".", b"..", b"/", b"/etc/hostname", b"../../outside", b"a", b"sub/dir/"]),
)


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int


@dataclass(frozen=True)
class Link:
    target: bytes


@dataclass(frozen=True)
class Dir:
    mode: int
    children: dict[bytes, File | Link | Dir]


files = st.builds(File, st.binary(max_size=3000) | st.just(b""), st.sampled_from(FILE_MODES))
links = st.builds(Link, link_targets)


def _dirs(children: st.SearchStrategy[File | Link | Dir]) -> st.SearchStrategy[Dir]:
    return st.builds(Dir, st.sampled_from(DIR_MODES), st.dictionaries(names, children, max_size=5))


nodes = st.recursive(files | links, _dirs, max_leaves=25)
roots = st.dictionaries(
    names.filter(lambda n: n not in RESERVED_AT_ROOT), nodes, min_size=0, max_size=8
)


def materialize(parent: bytes, name: bytes, node: File | Link | Dir) -> None:
    path = parent + b"/" + name
    if isinstance(node, File):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, node.data)
        finally:
            os.close(fd)
        os.chmod(path, node.mode)
    elif isinstance(node, Link):
        os.symlink(node.target, path)
    else:
        os.mkdir(path, 0o700)
        for child_name, child in node.children.items():
            materialize(path, child_name, child)
        os.chmod(path, node.mode)


def all_paths(root: bytes) -> list[bytes]:
    """Every project-relative path (not .snapfs), parents before children, in a stable order."""
    out: list[bytes] = []

    def walk(rel: bytes) -> None:
        full = root + b"/" + rel if rel else root
        for name in sorted(os.listdir(full)):
            r = rel + b"/" + name if rel else name
            if r == b".snapfs":
                continue
            out.append(r)
            if stat.S_ISDIR(os.lstat(root + b"/" + r).st_mode):
                walk(r)

    walk(b"")
    return out


def remove_any(path: bytes) -> None:
    st_ = os.lstat(path)
    if stat.S_ISDIR(st_.st_mode):
        for dirpath, dirnames, _ in os.walk(path):  # read-only dirs must open up to be emptied
            os.chmod(dirpath, 0o700)
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(path)
    else:
        os.unlink(path)


MUTATIONS = ("edit", "delete", "add", "chmod", "to_file", "to_dir", "to_link")


def mutate(root: bytes, data: st.DataObject) -> list[str]:
    """Apply 1-6 random mutations to the real tree; returns a log for failure reports."""
    log: list[str] = []
    for _ in range(data.draw(st.integers(1, 6), label="mutation count")):
        paths = all_paths(root)
        kind = data.draw(st.sampled_from(MUTATIONS), label="mutation")
        if kind == "add" or not paths:
            dirs = [b""] + [p for p in paths if stat.S_ISDIR(os.lstat(root + b"/" + p).st_mode)]
            parent = data.draw(st.sampled_from(dirs), label="add under")
            name = data.draw(names, label="new name")
            if parent == b"" and name in RESERVED_AT_ROOT:
                continue
            rel = parent + b"/" + name if parent else name
            if os.path.lexists(root + b"/" + rel):
                continue
            node = data.draw(nodes, label="new node")
            pfull = root + b"/" + parent if parent else root
            pmode = os.lstat(pfull).st_mode
            os.chmod(pfull, 0o700)
            materialize(pfull, name, node)
            os.chmod(pfull, stat.S_IMODE(pmode))
            log.append(f"add {rel!r} {type(node).__name__}")
            continue
        rel = data.draw(st.sampled_from(paths), label="path")
        full = root + b"/" + rel
        st_ = os.lstat(full)
        if kind == "edit":
            if not stat.S_ISREG(st_.st_mode):
                continue
            new = data.draw(st.binary(max_size=3000), label="new bytes")
            os.chmod(full, 0o600)
            with open(full, "wb") as f:
                f.write(new)
            os.chmod(full, stat.S_IMODE(st_.st_mode))
        elif kind == "delete":
            remove_any(full)
        elif kind == "chmod":
            if stat.S_ISLNK(st_.st_mode):
                continue
            modes = DIR_MODES if stat.S_ISDIR(st_.st_mode) else FILE_MODES
            os.chmod(full, data.draw(st.sampled_from(modes), label="mode"))
        else:
            replacement: File | Link | Dir
            if kind == "to_file":
                replacement = data.draw(files, label="as file")
            elif kind == "to_link":
                replacement = data.draw(links, label="as link")
            else:
                replacement = data.draw(_dirs(files | links), label="as dir")
            remove_any(full)
            parent, _, name = full.rpartition(b"/")
            materialize(parent, name, replacement)
        log.append(f"{kind} {rel!r}")
    return log


@PROPERTY_SETTINGS
@given(tree=roots, data=st.data())
def test_snapshot_mutate_restore_round_trip(
    tree: dict[bytes, File | Link | Dir], data: st.DataObject
) -> None:
    _round_trip(tree, data)


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(tree=roots, data=st.data())
def test_round_trip_with_scan_helpers(
    tree: dict[bytes, File | Link | Dir], data: st.DataObject
) -> None:
    """The same, with every full walk sharing the tree out to helper processes (see _pscan):
    each snapshot, status and pre-restore snapshot after the first has records to check."""
    from snapfs import _pscan

    saved = _pscan.MIN_DIRS, _pscan.procs_available
    _pscan.MIN_DIRS, _pscan.procs_available = 1, lambda: 3
    try:
        _round_trip(tree, data)
    finally:
        _pscan.MIN_DIRS, _pscan.procs_available = saved


@settings(PROPERTY_SETTINGS, max_examples=30)
@given(tree=roots, data=st.data())
def test_what_status_records_after_a_restore_stays_true(
    tree: dict[bytes, File | Link | Dir], data: st.DataObject
) -> None:
    """``status`` after a restore records the directory records and cache entries it built
    (see Project._keep_scan_records). Whatever it recorded, a change made right after it (in
    the same clock tick, or not) is still seen by the next status, and a snapshot still stores
    the tree exactly."""
    with tempfile.TemporaryDirectory(prefix="snapfs-prop-") as tmp:
        root = Path(tmp) / "proj"
        root.mkdir()
        rootb = os.fsencode(root)
        for name, node in tree.items():
            materialize(rootb, name, node)
        with snapfs.init(root) as project:
            first = project.snapshot("first")
            log = mutate(rootb, data)
            project.snapshot("changed")
            project.restore(first.id)
            if data.draw(st.booleans(), label="settle after the restore"):
                time.sleep(0.03)  # past the racy window: the restored files are trusted
            assert not project.status(), f"status not clean after restore ({log})"
            if data.draw(st.booleans(), label="settle after status"):
                time.sleep(0.03)
            log += mutate(rootb, data)
            if data.draw(st.booleans(), label="settle after the change"):
                time.sleep(0.03)  # edited files are no longer racy: status would vouch for them
            mutated = tree_state(root)
            full = scan(root, ignore=Ignore.load(root), cache={}, batch=None)
            want = changes(project._overlay(full.trees), bytes.fromhex(first.root), full.root)
            assert project.status() == want, f"status after {log}"
            assert project.status() == want, f"the second status after {log}"
            last = project.snapshot("last")
            project.restore(first.id)
            project.restore(last.id)
            got = tree_state(root)
            assert got == mutated, f"snapshot after {log} differs: {_diff(got, mutated)}"
            assert project.verify().ok
        _open_up(rootb)


def _round_trip(tree: dict[bytes, File | Link | Dir], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="snapfs-prop-") as tmp:
        root = Path(tmp) / "proj"
        root.mkdir()
        rootb = os.fsencode(root)
        for name, node in tree.items():
            materialize(rootb, name, node)
        with snapfs.init(root) as project:
            original = tree_state(root)
            snap = project.snapshot("original")
            assert tree_state(root) == original, "taking a snapshot changed the tree"

            log = mutate(rootb, data)
            mutated = tree_state(root)

            res = project.restore(snap.id)
            got = tree_state(root)
            assert got == original, f"restore after {log} differs: {_diff(got, original)}"
            assert not project.status(), f"status not clean after restore ({log})"

            # The reverse: the state the restore left behind was saved and comes back exactly.
            assert res.pre_restore is not None
            project.restore(res.pre_restore)
            got = tree_state(root)
            assert got == mutated, f"undo after {log} differs: {_diff(got, mutated)}"
            assert not project.status(), f"status not clean after undo ({log})"
            assert project.verify().ok
        _open_up(rootb)  # so TemporaryDirectory can delete read-only dirs' contents


def _open_up(root: bytes) -> None:
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)


def _diff(
    got: dict[bytes, tuple[str, int, bytes]], want: dict[bytes, tuple[str, int, bytes]]
) -> str:
    keys = sorted(set(got) ^ set(want) | {k for k in set(got) & set(want) if got[k] != want[k]})
    return "; ".join(f"{k!r}: got {got.get(k)} want {want.get(k)}" for k in keys[:6])
