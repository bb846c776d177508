"""Resumable, verified, multi-source downloads.

How a download runs::

    dest exists / store has it?  -> link it into place, zero bytes fetched
    lock the partial file        -> a second process waits, then finds the work done
    plan the missing ranges      -> from the verified-extent record of an earlier run
    N workers fetch ranged chunks from the healthiest source; each byte is xxh3-hashed as it
      lands and its extent (start, length, digest, source) is recorded in SQLite
    one hasher follows the verified prefix, re-reads it from disk, checks each extent's digest
      and feeds the whole-file SHA-256 and XXH3-128
    expected digest wrong?       -> re-fetch one source's extents from another, swap the ones
                                    that differ, keep the swap only if the file then verifies
    rename into place            -> the file appears at DEST only complete and verified

The partial state is two files: ``<dest>.snapfs-part`` (the data, preallocated, written at
offsets) and ``<dest>.snapfs-part.db`` (the extent record). Inside a project they live under
``.snapfs/downloads/`` instead, so snapshots never see them. The data file is also the lock:
a second process downloading the same file blocks on it, and when it gets the lock finds the
file renamed into place (same inode at DEST) and returns without fetching a byte.

Every extent record is written after its bytes are, so a kill -9 loses at most the chunks that
were in flight. A power cut can lose written bytes behind a record: the hasher re-verifies every
extent it reads back, and an extent that fails goes back to be fetched again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import xxhash

from ._config import Config, with_overrides
from ._crash import crash_point
from ._errors import (
    BadContent,
    DiskFull,
    DownloadError,
    DownloadFailed,
    HashMismatch,
    SnapfsError,
    SourceUnavailable,
    UnsafePath,
    UsageError,
    from_oserror,
)
from ._fsops import DIR_FLAGS, open_parent, start_writeback
from ._state import from_sqlite

if TYPE_CHECKING:
    import requests

    from ._hosts import HostBook
    from ._project import Project
    from ._retry import RetryBudget, RetryPolicy

READ = 1 << 20  # bytes per socket read and per disk read
SEGMENT_CHUNKS = 4  # the longest range asked for in one request, in chunks
PART_SUFFIX = ".snapfs-part"
LOCAL = "local"  # the source of bytes adopted from an incomplete file found at DEST
SAMPLE = 1 << 20  # bytes compared with the server before adopting such a file
FAST_AFTER = 4 << 20  # bytes into a response before it may switch to whole-block reads
FAST_RATE = 16e6  # bytes/s that count as fast
FAST_READ_SECONDS = 0.25  # a whole-block read slower than this switches back to read1
STANDIN_GRACE = 2.0  # seconds: wait this long for the best source before using another
HASH_WINDOW_CHUNKS = 8  # blocks up to this many chunks ahead of the hasher wait in memory...
HASH_WINDOW_MAX = 64 << 20  # ...but never more bytes than this
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS extents (
    start INTEGER PRIMARY KEY, length INTEGER NOT NULL, xxh BLOB NOT NULL, source TEXT NOT NULL
);
"""


def _sha256() -> Any:
    import hashlib  # on first use: OpenSSL's initialisation costs every command ~2 ms

    return hashlib.sha256()


# Patterns as text: re compiles (and caches) them on first use, not at import.
_HTML = rb"^\s*(<!doctype html|<html|<head|<body|<\?xml)"
_CONTENT_RANGE = r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$|^bytes\s+\*/(\d+)$"


# ---- public values --------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadProgress:
    """A snapshot of a running download, passed to the ``progress`` callback (about 4 per s)."""

    phase: str  # "checking", "waiting", "downloading", "verifying", "repairing", "done"
    done: int  # verified bytes on disk
    total: int | None
    rate: float  # bytes per second over the last few seconds
    eta: float | None  # seconds
    source: str  # the host serving most recently
    retries: int
    message: str = ""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str
    xxh128: str
    fetched: int  # body bytes received over the network by this run
    resumed: int  # verified bytes already on disk when this run started
    reused: bool  # nothing fetched: the store, DEST or another process had it
    retries: int
    repaired: int  # bytes replaced after the whole-file check failed
    sources: dict[str, int] = field(default_factory=dict)  # host -> body bytes received


ProgressFn = Callable[[DownloadProgress], None]


def _no_progress(_: DownloadProgress) -> None:
    pass


# ---- small helpers --------------------------------------------------------------------------
def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"Not a downloadable URL: {url!r} (use http:// or https://).")
    return url


def _check_hex(value: str | None, length: int, name: str) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if len(v) != length or not all(c in "0123456789abcdef" for c in v):
        raise UsageError(f"--{name} must be {length} hex digits, got {value!r}.")
    return v


def name_from_url(url: str) -> str:
    """A safe file name from a URL's last path segment (never a path, never '.' or '..')."""
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    segment = segment.replace("\0", "").replace("/", "_").replace("\\", "_").strip()
    return segment if segment not in ("", ".", "..") else "download"


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/N`` -> (a, b + 1, N); ``bytes */N`` -> (None, None, N); junk -> Nones."""
    m = re.match(_CONTENT_RANGE, (value or "").strip())
    if not m:
        return None, None, None
    if m.group(4) is not None:
        return None, None, int(m.group(4))
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)) + 1, total


def _validator(resp: requests.Response) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _looks_like_page(content_type: str, head: bytes, dest_name: str) -> str | None:
    """Why this body is an error page rather than the file, or None."""
    suffix = dest_name.rsplit(".", 1)[-1].lower() if "." in dest_name else ""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if suffix not in ("html", "htm", "xhtml") and (
        ctype == "text/html" or re.match(_HTML, head, re.IGNORECASE)
    ):
        return "a web page (perhaps a login or captive portal)"
    if suffix != "json" and ctype in ("application/json", "application/problem+json"):
        return "a JSON message (perhaps an error)"
    return None


class _Transient(Exception):
    """A failure worth retrying: reset, stall, 5xx, 429. Carries the server's Retry-After."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.retry_after = retry_after


class _Retry(Exception):
    """Not a failure: put the range back and try again at once (refreshed URL, other source)."""


class _Dead(Exception):
    """This source can't serve this file in this run (404, a web page, another file...)."""

    def __init__(self, why: str, error: type[DownloadError] = SourceUnavailable) -> None:
        super().__init__(why)
        self.error = error


class _Changed(Exception):
    """The file changed upstream: start over with the new version."""

    def __init__(self, size: int | None, validator: str | None) -> None:
        super().__init__("changed upstream")
        self.size = size
        self.validator = validator


# ---- sources --------------------------------------------------------------------------------
class _Source:
    def __init__(self, url: str) -> None:
        self.url = url
        self.host = _host(url)
        self.resolved: str | None = None  # where the last redirect chain ended (a signed URL)
        self.validator: str | None = None
        self.ranges: bool | None = None  # does it honour Range?
        self.dead: str | None = None
        self.dead_error: type[DownloadError] = SourceUnavailable
        self.not_before = 0.0
        self.failures = 0
        self.streak = 0  # failures in a row, this run
        self.refreshes = 0  # signed-URL refreshes since the last progress
        self.received = 0


@dataclass(frozen=True)
class _Extent:
    start: int
    length: int
    xxh: bytes
    source: str  # the url that served it

    @property
    def end(self) -> int:
        return self.start + self.length


# ---- the partial file and its record --------------------------------------------------------
class _Partial:
    """``<name>.snapfs-part`` plus its SQLite extent record. Opening it takes the lock."""

    def __init__(self, part: Path, on_wait: Callable[[str], None]) -> None:
        self.path = part
        self.db_path = part.with_name(part.name + ".db")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        while True:
            try:
                fd = os.open(part, flags, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UsageError(f"Refusing to write through the symlink {part}.") from exc
                raise from_oserror(exc, "Starting the download", part) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait("Another snapfs process is downloading this file; waiting for it.")
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                same = os.lstat(part).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # Whoever held the lock finished (renamed our inode into place) or started over.
            os.close(fd)
            raise _Finished(st.st_ino)
        self.fd = fd
        self.mutex = threading.Lock()
        try:
            self.db = self._connect()
        except UnsafePath:
            os.close(fd)
            raise
        except sqlite3.DatabaseError:
            # A damaged record is only a cache of progress: without it the bytes on disk can't
            # be trusted, so start over with an empty one.
            self.drop_record()
            os.ftruncate(fd, 0)
            try:
                self.db = self._connect()
            except sqlite3.Error as exc:
                os.close(fd)
                raise from_sqlite(exc, self.db_path) from exc
        except sqlite3.Error as exc:
            os.close(fd)
            raise from_sqlite(exc, self.db_path) from exc

    def _connect(self) -> sqlite3.Connection:
        for suffix in ("", "-wal", "-shm"):  # SQLite would follow a symlink planted there
            side = Path(str(self.db_path) + suffix)
            if side.is_symlink():
                raise UnsafePath(f"Refusing to use {side}: it is a symlink.")
        db = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a kill -9 loses nothing committed; a power cut may lose the last records,
            # which only costs re-fetching (and the hasher re-checks every extent anyway).
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM extents").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    def meta(self) -> dict[str, str]:
        with self.mutex:
            return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, **values: str | int | None) -> None:
        with self.mutex, self.db:
            for k, v in values.items():
                if v is None:
                    self.db.execute("DELETE FROM meta WHERE key = ?", (k,))
                else:
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, str(v)))

    def extents(self) -> list[_Extent]:
        with self.mutex:
            rows = self.db.execute("SELECT start, length, xxh, source FROM extents").fetchall()
        return [_Extent(r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def record(self, ext: _Extent) -> None:
        try:
            with self.mutex, self.db:
                self.db.execute(
                    "INSERT OR REPLACE INTO extents VALUES (?, ?, ?, ?)",
                    (ext.start, ext.length, ext.xxh, ext.source),
                )
        except sqlite3.Error as exc:
            raise from_sqlite(exc, self.db_path) from exc

    def forget(self, ext: _Extent | None = None) -> None:
        with self.mutex, self.db:
            if ext is None:
                self.db.execute("DELETE FROM extents")
            else:
                self.db.execute("DELETE FROM extents WHERE start = ?", (ext.start,))

    def close(self) -> None:
        with self.mutex:
            self.db.close()
        os.close(self.fd)

    def drop_record(self) -> None:
        _remove_partial(self.path, data=False)


class _Finished(Exception):
    def __init__(self, ino: int) -> None:
        super().__init__("finished by another process")
        self.ino = ino


# ---- the plan: what is verified, in flight, or still to fetch -------------------------------
class _Plan:
    """Shared by the workers and the hasher; every method takes ``cond``."""

    def __init__(self, chunk: int) -> None:
        lock = threading.Lock()
        self.cond = threading.Condition(lock)
        # The same lock, other sleepers: the hasher waits on ``fed`` (a block or an extent to
        # digest), and a worker too far ahead of a busy hasher waits on ``room``. Separate, so
        # that handing the hasher a block every MiB wakes only the hasher.
        self.fed = threading.Condition(lock)
        self.room = threading.Condition(lock)
        self.chunk = chunk
        self.size: int | None = None
        self.extents: dict[int, _Extent] = {}
        self.todo: deque[tuple[int, int]] = deque()
        self.inflight = 0
        self.probing = False
        self.streaming = False  # one worker reads a Range-ignoring source front to back
        self.generation = 0
        self.verified = 0  # the hasher's position: bytes [0, verified) are checked
        self.hashed = False  # the hasher read the whole file: the digests are final
        # Blocks received by this process, by offset, for the hasher to digest from memory:
        # (bytes, the pool buffer holding them or None). See _Download._read_into.
        self.blocks: dict[int, tuple[bytes | memoryview, bytearray | None]] = {}
        self.pool: list[bytearray] = []  # free READ-sized buffers for those blocks
        self.hash_at = 0  # bytes [0, hash_at) are in the digests (>= verified)
        self.hash_idle = False  # the hasher is waiting: nothing at hash_at to digest yet
        self.error: BaseException | None = None
        self.stopped = False

    def notify_all(self) -> None:
        """Wake every sleeper: workers, the watcher, the hasher and paused workers."""
        self.cond.notify_all()
        self.fed.notify_all()
        self.room.notify_all()

    def drop_blocks(self, below: int | None = None) -> None:
        """Forget in-memory blocks (all, or those starting below an offset)."""
        for at in [a for a in self.blocks if below is None or a < below]:
            _data, owner = self.blocks.pop(at)
            if owner is not None:
                self.pool.append(owner)

    def set_size(self, size: int, extents: Sequence[_Extent] = ()) -> None:
        """(Re)build the to-do list for a file of ``size`` bytes, keeping ``extents``."""
        self.size = size
        self.extents = {e.start: e for e in extents if e.end <= size}
        self.todo.clear()
        pos = 0
        for e in sorted(self.extents.values(), key=lambda e: e.start):
            self._add_gap(pos, e.start)
            pos = e.end
        self._add_gap(pos, size)
        self.notify_all()

    def _add_gap(self, start: int, end: int) -> None:
        if start < end:
            self.todo.append((start, end))

    def carve(self, connections: int) -> tuple[int, int]:
        """Take the next request's range off the to-do list.

        A request spans several chunks while much is left (each request costs a round trip;
        an extent is recorded every chunk either way, so resume stays fine-grained) and shrinks
        towards one chunk near the end, so the last bytes are spread over every connection.
        Requests stay short enough that the connections work side by side near the front of
        the file: the hasher digests it in order, and with long requests it could only start
        on the second quarter once the first had fully arrived, finishing long after the last
        byte did.
        """
        start, end = self.todo.popleft()
        left = sum(e - s for s, e in self.todo) + (end - start)
        seg = max(self.chunk, min(SEGMENT_CHUNKS * self.chunk, left // connections))
        seg = -(-seg // self.chunk) * self.chunk  # whole chunks
        if end - start > seg:
            self.todo.appendleft((start + seg, end))
            end = start + seg
        return start, end

    def have(self) -> int:
        return sum(e.length for e in self.extents.values())

    def prefix_end(self) -> int:
        """Where the bytes we have, counted from 0 without a gap, end."""
        pos = 0
        while pos in self.extents:
            pos = self.extents[pos].end
        return pos

    @property
    def complete(self) -> bool:
        return self.hashed

    def put_back(self, start: int, end: int) -> None:
        """Return an unfinished range, keeping the list in offset order (low offsets first)."""
        if start >= end:
            return
        i = 0
        for i, (s, _e) in enumerate(self.todo):  # noqa: B007 - i is used after the loop
            if s > start:
                break
        else:
            i = len(self.todo)
        self.todo.insert(i, (start, end))
        self.notify_all()


# ---- the download ---------------------------------------------------------------------------
class _Download:
    def __init__(
        self,
        sources: list[_Source],
        part: _Partial,
        dest_name: str,
        config: Config,
        hosts: HostBook,
        progress: ProgressFn,
        expected: dict[str, Any],
    ) -> None:
        self.sources = sources
        self.part = part
        self.dest_name = dest_name
        self.dest_label = dest_name  # the project-relative DEST, or the absolute path
        self.config = config
        self.hosts = hosts
        self.progress = progress
        self.expected = expected
        # Loaded with the first download: no other command needs retries or host health.
        from ._retry import RetryBudget, RetryPolicy

        self.policy: RetryPolicy = RetryPolicy(
            base=config.retry_base,
            cap=config.retry_cap,
            retry_after_max=config.retry_after_max,
            attempts=config.retry_attempts,
        )
        self.budget: RetryBudget = RetryBudget(self.policy)
        self.plan = _Plan(config.download_chunk)
        # How far ahead of the hasher a received block is still kept in memory for it.
        self._window = min(HASH_WINDOW_CHUNKS * config.download_chunk, HASH_WINDOW_MAX)
        self.last_error = ""
        self.fetched = 0
        self.by_host: dict[str, int] = {}
        self.current_host = sources[0].host
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._responses: set[requests.Response] = set()
        self.sha256 = ""
        self.xxh128 = ""
        self.repaired = 0
        self.resumed = 0
        self._allocated = False
        self._alloc_mutex = threading.Lock()
        # Writes to one file are serialised by the kernel's inode lock, and a thread waiting for
        # it spins on a CPU. Waiting here sleeps instead, leaving that CPU to the hasher.
        self._write_mutex = threading.Lock()

    # -- sessions and sockets
    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            import requests

            s = requests.Session()
            s.headers["User-Agent"] = "snapfs-download"
            s.headers["Accept-Encoding"] = "identity"  # byte offsets must be file offsets
            self._local.session = s
            with self.plan.cond:
                self._sessions.append(s)
        return s

    def _abort_all(self) -> None:
        """Unblock every worker stuck in a socket read (Ctrl-C, fatal error)."""
        import socket

        with self.plan.cond:
            live = list(self._responses)
        for resp in live:
            try:
                sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):
                pass

    # -- resume
    def load(self) -> None:
        meta = self.part.meta()
        want = {
            "sha256": self.expected.get("sha256") or "",
            "xxh128": self.expected.get("xxh128") or "",
        }
        stale = any(meta.get(k, v) != v for k, v in want.items() if v) or (
            self.expected.get("size") is not None
            and meta.get("size") not in (None, str(self.expected["size"]))
        )
        extents = [] if stale else self.part.extents()
        if stale:
            self.part.forget()
            meta = {}
        for s in self.sources:
            s.validator = meta.get("validator:" + s.url)
            if meta.get("noranges:" + s.url):
                s.ranges = False
        # Resume only bytes whose version can be told: from a source with a validator (If-Range
        # restarts cleanly if the file changed), or found on disk with a digest to check.
        checked = {s.url for s in self.sources if s.validator}
        digest = bool(want["sha256"] or want["xxh128"])
        unsure = [
            e for e in extents if e.source not in checked and not (e.source == LOCAL and digest)
        ]
        if unsure:
            for e in unsure:
                self.part.forget(e)
            extents = [e for e in extents if e not in unsure]
        size = int(meta["size"]) if "size" in meta else self.expected.get("size")
        # What this partial is, for whoever lists downloads in progress (snapfs ui, doctor).
        self.part.set_meta(**want, dest=self.dest_label, url=self.sources[0].url)
        with self.plan.cond:
            if size is not None:
                self.plan.set_size(size, extents)
                self.resumed = self.plan.have()

    def adopt_prefix(self) -> int:
        """Record the bytes of an incomplete file moved here from DEST as extents.

        They were checked against a sample from the server; the whole-file digest checks the
        rest, and if it fails, repair re-fetches these extents (source "local") first.
        """
        if self.plan.extents:
            return 0
        size = os.fstat(self.part.fd).st_size
        chunk = self.plan.chunk
        pos = 0
        while pos < size:
            n = min(chunk, size - pos)
            h = xxhash.xxh3_128()
            off = pos
            while off < pos + n:
                block = os.pread(self.part.fd, min(4 * READ, pos + n - off), off)
                if not block:
                    break
                h.update(block)
                off += len(block)
            if off == pos:
                break  # the file is shorter than fstat said: adopt what is there
            ext = _Extent(pos, off - pos, h.digest(), LOCAL)
            self.plan.extents[pos] = ext
            self.part.record(ext)
            pos = off
        with self.plan.cond:
            if self.plan.size is not None:
                self.plan.set_size(self.plan.size, list(self.plan.extents.values()))
        self.resumed = self.plan.have()
        return self.resumed

    def release_space(self) -> None:
        """The disk is full: give back the space reserved for bytes not fetched yet, so the
        caller can still record what happened (and roll back). Verified bytes stay."""
        with self.plan.cond:
            top = max((e.end for e in self.plan.extents.values()), default=0)
        try:
            if os.fstat(self.part.fd).st_size > top:
                os.ftruncate(self.part.fd, top)
        except OSError:
            pass  # best effort; the error being raised says what matters
        self._allocated = False

    # -- allocation: fail early on a full disk
    def _allocate(self, size: int) -> None:
        with self._alloc_mutex:  # workers learn the size together; reserve the space once
            self._allocate_locked(size)

    def _allocate_locked(self, size: int) -> None:
        if self._allocated:
            return
        try:
            st = os.fstatvfs(self.part.fd)
            # Blocks the partial file already holds are ours: they don't need free space.
            have = os.fstat(self.part.fd).st_blocks * 512
        except OSError as exc:
            raise from_oserror(exc, "Downloading", self.part.path) from exc
        free = st.f_bavail * st.f_frsize
        if size - have > free:
            raise DiskFull(
                f"Not enough space for {self.dest_name}: it needs {_human(size - have)} more,"
                f" and {_human(free)} is free.",
                hint="Free some space and run the command again; nothing was lost.",
            )
        try:
            os.ftruncate(self.part.fd, max(size, os.fstat(self.part.fd).st_size))
            try:
                os.posix_fallocate(self.part.fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # EOPNOTSUPP / EINVAL: the filesystem can't reserve; ENOSPC may come later
        except OSError as exc:
            raise from_oserror(exc, "Downloading", self.part.path) from exc
        self._allocated = True

    # -- the run
    def run(self) -> None:
        workers = [
            threading.Thread(target=self._worker, name=f"snapfs-dl-{i}", daemon=True)
            for i in range(self.config.download_connections)
        ]
        hasher = threading.Thread(target=self._hasher, name="snapfs-dl-hash", daemon=True)
        for t in workers:
            t.start()
        hasher.start()
        try:
            self._watch()
        except BaseException as exc:  # Ctrl-C included: stop the workers, keep the progress
            with self.plan.cond:
                self.plan.stopped = True
                self.plan.error = self.plan.error or exc
                self.plan.notify_all()
            self._abort_all()
            raise
        finally:
            with self.plan.cond:
                self.plan.stopped = True
                self.plan.notify_all()
            for t in [*workers, hasher]:
                t.join()
            for s in self._sessions:
                s.close()
        if self.plan.error is not None:
            raise self.plan.error

    def _watch(self) -> None:
        """Main thread: report progress until the file is complete or a worker failed."""
        samples: deque[tuple[float, int]] = deque(maxlen=20)
        while True:
            with self.plan.cond:
                self.plan.cond.wait(0.25)
                if self.plan.error is not None or self.plan.complete:
                    return
                done, total = self.plan.have(), self.plan.size
            now = time.monotonic()
            samples.append((now, done))
            t0, d0 = samples[0]
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
            eta = (total - done) / rate if total is not None and rate > 0 else None
            self._emit("downloading", done, total, rate, eta)

    def _emit(
        self,
        phase: str,
        done: int,
        total: int | None,
        rate: float = 0.0,
        eta: float | None = None,
        message: str = "",
    ) -> None:
        self.progress(
            DownloadProgress(
                phase, done, total, rate, eta, self.current_host, self.budget.total, message
            )
        )

    def _fail(self, exc: BaseException) -> None:
        with self.plan.cond:
            if self.plan.error is None:
                self.plan.error = exc
            self.plan.stopped = True
            self.plan.notify_all()
        self._abort_all()

    # -- workers
    def _take(self) -> tuple[int, int, int, bool] | None:
        """Wait for work: (generation, start, end, is_probe), or None when there is none left."""
        plan = self.plan
        with plan.cond:
            while True:
                if plan.stopped or plan.complete:
                    return None
                if plan.size is None:
                    if not plan.probing:
                        plan.probing = True
                        plan.inflight += 1
                        start = plan.prefix_end()  # an adopted prefix needs no re-fetching
                        return plan.generation, start, start + plan.chunk, True
                elif plan.todo and not plan.streaming:
                    if not self._ranges_seen() and plan.inflight > 0:
                        pass  # until one source has honoured Range, one request at a time
                    elif self._ranges_ignored():
                        # Every source answers with the whole file: one connection reads it
                        # front to back; more would each pay for the bytes before their range.
                        if plan.inflight == 0:
                            start, end = plan.todo.popleft()
                            plan.inflight += 1
                            return plan.generation, start, end, False
                    else:
                        start, end = plan.carve(self.config.download_connections)
                        plan.inflight += 1
                        return plan.generation, start, end, False
                plan.cond.wait(1.0)

    def _ranges_seen(self) -> bool:
        return any(s.ranges for s in self.sources if s.dead is None)

    def _ranges_ignored(self) -> bool:
        alive = [s for s in self.sources if s.dead is None]
        return bool(alive) and all(s.ranges is False for s in alive)

    def _pick(self) -> tuple[_Source, bool]:
        """The healthiest usable source, waiting out its backoff, and whether it is the best
        one (a stand-in while the best backs off gets short requests). Raises if none is left."""
        while True:
            now = time.monotonic()
            with self.plan.cond:
                if self.plan.stopped:
                    raise _Stop
                alive = [s for s in self.sources if s.dead is None]
                if not alive:
                    raise self._all_dead()
                # A source that ignores Range is a last resort while others honour it.
                ranged = [s for s in alive if s.ranges is not False]
                pool = ranged or alive
            # The order the user gave, except that a host caught serving corrupt bytes, or
            # whose breaker is open, goes last. A failure or two does not reorder sources:
            # backoff handles those, and the primary is usually the trusted one.
            rank = {"closed": 0, "half-open": 1, "open": 2}
            pool.sort(
                key=lambda s: (
                    self.hosts.health(s.host).corrupt > 0,
                    rank[self.hosts.state(s.host)],
                    self.sources.index(s),
                )
            )
            ready = [s for s in pool if s.not_before <= now]
            best = pool[0]
            if (
                ready
                and ready[0] is not best
                and best.streak < 2  # failing again and again (stalls): let the mirror help
                and best.not_before - now <= STANDIN_GRACE
            ):
                # The best source is back in a moment: a short wait beats moving the work to
                # a mirror that is slower or less trusted.
                ready = []
            for s in ready:
                if self.hosts.allows(s.host):
                    return s, s is pool[0]
            if ready and all(self.hosts.state(s.host) == "open" for s in pool):
                return ready[0], ready[0] is pool[0]  # backoff alone paces this source
            wait = min((s.not_before for s in pool), default=now) - now
            with self.plan.cond:
                self.plan.cond.wait(min(max(wait, 0.05), 1.0))

    def _all_dead(self) -> DownloadError:
        reasons = "; ".join(f"{s.host}: {s.dead}" for s in self.sources)
        kinds = {s.dead_error for s in self.sources}
        err = kinds.pop() if len(kinds) == 1 else SourceUnavailable
        return err(f"Can't download {self.dest_name}: {reasons}.", url=self.sources[0].url)

    def _worker(self) -> None:
        try:
            while True:
                job = self._take()
                if job is None:
                    return
                gen, start, end, probe = job
                got = start
                try:
                    src, best = self._pick()
                    if not best and end - start > self.plan.chunk:
                        # A stand-in source gets one chunk at a time, so the work returns to
                        # the best source as soon as its backoff ends.
                        with self.plan.cond:
                            if gen == self.plan.generation:
                                self.plan.put_back(start + self.plan.chunk, end)
                        end = start + self.plan.chunk
                    got = self._attempt(src, gen, start, end, probe)
                except _Stop:
                    pass
                finally:
                    with self.plan.cond:
                        self.plan.inflight -= 1
                        if probe:
                            self.plan.probing = False
                        if gen == self.plan.generation and self.plan.size is not None:
                            self.plan.put_back(got, min(end, self.plan.size))
                        self.plan.notify_all()
        except BaseException as exc:
            self._fail(exc)

    def _attempt(self, src: _Source, gen: int, start: int, end: int, probe: bool) -> int:
        """One request for [start, end). Returns how far verified bytes reached."""
        got = start
        self.current_host = src.host
        try:
            got = self._fetch(src, gen, start, end, probe)
        except _Transient as t:
            got = max(got, getattr(t, "got", start))
            self._transient(src, str(t), t.retry_after)
        except _Dead as d:
            got = max(got, getattr(d, "got", start))
            with self.plan.cond:
                src.dead = str(d)
                src.dead_error = d.error
                self.plan.notify_all()
            self.last_error = f"{src.host}: {d}"
        except _Retry as r:
            got = max(got, getattr(r, "got", start))
            self.hosts.settle(src.host)
        except _Changed as c:
            self.hosts.settle(src.host)
            self._restart(src, c)
            got = start
        except SnapfsError as exc:  # DiskFull from SQLite or the space check: already plain
            self._fail(exc)
        except OSError as exc:  # writing our own file failed: that is not the network's fault
            self._fail(from_oserror(exc, f"Writing {self.dest_name}", self.part.path))
        return got

    def _transient(self, src: _Source, why: str, retry_after: float | None) -> None:
        self.last_error = f"{src.host}: {why}"
        src.failures += 1
        src.streak += 1
        self.hosts.failure(src.host)
        with self.plan.cond:
            n = self.budget.fail()
            src.not_before = time.monotonic() + self.policy.wait_for(n, retry_after)
            exhausted = self.budget.exhausted
            self.plan.notify_all()
        if exhausted:
            self._fail(
                DownloadFailed(
                    f"Download of {self.dest_name} gave up after {self.budget.failures} failures"
                    f" in a row ({self.last_error}).",
                    url=src.url,
                    hint="Run the same command again to resume; verified bytes are kept.",
                )
            )

    def _restart(self, src: _Source, c: _Changed) -> None:
        """The file changed upstream: drop every extent and fetch the new version."""
        with self.plan.cond:
            self.plan.generation += 1
            self.plan.verified = self.plan.hash_at = 0
            self.plan.hashed = False
            self.plan.drop_blocks()
            for s in self.sources:
                s.validator = None
            src.validator = c.validator
            self.part.forget()
            if c.size is not None:
                self.plan.set_size(c.size)
            else:
                self.plan.size = None
                self.plan.extents.clear()
                self.plan.todo.clear()
            self._allocated = False
            self.plan.notify_all()
        meta: dict[str, str | int | None] = {"size": c.size}
        meta.update({"validator:" + s.url: s.validator for s in self.sources})
        self.part.set_meta(**meta)
        self.last_error = f"{src.host}: the file changed upstream; starting over"
        self._emit("downloading", 0, c.size, message="The file changed on the server; restarting.")

    def _request(self, src: _Source, start: int, end: int | None) -> requests.Response:
        import requests

        headers = {"Range": f"bytes={start}-" + (str(end - 1) if end is not None else "")}
        if src.validator:
            headers["If-Range"] = src.validator
        url = src.resolved or src.url
        try:
            resp = self.session().get(
                url,
                headers=headers,
                stream=True,
                timeout=(self.config.connect_timeout, self.config.read_timeout),
            )
        except requests.exceptions.InvalidURL as exc:
            raise _Dead(f"invalid URL ({exc})") from exc
        except requests.exceptions.TooManyRedirects as exc:
            raise _Dead("too many redirects") from exc
        except requests.exceptions.RequestException as exc:
            raise _Transient(_why(exc)) from exc
        if resp.history:
            with self.plan.cond:
                src.resolved = resp.url
        return resp

    def _fetch(self, src: _Source, gen: int, start: int, end: int, probe: bool) -> int:
        plan = self.plan
        resp = self._request(src, start, end)
        with plan.cond:
            self._responses.add(resp)
        try:
            status = resp.status_code
            if status in (401, 403, 410) and resp.url != src.url:
                # A signed URL from a redirect expired: get a fresh one from the original URL.
                # Decided on the URL this request went to: other connections may have moved on.
                with plan.cond:
                    if src.resolved == resp.url:
                        src.resolved = None
                        src.refreshes += 1  # once per expired URL, however many saw it
                    refreshes = src.refreshes
                if refreshes <= 3:
                    raise _Retry
                raise _Dead(f"access denied (HTTP {status}) even on a fresh redirect")
            if status in (404, 410):
                raise _Dead(f"not found (HTTP {status})")
            if status in (401, 403):
                raise _Dead(f"access denied (HTTP {status})")
            if status == 416:
                _a, _b, total = parse_content_range(resp.headers.get("Content-Range"))
                if total is not None and total != plan.size:
                    raise _Changed(total, _validator(resp))
                raise _Transient("HTTP 416 for a range inside the file")
            if status == 429 or status >= 500:
                from ._retry import parse_retry_after

                ra = parse_retry_after(resp.headers.get("Retry-After"))
                raise _Transient(f"HTTP {status}", ra)
            if status not in (200, 206):
                raise _Dead(f"unexpected HTTP {status}")
            return self._body(src, resp, gen, start, end, probe)
        finally:
            with plan.cond:
                self._responses.discard(resp)
            resp.close()

    def _body(
        self,
        src: _Source,
        resp: requests.Response,
        gen: int,
        start: int,
        end: int,
        probe: bool,
    ) -> int:
        plan = self.plan
        validator = _validator(resp)
        changed = bool(src.validator and validator and validator != src.validator)
        if resp.status_code == 206:
            a, b, total = parse_content_range(resp.headers.get("Content-Range"))
            if a != start or b is None or total is None:
                raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
            src.ranges = True
            full = False
        else:
            length = resp.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            full = True
        if changed and plan.size is not None:
            # If-Range: the validator no longer matches, so this is a different version.
            raise _Changed(total, validator)
        self._check_content(resp, total)
        with plan.cond:
            if gen != plan.generation:
                raise _Stop
            if plan.size is None and total is not None:
                plan.set_size(total, list(plan.extents.values()))
                if probe and plan.todo and plan.todo[0][0] == start:
                    # The probe's own range is being read right here.
                    _s0, e0 = plan.todo.popleft()
                    if e0 > end:
                        plan.todo.appendleft((end, e0))
                self.part.set_meta(size=total)
            elif plan.size is not None and total is not None and total != plan.size:
                raise _Dead(
                    f"serves a different file ({total} bytes, expected {plan.size})", BadContent
                )
            if src.validator is None and validator:
                src.validator = validator
                self.part.set_meta(**{"validator:" + src.url: validator})
            size = plan.size
            partial_wanted = full and size is not None and (start > 0 or end < size)
            if partial_wanted:
                if src.ranges is not False:
                    src.ranges = False
                    self.part.set_meta(**{"noranges:" + src.url: 1})
                if any(s.ranges is not False and s.dead is None for s in self.sources):
                    raise _Retry  # another source honours Range: use it
                if plan.streaming:
                    raise _Retry
                plan.streaming = True  # read this answer front to back, keeping what we lack
        if size is None:  # no length anywhere: read to EOF
            return self._read_into(src, resp.raw, gen, 0, None)
        self._allocate(size)
        if partial_wanted:
            try:
                return self._stream_all(src, resp.raw, gen, start, min(end, size))
            finally:
                with plan.cond:
                    plan.streaming = False
                    plan.notify_all()
        return self._read_into(src, resp.raw, gen, start, min(end, size))

    def _check_content(self, resp: requests.Response, total: int | None) -> None:
        why = _looks_like_page(resp.headers.get("Content-Type", ""), b"", self.dest_name)
        if why is not None:
            raise _Dead(f"sent {why} instead of the file", BadContent)
        want = self.expected.get("size")
        if want is not None and total is not None and total != want:
            raise _Dead(f"serves a file of {total} bytes, expected {want}", BadContent)

    def _read_into(self, src: _Source, raw: Any, gen: int, start: int, end: int | None) -> int:
        """Write the body at [start, end), hashing as it lands.

        An extent (start, length, digest, source) is recorded for every chunk that arrives, and
        for whatever arrived of the last one when the connection fails, so no received byte is
        ever fetched again.
        """
        fd = self.part.fd
        chunk = self.plan.chunk
        h = xxhash.xxh3_128()
        piece = pos = start
        began = window_t = time.monotonic()
        window_pos = pos
        min_speed, window = self.config.min_speed, self.config.min_speed_window
        # read1 returns whatever has arrived, so a slow source is measured as it trickles in
        # and a reset loses nothing received; read(n) waits for n bytes but costs far less CPU
        # per byte. Use read1 until the connection proves fast, and again if it slows down.
        # Whole-block reads go straight into one buffer where the body allows it.
        fast = False
        into = _body_file(raw)
        read1 = getattr(raw, "read1", raw.read)
        block = memoryview(bytearray(READ)) if into is not None else None
        data: bytes | memoryview
        plan = self.plan
        ahead_max = self._window
        try:
            while end is None or pos < end:
                want = min(READ, piece + chunk - pos)
                if end is not None:
                    want = min(want, end - pos)
                # A block near the hasher's position is handed to it, to digest from memory
                # (SHA-256 is the slowest step, and reading the block back would cost another
                # copy); one further ahead is only written, and read back when its turn comes.
                # Far ahead of a hasher that is busy anyway, a connection waits for it instead
                # of racing on: that bounds the blocks held, and leaves the CPU to the hasher.
                # The wait is not the source's fault: its speed is judged without it.
                if pos - plan.hash_at >= ahead_max and not plan.hash_idle:
                    waited = self._wait_for_hasher(gen, pos)
                    began += waited
                    window_t += waited
                feed = pos - plan.hash_at < ahead_max
                owner: bytearray | None = None
                t_read = time.monotonic()
                try:
                    if fast and block is not None:
                        buf = block
                        if feed:  # this block goes to the hasher: read it into a buffer of its own
                            owner = self._buffer()
                            buf = memoryview(owner)
                        data = buf[: into.readinto(buf[:want])]
                    else:
                        data = raw.read(want) if fast else read1(want)
                except Exception as exc:  # urllib3: ProtocolError, ReadTimeoutError, ...
                    raise _Transient(_why(exc)) from exc
                if not data:
                    if end is None:
                        break
                    raise _Transient(
                        f"connection closed after {pos - start} of {end - start} bytes"
                    )
                if pos == 0:
                    why = _looks_like_page("", bytes(data[:512]), self.dest_name)
                    if why is not None:
                        raise _Dead(f"sent {why} instead of the file", BadContent)
                n = len(data)
                if self.plan.stopped or gen != self.plan.generation:
                    self._count(src, n)
                    raise _Stop
                try:
                    with self._write_mutex:
                        _pwrite_all(fd, data, pos)
                except OSError:
                    self._count(src, n)
                    raise
                h.update(data)
                self._landed(src, n, gen, pos, data if feed else None, owner)
                pos += n
                if pos - piece >= chunk:
                    self._keep(src, gen, piece, pos, h)
                    piece, h = pos, xxhash.xxh3_128()
                now = time.monotonic()
                if fast:
                    fast = now - t_read < FAST_READ_SECONDS
                elif pos - start >= FAST_AFTER and (pos - start) / (now - began) > FAST_RATE:
                    fast = True
                if now - window_t >= window:
                    speed = (pos - window_pos) / (now - window_t)
                    if speed < min_speed:
                        raise _Transient(f"too slow ({_human(int(speed))}/s)")
                    window_t, window_pos = now, pos
        except (_Transient, _Dead, _Stop) as exc:
            self._keep(src, gen, piece, pos, h)
            exc.got = pos  # type: ignore[union-attr]
            raise
        except OSError:
            self._keep(src, gen, piece, pos, h)
            raise
        self._keep(src, gen, piece, pos, h)
        if end is None:
            with self.plan.cond:
                self.plan.set_size(pos, list(self.plan.extents.values()))
                self.plan.todo.clear()
            self.part.set_meta(size=pos)
        self.hosts.success(src.host)
        return pos

    def _stream_all(self, src: _Source, raw: Any, gen: int, start: int, end: int) -> int:
        """A Range-ignoring answer: read from byte 0, keeping only the ranges still missing.

        This worker takes every range still to do, and any that other workers hand back while
        it reads, as long as the stream hasn't passed them. Bytes we already have are read past.
        """
        plan = self.plan
        with plan.cond:
            pending = sorted([(start, end), *plan.todo])
            plan.todo.clear()
        pos = 0
        reached = start
        current: tuple[int, int] | None = None
        try:
            while pending:
                current = a, b = pending.pop(0)
                if a < pos:  # the stream is past it: another pass will fetch it
                    with plan.cond:
                        plan.put_back(a, b)
                    current = None
                    continue
                while pos < a:
                    skip = raw.read(min(READ, a - pos))
                    if not skip:
                        raise _Transient("connection closed")
                    self._count(src, len(skip))
                    pos += len(skip)
                pos = self._read_into(src, raw, gen, a, b)
                if a == start:
                    reached = pos
                current = None
                with plan.cond:
                    late = [r for r in plan.todo if r[0] >= pos]
                    for r in late:
                        plan.todo.remove(r)
                pending = sorted(pending + late)
        except (_Transient, _Dead, _Stop, OSError) as exc:
            got = getattr(exc, "got", current[0] if current else pos)
            with plan.cond:
                if gen == plan.generation:
                    if current is not None:
                        if current[0] == start:
                            reached = got
                        else:
                            plan.put_back(got, current[1])
                    for a, b in pending:
                        if a != start:
                            plan.put_back(a, b)
            exc.got = reached  # type: ignore[union-attr]
            raise
        return reached

    def _count(self, src: _Source, n: int) -> None:
        with self.plan.cond:
            self.fetched += n
            src.received += n
            self.by_host[src.host] = self.by_host.get(src.host, 0) + n

    def _buffer(self) -> bytearray:
        """A READ-sized buffer for a block the hasher will digest from memory."""
        try:
            return self.plan.pool.pop()  # list.pop and append are atomic: no lock needed
        except IndexError:
            return bytearray(READ)  # at most about window / READ of them, reused after that

    def _landed(
        self,
        src: _Source,
        n: int,
        gen: int,
        pos: int,
        data: bytes | memoryview | None,
        owner: bytearray | None,
    ) -> None:
        """Count ``n`` bytes received, and hand the hasher ``data`` (just written at ``pos``)
        to digest from memory, in one go: this runs for every block.

        Always before the extent holding the block is recorded: the hasher reads an extent back
        from disk only once it is recorded, so a block it finds neither in memory nor in a
        recorded extent is still on its way.
        """
        plan = self.plan
        with plan.cond:
            self.fetched += n
            src.received += n
            self.by_host[src.host] = self.by_host.get(src.host, 0) + n
            if data is None or gen != plan.generation or plan.stopped or pos < plan.hash_at:
                return
            plan.blocks[pos] = (data, owner)
            if plan.hash_idle and pos == plan.hash_at:
                plan.fed.notify()

    def _wait_for_hasher(self, gen: int, pos: int) -> float:
        """Wait while ``pos`` is a window or more ahead of a busy hasher; the seconds waited."""
        plan = self.plan
        t0 = time.monotonic()
        with plan.cond:
            while (
                pos - plan.hash_at >= self._window
                and not plan.hash_idle
                and not plan.stopped
                and gen == plan.generation
            ):
                plan.room.wait(0.5)
        return time.monotonic() - t0

    def _keep(self, src: _Source, gen: int, start: int, pos: int, h: Any) -> None:
        if pos <= start:
            return
        ext = _Extent(start, pos - start, h.digest(), src.url)
        with self.plan.cond:
            if gen != self.plan.generation:
                return
            self.plan.extents[start] = ext
            self.budget.progress()
            src.refreshes = 0
            src.streak = 0
            self.part.record(ext)
            crash_point("download.extent_recorded")
            self.plan.notify_all()
        # Spread the write-out over the download, so the fdatasync before the rename has
        # little left to wait for. Not verified yet: if these bytes are wrong they will be
        # written again, and only the fdatasync at the end is a promise.
        start_writeback(self.part.fd, ext.start, ext.length)

    # -- the hasher: digest the file front to back, from memory or from disk
    def _hasher(self) -> None:
        """Feed the whole-file SHA-256 and XXH3-128 in order, and verify every extent.

        A block received by this process reaches the digests straight from its receive buffer
        (see ``_read_into``): the bytes hashed are the bytes written, and the extent they form
        is verified by that. Anything else is read back from disk as a whole recorded extent
        and checked against its recorded digest: extents inherited from an earlier process (a
        power cut may have lost bytes behind their record) or adopted from DEST, and blocks
        that arrived too far ahead of the hasher to be kept in memory. An extent that fails
        goes back to be fetched again.
        """
        try:
            while self._hash_pass():
                pass
        except BaseException as exc:
            self._fail(exc)

    def _hash_pass(self) -> bool:
        """One pass over the file; True to start over (the digests took bytes that are bad)."""
        plan = self.plan
        with plan.cond:
            gen = plan.generation
            plan.hash_at = plan.verified = 0
        sha, whole = _sha256(), xxhash.xxh3_128()
        at = 0  # bytes [0, at) are in the digests
        checked = 0  # the recorded extents in [0, checked) are in the digests
        done: list[bytearray | None] = []  # the pool buffers of blocks digested
        step = max(self._window // 4, 1)
        woke_at = 0  # where paused workers were last woken: every step, not every block
        while True:
            blocks: list[bytes | memoryview] = []
            ext = None
            with plan.cond:
                plan.pool.extend(b for b in done if b is not None)
                done.clear()
                plan.hash_at = at
                if at - woke_at >= step:
                    plan.room.notify_all()
                    woke_at = at
                while True:
                    if plan.stopped:
                        return False
                    if gen != plan.generation:
                        return True
                    # Extents whose every byte went in from memory are verified by that.
                    ext = plan.extents.get(checked)
                    while ext is not None and ext.end <= at:
                        checked = ext.end
                        ext = plan.extents.get(checked)
                    plan.verified = checked
                    if plan.size is not None and checked >= plan.size:
                        self.sha256, self.xxh128 = sha.hexdigest(), whole.hexdigest()
                        plan.hashed = True
                        plan.drop_blocks()
                        plan.notify_all()
                        return False
                    # Every block already there that follows on, with one taking of the lock.
                    nxt = at
                    while (block := plan.blocks.pop(nxt, None)) is not None:
                        blocks.append(block[0])
                        done.append(block[1])
                        nxt += len(block[0])
                    if blocks or ext is not None:
                        break
                    plan.hash_idle = True
                    plan.room.notify_all()  # nothing to digest: no worker need wait for us
                    woke_at = at
                    plan.fed.wait(1.0)
                    plan.hash_idle = False
            if blocks:
                for data in blocks:
                    sha.update(data)
                    whole.update(data)
                    at += len(data)
                continue
            # Recorded, and not (or not wholly) in memory: read it back. If part of it went in
            # from memory already, the rest is fed, but the whole extent is checked.
            assert ext is not None
            fed_from_memory = at > ext.start
            undo = None if fed_from_memory else (sha.copy(), whole.copy())
            if self._check_extent(ext, (sha, whole), skip=at - ext.start):
                start_writeback(self.part.fd, ext.start, ext.length)
                at = checked = ext.end
                with plan.cond:
                    plan.drop_blocks(below=at)  # blocks inside it, now read back
                continue
            with plan.cond:
                if plan.extents.get(ext.start) == ext and gen == plan.generation:
                    del plan.extents[ext.start]
                    self.part.forget(ext)
                    plan.put_back(ext.start, ext.end)
            if undo is None:
                # Digests already took bytes from memory that the disk no longer holds: start
                # the pass over, reading everything back.
                with plan.cond:
                    plan.drop_blocks()
                return True
            sha, whole = undo  # as before the bad extent, which is fetched again

    def _check_extent(self, ext: _Extent, feed: tuple[Any, ...], skip: int = 0) -> bool:
        """Re-read an extent from disk; True if it still matches its recorded digest.

        Every byte is fed to ``feed`` but the first ``skip``."""
        h = xxhash.xxh3_128()
        pos, end = ext.start, ext.end
        first = ext.start + skip
        buf = getattr(self._local, "check_buf", None)
        if buf is None:  # one buffer per thread, reused: a fresh 4 MiB per read costs more
            buf = self._local.check_buf = memoryview(bytearray(4 * READ))
        while pos < end:
            block = buf[: os.preadv(self.part.fd, [buf[: min(len(buf), end - pos)]], pos)]
            if not block:
                return False
            h.update(block)
            if pos + len(block) > first:
                part = block[first - pos :] if pos < first else block
                for f in feed:
                    f.update(part)
            pos += len(block)
        return h.digest() == ext.xxh

    # -- the final check and repair
    def matches(self) -> bool:
        e = self.expected
        size = self.plan.size
        return (
            (e.get("size") is None or e["size"] == size)
            and (not e.get("sha256") or e["sha256"] == self.sha256)
            and (not e.get("xxh128") or e["xxh128"] == self.xxh128)
        )

    def repair(self) -> None:
        """The file is complete but its digest is wrong: find the source that lied.

        For each source that served extents (the suspected first: demoted hosts, then the one
        that served least, as it is cheapest to check), fetch its extents again from another
        source, swap in those that differ, and keep the swap only if the file then verifies.
        """
        extents = sorted(self.plan.extents.values(), key=lambda e: e.start)
        by_source: dict[str, list[_Extent]] = {}
        for ext in extents:
            by_source.setdefault(ext.source, []).append(ext)
        primary = self.sources[0].url
        suspects = sorted(
            by_source,
            key=lambda u: (
                -self.hosts.health(_host(u)).corrupt,  # caught lying before
                u != LOCAL,  # bytes found on disk, not fetched
                u == primary,  # the URL the user named is trusted over mirrors
                sum(e.length for e in by_source[u]),  # then the cheapest to check
            ),
        )
        for url in suspects:
            others = [
                s for s in self.sources if s.url != url and s.dead is None and s.ranges is not False
            ]
            if not others:
                continue
            self._emit(
                "repairing",
                self.plan.size or 0,
                self.plan.size,
                message=f"Checking the bytes {_host(url)} sent against another source.",
            )
            swaps = self._refetch(by_source[url], others)
            if not swaps:
                continue
            if self._verify_with(swaps):
                for ext, data, source in swaps:
                    os.pwrite(self.part.fd, data, ext.start)
                    fixed = _Extent(ext.start, ext.length, xxhash.xxh3_128_digest(data), source)
                    self.plan.extents[ext.start] = fixed
                    self.part.record(fixed)
                    self.repaired += ext.length
                if url != LOCAL:
                    self.hosts.demote(_host(url))
                return
        raise self._mismatch()

    def _refetch(
        self, exts: list[_Extent], others: list[_Source]
    ) -> list[tuple[_Extent, bytes, str]]:
        swaps = []
        for ext in exts:
            data: bytes | None = None
            src = others[0]
            for src in others:
                data = self._fetch_bytes(src, ext.start, ext.end)
                if data is not None:
                    break
            if data is None:
                continue  # nobody could serve it: leave this extent as it is
            if xxhash.xxh3_128_digest(data) != ext.xxh:
                swaps.append((ext, data, src.url))
        return swaps

    def _fetch_bytes(self, src: _Source, start: int, end: int) -> bytes | None:
        """[start, end) from ``src`` into memory, with a few retries; None if it can't."""
        import requests

        for attempt in range(1, 4):
            try:
                resp = self._request(src, start, end)
                try:
                    if resp.status_code != 206:
                        if resp.status_code in (401, 403) and src.resolved:
                            src.resolved = None
                            continue
                        return None
                    a, _b, _t = parse_content_range(resp.headers.get("Content-Range"))
                    if a != start:
                        return None
                    data = resp.raw.read(end - start)
                    self._count(src, len(data))
                    if len(data) == end - start:
                        return bytes(data)
                finally:
                    resp.close()
            except (_Transient, _Dead, requests.exceptions.RequestException, OSError):
                pass
            except Exception:  # urllib3 errors during read
                pass
            time.sleep(self.policy.delay(attempt))
        return None

    def _verify_with(self, swaps: list[tuple[_Extent, bytes, str]]) -> bool:
        sub = {ext.start: data for ext, data, _s in swaps}
        sha, whole = _sha256(), xxhash.xxh3_128()
        for ext in sorted(self.plan.extents.values(), key=lambda e: e.start):
            data = sub.get(ext.start)
            if data is not None:
                sha.update(data)
                whole.update(data)
            else:
                self._check_extent(ext, (sha, whole))
        e = self.expected
        ok = (not e.get("sha256") or e["sha256"] == sha.hexdigest()) and (
            not e.get("xxh128") or e["xxh128"] == whole.hexdigest()
        )
        if ok:
            self.sha256, self.xxh128 = sha.hexdigest(), whole.hexdigest()
        return ok

    def _mismatch(self) -> HashMismatch:
        e = self.expected
        if e.get("size") is not None and e["size"] != self.plan.size:
            what = f"is {self.plan.size} bytes, expected {e['size']}"
        elif e.get("sha256") and e["sha256"] != self.sha256:
            what = f"has SHA-256 {self.sha256}, expected {e['sha256']}"
        else:
            what = f"has XXH128 {self.xxh128}, expected {e['xxh128']}"
        hosts = ", ".join(sorted({_host(x.source) for x in self.plan.extents.values()}))
        return HashMismatch(
            f"The download of {self.dest_name} from {hosts} {what}, and no other source could"
            " repair it.",
            url=self.sources[0].url,
            hint="If the expected digest is right, add a --mirror; the partial file is kept.",
        )


class _Stop(Exception):
    """The download is stopping (error elsewhere, Ctrl-C, restart): leave quietly."""


def _pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    """Write all of ``data`` at ``pos``. A write may take fewer bytes than given (the disk
    filling up): the rest is written again, and that write raises the error."""
    n = os.pwrite(fd, data, pos)
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            k = os.pwrite(fd, view, pos + n)
            if k == 0:  # no progress and no error: don't spin
                raise OSError(errno.EIO, "the disk took no bytes")
            view, n = view[k:], n + k


def _body_file(raw: Any) -> Any:
    """The http.client response under urllib3's, to ``readinto`` a reused buffer; or None.

    urllib3's ``read`` returns a new bytes object per call, and on a fast link that costs
    about as much as the rest of the download together. Only for bodies read undecoded (we
    ask for the identity encoding), where both give the same bytes.
    """
    fp = getattr(raw, "_fp", None)
    if getattr(raw, "decode_content", True) or not callable(getattr(fp, "readinto", None)):
        return None
    return fp


def _why(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Read timed out", "Connection reset", "Connection refused", "IncompleteRead"):
        if marker in text:
            return marker.lower()
    name = type(exc).__name__
    return f"{name}: {text[:120]}" if text else name


def _human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# ---- the public entry point -----------------------------------------------------------------
def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] = (),
    sha256: str | None = None,
    xxh128: str | None = None,
    size: int | None = None,
    project: Project | str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> DownloadResult:
    """Download ``url`` to ``dest``: resumable, verified, from ``url`` or any of ``mirrors``.

    With ``project`` (a :class:`Project` or a path inside one), ``dest`` is project-relative,
    the partial download lives in ``.snapfs/downloads/``, and the finished file is stored as
    an object, so snapshots and other projects on the store share it. If the store already
    holds the expected content, it is linked into place without any network traffic.
    """
    from ._project import Project
    from ._project import open as open_project

    urls = [_check_url(u) for u in (url, *mirrors)]
    urls = list(dict.fromkeys(urls))  # the same mirror twice is one source
    expected: dict[str, Any] = {
        "sha256": _check_hex(sha256, 64, "sha256"),
        "xxh128": _check_hex(xxh128, 32, "xxh128"),
        "size": size,
    }
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise UsageError(f"--size must be a byte count, got {size!r}.")
    report = progress or _no_progress
    if project is None:
        config = _plain_config(env, overrides)
        return _download_plain(urls, Path(dest), expected, config, report)
    owned = not isinstance(project, Project)
    if isinstance(project, Project):
        proj = project
        if overrides:  # this call's settings, on top of the project's own
            proj_config = with_overrides(proj.config, overrides)
        else:
            proj_config = proj.config
    else:
        proj = open_project(project, env=env, **overrides)
        proj_config = proj.config
    try:
        return _download_into(proj, urls, dest, expected, report, proj_config)
    finally:
        if owned:
            proj.close()


def _plain_config(env: dict[str, str] | None, overrides: dict[str, Any]) -> Config:
    from ._config import load_config

    return load_config(None, env, overrides)


def _hosts_for(config: Config) -> HostBook:
    from ._hosts import HostBook

    state = config.state_dir or Path.home() / ".local" / "state" / "snapfs"
    return HostBook(
        state / "hosts.db",
        threshold=config.breaker_threshold,
        cooldown=config.breaker_cooldown,
    )


def _hash_file(path: Path) -> tuple[str, str, int]:
    sha, whole, n = _sha256(), xxhash.xxh3_128(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(4 * READ):
            sha.update(block)
            whole.update(block)
            n += len(block)
    return sha.hexdigest(), whole.hexdigest(), n


def _matches(expected: dict[str, Any], sha: str, xxh: str, n: int) -> bool:
    return (
        (expected["size"] is None or expected["size"] == n)
        and (not expected["sha256"] or expected["sha256"] == sha)
        and (not expected["xxh128"] or expected["xxh128"] == xxh)
    )


def _already_there(path: Path, expected: dict[str, Any]) -> tuple[str, str, int] | None:
    """DEST already holds the expected content (only provable with a digest)."""
    if not (expected["sha256"] or expected["xxh128"]):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    if expected["size"] is not None and st.st_size != expected["size"]:
        return None
    got = _hash_file(path)
    return got if _matches(expected, *got) else None


def _unused(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``...: a quarantine never replaces an earlier one."""
    n = 0
    candidate = path
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _incomplete_at_dest(
    dir_fd: int,
    name: bytes,
    part_path: Path,
    urls: list[str],
    expected: dict[str, Any],
    config: Config,
    quarantine: Path,
    report: ProgressFn,
) -> bool:
    """An incomplete file at DEST (``name`` in ``dir_fd``; an earlier tool crashed): adopt it
    if it is a prefix of the file, else move it to ``quarantine``. True if it was adopted as the
    partial file.

    Only with an expected digest (the finished file is checked as a whole) and no partial of
    our own. Its last MiB is compared with the same range from the first source.
    """
    if not (expected["sha256"] or expected["xxh128"]) or os.path.lexists(part_path):
        return False
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False  # absent, a symlink, unreadable: nothing to adopt
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False
        if st.st_nlink > 1:
            return False  # other names share this inode (a snapshot's object?): never write it
        if expected["size"] is not None and st.st_size >= expected["size"]:
            return False  # full length but wrong (checked by the caller): not a prefix
        n = min(SAMPLE, st.st_size)
        mine = os.pread(fd, n, st.st_size - n)
    finally:
        os.close(fd)
    theirs = _sample(urls[0], st.st_size - n, st.st_size, config)
    shown = os.fsdecode(name)
    if theirs is not None and theirs == mine:
        os.rename(name, part_path, src_dir_fd=dir_fd)
        report(
            DownloadProgress(
                "checking",
                st.st_size,
                expected["size"],
                0.0,
                None,
                "",
                0,
                f"Resuming the incomplete {shown} found in place ({_human(st.st_size)}).",
            )
        )
        return True
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    quarantine = _unused(quarantine)
    os.rename(name, quarantine, src_dir_fd=dir_fd)
    why = "doesn't match the source" if theirs is not None else "couldn't be checked"
    report(
        DownloadProgress(
            "checking",
            0,
            expected["size"],
            0.0,
            None,
            "",
            0,
            f"An incomplete {shown} was in place but {why}; moved it to {quarantine}.",
        )
    )
    return False


def _sample(url: str, start: int, end: int, config: Config) -> bytes | None:
    """Bytes [start, end) of ``url`` in one plain request, or None if that didn't work."""
    import requests

    try:
        with requests.get(
            url,
            headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
            timeout=(config.connect_timeout, config.read_timeout),
            stream=True,
        ) as resp:
            a, _b, _t = parse_content_range(resp.headers.get("Content-Range"))
            if resp.status_code != 206 or a != start:
                return None
            data = resp.raw.read(end - start)
            return bytes(data) if len(data) == end - start else None
    except Exception:  # any failure means "can't tell", which quarantines
        return None


def _drop_stale_record(part_path: Path) -> None:
    """An extent record without its data file: the run that owned it placed the file (or it
    was removed) and was killed before tidying up. Nothing to resume from it."""
    if os.path.lexists(str(part_path) + ".db") and not os.path.lexists(part_path):
        _remove_partial(part_path, data=False)


def _remove_partial(part_path: Path, *, data: bool) -> None:
    """Delete a partial download's extent record (SQLite and its WAL files), and its data."""
    for suffix in ([""] if data else []) + [".db", ".db-wal", ".db-shm"]:
        try:
            os.unlink(str(part_path) + suffix)
        except FileNotFoundError:
            pass


def _remove_idle_partial(part_path: Path) -> None:
    """``_remove_partial`` under the partial's lock, taken without waiting: a partial another
    process is downloading into is left to it."""
    try:
        fd = os.open(part_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        _remove_partial(part_path, data=False)  # a record without data is nobody's
        return
    except OSError:
        return  # a symlink, or unreadable: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        if os.lstat(part_path).st_ino == os.fstat(fd).st_ino:
            _remove_partial(part_path, data=True)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _finished_at(path: Path, ino: int) -> DownloadResult | None:
    """Another process finished this download: its partial (inode ``ino``) is at ``path``."""
    try:
        if os.lstat(path).st_ino != ino:
            return None
    except OSError:
        return None
    return _reused(path, _hash_file(path))


def _reused(path: Path, digests: tuple[str, str, int]) -> DownloadResult:
    sha, xxh, n = digests
    return DownloadResult(path, n, sha, xxh, 0, 0, True, 0, 0, {})


def _run(
    urls: list[str],
    part_path: Path,
    dest_name: str,
    expected: dict[str, Any],
    config: Config,
    report: ProgressFn,
    finish: Callable[[_Download], Path],
    finished_elsewhere: Callable[[int], DownloadResult | None],
    adopt: bool = False,
    dest_label: str = "",
) -> DownloadResult:
    def on_wait(msg: str) -> None:
        report(DownloadProgress("waiting", 0, expected["size"], 0.0, None, "", 0, msg))

    try:
        part = _Partial(part_path, on_wait)
    except _Finished as f:
        done = finished_elsewhere(f.ino)
        if done is not None:
            return done
        part = _Partial(part_path, on_wait)  # the other process gave up: carry on ourselves
    hosts = _hosts_for(config)
    try:
        job = _Download(
            [_Source(u) for u in urls], part, dest_name, config, hosts, report, expected
        )
        job.dest_label = dest_label or dest_name
        try:
            job.load()
            if adopt:
                job.adopt_prefix()
        except sqlite3.Error as exc:
            raise from_sqlite(exc, part.db_path) from exc
        report(DownloadProgress("checking", job.resumed, job.plan.size, 0.0, None, "", 0))
        if job.plan.size is not None:
            job._allocate(job.plan.size)  # a disk too small fails before any request
        try:
            job.run()
        except DiskFull:
            job.release_space()
            raise
        if not job.matches():
            job.repair()
        size = job.plan.size or 0
        job._emit("verifying", size, size)
        try:
            os.fdatasync(part.fd)  # the bytes must be on disk before the name points at them
        except OSError as exc:
            raise from_oserror(exc, "Saving the download", part_path) from exc
        crash_point("download.verified")
        path = finish(job)
        crash_point("download.placed")
        part.drop_record()
        job._emit("done", size, size)
        return DownloadResult(
            path,
            size,
            job.sha256,
            job.xxh128,
            job.fetched,
            job.resumed,
            False,
            job.budget.total,
            job.repaired,
            dict(job.by_host),
        )
    finally:
        part.close()
        hosts.close()


def _download_plain(
    urls: list[str], dest: Path, expected: dict[str, Any], config: Config, report: ProgressFn
) -> DownloadResult:
    dest = Path(os.path.abspath(dest))
    if dest.is_dir() and not dest.is_symlink():
        dest = dest / name_from_url(urls[0])
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} is not a directory.")
    part_path = dest.with_name(dest.name + PART_SUFFIX)
    _drop_stale_record(part_path)
    have = _already_there(dest, expected)
    if have is not None:
        return _reused(dest, have)

    def finish(job: _Download) -> Path:
        try:
            os.rename(part_path, dest)  # replaces a symlink at DEST, never writes through it
            from ._fsops import fsync_dir

            fsync_dir(dest.parent)
        except OSError as exc:
            raise from_oserror(exc, "Saving the download", dest) from exc
        return dest

    def finished_elsewhere(ino: int) -> DownloadResult | None:
        return _finished_at(dest, ino)

    quarantine = dest.with_name(f"{dest.name}.snapfs-quarantine-{int(time.time())}")
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        adopt = _incomplete_at_dest(
            dfd, os.fsencode(dest.name), part_path, urls, expected, config, quarantine, report
        )
    finally:
        os.close(dfd)
    return _run(
        urls,
        part_path,
        dest.name,
        expected,
        config,
        report,
        finish,
        finished_elsewhere,
        adopt,
        str(dest),
    )


def _download_into(
    proj: Project,
    urls: list[str],
    dest: str | os.PathLike[str],
    expected: dict[str, Any],
    report: ProgressFn,
    config: Config,
) -> DownloadResult:
    from ._fsops import split_relpath

    raw = os.fsencode(dest)
    if raw.endswith(b"/"):
        raw += os.fsencode(name_from_url(urls[0]))
    relpath = raw[2:] if raw.startswith(b"./") else raw
    parts = split_relpath(relpath)  # UnsafePath for absolute paths, '..', NUL
    if parts[0] == b".snapfs":
        raise UnsafePath(f"Refusing {os.fsdecode(relpath)!r}: .snapfs belongs to snapfs.")
    # The partial lives in .snapfs/downloads, keyed by DEST, so the same command finds it again.
    key = xxhash.xxh3_64_hexdigest(relpath)
    part_path = proj.state_dir / "downloads" / f"{key}{PART_SUFFIX}"
    name = os.fsdecode(parts[-1])
    target = proj.root / os.fsdecode(relpath)
    # Already have it: the store holds the expected content (from any project sharing it).
    oid: bytes | None = None
    if expected["xxh128"]:
        oid = bytes.fromhex(expected["xxh128"])
        if oid not in proj.store:
            oid = None
    elif expected["sha256"]:
        oid = proj.store.find_digest("sha256", expected["sha256"])
    if oid is not None:
        size = proj.store.object_size(oid)
        if expected["size"] is None or expected["size"] == size:
            path = proj.place(relpath, oid)
            sha = expected["sha256"] or proj.store.digest_of(oid, "sha256") or ""
            # A partial of this DEST is moot now (a run killed after storing the object),
            # unless a live run holds it: that one will find the object in place when done.
            _remove_idle_partial(part_path)
            report(DownloadProgress("done", size, size, 0.0, None, "", 0, "Already in the store."))
            return DownloadResult(path, size, sha, oid.hex(), 0, 0, True, 0, 0, {})
    _drop_stale_record(part_path)
    have = _already_there(target, expected)
    if have is not None:  # DEST holds the expected bytes: store them, fetch nothing
        path = proj.place(relpath, bytes.fromhex(have[1]), src=target, digests={"sha256": have[0]})
        return _reused(path, have)
    part_path.parent.mkdir(exist_ok=True)

    def finish(job: _Download) -> Path:
        digests = {"sha256": job.sha256}
        return proj.place(relpath, bytes.fromhex(job.xxh128), src=part_path, digests=digests)

    def finished_elsewhere(ino: int) -> DownloadResult | None:
        return _finished_at(target, ino)

    quarantine = proj.state_dir / "quarantine" / f"{key}-{int(time.time())}-{name}"
    adopt = False
    root_fd = os.open(proj.root, DIR_FLAGS)
    try:
        with open_parent(root_fd, relpath) as (dfd, dname):  # O_NOFOLLOW all the way down
            adopt = _incomplete_at_dest(
                dfd, dname, part_path, urls, expected, config, quarantine, report
            )
    except (UnsafePath, FileNotFoundError, NotADirectoryError):
        pass  # nothing usable at DEST; placing the file later refuses unsafe paths
    finally:
        os.close(root_fd)
    return _run(
        urls,
        part_path,
        name,
        expected,
        config,
        report,
        finish,
        finished_elsewhere,
        adopt,
        os.fsdecode(relpath),
    )
