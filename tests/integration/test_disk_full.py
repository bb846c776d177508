"""Faults from the real world: a disk that fills up mid-snapshot, files that grow or vanish while
a snapshot reads them. Every case must end in a consistent store and a clear message."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import snapfs
from tests.helpers import TreeState, run_cli, tree_state, write

pytestmark = pytest.mark.fault

MiB = 1 << 20


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def state_leftovers(root: Path) -> list[str]:
    state = root / ".snapfs"
    found = [f"tmp/{n}" for n in os.listdir(state / "tmp")] if (state / "tmp").exists() else []
    found += [f"staging/{n}" for n in os.listdir(state / "staging")]
    found += [n for n in os.listdir(state) if n.startswith(".")]  # temp files of atomic writes
    return found


def snapshot_ids(root: Path) -> list[int]:
    r = run_cli("-C", str(root), "list", "--json")
    assert r.returncode == 0, r.stderr
    return [s["id"] for s in json.loads(r.stdout)]


def assert_one_line_disk_full(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    assert "disk is full" in lines[0], lines[0]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


# ---- disk full ------------------------------------------------------------------------------


def test_snapshot_on_a_full_disk_fails_cleanly_and_succeeds_after_freeing_space(
    small_fs: Path,
) -> None:
    """8 MiB filesystem: the first snapshot fits; the second one's copy does not, until space is
    freed. Every byte of project data costs twice here (the tree and its copy in the store), so
    ~4 MiB of incompressible data is all an 8 MiB disk can snapshot."""
    root = small_fs / "proj"
    root.mkdir()
    write(root, "a.bin", os.urandom(MiB))  # incompressible
    for i in range(50):
        write(root, f"src/m{i}.py", os.urandom(500))
    assert run_cli("-C", str(root), "init").returncode == 0
    r = run_cli("-C", str(root), "snapshot", "-m", "fits")
    assert r.returncode == 0, r.stderr
    first = tree_state(root)

    write(root, "b.bin", os.urandom(MiB))
    write(root, "c.bin", os.urandom(768 << 10))
    write(root, "models/d.bin", os.urandom(256 << 10))
    for i in range(50):
        write(root, f"src/new{i}.py", os.urandom(500))
    needed = 2 * MiB + 50 * 500
    room = free_bytes(small_fs)
    assert room > needed + MiB, f"the test needs room for the snapshot once space is freed ({room})"
    # Leave ~1 MiB: the copy of b.bin may fit, the rest does not.
    filler = write(small_fs, "filler", os.urandom(room - MiB))
    second = tree_state(root)
    before = free_bytes(small_fs)
    assert before < needed, "the test needs the next snapshot to overflow the disk"

    r = run_cli("-C", str(root), "snapshot", "-m", "overflows")
    assert_one_line_disk_full(r)
    assert r.stdout == ""
    assert tree_state(root) == second, "a failed snapshot changed the project"
    assert snapshot_ids(root) == [1]
    v = run_cli("-C", str(root), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    assert state_leftovers(root) == []
    # Nothing the failed snapshot wrote is left anywhere else either.
    assert free_bytes(small_fs) >= before - (64 << 10), (free_bytes(small_fs), before)

    filler.unlink()
    r = run_cli("-C", str(root), "snapshot", "-m", "after freeing space")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "2"
    v = run_cli("-C", str(root), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    assert state_leftovers(root) == []
    for sid, want in (("1", first), ("2", second)):
        r = run_cli("-C", str(root), "restore", sid, "--yes")
        assert r.returncode == 0, r.stderr
        assert tree_state(root) == want


def _restore_scenario(small_fs: Path) -> tuple[Path, TreeState]:
    root = small_fs / "proj"
    root.mkdir()
    write(root, "a.bin", os.urandom(MiB))
    write(root, "b.bin", os.urandom(MiB))
    write(root, "keep.txt", "k")
    assert run_cli("-C", str(root), "init").returncode == 0
    assert run_cli("-C", str(root), "snapshot").returncode == 0
    target = tree_state(root)
    os.unlink(root / "a.bin")
    os.unlink(root / "b.bin")
    write(root, "keep.txt", "changed")
    assert run_cli("-C", str(root), "snapshot").returncode == 0  # the pre-restore state is stored
    return root, target


def _fill(small_fs: Path, leave: int) -> Path:
    """Fill the filesystem until only ``leave`` bytes are free (0: up to the last block)."""
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        try:
            while free_bytes(small_fs) > leave:
                f.write(os.urandom(min(64 << 10, max(4096, free_bytes(small_fs) - leave))))
                f.flush()
        except OSError:
            pass
    return filler


def test_restore_without_room_to_stage_changes_nothing(small_fs: Path) -> None:
    """Restore stages every file before touching the project; a full disk stops it there."""
    root, target = _restore_scenario(small_fs)
    filler = _fill(small_fs, leave=512 << 10)  # room for SQLite, not for the 2 MiB to stage
    current = tree_state(root)

    r = run_cli("-C", str(root), "restore", "1", "--yes")
    assert_one_line_disk_full(r)
    assert tree_state(root) == current, "a failed restore changed the project"
    assert state_leftovers(root) == []

    filler.unlink()
    r = run_cli("-C", str(root), "restore", "1", "--yes")
    assert r.returncode == 0, r.stderr
    assert tree_state(root) == target
    assert run_cli("-C", str(root), "verify").returncode == 0


@pytest.mark.parametrize("command", [["restore", "1", "--yes"], ["snapshot"]])
def test_commands_on_a_completely_full_disk_say_the_disk_is_full(
    small_fs: Path, command: list[str]
) -> None:
    """Not one free block: the message must still say what is wrong, not blame the state file."""
    root, target = _restore_scenario(small_fs)
    write(root, "new.bin", os.urandom(256 << 10))
    filler = _fill(small_fs, leave=0)
    current = tree_state(root)

    r = run_cli("-C", str(root), *command)
    assert_one_line_disk_full(r)
    assert tree_state(root) == current
    assert "damaged" not in r.stderr and "backup" not in r.stderr

    filler.unlink()
    assert run_cli("-C", str(root), "verify").returncode == 0
    assert state_leftovers(root) == []
    r = run_cli("-C", str(root), *command)
    assert r.returncode == 0, r.stderr


# ---- files changing under a snapshot --------------------------------------------------------


class Appender(threading.Thread):
    """Appends to a file until stopped: a log or a download still being written."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="test-appender")
        self.path = path
        self.stop = threading.Event()
        self.chunks = 0

    def run(self) -> None:
        rng = random.Random(3)
        with open(self.path, "ab") as f:
            while not self.stop.is_set():
                f.write(rng.randbytes(4096))
                f.flush()
                self.chunks += 1
                time.sleep(0.001)


def test_file_growing_during_snapshot(project_dir: Path) -> None:
    root = project_dir
    for i in range(200):
        write(root, f"src/f{i}.txt", f"line {i}\n" * 20)
    grow = write(root, "logs/train.log", os.urandom(6 * MiB))  # a loose object, hashed in a thread
    small = write(root, "logs/small.log", b"start\n")
    assert run_cli("-C", str(root), "init").returncode == 0
    initial = grow.stat().st_size
    appenders = [Appender(grow), Appender(small)]
    for a in appenders:
        a.start()
    try:
        r = run_cli("-C", str(root), "snapshot")
    finally:
        for a in appenders:
            a.stop.set()
            a.join()
    assert r.returncode == 0, r.stderr
    assert all(a.chunks > 0 for a in appenders)
    final = {p: p.read_bytes() for p in (grow, small)}
    others = {k: v for k, v in tree_state(root).items() if not k.startswith(b"logs/")}

    v = run_cli("-C", str(root), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    status = json.loads(run_cli("-C", str(root), "status", "--json").stdout)

    for p in (grow, small):
        p.unlink()
    plan = run_cli("-C", str(root), "restore", "1", "--dry-run").stdout
    r = run_cli("-C", str(root), "restore", "1", "--yes")
    assert r.returncode == 0, r.stderr
    for p, start in ((grow, initial), (small, 6)):
        got = p.read_bytes()
        rel = os.fsdecode(p.relative_to(root))
        # A state that existed: the file as it was at some moment, never torn or padded.
        assert len(got) >= start and final[p][: len(got)] == got, f"{rel}: not a prefix of the file"
        # The tree records the size of the content it points at.
        assert f"write   {rel} ({len(got)} bytes" in plan, (
            f"{rel}: {len(got)} bytes restored, plan says:\n{plan}"
        )
        # The stat cache must not call the file clean unless the snapshot holds its final content.
        if got != final[p]:
            assert rel in status["modified"], f"{rel} grew after it was read, status says {status}"
    assert {k: v for k, v in tree_state(root).items() if not k.startswith(b"logs/")} == others


def _victims(root: Path, dirs: int, per_dir: int) -> tuple[list[Path], list[Path]]:
    files, victim_dirs = [], []
    for d in range(dirs):
        for i in range(per_dir):
            files.append(write(root, f"d{d:02}/f{i}.txt", f"{d}/{i}\n" * (i % 40 + 1)))
        if d % 10 == 9:
            victim_dirs.append(root / f"d{d:02}")
    write(root, "big.bin", os.urandom(3 * MiB))
    return [f for f in files if f.name.endswith(("3.txt", "7.txt"))], victim_dirs


def _check_snapshot_of_vanishing(
    root: Path, original: TreeState, gone: set[bytes], sid: str
) -> int:
    """The snapshot holds every path that never vanished exactly, and vanished ones exactly or not
    at all. Returns how many of the vanished paths the snapshot still caught."""
    v = run_cli("-C", str(root), "verify")
    assert v.returncode == 0, v.stdout + v.stderr
    r = run_cli("-C", str(root), "restore", sid, "--yes")
    assert r.returncode == 0, r.stderr
    got = tree_state(root)
    assert set(got) <= set(original), sorted(set(got) - set(original))[:5]
    for path, want in original.items():
        if path in got:
            assert got[path] == want, f"{path!r} was snapshotted torn"
        else:
            assert path in gone or any(path.startswith(g + b"/") for g in gone), f"{path!r} lost"
    return len(gone & set(got))


def test_files_vanishing_during_snapshot(project_dir: Path) -> None:
    """A thread deletes files and whole directories while a real `snapfs snapshot` scans."""
    root = project_dir
    victims, victim_dirs = _victims(root, dirs=60, per_dir=80)
    assert run_cli("-C", str(root), "init").returncode == 0
    original = tree_state(root)
    gone = {os.fsencode(p.relative_to(root)) for p in victims + victim_dirs}
    rng = random.Random(11)
    order: list[Path] = victims + victim_dirs
    rng.shuffle(order)

    child = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(root), "snapshot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deleted = 0

    def delete_while_scanning() -> None:
        nonlocal deleted
        lock = root / ".snapfs/lock"
        marker = f"pid {child.pid} "
        while child.poll() is None and not (lock.exists() and marker in lock.read_text()):
            time.sleep(0.0005)  # the lock is taken just before the scan starts
        for p in order:
            if child.poll() is not None:
                return
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            deleted += 1
            time.sleep(0.0005)  # spread the deletions over the scan

    t = threading.Thread(target=delete_while_scanning, name="test-deleter")
    t.start()
    try:
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
        t.join()
    assert child.returncode == 0, stderr.decode()
    caught = _check_snapshot_of_vanishing(root, original, gone, stdout.split()[0].decode())
    print(f"deleted {deleted} of {len(order)} paths while the snapshot ran; it caught {caught}")


def test_files_vanishing_mid_scan_deterministic(project_dir: Path) -> None:
    """Same, but the deletions happen at a known moment: the scan's first progress report."""
    root = project_dir
    victims, victim_dirs = _victims(root, dirs=40, per_dir=100)
    original = tree_state(root)
    gone = {os.fsencode(p.relative_to(root)) for p in victims + victim_dirs}
    reports = []

    def progress(p: snapfs.Progress) -> None:
        if p.phase == "scan" and not reports:
            for v in victims + victim_dirs:  # some already read, some listed, some not yet seen
                shutil.rmtree(v) if v.is_dir() else v.unlink()
        reports.append(p)

    with snapfs.init(root) as project:
        snap = project.snapshot(progress=progress)
        assert any(r.phase == "scan" and r.total is None for r in reports), "no mid-scan report"
        assert snap.files < len([k for k, v in original.items() if v[0] == "file"])
    caught = _check_snapshot_of_vanishing(root, original, gone, str(snap.id))
    assert 0 < caught < len(gone), "the deletions were not mid-scan"
