"""Directory records in the stat cache: an unchanged directory's tree is reused, never a stale one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import snapfs
from snapfs._ignore import Ignore
from snapfs._index import HEADER_V1, MAGIC_V1, RECORD, CacheEntry, load_index
from snapfs._scan import scan
from tests.helpers import tree_state, write


def _settle() -> None:
    time.sleep(0.1)  # past the racy window, so cache entries and directory records are trusted


def _records(project: snapfs.Project) -> dict[bytes, bytes]:
    rules = Ignore.load(project.root).fingerprint
    return {rel: e.oid for rel, e in project.state.load_dir_cache(rules).items()}


def _full_scan_root(project: snapfs.Project) -> bytes:
    """The root tree built from scratch: no stat cache, no directory records."""
    return scan(project.root, ignore=Ignore.load(project.root), cache={}, batch=None).root


def _tree(project: snapfs.Project) -> tuple[snapfs.SnapshotInfo, dict[bytes, bytes]]:
    _settle()
    snap = project.snapshot()
    return snap, _records(project)


def test_unchanged_directories_are_reused_and_match_a_full_build(project: snapfs.Project) -> None:
    root = project.root
    write(root, "a/b/c.txt", "c")
    write(root, "a/d.txt", "d")
    write(root, "e/f.txt", "f")
    _settle()
    first = project.snapshot()
    recs = _records(project)
    assert set(recs) == {b"", b"a", b"a/b", b"e"}
    res = scan(
        root,
        ignore=Ignore.load(root),
        cache=project.state.load_cache(),
        batch=None,
        dirs=project.state.load_dir_cache(Ignore.load(root).fingerprint),
    )
    assert res.root == bytes.fromhex(first.root) and res.trees == {}  # nothing rebuilt
    assert res.files == 3 and res.hashed == 0


class _CountingCache(dict[bytes, CacheEntry]):
    lookups = 0

    def get(self, key: bytes, default: object = None) -> object:  # type: ignore[override]
        self.lookups += 1
        return super().get(key, default)


def test_unchanged_files_are_checked_without_a_lookup_each(project: snapfs.Project) -> None:
    root = project.root
    for i in range(20):
        write(root, f"pkg/m{i}.py", f"m{i}")
    write(root, "pkg/sub/z.py", "z")
    _tree(project)
    rules = Ignore.load(root).fingerprint

    def rescan() -> tuple[int, int]:
        cache = _CountingCache(project.state.load_cache())
        res = scan(
            root,
            ignore=Ignore.load(root),
            cache=cache,
            batch=None,
            dirs=project.state.load_dir_cache(rules),
        )
        return cache.lookups, res.hashed

    assert rescan() == (0, 0)  # every directory's record vouched for all its files
    os.utime(root / "pkg/m3.py")  # one file's stat moves: its directory is checked file by file
    assert rescan() == (20, 1)


def test_a_file_written_in_place_is_seen_in_an_unchanged_directory(
    project: snapfs.Project,
) -> None:
    root = project.root
    p = write(root, "models/cfg/model.cfg", "aaaa")
    first, _ = _tree(project)
    st = os.stat(root / "models/cfg")
    p.write_text("bbbb")  # same size, same inode: the directory is untouched
    assert os.stat(root / "models/cfg").st_mtime_ns == st.st_mtime_ns
    assert project.status().modified == ["models/cfg/model.cfg"]
    second = project.snapshot()
    assert second.root != first.root
    assert bytes.fromhex(second.root) == _full_scan_root(project)


def test_a_chmod_of_a_subdirectory_is_seen(project: snapfs.Project) -> None:
    root = project.root
    write(root, "plugin/sub/x.py", "x")
    first, _ = _tree(project)
    os.chmod(root / "plugin/sub", 0o700)  # changes sub's ctime, not plugin's
    second = project.snapshot()
    assert second.root != first.root
    assert bytes.fromhex(second.root) == _full_scan_root(project)
    project.restore(first.id)
    assert os.stat(root / "plugin/sub").st_mode & 0o777 == 0o755


def test_changed_ignore_rules_drop_the_records(project: snapfs.Project) -> None:
    root = project.root
    write(root, ".snapfsignore", "*.tmp\n")
    write(root, "sub/keep.txt", "k")
    write(root, "sub/run.log", "log")
    first, recs = _tree(project)
    assert b"sub" in recs
    # Rewritten in place: the root directory's stat does not move, nor does sub's.
    with open(root / ".snapfsignore", "r+") as f:
        f.write("*.log\n")
    second = project.snapshot()
    assert second.files == first.files - 1  # sub/run.log is ignored now
    assert bytes.fromhex(second.root) == _full_scan_root(project)


def test_a_directory_changed_just_now_is_not_recorded(project: snapfs.Project) -> None:
    root = project.root
    write(root, "old/a.txt", "a")
    _settle()
    write(root, "hot/b.txt", "b")  # within the racy window of the next scan
    project.snapshot()
    recs = _records(project)
    assert b"old" in recs and b"hot" not in recs and b"" not in recs


def test_new_and_removed_entries_are_seen(project: snapfs.Project) -> None:
    root = project.root
    write(root, "d/one.txt", "1")
    write(root, "d/two.txt", "2")
    _tree(project)
    os.unlink(root / "d/two.txt")
    write(root, "d/three.txt", "3")
    os.symlink("one.txt", root / "d/link")
    ch = project.status()
    assert ch.added == ["d/link", "d/three.txt"] and ch.deleted == ["d/two.txt"]
    snap = project.snapshot()
    assert bytes.fromhex(snap.root) == _full_scan_root(project)


def test_placing_a_file_drops_the_records_above_it(project: snapfs.Project, tmp_path: Path) -> None:
    root = project.root
    write(root, "models/x/a.bin", "a")
    write(root, "other/b.txt", "b")
    _, recs = _tree(project)
    assert {b"", b"models", b"models/x", b"other"} <= set(recs)
    src = tmp_path / "download"
    src.write_bytes(b"new model")
    from snapfs._hashing import hash_bytes

    project.place(b"models/x/a.bin", hash_bytes(b"new model"), src=src)
    recs = _records(project)
    assert b"other" in recs and not {b"", b"models", b"models/x"} & set(recs)
    assert project.status().modified == ["models/x/a.bin"]


def test_removing_many_files_drops_exactly_the_records_above_them(project: snapfs.Project) -> None:
    """Paths sharing folders, one walk stopping where an earlier one dropped the records
    above it: every folder above a removed file loses its record, and no other does."""
    root = project.root
    for i in range(30):
        write(root, f"a/b/c/f{i}.txt", str(i))
    write(root, "a/b/g.txt", "g")
    write(root, "a/d/e/h.txt", "h")
    write(root, "a/d/k.txt", "k")
    write(root, "x/y.txt", "y")
    _, recs = _tree(project)
    assert {b"", b"a", b"a/b", b"a/b/c", b"a/d", b"a/d/e", b"x"} <= set(recs)
    gone = [f"a/b/c/f{i}.txt".encode() for i in range(30)] + [b"a/b/g.txt", b"a/d/e/h.txt"]
    project.state.update_cache([], gone)
    left = set(_records(project))
    assert not {b"", b"a", b"a/b", b"a/b/c", b"a/d", b"a/d/e"} & left
    assert b"x" in left
    assert project.state.file_records().get(b"a/d/k.txt") is not None
    assert all(project.state.file_records().get(p) is None for p in gone)


def test_a_placed_model_is_trusted_and_a_small_file_is_rechecked(
    project: snapfs.Project, tmp_path: Path
) -> None:
    """place() waits out the racy window for a large file, so no scan reads it again, and
    does not wait for a small one: that is recorded racy, and the next scan re-reads it."""
    from snapfs._hashing import hash_bytes
    from snapfs._index import SETTLE_MIN_SIZE

    big, small = os.urandom(SETTLE_MIN_SIZE), b"{}\n"
    for name, data in (("model.bin", big), ("w.json", small)):
        (tmp_path / name).write_bytes(data)
    project.place(b"models/model.bin", hash_bytes(big), src=tmp_path / "model.bin")
    project.place(b"user/w.json", hash_bytes(small), src=tmp_path / "w.json")
    cache = project.state.load_cache()
    assert not cache[b"models/model.bin"].racy
    assert cache[b"user/w.json"].racy
    project.snapshot()
    assert not project.status()  # both are recorded as what they are


def test_gc_keeps_the_trees_records_name(project: snapfs.Project) -> None:
    root = project.root
    write(root, "x/s/f.txt", "f")
    first, recs1 = _tree(project)
    os.chmod(root / "x/s", 0o700)
    second, recs2 = _tree(project)
    project.restore(first.id)  # puts s's mode back; x's own stat never moved
    # x's record survives and names a tree only the second snapshot holds.
    assert _records(project)[b"x"] == recs2[b"x"] != recs1[b"x"]
    _settle()
    project.gc(keep_within=0)  # only HEAD (the first snapshot) is kept
    assert [s.id for s in project.snapshots()] == [first.id]
    assert recs2[b"x"] in project.state.dir_cache_trees()
    for oid in project.state.dir_cache_trees():
        assert project.state.tree(oid) is not None
    assert not project.status()
    assert project.verify().ok
    third = project.snapshot()
    assert third.root == first.root != second.root
    before = tree_state(root)
    project.restore(third.id)
    assert tree_state(root) == before


def test_a_version_1_index_is_still_read(tmp_path: Path) -> None:
    import xxhash

    rec = RECORD.pack(1, 2, 3, 4, 5, 0o644, b"o" * 16, 0)
    body = rec + b"a/b\0"
    path = tmp_path / "index"
    path.write_bytes(HEADER_V1.pack(MAGIC_V1, 1, xxhash.xxh3_64_intdigest(body)) + body)
    loaded = load_index(path)
    files = loaded.files.data()
    assert list(files) == [b"a/b"] and files[b"a/b"].oid == b"o" * 16
    assert loaded.dirs == {}


def test_a_racy_file_is_never_vouched_for_by_its_directory(project: snapfs.Project) -> None:
    root = project.root
    p = write(root, "d/hot.txt", "1111")
    _tree(project)
    p.write_text("2222")  # in place: d's own stat does not move
    project.snapshot()  # right away: hot.txt's new cache entry is racy
    assert project.state.load_cache()[b"d/hot.txt"].racy
    rec = project.state.load_dir_cache(Ignore.load(root).fingerprint)[b"d"]
    assert rec.files == b""  # so the next scan checks (and re-hashes) hot.txt itself
    st = p.stat()
    p.write_text("3333")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert project.status().modified == ["d/hot.txt"]


def test_no_change_status_leaves_the_file_records_undecoded(project: snapfs.Project) -> None:
    root = project.root
    write(root, "a/b/c.txt", "c")
    write(root, "a/d.txt", "d")
    _tree(project)
    with snapfs.open(root) as p:
        assert not p.status()
        records = p.state.file_records()
        assert records._pos is None and records._data is None  # a white-box check: never read
        os.utime(root / "a/d.txt")
        assert not p.status()  # metadata only: the content is the same
        assert p.state.file_records()._pos is not None  # ...but now the records were consulted


def test_a_freshly_sealed_model_is_not_read_again(tmp_path: Path) -> None:
    """Moving a sealed hardlink into the store changes its inode's ctime. The stat cache, the
    directory records and the seal must all hold the ctime after that move, or the snapshot
    after the first one reads every model again."""
    root = tmp_path / "proj"
    root.mkdir()
    with snapfs.init(root, hardlink_threshold="1MiB") as project:
        model = write(root, "models/big.safetensors", os.urandom(3 << 20))
        write(root, "models/readme.txt", "r")
        _settle()
        project.snapshot()
        cache = project.state.load_cache()
        entry = cache[b"models/big.safetensors"]
        assert entry.ctime_ns == os.lstat(model).st_ctime_ns
        seal = project.store.seal_of(entry.oid)
        assert seal is not None and seal.ctime_ns == os.lstat(model).st_ctime_ns
        rules = Ignore.load(root).fingerprint
        dirs = project.state.load_dir_cache(rules)
        assert dirs[b"models"].files != b""  # its files' stats vouched for at once, as updated
        counting = _CountingCache(cache)
        res = scan(root, ignore=Ignore.load(root), cache=counting, batch=None, dirs=dirs)
        assert res.hashed == 0 and res.trees == {} and counting.lookups == 0


def test_a_restore_writes_the_stat_cache_once_and_it_stays_true(
    project: snapfs.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state left and the state landed both update the cache; it is written once, at the
    end, and then vouches for the restored tree (nothing read again), even if a restore fails
    half-way."""
    from snapfs import _state

    root = project.root
    for i in range(20):
        write(root, f"d{i % 4}/f{i}.txt", f"v1 {i}")
    first = project.snapshot("first")
    write(root, "d0/f0.txt", "v2 changed")
    write(root, "d9/new.txt", "new")
    (root / "d1/f1.txt").unlink()
    _settle()
    saves: list[int] = []
    real = _state.save_index
    monkeypatch.setattr(
        _state,
        "save_index",
        lambda path, files, *a: (saves.append(len(files)), real(path, files, *a)),
    )
    res = project.restore(first.id)
    assert res.pre_restore is not None and len(saves) == 1
    _settle()
    # A fresh process's view: the cache and records give the restored tree, and only the two
    # small files the restore wrote are read again (recorded racy on purpose, see place()).
    with snapfs.open(root) as again:
        ignore = Ignore.load(root)
        s = scan(root, ignore=ignore, cache=again.state.file_records(), batch=None,
                 dirs=again.state.load_dir_cache(ignore.fingerprint))  # fmt: skip
        assert s.root == _full_scan_root(again) == again.resolve(first.id).root
        assert s.hashed <= 2

    # A restore that fails after saving the state it leaves still writes the cache for it.
    write(root, "d2/f2.txt", "v3")
    _settle()
    saves.clear()

    def boom(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(project, "_restore_to", boom)
    with pytest.raises(OSError):
        project.restore(first.id)
    assert len(saves) == 1
    with snapfs.open(root) as again:
        ignore = Ignore.load(root)
        s = scan(root, ignore=ignore, cache=again.state.file_records(), batch=None)
        assert s.hashed == 0  # the cache already knew d2/f2.txt as it is now


def _restored(project: snapfs.Project) -> snapfs.SnapshotInfo:
    """Snapshot a tree, change it (files added, edited, deleted; a new folder), restore it."""
    root = project.root
    for i in range(30):
        write(root, f"d{i % 3}/s{i % 2}/f{i}.txt", f"v1 {i}")
    first = project.snapshot("first")
    write(root, "d0/s0/f0.txt", "v2")
    write(root, "d1/new/n.txt", "n")
    (root / "d2/s1/f5.txt").unlink()
    project.snapshot("changed")
    project.restore(first.id)
    return first


def _rescan(project: snapfs.Project) -> tuple[int, int, bytes]:
    """What the next scan would read: (files hashed, trees rebuilt, root)."""
    ignore = Ignore.load(project.root)
    res = scan(project.root, ignore=ignore, cache=project.state.file_records(), batch=None,
               dirs=project.state.load_dir_cache(ignore.fingerprint))  # fmt: skip
    return res.hashed, len(res.trees), res.root


def test_status_after_a_restore_records_what_it_learned(project: snapfs.Project) -> None:
    first = _restored(project)
    _settle()
    hashed, rebuilt, _root = _rescan(project)
    assert hashed > 0 and rebuilt > 0  # the restore could vouch for neither
    assert not project.status()
    with snapfs.open(project.root) as again:  # another process: it reads what was recorded
        hashed, rebuilt, root = _rescan(again)
        assert (hashed, rebuilt) == (0, 0)
        assert root == _full_scan_root(again) == bytes.fromhex(first.root)
        write(again.root, "d0/s0/f0.txt", "v3")  # and a change after it is still seen
        _settle()
        assert again.status().modified == ["d0/s0/f0.txt"]


def test_status_records_no_content_it_did_not_store(project: snapfs.Project) -> None:
    root = project.root
    write(root, "a/x.txt", "one")
    write(root, "a/y.txt", "y")
    _tree(project)
    write(root, "a/x.txt", "two, never snapshotted")
    _settle()
    before = project.state.load_cache()[b"a/x.txt"]
    assert project.status().modified == ["a/x.txt"]
    assert project.status().modified == ["a/x.txt"]
    assert project.state.load_cache()[b"a/x.txt"] == before  # its object is stored nowhere
    assert b"a" not in _records(project)
    snap = project.snapshot()  # so the snapshot reads it and stores it
    write(root, "a/x.txt", "three")
    project.restore(snap.id)
    assert (root / "a/x.txt").read_text() == "two, never snapshotted"
    assert project.verify().ok


def test_status_never_waits_for_a_writer(project: snapfs.Project) -> None:
    _restored(project)
    _settle()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(project.lock.path)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        index = project.state.index_path.stat()
        t0 = time.monotonic()
        assert not project.status()
        assert time.monotonic() - t0 < 20  # not blocked until the holder gives up (60 s)
        after = project.state.index_path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (index.st_ino, index.st_mtime_ns)
    finally:
        holder.kill()
        holder.communicate()
    assert not project.status()  # the lock is free: now it records
    assert _rescan(project)[:2] == (0, 0)


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""
