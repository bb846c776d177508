"""Restores that stage and remove with threads: many files, deep and wide trees, kept paths,
read-only directories, links out of the project, and what a restored model leaves in the caches."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

import snapfs
from snapfs._fsops import DIR_FLAGS, _TreeRemover, remove_entry
from snapfs._ignore import Ignore
from snapfs._scan import scan
from snapfs._threads import LazyPool
from tests.helpers import tree_state, write


@pytest.fixture
def pool() -> LazyPool:
    p = LazyPool(max_workers=4)
    yield p  # type: ignore[misc]
    p.shutdown()


def _remove(parent: Path, name: str, pool: LazyPool, keep=None) -> bool:  # type: ignore[no-untyped-def]
    fd = os.open(parent, DIR_FLAGS)
    try:
        return remove_entry(fd, name.encode(), keep, name.encode(), pool)
    finally:
        os.close(fd)


def test_a_wide_and_deep_tree_is_removed_with_threads(tmp_path: Path, pool: LazyPool) -> None:
    top = tmp_path / "plugin"
    assert _TreeRemover.MAX_OPEN < 150 and _TreeRemover.BATCH < 150 * 12
    for d in range(150):  # more finished directories than stay open between batches
        for f in range(12):
            write(top, f"d{d}/sub/f{f}.py", f"{d}/{f}")
    deep = top
    for i in range(120):  # deeper than a batch's worth of open directories
        deep = deep / f"l{i}"
    write(deep, "leaf.txt", "leaf")
    os.symlink("/etc", top / "outside")  # a link out of the tree is removed, never followed
    write(tmp_path, "sibling.txt", "stays")
    before = os.listdir("/etc")
    assert _remove(tmp_path, "plugin", pool)
    assert sorted(os.listdir(tmp_path)) == ["sibling.txt"]
    assert os.listdir("/etc") == before


def test_no_directory_fd_is_left_open(tmp_path: Path, pool: LazyPool) -> None:
    for d in range(200):
        write(tmp_path, f"t/d{d}/x/y/f.txt", "f")
    fds = set(os.listdir("/proc/self/fd"))
    assert _remove(tmp_path, "t", pool)
    assert set(os.listdir("/proc/self/fd")) - fds == set()


def test_kept_paths_and_their_parents_stay(tmp_path: Path, pool: LazyPool) -> None:
    for d in range(80):
        write(tmp_path, f"t/d{d}/a.py", "a")
    write(tmp_path, "t/d7/cache/x.log", "log")
    write(tmp_path, "t/d9/deep/er/y.log", "log")

    def keep(rel: bytes) -> bool:
        return rel.endswith(b".log")

    assert not _remove(tmp_path, "t", pool, keep)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [
        "t",
        "t/d7",
        "t/d7/cache",
        "t/d7/cache/x.log",
        "t/d9",
        "t/d9/deep",
        "t/d9/deep/er",
        "t/d9/deep/er/y.log",
    ]


def test_read_only_directories_are_opened_up_and_removed(tmp_path: Path, pool: LazyPool) -> None:
    for d in range(70):
        write(tmp_path, f"t/d{d}/f.txt", "f")
        os.chmod(tmp_path / f"t/d{d}", 0o555)
    assert _remove(tmp_path, "t", pool)
    assert not (tmp_path / "t").exists()


def test_an_unlink_failure_is_raised_and_fds_are_closed(
    tmp_path: Path, pool: LazyPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for d in range(100):
        write(tmp_path, f"t/d{d}/f.txt", "f")
    real = os.unlink

    def failing(name: bytes, *, dir_fd: int | None = None) -> None:
        if name == b"f.txt" and os.fstat(dir_fd or 0).st_ino == os.stat(tmp_path / "t/d42").st_ino:
            raise PermissionError(13, "Permission denied", name)
        real(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", failing)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        _remove(tmp_path, "t", pool)
    assert set(os.listdir("/proc/self/fd")) - fds == set()
    assert (tmp_path / "t/d42/f.txt").exists()


def test_a_restore_of_many_files_is_exact(project: snapfs.Project) -> None:
    root = project.root
    for d in range(30):
        for f in range(10):
            write(root, f"custom_nodes/p{d}/m{f}.py", f"{d}-{f}")
    write(root, "models/a.bin", os.urandom(100_000))
    os.symlink("models/a.bin", root / "link")
    first = project.snapshot()
    want = tree_state(root)
    for d in range(0, 30, 2):
        for f in range(10):
            write(root, f"custom_nodes/p{d}/m{f}.py", f"changed {d}-{f}")
    for d in range(40):
        write(root, f"custom_nodes/new/d{d}/x.py", "new")
    project.snapshot()
    project.restore(first.id)
    assert tree_state(root) == want


def test_a_missing_object_among_many_stops_the_restore_before_any_change(
    project: snapfs.Project,
) -> None:
    root = project.root
    for f in range(60):
        write(root, f"pkg/m{f}.py", f"content {f} " * 10)
    first = project.snapshot()
    lost = project.state.load_cache()[b"pkg/m0.py"].oid
    for f in range(60):
        write(root, f"pkg/m{f}.py", f"other {f}")
    project.snapshot()
    before = tree_state(root)
    project.store.db.execute("DELETE FROM packed WHERE oid = ?", (lost,))
    project.store.db.commit()
    project.store._packed_oids = None
    with pytest.raises(snapfs.ObjectMissing, match="pkg/m0.py"):
        project.restore(first.id)
    assert tree_state(root) == before
    assert not any((project.state_dir / "staging").iterdir())


def test_a_restored_model_is_not_read_again(tmp_path: Path) -> None:
    """A model restored as a hardlink to its sealed object: the link and the rename move the
    inode's ctime, which the seal and the stat cache must follow."""
    root = tmp_path / "proj"
    root.mkdir()
    with snapfs.init(root, hardlink_threshold="1MiB") as project:
        write(root, "models/big.safetensors", os.urandom(3 << 20))
        time.sleep(0.05)
        first = project.snapshot()
        (root / "models/big.safetensors").unlink()
        project.snapshot()
        project.restore(first.id)
        model = root / "models/big.safetensors"
        entry = project.state.load_cache()[b"models/big.safetensors"]
        assert entry.ctime_ns == os.lstat(model).st_ctime_ns and not entry.racy
        seal = project.store.seal_of(entry.oid)
        assert seal is not None and seal.ctime_ns == os.lstat(model).st_ctime_ns
        assert not os.lstat(model).st_mode & stat.S_IWUSR
        res = scan(root, ignore=Ignore.load(root), cache=project.state.load_cache(), batch=None)
        assert res.hashed == 0
