"""snapfs watch: snapshots and status read only what changed, and stay exact when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapfs
from snapfs import _project
from snapfs._scan import Hint
from snapfs._watch import WatchView, external_mark, serve
from tests.helpers import tree_state, write


def _populate(root: Path) -> None:
    for d in ("plugins/a", "plugins/b", "venv/lib/site"):
        for i in range(10):
            write(root, f"{d}/m{i}.py", f"{d} {i}\n")
    write(root, "models/m.bin", os.urandom(300_000))


@pytest.fixture
def watcher(project: snapfs.Project) -> Iterator[threading.Event]:
    """snapfs watch running in a thread of this process, on its own Project handle."""
    stop = threading.Event()
    ready = threading.Event()
    handle = snapfs.open(project.root)
    t = threading.Thread(
        target=serve, args=(handle,), kwargs={"stop": stop, "on_ready": lambda _r: ready.set()}
    )
    t.start()
    assert ready.wait(10), "the watcher did not start"
    try:
        yield stop
    finally:
        stop.set()
        t.join(10)
        handle.close()


@pytest.fixture
def hints(monkeypatch: pytest.MonkeyPatch) -> list[Hint | None]:
    """Every hint the project's scans were given."""
    seen: list[Hint | None] = []
    real = _project.scan

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("hint"))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_project, "scan", spy)
    return seen


def test_watched_snapshots_read_only_what_changed(
    project: snapfs.Project, watcher: threading.Event, hints: list[Hint | None]
) -> None:
    _populate(project.root)
    first = project.snapshot()  # no earlier mark: a full walk, which records one
    assert hints[-1] is None
    write(project.root, "plugins/b/m3.py", "edited")
    write(project.root, "plugins/new/pkg/x.py", "new")
    os.unlink(project.root / "venv/lib/site/m1.py")
    second = project.snapshot()
    hint = hints[-1]
    assert hint is not None and hint.base == bytes.fromhex(first.root)
    assert b"plugins/b" in hint.dirty_dirs and b"venv/lib/site" in hint.dirty_dirs
    assert b"plugins/a" not in hint.dirty_dirs  # untouched: never read
    # The guided snapshot is the same tree a full walk gives, with the same totals.
    full = snapfs.open(project.root, journal=False)
    try:
        third = full.snapshot()
    finally:
        full.close()
    assert third.root == second.root
    assert (second.files, second.bytes) == (third.files, third.bytes)
    assert not project.status()


def test_status_with_watch_sees_every_change(
    project: snapfs.Project, watcher: threading.Event
) -> None:
    _populate(project.root)
    project.snapshot()
    write(project.root, "plugins/a/m0.py", "changed")
    os.chmod(project.root / "plugins/b/m2.py", 0o600)
    write(project.root, "deep/a/b/c/d.py", "d")
    ch = project.status()
    assert ch.modified == ["plugins/a/m0.py", "plugins/b/m2.py"]
    assert "deep/a/b/c/d.py" in ch.added


def test_transaction_uses_the_watchers_journal(
    project: snapfs.Project, watcher: threading.Event
) -> None:
    _populate(project.root)
    project.snapshot()
    before = tree_state(project.root)
    with pytest.raises(RuntimeError):
        with snapfs.transaction(project, "op") as tx:
            assert isinstance(tx._journal, WatchView)
            write(project.root, "plugins/a/m5.py", "broken")
            write(project.root, "plugins/z/new.py", "n")
            raise RuntimeError
    assert tx.journal_note == ""
    assert tree_state(project.root) == before


def _cookies(project: snapfs.Project) -> int:
    (n,) = project.state.db.execute("SELECT count(*) FROM journal WHERE kind = 'cookie'").fetchone()
    return int(n)


def test_a_transaction_starts_with_one_round_trip_to_the_watcher(
    project: snapfs.Project, watcher: threading.Event, hints: list[Hint | None]
) -> None:
    """Entering a transaction asks the watcher for one mark, which both its journal view and
    its checkpoint start from; changes made inside are still all seen."""
    _populate(project.root)
    project.snapshot()
    before = _cookies(project)
    tx = snapfs.transaction(project, "op")
    tx.begin()
    assert _cookies(project) == before + 1
    assert isinstance(tx._journal, WatchView) and tx._journal.first is not None
    assert hints[-1] is not None  # the checkpoint was journal-guided, from that mark
    write(project.root, "plugins/a/m5.py", "changed")
    write(project.root, "plugins/z/new.py", "n")
    done = tx.commit()
    assert done.added == ["plugins/z/", "plugins/z/new.py"]
    assert done.modified == ["plugins/a/m5.py"]
    assert tx.journal_note == ""


def test_a_mark_finds_its_cookie_by_index(project: snapfs.Project, watcher: threading.Event) -> None:
    """Marks poll for their cookie while the journal grows; the lookup must not scan it."""
    assert external_mark(project) is not None
    plan = project.state.db.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM journal WHERE run = ? AND kind = 'cookie' AND dest = ?",
        ("r", b"t"),
    ).fetchall()
    assert any("journal_cookies" in str(row) for row in plan), plan


def test_a_killed_watcher_is_not_trusted(project: snapfs.Project, tmp_path: Path) -> None:
    _populate(project.root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(project.root), "watch"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "Watching" in proc.stderr.readline()
        project.snapshot()
        assert external_mark(project) is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert external_mark(project) is None  # its owner is dead: no marks, no hints
        write(project.root, "plugins/a/m1.py", "after the watcher died")
        snap = project.snapshot()
        os.unlink(project.root / "plugins/a/m1.py")
        project.restore(snap.id)
        assert (project.root / "plugins/a/m1.py").read_text() == "after the watcher died"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_watch_cli_stops_cleanly_on_sigterm(project: snapfs.Project) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(project.root), "watch"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "Watching" in proc.stderr.readline()
    second = subprocess.run(
        [sys.executable, "-m", "snapfs", "-C", str(project.root), "watch"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2 and "already running" in second.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    rest = proc.stderr.read()
    proc.stderr.close()
    assert "Stopped watching" in rest
    assert project.state.get_meta("watch") is None
