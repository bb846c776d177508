"""Snapshot and restore on real directories: exactness, minimal touching, the stat cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import snapfs
from snapfs._ignore import Ignore
from snapfs._scan import scan
from tests.helpers import corrupt_object, delete_object, tree_state, write


def _populate(root: Path) -> None:
    write(root, "a/b/c.txt", "hello")
    write(root, "a/run.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    write(root, "private.key", "secret", mode=0o600)
    write(root, "big.bin", os.urandom(3 << 20))
    write(root, "compressible.txt", "abc" * 100_000)
    (root / "empty" / "deeper").mkdir(parents=True)
    os.symlink("a/b/c.txt", root / "link")
    os.symlink("../../nowhere", root / "dangling")
    os.mkdir(root / "ro")
    write(root, "ro/inside", "x")
    os.chmod(root / "ro", 0o555)


def test_restore_is_exact_after_every_kind_of_change(project: snapfs.Project) -> None:
    root = project.root
    _populate(root)
    before = tree_state(root)
    snap = project.snapshot("base")
    assert snap.files == 6

    os.chmod(root / "ro", 0o755)
    (root / "a/b/c.txt").write_text("changed")
    os.chmod(root / "a/run.sh", 0o644)  # mode-only change
    os.unlink(root / "private.key")
    (root / "private.key").mkdir()  # file -> dir
    write(root, "private.key/nested", "n")
    os.unlink(root / "link")
    os.mkdir(root / "link")  # symlink -> dir
    os.rmdir(root / "empty/deeper")
    os.rmdir(root / "empty")
    write(root, "empty", "now a file")  # dir -> file
    os.unlink(root / "dangling")
    os.symlink("elsewhere", root / "dangling")  # retargeted link
    write(root, "new/dir/file", "new")
    os.remove(root / "big.bin")

    ch = project.status()
    assert "a/b/c.txt" in ch.modified and "a/run.sh" in ch.modified
    assert "big.bin" in ch.deleted and "new/dir/file" in ch.added

    res = project.restore(snap.id)
    assert res.pre_restore is not None
    assert tree_state(root) == before
    assert not project.status()
    # The broken state itself was saved and is restorable.
    broken = tree_state(root)
    project.restore(res.pre_restore)
    assert tree_state(root) != broken
    project.restore(snap.id)
    assert tree_state(root) == before


def test_restore_touches_only_paths_that_differ(project: snapfs.Project) -> None:
    root = project.root
    for i in range(200):
        write(root, f"pkg/m{i}.py", f"# module {i}\n")
    snap = project.snapshot()
    inodes = {p.name: p.stat().st_ino for p in (root / "pkg").iterdir()}
    for i in (3, 50, 199):
        (root / f"pkg/m{i}.py").write_text("broken")
    res = project.restore(snap.id)
    assert res.changed == 3
    changed = {p.name for p in (root / "pkg").iterdir() if p.stat().st_ino != inodes[p.name]}
    assert changed == {"m3.py", "m50.py", "m199.py"}


def test_odd_names_round_trip(project: snapfs.Project) -> None:
    root = project.root
    rootb = os.fsencode(root)
    names = [b"caf\xc3\xa9", b"bad\xff\xfename", b"new\nline", b"x" * 255, "日本語.txt".encode()]
    for n in names:
        with open(rootb + b"/" + n, "wb") as f:
            f.write(n)
    deep = rootb
    for _ in range(30):
        deep += b"/" + b"d" * 100
    os.makedirs(deep)
    with open(deep + b"/leaf", "wb") as f:
        f.write(b"leaf")
    before = tree_state(root)
    snap = project.snapshot()
    for n in names:
        os.unlink(rootb + b"/" + n)
    ch = project.status()
    assert os.fsdecode(b"bad\xff\xfename") in ch.deleted
    project.restore(snap.id)
    assert tree_state(root) == before


def test_stat_cache_skips_unchanged_files(project: snapfs.Project) -> None:
    root = project.root
    for i in range(50):
        write(root, f"f{i}", f"content {i}")
    time.sleep(0.1)  # past the racy window, so the cache entries can be trusted
    project.snapshot()
    assert not any(e.racy for e in project.state.load_cache().values())
    res = scan(root, ignore=Ignore.load(root), cache=project.state.load_cache(), batch=None)
    assert res.hashed == 0 and res.files == 50
    write(root, "f7", "edited content")
    res = scan(root, ignore=Ignore.load(root), cache=project.state.load_cache(), batch=None)
    assert res.hashed == 1


def test_content_change_with_mtime_reset_is_seen(project: snapfs.Project) -> None:
    root = project.root
    p = write(root, "model.cfg", "aaaa")
    st = p.stat()
    snap = project.snapshot()
    p.write_text("bbbb")  # same size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime moves anyway
    assert project.status().modified == ["model.cfg"]
    project.restore(snap.id)
    assert p.read_text() == "aaaa"


def test_racy_clean_file_is_rehashed(project: snapfs.Project) -> None:
    root = project.root
    p = write(root, "hot.txt", "1111")
    project.snapshot()  # written moments ago: its cache entry must be marked racy
    entry = project.state.load_cache()[b"hot.txt"]
    assert entry.racy
    # Rewrite within the same timestamp and size: only re-hashing can notice.
    st = p.stat()
    p.write_text("2222")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert project.status().modified == ["hot.txt"]


def test_ignore_rules(project: snapfs.Project) -> None:
    root = project.root
    write(root, ".snapfsignore", "*.log\ncache/\n")
    write(root, "keep.txt", "k")
    write(root, "run.log", "log 1")
    write(root, "cache/blob", "c")
    write(root, "sub/cache/blob", "c")
    snap = project.snapshot()
    assert snap.files == 2  # .snapfsignore and keep.txt
    (root / "run.log").write_text("log 2")
    write(root, "extra.txt", "e")
    project.restore(snap.id)
    assert (root / "run.log").read_text() == "log 2"  # ignored: never reverted
    assert (root / "cache/blob").exists() and not (root / "extra.txt").exists()


def test_restore_keeps_ignored_files_inside_removed_dirs(project: snapfs.Project) -> None:
    root = project.root
    write(root, ".snapfsignore", "__pycache__/\n")
    snap = project.snapshot()
    write(root, "plugin/mod.py", "x")
    write(root, "plugin/__pycache__/mod.pyc", "compiled")
    project.restore(snap.id)
    assert not (root / "plugin/mod.py").exists()
    assert (root / "plugin/__pycache__/mod.pyc").exists()


def test_corrupt_object_named_by_verify_and_refused_by_restore(project: snapfs.Project) -> None:
    root = project.root
    write(root, "weights.bin", os.urandom(100_000))
    write(root, "other.txt", "fine")
    snap = project.snapshot()
    oid = project.state.load_cache()[b"weights.bin"].oid
    corrupt_object(project.store, oid, at=10)
    rep = project.verify()
    assert not rep.ok
    assert any("weights.bin" in p for prob in rep.problems for p in prob.paths)
    os.unlink(root / "weights.bin")
    (root / "other.txt").write_text("changed")
    state = tree_state(root)
    with pytest.raises(snapfs.ObjectCorrupt, match="weights.bin"):
        project.restore(snap.id)
    assert tree_state(root) == state  # nothing was touched


def test_missing_object_refused_by_name(project: snapfs.Project) -> None:
    root = project.root
    write(root, "a.txt", "a" * 10_000)
    snap = project.snapshot()
    oid = project.state.load_cache()[b"a.txt"].oid
    delete_object(project.store, oid)
    os.unlink(root / "a.txt")
    with pytest.raises(snapfs.ObjectMissing, match="a.txt"):
        project.restore(snap.id)
    assert not (root / "a.txt").exists()


def test_hardlink_mode_seals_and_detects_in_place_writes(project_dir: Path) -> None:
    root = project_dir
    big = write(root, "models/m.safetensors", os.urandom(1 << 20))
    with snapfs.init(root, hardlink_threshold="512KiB") as p:
        snap = p.snapshot()
        assert snap.new_bytes == 0  # linked, not copied
        assert big.stat().st_nlink == 2
        assert big.stat().st_mode & 0o222 == 0  # sealed read-only
        assert not p.status()  # the seal is not a change
        os.chmod(big, 0o644)
        with open(big, "r+b") as f:
            f.write(b"overwritten")
        rep = p.verify()
        assert [pr.kind for pr in rep.problems] == ["tampered"]
        assert "models/m.safetensors" in rep.problems[0].paths[0]
        with pytest.raises(snapfs.ObjectCorrupt, match="m.safetensors"):
            p.restore(snap.id)


def test_hardlink_restore_round_trip(project_dir: Path) -> None:
    root = project_dir
    data = os.urandom(1 << 20)
    m = write(root, "models/m.bin", data)
    with snapfs.init(root, hardlink_threshold="512KiB") as p:
        snap = p.snapshot()
        os.unlink(m)
        p.restore(snap.id)
        assert m.read_bytes() == data
        assert not p.status()
        assert p.verify().ok


def test_gc_keeps_what_kept_snapshots_need(project: snapfs.Project) -> None:
    root = project.root
    write(root, "a", os.urandom(50_000))
    s1 = project.snapshot()
    write(root, "a", os.urandom(50_000))
    project.snapshot()
    write(root, "a", os.urandom(50_000))
    s3 = project.snapshot()
    dry = project.gc(keep_last=1, dry_run=True)
    assert dry.deleted_snapshots == [1, 2] and dry.objects == 2 and dry.freed_bytes > 0
    assert [s.id for s in project.snapshots()] == [1, 2, 3]
    rep = project.gc(keep_last=1)
    assert rep.deleted_snapshots == [1, 2]
    assert [s.id for s in project.snapshots()] == [s3.id]
    assert project.verify().ok
    with pytest.raises(snapfs.SnapshotNotFound):
        project.restore(s1.id)


def test_ids_latest_and_relative(project: snapfs.Project) -> None:
    write(project.root, "f", "1")
    project.snapshot("one")
    write(project.root, "f", "2")
    project.snapshot("two")
    assert project.resolve("latest").label == "two"
    assert project.resolve("latest~1").label == "one"
    for bad in ("latest~2", "0", "abc", "-1", "7"):
        with pytest.raises(snapfs.SnapshotNotFound):
            project.resolve(bad)


def test_shared_store_dedups_across_projects(tmp_path: Path) -> None:
    store = tmp_path / "store"
    data = os.urandom(200_000)
    projects = []
    for name in ("p1", "p2"):
        d = tmp_path / name
        d.mkdir()
        write(d, "model.bin", data)
        projects.append(snapfs.init(d, store=store))
    s1 = projects[0].snapshot()
    s2 = projects[1].snapshot()
    assert s1.new_objects == 1 and s2.new_objects == 0
    # gc in one project never deletes what the other needs.
    os.unlink(tmp_path / "p1/model.bin")
    projects[0].snapshot()
    projects[0].gc(keep_last=1)
    assert projects[1].verify().ok
    os.unlink(tmp_path / "p2/model.bin")
    projects[1].restore(s2.id)
    assert (tmp_path / "p2/model.bin").read_bytes() == data
    for p in projects:
        p.close()


def test_hardlinks_without_the_readonly_seal_keep_modes_exact(project_dir: Path) -> None:
    root = project_dir
    m = write(root, "models/m.bin", os.urandom(1 << 20), mode=0o640)
    before = tree_state(root)
    with snapfs.init(root, hardlink_threshold="512KiB", seal_readonly=False) as p:
        snap = p.snapshot()
        assert m.stat().st_nlink == 2 and tree_state(root) == before  # linked, mode untouched
        os.unlink(m)
        p.restore(snap.id)
        assert tree_state(root) == before
        with open(m, "r+b") as f:  # detection still works without the write bits gone
            f.write(b"in place")
        assert [pr.kind for pr in p.verify().problems] == ["tampered"]


def test_a_whole_second_mtime_alone_does_not_make_a_file_racy(project: snapfs.Project) -> None:
    # tar, cp -p and unpackers set whole-second mtimes on fine-grained filesystems; only the
    # kernel-set ctime tells the filesystem's clock apart.
    p = write(project.root, "pinned.bin", "x")
    os.utime(p, ns=(1_704_067_200_000_000_000, 1_704_067_200_000_000_000))
    if os.stat(p).st_ctime_ns % 1_000_000_000 == 0:
        pytest.skip(reason="this filesystem keeps whole-second ctimes")
    time.sleep(0.1)  # past the fine-grained racy window, well within the coarse one
    project.snapshot()
    assert not project.state.load_cache()[b"pinned.bin"].racy


def test_is_racy_judges_each_timestamp_by_its_own_granularity() -> None:
    from types import SimpleNamespace

    from snapfs._scan import is_racy

    start = 1_800_000_000_500_000_000
    old = 1_704_067_200_000_000_000  # whole second, long ago

    def st(mtime: int, ctime: int) -> os.stat_result:
        return SimpleNamespace(st_mtime_ns=mtime, st_ctime_ns=ctime)  # type: ignore[return-value]

    assert not is_racy(st(old, start - 100_000_000), start)  # fine ctime, 100 ms ago
    assert is_racy(st(old, start - 10_000_000), start)  # fine ctime, 10 ms ago
    assert is_racy(st(old, 1_800_000_000_000_000_000), start)  # whole-second ctime 0.5 s ago
    assert is_racy(st(1_800_000_000_000_000_000, start - 1_000_000_000), start)  # coarse mtime
    assert not is_racy(st(1_799_999_997_000_000_000, 1_799_999_997_000_000_000), start)


def test_restore_makes_head_durable_with_its_renames_before_the_intent_goes(
    project: snapfs.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD is committed without an fsync of its own; the WAL is fsynced with the renames'
    barrier, and only then is the intent removed. A power cut in between must not leave the
    intent gone but HEAD on the old snapshot."""
    write(project.root, "f.txt", "one")
    first = project.snapshot("one")
    write(project.root, "f.txt", "two")
    project.snapshot("two")
    wal = project.state.wal_file()
    assert wal is not None and wal.exists()

    events: list[str] = []
    real_set_meta, real_fsync, real_unlink = project.state.set_meta, os.fsync, os.unlink

    def set_meta(key: str, value: str | None, *, durable: bool = True) -> None:
        real_set_meta(key, value, durable=durable)
        if key == "head":
            events.append(f"head={value} durable={durable}")

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(wal):
            events.append("wal fsynced")

    def unlink(path: str | os.PathLike[str], *a: object, **k: object) -> None:
        real_unlink(path, *a, **k)  # type: ignore[arg-type]
        if os.fspath(path).endswith("intent.json"):
            events.append("intent removed")

    monkeypatch.setattr(project.state, "set_meta", set_meta)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    project.restore(first.id)
    assert events == [f"head={first.id} durable=False", "wal fsynced", "intent removed"]
    assert (project.root / "f.txt").read_text() == "one"


def test_restore_sets_head_on_a_database_not_in_wal_mode(project: snapfs.Project) -> None:
    """Where SQLite runs without WAL, HEAD gets a durable commit of its own, as before."""
    write(project.root, "f.txt", "one")
    first = project.snapshot("one")
    write(project.root, "f.txt", "two")
    project.snapshot("two")
    assert project.state.db.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    assert project.state.wal_file() is None
    project.restore(first.id)
    assert project.state.head == first.id
    with snapfs.open(project.root) as again:
        assert again.state.head == first.id
    assert (project.root / "f.txt").read_text() == "one"
