"""The change journal against real inotify, real temp dirs and real SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from snapfs._journal import Journal, JournalUnavailable
from snapfs._state import PROJECT_SCHEMA, connect

FLOOD = """
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    p = f"{d}/f{i}"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    os.close(fd)
    os.unlink(p)
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    (r / ".snapfs").mkdir(parents=True)
    return r


@pytest.fixture
def db(root: Path) -> Path:
    return root / ".snapfs" / "project.db"


@pytest.fixture
def journal(root: Path, db: Path) -> Iterator[Journal]:
    with Journal(root, db) as j:
        yield j


@contextmanager
def inotify_limit(name: str, value: int) -> Iterator[int]:
    """Set /proc/sys/fs/inotify/NAME for the duration; skip when it can't be changed."""
    path = Path("/proc/sys/fs/inotify") / name
    if os.geteuid() != 0:
        pytest.skip(reason=f"changing fs.inotify.{name} needs root")
    try:
        old = path.read_text().strip()
        path.write_text(str(value))
    except OSError as exc:
        pytest.skip(reason=f"fs.inotify.{name} is not writable here ({exc})")
    try:
        yield int(old)
    finally:
        path.write_text(old)


def kinds(j: Journal, since: int, until: int) -> set[tuple[str, bytes, bytes | None, bool]]:
    return {(e.kind, e.relpath, e.dest, e.is_dir) for e in j.events(since, until)}


def files_under(root: Path, rel: bytes) -> set[bytes]:
    base = os.fsencode(root)
    out = set()
    for dirpath, _, filenames in os.walk(base + b"/" + rel):
        for name in filenames:
            out.add(os.path.join(dirpath, name)[len(base) + 1 :])
    return out


# ---- what gets recorded ----------------------------------------------------------------------
def test_records_kinds_with_bytes_relpaths(root: Path, journal: Journal) -> None:
    (root / "old").mkdir()
    (root / "old" / "gone").write_text("bye")
    (root / "olddir").mkdir()
    s0 = journal.start()

    (root / "a.txt").write_text("hello")
    (root / "d").mkdir()
    os.rename(root / "a.txt", root / "old" / "b.txt")  # into a watched dir: a paired move
    os.unlink(root / "old" / "gone")
    os.rename(root / "olddir", root / "newdir")
    os.rmdir(root / "newdir")
    raw = os.fsencode(root) + b"/caf\xe9-\xff.bin"  # not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    s1 = journal.mark()

    got = kinds(journal, s0, s1)
    assert ("created", b"a.txt", None, False) in got
    assert ("modified", b"a.txt", None, False) in got
    assert ("created", b"d", None, True) in got
    assert ("moved", b"a.txt", b"old/b.txt", False) in got
    assert ("deleted", b"old/gone", None, False) in got
    assert ("moved", b"olddir", b"newdir", True) in got
    assert ("deleted", b"newdir", None, True) in got
    assert ("created", b"caf\xe9-\xff.bin", None, False) in got
    assert all(isinstance(e.relpath, bytes) for e in journal.events(s0, s1))


def test_state_dir_noise_is_not_recorded(root: Path, journal: Journal) -> None:
    (root / "sub" / ".snapfs").mkdir(parents=True)
    s0 = journal.start()
    (root / ".snapfs" / "noise").write_text("x")
    (root / ".snapfs" / "staging").mkdir()
    (root / ".snapfs" / "staging" / "obj").write_text("y")
    (root / "sub" / ".snapfs" / "nested").write_text("z")
    (root / "real.txt").write_text("r")
    s1 = journal.mark()
    s2 = journal.mark()

    events = journal.events(s0, s2)
    assert {e.relpath for e in events if e.kind != "cookie"} == {b"real.txt"}
    assert [e.seq for e in events if e.kind == "cookie"] == [s1]
    assert all(b".snapfs" not in p for p in journal.touched(s0, s2).paths)


def test_moves_across_the_state_dir_are_creates_and_deletes(root: Path, journal: Journal) -> None:
    staging = root / ".snapfs" / "staging"
    staging.mkdir()
    (staging / "landed").write_text("restored")
    (staging / "tree").mkdir()
    (staging / "tree" / "leaf").write_text("l")
    (root / "victim").write_text("v")
    s0 = journal.start()
    os.rename(staging / "landed", root / "landed")  # how a restore lands a file
    os.rename(staging / "tree", root / "tree")
    os.rename(root / "victim", root / ".snapfs" / "victim")
    s1 = journal.mark()

    got = kinds(journal, s0, s1)
    assert ("created", b"landed", None, False) in got
    assert ("created", b"tree", None, True) in got
    assert ("deleted", b"victim", None, False) in got
    t = journal.touched(s0, s1)
    assert b"tree" in t.new_dirs
    assert t.paths >= {b"landed", b"tree", b"victim"}


def test_state_folders_are_not_watched_inside(root: Path, journal: Journal) -> None:
    """Only the project's own .snapfs is watched (for the marks' cookies), not the store's
    fan-out, staging or trash in it, nor a nested project's state folder."""
    for d in (".snapfs/objects/ab", ".snapfs/trash/1-x", "sub/.snapfs/objects", "plugins/a"):
        (root / d).mkdir(parents=True)
    journal.start()
    (root / ".snapfs" / "tmp").mkdir()  # made while watching: not watched either
    journal.mark()
    assert journal._backend is not None
    (emitter,) = journal._backend.observer.emitters
    watched = {os.fsdecode(p) for p in emitter._inotify._active_callbacks_by_path}
    base = os.fspath(root)
    assert {base, f"{base}/.snapfs", f"{base}/sub", f"{base}/plugins/a"} <= watched
    assert not {p for p in watched if "/.snapfs/" in p[len(base) :] or p.endswith("sub/.snapfs")}


def test_a_paired_move_is_handed_on_without_waiting_out_the_pairing_delay() -> None:
    """watchdog holds an IN_MOVED_FROM until its IN_MOVED_TO arrives or a delay passes; a
    consumer already waiting on it must get the pair as soon as it forms (watchdog's own queue
    slept out the whole delay, so every rename stalled the next mark)."""
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent
    from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

    from snapfs._journal import _move_grouper_class

    grouper = _move_grouper_class()()
    grouper._queue.delay = 3600.0  # an unpaired move would hold the queue for an hour
    src = InotifyEvent(1, InotifyConstants.IN_MOVED_FROM, 7, b"a")
    dst = InotifyEvent(1, InotifyConstants.IN_MOVED_TO, 7, b"b")
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(grouper.read_event()), daemon=True)
    grouper.put_event(PathedInotifyEvent(src, b"/p/a"))
    reader.start()
    reader.join(0.2)  # let it find the held IN_MOVED_FROM at the head and wait on it
    grouper.put_event(PathedInotifyEvent(dst, b"/p/b"))
    reader.join(30)
    assert not reader.is_alive(), "the reader still waits out the delay of a paired move"
    grouper.close()
    assert isinstance(got[0], tuple) and [e.path for e in got[0]] == [b"/p/a", b"/p/b"]


def test_touched_gives_exact_sets(root: Path, journal: Journal) -> None:
    (root / "old" / "sub").mkdir(parents=True)
    for name in ("y", "z", "w"):
        (root / "old" / name).write_text(name)
    (root / "old" / "sub" / "f").write_text("f")
    s0 = journal.start()

    (root / "top.txt").write_text("t")
    (root / "d1").mkdir()
    (root / "d1" / "x").write_text("x")
    with open(root / "old" / "y", "a") as f:
        f.write("more")
    os.unlink(root / "old" / "z")
    os.rename(root / "old" / "w", root / "top2")
    os.rename(root / "old" / "sub", root / "moved_sub")
    s1 = journal.mark()

    t = journal.touched(s0, s1)
    assert t.continuous and t.reason == ""
    assert t.paths == {
        b"top.txt",
        b"d1",
        b"d1/x",
        b"old/y",
        b"old/z",
        b"old/w",
        b"top2",
        b"old/sub",
        b"moved_sub",
        b"old/sub/f",
        b"moved_sub/f",
    }
    assert t.dirty_dirs == {b"", b"d1", b"old", b"old/sub", b"moved_sub"}
    assert t.new_dirs == {b"d1", b"moved_sub"}


def test_existing_subfolders_are_watched_at_any_depth_but_not_through_symlinks(
    root: Path, journal: Journal, tmp_path: Path
) -> None:
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (root / "a" / "b2").mkdir()
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    os.symlink(outside, root / "a" / "link")
    s0 = journal.start()
    (deep / "f").write_text("f")
    (root / "a" / "b2" / "g").write_text("g")
    (outside / "h").write_text("h")  # through the symlink: not the project's
    (outside / "sub" / "i").write_text("i")
    s1 = journal.mark()
    t = journal.touched(s0, s1)
    assert t.continuous
    assert t.paths == {b"a/b/c/d/f", b"a/b2/g"}


def test_journal_accepts_a_connection_and_calls_the_modified_hook(root: Path, db: Path) -> None:
    (root / "sealed.bin").write_bytes(b"big")
    conn = connect(db, PROJECT_SCHEMA)
    seen: list[tuple[bytes, str]] = []

    def hook(relpath: bytes) -> None:
        seen.append((relpath, threading.current_thread().name))

    try:
        with Journal(root, conn, owner="test", on_modified=hook) as j:
            s0 = j.start()
            with open(root / "sealed.bin", "r+b") as f:
                f.write(b"BIG")
            s1 = j.mark()
            assert j.touched(s0, s1).paths == {b"sealed.bin"}
        assert (b"sealed.bin", "snapfs-journal-writer") in seen
        rows = conn.execute("SELECT count(*) FROM journal WHERE relpath = ?", (b"sealed.bin",))
        assert rows.fetchone()[0] >= 1
    finally:
        conn.close()


# ---- continuity ------------------------------------------------------------------------------
def test_a_quiet_interval_is_continuous(root: Path, journal: Journal) -> None:
    s0 = journal.start()
    for i in range(200):
        (root / f"f{i}").write_text(str(i))
    s1 = journal.mark()
    t = journal.touched(s0, s1)
    assert t.continuous, t.reason
    assert t.paths == {f"f{i}".encode() for i in range(200)}


def test_intervals_that_are_not_marks_of_one_run_are_not_continuous(root: Path, db: Path) -> None:
    with Journal(root, db) as j1:
        a0 = j1.start()
        a1 = j1.mark()
    with Journal(root, db) as j2:
        b0 = j2.start()
        b1 = j2.mark()
        assert j2.touched(b0, b1).continuous
        across = j2.touched(a0, b1)
        assert not across.continuous and "different" in across.reason
        not_a_mark = j2.touched(0, b1)
        assert not not_a_mark.continuous and "not started" in not_a_mark.reason
    assert j1.touched(a0, a1).continuous  # readable after stop


def test_overflow_breaks_continuity(root: Path, db: Path) -> None:
    flood = root / "flood"
    flood.mkdir()
    j = Journal(root, db)
    try:
        # The kernel sizes an inotify instance's queue when it is created: shrink it for start().
        with inotify_limit("max_queued_events", 64):
            s0 = j.start()
        with j._reader_gate:  # the reader is busy: the kernel queue fills up and overflows
            for i in range(1000):
                p = flood / f"f{i}"
                p.write_bytes(b"x")
                p.unlink()
        s1 = j.mark(timeout=30)
        assert any(e.kind == "overflow" for e in j.events(s0, s1))
        t = j.touched(s0, s1)
        assert not t.continuous
        assert "overflow" in t.reason

        # watchdog re-adds its watches after an overflow: a later quiet interval is provable again
        s2 = j.mark(timeout=30)
        (root / "after.txt").write_text("a")
        s3 = j.mark(timeout=30)
        later = j.touched(s2, s3)
        assert later.continuous, later.reason
        assert later.paths == {b"after.txt"}
    finally:
        j.stop()


@pytest.mark.slow
def test_heavy_flood_with_the_default_queue(root: Path, journal: Journal) -> None:
    flood = root / "flood"
    flood.mkdir()
    s0 = journal.start()
    procs = []
    for i in range(2):
        (flood / str(i)).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", FLOOD, str(flood / str(i)), "50000"]))
    for p in procs:
        assert p.wait() == 0
    s1 = journal.mark(timeout=300)
    t = journal.touched(s0, s1)
    if t.continuous:  # the reader kept up: then every flood file must be listed
        assert len(t.paths) >= 100_000
    else:
        assert "overflow" in t.reason


def test_deep_tree_created_fast_lands_in_new_dirs(root: Path, journal: Journal) -> None:
    s0 = journal.start()
    levels = [b"deep"] + [f"l{i}".encode() for i in range(1, 30)]
    deepest = os.path.join(os.fsencode(root), *levels)
    os.makedirs(deepest)  # 30 mkdirs back to back, faster than watches can be added
    expected = set()
    for depth in range(1, len(levels) + 1):
        rel = b"/".join(levels[:depth])
        for k in range(3):
            with open(os.fsencode(root) + b"/" + rel + f"/file{k}".encode(), "wb") as f:
                f.write(b"x")
            expected.add(rel + f"/file{k}".encode())
    s1 = journal.mark()

    t = journal.touched(s0, s1)
    assert b"deep" in t.new_dirs
    assert b"" in t.dirty_dirs
    # A caller rescans every new dir fully: whatever inotify missed, nothing escapes it.
    rescanned = set(t.paths)
    for d in t.new_dirs:
        rescanned |= files_under(root, d)
    assert expected <= rescanned


def test_deep_tree_moved_in_from_outside_lands_in_new_dirs(
    root: Path, tmp_path: Path, journal: Journal
) -> None:
    outside = tmp_path / "outside" / "incoming"
    deepest = outside.joinpath(*[f"l{i}" for i in range(30)])
    deepest.mkdir(parents=True)
    (deepest / "leaf.txt").write_text("leaf")
    s0 = journal.start()
    os.rename(outside, root / "incoming")
    s1 = journal.mark()
    t = journal.touched(s0, s1)
    assert b"incoming" in t.new_dirs
    assert b"" in t.dirty_dirs


# ---- failure modes ---------------------------------------------------------------------------
def test_start_on_a_missing_root_is_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    j = Journal(missing, tmp_path / "j.db")
    with pytest.raises(JournalUnavailable, match="not a folder"):
        j.start()
    j.stop()


def test_a_watchdog_without_the_hooks_makes_the_journal_unavailable(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """watchdog's inotify internals are not API: when one the journal overrides is gone, the
    journal refuses to start (callers compare everything) instead of trusting dead hooks."""
    from watchdog.observers.inotify_c import InotifyFD

    from snapfs import _journal

    monkeypatch.delattr(InotifyFD, "_read_event_buffer")
    _journal._inotify_classes.cache_clear()
    try:
        with pytest.raises(JournalUnavailable, match=r"watchdog .* has no InotifyFD\._read_event"):
            journal.start()
    finally:
        monkeypatch.undo()
        _journal._inotify_classes.cache_clear()
    assert journal.start() > 0  # the real watchdog still serves


def test_the_reader_gate_stalls_every_read_of_the_kernel_queue(
    root: Path, journal: Journal
) -> None:
    """The overflow tests hold the gate to starve the reader; it must stop reads, not just delay
    their handling, or the kernel queue never fills and those tests prove nothing."""
    journal.start()
    fd = journal._backend.threads[0] if journal._backend else None
    assert fd is not None
    before = os.read  # the reader's read happens on its own thread: count them
    reads: list[int] = []

    def counting_read(fdno: int, n: int) -> bytes:
        if threading.current_thread() is fd:
            reads.append(n)
        return before(fdno, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "read", counting_read)
        with journal._reader_gate:
            (root / "a.txt").write_text("a")  # wakes a reader blocked in select: one read
            time.sleep(0.3)
            (root / "b.txt").write_text("b")
            time.sleep(0.3)
            held = len(reads)
        journal.mark(timeout=10)
    assert held <= 1, f"the reader read the kernel queue {held} times while gated"
    assert len(reads) > held


def test_mark_after_stop_and_stop_is_idempotent(journal: Journal) -> None:
    journal.start()
    journal.stop()
    journal.stop()
    with pytest.raises(JournalUnavailable, match="not running"):
        journal.mark(timeout=1)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]


def _inotify_fds() -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                fds.append(fd)
        except OSError:  # the listing's own descriptor, closed since
            pass
    return fds


def test_stop_closes_the_inotify_instance_without_removing_each_watch(
    root: Path, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the descriptor drops every watch in the kernel; removing them one by one first
    only cost a transaction's end time (an inotify_rm_watch and bookkeeping per folder)."""
    from watchdog.observers import inotify_c

    for i in range(30):
        (root / f"d{i}" / "sub").mkdir(parents=True)
    before = _inotify_fds()
    removed: list[int] = []
    real = inotify_c.inotify_rm_watch

    def counting(fd: int, wd: int) -> int:
        removed.append(wd)
        return real(fd, wd)

    monkeypatch.setattr(inotify_c, "inotify_rm_watch", counting)
    j = Journal(root, db)
    since = j.start()
    assert len(_inotify_fds()) == len(before) + 1
    (root / "d3" / "sub" / "f").write_bytes(b"x")
    try:
        assert ("created", b"d3/sub/f", None, False) in kinds(j, since, j.mark())
    finally:
        j.stop()
    assert removed == []
    assert _inotify_fds() == before  # the instance is gone, and its watches with it
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]
    # A journal started afterwards watches the same folders afresh.
    with Journal(root, db) as again:
        s = again.start()
        (root / "d7" / "sub" / "g").write_bytes(b"y")
        assert ("created", b"d7/sub/g", None, False) in kinds(again, s, again.mark())


def test_mark_fails_cleanly_when_the_observer_dies(root: Path, journal: Journal) -> None:
    s0 = journal.start()
    backend = journal._backend  # simulate the watchdog threads dying behind the journal's back
    assert backend is not None
    backend.observer.stop()
    backend.observer.join()
    (root / "unseen.txt").write_text("lost")
    with pytest.raises(JournalUnavailable, match="stopped watching"):
        journal.mark(timeout=2)
    journal.stop()
    assert any(e.kind == "gap" for e in journal.events(s0))
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]


def test_too_few_inotify_watches_is_unavailable_with_a_plain_message(root: Path, db: Path) -> None:
    for i in range(120):
        (root / "tree" / f"d{i}").mkdir(parents=True)
    j = Journal(root, db)
    try:
        with inotify_limit("max_user_watches", 40):
            with pytest.raises(JournalUnavailable) as info:
                j.start()
    finally:
        j.stop()
    message = str(info.value)
    assert "max_user_watches" in message
    assert "Traceback" not in message and "Errno" not in message
    assert not [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]


def test_a_folder_that_cannot_be_watched_breaks_continuity_for_good(
    root: Path, journal: Journal
) -> None:
    s0 = journal.start()
    with inotify_limit("max_user_watches", 1):  # already over it: every new watch fails
        (root / "unwatched").mkdir()
        s1 = journal.mark()
    (root / "unwatched" / "late.txt").write_text("invisible to inotify")
    s2 = journal.mark()
    first = journal.touched(s0, s1)
    assert not first.continuous and "could not watch" in first.reason
    assert b"unwatched" in first.new_dirs
    later = journal.touched(s1, s2)  # the folder stays unwatched: no later interval is provable
    assert not later.continuous and "could not watch" in later.reason


def test_changes_reach_the_writer_in_batches_not_one_hand_over_per_event(
    root: Path, db: Path
) -> None:
    """2,000 new files are ~6,000 inotify events. watchdog dispatched each as event objects
    through its observer's thread and the journal queued one row at a time (4,000+ hand-overs,
    whose thread switches the journaled operation waited for); the emitter now hands over
    whatever the grouper has ready as one list. Every file is still recorded."""
    j = Journal(root, db)
    real = j._queue
    puts: list[int] = []

    class Counting:
        def put(self, rows: Any) -> None:
            puts.append(0 if rows is None else len(rows))
            real.put(rows)

        def get(self, *args: object, **kwargs: object) -> object:
            return real.get(*args, **kwargs)  # type: ignore[arg-type]

        def get_nowait(self) -> object:
            return real.get_nowait()

    j._queue = Counting()  # type: ignore[assignment]
    try:
        since = j.start()
        puts.clear()
        for d in range(20):
            (root / f"part{d:02d}").mkdir()
        for i in range(2000):
            (root / f"part{i % 20:02d}" / f"f{i:05d}.py").write_bytes(b"%08d\n" % i)
        until = j.mark()
        touched = j.touched(since, until)
    finally:
        j.stop()
    assert touched.continuous, touched.reason
    want = {f"part{i % 20:02d}/f{i:05d}.py".encode() for i in range(2000)}
    assert want <= touched.paths
    assert sum(puts) >= 4000  # a created and a modified row per file, at least
    assert len(puts) < 2000, f"{len(puts)} hand-overs for {sum(puts)} rows"
