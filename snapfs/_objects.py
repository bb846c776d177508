"""The object store: immutable file contents addressed by XXH3-128.

On-disk layout under the store root::

    objects/ab/<30 hex>     a loose object: one large file (a reflink clone, a sealed hardlink,
                            or a copy), in a fan-out directory named by the oid's first byte
    packs/<name>.pack       small objects appended back to back, each zstd-compressed when
                            that saves space; one pack per snapshot that added small files
    tmp/<pid>-<random>/     loose objects being written by one process
    store.db                pack index (oid -> pack, offset, length), seals of hardlinked
                            objects, and the projects sharing this store
    store.lock              gc takes it exclusively, writers shared

Why packs: creating a file costs 0.1-0.5 ms of metadata work on ext4, so 20k small files as
20k object files would dominate a first snapshot. One sequential pack write costs a fraction.

Durability: loose objects are written under ``tmp/``, packs under their final (still
unreferenced) name. Then the contents are made durable, loose objects are renamed into place,
the renames are made durable, and only then does the pack index commit. A crash leaves only
whole objects under final names, plus unreferenced temp dirs and packs that gc sweeps.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import xxhash

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    import zstandard

from ._config import Config
from ._crash import crash_point
from ._errors import ObjectCorrupt, ObjectMissing, SealBroken, UsageError
from ._fsops import (
    NOT_SUPPORTED,
    LinkMode,
    fsync_dir,
    make_durable,
    named,
    reflink_fd,
    remove_tree,
    stat_changed,
    write_all,
)
from ._hashing import READ_BLOCK, Oid, hash_bytes, hash_fd, read_all
from ._index import recent
from ._lock import Lock
from ._state import connect
from ._threads import executor

BLOCK = 4096
OBJ_MODE = 0o444
PACK_MAGIC = b"SNAPFS-PACK-1\n"
REPACK_DEAD_FRACTION = 0.25
FLUSH_BYTES = 1 << 20  # small objects handed to a pack writer thread at a time
FLUSH_COUNT = 256

STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS packed (
    oid BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, size INTEGER NOT NULL, compressed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS packed_by_pack ON packed (pack);
CREATE TABLE IF NOT EXISTS seals (
    oid BLOB PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,
    mtime_ns INTEGER, ctime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS projects (
    root TEXT PRIMARY KEY, db TEXT NOT NULL, registered REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS digests (
    algo TEXT NOT NULL, digest TEXT NOT NULL, oid BLOB NOT NULL, PRIMARY KEY (algo, digest)
);
"""


def _compressor(level: int) -> zstandard.ZstdCompressor:
    import zstandard  # imported on first use: it is not needed to read a clean tree

    return zstandard.ZstdCompressor(level=level)


def _decompress(payload: bytes, size: int) -> bytes:
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"undecodable: {exc}") from exc


# NamedTuples, not frozen dataclasses: every command imports this, and defining a
# dataclass costs ~0.4 ms (it compiles its methods); a NamedTuple ~0.07 ms.
class Seal(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Seal:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Where(NamedTuple):
    """Where an object's bytes live: a loose file, or a slice of a pack."""

    path: Path
    packed: bool = False
    offset: int = 0
    length: int = 0
    size: int = 0
    compressed: bool = False


class Ingested(NamedTuple):
    oid: Oid
    size: int  # bytes of content behind oid (the file may have grown since it was listed)
    stored: int  # bytes of disk this ingest added to the store
    st: os.stat_result  # the file's stat after ingest (sealing changes ctime and mode)
    racy: bool  # the file changed while being read: don't trust its stat next time
    # When snapfs itself moved st's ctime (the seal's chmod): the ctime before that. A write
    # after the seal moves mtime too, so raciness is judged on mtime and this ctime.
    ctime_before: int = 0


class SweepReport(NamedTuple):
    objects: int
    freed: int


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def _missing(oid: Oid) -> ObjectMissing:
    return ObjectMissing(f"Stored object {oid.hex()} is missing.", oid=oid.hex())


def _corrupt(oid: Oid, why: str = "is corrupt") -> ObjectCorrupt:
    return ObjectCorrupt(f"Stored object {oid.hex()} {why}.", oid=oid.hex())


class ObjectStore:
    def __init__(self, root: Path, config: Config) -> None:
        self.root = root
        self.config = config
        self.objects = root / "objects"
        self.packs = root / "packs"
        self.tmp = root / "tmp"
        if not (self.objects.is_dir() and (root / "store.db").exists()):
            raise UsageError(f"{root} is not a snapfs store.", hint="Run 'snapfs init' first.")
        self.db = connect(root / "store.db", STORE_SCHEMA)
        self.db_mutex = threading.Lock()  # one connection, shared by ingest threads
        self.lock = Lock(root / "store.lock", "object store")
        self._reflink_ok: bool | None = None
        self._hardlink_ok: bool | None = None
        # Oids known to be stored (packed and loose), loaded once a batch starts asking many
        # times. Other processes may add objects meanwhile; missing those costs a duplicate.
        self._packed_oids: set[Oid] | None = None
        self._lookups = 0

    @classmethod
    def create(cls, root: Path, config: Config) -> ObjectStore:
        for sub in ("objects", "packs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        connect(root / "store.db", STORE_SCHEMA).close()
        return cls(root, config)

    def close(self) -> None:
        self.db.close()

    # ---- naming and lookup --------------------------------------------------------------
    def loose_path(self, oid: Oid) -> Path:
        h = oid.hex()
        return self.objects / h[:2] / h[2:]

    def locate(self, oid: Oid) -> Where | None:
        with self.db_mutex:
            row = self.db.execute(
                "SELECT pack, offset, length, size, compressed FROM packed WHERE oid = ?", (oid,)
            ).fetchone()
        if row is not None:
            return Where(self.packs / row[0], True, row[1], row[2], row[3], bool(row[4]))
        p = self.loose_path(oid)
        return Where(p) if os.path.lexists(p) else None

    def __contains__(self, oid: Oid) -> bool:
        """Is the object stored? Cheap enough to ask for every file of a first snapshot."""
        known = self._packed_oids
        if known is None:
            self._lookups += 1
            if self._lookups > 256:  # many lookups coming: one query beats thousands
                with self.db_mutex:
                    rows = self.db.execute("SELECT oid FROM packed").fetchall()
                known = {bytes(r[0]) for r in rows}
                known.update(oid for oid, _path in self.iter_loose())
                self._packed_oids = known
            elif self.locate(oid) is not None:
                return True
            else:
                return False
        # Loose objects another process stored since the set was loaded are missed: that only
        # costs storing a duplicate, never a missing object.
        return oid in known

    def find_digest(self, algo: str, digest: str) -> Oid | None:
        """The stored object whose ``algo`` digest (lowercase hex) is ``digest``, if any."""
        with self.db_mutex:
            row = self.db.execute(
                "SELECT oid FROM digests WHERE algo = ? AND digest = ?", (algo, digest.lower())
            ).fetchone()
        if row is None:
            return None
        oid = bytes(row[0])
        return oid if self.locate(oid) is not None else None  # gc may have swept it since

    def digest_of(self, oid: Oid, algo: str) -> str | None:
        with self.db_mutex:
            row = self.db.execute(
                "SELECT digest FROM digests WHERE algo = ? AND oid = ?", (algo, oid)
            ).fetchone()
        return None if row is None else str(row[0])

    def object_size(self, oid: Oid) -> int:
        w = self.locate(oid)
        if w is None:
            raise _missing(oid)
        return w.size if w.packed else os.lstat(w.path).st_size

    def record_digest(self, algo: str, digest: str, oid: Oid) -> None:
        with self.db_mutex, self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO digests VALUES (?, ?, ?)", (algo, digest.lower(), oid)
            )

    def iter_loose(self) -> Iterator[tuple[Oid, Path]]:
        if not self.objects.is_dir():
            return
        for fan in sorted(os.listdir(self.objects)):
            d = self.objects / fan
            if len(fan) != 2 or not d.is_dir():
                continue
            for name in os.listdir(d):
                try:
                    oid = bytes.fromhex(fan + name)
                except ValueError:
                    continue
                if len(oid) == 16:
                    yield oid, d / name

    # ---- projects sharing this store ----------------------------------------------------
    def register_project(self, root: Path, db: Path) -> None:
        # Paths as raw bytes: a project folder's name need not be valid UTF-8.
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO projects VALUES (?, ?, strftime('%s','now'))",
                (os.fsencode(root), os.fsencode(db)),
            )

    def projects(self) -> list[tuple[Path, Path]]:
        rows = self.db.execute("SELECT root, db FROM projects").fetchall()
        return [(_as_path(r), _as_path(d)) for r, d in rows]

    # ---- seals --------------------------------------------------------------------------
    def seal_of(self, oid: Oid) -> Seal | None:
        with self.db_mutex:
            row = self.db.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns FROM seals WHERE oid = ?", (oid,)
            ).fetchone()
        return Seal(*row) if row else None

    def check_seal(self, oid: Oid, path: Path) -> None:
        """Raise SealBroken if a hardlinked object was written in place since it was sealed.

        A write always moves mtime or size. ctime alone also moves when a link is added or
        removed (the user deleting their copy), so a ctime-only change is settled by re-hashing,
        and the seal is refreshed if the content is still intact.
        """
        seal = self.seal_of(oid)
        if seal is None:
            return
        now = Seal.of(os.lstat(path))
        if (now.ino, now.size, now.mtime_ns) != (seal.ino, seal.size, seal.mtime_ns):
            raise self._broken(oid)
        if now.ctime_ns != seal.ctime_ns:
            if self._hash_loose(path) != oid:
                raise self._broken(oid)
            self.reseal(oid, now)

    def reseal(self, oid: Oid, seal: Seal) -> None:
        with self.db_mutex, self.db:
            self.db.execute(
                "UPDATE seals SET ctime_ns = ? WHERE oid = ? AND ino = ?",
                (seal.ctime_ns, oid, seal.ino),
            )

    def reseal_moved(self, moved: Iterable[tuple[Oid, os.stat_result]]) -> None:
        """Record the ctime of sealed objects whose inode snapfs just linked or renamed, when
        nothing else about it moved (a write moves mtime or size)."""
        with self.db_mutex, self.db:
            self.db.executemany(
                "UPDATE seals SET ctime_ns = ? WHERE oid = ? AND ino = ? AND size = ?"
                " AND mtime_ns = ?",
                ((st.st_ctime_ns, oid, st.st_ino, st.st_size, st.st_mtime_ns) for oid, st in moved),
            )

    @staticmethod
    def _broken(oid: Oid) -> SealBroken:
        return SealBroken(
            f"Stored file {oid.hex()} was modified in place after it was snapshotted.",
            oid=oid.hex(),
        )

    # ---- writing ------------------------------------------------------------------------
    def batch(self) -> IngestBatch:
        return IngestBatch(self)

    def has_leftovers(self) -> bool:
        """Did a process die mid-write here? (Cheap: one directory listing.)"""
        return self.tmp.is_dir() and any(_dead_owner(n) for n in os.listdir(self.tmp))

    def sweep_leftovers(self) -> None:
        """Remove temp dirs (loose objects and packs being written) of processes that died.

        Only what a dead process owned is touched, so this is safe without the store lock.
        """
        if self.tmp.is_dir():
            for name in os.listdir(self.tmp):
                if _dead_owner(name):
                    path = self.tmp / name
                    if path.is_dir() and not path.is_symlink():
                        remove_tree(path)
                    else:  # a staged file (an import's write step)
                        _unlink_quiet(path)

    # ---- reading ------------------------------------------------------------------------
    def _hash_loose(self, path: Path) -> Oid:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hash_fd(fd)[0]
        finally:
            os.close(fd)

    def _read_packed(self, oid: Oid, w: Where) -> bytes:
        try:
            fd = os.open(w.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _missing(oid) from None
        try:
            payload = os.pread(fd, w.length, w.offset)
        finally:
            os.close(fd)
        if len(payload) != w.length:
            raise _corrupt(oid, "is cut short")
        if not w.compressed:
            return payload
        try:
            return _decompress(payload, w.size)
        except ValueError:
            raise _corrupt(oid, "is undecodable") from None

    def read_bytes(self, oid: Oid) -> bytes:
        """The content of a (small) object, verified."""
        w = self.locate(oid)
        if w is None:
            raise _missing(oid)
        data = self._read_packed(oid, w) if w.packed else w.path.read_bytes()
        if hash_bytes(data) != oid:
            raise _corrupt(oid)
        return data

    def check(self, oid: Oid) -> None:
        """Raise ObjectMissing / ObjectCorrupt / SealBroken unless the object is intact."""
        w = self.locate(oid)
        if w is None:
            raise _missing(oid)
        if w.packed:
            if hash_bytes(self._read_packed(oid, w)) != oid:
                raise _corrupt(oid)
            return
        self.check_seal(oid, w.path)
        try:
            got = self._hash_loose(w.path)
        except OSError as exc:
            raise _corrupt(oid, f"is unreadable ({exc.strerror})") from exc
        if got != oid:
            raise _corrupt(oid)

    def materialize(self, oid: Oid, dir_fd: int, name: bytes, mode: int) -> bool:
        """Create file ``name`` in ``dir_fd`` holding the object's content, verified.

        Returns True if the file is a hardlink to a sealed object (its mode stays read-only).
        """
        w = self.locate(oid)
        if w is None:
            raise _missing(oid)
        if w.packed:
            data = self._read_packed(oid, w)
            if hash_bytes(data) != oid:
                raise _corrupt(oid)
            dst = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
            )
            try:
                write_all(dst, data)
                os.fchmod(dst, mode)
            finally:
                os.close(dst)
            return False
        verify = self.config.verify_restore
        if self.seal_of(oid) is not None:
            self.check_seal(oid, w.path)
            if verify and self._hash_loose(w.path) != oid:
                raise _corrupt(oid)
            on_disk = mode & ~0o222 if self.config.seal_readonly else mode
            if stat.S_IMODE(os.lstat(w.path).st_mode) == on_disk:
                try:
                    os.link(w.path, name, dst_dir_fd=dir_fd)
                    # Adding a link moves ctime; that is us, not a write.
                    self.reseal(oid, Seal.of(os.lstat(w.path)))
                    return True
                except OSError as exc:
                    if exc.errno not in NOT_SUPPORTED:
                        raise
        src = os.open(w.path, os.O_RDONLY | os.O_CLOEXEC)
        dst = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            got = self._clone_out(src, dst, verify)
            os.fchmod(dst, mode)
        finally:
            os.close(src)
            os.close(dst)
        if verify and got != oid:
            os.unlink(name, dir_fd=dir_fd)
            raise _corrupt(oid)
        return False

    def _clone_out(self, src: int, dst: int, verify: bool) -> Oid | None:
        if self._reflink_ok is not False and self.config.link_mode in (
            LinkMode.AUTO,
            LinkMode.REFLINK,
        ):
            try:
                reflink_fd(src, dst)
                self._reflink_ok = True
                return hash_fd(src)[0] if verify else None
            except OSError as exc:
                if exc.errno not in NOT_SUPPORTED:
                    raise
                self._reflink_ok = False
        h = xxhash.xxh3_128()
        while True:
            block = os.read(src, READ_BLOCK)
            if not block:
                break
            h.update(block)
            write_all(dst, block)
        return h.digest()

    # ---- gc -----------------------------------------------------------------------------
    def sweep(self, live: set[Oid], *, dry_run: bool) -> SweepReport:
        self._packed_oids = None
        return self._sweep(live, dry_run)

    def _sweep(self, live: set[Oid], dry_run: bool) -> SweepReport:
        """Delete every object not in ``live``. Caller holds the store lock exclusively.

        Loose objects are unlinked. Packs lose their dead index rows; a pack with nothing live
        is deleted and one mostly dead is rewritten, each after the new state is durable.
        """
        count = freed = 0
        for oid, path in list(self.iter_loose()):
            if oid in live:
                continue
            st = os.lstat(path)
            freed += st.st_blocks * 512 if st.st_nlink <= 1 else 0
            count += 1
            if not dry_run:
                os.unlink(path)
                crash_point("gc.after_unlink")
        if not dry_run:
            self._drop_stale_seals()
        rows = self.db.execute("SELECT oid, pack, offset, length FROM packed").fetchall()
        by_pack: dict[str, list[tuple[Oid, int, int, bool]]] = {}
        for oid, pack, offset, length in rows:
            by_pack.setdefault(pack, []).append((bytes(oid), offset, length, bytes(oid) in live))
        on_disk = set(os.listdir(self.packs)) if self.packs.is_dir() else set()
        for name in sorted(on_disk - by_pack.keys()):
            freed += _disk_size(self.packs / name)  # unreferenced: a crash or a finished repack
            if not dry_run:
                os.unlink(self.packs / name)
        for pack, entries in sorted(by_pack.items()):
            dead = [e for e in entries if not e[3]]
            if not dead:
                continue
            count += len(dead)
            size = _disk_size(self.packs / pack)
            live_bytes = sum(e[2] for e in entries if e[3])
            if live_bytes == 0:
                freed += size
                if not dry_run:
                    self._forget(e[0] for e in dead)
                    crash_point("gc.pack_forgotten")
                    _unlink_quiet(self.packs / pack)
            elif sum(e[2] for e in dead) >= REPACK_DEAD_FRACTION * (
                live_bytes + sum(e[2] for e in dead)
            ):
                freed += max(0, size - _blocks(live_bytes + len(PACK_MAGIC)) * BLOCK)
                if not dry_run:
                    self._repack(pack, [e for e in entries if e[3]], [e[0] for e in dead])
            elif not dry_run:
                self._forget(e[0] for e in dead)  # space comes back at a later repack
        return SweepReport(count, freed)

    def _forget(self, oids: Iterable[Oid]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM packed WHERE oid = ?", ((o,) for o in oids))

    def _drop_stale_seals(self) -> None:
        stale = [
            bytes(o)
            for (o,) in self.db.execute("SELECT oid FROM seals")
            if not os.path.lexists(self.loose_path(bytes(o)))
        ]
        with self.db:
            self.db.executemany("DELETE FROM seals WHERE oid = ?", ((o,) for o in stale))

    def _repack(self, pack: str, keep: list[tuple[Oid, int, int, bool]], dead: list[Oid]) -> None:
        work = self.tmp / f"{os.getpid()}-gc-{os.urandom(4).hex()}"
        work.mkdir(parents=True)
        writer = PackWriter(work)
        src = os.open(self.packs / pack, os.O_RDONLY | os.O_CLOEXEC)
        try:
            moved = []
            for oid, offset, length, _ in keep:
                payload = os.pread(src, length, offset)
                moved.append((oid, writer.append(payload)))
        finally:
            os.close(src)
        writer.finish()
        os.rename(writer.path, self.packs / writer.name)
        fsync_dir(self.packs)
        remove_tree(work)
        crash_point("gc.repack_written")
        with self.db:
            self.db.executemany(
                "UPDATE packed SET pack = ?, offset = ? WHERE oid = ?",
                ((writer.name, off, oid) for oid, off in moved),
            )
            self.db.executemany("DELETE FROM packed WHERE oid = ?", ((o,) for o in dead))
        crash_point("gc.repack_committed")
        _unlink_quiet(self.packs / pack)


class PackWriter:
    """Appends payloads to a new pack in a temp dir. Thread-safe. Published by rename."""

    def __init__(self, directory: Path) -> None:
        self.name = f"{os.urandom(12).hex()}.pack"
        self.path = directory / self.name
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJ_MODE)
        try:
            write_all(self.fd, PACK_MAGIC)
        except OSError as exc:
            os.close(self.fd)
            named(exc, self.path)
            raise
        self.offset = len(PACK_MAGIC)
        self._mutex = threading.Lock()

    def append(self, payload: bytes) -> int:
        with self._mutex:
            at = self.offset
            self.offset += len(payload)
        n = 0
        try:
            while n < len(payload):  # pwrite: appenders don't wait on each other's writes
                n += os.pwrite(self.fd, memoryview(payload)[n:], at + n)
        except OSError as exc:
            named(exc, self.path)
            raise
        return at

    def finish(self) -> None:
        """Make the pack durable and close it."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            named(exc, self.path)
            raise
        finally:
            os.close(self.fd)

    def discard(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        _unlink_quiet(self.path)


class IngestBatch:
    """The objects one snapshot adds. Thread-safe; commit() makes them durable together."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.config = store.config
        store.tmp.mkdir(exist_ok=True)
        # os.urandom, not secrets: importing secrets loads OpenSSL, ~3 ms on every command.
        self.dir = store.tmp / f"{os.getpid()}-{os.urandom(4).hex()}"
        self.dir.mkdir()
        self._loose: dict[Oid, tuple[Path, Seal | None]] = {}
        self._packed: dict[Oid, tuple[int, int, int, bool]] = {}
        self._pack: PackWriter | None = None
        self._queued: set[Oid] = set()  # small oids claimed by this batch
        self._buf: list[tuple[Oid, bytes]] = []
        self._buf_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: list[Future[int]] = []
        self.stored = 0  # disk bytes added by small objects
        # (dev, ino) -> (ctime sealed, ctime after the commit's rename), for the stat cache
        self.resealed: dict[tuple[int, int], tuple[int, int]] = {}
        self._mutex = threading.Lock()
        self._seq = 0
        self._local = threading.local()

    # -- helpers
    def _tmpname(self) -> Path:
        with self._mutex:
            self._seq += 1
            return self.dir / str(self._seq)

    def _known(self, oid: Oid) -> bool:
        with self._mutex:
            if oid in self._loose or oid in self._queued:
                return True
        return oid in self.store

    def _claim_loose(self, oid: Oid, tmp: Path, seal: Seal | None) -> bool:
        """Queue tmp as loose object oid. False (and tmp dropped) if another got there first."""
        with self._mutex:
            dup = oid in self._loose or oid in self._queued
            if not dup:
                self._loose[oid] = (tmp, seal)
        if dup:
            os.unlink(tmp)
        return not dup

    def _compress(self, data: bytes) -> bytes:
        c = getattr(self._local, "c", None)
        if c is None:
            c = _compressor(self.config.compress_level)
            self._local.c = c
        return bytes(c.compress(data))

    def may_hardlink(self, st: os.stat_result) -> bool:
        mode = self.config.link_mode
        return self.store._hardlink_ok is not False and (
            mode == LinkMode.HARDLINK
            or (mode == LinkMode.AUTO and st.st_size >= self.config.hardlink_threshold)
        )

    # -- ingest
    def ingest(
        self,
        fd: int,
        st: os.stat_result,
        link_src: tuple[int, bytes] | None = None,
        known: Oid | None = None,
    ) -> Ingested:
        """Add the open regular file ``fd`` (whose lstat was ``st``) to the store.

        ``link_src`` is (directory fd, name) of the file, needed to hardlink it. ``known`` is
        the file's oid when the caller has just verified it (a finished download): a reflink or
        hardlink then costs no read at all.
        """
        mode = self.config.link_mode
        small = st.st_size < self.config.pack_threshold
        if mode == LinkMode.REFLINK or (
            mode == LinkMode.AUTO and not small and self.store._reflink_ok is not False
        ):
            got = self._try_reflink(fd, st, forced=mode == LinkMode.REFLINK, known=known)
            if got is not None:
                return got
        if link_src is not None and self.may_hardlink(st):
            got = self._try_hardlink(
                fd, st, link_src, forced=mode == LinkMode.HARDLINK, known=known
            )
            if got is not None:
                return got
        return self._pack_small(fd, st) if small else self._copy_loose(fd, st)

    def _try_reflink(
        self, fd: int, st: os.stat_result, forced: bool, known: Oid | None = None
    ) -> Ingested | None:
        tmp = self._tmpname()
        dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJ_MODE)
        try:
            try:
                cloned_ns = time.time_ns()
                reflink_fd(fd, dst)
            except OSError as exc:
                if exc.errno in NOT_SUPPORTED and forced:
                    raise UsageError(
                        "This filesystem can't make reflinks, and link_mode is set to 'reflink'.",
                        hint='Set link_mode = "auto" in .snapfs/config (or SNAPFS_LINK_MODE).',
                    ) from exc
                if exc.errno not in NOT_SUPPORTED:
                    raise
                self.store._reflink_ok = False
                os.close(dst)
                dst = -1
                os.unlink(tmp)
                return None
            self.store._reflink_ok = True
            if known is not None and not stat_changed(st, os.fstat(fd)):
                oid, size = known, st.st_size
            else:
                oid, size = self._hash_clone(fd, dst, st, cloned_ns)
        finally:
            if dst >= 0:
                os.close(dst)
        after = os.fstat(fd)
        if self._known(oid):
            os.unlink(tmp)
        else:
            self._claim_loose(oid, tmp, None)
        return Ingested(oid, size, 0, st, stat_changed(st, after))

    @staticmethod
    def _hash_clone(fd: int, dst: int, st: os.stat_result, cloned_ns: int) -> tuple[Oid, int]:
        """The digest of the clone ``dst``, a frozen copy of ``fd`` as it was when cloned.

        Read from the live file when that provably gives the same bytes: its page cache is
        warm (it was just written or used), while a clone's pages are its own and cold. The
        file's stat must be the same before the clone and after the read, and its timestamps
        older than the racy window, so that a write in between would have moved one.
        """
        settled = not (recent(st.st_mtime_ns, cloned_ns) or recent(st.st_ctime_ns, cloned_ns))
        if settled and not stat_changed(st, os.fstat(fd)):
            os.lseek(fd, 0, os.SEEK_SET)
            oid, size = hash_fd(fd)
            if not stat_changed(st, os.fstat(fd)) and size == st.st_size:
                return oid, size
        return hash_fd(dst)

    def _try_hardlink(
        self,
        fd: int,
        st: os.stat_result,
        link_src: tuple[int, bytes],
        forced: bool,
        known: Oid | None = None,
    ) -> Ingested | None:
        for _attempt in range(3):
            before = os.fstat(fd)
            if known is not None and not stat_changed(st, before):
                oid, size = known, before.st_size
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                oid, size = hash_fd(fd)
            if stat_changed(before, os.fstat(fd)):
                continue  # written while we hashed; a hardlink would capture a moving target
            if self._known(oid):
                return Ingested(oid, size, 0, os.fstat(fd), False)
            tmp = self._tmpname()
            try:
                os.link(link_src[1], tmp, src_dir_fd=link_src[0], follow_symlinks=False)
            except FileNotFoundError:
                return None  # renamed away meanwhile: copy what we have open
            except OSError as exc:
                if exc.errno not in NOT_SUPPORTED or forced:
                    raise
                if exc.errno != errno.EMLINK:  # EMLINK is about this inode, not the filesystem
                    self.store._hardlink_ok = False
                return None
            if os.lstat(tmp).st_ino != before.st_ino:
                os.unlink(tmp)  # the name now points at another file: link only what we hashed
                continue
            # Seal: no write bits, so an accidental in-place write fails (for non-root users), and
            # the recorded size/mtime/ctime catch any write that still gets through.
            if self.config.seal_readonly:
                os.fchmod(fd, stat.S_IMODE(before.st_mode) & ~0o222)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                os.unlink(tmp)
                continue
            self._claim_loose(oid, tmp, Seal.of(after))
            return Ingested(oid, size, 0, after, False, before.st_ctime_ns)
        return None  # kept changing: fall back to a copy of what we can read

    def _pack_small(self, fd: int, st: os.stat_result) -> Ingested:
        os.lseek(fd, 0, os.SEEK_SET)
        data = read_all(fd)
        after = os.fstat(fd)
        oid = hash_bytes(data)
        with self._mutex:
            fresh = oid not in self._queued and oid not in self._packed
            self._queued.add(oid)
        stored = 0
        if fresh and oid not in self.store:
            stored = self._write_job([(oid, data)])
        return Ingested(oid, len(data), stored, st, stat_changed(st, after))

    def add_small(self, oid: Oid, data: bytes) -> None:
        """Queue a small file's content for the pack. Only the walker thread calls this."""
        with self._mutex:
            if oid in self._queued or oid in self._loose:
                return
            self._queued.add(oid)
        if oid in self.store:
            return
        self._buf.append((oid, data))
        self._buf_bytes += len(data)
        if self._buf_bytes >= FLUSH_BYTES or len(self._buf) >= FLUSH_COUNT:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        job, self._buf, self._buf_bytes = self._buf, [], 0
        if self._pool is None:
            self._pool = executor(
                max_workers=max(1, self.config.workers // 2), thread_name_prefix="snapfs-pack"
            )
        self._jobs.append(self._pool.submit(self._write_job, job))

    def _write_job(self, job: list[tuple[Oid, bytes]]) -> int:
        """Compress and append a run of small objects to the pack with one write."""
        payloads = []
        meta = []
        for oid, data in job:
            payload, compressed = data, False
            if self.config.compress and len(data) > 64:
                packed = self._compress(data)
                if len(packed) < len(data) * 7 // 8:
                    payload, compressed = packed, True
            payloads.append(payload)
            meta.append((oid, len(payload), len(data), compressed))
        with self._mutex:
            if self._pack is None:
                self._pack = PackWriter(self.dir)
            pack = self._pack
        at = pack.append(b"".join(payloads))
        stored = 0
        with self._mutex:
            for oid, length, size, compressed in meta:
                self._packed[oid] = (at, length, size, compressed)
                at += length
                stored += length
            self.stored += stored
        return stored

    def _drain(self) -> None:
        """Wait for queued pack writes; re-raise the first failure."""
        self._flush()
        jobs, self._jobs = self._jobs, []
        try:
            for fut in jobs:
                fut.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def _copy_loose(self, fd: int, st: os.stat_result) -> Ingested:
        os.lseek(fd, 0, os.SEEK_SET)
        tmp = self._tmpname()
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJ_MODE)
        h = xxhash.xxh3_128()
        total = 0
        try:
            while True:
                block = os.read(fd, READ_BLOCK)
                if not block:
                    break
                h.update(block)
                write_all(out, block)
                total += len(block)
        except OSError as exc:
            named(exc, tmp)
            raise
        finally:
            os.close(out)
        after = os.fstat(fd)
        oid = h.digest()
        if self._known(oid) or not self._claim_loose(oid, tmp, None):
            _unlink_quiet(tmp)
            return Ingested(oid, total, 0, st, stat_changed(st, after))
        return Ingested(oid, total, _blocks(total) * BLOCK, st, stat_changed(st, after))

    # -- finish
    @property
    def new_objects(self) -> int:
        return len(self._loose) + len(self._packed)

    new_objects_committed = 0

    def commit(self) -> None:
        """Make every queued object durable, then visible under its final name."""
        store = self.store
        self._drain()
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fans: set[str | bytes] = set()
        try:
            if self._pack is not None:
                self._pack.finish()
            files: list[str | bytes] = [str(t) for t, _s in self._loose.values()]
            if self._pack is not None:
                files.append(str(self._pack.path))
            make_durable(files, [], dfd)
            crash_point("snapshot.objects_synced")
            if self._pack is not None:
                os.rename(self._pack.path, store.packs / self._pack.name)
                fans = {str(store.packs)}
            seals = []
            made: set[Path] = set()
            for oid, (tmp, seal) in self._loose.items():
                final = store.loose_path(oid)
                if final.parent not in made:
                    final.parent.mkdir(exist_ok=True)
                    made.add(final.parent)
                os.rename(tmp, final)
                fans.add(str(final.parent))
                if seal is not None:
                    seal = self._moved(seal, final)
                    seals.append((oid, seal.dev, seal.ino, seal.size, seal.mtime_ns, seal.ctime_ns))
            crash_point("snapshot.objects_renamed")
            if fans:
                make_durable([], sorted(fans) + [str(store.objects)], dfd)
        finally:
            os.close(dfd)
        if seals or self._packed:
            pack = self._pack.name if self._pack is not None else ""
            with store.db_mutex, store.db:
                store.db.executemany(
                    "INSERT OR REPLACE INTO seals VALUES (?, ?, ?, ?, ?, ?)", seals
                )
                store.db.executemany(
                    "INSERT OR IGNORE INTO packed VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        (oid, pack, off, length, size, int(comp))
                        for oid, (off, length, size, comp) in self._packed.items()
                    ),
                )
            crash_point("snapshot.index_committed")
        if store._packed_oids is not None:
            store._packed_oids.update(self._packed)
            store._packed_oids.update(self._loose)
        self.new_objects_committed = self.new_objects
        self._pack = None
        self._loose.clear()
        self._packed.clear()
        self.abort()

    def _moved(self, seal: Seal, final: Path) -> Seal:
        """The seal of a hardlink just renamed into the store. The rename moved the inode's
        ctime, and the project's file is that inode: record the new ctime here and in
        ``resealed``, so neither the seal nor the stat cache sends the next snapshot to re-read it.
        A write since sealing moves mtime or size too, and then the old seal stands."""
        now = os.lstat(final)
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (seal.ino, seal.size, seal.mtime_ns):
            return seal
        self.resealed[(seal.dev, seal.ino)] = (seal.ctime_ns, now.st_ctime_ns)
        return seal._replace(ctime_ns=now.st_ctime_ns)

    def abort(self) -> None:
        self._buf = []
        try:
            self._drain()
        except Exception:
            pass  # aborting anyway; the pack is discarded below
        if self._pack is not None:
            self._pack.discard()
            self._pack = None
        remove_tree(self.dir)


def _disk_size(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _unlink_quiet(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _as_path(value: bytes | str) -> Path:
    return Path(os.fsdecode(bytes(value)) if not isinstance(value, str) else value)


def _dead_owner(name: str) -> bool:
    """Was the temp dir or pack ``<pid>-...`` written by a process that is gone?"""
    pid = name.split("-", 1)[0]
    if not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
