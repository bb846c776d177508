"""Regression tests for the defects the fault sweep (test_fault_sweep.py) found, one fault each."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import snapfs
from snapfs._lock import Lock
from tests.fault.test_fault_sweep import snapshot_ids
from tests.helpers import run_cli, write

pytestmark = pytest.mark.fault


def calls(root: Path, *args: str, log: Path) -> list[tuple[str, str]]:
    """The (kind, path) calls of ``snapfs ARGS``, counted with SNAPFS_FAULT_COUNT."""
    log.unlink(missing_ok=True)
    r = run_cli("-C", str(root), *args, env={"SNAPFS_FAULT_COUNT": str(log)})
    assert r.returncode == 0, r.stderr
    return [tuple(ln.split("\t", 1)) for ln in log.read_text().splitlines()]  # type: ignore[misc]


def nth(seq: list[tuple[str, str]], kind: str, where: str) -> int:
    """The number (1-based, among calls of ``kind``) of the first such call on a path with
    ``where`` in it."""
    of_kind = [p for k, p in seq if k == kind]
    return next(i for i, p in enumerate(of_kind, 1) if where in p)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "p"
    root.mkdir()
    write(root, "a.txt", "a")
    write(root, "big.bin", os.urandom(1_200_000))
    assert run_cli("-C", str(root), "init").returncode == 0
    assert run_cli("-C", str(root), "snapshot").returncode == 0
    return root


def test_a_failed_stat_cache_write_does_not_fail_a_recorded_snapshot(
    root: Path, tmp_path: Path
) -> None:
    """Was: the snapshot was committed, then writing .snapfs/index failed and the command said
    it had stopped (exit 3), so a user would take it again. The index is only a cache."""
    write(root, "b.txt", "b")
    seq = calls(root, "snapshot", log=tmp_path / "c")  # the same work as the one that fails
    n = nth(seq, "rename", "/.index-")
    write(root, "c.txt", "c")
    r = run_cli("-C", str(root), "snapshot", env={"SNAPFS_FAULT_AT": f"rename:{n}:ENOSPC"})
    assert r.returncode == 0, r.stderr
    assert snapshot_ids(root) == [1, 2, 3]
    assert not [n for n in os.listdir(root / ".snapfs") if n.startswith(".index-")]
    st = run_cli("-C", str(root), "status", "--json")  # the old index only costs re-hashing
    assert st.returncode == 0 and '"added": []' in st.stdout, st.stdout
    assert run_cli("-C", str(root), "verify").returncode == 0


def test_a_failed_lock_note_does_not_leak_the_held_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: writing the holder's note into the lock file raised after the flock was taken, and
    the fd holding it leaked: the next acquire in the same process waited for ever."""
    lock = Lock(tmp_path / "lock", "project")
    real = os.pwrite

    def full(fd: int, data: bytes, at: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    lock.acquire(wait=False, purpose="snapshot")  # the note is best effort
    lock.release()
    monkeypatch.setattr(os, "pwrite", real)
    other = Lock(tmp_path / "lock", "project")
    other.acquire(wait=False)  # raised LockBusy (or hung, waiting) while the fd leaked
    other.release()


def test_an_os_error_names_the_command_and_a_file_descriptor_error_its_file(
    root: Path, tmp_path: Path
) -> None:
    """Was: 'The command stopped: the disk is full (?)' for a failed write or fsync on a file
    descriptor (the kernel's error names no file) of any command."""
    write(root, "b.txt", "b")
    seq = calls(root, "snapshot", log=tmp_path / "c")  # the same work as the one that fails
    n = nth(seq, "fsync", ".pack")
    write(root, "c.txt", "c")
    r = run_cli("-C", str(root), "snapshot", env={"SNAPFS_FAULT_AT": f"fsync:{n}:EIO"})
    assert r.returncode == 3
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, line
    assert "'snapfs snapshot' stopped" in line and ".pack)" in line and "(?)" not in line, line
    assert snapshot_ids(root) == [1, 2]


def test_the_fault_seam_is_inert_unless_asked_for() -> None:
    from snapfs import _faults

    assert not _faults.active and not _faults._installed
    assert os.open.__module__ == "posix" and snapfs is not None  # nothing wrapped
    with pytest.raises(ValueError, match="KIND:N"):
        _faults.parse("rename:zero:ENOSPC")
    assert _faults.parse("write:3+:EIO") == ("write", 3, True, errno.EIO)
