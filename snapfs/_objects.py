"""The object store: immutable file contents addressed by XXH3-128, in fan-out directories.

On-disk layout under the store root::

    objects/ab/<30 hex>        raw content (a copy, a reflink clone, or a sealed hardlink)
    objects/ab/<30 hex>.zst    zstd-compressed content (small files, only when it saves blocks)
    tmp/<pid>-<random>/        objects being written by one process
    store.db                   seals of hardlinked objects, registered projects
    store.lock                 gc takes it exclusively, snapshots shared

Durability: objects are written to ``tmp/``, then one ``syncfs`` flushes them all, then they are
renamed to their final names, then a second ``syncfs`` makes the renames durable. A crash at any
point leaves only whole objects under final names; stray temp dirs are swept later.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sqlite3
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from ._config import Config
from ._crash import crash_point
from ._errors import ObjectCorrupt, ObjectMissing, SealBroken, UsageError
from ._fsops import (
    NOT_SUPPORTED,
    LinkMode,
    make_durable,
    reflink_fd,
    write_all,
)
from ._hashing import READ_BLOCK, Oid, hash_bytes, hash_fd
from ._lock import Lock
from ._state import connect

SMALL = 1 << 20  # read whole, hash in memory
COMPRESS_MAX = 16 << 20  # compress in memory up to this size
BLOCK = 4096
OBJ_MODE = 0o444

STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS seals (
    oid BLOB PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,
    mtime_ns INTEGER, ctime_ns INTEGER
);
CREATE TABLE IF NOT EXISTS projects (
    root TEXT PRIMARY KEY, db TEXT NOT NULL, registered REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True, slots=True)
class Seal:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Seal:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Ingested:
    oid: Oid
    stored: int  # bytes of disk this ingest added to the store
    st: os.stat_result  # the file's stat after ingest (sealing changes ctime and mode)
    racy: bool  # the file changed while being read: don't trust its stat next time


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


class ObjectStore:
    def __init__(self, root: Path, config: Config) -> None:
        self.root = root
        self.config = config
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        if not (self.objects.is_dir() and (root / "store.db").exists()):
            raise UsageError(f"{root} is not a snapfs store.", hint="Run 'snapfs init' first.")
        self.db = connect(root / "store.db", STORE_SCHEMA)
        self.lock = Lock(root / "store.lock", "object store")
        self._reflink_ok: bool | None = None
        self._hardlink_ok: bool | None = None

    @classmethod
    def create(cls, root: Path, config: Config) -> ObjectStore:
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        connect(root / "store.db", STORE_SCHEMA).close()
        return cls(root, config)

    def close(self) -> None:
        self.db.close()

    # ---- naming -------------------------------------------------------------------------
    def path(self, oid: Oid, compressed: bool = False) -> Path:
        h = oid.hex()
        return self.objects / h[:2] / (h[2:] + (".zst" if compressed else ""))

    def locate(self, oid: Oid) -> tuple[Path, bool] | None:
        """Where an object lives and whether it is compressed, or None if absent."""
        for compressed in (False, True):
            p = self.path(oid, compressed)
            if os.path.lexists(p):
                return p, compressed
        return None

    def __contains__(self, oid: Oid) -> bool:
        return self.locate(oid) is not None

    def iter_oids(self) -> Iterator[tuple[Oid, Path]]:
        if not self.objects.is_dir():
            return
        for fan in sorted(os.listdir(self.objects)):
            d = self.objects / fan
            if len(fan) != 2 or not d.is_dir():
                continue
            for name in os.listdir(d):
                stem = name[:-4] if name.endswith(".zst") else name
                try:
                    oid = bytes.fromhex(fan + stem)
                except ValueError:
                    continue
                if len(oid) == 16:
                    yield oid, d / name

    # ---- projects sharing this store ----------------------------------------------------
    def register_project(self, root: Path, db: Path) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO projects VALUES (?, ?, strftime('%s','now'))",
                (str(root), str(db)),
            )

    def projects(self) -> list[tuple[Path, Path]]:
        rows = self.db.execute("SELECT root, db FROM projects").fetchall()
        return [(Path(r), Path(d)) for r, d in rows]

    # ---- seals --------------------------------------------------------------------------
    def seal_of(self, oid: Oid) -> Seal | None:
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
            if self._hash_object(path, False) != oid:
                raise self._broken(oid)
            self.reseal(oid, now)

    def reseal(self, oid: Oid, seal: Seal) -> None:
        with self.db:
            self.db.execute(
                "UPDATE seals SET ctime_ns = ? WHERE oid = ? AND ino = ?",
                (seal.ctime_ns, oid, seal.ino),
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

    def sweep_tmp(self) -> None:
        """Remove temp dirs left by processes that died. Caller holds the store lock exclusively."""
        if not self.tmp.is_dir():
            return
        for name in os.listdir(self.tmp):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(self.tmp / name, ignore_errors=True)

    def delete(self, oid: Oid) -> None:
        loc = self.locate(oid)
        if loc is None:
            return
        os.unlink(loc[0])
        crash_point("gc.after_unlink")
        if not loc[1]:
            with self.db:
                self.db.execute("DELETE FROM seals WHERE oid = ?", (oid,))

    # ---- reading ------------------------------------------------------------------------
    def stored_size(self, oid: Oid) -> tuple[int, int]:
        """(disk bytes this object alone holds, link count) for gc accounting."""
        loc = self.locate(oid)
        if loc is None:
            return 0, 0
        st = os.lstat(loc[0])
        return st.st_blocks * 512, st.st_nlink

    def check(self, oid: Oid, *, full: bool = True) -> None:
        """Raise ObjectMissing / ObjectCorrupt / SealBroken unless the object is intact."""
        loc = self.locate(oid)
        if loc is None:
            raise ObjectMissing(f"Stored object {oid.hex()} is missing.", oid=oid.hex())
        path, compressed = loc
        if not compressed:
            self.check_seal(oid, path)
        if not full:
            return
        try:
            got = self._hash_object(path, compressed)
        except (zstandard.ZstdError, OSError) as exc:
            raise ObjectCorrupt(f"Stored object {oid.hex()} is unreadable: {exc}.", oid=oid.hex())
        if got != oid:
            raise ObjectCorrupt(f"Stored object {oid.hex()} is corrupt.", oid=oid.hex())

    def _hash_object(self, path: Path, compressed: bool) -> Oid:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not compressed:
                return hash_fd(fd)[0]
            with os.fdopen(os.dup(fd), "rb") as f:
                return hash_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(f.read()))
        finally:
            os.close(fd)

    def read_bytes(self, oid: Oid) -> bytes:
        loc = self.locate(oid)
        if loc is None:
            raise ObjectMissing(f"Stored object {oid.hex()} is missing.", oid=oid.hex())
        data = loc[0].read_bytes()
        return zstandard.ZstdDecompressor().decompressobj().decompress(data) if loc[1] else data

    def materialize(self, oid: Oid, dir_fd: int, name: bytes, mode: int) -> bool:
        """Create file ``name`` in ``dir_fd`` holding the object's content, verified.

        Returns True if the file is a hardlink to a sealed object (its mode stays read-only).
        """
        loc = self.locate(oid)
        if loc is None:
            raise ObjectMissing(f"Stored object {oid.hex()} is missing.", oid=oid.hex())
        path, compressed = loc
        verify = self.config.verify_restore
        if not compressed and self.seal_of(oid) is not None:
            self.check_seal(oid, path)
            if verify and self._hash_object(path, False) != oid:
                raise ObjectCorrupt(f"Stored object {oid.hex()} is corrupt.", oid=oid.hex())
            if stat.S_IMODE(os.lstat(path).st_mode) == mode & ~0o222:
                try:
                    os.link(path, name, dst_dir_fd=dir_fd)
                    # Adding a link moves ctime; that is us, not a write.
                    self.reseal(oid, Seal.of(os.lstat(path)))
                    return True
                except OSError as exc:
                    if exc.errno not in NOT_SUPPORTED:
                        raise
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            got = self._write_out(src, dst, compressed, verify)
            os.fchmod(dst, mode)
        finally:
            os.close(src)
            os.close(dst)
        if verify and got != oid:
            os.unlink(name, dir_fd=dir_fd)
            raise ObjectCorrupt(f"Stored object {oid.hex()} is corrupt.", oid=oid.hex())
        return False

    def _write_out(self, src: int, dst: int, compressed: bool, verify: bool) -> Oid | None:
        if compressed:
            with os.fdopen(os.dup(src), "rb") as f:
                data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
            write_all(dst, data)
            return hash_bytes(data) if verify else None
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
        import xxhash

        h = xxhash.xxh3_128()
        while True:
            block = os.read(src, READ_BLOCK)
            if not block:
                break
            h.update(block)
            write_all(dst, block)
        return h.digest()


class IngestBatch:
    """The objects one snapshot adds. Thread-safe; commit() makes them durable together."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.config = store.config
        store.tmp.mkdir(exist_ok=True)
        self.dir = store.tmp / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.dir.mkdir()
        self._pending: dict[Oid, tuple[Path, Path, Seal | None]] = {}
        self._mutex = threading.Lock()
        self._seq = 0
        self._cctx = threading.local()

    # -- helpers
    def _tmpname(self) -> Path:
        with self._mutex:
            self._seq += 1
            return self.dir / str(self._seq)

    def _known(self, oid: Oid) -> bool:
        with self._mutex:
            if oid in self._pending:
                return True
        return oid in self.store

    def _add(self, oid: Oid, tmp: Path, compressed: bool, seal: Seal | None) -> bool:
        """Queue tmp as the object oid. Returns False (and drops tmp) if another got there first."""
        with self._mutex:
            if oid in self._pending:
                dup = True
            else:
                self._pending[oid] = (tmp, self.store.path(oid, compressed), seal)
                dup = False
        if dup:
            os.unlink(tmp)
            return False
        return True

    def _compressor(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._cctx, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(level=self.config.compress_level)
            self._cctx.c = c
        return c

    # -- ingest
    def may_hardlink(self, st: os.stat_result) -> bool:
        mode = self.config.link_mode
        return self.store._hardlink_ok is not False and (
            mode == LinkMode.HARDLINK
            or (mode == LinkMode.AUTO and st.st_size >= self.config.hardlink_threshold)
        )

    def ingest(
        self, fd: int, st: os.stat_result, link_src: tuple[int, bytes] | None = None
    ) -> Ingested:
        """Add the open regular file ``fd`` (whose lstat was ``st``) to the store.

        ``link_src`` is (directory fd, name) of the file, needed to hardlink it.
        """
        mode = self.config.link_mode
        if mode in (LinkMode.AUTO, LinkMode.REFLINK) and self.store._reflink_ok is not False:
            got = self._try_reflink(fd, st, forced=mode == LinkMode.REFLINK)
            if got is not None:
                return got
        if link_src is not None and self.may_hardlink(st):
            got = self._try_hardlink(fd, st, link_src, forced=mode == LinkMode.HARDLINK)
            if got is not None:
                return got
        return self._copy(fd, st)

    def _try_reflink(self, fd: int, st: os.stat_result, forced: bool) -> Ingested | None:
        tmp = self._tmpname()
        dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJ_MODE)
        try:
            try:
                reflink_fd(fd, dst)
            except OSError as exc:
                if exc.errno not in NOT_SUPPORTED or forced:
                    raise
                self.store._reflink_ok = False
                os.close(dst)
                dst = -1
                os.unlink(tmp)
                return None
            self.store._reflink_ok = True
            # The clone is a frozen point-in-time copy: hash it, not the live file.
            oid, _ = hash_fd(dst)
        finally:
            if dst >= 0:
                os.close(dst)
        after = os.fstat(fd)
        if self._known(oid):
            os.unlink(tmp)
        else:
            self._add(oid, tmp, False, None)
        return Ingested(oid, 0, st, _changed(st, after))

    def _try_hardlink(
        self, fd: int, st: os.stat_result, link_src: tuple[int, bytes], forced: bool
    ) -> Ingested | None:
        for _attempt in range(3):
            before = os.fstat(fd)
            os.lseek(fd, 0, os.SEEK_SET)
            oid, _ = hash_fd(fd)
            if _changed(before, os.fstat(fd)):
                continue  # written while we hashed; a hardlink would capture a moving target
            if self._known(oid):
                return Ingested(oid, 0, os.fstat(fd), False)
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
            os.fchmod(fd, stat.S_IMODE(before.st_mode) & ~0o222)
            after = os.fstat(fd)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                os.unlink(tmp)
                continue
            self._add(oid, tmp, False, Seal.of(after))
            return Ingested(oid, 0, after, False)
        return None  # kept changing: fall back to a copy of what we can read

    def _copy(self, fd: int, st: os.stat_result) -> Ingested:
        os.lseek(fd, 0, os.SEEK_SET)
        if st.st_size <= COMPRESS_MAX:
            data = _read_all(fd)
            after = os.fstat(fd)
            oid = hash_bytes(data)
            if self._known(oid):
                return Ingested(oid, 0, st, _changed(st, after))
            payload, compressed = data, False
            if self.config.compress and len(data) > BLOCK:
                packed = self._compressor().compress(data)
                if _blocks(len(packed)) < _blocks(len(data)):
                    payload, compressed = packed, True
            tmp = self._tmpname()
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, OBJ_MODE)
            try:
                write_all(out, payload)
            finally:
                os.close(out)
            added = self._add(oid, tmp, compressed, None)
            return Ingested(oid, _blocks(len(payload)) * BLOCK if added else 0, st, _changed(st, after))
        import xxhash

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
        finally:
            os.close(out)
        after = os.fstat(fd)
        oid = h.digest()
        if self._known(oid):
            os.unlink(tmp)
            return Ingested(oid, 0, st, _changed(st, after))
        added = self._add(oid, tmp, False, None)
        return Ingested(oid, _blocks(total) * BLOCK if added else 0, st, _changed(st, after))

    # -- finish
    @property
    def new_objects(self) -> int:
        return len(self._pending)

    def commit(self) -> None:
        """Make every queued object durable under its final name."""
        if self._pending:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                # Contents durable before any final name points at them.
                tmps: list[str | bytes] = [str(t) for t, _f, _s in self._pending.values()]
                make_durable(tmps, [], dfd)
                crash_point("snapshot.objects_synced")
                seals = []
                fans: set[str | bytes] = set()
                for oid, (tmp, final, seal) in self._pending.items():
                    final.parent.mkdir(exist_ok=True)
                    os.rename(tmp, final)
                    fans.add(str(final.parent))
                    if seal is not None:
                        seals.append((oid, seal.dev, seal.ino, seal.size, seal.mtime_ns, seal.ctime_ns))
                crash_point("snapshot.objects_renamed")
                make_durable([], sorted(fans) + [str(self.store.objects)], dfd)  # the renames
            finally:
                os.close(dfd)
            if seals:
                with self.store.db:
                    self.store.db.executemany(
                        "INSERT OR REPLACE INTO seals VALUES (?, ?, ?, ?, ?, ?)", seals
                    )
        self._pending.clear()
        self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) != (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        block = os.read(fd, READ_BLOCK)
        if not block:
            return b"".join(chunks)
        chunks.append(block)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
