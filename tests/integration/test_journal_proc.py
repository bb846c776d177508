"""The change journal's helper process: real subprocesses, real inotify, real SQLite, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapfs
from snapfs import _journal_proc
from snapfs._journal import Journal, JournalUnavailable
from snapfs._journal_proc import HelperFailed, ProcessJournal, start_journal
from snapfs._state import PROJECT_SCHEMA, connect
from snapfs._txn import run_command
from tests.helpers import tree_state, write


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    (r / ".snapfs").mkdir(parents=True)
    return r


@pytest.fixture
def db(root: Path) -> Path:
    path = root / ".snapfs" / "project.db"
    connect(path, PROJECT_SCHEMA).close()
    return path


@pytest.fixture
def helper(root: Path, db: Path) -> Iterator[ProcessJournal]:
    j = ProcessJournal(root, db, owner="test")
    try:
        yield j
    finally:
        j.stop()


def _gone(pid: int, within: float = 10.0) -> bool:
    """Has process ``pid`` exited (and been reaped, or become a zombie) within the time?"""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def _cookies(root: Path) -> list[str]:
    return [n for n in os.listdir(root / ".snapfs") if n.startswith("journal-cookie-")]


def _inotify_fds(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    n = 0
    for fd in fds.iterdir():
        try:
            n += os.readlink(fd) == "anon_inode:inotify"
        except OSError:
            pass
    return n


def test_the_helper_watches_from_another_process_into_the_same_journal(
    root: Path, helper: ProcessJournal
) -> None:
    s0 = helper.start()
    assert helper._proc is not None
    pid = helper._proc.pid
    assert pid != os.getpid()
    assert _inotify_fds(pid) == 1 and _inotify_fds(os.getpid()) == 0
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]
    for i in range(300):
        write(root, f"pkg/sub{i % 3}/m{i}.py", str(i))
    os.unlink(root / "pkg/sub0/m0.py")
    s1 = helper.mark()
    t = helper.touched(s0, s1)
    assert t.continuous, t.reason
    assert {f"pkg/sub{i % 3}/m{i}.py".encode() for i in range(1, 300)} <= t.paths
    assert b"pkg/sub0/m0.py" in t.paths
    assert b"pkg" in t.new_dirs
    # The rows are the helper's, under this journal's run: what an in-process one would write.
    assert {e.kind for e in helper.events(s0, s1)} >= {"created", "deleted"}
    helper.stop()
    assert _gone(pid) and not _cookies(root)
    helper.stop()  # idempotent


def test_files_written_in_place_reach_on_modified_at_the_next_mark(root: Path, db: Path) -> None:
    (root / "sealed.bin").write_bytes(b"big")
    seen: list[tuple[bytes, str]] = []

    def hook(relpath: bytes) -> None:
        seen.append((relpath, threading.current_thread().name))

    j = ProcessJournal(root, db, owner="test", on_modified=hook)
    try:
        j.start()
        with open(root / "sealed.bin", "r+b") as f:
            f.write(b"BIG")
        os.mkdir(root / "folder")
        j.mark()
        # From the caller's thread, each file once (a new file's writes count, as in-process;
        # the caller only cares about the paths of sealed objects).
        assert seen == [(b"sealed.bin", threading.current_thread().name)]
        with open(root / "sealed.bin", "r+b") as f:
            f.write(b"AGAIN")
        j.mark()
        assert [p for p, _ in seen] == [b"sealed.bin", b"sealed.bin"]  # once per interval
    finally:
        j.stop()


PARENT = """
import sys, time
from pathlib import Path
from snapfs._journal_proc import ProcessJournal
j = ProcessJournal(Path(sys.argv[1]), Path(sys.argv[2]), owner="parent")
j.start()
print(j._proc.pid, flush=True)
time.sleep(600)
"""


def test_the_helper_ends_when_its_parent_is_killed(root: Path, db: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(root), str(db)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert parent.stdout is not None
        helper_pid = int(parent.stdout.readline())
        assert _cookies(root)  # its marker file, while it runs
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _gone(helper_pid), "the helper outlived its parent"
        assert not _cookies(root)  # it stopped its journal on the way out
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_ctrl_c_is_the_parents_to_handle(root: Path, helper: ProcessJournal) -> None:
    """The terminal sends SIGINT to both; the parent's rollback still needs a mark after it."""
    s0 = helper.start()
    assert helper._proc is not None
    helper._proc.send_signal(signal.SIGINT)
    write(root, "after.txt", "x")
    s1 = helper.mark()
    assert helper.touched(s0, s1).paths == {b"after.txt"}


def test_a_helper_killed_mid_transaction_still_gives_an_exact_rollback(
    tmp_path: Path,
) -> None:
    root = tmp_path / "proj"
    write(root, "plugins/a/m.py", "original")
    write(root, "models/m.bin", os.urandom(100_000))
    with snapfs.init(root) as p:
        p.snapshot("base")
        before = tree_state(root)
        with pytest.raises(RuntimeError):
            with snapfs.transaction(p, "op") as tx:
                assert isinstance(tx._journal, ProcessJournal), tx.journal_note
                assert tx._journal._proc is not None
                write(root, "plugins/a/m.py", "broken")
                os.kill(tx._journal._proc.pid, signal.SIGKILL)
                write(root, "plugins/new/x.py", "after the helper died: no journal saw this")
                raise RuntimeError("step failed")
        assert "ended unexpectedly (killed by signal 9)" in tx.journal_note
        assert tree_state(root) == before
        assert not _cookies(root)


def test_a_helper_that_stops_answering_is_killed_and_not_trusted(
    root: Path, helper: ProcessJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal_proc, "REPLY_SLACK_SECONDS", 0.3)
    helper.start()
    assert helper._proc is not None
    pid = helper._proc.pid
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(HelperFailed, match="stopped answering"):
        helper.mark(timeout=0.2)
    os.kill(pid, signal.SIGCONT)
    assert _gone(pid)
    with pytest.raises(JournalUnavailable):
        helper.mark()


def test_threads_serve_when_no_helper_can_be_started(
    root: Path, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(root / "no-such-python"))
    journal, first = start_journal(root, db, owner="test", on_modified=None, helper=True)
    try:
        assert type(journal) is Journal
        write(root, "f.txt", "x")
        assert journal.touched(first, journal.mark()).paths == {b"f.txt"}
    finally:
        journal.stop()


def test_a_journal_problem_reported_by_the_helper_is_not_retried_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's own "can't watch" is the journal's verdict, not the helper's failure."""
    started: list[str] = []
    monkeypatch.setattr(Journal, "start", lambda self, timeout=5.0: started.append("threads"))
    root = tmp_path / "proj"
    root.mkdir()
    (root / ".snapfs").write_text("a file where the journal's marker folder goes")
    db = tmp_path / "j.db"
    connect(db, PROJECT_SCHEMA).close()
    with pytest.raises(JournalUnavailable) as err:
        start_journal(root, db, owner="", on_modified=None, helper=True)
    assert not isinstance(err.value, HelperFailed)
    assert "snapfs can't watch" in str(err.value)
    assert started == []  # no second try in threads


def test_snapfs_run_keeps_the_journal_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its command is a process of its own: a helper would only add a process start."""

    def refuse(self: ProcessJournal, timeout: float = 5.0) -> int:
        raise AssertionError("snapfs run started a journal helper")

    monkeypatch.setattr(ProcessJournal, "start", refuse)
    root = tmp_path / "proj"
    write(root, "a.txt", "a")
    with snapfs.init(root) as p:
        res = run_command(p, [sys.executable, "-c", "open('b.txt', 'w').write('b')"], cwd=root)
    assert res.returncode == 0 and res.changes.added == ["b.txt"]


@pytest.mark.parametrize("helper_on", [True, False], ids=["helper-process", "threads"])
def test_a_transactions_journal_follows_the_config(tmp_path: Path, helper_on: bool) -> None:
    root = tmp_path / "proj"
    write(root, "a.txt", "a")
    with snapfs.init(root, journal_process=helper_on) as p:
        before = tree_state(root)
        with pytest.raises(KeyError):
            with snapfs.transaction(p, "op") as tx:
                assert type(tx._journal) is (ProcessJournal if helper_on else Journal)
                write(root, "a.txt", "changed")
                write(root, "deep/new/b.txt", "b")
                raise KeyError("x")
        assert tx.journal_note == ""  # the journal was trusted
        assert tree_state(root) == before
        assert tx.changes.modified == ["a.txt"]
        assert tx.changes.added == ["deep/", "deep/new/", "deep/new/b.txt"]


def test_the_helper_refuses_bad_arguments_without_a_word_on_stdout() -> None:
    """Its stdout is the parent's channel: a usage error goes to stderr only."""
    out = subprocess.run(
        [sys.executable, "-m", "snapfs._journal_proc", "only-one-argument"],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        timeout=60,
    )
    assert out.returncode == 2 and out.stdout == b""
    assert out.stderr.decode().startswith("usage: python -m snapfs._journal_proc ")
