"""The change journal: every create, modify, delete and move under a project, recorded in SQLite.

The journal is a *hint*, never the truth. It lets a caller skip work (list what an operation
changed, limit a rollback or the next snapshot's stat walk to the touched paths) only when it can
*prove* that it saw every change in an interval. Anything that may have lost an event is written
into the journal as an ``overflow`` or ``gap`` row, and :meth:`Journal.touched` reports an interval
containing one as not continuous, so the caller falls back to the full walk.

Threads and the path of one event::

    kernel inotify queue
      -> inotify reader (watchdog InotifyFD; from 7.1.1 it reads on one thread and handles on a
         second, through a FIFO; ours counts overflows and failed watches, in kernel order)
      -> watchdog's move grouper (pairs moves) -> our emitter, which turns everything the grouper
         has ready into one list of changes (watchdog's observer dispatches nothing)
      -> Journal._on_changes -> SimpleQueue of row lists -> writer thread (batches rows into one
         SQLite transaction) -> journal table

Nothing in the watchdog threads touches SQLite; the writer has its own connection.

**Marks (cookies).** :meth:`Journal.mark` renames a fresh file onto
``.snapfs/journal-cookie-<run>``; the temporary name carries a token, so the move event says
exactly which mark it belongs to. The pipeline is FIFO from the kernel queue to the writer, so when
the cookie's row is committed every event the kernel queued before the rename has been recorded
with a smaller seq. A mark whose cookie event was lost is retried with a new token.

**Proving continuity.** A lost event is always announced by something the inotify reader sees in
kernel order: ``IN_Q_OVERFLOW`` (watchdog then rebuilds its watches, and 7.1.0 also drops the events
it was holding), or a watch that could not be added. Each such loss writes a row and bumps a counter.
The row is queued when the reader sees the loss, which can be *before* an earlier cookie that was
still in flight through the grouper and emitter reaches the writer. So each mark also
reads the counter just before it writes its cookie, and when the cookie's event arrives with the
counter moved on, another loss row is queued right after the cookie. Whichever way the race went,
a loss between two cookies in kernel order leaves a loss row between their seqs.

Files created in a new directory before watchdog has added its watch are the other way events
vanish; they are not detectable, which is why :class:`Touched` lists ``new_dirs``: the caller
rescans those subtrees fully.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._crash import crash_point
from ._errors import Category, SnapfsError
from ._ignore import STATE_DIR
from ._state import connect

if TYPE_CHECKING:
    import logging

    from watchdog.observers.api import BaseObserver

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT,
    time REAL,
    kind TEXT,
    relpath BLOB,
    dest BLOB,
    is_dir INTEGER
);
-- A mark looks its cookie up by token while the watcher keeps appending: without this, each
-- poll scanned the whole journal (100k+ rows after a few imports, several ms a poll). Partial,
-- so the watcher's inserts of ordinary events pay nothing for it.
CREATE INDEX IF NOT EXISTS journal_cookies ON journal (dest) WHERE kind = 'cookie';
"""

#: Row kinds. The first four are changes. ``overflow`` and ``gap`` mean events may have been lost
#: (their ``dest`` holds the reason as UTF-8 text). ``cookie`` is a mark (``dest`` is its token).
KINDS = ("created", "modified", "deleted", "moved", "overflow", "gap", "cookie")
CHANGE_KINDS = frozenset({"created", "modified", "deleted", "moved"})
LOSS_KINDS = frozenset({"overflow", "gap"})

BATCH_SECONDS = 0.05  # a batch is committed at most this long after its first row arrived...
BATCH_ROWS = 500  # ...or as soon as it holds this many rows, or holds a cookie
COOKIE_RETRY_SECONDS = 1.0  # rewrite the cookie if its event hasn't arrived by then (it was lost)

_STATE = os.fsdecode(STATE_DIR)
_STATE_B = bytes(STATE_DIR)
_BENIGN_WATCH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


class JournalUnavailable(SnapfsError):
    """The change journal can't run or can't vouch for what it saw; use the full stat walk."""

    category = Category.SYSTEM


@dataclass(frozen=True, slots=True)
class JournalEvent:
    """One journal row. ``relpath``/``dest`` are project-relative, ``b"/"``-separated bytes."""

    seq: int
    time: float
    kind: str
    relpath: bytes
    dest: bytes | None
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Touched:
    """What changed between two marks, and whether the journal can prove it saw everything.

    ``paths``: every relpath named by an event (sources and destinations of moves).
    ``dirty_dirs``: the parent of every such path (``b""`` is the project root), plus the path
    itself when it is a directory. ``new_dirs``: directories created or moved in; files created in
    them before their watch existed may be missing from ``paths``, so scan these subtrees fully.
    """

    continuous: bool
    reason: str
    paths: frozenset[bytes]
    dirty_dirs: frozenset[bytes]
    new_dirs: frozenset[bytes]


class _Row(NamedTuple):
    kind: str
    relpath: bytes
    dest: bytes | None
    is_dir: bool
    time: float
    token: str | None = None


#: One change as the emitter hands it over: (kind, absolute path, absolute dest or None, is_dir),
#: kind one of :data:`CHANGE_KINDS`.
_Change = tuple[str, bytes, "bytes | None", bool]


@functools.cache
def _quiet_loggers() -> None:
    """Keep watchdog's and our warnings off the terminal unless the application routes them.

    Without any handler, logging's last resort prints warnings to stderr; an overflow would then
    scribble over the output of the command ``snapfs run`` wraps. The journal records every loss
    itself, as a row, so a NullHandler loses nothing; an application's own handlers still work.
    """
    import logging

    for name in ("watchdog", "snapfs.journal"):
        logging.getLogger(name).addHandler(logging.NullHandler())


def _logger() -> logging.Logger:
    import logging  # imported on first use: most commands never journal

    _quiet_loggers()
    return logging.getLogger("snapfs.journal")


def _has_cookie(rows: list[_Row]) -> bool:
    return any(row.kind == "cookie" for row in rows)


def _parent(relpath: bytes) -> bytes:
    i = relpath.rfind(b"/")
    return relpath[:i] if i >= 0 else b""


def _in_state_dir(rel: bytes) -> bool:
    return _STATE_B in rel.split(b"/")


def _limit(name: str) -> str:
    try:
        with open(f"/proc/sys/fs/inotify/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _unavailable(exc: OSError, root: str) -> JournalUnavailable:
    """A plain-language reason why inotify can't watch ``root``."""
    if exc.errno == errno.ENOSPC:
        limit = _limit("max_user_watches")
        return JournalUnavailable(
            f"snapfs can't watch {root} for changes: the system allows {limit} watched folders"
            " per user (fs.inotify.max_user_watches) and this project needs more.",
            hint="Raise the limit (sysctl fs.inotify.max_user_watches=524288); until then"
            " snapfs compares the whole folder instead.",
        )
    if exc.errno == errno.EMFILE:
        limit = _limit("max_user_instances")
        return JournalUnavailable(
            f"snapfs can't watch {root} for changes: this user already runs {limit} file"
            " watchers (fs.inotify.max_user_instances).",
            hint="Close other watchers or raise the limit (sysctl fs.inotify.max_user_instances);"
            " until then snapfs compares the whole folder instead.",
        )
    if exc.errno == errno.ENOMEM:
        return JournalUnavailable(
            f"snapfs can't watch {root} for changes: the kernel is out of memory for watches."
        )
    return JournalUnavailable(
        f"snapfs can't watch {root} for changes: {exc.strerror or exc}.",
        hint="snapfs compares the whole folder instead.",
    )


class _Losses:
    """Everything that may have lost events, counted in the order the reporting thread saw it.

    Each loss is also queued as a row at the moment it is recorded, under the same lock as the
    counter, so a reader of the counter knows the row is already queued.
    """

    def __init__(self, sink: Callable[[_Row], None]) -> None:
        self._lock = threading.Lock()
        self._sink = sink
        self.count = 0
        self.last = ("gap", "")
        self.degraded: str | None = None  # set when the loss persists (a folder is unwatched)
        self.watch_error: OSError | None = None

    def record(self, kind: str, reason: str, *, permanent: bool = False) -> None:
        with self._lock:
            self.count += 1
            self.last = (kind, reason)
            if permanent and self.degraded is None:
                self.degraded = reason
            self._sink(_Row(kind, b"", reason.encode(), False, time.time()))

    def watch_failed(self, path: bytes, exc: OSError) -> None:
        with self._lock:
            if self.watch_error is None:
                self.watch_error = exc
        reason = f"could not watch {os.fsdecode(path)}: {exc.strerror or exc}"
        self.record("gap", reason, permanent=True)

    def state(self) -> tuple[int, tuple[str, str], str | None]:
        with self._lock:
            return self.count, self.last, self.degraded


class _Backend(NamedTuple):
    observer: BaseObserver
    threads: tuple[threading.Thread, ...]  # besides the observer's own and its emitters'


def _require_hooks(*wanted: tuple[type, tuple[str, ...]]) -> None:
    """Fail (so the journal is unavailable and callers compare everything) when watchdog lacks a
    method the subclasses below override: its internals are not API, and a journal whose hooks are
    never called could not prove anything."""
    missing = [
        f"{cls.__name__}.{name}"
        for cls, names in wanted
        for name in names
        if not callable(getattr(cls, name, None))
    ]
    if missing:
        from watchdog.version import VERSION_STRING

        raise RuntimeError(f"watchdog {VERSION_STRING} has no {', '.join(missing)}")


@functools.cache
def _move_grouper_class() -> Any:
    """watchdog's move-event grouper, answering as soon as a move is paired (see below)."""
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    from watchdog.utils.delayed_queue import DelayedQueue

    class PromptQueue(DelayedQueue[Any]):
        """watchdog holds each IN_MOVED_FROM up to 0.5 s for its IN_MOVED_TO, and its queue
        sleeps out the whole delay even when the IN_MOVED_TO arrives a moment later and takes
        the pair out: every event behind it waited too. A rename (a download landing, a store
        commit, a mark's own cookie) stalled the next mark by ~0.45 s. Here the wait ends as
        soon as the head of the queue changes; an unpaired IN_MOVED_FROM still waits it out.
        """

        def get(self) -> Any:
            with self._not_empty:
                while True:
                    while not self._queue and not self._closed:
                        self._not_empty.wait()
                    if self._closed:
                        return None
                    head, inserted, delay = self._queue[0]
                    left = inserted + self.delay - time.monotonic() if delay else 0.0
                    if left <= 0:
                        self._queue.popleft()
                        return head
                    self._not_empty.wait(left)  # a put (the pair, or anything) wakes it

        def ready(self) -> list[Any]:
            """Take, without waiting, every item at the head whose time has come (what get
            would return next, in order), up to the first IN_MOVED_FROM still waiting."""
            out: list[Any] = []
            with self._not_empty:
                now = time.monotonic()
                q = self._queue
                while q and not self._closed:
                    head, inserted, delay = q[0]
                    if delay and inserted + self.delay > now:
                        break
                    q.popleft()
                    out.append(head)
            return out

    class Grouper(InotifyMoveEventGrouper):
        # How long an IN_MOVED_FROM waits for its IN_MOVED_TO. The kernel queues the two
        # together, so a pair is complete within the reader's next pass; one still alone after
        # this moved out of the watched folders (into a trash, say) and is a deletion. watchdog
        # waits 0.5 s, stalling every event behind it, and so the next mark, that long.
        delay = 0.05

        def __init__(self) -> None:
            super().__init__()
            self._queue = PromptQueue(self.delay)

        def ready(self) -> list[Any]:
            prompt: PromptQueue = self._queue  # type: ignore[assignment]  # set in __init__
            return prompt.ready()

    return Grouper


@functools.cache
def _inotify_classes() -> tuple[Any, Any]:
    """watchdog's inotify observer with four changes: the reader reports overflows and failed
    watches to a :class:`_Losses`, a crashed thread is reported instead of dying silently, and
    the emitter hands its changes to the journal in batches instead of dispatching events.

    Imported lazily: ``inotify_c`` loads libc's inotify functions and fails off Linux.
    """
    _quiet_loggers()
    from watchdog.events import generate_sub_created_events, generate_sub_moved_events
    from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
    from watchdog.observers.inotify_c import (
        CallbackId,
        InotifyConstants,
        InotifyEvent,
        InotifyFD,
        Mask,
        WatchCallback,
        WatchDescriptor,
    )
    from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent

    _require_hooks(
        (InotifyFD, ("_read_event_buffer", "handle_event", "_get_or_create_watch", "run", "close")),
        (
            InotifyWatchGroup,
            (
                "__post_init__",
                "_add_all_callbacks",
                "_add_callback",
                "_remove_callbacks",
                "read_event",
                "remove_watched_directory",
            ),
        ),
        (InotifyEmitter, ("on_thread_start", "get_event_mask_from_filter", "queue_events")),
    )

    class CountingInotifyFD(InotifyFD):
        def __init__(self, losses: _Losses, gate: threading.Lock) -> None:
            self.losses = losses
            self._gate = gate
            # Set when the whole journal stops: nothing outlives this descriptor then, and
            # closing it drops every watch in the kernel at once (see close, deactivate).
            self.discarding = False
            super().__init__()
            self.name = "snapfs-journal-inotify"

        def close(self) -> None:
            # watchdog removes each watch (an inotify_rm_watch and its bookkeeping per folder,
            # ~20 ms of a transaction's end on 1,500 folders) before closing the descriptor,
            # which would drop them all anyway. A discarded descriptor skips that.
            if self.discarding:
                with self._lock:
                    self._watch_for_wd.clear()
            super().close()

        def _read_event_buffer(self, *args: Any, **kwargs: Any) -> bytes:
            # Every read of the kernel queue goes through here: watchdog 7.1.0's read_events and
            # 7.1.1's reader loop, which no longer calls read_events. A testing aid: holding the
            # gate keeps the kernel queue unread, as a reader starved of CPU would.
            with self._gate:
                pass
            data: bytes = super()._read_event_buffer(*args, **kwargs)
            return data

        def handle_event(self, event: InotifyEvent) -> None:
            # Runs on the one thread that handles events (7.1.1 reads on one thread and handles on
            # another, through a FIFO), in kernel order: record the loss before watchdog drops
            # the events it holds and re-adds its watches, so no later cookie can miss it.
            if event.is_queue_overflow:
                self.losses.record(
                    "overflow",
                    "the kernel's inotify queue overflowed (fs.inotify.max_queued_events)"
                    " and events were lost",
                )
            super().handle_event(event)

        def add_callback(
            self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
        ) -> WatchDescriptor:
            # watchdog skips a subfolder it can't watch without telling anyone; we must know.
            try:
                with self._lock:
                    watch = self._get_or_create_watch(path, mask)
                    # watchdog re-adds the same callback whenever it re-walks a new folder whose
                    # subfolders it already watches (mkdir -p), and warns each time; replacing
                    # it is harmless, so do it quietly.
                    watch.callbacks[id_] = callback
                    wd = watch.wd
            except OSError as exc:
                if exc.errno not in _BENIGN_WATCH_ERRNOS:  # gone already: nothing to watch
                    self.losses.watch_failed(path, exc)
                raise
            if wd == -1:  # watchdog swallows EACCES and hands back -1
                self.losses.watch_failed(path, PermissionError(errno.EACCES, "permission denied"))
            return wd

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                _logger().exception("the inotify reader thread failed")
                self.losses.record("gap", f"the inotify reader stopped ({exc})", permanent=True)

    Grouper = _move_grouper_class()
    state_b = os.fsencode(_STATE)

    class WatchGroup(InotifyWatchGroup):
        def __post_init__(self) -> None:
            self._move_event_grouper = Grouper()  # before any watch exists to feed it
            self._prefix = self.path.rstrip(b"/") + b"/"
            super().__post_init__()

        def _remove_callbacks(self, wds: list[WatchDescriptor]) -> None:
            if not getattr(self._inotify_fd, "discarding", False):  # (a CountingInotifyFD)
                super()._remove_callbacks(wds)
                return
            # The observer is stopping (watchdog's deactivate, which also marks the group
            # inactive): only forget the watches; closing the descriptor next drops them in
            # the kernel (see CountingInotifyFD.close).
            for wd in wds:
                self._nodes_by_wd.pop(wd, None)

        def _unwatched(self, path: bytes) -> bool:
            """Folders inside a state folder. Their events are never recorded, and watching
            them (the store's fan-out, staging, a clone in progress, the trash) only costs
            watches and events; a rename out of one of them into the project reads as a
            creation. The project's own .snapfs is watched for the marks' cookies."""
            if not path.startswith(self._prefix):
                return False
            parts = path[len(self._prefix) :].split(b"/")
            return state_b in parts and parts != [state_b]

        def _add_all_callbacks(self, path: bytes) -> None:
            # watchdog walks with os.walk, which costs a transaction's start ~30 ms on a 20k-file
            # project (it makes a list of every file name). The same watches in the same order
            # of discovery (a directory is watched before it is listed, so nothing created in
            # it meanwhile is missed); errors are skipped as os.walk does, and a directory
            # that can't be watched is reported by add_callback.
            if self.follow_symlink or not self.is_recursive:
                super()._add_all_callbacks(path)
                return
            if self._unwatched(path):
                return
            is_dir = os.path.isdir(path)
            self._add_callback(path)
            stack = [path] if is_dir else []
            while stack:
                try:
                    it = os.scandir(stack.pop())
                except OSError:
                    continue  # gone or unreadable since it was watched
                with it:
                    for entry in it:
                        try:
                            is_subdir = entry.is_dir(follow_symlinks=False)
                        except OSError:
                            continue
                        if is_subdir and not self._unwatched(entry.path):
                            self._add_callback(entry.path)
                            stack.append(entry.path)

    IN = InotifyConstants

    class Emitter(InotifyEmitter):
        """watchdog's emitter, handing the journal plain changes instead of event objects.

        watchdog builds a FileSystemEvent for each change (and a second, for the parent folder's
        modification) and passes each through the observer's queue to its dispatcher thread:
        two thread hand-overs and ~5 objects per change, ~100 us of interpreter time on a small
        machine, which the operation being journaled waited for (2,000 new files are ~6,000
        events). Here whatever the move grouper has ready becomes one list of
        ``(kind, path, dest, is_dir)`` for the journal, the same changes in the same order as the
        events watchdog would have dispatched through our filter (see :func:`_event_filter`).
        """

        def __init__(
            self, *args: Any, losses: _Losses, sink: Callable[[list[_Change]], None], **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self._losses = losses
            self._sink = sink
            self._root_b = os.fsencode(self.watch.path)
            self.name = "snapfs-journal-emitter"

        def on_thread_start(self) -> None:
            # As watchdog's, with the faster recursive watch setup above.
            self._inotify = WatchGroup(
                self._inotify_fd,
                self._root_b,
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
            )

        def queue_events(self, timeout: float, *, full_events: bool = False) -> None:
            with self._lock:
                group = self._inotify
            if group is None:
                return
            first = group.read_event()  # waits; None once the group is closed
            if first is None:
                return
            grouper: Any = group._move_event_grouper  # a Grouper (see WatchGroup.__post_init__)
            batch = [first, *grouper.ready()]
            out: list[_Change] = []
            with self._lock:
                if self._inotify is None:
                    return
                for grouped in batch:
                    self._changes(grouped, out)
            if out:
                self._sink(out)

        def _changes(self, grouped: Any, out: list[_Change]) -> None:
            """The changes of one grouped event: InotifyEmitter.build_and_queue_event's cases
            (full_events off), keeping those our filter lets through, with its side effects
            on the watches (a folder moved out) and on the emitter (the root deleted)."""
            recursive = self.watch.is_recursive
            if not isinstance(grouped, PathedInotifyEvent):  # a paired move
                src, dest = grouped
                is_dir = src.ev.is_directory
                out.append(("moved", src.path, dest.path, is_dir))
                if is_dir and recursive:
                    for moved in generate_sub_moved_events(src.path, dest.path):
                        sub, sub_dest = os.fsencode(moved.src_path), os.fsencode(moved.dest_path)
                        out.append(("moved", sub, sub_dest, moved.is_directory))
                return
            ev, path = grouped.ev, grouped.path
            mask = ev.mask
            is_dir = ev.is_directory
            if mask & IN.IN_MOVED_TO:
                out.append(("created", path, None, is_dir))
                if is_dir and recursive:
                    for created in generate_sub_created_events(path):
                        sub = os.fsencode(created.src_path)
                        out.append(("created", sub, None, created.is_directory))
            elif mask & IN.IN_ATTRIB:
                out.append(("modified", path, None, is_dir))
            elif mask & IN.IN_MODIFY:
                if not is_dir:  # a folder's echo of a change to one of its entries
                    out.append(("modified", path, None, False))
            elif mask & (IN.IN_DELETE | IN.IN_MOVED_FROM):
                out.append(("deleted", path, None, is_dir))
                if mask & IN.IN_MOVED_FROM and is_dir and recursive and self._inotify:
                    for sub_path in self._inotify.remove_watched_directory(path):
                        out.append(("deleted", sub_path, None, True))
            elif mask & IN.IN_CREATE:
                out.append(("created", path, None, is_dir))
            elif mask & IN.IN_DELETE_SELF and path == self._root_b:
                out.append(("deleted", path, None, is_dir))
                self.stop()
            elif not is_dir and mask & IN.IN_CLOSE_WRITE:
                out.append(("modified", path, None, False))
            # An overflow is recorded by the reader (CountingInotifyFD.handle_event), in kernel
            # order; opens and reads are not in the mask.

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                _logger().exception("the watchdog emitter thread failed")
                self._losses.record("gap", f"the event emitter stopped ({exc})", permanent=True)

    class Observer(BaseObserver):
        """Starts and stops the emitter and the inotify reader; it dispatches nothing itself
        (the emitter hands the journal its changes directly)."""

        def __init__(self, fd: CountingInotifyFD, sink: Callable[[list[_Change]], None]) -> None:
            self._fd = fd
            fd.start()
            super().__init__(
                Emitter,
                timeout=DEFAULT_OBSERVER_TIMEOUT,
                inotify_fd=fd,
                losses=fd.losses,
                sink=sink,
            )
            self.name = "snapfs-journal-observer"

        def on_thread_stop(self) -> None:
            self._fd.discarding = True  # the observer stops with everything it watches
            try:
                super().on_thread_stop()
            finally:
                self._fd.stop()
                if self._fd.ident is not None:
                    self._fd.join()

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                _logger().exception("the watchdog observer thread failed")
                self._fd.losses.record("gap", f"the observer stopped ({exc})", permanent=True)

    return CountingInotifyFD, Observer


def _event_filter() -> list[Any]:
    # No opened / closed-without-write events: reading files (a snapshot reads them all) must not
    # fill the kernel queue. FileModifiedEvent also brings IN_ATTRIB (chmod changes the tree), and
    # FileClosedEvent (IN_CLOSE_WRITE) catches writes through mmap, which raise no IN_MODIFY.
    # watchdog derives the inotify mask from this list; Emitter._changes keeps the same kinds.
    from watchdog import events as ev

    return [
        ev.FileCreatedEvent,
        ev.DirCreatedEvent,
        ev.FileDeletedEvent,
        ev.DirDeletedEvent,
        ev.FileMovedEvent,
        ev.DirMovedEvent,
        ev.FileModifiedEvent,
        ev.FileClosedEvent,
        ev.FileAttribEvent,
        ev.DirAttribEvent,
    ]


def _start_backend(
    root: str, losses: _Losses, gate: threading.Lock, sink: Callable[[list[_Change]], None]
) -> _Backend:
    """Choose and start the change-notification backend.

    Only inotify: it reports its own overflows, so continuity can be proven. A polling observer
    could not prove anything and would cost a full walk per poll, which is what the caller does
    anyway when this raises :class:`JournalUnavailable`.
    """
    if not sys.platform.startswith("linux"):
        raise JournalUnavailable(
            "The change journal needs Linux inotify; snapfs compares the whole folder instead."
        )
    try:
        fd_cls, observer_cls = _inotify_classes()
    except Exception as exc:  # ImportError, or watchdog's UnsupportedLibcError without inotify
        raise JournalUnavailable(
            f"The change journal can't use inotify here ({exc}); snapfs compares the whole"
            " folder instead."
        ) from exc
    try:
        fd = fd_cls(losses, gate)
    except OSError as exc:
        raise _unavailable(exc, root) from exc
    observer: BaseObserver = observer_cls(fd, sink)
    try:
        from watchdog.events import FileSystemEventHandler

        # The handler is never called: the emitter hands its changes to the sink directly.
        handler = FileSystemEventHandler()
        observer.schedule(handler, root, recursive=True, event_filter=_event_filter())
        observer.start()  # adds every watch, in this thread: a failure on the root raises here
    except BaseException as exc:
        observer.stop()
        if observer.ident is not None:
            observer.join()
        if isinstance(exc, OSError):
            raise _unavailable(exc, root) from exc
        raise
    return _Backend(observer, (fd,))


class Journal:
    """A durable change journal for one project folder, fed by an inotify observer.

    ``with Journal(root, db) as j:`` only guarantees :meth:`stop`; call :meth:`start` yourself
    (it returns the first mark). ``db`` is the project's SQLite database (a path, or a connection
    whose file is used); the journal writes through its own connection from its own thread.
    ``on_modified`` is called from the writer thread with the relpath of every file written in
    place, so the caller can warn when that file is a sealed hardlinked object.

    Don't call :meth:`mark` while holding a write transaction on the same database: the writer
    could not record the cookie and the mark would time out.
    """

    def __init__(
        self,
        root: Path,
        db: sqlite3.Connection | Path,
        *,
        owner: str = "",
        on_modified: Callable[[bytes], None] | None = None,
        run: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.run = run or uuid.uuid4().hex  # given: a helper process watching for a parent
        self.owner = owner
        self._on_modified = on_modified
        self._root = os.path.realpath(os.fspath(root))
        self._root_b = os.fsencode(self._root)
        self._prefix_b = self._root_b.rstrip(b"/") + b"/"
        self._cookie_name = f"journal-cookie-{self.run}"
        self._cookie_path = os.path.join(self._root, _STATE, self._cookie_name)
        self._cookie_path_b = os.fsencode(self._cookie_path)
        self._cookie_rel = os.fsencode(f"{_STATE}/{self._cookie_name}")

        self._db: sqlite3.Connection | None
        if isinstance(db, sqlite3.Connection):
            self._db = db
            self._db_path = self._path_of(db)
        else:
            self._db = None
            self._db_path = Path(db)
        if (
            self._db is None
            or not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'journal'"
            ).fetchone()
        ):
            connect(self._db_path, JOURNAL_SCHEMA).close()
        # Queries of a journal opened by path share one connection: opening one per query cost
        # a multi-step import ~2 ms a step.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

        # Lists of rows, each in order; None stops the writer.
        self._queue: queue.SimpleQueue[list[_Row] | None] = queue.SimpleQueue()
        self._losses = _Losses(lambda row: self._queue.put([row]))
        self._cond = threading.Condition()
        self._waiting: set[str] = set()  # tokens a mark() is waiting for
        self._cookie_seqs: dict[str, int] = {}
        self._mark_lo: dict[str, int] = {}  # token -> loss count just before its cookie was written
        self._mark_lock = threading.Lock()
        self._tokens = 0
        self._count_at_cookie = 0
        self._backend: _Backend | None = None
        self._writer: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._write_error: str | None = None
        self._running = False
        self._dead_reported = False
        # Held by tests to stall the inotify reader, so the kernel queue overflows on demand.
        self._reader_gate = threading.Lock()

    @staticmethod
    def _path_of(db: sqlite3.Connection) -> Path:
        for _, name, file in db.execute("PRAGMA database_list").fetchall():
            if name == "main" and file:
                return Path(file)
        raise JournalUnavailable("The change journal needs a database file, not an in-memory one.")

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> int:
        """Start watching and prove the stream is live with a first mark; return its seq."""
        if self._running:
            return self.mark(timeout)
        if not os.path.isdir(self._root):
            raise JournalUnavailable(
                f"snapfs can't watch {self._root} for changes: it is not a folder (or is gone)."
            )
        try:
            os.makedirs(os.path.join(self._root, _STATE), exist_ok=True)
        except OSError as exc:
            raise _unavailable(exc, self._root) from exc
        self._conn = connect(self._db_path, JOURNAL_SCHEMA)
        # NORMAL, not FULL: in WAL mode it still commits in order, and any later FULL commit
        # (a snapshot trusting these rows) makes every earlier journal frame durable with it.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._write_error = None
        self._dead_reported = False
        self._writer = threading.Thread(
            target=self._write_loop, args=(self._conn,), name="snapfs-journal-writer", daemon=True
        )
        self._writer.start()
        self._running = True
        try:
            self._backend = _start_backend(
                self._root, self._losses, self._reader_gate, self._on_changes
            )
            _, _, degraded = self._losses.state()
            if degraded is not None:
                watch_error = self._losses.watch_error
                if watch_error is not None:
                    raise _unavailable(watch_error, self._root)
                raise JournalUnavailable(
                    f"snapfs can't watch {self._root} for changes: {degraded}."
                )
            return self.mark(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop watching, record what is still queued, and join every thread. Idempotent."""
        self._running = False
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.observer.stop()  # also stops the emitters and the inotify reader
                if backend.observer.ident is not None:
                    backend.observer.join()
            finally:
                for t in backend.threads:
                    if t.ident is not None:
                        t.join()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        with self._reader_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        with self._cond:
            self._cond.notify_all()
        try:
            os.unlink(self._cookie_path)
        except OSError:
            pass

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- marks --------------------------------------------------------------------------
    def mark(self, timeout: float = 5.0) -> int:
        """Write a cookie and wait until its event is recorded; return the cookie's seq.

        Every event the kernel queued before this call is then in the journal with a smaller seq.
        """
        with self._mark_lock:
            self._check_alive()
            deadline = time.monotonic() + timeout
            tokens: list[str] = []
            try:
                while True:
                    token = self._write_cookie(tokens)
                    retry_at = min(deadline, time.monotonic() + COOKIE_RETRY_SECONDS)
                    with self._cond:
                        while True:
                            found = [self._cookie_seqs[t] for t in tokens if t in self._cookie_seqs]
                            if found:
                                return min(found)
                            left = retry_at - time.monotonic()
                            if left <= 0 or not self._running or self._write_error:
                                break
                            self._cond.wait(min(left, 0.1))
                            if not self._threads_alive():
                                break
                    self._check_alive()
                    if time.monotonic() >= deadline:
                        self._losses.record("gap", "a journal mark timed out")
                        raise JournalUnavailable(
                            f"The change journal did not see its own marker file within {timeout:g}"
                            f" s (token {token}); it can't vouch for recent changes.",
                            hint="snapfs compares the whole folder instead.",
                        )
            finally:
                with self._cond:
                    for t in tokens:
                        self._waiting.discard(t)
                        self._cookie_seqs.pop(t, None)

    def _write_cookie(self, tokens: list[str]) -> str:
        self._tokens += 1
        token = f"{self._tokens}"
        tmp = f"{self._cookie_path}.{token}"
        with self._cond:
            self._waiting.add(token)
        self._mark_lo[token] = self._losses.state()[0]  # before the write: see module docstring
        tokens.append(token)
        content = f"run={self.run} owner={self.owner} pid={os.getpid()}\n".encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, content)
            finally:
                os.close(fd)
            # The rename's event names the temporary file, so it says which mark it belongs to.
            os.replace(tmp, self._cookie_path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise JournalUnavailable(
                f"The change journal can't write its marker file in {self._root}/{_STATE}"
                f" ({exc.strerror or exc}).",
                hint="snapfs compares the whole folder instead.",
            ) from exc
        return token

    def _threads_alive(self) -> bool:
        backend, writer = self._backend, self._writer
        if backend is None or writer is None or not writer.is_alive():
            return False
        threads = [backend.observer, *backend.threads, *list(backend.observer.emitters)]
        return all(t.is_alive() for t in threads)

    def _check_alive(self) -> None:
        if not self._running:
            raise JournalUnavailable("The change journal is not running.")
        if self._write_error:
            raise JournalUnavailable(
                f"The change journal can't write to {self._db_path.name} ({self._write_error}).",
                hint="snapfs compares the whole folder instead.",
            )
        if not self._threads_alive():
            if not self._dead_reported:
                self._dead_reported = True
                self._losses.record("gap", "the journal stopped watching", permanent=True)
            raise JournalUnavailable(
                f"The change journal stopped watching {self._root} (was the folder deleted or"
                " moved?).",
                hint="snapfs compares the whole folder instead.",
            )

    # ---- events (emitter thread; must never block on SQLite) ----------------------------
    def _on_changes(self, changes: list[_Change]) -> None:
        rows: list[_Row] = []
        now = time.time()
        for kind, path, dest, is_dir in changes:
            try:
                self._record(kind, path, dest, is_dir, now, rows)
            except Exception as exc:
                _logger().exception("could not record a filesystem event")
                self._loss(rows, f"an event could not be recorded ({exc})")
        if rows:
            self._queue.put(rows)

    def _loss(self, rows: list[_Row], reason: str, *, permanent: bool = False) -> None:
        """Record a loss after the rows of the batch so far (kernel order, as the marks need)."""
        if rows:
            self._queue.put(rows.copy())
            rows.clear()
        self._losses.record("gap", reason, permanent=permanent)

    def _rel(self, path: bytes) -> bytes | None:
        """Project-relative bytes, b"" for the root; None outside the project or in a state dir."""
        if not path.startswith(self._prefix_b):
            return b"" if path == self._root_b else None
        rel = path[len(self._prefix_b) :]
        if _STATE_B in rel and _in_state_dir(rel):
            return None
        return rel

    def _record(
        self,
        kind: str,
        path: bytes,
        dest: bytes | None,
        is_dir: bool,
        now: float,
        rows: list[_Row],
    ) -> None:
        if kind == "moved":
            assert dest is not None
            if dest == self._cookie_path_b:
                self._cookie_arrived(os.fsdecode(path.rpartition(b"/")[2]), now, rows)
                return
            src_rel, dest_rel = self._rel(path), self._rel(dest)
            if src_rel == b"" or dest_rel == b"":
                self._loss(rows, "the project folder itself was moved")
            elif src_rel is not None and dest_rel is not None:
                rows.append(_Row("moved", src_rel, dest_rel, is_dir, now))
            elif dest_rel is not None:  # moved in from a state dir (a restore's staging): created
                rows.append(_Row("created", dest_rel, None, is_dir, now))
            elif src_rel is not None:  # moved into a state dir: gone from the project
                rows.append(_Row("deleted", src_rel, None, is_dir, now))
            return
        rel = self._rel(path)
        if rel is None:
            return
        if rel == b"":
            if kind == "deleted":
                self._loss(rows, "the project folder itself was deleted", permanent=True)
            return
        rows.append(_Row(kind, rel, None, is_dir, now))

    def _cookie_arrived(self, name: str, now: float, rows: list[_Row]) -> None:
        if not name.startswith(self._cookie_name + "."):
            return
        token = name[len(self._cookie_name) + 1 :]
        # A mark written by another process (snapfs watch serving a snapshot) has no recorded
        # counter: repeat any loss seen since the previous cookie, which is conservative.
        lo = self._mark_lo.pop(token, self._count_at_cookie)
        rows.append(_Row("cookie", self._cookie_rel, token.encode(), False, now, token))
        count, (kind, reason), degraded = self._losses.state()
        self._count_at_cookie = count
        if degraded is not None:
            rows.append(_Row("gap", b"", degraded.encode(), False, now))
        elif count > lo:
            # A loss seen while this cookie was in flight may sit before it in seq order but after
            # it in kernel order: repeat it after the cookie so the next interval sees it too.
            rows.append(_Row(kind, b"", reason.encode(), False, now))

    # ---- writer thread ------------------------------------------------------------------
    def _write_loop(self, conn: sqlite3.Connection) -> None:
        q = self._queue
        stopping = False
        while not stopping:
            first = q.get()
            if first is None:
                break
            batch = list(first)
            deadline = time.monotonic() + BATCH_SECONDS
            urgent = _has_cookie(first)  # a mark() is waiting: don't sit on it
            while len(batch) < BATCH_ROWS and not urgent:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    rows = q.get(timeout=left)
                except queue.Empty:
                    break
                if rows is None:
                    stopping = True
                    break
                batch += rows
                urgent = _has_cookie(rows)
            try:
                self._flush(conn, batch)
            except Exception:  # never let the writer die: mark() would hang until its timeout
                _logger().exception("the journal writer failed")
        # Rows queued after the stop marker (none in practice: the observer is joined first).
        rest: list[_Row] = []
        while True:
            try:
                rows = q.get_nowait()
            except queue.Empty:
                break
            if rows is not None:
                rest += rows
        if rest:
            try:
                self._flush(conn, rest)
            except Exception:
                _logger().exception("the journal writer failed")

    def _flush(self, conn: sqlite3.Connection, batch: list[_Row]) -> None:
        cookies: dict[str, int] = {}
        modified: list[bytes] = []
        sql = (
            "INSERT INTO journal (run, time, kind, relpath, dest, is_dir) VALUES (?, ?, ?, ?, ?, ?)"
        )
        try:
            with conn:
                if self._write_error is not None:
                    reason = f"journal rows could not be written ({self._write_error})"
                    conn.execute(sql, (self.run, time.time(), "gap", b"", reason.encode(), 0))
                prev: _Row | None = None
                for row in batch:
                    if (
                        prev is not None
                        and row.kind == prev.kind
                        and row.relpath == prev.relpath
                        and row.dest == prev.dest
                        and row.kind != "cookie"
                    ):
                        continue  # a write's IN_MODIFY then IN_CLOSE_WRITE, say
                    prev = row
                    cur = conn.execute(
                        sql, (self.run, row.time, row.kind, row.relpath, row.dest, row.is_dir)
                    )
                    if row.token is not None:
                        cookies[row.token] = int(cur.lastrowid or 0)
                    elif row.kind == "modified" and not row.is_dir:
                        modified.append(row.relpath)
        except sqlite3.Error as exc:
            _logger().warning("could not write %d journal rows: %s", len(batch), exc)
            with self._cond:
                self._write_error = str(exc)
                self._cond.notify_all()
            return
        crash_point("journal.rows_written")  # committed, not yet seen by a waiting mark()
        with self._cond:
            self._write_error = None
            for token, seq in cookies.items():
                if token in self._waiting:
                    self._cookie_seqs[token] = seq
            self._cond.notify_all()
        if self._on_modified is not None:
            for relpath in modified:
                try:
                    self._on_modified(relpath)
                except Exception:
                    _logger().exception("the on_modified hook failed for %r", relpath)

    # ---- queries ------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        if self._db is not None:
            return list(self._db.execute(sql, params).fetchall())
        with self._reader_lock:
            if self._reader is None:
                self._reader = connect(self._db_path, JOURNAL_SCHEMA)
            return list(self._reader.execute(sql, params).fetchall())

    def _run_of(self, seq: int) -> tuple[str, str] | None:
        rows = self._query("SELECT run, kind FROM journal WHERE seq = ?", (seq,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def events(self, since: int, until: int | None = None) -> list[JournalEvent]:
        """The rows with ``since < seq < until`` (no upper bound if None), oldest first, of the
        run that wrote ``since`` (this journal's run when ``since`` names no row)."""
        found = self._run_of(since)
        run = found[0] if found else self.run
        hi = until if until is not None else (1 << 62)
        rows = self._query(
            "SELECT seq, time, kind, relpath, dest, is_dir FROM journal"
            " WHERE run = ? AND seq > ? AND seq < ? ORDER BY seq",
            (run, since, hi),
        )
        return [
            JournalEvent(
                int(seq),
                float(t),
                str(kind),
                bytes(rel),
                None if dest is None else bytes(dest),
                bool(is_dir),
            )
            for seq, t, kind, rel, dest, is_dir in rows
        ]

    def touched(self, since: int, until: int) -> Touched:
        """What changed strictly between marks ``since`` and ``until``.

        ``continuous`` is True only when both are marks of the same run and no overflow or gap
        was recorded between them; the path sets are filled in either way (as hints).
        """
        reason = ""
        a, b = self._run_of(since), self._run_of(until)
        if a is None or a[1] != "cookie":
            reason = f"not started: {since} is not a journal mark"
        elif b is None or b[1] != "cookie":
            reason = f"not started: {until} is not a journal mark"
        elif a[0] != b[0]:
            reason = "gap: the marks belong to different journal runs"
        elif until <= since:
            reason = "gap: the interval is empty or reversed"
        paths: set[bytes] = set()
        dirty: set[bytes] = set()
        new_dirs: set[bytes] = set()
        run = a[0] if a is not None else self.run
        # Raw rows, each distinct change once: a file written in many pieces is one row here
        # (2,000 new files are ~6,000 events), and no event objects are built.
        rows = self._query(
            "SELECT kind, relpath, dest, is_dir FROM journal"
            " WHERE run = ? AND seq > ? AND seq < ?"
            " GROUP BY kind, relpath, dest, is_dir ORDER BY min(seq)",
            (run, since, until),
        )
        for kind, rel, dest, is_dir in rows:
            if kind in LOSS_KINDS:
                if not reason:
                    why = bytes(dest or b"").decode(errors="replace")
                    reason = f"{kind}: {why}" if why else kind
                continue
            if kind not in CHANGE_KINDS:
                continue
            names = [rel] if dest is None or kind != "moved" else [rel, dest]
            for p in map(bytes, names):
                paths.add(p)
                dirty.add(_parent(p))
                if is_dir:
                    dirty.add(p)
            if is_dir:
                if kind == "created":
                    new_dirs.add(bytes(rel))
                elif kind == "moved" and dest is not None:
                    new_dirs.add(bytes(dest))
        return Touched(
            continuous=not reason,
            reason=reason,
            paths=frozenset(paths),
            dirty_dirs=frozenset(dirty),
            new_dirs=frozenset(new_dirs),
        )
