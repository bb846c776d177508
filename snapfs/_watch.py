"""``snapfs watch``: a long-lived change journal, so snapshots between operations are O(changes).

The watcher runs a :class:`~snapfs._journal.Journal` and advertises its run in the project's
meta table. Any other snapfs process can then ask it for a *mark*: it writes the watcher's
cookie file with its own token and waits until the watcher has recorded that cookie, which
proves every earlier event is recorded (inotify delivers in order). A snapshot taken right after
mark M remembers M; the next snapshot asks for a new mark N and, if the journal proves
continuity between M and N, reads only the directories touched in between (git's fsmonitor
idea). Without a live watcher, or without proven continuity, it walks everything as usual.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # the journal (and watchdog) load only when a watcher is in play
    from ._journal import Journal, Touched
    from ._project import Project

WATCH_KEY = "watch"  # meta: the live watcher {"run", "owner"}
MARK_KEY = (
    "watch_mark"  # meta: the mark the last snapshot was taken after {"run", "seq", "snapshot"}
)
POLL_S = 0.003


# A NamedTuple, not a frozen dataclass: every command imports this, and defining a
# dataclass costs ~0.4 ms (it compiles its methods); a NamedTuple ~0.07 ms.
class Mark(NamedTuple):
    run: str
    seq: int


def _advertised(project: Project) -> tuple[str, str] | None:
    """(run, owner JSON) the watcher advertised, alive or not; None if none or unreadable."""
    raw = project.state.get_meta(WATCH_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return str(d["run"]), str(d["owner"])
    except (ValueError, KeyError, TypeError):
        return None


def watch_run(project: Project) -> str | None:
    """The journal run of the advertised watcher (its rows must not be pruned)."""
    w = _advertised(project)
    return w[0] if w else None


def _watcher(project: Project) -> tuple[str, str] | None:
    """(run, owner JSON) of a live watcher of this project, if there is one."""
    from ._txn import Owner

    w = _advertised(project)
    return w if w is not None and Owner.parse(w[1]).alive() else None


def external_mark(project: Project, timeout: float = 2.0) -> Mark | None:
    """Have the live watcher record a mark now. None if there is no watcher or it is too slow."""
    w = _watcher(project)
    if w is None:
        return None
    run = w[0]
    cookie = project.state_dir / f"journal-cookie-{run}"
    token = f"x{os.getpid()}-{os.urandom(6).hex()}"
    tmp = cookie.with_name(f"{cookie.name}.{token}")
    try:
        tmp.write_bytes(f"mark by pid {os.getpid()}\n".encode())
        os.replace(tmp, cookie)  # the rename's event names the token
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    db = project.state.db
    while True:
        row = db.execute(
            "SELECT seq FROM journal WHERE run = ? AND kind = 'cookie' AND dest = ?",
            (run, token.encode()),
        ).fetchone()
        if row is not None:
            return Mark(run, int(row[0]))
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def touched_between(project: Project, since: Mark, until: Mark) -> Touched | None:
    from ._journal import Journal

    if since.run != until.run:
        return None
    # Through the project's own connection: a journal opened by path would open another.
    return Journal(project.root, project.state.db).touched(since.seq, until.seq)


def last_mark(project: Project) -> tuple[Mark, int] | None:
    """The mark the last watched snapshot was taken after, and that snapshot's id."""
    raw = project.state.get_meta(MARK_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return Mark(str(d["run"]), int(d["seq"])), int(d["snapshot"])
    except (ValueError, KeyError, TypeError):
        return None


def remember_mark(project: Project, mark: Mark, snapshot: int) -> None:
    # Meaningful only while this watcher runs (a restart starts a new run): no fsync.
    project.state.set_meta(
        MARK_KEY,
        json.dumps({"run": mark.run, "seq": mark.seq, "snapshot": snapshot}),
        durable=False,
    )


class WatchView:
    """The live watcher's journal, used the way a transaction uses its own Journal."""

    def __init__(self, project: Project, first: Mark) -> None:
        self.project = project
        self.first = first  # the mark the view starts at (the one that found the watcher)

    def start(self, timeout: float = 2.0) -> int:
        return self.first.seq

    def mark(self, timeout: float = 2.0) -> int:
        from ._journal import JournalUnavailable

        m = external_mark(self.project, timeout)
        if m is None or m.run != self.first.run:
            raise JournalUnavailable("snapfs watch stopped during the operation.")
        return m.seq

    def touched(self, since: int, until: int) -> Touched:
        from ._journal import Journal

        return Journal(self.project.root, self.project.state.db).touched(since, until)

    def stop(self) -> None:
        pass


class SharedJournal:
    """This process's own journal, kept running for the length of a multi-step operation
    (:meth:`Project.journal_scope`), so each step's checkpoint and the operation's last
    snapshot read only what changed since the previous mark, as with ``snapfs watch``."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def mark(self, timeout: float = 5.0) -> Mark:
        return Mark(self.journal.run, self.journal.mark(timeout))


class SharedView(WatchView):
    """A transaction's view of a :class:`SharedJournal`: it starts at a mark of it, and ending
    the transaction leaves the journal running for the next step."""

    def __init__(self, project: Project, shared: SharedJournal, first: Mark) -> None:
        super().__init__(project, first)
        self.shared = shared

    def mark(self, timeout: float = 2.0) -> int:
        return self.shared.journal.mark(timeout)

    def touched(self, since: int, until: int) -> Touched:
        return self.shared.journal.touched(since, until)


def _prune(project: Project, run: str) -> None:
    last = last_mark(project)
    with project.state.db:
        if last is not None and last[0].run == run:
            project.state.db.execute(
                "DELETE FROM journal WHERE run = ? AND seq < ? AND time < ?",
                (run, last[0].seq, time.time() - 3600),
            )
    project.state.prune_journal(keep_runs=(run,), older_than=3600)


def serve(
    project: Project,
    *,
    stop: threading.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the journal until ``stop`` is set (or KeyboardInterrupt / SIGTERM)."""
    from ._errors import UsageError
    from ._journal import Journal
    from ._txn import Owner

    if _watcher(project) is not None:
        raise UsageError("snapfs watch is already running for this project.")
    me = Owner.current().dumps()
    journal = Journal(project.root, project.state.path, owner=me)
    journal.start()
    project.state.set_meta(WATCH_KEY, json.dumps({"run": journal.run, "owner": me}))
    try:
        if on_ready is not None:
            on_ready(journal.run)
        stop = stop or threading.Event()
        ticks = 0
        while not stop.wait(1.0):
            journal.mark()  # a liveness check: raises if the observer died
            ticks += 1
            if ticks % 600 == 0:  # every ten minutes: rows before the last mark are history
                _prune(project, journal.run)
    finally:
        if watch_run(project) == journal.run:
            project.state.set_meta(WATCH_KEY, None)
        journal.stop()
