"""How a download's whole-file digests are made: from memory, or read back and checked.

A block received by this process goes into the SHA-256 and XXH3-128 straight from its receive
buffer, when it lands near the hasher's position. Everything else is read back from disk as a
whole recorded extent and checked against its digest: extents inherited from an earlier process
(a kill -9, a power cut), and blocks that arrived too far ahead of the hasher to be kept.

These tests make blocks arrive out of order on purpose: the first response stalls right after
its first bytes, so the hasher waits at the front while the other connections fetch the rest,
more than a window (8 chunks here) ahead of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

import snapfs
from snapfs import _download
from tests.faultserver import FaultServer, Stall, Throttle
from tests.helpers import wait_for
from tests.integration.test_download import (
    CHUNK,
    CONNS,
    PART,
    Blob,
    cli_env,
    fast,
    leftovers,
    make_blob,
    part_of,
    recorded_extents,
    run,
    sha_of,
    snapfs_cmd,
)

MiB = 1 << 20
SIZE = 16 * MiB
STALL = 1.5  # seconds the first response stops after its first bytes
STALL_AT = 64 * 1024


@pytest.fixture(scope="module")
def blob() -> Blob:
    return make_blob(SIZE)


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


def _settings(tmp_path: Path) -> dict[str, Any]:
    # read_timeout above the stall: a pause is not a failure, so nothing is fetched twice.
    return fast(tmp_path, read_timeout=STALL + 3)


def _window() -> int:
    return min(_download.HASH_WINDOW_CHUNKS * CHUNK, _download.HASH_WINDOW_MAX)


class _ReadBack:
    """Spy on the extents the hasher reads back from disk: (start, length, matched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[int, int, bool]] = []
        real = _download._Download._check_extent

        def spy(dl: Any, ext: Any, feed: Any, skip: int = 0) -> bool:
            ok = real(dl, ext, feed, skip)
            if threading.current_thread().name == "snapfs-dl-hash":
                self.seen.append((ext.start, ext.length, ok))
            return ok

        monkeypatch.setattr(_download._Download, "_check_extent", spy)

    @property
    def read_back(self) -> int:
        return sum(n for _s, n, ok in self.seen if ok)


def _extent_covers(db: Path, offset: int) -> bool:
    if not db.exists():
        return False
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        row = con.execute(
            "SELECT COUNT(*) FROM extents WHERE start <= ? AND start + length > ?",
            (offset, offset),
        ).fetchone()
        return bool(row[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return False
    finally:
        con.close()


def test_out_of_order_arrival_gives_the_right_digests(
    srv: FaultServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No expected digest is given: the digests reported are the ones computed, from blocks
    digested in memory and extents read back, and they must be those of the file."""
    spy = _ReadBack(monkeypatch)
    srv.add("/f", blob.data)
    srv.inject("/f", Stall(STALL, at=STALL_AT))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **_settings(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert r.sha256 == blob.sha256
    assert r.xxh128 == xxhash.xxh3_128_hexdigest(blob.data)
    assert srv.bytes_sent == blob.size  # the stall is not a failure: nothing fetched twice
    # Both ways were taken: what arrived more than a window ahead of the stalled front was
    # read back (checked, and it matched), the front itself came from memory.
    assert spy.read_back >= blob.size - _window() - 4 * CHUNK, spy.seen
    assert spy.read_back < blob.size - STALL_AT, spy.seen
    assert all(ok for _s, _n, ok in spy.seen), spy.seen
    assert leftovers(dest) == []


def test_an_extent_damaged_on_disk_before_it_is_read_back_is_fetched_again(
    srv: FaultServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that arrived far ahead of the hasher are digested from disk, so they are checked
    against their extent's digest first: damage there (here, written by the test while the
    front stalls) is caught, and only that extent is fetched again."""
    spy = _ReadBack(monkeypatch)
    srv.add("/f", blob.data)
    srv.inject("/f", Stall(STALL, at=STALL_AT))
    dest = tmp_path / "f"
    db = part_of(dest).with_name(part_of(dest).name + ".db")
    bad = SIZE - 2 * CHUNK + 12345  # far beyond the window while the front stalls
    assert bad > STALL_AT + _window()
    damaged = threading.Event()

    def damage() -> None:
        wait_for(lambda: _extent_covers(db, bad), "the extent holding the bad byte")
        fd = os.open(part_of(dest), os.O_WRONLY)
        try:
            os.pwrite(fd, bytes([blob.data[bad] ^ 0xFF]), bad)
        finally:
            os.close(fd)
        damaged.set()

    t = threading.Thread(target=damage)
    t.start()
    try:
        r = snapfs.download(srv.url("/f"), dest, **_settings(tmp_path))
    finally:
        t.join()
    assert damaged.is_set()
    assert sha_of(dest) == blob.sha256 and r.sha256 == blob.sha256
    assert [(s, ok) for s, n, ok in spy.seen if s <= bad < s + n and not ok], spy.seen
    # The damaged extent (at most a chunk) was fetched again, nothing else.
    assert blob.size < srv.bytes_sent <= blob.size + CHUNK
    assert r.repaired == 0  # caught before the whole-file check, not repaired after it


def test_a_short_write_is_completed_not_recorded_as_whole(
    srv: FaultServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.pwrite may take fewer bytes than given. A block digested from memory is never read
    back, so a short write left unnoticed would put a hole in a file whose digests are right."""
    real = os.pwrite
    short = [0]

    def half(fd: int, data: Any, pos: int) -> int:
        if len(data) > 1:
            short[0] += 1
            return real(fd, memoryview(data)[: len(data) // 2], pos)
        return real(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", half)
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    monkeypatch.setattr(os, "pwrite", real)
    assert short[0] > 0
    assert sha_of(dest) == blob.sha256 and r.sha256 == blob.sha256
    assert srv.bytes_sent == blob.size


def test_a_new_process_reads_back_and_checks_what_a_killed_one_left(
    srv: FaultServer, tmp_path: Path, blob: Blob
) -> None:
    """kill -9, damage a byte the killed run had recorded (as a power cut may lose bytes
    behind a record), resume in a new process: the inherited extents are read back and
    checked, the damaged one is fetched again, and nothing else is."""
    chunk = 512 * 1024
    rate = 2 * MiB  # per connection: ~2 s for the whole file over 4 connections
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(rate))
    dest = tmp_path / "f"
    env = cli_env(tmp_path, SNAPFS_DOWNLOAD_CHUNK=str(chunk))
    child = subprocess.Popen(
        snapfs_cmd("download", srv.url("/f"), "-o", str(dest)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = tmp_path / ("f" + PART + ".db")
    try:
        wait_for(lambda: recorded_extents(db) >= 4 or child.poll() is not None, "extents")
        assert child.poll() is None, "the download finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    con = sqlite3.connect(db)
    try:
        start, length = con.execute("SELECT start, length FROM extents ORDER BY start").fetchone()
        kept = con.execute("SELECT SUM(length) FROM extents").fetchone()[0]
    finally:
        con.close()
    bad = start + length // 2
    with open(part_of(dest), "r+b") as f:
        f.seek(bad)
        f.write(bytes([blob.data[bad] ^ 0xFF]))
    srv.clear_faults()
    wait_for(lambda: all(q.finished for q in srv.requests), "the killed run's responses")
    srv.reset_stats()

    r = run(snapfs_cmd("download", srv.url("/f"), "-o", str(dest), "--json"), env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert sha_of(dest) == blob.sha256 and got["sha256"] == blob.sha256
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == blob.sha256
    # What the killed run had not recorded, plus the damaged extent; the rest was kept.
    assert srv.bytes_sent <= blob.size - kept + length
    assert srv.bytes_sent >= length  # the damaged extent was fetched again
    assert got["resumed"] == kept
    assert leftovers(dest) == []


def test_blocks_held_for_the_hasher_stay_within_the_window(
    srv: FaultServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However far the connections run ahead, the blocks kept in memory for the hasher are
    bounded: about a window's worth, plus one per connection."""
    most = [0]
    real = _download._Download._landed

    def counting(dl: Any, *args: Any) -> None:
        real(dl, *args)
        with dl.plan.cond:
            held = sum(len(d) for d, _o in dl.plan.blocks.values())
        most[0] = max(most[0], held)

    monkeypatch.setattr(_download._Download, "_landed", counting)
    srv.add("/f", blob.data)
    srv.inject("/f", Stall(STALL, at=STALL_AT))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **_settings(tmp_path))
    assert r.sha256 == blob.sha256
    assert 0 < most[0] <= _window() + CONNS * _download.READ, most[0]
