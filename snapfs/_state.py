"""SQLite state of one project: snapshots, trees, the stat cache and a few head pointers.

WAL mode lets readers run while a writer holds the project lock. ``synchronous=FULL`` makes each
commit durable before it returns, which the restore and snapshot protocols rely on.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from ._errors import DiskFull, FilesystemError, SnapfsError, StateCorrupt
from ._hashing import Oid
from ._index import CacheEntry, DirIndex, FileRecords, Index, Loaded, load_index, save_index

SCHEMA_VERSION = 2  # project.db; see ProjectState._migrate

PROJECT_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    root BLOB NOT NULL,
    files INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    new_bytes INTEGER NOT NULL DEFAULT 0,
    new_objects INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS trees (oid BLOB PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL DEFAULT '',
    parent INTEGER,
    checkpoint INTEGER NOT NULL,
    post INTEGER,
    status TEXT NOT NULL,
    owner TEXT NOT NULL,
    preserve TEXT NOT NULL DEFAULT '[]',
    started REAL NOT NULL,
    ended REAL,
    changes TEXT,
    error TEXT
);
"""

OPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    plan TEXT NOT NULL,                 -- JSON: what to run, enough to resume in a new process
    status TEXT NOT NULL,               -- pending, running, done, done-with-skips, failed,
                                        -- rolled-back
    checkpoint INTEGER,                 -- the restore point taken before the first step
    post INTEGER,                       -- the post checkpoint taken when it finished
    owner TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT                          -- JSON diagnosis of the failure that stopped it
);
CREATE TABLE IF NOT EXISTS op_steps (
    op INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,               -- pending, running, done, failed, rolled-back, skipped
    attempts INTEGER NOT NULL DEFAULT 0,
    checkpoint INTEGER,                 -- the step's restore point
    started REAL,
    ended REAL,
    seconds REAL NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (op, idx)
);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    op INTEGER,
    step INTEGER,
    category TEXT NOT NULL,
    code TEXT NOT NULL,
    retryable INTEGER NOT NULL,
    message TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS errors_by_code ON errors (code);
"""

KINDS = ("manual", "auto", "pre-op", "pre-restore", "post", "pre-import")
# Kinds that record the state being left (pre-restore) or the result an operation left (post):
# restorable by id, but never what a plain rollback goes back to. Right after an import its
# post checkpoint equals the working tree, so a rollback to it would change nothing.
NOT_ROLLBACK_TARGETS = ("pre-restore", "post")


_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CANTOPEN = 14


def from_sqlite(exc: sqlite3.Error, path: Path) -> SnapfsError:
    """Name a SQLite failure for what it is: a full disk is not a damaged database."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_CANTOPEN) and _no_space(path):
        return DiskFull(
            f"snapfs can't update {path.name}: the disk is full.",
            hint="Free some space and run the command again; nothing was lost.",
        )
    if code in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
        return FilesystemError(f"snapfs can't read or write {path} ({exc}).")
    return StateCorrupt(
        f"The snapfs state file {path} is damaged ({exc}).",
        hint="Run 'snapfs verify'; restore it from a backup if you have one.",
    )


def _no_space(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20 or st.f_favail == 0


def connect(path: Path, schema: str) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(schema)
    except sqlite3.DatabaseError as exc:
        raise from_sqlite(exc, path) from exc
    # isolation_level=None is autocommit; 'with db:' below needs explicit BEGIN for atomicity.
    db.isolation_level = "DEFERRED"
    return db


# NamedTuples, not frozen dataclasses: every command imports this, and defining a
# dataclass costs ~0.4 ms (it compiles its methods); a NamedTuple ~0.07 ms.
class SnapshotRow(NamedTuple):
    id: int
    created: float
    label: str
    kind: str
    root: Oid
    files: int
    bytes: int
    new_bytes: int
    new_objects: int
    seconds: float


class TxnRow(NamedTuple):
    id: int
    label: str
    parent: int | None
    checkpoint: int
    post: int | None
    status: str  # open, committed, rolled-back, recovered, kept
    owner: str  # JSON of the owning process
    preserve: str  # JSON list of patterns
    started: float
    ended: float | None
    changes: str | None  # JSON change set
    error: str | None


class ProjectState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = connect(path, PROJECT_SCHEMA + OPS_SCHEMA)
        self._migrate()
        self.index_path = path.with_name("index")
        self._index: Loaded | None = None
        self._index_sig: tuple[int, int, int] | None = None
        self._deferred = False  # inside deferred_index()
        self._index_unsaved = False

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        """Bring a project.db made by an older snapfs up to this schema. ``user_version`` says
        which steps are done, so an up-to-date database costs one PRAGMA read."""
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version >= SCHEMA_VERSION:
            return
        try:
            with self.db:
                cols = {r[1] for r in self.db.execute("PRAGMA table_info(operations)")}
                if "post" not in cols:  # version 2: operations record their post checkpoint
                    self.db.execute("ALTER TABLE operations ADD COLUMN post INTEGER")
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise from_sqlite(exc, self.path) from exc

    @contextmanager
    def _synced(self, durable: bool) -> Iterator[None]:
        """Commits inside skip the fsync unless ``durable``. WAL keeps them in order: a later
        durable commit makes this one durable too, and a process crash never loses it.

        NORMAL, not OFF: in WAL mode NORMAL syncs nothing at commit, but still syncs the WAL
        before a checkpoint copies it into the database. OFF skips that too, so an automatic
        checkpoint during such a commit, then a power cut, could leave the database corrupt."""
        if durable:
            yield
            return
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def wal_file(self) -> Path | None:
        """The write-ahead log, or None if the database is not in WAL mode (a file system
        without shared memory can refuse it). Once it is fsynced, with the directory that holds
        it, every commit made so far is durable, those made under ``_synced(False)`` too (a
        restore moves HEAD that way, then makes it durable with its renames)."""
        mode = self.db.execute("PRAGMA journal_mode").fetchone()[0]
        return self.path.with_name(self.path.name + "-wal") if str(mode).lower() == "wal" else None

    # ---- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None, *, durable: bool = True) -> None:
        """``durable=False`` for what means nothing once every process is gone (a watcher's
        marks): written for every other process at once, but not worth an fsync."""
        with self._synced(durable), self.db:
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_path(self, key: str) -> Path | None:
        """A filesystem path kept as raw bytes, so names that aren't UTF-8 survive."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None or row[0] is None:
            return None
        v = row[0]
        return Path(os.fsdecode(bytes(v) if isinstance(v, bytes | memoryview) else v.encode()))

    def set_path(self, key: str, path: Path) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, os.fsencode(path)))

    @property
    def head(self) -> int | None:
        v = self.get_meta("head")
        return int(v) if v else None

    # ---- snapshots ----------------------------------------------------------------------
    def add_snapshot(
        self,
        *,
        kind: str,
        label: str,
        root: Oid,
        trees: Iterable[tuple[Oid, bytes]],
        files: int,
        nbytes: int,
        new_bytes: int,
        new_objects: int,
        seconds: float,
        cache_updates: Iterable[tuple[bytes, CacheEntry]],
        cache_deletes: Iterable[bytes],
        dirs: tuple[bytes, DirIndex] | None = None,
        set_head: bool = True,
    ) -> int:
        """Record a snapshot, its new trees and the stat cache changes in one transaction."""
        with self.db:
            # A stored root implies every tree below it is stored (Merkle): skip the inserts.
            if self.tree(root) is None:
                self.db.executemany("INSERT OR IGNORE INTO trees VALUES (?, ?)", trees)
            cur = self.db.execute(
                "INSERT INTO snapshots (created, label, kind, root, files, bytes, new_bytes,"
                " new_objects, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), label, kind, root, files, nbytes, new_bytes, new_objects, seconds),
            )
            sid = int(cur.lastrowid or 0)
            if set_head:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('head', ?)", (str(sid),))
        self.update_cache(cache_updates, cache_deletes, dirs)
        return sid

    def update_cache(
        self,
        updates: Iterable[tuple[bytes, CacheEntry]],
        deletes: Iterable[bytes] = (),
        dirs: tuple[bytes, DirIndex] | None = None,
    ) -> None:
        """Apply changes to the stat cache. ``dirs`` (rules fingerprint, directory records),
        from a scan of the whole tree, replaces every directory record. Without it, the
        records of the directories above a changed file are dropped: a directory record
        vouches for the file records it was built from."""
        updates, deletes = list(updates), list(deletes)
        old = self._loaded()
        if dirs is not None:
            rules, new_dirs = dirs
            if not new_dirs:
                rules = b""
        else:
            rules, new_dirs = old.rules, old.dirs
            if new_dirs and (updates or deletes):
                new_dirs = dict(new_dirs)
                # Each folder once: a restore that removed a 2k-file plugin has 2k paths in
                # a few folders, each of which walked up to the root on its own.
                seen: set[bytes] = set()
                for p in {p.rpartition(b"/")[0] for p in [*deletes, *(p for p, _ in updates)]}:
                    while p not in seen:
                        seen.add(p)
                        if p in new_dirs:
                            del new_dirs[p]
                        elif p in old.dirs:
                            break  # dropped earlier, with every directory above it
                        if not p:
                            break
                        p = p.rpartition(b"/")[0]
        if not updates and not deletes and rules == old.rules and new_dirs == old.dirs:
            return
        files = old.files.merged(updates, deletes)
        if self._deferred:  # written once, when the deferring block ends
            self._index = Loaded(files, new_dirs, rules)
            self._index_unsaved = True
            return
        self._save_index(files, new_dirs, rules)

    @contextmanager
    def deferred_index(self) -> Iterator[None]:
        """Stat cache updates inside are written once, at the end (a restore updates it for
        the state it leaves and again for the one it lands: writing 20k entries twice cost
        30 ms). For a caller holding the write lock, so no other process writes it meanwhile.
        An exception still writes what was recorded: it is as true as before."""
        if self._deferred:
            yield
            return
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
            if self._index_unsaved and self._index is not None:
                self._index_unsaved = False
                loaded = self._index
                self._save_index(loaded.files, loaded.dirs, loaded.rules)

    def _save_index(self, files: FileRecords, new_dirs: DirIndex, rules: bytes) -> None:
        try:
            save_index(self.index_path, files, new_dirs, rules)
        except OSError:
            # Only a cache (a disk full, say): what it would say is recorded already, and the
            # old index on disk, still whole, only costs re-hashing. Failing here would report
            # a snapshot or restore that did happen as failed.
            self._index = None
            return
        st = os.stat(self.index_path)
        self._index = Loaded(files, new_dirs, rules)
        self._index_sig = (st.st_ino, st.st_mtime_ns, st.st_size)

    def snapshots(self) -> list[SnapshotRow]:
        rows = self.db.execute(
            "SELECT id, created, label, kind, root, files, bytes, new_bytes, new_objects, seconds"
            " FROM snapshots ORDER BY id"
        ).fetchall()
        return [SnapshotRow(*r) for r in rows]

    def snapshot(self, sid: int) -> SnapshotRow | None:
        r = self.db.execute(
            "SELECT id, created, label, kind, root, files, bytes, new_bytes, new_objects, seconds"
            " FROM snapshots WHERE id = ?",
            (sid,),
        ).fetchone()
        return SnapshotRow(*r) if r else None

    def delete_snapshots(self, ids: Iterable[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM snapshots WHERE id = ?", ((i,) for i in ids))

    # ---- transactions -------------------------------------------------------------------
    def begin_txn(
        self, *, label: str, parent: int | None, checkpoint: int, owner: str, preserve: str
    ) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO transactions (label, parent, checkpoint, status, owner, preserve,"
                " started) VALUES (?, ?, ?, 'open', ?, ?, ?)",
                (label, parent, checkpoint, owner, preserve, time.time()),
            )
        return int(cur.lastrowid or 0)

    def end_txn(
        self,
        txn: int,
        status: str,
        *,
        changes: str | None = None,
        post: int | None = None,
        error: str | None = None,
    ) -> None:
        with self.db:
            self.db.execute(
                "UPDATE transactions SET status = ?, ended = ?, changes = ?, post = ?, error = ?"
                " WHERE id = ?",
                (status, time.time(), changes, post, error, txn),
            )

    def record_txn(
        self,
        *,
        label: str,
        checkpoint: int,
        post: int | None,
        owner: str,
        started: float,
        changes: str,
    ) -> int:
        """Record work that is already over as one committed transaction (a whole operation's
        summary for ``snapfs log``). One INSERT: it is never seen open, so crash recovery can
        never mistake it for a transaction to roll back."""
        with self.db:
            cur = self.db.execute(
                "INSERT INTO transactions (label, parent, checkpoint, post, status, owner,"
                " started, ended, changes) VALUES (?, NULL, ?, ?, 'committed', ?, ?, ?, ?)",
                (label, checkpoint, post, owner, started, time.time(), changes),
            )
        return int(cur.lastrowid or 0)

    def set_txn_owner(self, txn: int, owner: str) -> None:
        # Who runs a transaction matters only while they live, and a crash of the machine ends
        # them all: the row itself (begin_txn) was made durable, this update needn't be.
        with self._synced(False), self.db:
            self.db.execute("UPDATE transactions SET owner = ? WHERE id = ?", (owner, txn))

    def txns(self, *, status: str | None = None, limit: int | None = None) -> list[TxnRow]:
        q = (
            "SELECT id, label, parent, checkpoint, post, status, owner, preserve, started,"
            " ended, changes, error FROM transactions"
        )
        args: tuple[object, ...] = ()
        if status is not None:
            q += " WHERE status = ?"
            args = (status,)
        q += " ORDER BY id DESC"
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        return [TxnRow(*r) for r in self.db.execute(q, args)]

    def has_open_txns(self) -> bool:
        row = self.db.execute("SELECT 1 FROM transactions WHERE status = 'open' LIMIT 1")
        return row.fetchone() is not None

    # ---- journal ------------------------------------------------------------------------
    def prune_journal(
        self, *, keep_runs: Iterable[str], only_run: str | None = None, older_than: float = 0
    ) -> None:
        """Drop change-journal rows nobody can use any more. Losing rows is always safe: an
        interval whose rows are gone is simply not continuous, and snapfs walks everything.
        Not worth an fsync either: rows a power cut brings back belong to runs that are over,
        and the next prune drops them."""
        if (
            self.db.execute("SELECT name FROM sqlite_master WHERE name = 'journal'").fetchone()
            is None
        ):
            return
        with self._synced(False), self.db:
            if only_run is not None:
                self.db.execute("DELETE FROM journal WHERE run = ?", (only_run,))
                return
            keep = list(keep_runs)
            marks = ",".join("?" * len(keep)) or "''"
            self.db.execute(
                f"DELETE FROM journal WHERE run NOT IN ({marks}) AND time < ?",
                (*keep, time.time() - older_than),
            )

    # ---- trees --------------------------------------------------------------------------
    def tree(self, oid: Oid) -> bytes | None:
        row = self.db.execute("SELECT data FROM trees WHERE oid = ?", (oid,)).fetchone()
        return None if row is None else bytes(row[0])

    def tree_oids(self) -> Iterator[Oid]:
        for (oid,) in self.db.execute("SELECT oid FROM trees"):
            yield bytes(oid)

    def delete_trees(self, oids: Iterable[Oid]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM trees WHERE oid = ?", ((o,) for o in oids))

    # ---- stat cache ---------------------------------------------------------------------
    def _loaded(self) -> Loaded:
        try:
            st = os.stat(self.index_path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = None
        # Another process may have replaced it; a stale copy could name objects gc removed.
        if self._index is None or sig != self._index_sig:
            self._index = (
                load_index(self.index_path) if sig is not None else Loaded(FileRecords(0), {}, b"")
            )
            self._index_sig = sig
        return self._index

    def load_cache(self) -> Index:
        """The stat cache of files; treat it as read-only (update_cache replaces it)."""
        return self._loaded().files.data()

    def cache_view(self) -> Loaded:
        """The stat cache as on disk now: files, directory records and their ignore rules, as
        one reading. The same object is returned until the index is replaced (by this process
        or another), so ``is`` tells whether it changed."""
        return self._loaded()

    def stored_trees(self, oids: Iterable[Oid]) -> set[Oid]:
        """Those of ``oids`` whose tree is stored."""
        want = list(set(oids))
        found: set[Oid] = set()
        for i in range(0, len(want), 500):  # under SQLite's limit on bound parameters
            chunk = want[i : i + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT oid FROM trees WHERE oid IN ({marks})"
            found.update(bytes(oid) for (oid,) in self.db.execute(sql, chunk))
        return found

    def file_records(self) -> FileRecords:
        """The stat cache of files, decoded only if a scan needs it (see scan)."""
        return self._loaded().files

    def load_dir_cache(self, rules: bytes) -> DirIndex:
        """The directory records, if they were built under the ignore rules ``rules``."""
        loaded = self._loaded()
        return loaded.dirs if loaded.rules == rules else {}

    def cache_oids(self) -> set[Oid]:
        return {e.oid for e in self.load_cache().values()}

    def dir_cache_trees(self) -> set[Oid]:
        """Trees the directory records name: gc keeps them, as scans may reuse them."""
        return {e.oid for e in self._loaded().dirs.values()}
