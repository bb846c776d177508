"""Recovery removes the marker files of change journals whose process died, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import snapfs
from snapfs._txn import Owner, dead_cookies, sweep_dead_cookies


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _cookie(state: Path, name: str, owner: str, pid: int) -> None:
    (state / name).write_text(f"run=abc owner={owner} pid={pid}\n")


def test_only_dead_journals_cookies_are_swept(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    project = snapfs.init(tmp_path / "p")
    state = project.root / ".snapfs"
    dead = _dead_pid()
    dead_owner = Owner(dead, Owner.current().host, Owner.current().boot_id, "1").dumps()
    _cookie(state, "journal-cookie-live", Owner.current().dumps(), os.getpid())
    _cookie(state, "journal-cookie-live-noowner", "", os.getpid())
    _cookie(state, "journal-cookie-dead", dead_owner, dead)
    _cookie(state, "journal-cookie-dead.3", dead_owner, dead)  # a temp, killed before its rename
    _cookie(state, "journal-cookie-dead-noowner", "", dead)
    (state / "journal-cookie-young.1").write_bytes(b"")  # a live journal's temp, not written yet
    (state / "journal-cookie-old.1").write_bytes(b"")  # ...or one killed there long ago
    old = time.time() - 3600
    os.utime(state / "journal-cookie-old.1", (old, old))
    want = [
        "journal-cookie-dead",
        "journal-cookie-dead-noowner",
        "journal-cookie-dead.3",
        "journal-cookie-old.1",
    ]
    assert dead_cookies(state) == want
    assert sweep_dead_cookies(state) == want
    left = sorted(n for n in os.listdir(state) if n.startswith("journal-cookie-"))
    assert left == ["journal-cookie-live", "journal-cookie-live-noowner", "journal-cookie-young.1"]


def test_the_next_command_sweeps_a_dead_journals_cookie(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    project = snapfs.init(tmp_path / "p")
    state = project.root / ".snapfs"
    dead = _dead_pid()
    _cookie(state, "journal-cookie-0123", "", dead)
    _cookie(state, "journal-cookie-4567", Owner.current().dumps(), os.getpid())
    project.close()
    snapfs.open(tmp_path / "p").close()  # opening a project recovers what crashed processes left
    assert sorted(n for n in os.listdir(state) if n.startswith("journal-cookie-")) == [
        "journal-cookie-4567"
    ]
