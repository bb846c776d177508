"""Link strategies for real: reflinks on an XFS loop mount (root only), the hardlink path and a
forced reflink on the non-reflink temp filesystem (ext4 here)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapfs
from snapfs._fsops import FICLONE
from tests.helpers import tree_state, write

MB = 1_000_000
BIG = 20 * MB


def _free_bytes(path: Path) -> int:
    os.sync()  # delayed allocation: let the filesystem settle its block accounting first
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def _reflink_works(directory: Path) -> bool:
    a, b = directory / ".probe-a", directory / ".probe-b"
    a.write_bytes(b"probe" * 1000)
    try:
        with open(a, "rb") as src, open(b, "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    return False
                raise
        return True
    finally:
        a.unlink()
        b.unlink(missing_ok=True)


@pytest.fixture
def xfs_project(xfs_mount: Path) -> Iterator[Path]:
    """A fresh project dir on the shared XFS mount, removed afterwards to give the space back."""
    d = xfs_mount / f"proj-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_reflink_dir(project_dir: Path) -> Path:
    if _reflink_works(project_dir.parent):
        pytest.skip(reason="the temp filesystem supports reflinks; these tests need one that doesn't")
    return project_dir


# ---- XFS with reflink=1 -------------------------------------------------------------------------


@pytest.mark.xfs
def test_snapshot_on_xfs_shares_extents_instead_of_copying(xfs_project: Path) -> None:
    root = xfs_project
    big = os.urandom(BIG)
    write(root, "models/big.safetensors", big)
    write(root, "workflow.json", '{"nodes": []}')
    write(root, "src/node.py", "def f(): pass\n")
    os.symlink("models/big.safetensors", root / "current-model")
    before = tree_state(root)

    with snapfs.init(root) as p:
        free0 = _free_bytes(root)
        s1 = p.snapshot()
        free1 = _free_bytes(root)
        assert s1.files == 3 and s1.bytes >= BIG
        # The 20 MB file adds (almost) nothing: only the small files and the state are new.
        assert s1.new_bytes < BIG // 100
        assert free0 - free1 < BIG // 10, f"snapshot used {free0 - free1} bytes of disk"

        write(root, "models/second.bin", os.urandom(BIG))
        s2 = p.snapshot()
        assert s2.new_bytes == 0  # a large file that is only reflinked costs nothing

        os.unlink(root / "models/second.bin")
        os.unlink(root / "models/big.safetensors")
        free2 = _free_bytes(root)
        p.restore(s1.id)
        assert tree_state(root) == before
        # Restoring from the store clones too: 20 MB back in place for (almost) no space.
        assert free2 - _free_bytes(root) < BIG // 10
        assert p.verify().ok


@pytest.mark.xfs
def test_in_place_write_after_a_reflink_snapshot_leaves_the_snapshot_intact(
    xfs_project: Path,
) -> None:
    root = xfs_project
    original = os.urandom(BIG)
    f = write(root, "model.bin", original)
    with snapfs.init(root) as p:
        snap = p.snapshot()
        with open(f, "r+b") as fh:  # in place: same inode, same size
            fh.seek(5 * MB)
            fh.write(b"\xff" * 65536)
        assert f.stat().st_size == BIG
        assert p.status().modified == ["model.bin"]
        assert p.verify().ok  # copy-on-write kept the stored clone untouched

        p.restore(snap.id)
        assert f.read_bytes() == original
        assert not p.status()

        # The restored file is a clone too: writing into it must not reach the store either.
        with open(f, "r+b") as fh:
            fh.write(b"\0" * 4096)
        assert p.verify().ok
        p.restore(snap.id)
        assert f.read_bytes() == original


@pytest.mark.xfs
def test_link_mode_copy_on_xfs_copies(xfs_project: Path) -> None:
    root = xfs_project
    data = os.urandom(BIG)
    write(root, "model.bin", data)
    with snapfs.init(root, link_mode="copy") as p:
        free0 = _free_bytes(root)
        snap = p.snapshot()
        used = free0 - _free_bytes(root)
        assert snap.new_bytes >= BIG
        assert used >= BIG * 9 // 10, f"a copy should use the file's size on disk, used {used}"
        assert (root / "model.bin").stat().st_nlink == 1
        os.unlink(root / "model.bin")
        p.restore(snap.id)
        assert (root / "model.bin").read_bytes() == data


# ---- ext4 (or any filesystem without reflink) ---------------------------------------------------


def test_forced_reflink_where_unsupported_is_a_clear_error(no_reflink_dir: Path) -> None:
    root = no_reflink_dir
    write(root, "model.bin", os.urandom(2 * MB))
    write(root, "small.txt", "s")
    state = tree_state(root)
    with snapfs.init(root, link_mode="reflink") as p:
        with pytest.raises(snapfs.SnapfsError) as info:
            p.snapshot()
        assert "can't make reflinks" in str(info.value) and "link_mode" in str(info.value)
        assert p.snapshots() == []
        tmp = p.store.root / "tmp"
        assert not tmp.exists() or os.listdir(tmp) == []  # no half-written objects left
    assert tree_state(root) == state
    # The store is still usable with a mode this filesystem has.
    with snapfs.open(root, link_mode="auto") as p:
        snap = p.snapshot()
        assert snap.files == 2
        assert p.verify().ok


def test_hardlink_above_the_threshold(no_reflink_dir: Path) -> None:
    root = no_reflink_dir
    data = os.urandom(2 << 20)
    big = write(root, "models/big.bin", data)
    with snapfs.init(root, hardlink_threshold="1MiB") as p:
        snap = p.snapshot()
        assert snap.new_bytes == 0  # linked into the store, not copied
        assert big.stat().st_nlink == 2
        assert not p.status()

        small = write(root, "models/small.bin", os.urandom(100_000))  # below the threshold
        p.snapshot()
        assert small.stat().st_nlink == 1
        assert big.stat().st_nlink == 2

        os.unlink(big)
        p.restore(snap.id)
        assert big.read_bytes() == data
        assert p.verify().ok


def test_a_clone_is_hashed_from_the_settled_live_file_or_else_from_itself(
    xfs_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reflinked model is hashed from the live file (its pages are cached; the clone's are
    not) only when that provably reads the cloned bytes. Here the file is written while it is
    read: the digest must then be the clone's, which is the content at the time of the clone."""
    import time

    import snapfs._objects as objects

    model = write(xfs_project, "models/m.bin", os.urandom(3 * MB))
    original = model.read_bytes()
    old = time.time() - 60
    os.utime(model, (old, old))
    time.sleep(0.05)  # the ctime utime just moved must age past the racy window too
    real = objects.hash_fd
    calls: list[int] = []

    def hash_then_write(fd: int) -> tuple[bytes, int]:
        got = real(fd)
        if not calls:  # the first read is the live file's: someone writes meanwhile
            with open(model, "r+b") as f:
                f.write(b"changed!")
        calls.append(fd)
        return got

    monkeypatch.setattr(objects, "hash_fd", hash_then_write)
    with snapfs.init(xfs_project, link_mode="reflink") as p:
        snap = p.snapshot()
        monkeypatch.setattr(objects, "hash_fd", real)
        assert len(calls) == 2, "read the live file, then the clone"
        model.write_bytes(b"gone")
        p.restore(snap.id)
    assert model.read_bytes() == original


def test_a_settled_clone_is_read_once(xfs_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import snapfs._objects as objects

    model = write(xfs_project, "models/m.bin", os.urandom(3 * MB))
    old = time.time() - 60
    os.utime(model, (old, old))
    time.sleep(0.05)
    real = objects.hash_fd
    calls: list[int] = []

    def counting(fd: int) -> tuple[bytes, int]:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(objects, "hash_fd", counting)
    with snapfs.init(xfs_project, link_mode="reflink") as p:
        p.snapshot()
        assert len(calls) == 1
        assert p.verify().ok
