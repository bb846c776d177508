"""Transactions: a checkpoint on entry, an exact rollback on any exception, a change set on commit.

::

    with snapfs.transaction(project, label="import portrait") as tx:
        run_the_import()          # any exception, KeyboardInterrupt included, rolls back
    print(tx.changes)             # what the operation changed (added/modified/deleted/moved)

The open transaction is recorded durably with its owner (pid, host, boot id, process start time).
If the owner dies (kill -9, power loss), the next snapfs command on the project sees a dead owner
and rolls the tree back to the checkpoint (or, with ``snapfs recover --keep``, keeps the partial
state and marks it). A live owner is never disturbed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, ParamSpec, TypeVar

from ._crash import crash_point
from ._diff import ChangeSet, change_set
from ._errors import UsageError
from ._project import Project, SnapshotInfo
from ._project import open as open_project
from ._scan import Hint, ProgressFn, no_progress
from ._state import TxnRow
from ._watch import SharedView, WatchView, external_mark  # loaded with _project anyway

if TYPE_CHECKING:
    from ._journal import Journal

P = ParamSpec("P")
R = TypeVar("R")

AUTOMATIC_KINDS = ("auto", "pre-import")


def _hostname() -> str:
    # What socket.gethostname() answers (it calls uname too), without importing socket: 3 ms
    # of every command that finds snapfs watch's cookie and checks that its owner lives.
    return os.uname().nodename


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot: tells a reused pid apart.

    "" if there is no such process, or it has exited and only awaits reaping (a zombie can never
    finish its transaction).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def _running(pid: int, start: str) -> bool:
    now = _proc_start(pid)
    return bool(now) and (not start or now == start)


RUN_TOKEN_VAR = "SNAPFS_RUN_TOKEN"  # in the environment of a command `snapfs run` starts


def _token_alive(token: str) -> bool:
    """Is a process running whose environment carries ``RUN_TOKEN_VAR=token``?

    The command `snapfs run` started is known by this until its pid is recorded: if snapfs is
    killed in between, its command may already be running (and changing the tree).
    """
    needle = f"{RUN_TOKEN_VAR}={token}".encode()
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:  # no /proc: the owner's own pid is all there is to go by
        return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in env.split(b"\0") and _proc_start(int(pid)):
            return True
    return False


# A NamedTuple, not a frozen dataclass: defining one costs every command ~0.4 ms at import.
class Owner(NamedTuple):
    """The process that owns an open transaction."""

    pid: int
    host: str
    boot_id: str
    start: str
    # A command run inside the transaction (snapfs run): while it lives, the operation is not
    # over, even if the snapfs process that started it was killed.
    child: int = 0
    child_start: str = ""
    # Set by snapfs run before it starts its command, which gets it in RUN_TOKEN_VAR: the
    # command counts as alive while not yet recorded in ``child`` (see ``alive``).
    token: str = ""

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, _hostname(), _boot_id(), _proc_start(pid))

    def with_child(self, pid: int) -> Owner:
        return self._replace(child=pid, child_start=_proc_start(pid))

    @classmethod
    def parse(cls, text: str) -> Owner:
        try:
            d = json.loads(text)
            return cls(
                int(d["pid"]),
                str(d["host"]),
                str(d["boot_id"]),
                str(d["start"]),
                int(d.get("child", 0)),
                str(d.get("child_start", "")),
                str(d.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return cls(0, "", "", "")  # unreadable owner: treated as dead on this host

    def dumps(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True)

    def alive(self) -> bool:
        """Is the owner still running? An owner on another host is assumed alive."""
        if self.host and self.host != _hostname():
            return True
        if not self.pid or (self.boot_id and self.boot_id != _boot_id()):
            return False
        if _running(self.pid, self.start):
            return True
        if self.child:
            return _running(self.child, self.child_start)
        # Killed between starting its command and recording it: the command has the token.
        return bool(self.token) and _token_alive(self.token)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host or 'unknown host'}"


class Transaction:
    """One operation that either completes or leaves the project exactly as it was."""

    def __init__(
        self,
        project: Project,
        label: str = "",
        *,
        post_snapshot: bool = False,
        preserve: Sequence[str] = (),
        progress: ProgressFn = no_progress,
        reuse_head: bool = False,
        post_kind: str = "post",
        post_label: str = "",
        journal_helper: bool | None = None,
    ) -> None:
        """``reuse_head``: when the tree still equals HEAD, take HEAD as the checkpoint instead
        of recording the same tree again. An operation's steps use it with ``post_snapshot``
        (of kind ``post_kind``, labelled ``post_label``), so that each step's post snapshot is
        the next step's restore point.

        ``journal_helper``: whether a journal of the transaction's own watches from a helper
        process (see ``_journal_proc``) rather than from threads of this one; default
        ``config.journal_process``. The helper keeps an operation that runs in this process
        from sharing the GIL with the journal; it is no use when the operation is another
        process (``snapfs run``), and costs a process start."""
        self.project = project
        self.label = label
        self.post_snapshot = post_snapshot
        self.reuse_head = reuse_head
        self.post_kind = post_kind
        self.post_label = post_label
        self.preserve = tuple(project.config.preserve) + tuple(preserve)
        self.progress = progress
        self.id: int | None = None
        self.checkpoint: SnapshotInfo | None = None
        self.post: SnapshotInfo | None = None
        self.status = "new"
        self.warnings: list[str] = []
        self._final: ChangeSet | None = None
        self._journal: Journal | WatchView | None = None
        self._since = 0
        self.journal_note = ""  # why the journal could not be used, if it couldn't
        self._owner_token = ""  # snapfs run: the token its command will carry (see Owner)
        self._journal_helper = (
            project.config.journal_process if journal_helper is None else journal_helper
        )

    def _owner(self) -> Owner:
        """This process as the transaction's owner, with the token its command carries."""
        return Owner.current()._replace(token=self._owner_token)

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> Transaction:
        self.begin()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.status != "open":
            return
        if et is None:
            self.commit()
        else:
            self.rollback(error=f"{et.__name__}: {e}" if str(e) else et.__name__)

    def begin(self) -> None:
        if self.status != "new":
            raise UsageError("This transaction has already started.")
        p = self.project
        stack = p._transactions
        parent = stack[-1].id if stack else None
        what = self.label or "an operation"
        if p.config.journal:
            self._start_journal()  # before the checkpoint: nothing can slip between the two
        try:
            # With snapfs watch, the checkpoint is taken as of the mark the journal starts at
            # (one round trip to the watcher instead of two): whatever happens after it is the
            # operation's, and is what its changes and rollback look at.
            first = self._journal.first if isinstance(self._journal, WatchView) else None
            self.checkpoint = p._snapshot(
                f"before {what}",
                kind="pre-op",
                progress=self.progress,
                mark=first,
                reuse_head=self.reuse_head,
            )
        except BaseException:
            self._stop_journal()
            raise
        self.id = p.state.begin_txn(
            label=self.label,
            parent=parent,
            checkpoint=self.checkpoint.id,
            owner=self._owner().dumps(),
            preserve=json.dumps(list(self.preserve)),
        )
        crash_point("txn.begun")
        self.status = "open"
        stack.append(self)

    def _pop(self, outcome: str) -> None:
        stack = self.project._transactions
        if self in stack:
            at = stack.index(self)
            orphans = stack[at + 1 :]
            del stack[at:]
            for inner in reversed(orphans):  # an inner one left open ends with its parent
                inner._end_with_parent(self, outcome)
        self._stop_journal()

    def _end_with_parent(self, parent: Transaction, outcome: str) -> None:
        self._stop_journal()
        if self.status != "open" or self.id is None:
            return
        # The parent's commit keeps the inner's work; its rollback undid it.
        self.status = outcome
        self.project.state.end_txn(
            self.id, self.status, error=f"left open; ended with transaction {parent.id}"
        )

    # ---- the journal: limits the work of changes/rollback to what was touched ------------
    def _start_journal(self) -> None:
        from ._journal import JournalUnavailable
        from ._journal_proc import start_journal

        p = self.project
        try:
            shared = p._shared_journal
            if shared is not None:
                self._journal = SharedView(p, shared, shared.mark())  # the operation's journal
            elif (mark := external_mark(p, timeout=0.5)) is not None:
                self._journal = WatchView(p, mark)  # snapfs watch is running: use its journal
            else:
                self._journal, self._since = start_journal(
                    p.root,
                    p.state.path,
                    owner=Owner.current().dumps(),
                    on_modified=self._modified,
                    helper=self._journal_helper,
                )
                return
            self._since = self._journal.start()
        except JournalUnavailable as exc:
            self.journal_note = str(exc)
            self._stop_journal()

    def _stop_journal(self) -> None:
        if self._journal is not None:
            self._journal.stop()
            run = getattr(self._journal, "run", None)
            self._journal = None
            if run is not None:  # our own journal's events served their purpose
                self.project.state.prune_journal(keep_runs=(), only_run=run)

    def _hint(self) -> Hint | None:
        """The journal's account since the checkpoint, if its continuity is proven."""
        from ._journal import JournalUnavailable

        if self._journal is None or self.checkpoint is None:
            return None
        try:
            until = self._journal.mark()
        except JournalUnavailable as exc:
            self.journal_note = str(exc)
            return None
        touched = self._journal.touched(self._since, until)
        if not touched.continuous:
            self.journal_note = f"the journal lost events ({touched.reason}); compared everything"
            return None
        return Hint(
            bytes.fromhex(self.checkpoint.root),
            self.project.state.tree,
            touched.dirty_dirs,
            touched.new_dirs,
        )

    def _modified(self, relpath: bytes) -> None:
        """Called by the journal for each file written in place: a sealed object is damaged."""
        entry = self.project.state.file_records().get(relpath)
        if entry is not None and self.project.store.seal_of(entry.oid) is not None:
            self.warnings.append(
                f"{os.fsdecode(relpath)} was written in place; it is stored as a hardlink, so the"
                " checkpoint's copy of it is damaged too (run 'snapfs verify')."
            )

    # ---- what changed -------------------------------------------------------------------
    @property
    def changes(self) -> ChangeSet:
        """What changed since the checkpoint (while open), or what the transaction did."""
        if self._final is not None:
            return self._final
        assert self.checkpoint is not None, "the transaction has not started"
        found: ChangeSet = self.project.change_set_since(
            self.checkpoint.id, progress=self.progress, hint=self._hint()
        )
        return found

    # ---- ending -------------------------------------------------------------------------
    def rollback(self, *, error: str | None = None) -> ChangeSet:
        """Put the tree back exactly as it was at the checkpoint (preserved paths excepted)."""
        if self.status != "open":
            raise UsageError(f"This transaction is already {self.status}.")
        assert self.checkpoint is not None and self.id is not None
        hint = self._hint()
        # Its account taken, the journal is done: stopped now, it doesn't record (and then
        # wait out the pairing delay of) every entry the rollback moves to the trash.
        self._stop_journal()
        try:
            undone = self.project.rollback_to_checkpoint(
                self.checkpoint.id, preserve=self.preserve, progress=self.progress, hint=hint
            )
        finally:
            self._pop("rolled-back")
        crash_point("txn.rolled_back")
        self._final = undone
        self.status = "rolled-back"
        self.project.state.end_txn(
            self.id, self.status, changes=json.dumps(undone.to_dict()), error=error
        )
        return undone

    def commit(self) -> ChangeSet:
        """Record the operation and what it changed; take the post snapshot if asked."""
        if self.status != "open":
            raise UsageError(f"This transaction is already {self.status}.")
        assert self.id is not None
        try:
            if self.post_snapshot:
                what = self.label or "an operation"
                label = self.post_label or f"after {what}"
                self.post = self.project.snapshot(label, kind=self.post_kind)
                # Both trees are stored: their diff is the change set, without another walk.
                assert self.checkpoint is not None
                p = self.project
                old, new = bytes.fromhex(self.checkpoint.root), bytes.fromhex(self.post.root)
                done = change_set(p._load(), old, new)
            else:
                done = self.changes
        finally:
            self._pop("committed")
        crash_point("txn.before_commit_record")
        self._final = done
        self.status = "committed"
        self.project.state.end_txn(
            self.id,
            self.status,
            changes=json.dumps(done.to_dict()),
            post=self.post.id if self.post else None,
        )
        return done


def transaction(
    project: Project | str | os.PathLike[str],
    label: str = "",
    *,
    post_snapshot: bool = False,
    preserve: Sequence[str] = (),
    progress: ProgressFn = no_progress,
) -> Transaction:
    """A transaction on ``project`` (a Project or a path), for use in a ``with`` block."""
    if isinstance(project, Project):
        return Transaction(
            project, label, post_snapshot=post_snapshot, preserve=preserve, progress=progress
        )
    return _OwnedTransaction(
        open_project(project),
        label,
        post_snapshot=post_snapshot,
        preserve=preserve,
        progress=progress,
    )


class _OwnedTransaction(Transaction):
    """A transaction that opened its project from a path, and closes it at the end."""

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            super().__exit__(et, e, tb)
        finally:
            self.project.close()


# ---- checkpoints for host applications ----------------------------------------------------


def checkpoint(
    project: Project | str | os.PathLike[str], *, kind: str = "auto", label: str = ""
) -> SnapshotInfo:
    """Take a checkpoint, then prune automatic ones beyond the retention limit."""
    with _project(project) as p:
        info = p.snapshot(label, kind=kind)
        if kind in AUTOMATIC_KINDS:
            p.prune_automatic(p.config.auto_keep)
        return info


def checkpointed(
    project: Project | str | os.PathLike[str] | None = None,
    *,
    kind: str = "pre-import",
    label: str | None = None,
    project_arg: str = "project",
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: take a checkpoint of the project before every call.

    The project is ``project`` if given, else the call's argument named ``project_arg``.
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        import inspect

        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            target = project
            if target is None:
                bound = sig.bind_partial(*args, **kwargs)
                if project_arg not in bound.arguments:
                    raise UsageError(
                        f"{fn.__name__}() was called without {project_arg!r}, so there is"
                        " no project to checkpoint."
                    )
                target = bound.arguments[project_arg]
            checkpoint(target, kind=kind, label=label or f"before {fn.__name__}")
            return fn(*args, **kwargs)

        return inner

    return wrap


@contextmanager
def _project(project: Project | str | os.PathLike[str]) -> Iterator[Project]:
    if isinstance(project, Project):
        yield project
    else:
        with open_project(project) as p:
            yield p


# ---- crash recovery -----------------------------------------------------------------------


def dead_transactions(rows: list[TxnRow]) -> list[TxnRow]:
    """Open transactions whose owner is gone, outermost first."""
    return sorted((r for r in rows if not Owner.parse(r.owner).alive()), key=lambda r: r.id)


def describe_owner(row: TxnRow) -> str:
    return Owner.parse(row.owner).describe()


def dead_cookies(state_dir: Path) -> list[str]:
    """The marker files (``journal-cookie-<run>``, or a ``.<token>`` temp of one) of change
    journals whose process died.

    Only a running journal's ``stop()`` removes its cookie, so a journal killed with its process
    (a transaction killed by SIGKILL) would leave it for ever. Each cookie names its owner and
    pid, so a live journal (``snapfs watch``, another transaction) is never disturbed.
    """
    try:
        names = sorted(n for n in os.listdir(state_dir) if n.startswith("journal-cookie-"))
    except OSError:
        return []
    dead = []
    for name in names:
        try:
            with open(os.path.join(state_dir, name), "rb") as f:
                text = f.read(4096).decode("utf-8", "replace").strip()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except OSError:
            continue
        if not _cookie_alive(text, age):
            dead.append(name)
    return dead


def sweep_dead_cookies(state_dir: Path) -> list[str]:
    """Remove the cookies of dead journals (:func:`dead_cookies`); return their names."""
    removed = []
    for name in dead_cookies(state_dir):
        try:
            os.unlink(os.path.join(state_dir, name))
        except FileNotFoundError:
            pass
        removed.append(name)
    return removed


def _cookie_alive(text: str, age: float) -> bool:
    # "run=<hex> owner=<Owner JSON, or empty> pid=<pid>" (Journal._write_cookie)
    m = re.fullmatch(r"run=\S* owner=(.*) pid=(\d+)", text)
    if m is None:
        # No owner to ask: a live journal's temp between its creation and its write (for
        # microseconds), a journal killed right there, or damage. Give a live one time.
        return age < 60
    owner = Owner.parse(m.group(1)) if m.group(1) else Owner(0, "", "", "")
    if owner.pid:
        return owner.alive()
    return _running(int(m.group(2)), "")


# ---- wrapping a command -------------------------------------------------------------------


class RunResult(NamedTuple):
    """How a wrapped command ended, and what snapfs did about it."""

    returncode: int  # the command's exit code; 128+N when it died of signal N
    rolled_back: bool
    changes: ChangeSet  # what the command changed (and, if rolled back, what was undone)
    transaction: int
    error: str = ""


def run_command(
    project: Project,
    argv: Sequence[str],
    *,
    label: str = "",
    post_snapshot: bool = False,
    preserve: Sequence[str] = (),
    progress: ProgressFn = no_progress,
    cwd: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Run ``argv`` inside a transaction: a non-zero exit or a signal rolls the project back.

    The command's stdin, stdout and stderr are the caller's. SIGINT, SIGTERM, SIGHUP and SIGQUIT
    sent to this process are passed on to the command, which decides how to end.
    """
    import signal
    import subprocess

    if not argv:
        raise UsageError("No command to run (put it after '--').")
    tx = Transaction(
        project,
        label or " ".join(argv)[:200],
        post_snapshot=post_snapshot,
        preserve=preserve,
        progress=progress,
        journal_helper=False,  # the command is a process of its own: threads don't slow it
    )
    # The command is known by a token from the start: snapfs may be killed after starting it
    # but before recording its pid, and recovery must not roll back under it meanwhile.
    token = os.urandom(8).hex()
    tx._owner_token = token
    env = {**os.environ, RUN_TOKEN_VAR: token}
    tx.begin()
    assert tx.id is not None
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {s: signal.getsignal(s) for s in forwarded}
    child: subprocess.Popen[bytes] | None = None
    early: list[int] = []  # signals that arrived before the command existed

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            early.append(signum)
            return
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    # Handlers first: a signal between starting the command and handling it must not orphan it.
    for s in forwarded:
        signal.signal(s, forward)
    try:
        try:
            child = subprocess.Popen(list(argv), cwd=cwd, env=env)
        except OSError as exc:
            undone = tx.rollback(error=f"could not start {argv[0]}: {exc.strerror}")
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return RunResult(code, True, undone, tx.id, f"Could not run {argv[0]}: {exc.strerror}.")
        crash_point("run.spawned")
        # Record the command as part of the owner: if only snapfs is killed, recovery must not
        # roll the tree back under a command that is still running.
        project.state.set_txn_owner(tx.id, tx._owner().with_child(child.pid).dumps())
        for signum in early:
            child.send_signal(signum)
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = rc if rc >= 0 else 128 - rc
    if rc == 0:
        return RunResult(0, False, tx.commit(), tx.id)
    why = f"exit status {rc}" if rc > 0 else f"signal {-rc} ({signal.Signals(-rc).name})"
    undone = tx.rollback(error=f"{argv[0]} ended with {why}")
    return RunResult(code, True, undone, tx.id, f"{argv[0]} ended with {why}.")
