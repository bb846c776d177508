"""Transactions guided by the journal stay exact when the journal loses events."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import snapfs
from snapfs._journal import Journal
from snapfs._journal_proc import ProcessJournal
from tests.helpers import tree_state, write

QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def tiny_inotify_queue() -> Iterator[None]:
    """A 16-event inotify queue, so a burst of writes overflows it for real."""
    try:
        old = QUEUE.read_text()
        QUEUE.write_text("16\n")
    except OSError as exc:
        pytest.skip(reason=f"can't shrink the inotify queue here ({exc.strerror}); needs root")
    try:
        yield
    finally:
        QUEUE.write_text(old)


def _base(root: Path) -> None:
    for d in ("plugins/a", "plugins/b", "venv/lib"):
        for i in range(20):
            write(root, f"{d}/m{i}.py", f"{d} {i}\n")
    write(root, "models/m.bin", os.urandom(200_000))


def test_rollback_uses_the_journal_and_is_exact(project: snapfs.Project) -> None:
    _base(project.root)
    before = tree_state(project.root)
    with pytest.raises(RuntimeError):
        with snapfs.transaction(project, "import") as tx:
            assert tx._journal is not None, tx.journal_note
            write(project.root, "plugins/a/m3.py", "broken")
            os.unlink(project.root / "venv/lib/m7.py")
            write(project.root, "plugins/new/x/y/z.py", "new")
            raise RuntimeError("step 3 failed")
    assert tx.journal_note == ""  # the journal was trusted: continuity was proven
    assert tree_state(project.root) == before
    assert set(tx.changes.added) >= {"plugins/new/x/y/z.py"}
    assert tx.changes.modified == ["plugins/a/m3.py"]
    assert tx.changes.deleted == ["venv/lib/m7.py"]


@contextmanager
def _stalled(journal: Journal | None) -> Iterator[None]:
    """Keep ``journal`` from reading the kernel queue for the block: its reader thread held
    at the gate, or its helper process stopped with SIGSTOP."""
    if isinstance(journal, ProcessJournal):
        assert journal._proc is not None
        os.kill(journal._proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(journal._proc.pid, signal.SIGCONT)
    else:
        assert isinstance(journal, Journal)
        with journal._reader_gate:
            yield


@pytest.mark.parametrize("helper", [True, False], ids=["helper-process", "threads"])
def test_rollback_is_exact_after_an_inotify_overflow(
    project: snapfs.Project, tiny_inotify_queue: None, helper: bool
) -> None:
    project.config = project.config._replace(journal_process=helper)
    _base(project.root)
    before = tree_state(project.root)
    with pytest.raises(RuntimeError):
        with snapfs.transaction(project, "flood") as tx:
            assert type(tx._journal) is (ProcessJournal if helper else Journal), tx.journal_note
            with _stalled(tx._journal):  # the kernel queue must overflow meanwhile
                for i in range(3000):  # far past a 16-event queue
                    write(project.root, f"plugins/b/flood{i % 40}.py", f"{i}")
                write(project.root, "plugins/a/m1.py", "edited during the flood")
            raise RuntimeError("failed")
    assert "lost events" in tx.journal_note  # it noticed, and compared everything instead
    assert tree_state(project.root) == before


def test_rollback_is_exact_when_deep_trees_outrun_the_watches(project: snapfs.Project) -> None:
    _base(project.root)
    before = tree_state(project.root)
    with pytest.raises(RuntimeError):
        with snapfs.transaction(project, "deep"):
            deep = project.root / "custom_nodes"
            for n in range(5):
                d = deep / f"n{n}"
                for level in range(25):  # faster than watches can be added below
                    d = d / f"l{level}"
                    d.mkdir(parents=True)
                    (d / "f.py").write_text(f"{n} {level}")
            write(project.root, "plugins/a/m2.py", "changed")
            raise RuntimeError("failed")
    assert tree_state(project.root) == before
    assert not (project.root / "custom_nodes").exists()
