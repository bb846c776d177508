"""The Project facade: what ``snapfs.open()`` returns and every CLI command calls."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ._restore import Intent, Op
    from ._txn import Transaction

from . import _trash as trash
from ._config import Config, load_config
from ._crash import crash_point
from ._diff import Changes, ChangeSet, TreeLoader, change_set, changes, walk_diff, walk_tree
from ._errors import (
    NotAProject,
    ObjectCorrupt,
    ObjectMissing,
    ProjectPathError,
    SealBroken,
    SnapfsError,
    SnapshotNotFound,
    StateCorrupt,
    UnsafePath,
    UsageError,
    from_oserror,
)
from ._fsops import DIR_FLAGS, READ_FLAGS, LinkMode, open_parent, remove_tree, split_relpath
from ._hashing import Oid, hash_bytes, hash_fd
from ._ignore import Ignore
from ._index import SETTLE_MIN_SIZE, CacheEntry, Loaded
from ._lock import Lock
from ._objects import ObjectStore, Seal
from ._scan import (
    RACY_NS,
    Hint,
    Progress,
    ProgressFn,
    ScanResult,
    is_racy,
    no_progress,
    scan,
)
from ._state import KINDS, NOT_ROLLBACK_TARGETS, ProjectState, SnapshotRow
from ._threads import executor
from ._tree import Entry, Kind, decode, encode, tree_oid
from ._watch import (
    Mark,
    SharedJournal,
    external_mark,
    last_mark,
    remember_mark,
    touched_between,
    watch_run,
)

STATE_DIR = ".snapfs"
# Patterns as text: re compiles (and caches) them on first use, not at every import.
_LATEST = r"^latest(?:~([0-9]+))?$"
_DURATION = r"^(\d+)\s*([smhdw])$"
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# No dataclasses on the command path (why: the note on _config.Config).
class SnapshotInfo(NamedTuple):
    """A snapshot as users see it. ``id`` is the number they type."""

    id: int
    created: float
    label: str
    kind: str
    root: str
    files: int
    bytes: int
    new_bytes: int
    new_objects: int
    seconds: float

    @classmethod
    def of(cls, row: SnapshotRow) -> SnapshotInfo:
        return cls(
            row.id,
            row.created,
            row.label,
            row.kind,
            row.root.hex(),
            row.files,
            row.bytes,
            row.new_bytes,
            row.new_objects,
            row.seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        d = self._asdict()
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.created))
        return d


class RestoreResult(NamedTuple):
    target: int
    pre_restore: int | None  # the snapshot that undoes this restore
    plan: list[Op]
    changed: int
    dry_run: bool = False


class Problem(NamedTuple):
    kind: str  # missing, corrupt, tampered, tree
    oid: str
    message: str
    paths: tuple[str, ...] = ()


class VerifyReport(NamedTuple):
    objects: int
    trees: int
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


class GcReport(NamedTuple):
    deleted_snapshots: list[int]
    objects: int
    trees: int
    freed_bytes: int
    dry_run: bool


def parse_duration(text: str) -> float:
    m = re.match(_DURATION, text.strip().lower())
    if not m:
        raise UsageError(f"Not a duration: {text!r} (use e.g. 30m, 12h, 7d, 2w).")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def find_root(start: Path) -> Path:
    """The project containing ``start``: the nearest ancestor with a .snapfs/ state dir."""
    start = start.resolve()  # a symlink to the project is the project
    if not start.exists():
        raise ProjectPathError(f"{start} does not exist.")
    if not start.is_dir():
        raise ProjectPathError(f"{start} is not a directory.")
    for d in (start, *start.parents):
        if (d / STATE_DIR / "project.db").is_file():
            return d
    raise NotAProject(
        f"{start} is not inside a snapfs project.", hint="Run 'snapfs init' there first."
    )


def init(
    path: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Project:
    """Make ``path`` a snapfs project (idempotent) and open it."""
    root = Path(path).resolve()
    if not root.exists():
        raise ProjectPathError(f"{root} does not exist.")
    if not root.is_dir():
        raise ProjectPathError(f"{root} is not a directory.")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise ProjectPathError(f"{root} is not readable and writable by you.")
    state_dir = root / STATE_DIR
    config = load_config(root, env, {**overrides, "store": store})
    store_root = config.store or state_dir
    recorded: Path | None = None
    if (state_dir / "project.db").is_file():
        st = ProjectState(state_dir / "project.db")
        try:
            recorded = st.get_path("store")
        finally:
            st.close()
    if recorded is not None and config.store is not None and recorded != store_root:
        raise UsageError(f"{root} already uses the store {recorded}.")
    store_root = recorded or store_root
    try:
        state_dir.mkdir(exist_ok=True)
        (state_dir / "staging").mkdir(exist_ok=True)
        # The store first: a project must never record a store that doesn't exist.
        objects = ObjectStore.create(store_root, config)
    except OSError as exc:
        raise from_oserror(exc, "Creating the snapfs store", store_root) from exc
    try:
        objects.register_project(root, state_dir / "project.db")
    finally:
        objects.close()
    if recorded is None:
        st = ProjectState(state_dir / "project.db")
        try:
            st.set_path("store", store_root)
            st.set_meta("created", str(time.time()))
        finally:
            st.close()
    return Project(root, config)


def open(  # noqa: A001 - the public name mirrors builtins.open on purpose
    path: str | os.PathLike[str] = ".",
    *,
    store: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    recover: bool = True,
    **overrides: Any,
) -> Project:
    """Open the project containing ``path``. Finishes an interrupted restore if it can."""
    root = find_root(Path(path))
    config = load_config(root, env, {**overrides, "store": store})
    project = Project(root, config)
    if recover:
        project._auto_recover()
    return project


class Project:
    """A snapfs project: a folder, its ``.snapfs/`` state and an object store."""

    def __init__(self, root: Path, config: Config) -> None:
        self.root = root
        self.state_dir = root / STATE_DIR
        self.state = ProjectState(self.state_dir / "project.db")
        if self.state.get_meta("created") is None:  # init records it before anything else
            self.state.close()
            raise StateCorrupt(
                "This project's snapshot records (.snapfs/project.db) are empty or missing,"
                " so its snapshots can't be found.",
                hint="The stored files are untouched. Restore .snapfs/project.db from a backup;"
                " 'snapfs init' would start a new history instead.",
            )
        store_root = self.state.get_path("store") or self.state_dir
        if config.store is not None and config.store != store_root:
            self.state.close()
            raise UsageError(
                f"This project uses the store {store_root}, not {config.store}.",
                hint="Drop --store / SNAPFS_STORE for this project.",
            )
        self.config = config
        try:
            self.store = ObjectStore(store_root, config)
        except BaseException:
            self.state.close()
            raise
        self.lock = Lock(self.state_dir / "lock", "project")
        self.on_wait: Callable[[str], None] | None = None
        self._transactions: list[Transaction] = []  # this process's open ones, nested
        self._shared_journal: SharedJournal | None = None  # see journal_scope

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        self.lock.release()
        self.state.close()
        self.store.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def journal_scope(self) -> Iterator[None]:
        """Keep one change journal running for the block, as ``snapfs watch`` would.

        For a multi-step operation: every snapshot taken in the block after the first, and
        every transaction's checkpoint and account, read only what changed since the previous
        mark instead of the whole tree, and no step pays for starting its own journal. Does
        nothing if ``snapfs watch`` is running (its journal serves), journals are off, or
        inotify is unavailable (everything then walks the tree, as without it).
        """
        if (
            self._shared_journal is not None
            or not self.config.journal
            or external_mark(self, timeout=0.5) is not None
        ):
            yield
            return
        from ._journal import Journal, JournalUnavailable
        from ._txn import Owner

        # Threads, not a helper process (_journal_proc): an import's steps (git, venv, pip) are
        # processes of their own, which the GIL doesn't slow, and a helper made the start and
        # each step's marks dearer (the recovery benchmark's own time: 0.86 s, with one 1.39 s).
        journal = Journal(
            self.root, self.state.path, owner=Owner.current().dumps(), on_modified=self._modified
        )
        try:
            journal.start()
        except JournalUnavailable:
            yield
            return
        self._shared_journal = SharedJournal(journal)
        try:
            yield
        finally:
            self._shared_journal = None
            journal.stop()
            self.state.prune_journal(keep_runs=(), only_run=journal.run)

    def _modified(self, relpath: bytes) -> None:
        """The shared journal saw a file written in place: the open transaction warns."""
        if self._transactions:
            self._transactions[-1]._modified(relpath)

    @contextmanager
    def _write_lock(self, purpose: str) -> Iterator[None]:
        """Hold the project's writer lock for the block (re-entrant within this Project)."""
        self.lock.acquire(wait=self.config.lock_wait, on_wait=self.on_wait, purpose=purpose)
        try:
            yield
        finally:
            self.lock.release()

    def _load(self) -> TreeLoader:
        return self.state.tree

    # ---- ids ----------------------------------------------------------------------------
    def resolve(self, ref: str | int) -> SnapshotRow:
        """A snapshot by number, ``latest`` or ``latest~N``."""
        text = str(ref).strip()
        rows = None
        m = re.match(_LATEST, text)
        if m:
            rows = self.state.snapshots()
            n = int(m.group(1) or 0)
            if n >= len(rows):
                raise SnapshotNotFound(f"There is no snapshot {text}: the project has {len(rows)}.")
            return rows[-1 - n]
        if not (text.isascii() and text.isdigit()):  # '²'.isdigit(), but int('²') fails
            raise SnapshotNotFound(
                f"{text!r} is not a snapshot id (use a number, 'latest' or 'latest~N')."
            )
        sid = int(text)
        row = self.state.snapshot(sid) if sid < 1 << 63 else None  # SQLite's INTEGER is 64-bit
        if row is None:
            raise SnapshotNotFound(
                f"There is no snapshot {text}.", hint="'snapfs list' shows the snapshots."
            )
        return row

    # ---- reading ------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        return [SnapshotInfo.of(r) for r in self.state.snapshots()]

    @property
    def head(self) -> int | None:
        """The snapshot most recently taken or restored (like git's HEAD)."""
        return self.state.head

    def _scan_readonly(
        self, progress: ProgressFn, hint: Hint | None = None, *, lazy_added: bool = False
    ) -> ScanResult:
        # Nothing a read-only scan builds is stored. With ``lazy_added`` (a rollback to the
        # hint's base), files the base lacks are not read: they are about to be deleted.
        return self._scan_view(progress, hint, lazy_added=lazy_added)[0]

    def _scan_view(
        self, progress: ProgressFn, hint: Hint | None = None, *, lazy_added: bool = False
    ) -> tuple[ScanResult, Loaded, bytes]:
        """A read-only scan, with the stat cache it read and the ignore rules' fingerprint."""
        ignore = Ignore.load(self.root)
        view = self.state.cache_view()
        res = scan(
            self.root,
            ignore=ignore,
            cache=view.files,
            batch=None,
            workers=self.config.workers,
            helpers=self.config.scan_helpers,
            progress=progress,
            hint=hint,
            lazy_added=lazy_added,
            dirs=view.dirs if view.rules == ignore.fingerprint else {},
        )
        return res, view, ignore.fingerprint

    def _hash_path(self, relpath: bytes) -> Oid | None:
        """The digest of the project file ``relpath``, reached without following a symlink;
        None if it can't be read (gone, or not a regular file)."""
        root_fd = os.open(self.root, DIR_FLAGS)
        try:
            with open_parent(root_fd, relpath) as (dfd, name):
                fd = os.open(name, READ_FLAGS, dir_fd=dfd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        return None
                    return hash_fd(fd)[0]
                finally:
                    os.close(fd)
        except (OSError, SnapfsError):
            return None
        finally:
            os.close(root_fd)

    def _inline_max(self) -> int:
        # Forced reflink/hardlink modes need every file to go through the link strategy.
        if self.config.link_mode in (LinkMode.REFLINK, LinkMode.HARDLINK):
            return 0
        return self.config.pack_threshold

    def _overlay(self, extra: dict[Oid, bytes]) -> TreeLoader:
        load = self.state.tree
        return lambda oid: extra.get(oid) or load(oid)

    def _scan_current(self, progress: ProgressFn) -> ScanResult:
        """The working tree's trees, read only where ``snapfs watch`` saw changes if it runs."""
        _mark, hint, _base = self._watch_hint()
        res, view, rules = self._scan_view(progress, hint)
        self._keep_scan_records(res, view, rules)
        return res

    def _keep_scan_records(self, res: ScanResult, view: Loaded, rules: bytes) -> None:
        """Record what a read-only scan learned, where that is safe, so the next scan need not
        learn it again. A restore lands files with stat cache entries, but it can't vouch for
        the directories it changed, and the small files it wrote are racy (written just now):
        until the next snapshot every ``status`` rebuilt those directories and re-hashed those
        files (after a restore of 2k files, 0.3 s instead of 0.13 s).

        Safe means:
        - a cache entry is kept only if it is not racy, its object is stored (a snapshot trusting
          it never reads the file) and the file can't be a sealed hardlink (whose seal only a
          snapshot updates);
        - a directory record only if its tree is stored (a scan trusting it never reads the
          directory) and every file in it has a cache entry it was built from (a record vouches
          for them);
        - the stat cache is still the one the scan read, and the writer lock and the store's
          shared lock are free at once: a reader never waits, and a failed write only loses a
          shortcut.
        """
        if res.dirs is None:  # a journal-guided scan: it built only part of the tree
            return
        old = view.dirs if view.rules == rules else {}
        fresh = {rel: rec for rel, rec in res.dirs.items() if old.get(rel) != rec}
        if not fresh and not res.cache_updates and not res.cache_deletes:
            return
        cfg = self.config
        hardlinks = cfg.link_mode == LinkMode.HARDLINK
        wanted = [
            (relpath, e)
            for relpath, e in res.cache_updates
            if not e.racy and not hardlinks and e.size < cfg.hardlink_threshold
        ]
        try:
            self.lock.acquire(wait=False, purpose="status: recording the stat cache")
        except (SnapfsError, OSError):
            return
        try:
            self.store.lock.acquire(shared=True, wait=False)
        except (SnapfsError, OSError):
            self.lock.release()
            return
        try:
            if self.state.cache_view() is not view:  # another writer changed it meanwhile
                return
            updates = [(relpath, e) for relpath, e in wanted if e.oid in self.store]
            kept_paths = {relpath for relpath, _e in updates}
            unvouched = {
                relpath.rpartition(b"/")[0]
                for relpath, _e in res.cache_updates
                if relpath not in kept_paths
            }
            stored = self.state.stored_trees(rec.oid for rec in fresh.values())
            dirs = {
                rel: rec
                for rel, rec in res.dirs.items()
                if old.get(rel) == rec
                or (rel in fresh and rel not in unvouched and rec.oid in stored)
            }
            self.state.update_cache(updates, res.cache_deletes, (rules, dirs))
        except (SnapfsError, OSError, sqlite3.Error):
            return
        finally:
            self.store.lock.release()
            self.lock.release()

    def status(self, progress: ProgressFn = no_progress) -> Changes:
        """Changes in the working tree since HEAD (everything is 'added' before any snapshot)."""
        cur = self._scan_current(progress)
        head = self.state.head
        row = self.state.snapshot(head) if head is not None else None
        base = row.root if row else _empty_tree(cur)
        return changes(self._overlay(cur.trees), base, cur.root)

    def diff(
        self, a: str | int, b: str | int | None = None, progress: ProgressFn = no_progress
    ) -> Changes:
        """Changes from snapshot ``a`` to snapshot ``b`` (default: the working tree)."""
        ra = self.resolve(a)
        if b is not None:
            return changes(self._load(), ra.root, self.resolve(b).root)
        cur = self._scan_current(progress)
        return changes(self._overlay(cur.trees), ra.root, cur.root)

    def change_set_since(
        self, ref: str | int, progress: ProgressFn = no_progress, hint: Hint | None = None
    ) -> ChangeSet:
        """What changed in the working tree since snapshot ``ref``, with moves paired.

        A ``hint`` based on that snapshot limits the walk to the directories it names, and
        then files the snapshot lacks are not read (only their names are reported), except one
        as large as a file that went, which may be the other end of a move.
        """
        base = self.resolve(ref)
        if hint is None or hint.base != base.root:
            cur = self._scan_readonly(progress)
            return change_set(self._overlay(cur.trees), base.root, cur.root)
        cur = self._scan_readonly(progress, hint, lazy_added=True)
        return change_set(self._overlay(cur.trees), base.root, cur.root, resolve=self._hash_path)

    # ---- snapshot -----------------------------------------------------------------------
    def snapshot(
        self, label: str = "", *, kind: str = "manual", progress: ProgressFn = no_progress
    ) -> SnapshotInfo:
        """Record the working tree. Costs only what changed since the last snapshot."""
        return self._snapshot(label, kind=kind, progress=progress)

    def _snapshot(
        self,
        label: str,
        *,
        kind: str,
        progress: ProgressFn,
        mark: Mark | None = None,
        reuse_head: bool = False,
    ) -> SnapshotInfo:
        """``snapshot``, as of ``mark`` of snapfs watch's journal if one was just taken. With
        ``reuse_head``, HEAD is returned instead of a new snapshot of the same tree."""
        if kind not in KINDS:
            raise UsageError(f"Unknown snapshot kind {kind!r} (one of {', '.join(KINDS)}).")
        with self._write_lock(f"snapshot {label}".strip()):
            self._recover_locked()
            head = self._head_row() if reuse_head else None
            sid, _root = self._snapshot_locked(
                label, kind, progress, mark=mark, skip_if_root=head.root if head else None
            )
            if sid is None and head is not None:
                sid = head.id
            assert sid is not None
            row = self.state.snapshot(sid)
            assert row is not None
            return SnapshotInfo.of(row)

    def _head_row(self) -> SnapshotRow | None:
        """HEAD's snapshot: the one most recently taken or restored."""
        head = self.state.head
        return self.state.snapshot(head) if head is not None else None

    def _snapshot_locked(
        self,
        label: str,
        kind: str,
        progress: ProgressFn,
        *,
        set_head: bool = True,
        skip_if_root: Oid | None = None,
        mark: Mark | None = None,
    ) -> tuple[int | None, Oid]:
        """Scan and store the tree. Returns (new snapshot id, root); the id is None when the
        root equals ``skip_if_root`` and so nothing was recorded."""
        t0 = time.monotonic()
        self.store.sweep_leftovers()
        mark, hint, base = self._watch_hint(mark)
        self.store.lock.acquire(shared=True, wait=True)
        try:
            batch = self.store.batch()
            try:
                ignore = Ignore.load(self.root)
                res = scan(
                    self.root,
                    ignore=ignore,
                    cache=self.state.file_records(),
                    batch=batch,
                    workers=self.config.workers,
                    helpers=self.config.scan_helpers,
                    inline_max=self._inline_max(),
                    progress=progress,
                    hint=hint,
                    dirs=self.state.load_dir_cache(ignore.fingerprint),
                )
                # Recorded with the stat cache, once the trees they name are stored.
                dirs = (ignore.fingerprint, res.dirs) if res.dirs is not None else None
                if base is not None:  # a journal-guided scan read only part of the tree
                    res.files, res.nbytes = _totals(self._overlay(res.trees), base, res.root)
                if skip_if_root is not None and res.root == skip_if_root:
                    batch.abort()
                    # Every tree of this scan is one of HEAD's, so already stored.
                    self.state.update_cache(res.cache_updates, res.cache_deletes, dirs)
                    if mark is not None and self.state.head is not None:
                        remember_mark(self, mark, self.state.head)
                    return None, res.root
                batch.commit()
                res.resealed(batch.resealed)
                new_objects = batch.new_objects_committed
            except BaseException:
                batch.abort()
                raise
            sid = self.state.add_snapshot(
                kind=kind,
                label=label,
                root=res.root,
                trees=res.trees.items(),
                files=res.files,
                nbytes=res.nbytes,
                new_bytes=res.stored + batch.stored,
                new_objects=new_objects,
                seconds=time.monotonic() - t0,
                cache_updates=res.cache_updates,
                cache_deletes=res.cache_deletes,
                dirs=dirs,
                set_head=set_head,
            )
            if mark is not None:
                remember_mark(self, mark, sid)
            return sid, res.root
        finally:
            self.store.lock.release()

    def _watch_hint(
        self, mark: Mark | None = None
    ) -> tuple[Mark | None, Hint | None, SnapshotRow | None]:
        """With a journal running (``snapfs watch``, or this process's ``journal_scope``): a
        fresh mark (or ``mark``, one just taken), and a hint if the journal proves what
        changed since the last watched snapshot (which is then the scan's base)."""
        if not self.config.journal:
            return None, None, None
        if mark is None and self._shared_journal is not None:
            from ._journal import JournalUnavailable

            try:
                mark = self._shared_journal.mark()
            except JournalUnavailable:
                return None, None, None
        mark = mark or external_mark(self)
        if mark is None:
            return None, None, None
        last = last_mark(self)
        if last is None:
            return mark, None, None
        base = self.state.snapshot(last[1])
        touched = touched_between(self, last[0], mark) if base is not None else None
        if base is None or touched is None or not touched.continuous:
            return mark, None, None
        return mark, Hint(base.root, self.state.tree, touched.dirty_dirs, touched.new_dirs), base

    # ---- restore ------------------------------------------------------------------------
    def restore(
        self,
        ref: str | int,
        *,
        dry_run: bool = False,
        progress: ProgressFn = no_progress,
    ) -> RestoreResult:
        """Make the working tree exactly equal to snapshot ``ref``. Undo with the pre-restore id."""
        if dry_run:
            from ._restore import plan_restore

            target = self.resolve(ref)
            cur = self._scan_readonly(progress)
            plan = plan_restore(self._overlay(cur.trees), cur.root, target.root)
            return RestoreResult(target.id, None, plan, len(plan), dry_run=True)
        with self._write_lock(f"restore {ref}"), self.state.deferred_index():
            self._recover_locked()
            target = self.resolve(ref)
            head = self._head_row()
            # The state being left is saved first, unless HEAD already records it exactly.
            pre, current = self._snapshot_locked(
                f"before restoring {target.id}",
                "pre-restore",
                progress,
                set_head=False,
                skip_if_root=head.root if head else None,
            )
            undo = pre if pre is not None else (head.id if head else None)
            if current == target.root:
                self.state.set_meta("head", str(target.id))
                return RestoreResult(target.id, undo, [], 0)
            plan = self._restore_to(target, current, undo, progress)
            return RestoreResult(target.id, undo, plan, len(plan))

    def rollback(
        self, to: str | int | None = None, *, progress: ProgressFn = no_progress
    ) -> RestoreResult:
        """Restore the latest checkpoint: the newest snapshot that is a restore point, not a
        record of a state being left (``pre-restore``) or of an operation's result (``post``)."""
        if to is None:
            rows = [r for r in self.state.snapshots() if r.kind not in NOT_ROLLBACK_TARGETS]
            if not rows:
                raise SnapshotNotFound("There is no checkpoint to roll back to yet.")
            to = rows[-1].id
        return self.restore(to, progress=progress)

    def _restore_to(
        self, target: SnapshotRow, current: Oid, pre: int | None, progress: ProgressFn
    ) -> list[Op]:
        return self._land(target, current, self._load(), pre, (), progress)

    def rollback_to_checkpoint(
        self,
        ref: str | int,
        *,
        preserve: Sequence[str] = (),
        progress: ProgressFn = no_progress,
        hint: Hint | None = None,
    ) -> ChangeSet:
        """Put the tree back to a checkpoint without saving the state being left.

        This is a transaction's rollback: the failed state is discarded (paths matching
        ``preserve`` and ignored paths are kept as they are). A journal ``hint`` based on the
        checkpoint limits the work to the directories the operation touched. Returns what was
        undone.
        """
        with self._write_lock(f"rollback to {ref}"):
            self._recover_locked()
            target = self.resolve(ref)
            if hint is None or hint.base != target.root:
                # No journal: walk everything, but still compare with the checkpoint as we go.
                hint = Hint(target.root, self.state.tree, frozenset(), frozenset(), everything=True)
            # Whatever the checkpoint lacks is deleted by the rollback: no need to read it.
            cur = self._scan_readonly(progress, hint, lazy_added=True)
            load = self._overlay(cur.trees)
            undone = change_set(load, target.root, cur.root, resolve=self._hash_path)
            if cur.root == target.root:
                self.state.set_meta("head", str(target.id))
            else:
                self._land(target, cur.root, load, None, preserve, progress)
            return undone

    def prune_automatic(self, keep: int) -> list[int]:
        """Delete automatic checkpoints beyond the newest ``keep`` (their data goes at gc)."""
        from ._txn import AUTOMATIC_KINDS

        protected = self._protected_ids()
        auto = [r.id for r in self.state.snapshots() if r.kind in AUTOMATIC_KINDS]
        doomed = [i for i in auto[: max(0, len(auto) - keep)] if i not in protected]
        if doomed:
            with self._write_lock("prune checkpoints"):
                self.state.delete_snapshots(doomed)
        return doomed

    def _protected_ids(self) -> set[int]:
        """Snapshots no retention rule may delete: HEAD, open transactions' checkpoints, and
        the restore points of operations that may still be resumed or rolled back."""
        ids = {t.checkpoint for t in self.state.txns(status="open")}
        ids.update(
            int(r[0])
            for r in self.state.db.execute(
                "SELECT checkpoint FROM operations WHERE checkpoint IS NOT NULL"
                " AND status NOT IN ('done', 'done-with-skips', 'rolled-back')"
                " UNION SELECT s.checkpoint FROM op_steps s JOIN operations o ON o.id = s.op"
                " WHERE s.checkpoint IS NOT NULL"
                " AND o.status NOT IN ('done', 'done-with-skips', 'rolled-back')"
            )
        )
        if self.state.head is not None:
            ids.add(self.state.head)
        return ids

    def _keeper(self, preserve: Sequence[str]) -> Callable[[bytes], bool]:
        """Paths a restore must not touch: ignored ones, plus ``preserve`` patterns."""
        ignore = Ignore.load(self.root)
        rules = Ignore(list(preserve)) if preserve else None
        if rules is None:
            return ignore
        return lambda relpath: ignore(relpath) or rules(relpath)

    def _land(
        self,
        target: SnapshotRow,
        current: Oid,
        load: TreeLoader,
        pre: int | None,
        preserve: Sequence[str],
        progress: ProgressFn,
        staging: str = "",
    ) -> list[Op]:
        """Plan and apply the restore from tree ``current`` to ``target`` (lock held)."""
        from ._restore import Intent, apply_restore, plan_restore  # only restores need them

        keep = self._keeper(preserve)
        plan = plan_restore(load, current, target.root, keep if preserve else None)
        intent = Intent(
            target.id,
            target.root,
            pre,
            staging or f"r{target.id}-{os.getpid()}",
            time.time(),
            os.getpid(),
            tuple(preserve),
        )

        def move_head() -> list[Path]:
            # HEAD moves with the renames: committed without an fsync of its own, then made
            # durable by theirs (a crash before that finishes the restore, which sets it again).
            # Without WAL mode, its commit syncs itself.
            wal = self.state.wal_file()
            self.state.set_meta("head", str(target.id), durable=wal is None)
            return [] if wal is None else [wal]

        applied = apply_restore(
            root=self.root,
            state_dir=self.state_dir,
            store=self.store,
            plan=plan,
            intent=intent,
            keep=keep,
            progress=progress,
            durable_with=move_head,
        )
        self._finish_restore(intent, applied.puts, applied.removed)
        return plan

    def _finish_restore(
        self, intent: Intent, puts: list[tuple[bytes, Any]], removed: Iterable[bytes]
    ) -> None:
        # A cached path is gone if it or any of its parents was removed.
        gone = self.state.file_records().under(removed) if removed else set()
        self.state.update_cache(puts, gone - {p for p, _ in puts})
        from ._restore import finish

        finish(self.state_dir, intent)

    # ---- recovery -----------------------------------------------------------------------
    def _auto_recover(self) -> None:
        """Finish interrupted work and sweep what crashed processes left, if no writer is busy."""
        if not (self._has_leftovers() or self.store.has_leftovers()):
            return
        try:
            self.lock.acquire(wait=False, purpose="recover")
        except SnapfsError:
            return  # a live writer owns the project; it will finish its own work
        try:
            self._recover_locked()
            self._recover_transactions_locked(keep=self.config.crash_policy == "keep")
            self.store.sweep_leftovers()
        finally:
            self.lock.release()

    def _has_leftovers(self) -> bool:
        staging = self.state_dir / "staging"
        return (
            (self.state_dir / "intent.json").exists()
            or (staging.is_dir() and any(os.scandir(staging)))
            or self.state.has_open_txns()
            or self._has_dead_cookies()
            or trash.has_leftovers(self.state_dir)
        )

    def _has_dead_cookies(self) -> bool:
        if not any(n.startswith("journal-cookie-") for n in os.listdir(self.state_dir)):
            return False  # the usual case: no journal, so no owner to look up
        from ._txn import dead_cookies

        return bool(dead_cookies(self.state_dir))

    def _recover_transactions_locked(
        self, *, keep: bool, progress: ProgressFn = no_progress
    ) -> list[str]:
        """Apply the crash policy to transactions whose owner died. A live owner is left alone."""
        from ._txn import dead_transactions, describe_owner, sweep_dead_cookies

        sweep_dead_cookies(self.state_dir)  # a killed journal's marker file
        groups: dict[str, list[Any]] = {}
        for row in dead_transactions(self.state.txns(status="open")):
            groups.setdefault(row.owner, []).append(row)
        done: list[str] = []
        for rows in sorted(groups.values(), key=lambda rs: -min(r.id for r in rs)):
            outer = min(rows, key=lambda r: r.id)
            who = describe_owner(outer)
            what = f"transaction {outer.id}" + (f" ({outer.label})" if outer.label else "")
            if keep:
                note = f"its owner ({who}) died; the partial state was kept on request"
                for r in rows:
                    self.state.end_txn(r.id, "kept", error=note)
                done.append(f"Kept the partial state of {what}, whose process ({who}) died.")
                continue
            target = self.resolve(outer.checkpoint)
            cur = self._scan_readonly(progress)
            undone = change_set(self._overlay(cur.trees), target.root, cur.root)
            self._land(
                target,
                cur.root,
                self._overlay(cur.trees),
                None,
                json.loads(outer.preserve),
                progress,
            )
            note = f"its owner ({who}) died; rolled back to checkpoint {target.id}"
            for r in rows:
                self.state.end_txn(
                    r.id, "recovered", changes=json.dumps(undone.to_dict()), error=note
                )
            done.append(
                f"Rolled back {what}, whose process ({who}) died: {undone.summary()} undone."
            )
        return done

    def recover(
        self, *, discard: bool = False, keep: bool = False, progress: ProgressFn = no_progress
    ) -> str:
        """Finish interrupted work. Returns what was done.

        An interrupted restore is completed. A transaction whose process died is rolled back to
        its checkpoint, or with ``keep`` left as it is and marked. ``discard`` forgets a damaged
        record of an interrupted restore.
        """
        with self._write_lock("recover"):
            if discard:
                path = self.state_dir / "intent.json"
                if path.exists():
                    path.unlink()
                    remove_tree(self.state_dir / "staging")
                    (self.state_dir / "staging").mkdir(exist_ok=True)
                    return "Discarded the record of an interrupted restore."
                return "Nothing to recover."
            done = [self._recover_locked(progress) or ""]
            done += self._recover_transactions_locked(keep=keep, progress=progress)
            self.store.sweep_leftovers()
            return "\n".join(d for d in done if d) or "Nothing to recover."

    def _recover_locked(self, progress: ProgressFn = no_progress) -> str | None:
        path = self.state_dir / "intent.json"
        intent = None
        if path.exists():  # the restore machinery loads only when there is work for it
            from ._restore import read_intent

            intent = read_intent(path)
        if intent is None:
            self._sweep_staging()
            return None
        target = self.state.snapshot(intent.target)
        if target is None or target.root != intent.target_root:
            raise StateCorrupt(
                f"An interrupted restore targets snapshot {intent.target}, which is gone.",
                hint="Run 'snapfs recover --discard' and restore the snapshot you want.",
            )
        cur = self._scan_readonly(progress)
        plan = self._land(
            target,
            cur.root,
            self._overlay(cur.trees),
            intent.pre,
            intent.preserve,
            progress,
            staging=intent.staging + "-r",
        )
        self._sweep_staging()
        return f"Finished an interrupted restore of snapshot {intent.target} ({len(plan)} changes)."

    def _sweep_staging(self) -> None:
        """Remove what interrupted restores left: staging dirs, and trash nobody is emptying."""
        staging = self.state_dir / "staging"
        if staging.is_dir():
            for name in os.listdir(staging):
                remove_tree(staging / name)
        trash.sweep(self.state_dir)

    # ---- verify -------------------------------------------------------------------------
    def verify(self, progress: ProgressFn = no_progress) -> VerifyReport:
        """Re-hash every object and tree the snapshots need. Problems are named, not raised."""
        problems: list[Problem] = []
        users: dict[Oid, list[str]] = {}
        seen_trees: set[Oid] = set()
        load = self._load()
        for row in self.state.snapshots():
            stack = [(b"", row.root)]
            while stack:
                rel, t = stack.pop()
                if t in seen_trees:
                    continue
                seen_trees.add(t)
                data = load(t)
                if data is None or hash_bytes(data) != t:
                    what = "missing" if data is None else "corrupt"
                    problems.append(
                        Problem(
                            "tree",
                            t.hex(),
                            f"snapshot {row.id}: the directory listing of "
                            f"{os.fsdecode(rel) or '(project root)'} is {what}.",
                        )
                    )
                    continue
                try:
                    entries = decode(data)
                except StateCorrupt:
                    problems.append(
                        Problem("tree", t.hex(), f"snapshot {row.id}: tree {t.hex()} is malformed.")
                    )
                    continue
                for e in entries:
                    path = rel + b"/" + e.name if rel else e.name
                    if e.kind == Kind.DIR:
                        stack.append((path, e.oid))
                    elif e.kind == Kind.FILE:
                        lst = users.setdefault(e.oid, [])
                        if len(lst) < 5:
                            lst.append(f"snapshot {row.id}: {os.fsdecode(path)}")

        def check(oid: Oid) -> Problem | None:
            try:
                self.store.check(oid)
            except ObjectMissing:
                return Problem("missing", oid.hex(), "missing from the store", tuple(users[oid]))
            except ObjectCorrupt as exc:
                kind = "tampered" if isinstance(exc, SealBroken) else "corrupt"
                return Problem(kind, oid.hex(), exc.message, tuple(users[oid]))
            return None

        done = 0
        with executor(max_workers=self.config.workers) as pool:
            for p in pool.map(check, list(users)):
                done += 1
                if done % 1024 == 0:
                    progress(Progress("verify", done, len(users)))
                if p is not None:
                    problems.append(p)
        return VerifyReport(len(users), len(seen_trees), problems)

    # ---- placing verified files (downloads) ---------------------------------------------
    def place(
        self,
        relpath: bytes,
        oid: Oid,
        *,
        src: Path | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> Path:
        """Put content ``oid`` at ``relpath`` atomically: ``src`` (a verified file on this
        filesystem, moved) or, without it, the stored object. The file is then in the store,
        its other ``digests`` are indexed, and the stat cache knows it, so the next snapshot
        does not read it again. Refuses any path that leaves the project or enters .snapfs.
        """
        parts = split_relpath(relpath)
        if parts[0] == STATE_DIR.encode():
            raise UnsafePath(f"Refusing {os.fsdecode(relpath)!r}: .snapfs belongs to snapfs.")
        with self._write_lock(f"place {os.fsdecode(relpath)}"):
            root_fd = os.open(self.root, DIR_FLAGS)
            try:
                with open_parent(root_fd, relpath, create=True) as (dfd, name):
                    self._place_at(dfd, name, relpath, oid, src, digests or {})
            except OSError as exc:
                raise from_oserror(
                    exc, "Placing the file", self.root / os.fsdecode(relpath)
                ) from exc
            finally:
                os.close(root_fd)
        return self.root / os.fsdecode(relpath)

    def _place_at(
        self,
        dfd: int,
        name: bytes,
        relpath: bytes,
        oid: Oid,
        src: Path | None,
        digests: Mapping[str, str],
    ) -> None:
        try:
            if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                raise UsageError(f"{os.fsdecode(relpath)} is a directory.")
        except FileNotFoundError:
            pass
        if src is not None:
            self._place_file(dfd, name, relpath, oid, src, digests)
            return
        tmp = b".snapfs-place-" + os.urandom(6).hex().encode()
        umask = os.umask(0o022)
        os.umask(umask)
        self.store.materialize(oid, dfd, tmp, 0o666 & ~umask)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)  # the rename must survive a power cut before anything points at it
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            for algo, digest in digests.items():
                self.store.record_digest(algo, digest, oid)
            self._cache_placed(fd, relpath, oid, stat.S_IMODE(os.fstat(fd).st_mode))
        finally:
            os.close(fd)

    def _place_file(
        self,
        dfd: int,
        name: bytes,
        relpath: bytes,
        oid: Oid,
        src: Path,
        digests: Mapping[str, str],
    ) -> None:
        """Store ``src`` as object ``oid`` and index its digests *first*, then rename it into
        place: killed at any point, the bytes are either at DEST or in the store (where the
        next download of the same content finds them), never only in a path a rollback
        deletes."""
        sdir = os.open(src.parent, DIR_FLAGS)
        try:
            sname = os.fsencode(src.name)
            fd = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sdir)
            try:
                st = os.fstat(fd)
                mode = stat.S_IMODE(st.st_mode)  # the file's own mode, before any seal
                if oid not in self.store:
                    self.store.lock.acquire(shared=True, wait=True)
                    try:
                        batch = self.store.batch()
                        try:
                            batch.ingest(fd, st, (sdir, sname), known=oid)
                            batch.commit()
                        except BaseException:
                            batch.abort()
                            raise
                    finally:
                        self.store.lock.release()
                for algo, digest in digests.items():
                    self.store.record_digest(algo, digest, oid)
                crash_point("place.stored")
                os.rename(sname, name, src_dir_fd=sdir, dst_dir_fd=dfd)
                os.fsync(dfd)  # the rename must survive a power cut before anything points at it
                crash_point("place.renamed")
                seal = self.store.seal_of(oid)
                now = os.fstat(fd)
                if seal is not None and seal.ino == now.st_ino:
                    self.store.reseal(oid, Seal.of(now))  # the rename moved ctime, not a write
                self._cache_placed(fd, relpath, oid, mode)
            finally:
                os.close(fd)
        finally:
            os.close(sdir)

    def _cache_placed(self, fd: int, relpath: bytes, oid: Oid, mode: int) -> None:
        # A cache entry is only trusted once its timestamps are safely in the past: a write
        # within the same clock tick would leave them unchanged. A large file (a model) is
        # worth waiting that tick for, so no scan ever reads it again; a small one is recorded
        # racy, and the next scan re-reads it for less than the wait would cost.
        while True:
            st = os.fstat(fd)
            age = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)
            if age >= RACY_NS or st.st_size < SETTLE_MIN_SIZE:
                break
            time.sleep((RACY_NS - age) / 1e9)
        racy = is_racy(st, time.time_ns())  # a coarse clock's tick is longer: let a scan check
        entry = CacheEntry(
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode, oid, racy
        )
        self.state.update_cache([(relpath, entry)], [])

    # ---- gc -----------------------------------------------------------------------------
    def gc(
        self,
        *,
        keep_last: int | None = None,
        keep_within: str | float | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Delete snapshots outside the retention policy and every object nothing references."""
        if keep_last is not None and keep_last < 0:
            raise UsageError("--keep-last must be 0 or more.")
        within = parse_duration(keep_within) if isinstance(keep_within, str) else keep_within
        with self._write_lock("gc"):
            self._recover_locked()
            rows = self.state.snapshots()
            if keep_last is None and within is None:
                kept = rows
            else:
                now = time.time()
                keep_ids = self._protected_ids()
                if keep_last:
                    keep_ids.update(r.id for r in rows[-keep_last:])
                if within is not None:
                    keep_ids.update(r.id for r in rows if now - r.created <= within)
                kept = [r for r in rows if r.id in keep_ids]
            doomed = [r.id for r in rows if r not in kept]
            self.store.lock.acquire(wait=True)
            try:
                return self._sweep(kept, doomed, dry_run)
            finally:
                self.store.lock.release()

    def _sweep(self, kept: list[SnapshotRow], doomed: list[int], dry_run: bool) -> GcReport:
        live_trees: set[Oid] = set()
        live_objects = self.state.cache_oids()
        load = self._load()
        _mark(load, [r.root for r in kept], live_trees, live_objects)
        # The directory records' trees too: the next scan may reuse them unread.
        reusable = self.state.dir_cache_trees() - live_trees
        if any(load(t) is None for t in reusable):  # can't be trusted: let scans rebuild them
            if not dry_run:
                self.state.update_cache([], [], dirs=(b"", {}))
        else:
            _mark(load, list(reusable), live_trees, live_objects)
        for root, db in self.store.projects():
            if root == self.root:
                continue
            if not db.exists():
                continue  # that project is gone; nothing of it needs keeping
            other = ProjectState(db)
            try:
                _mark(other.tree, [r.root for r in other.snapshots()], set(), live_objects)
                live_objects |= other.cache_oids()
            finally:
                other.close()
        dead_trees = [t for t in self.state.tree_oids() if t not in live_trees]
        if not dry_run:
            self.state.delete_snapshots(doomed)  # first: a crash after this only leaves garbage
        swept = self.store.sweep(live_objects, dry_run=dry_run)
        if not dry_run:
            self.state.delete_trees(dead_trees)
            # Journal rows of finished runs; an hour's grace for runs still in use elsewhere.
            run = watch_run(self)
            self.state.prune_journal(keep_runs=[run] if run else [], older_than=3600)
        return GcReport(doomed, swept.objects, len(dead_trees), swept.freed, dry_run)


def _totals(load: TreeLoader, base: SnapshotRow, root: Oid) -> tuple[int, int]:
    """Files and bytes of tree ``root``, from ``base``'s totals and the diff: O(changes)."""
    files, nbytes = base.files, base.bytes

    def count(e: Entry, path: bytes) -> tuple[int, int]:
        if e.kind == Kind.FILE:
            return 1, e.size
        if e.kind == Kind.DIR:
            sub = [x for _p, x in walk_tree(load, e.oid, path) if x.kind == Kind.FILE]
            return len(sub), sum(x.size for x in sub)
        return 0, 0

    for path, old, new in walk_diff(load, base.root, root):
        if old is not None and not (new is not None and old.kind == new.kind == Kind.DIR):
            f, b = count(old, path)
            files, nbytes = files - f, nbytes - b
        if new is not None and not (old is not None and old.kind == new.kind == Kind.DIR):
            f, b = count(new, path)
            files, nbytes = files + f, nbytes + b
    return files, nbytes


def _mark(load: TreeLoader, roots: list[Oid], trees: set[Oid], objects: set[Oid]) -> None:
    """Add every tree and file object reachable from ``roots``, visiting each tree once."""
    stack = [r for r in roots if r not in trees]
    trees.update(stack)
    while stack:
        for e in decode(_require(load, stack.pop())):
            if e.kind == Kind.DIR and e.oid not in trees:
                trees.add(e.oid)
                stack.append(e.oid)
            elif e.kind == Kind.FILE:
                objects.add(e.oid)


def _require(load: TreeLoader, oid: Oid) -> bytes:
    data = load(oid)
    if data is None:
        raise StateCorrupt(
            f"Tree {oid.hex()} is missing, so gc can't tell what is still needed; nothing was deleted.",
            hint="Run 'snapfs verify'.",
        )
    return data


def _empty_tree(cur: ScanResult) -> Oid:
    data = encode([])
    oid = tree_oid(data)
    cur.trees[oid] = data
    return oid
