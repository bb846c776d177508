"""snapfs.download against a real HTTP server on 127.0.0.1 that misbehaves on purpose.

Every test checks two things: what ends up at DEST (its SHA-256, or that nothing is there) and how
many body bytes the server sent, so a downloader that "works" by fetching everything twice fails.

Byte accounting, and why the bounds below are what they are
    ``srv.bytes_sent`` counts body bytes the server's kernel accepted for sending. A clean
    download costs exactly ``size``. Each broken connection may honestly cost more, in two ways:

    * the downloader reads the socket ``READ`` bytes at a time; when a read is interrupted (a
      reset, a timeout, a stall), urllib3 raises and the bytes that read had gathered are gone,
      so up to ``READ`` bytes per broken connection are fetched again;
    * bytes the server already pushed into the socket when the client hung up are counted but
      never read. FaultServer waits for the client's ACK before a deliberate reset, and a
      throttled response has at most a slice of ``rate / 20`` bytes in flight.

    The downloader records an extent per ``download_chunk``, so a kill -9 loses at most one
    chunk (plus the read in progress) per connection.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs._download import READ, SAMPLE
from snapfs._hosts import HostBook
from tests.faultserver import (
    Corrupt,
    DeadEndpoint,
    DeadKind,
    FaultServer,
    HtmlPage,
    IgnoreRange,
    JsonError,
    Reset,
    ResetEvery,
    SignedRedirect,
    Stall,
    Status,
    Throttle,
    Truncate,
    refused_url,
)
from tests.helpers import tree_state, wait_for

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 1 * MiB  # download_chunk in these tests: an extent is recorded per chunk
CONNS = 4  # download_connections (the default)
SIZE = 16 * MiB
PART = ".snapfs-part"


# ---- fixtures and helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def make_blob(size: int) -> Blob:
    data = os.urandom(size)
    return Blob(data, hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="module")
def blob() -> Blob:
    return make_blob(SIZE)


@pytest.fixture(scope="module")
def blob2() -> Blob:
    """Another version of the same file (for "changed upstream")."""
    return make_blob(SIZE)


class TimedServer(FaultServer):
    """FaultServer that also notes when each request arrived.

    Its RequestRecords carry no timestamp, so this hooks the (private) per-request decision,
    which runs as soon as the request line and headers are read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[int, tuple[float, float]] = {}  # seq -> (monotonic, wall)

    def _decide(self, ex: Any) -> Any:
        self.arrived[ex.seq] = (time.monotonic(), time.time())
        return super()._decide(ex)

    def timeline(self) -> list[tuple[float, float, Any]]:
        """(monotonic, wall, record) for every answered request, in arrival order."""
        return sorted((*self.arrived[r.seq], r) for r in self.requests)


def _serve() -> Iterator[TimedServer]:
    with TimedServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


@pytest.fixture
def srv() -> Iterator[TimedServer]:
    yield from _serve()


@pytest.fixture
def srv2() -> Iterator[TimedServer]:
    yield from _serve()


def fast(tmp_path: Path, **more: Any) -> dict[str, Any]:
    """Config overrides that keep faults cheap: short timeouts and backoff, small chunks."""
    base: dict[str, Any] = dict(
        download_chunk=CHUNK,
        download_connections=CONNS,
        retry_base=0.05,
        retry_cap=0.2,
        connect_timeout=1,
        read_timeout=1,
        min_speed=1024,
        min_speed_window=0.5,
        state_dir=tmp_path / "state",
    )
    base.update(more)
    return base


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + PART)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + PART))


def host_of(server: FaultServer | DeadEndpoint) -> str:
    return f"127.0.0.1:{server.port}"


def health(tmp_path: Path, host: str) -> Any:
    book = HostBook(tmp_path / "state" / "hosts.db")
    try:
        return book.health(host)
    finally:
        book.close()


def range_span(rec: Any) -> tuple[int, int]:
    """[start, end) that a request's ``Range: bytes=a-b`` asked for."""
    assert rec.range is not None and rec.range.startswith("bytes="), rec
    first, last = rec.range[len("bytes=") :].split("-")
    return int(first), int(last) + 1


def range_start(rec: Any) -> int:
    return range_span(rec)[0]


def file_bytes(server: FaultServer) -> int:
    """Body bytes of file content (200/206 answers), leaving out redirect and error texts."""
    return sum(q.body_bytes for q in server.requests if q.status in (200, 206))


class Abort(Exception):
    """Raised from a progress callback to stop a download part-way (as Ctrl-C would)."""


# ---- the happy path -------------------------------------------------------------------------


def test_clean_download(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/model.bin", blob.data)
    dest = tmp_path / "model.bin"
    r = snapfs.download(srv.url("/model.bin"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size  # no fault: not one byte twice
    assert r.path == dest and r.size == blob.size and r.sha256 == blob.sha256
    assert (r.fetched, r.resumed, r.reused, r.retries, r.repaired) == (blob.size, 0, False, 0, 0)
    assert r.sources == {host_of(srv): blob.size}
    assert leftovers(dest) == []
    # Ranged requests only, and they tile the file: no byte asked for twice.
    spans = sorted((range_start(q), range_start(q) + q.body_bytes) for q in srv.requests)
    assert all(q.status == 206 for q in srv.requests)
    assert spans[0][0] == 0 and spans[-1][1] == blob.size
    assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)), spans


def test_dest_appears_only_when_complete(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    # A pause (shorter than read_timeout) in the middle, so progress is reported mid-way.
    srv.inject("/f", Stall(0.6, at=blob.size // 2))
    dest = tmp_path / "f.bin"
    seen: list[tuple[str, int, bool, bool]] = []

    def progress(p: snapfs.DownloadProgress) -> None:
        seen.append((p.phase, p.done, dest.exists(), part_of(dest).exists()))

    snapfs.download(srv.url("/f"), dest, progress=progress, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size  # a pause is not a failure: nothing refetched
    during = [s for s in seen if s[0] in ("checking", "downloading")]
    assert any(0 < done < blob.size for _ph, done, _d, _p in during), seen
    for phase, done, dest_there, part_there in during:
        assert not dest_there, f"DEST existed during {phase} at {done} bytes"
        assert part_there, f"no partial file during {phase} at {done} bytes"
    assert seen[-1][0] == "done" and seen[-1][2], "DEST must exist when 'done' is reported"
    assert leftovers(dest) == []


def test_progress_events(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(8 * MiB))  # ~0.5 s, so there are several reports
    events: list[snapfs.DownloadProgress] = []
    dest = tmp_path / "f"
    snapfs.download(srv.url("/f"), dest, progress=events.append, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size
    assert all(isinstance(e, snapfs.DownloadProgress) for e in events)
    assert events[0].phase == "checking"
    assert events[-1].phase == "done"
    assert events[-1].done == events[-1].total == blob.size
    downloading = [e for e in events if e.phase == "downloading"]
    assert downloading, [e.phase for e in events]
    dones = [e.done for e in events]
    assert dones == sorted(dones), f"done went backwards: {dones}"
    assert all(e.total in (None, blob.size) for e in events)
    assert all(0 <= e.done <= blob.size and e.rate >= 0 for e in events)


# ---- broken connections ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Reset(at=SIZE // 2 + 12345),  # mid-file, in whichever request covers it
        Reset(after=CHUNK + 5000),  # in the very first response (the one that learns the size)
        Reset(at=SIZE - 1000),  # near the end
    ],
    ids=["mid-file", "first-response", "near-the-end"],
)
def test_reset(srv: TimedServer, tmp_path: Path, blob: Blob, fault: Reset) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", fault)
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    # One broken connection: bytes it delivered are kept, except the read in progress.
    assert srv.bytes_sent <= blob.size + READ
    assert r.retries >= 1
    broken = [q for q in srv.requests if "Reset" in q.faults]
    assert len(broken) == 1
    q = broken[0]
    a, b = range_span(q)
    cut = a + q.body_bytes
    # The broken range was asked for again from (about) where it broke, not from its start.
    again = [
        p for p in srv.requests if p.seq > q.seq and range_span(p)[0] < b and a < range_span(p)[1]
    ]
    assert again and all(range_span(p)[0] >= cut - READ for p in again), (q, again)


@pytest.mark.parametrize(
    ("connections", "attempts"),
    [(1, 2), (CONNS, 10)],
    ids=["one-connection", "parallel"],
)
def test_reset_every_few_megabytes(
    srv: TimedServer, tmp_path: Path, blob: Blob, connections: int, attempts: int
) -> None:
    """A flaky link: resets over and over. Each costs at most one read.

    On one connection, every reset follows at least two recorded chunks, so a retry budget
    of 2 failures in a row must never run out. (In parallel, a reset may hit each connection
    before any of them completes a chunk, so that claim holds only per connection.)
    """
    srv.add("/f", blob.data)
    srv.inject("/f", ResetEvery(3 * MiB + 777, times=4))
    dest = tmp_path / "f"
    cfg = fast(tmp_path, download_connections=connections, retry_attempts=attempts)
    r = snapfs.download(srv.url("/f"), dest, **cfg)
    assert sha_of(dest) == blob.sha256
    resets = sum("ResetEvery" in q.faults for q in srv.requests)
    assert resets == 4
    assert srv.bytes_sent <= blob.size + resets * READ
    assert r.retries >= resets


class _CountingBody:
    """Stands in for the http.client response the fast path reads into a buffer."""

    def __init__(self, fp: Any, calls: list[int]) -> None:
        self.fp, self.calls = fp, calls

    def readinto(self, b: Any) -> int:
        n = int(self.fp.readinto(b))
        self.calls.append(n)
        return n


def test_fast_reads_go_straight_into_a_buffer_and_survive_resets(
    srv: TimedServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long responses on a fast link switch to whole-block reads into one reused buffer (no
    new bytes object per read). Resets in that mode lose at most the block being read."""
    from snapfs import _download

    calls: list[int] = []
    real = _download._body_file

    def counting(raw: Any) -> Any:
        fp = real(raw)
        if fp is None:
            return None
        # read1 returns whatever has arrived, so where a response crosses FAST_AFTER, and how
        # much of it is left for fast reads before its reset, would depend on how far the
        # server ran ahead of this process. Whole blocks, as on a link that always keeps up.
        raw.read1 = lambda n=-1: raw.read(n)
        return _CountingBody(fp, calls)

    monkeypatch.setattr(_download, "_body_file", counting)
    # Whether a link counts as fast is timing; this test is about what the fast path does,
    # so every link counts as fast and no read is slow enough to switch back.
    monkeypatch.setattr(_download, "FAST_RATE", 0.0)
    monkeypatch.setattr(_download, "FAST_READ_SECONDS", float("inf"))
    srv.add("/f", blob.data)
    srv.inject("/f", ResetEvery(5 * MiB + 333, times=2))
    dest = tmp_path / "f"
    # One connection, chunks as large as the file: one long response per attempt.
    cfg = fast(tmp_path, download_connections=1, download_chunk=SIZE)
    r = snapfs.download(srv.url("/f"), dest, **cfg)
    assert sha_of(dest) == blob.sha256
    # Each response turns fast after 4 MiB; the first two are reset 1 MiB (and 333 bytes)
    # later, after one whole fast block each; the last one reads its final 2 MiB fast.
    assert sum(calls) >= 2 * MiB, "the fast path never ran"
    assert all(n <= READ for n in calls)
    assert r.retries >= 2
    assert srv.bytes_sent <= blob.size + 2 * READ


@pytest.mark.parametrize("rule", ["never proven fast", "every block slow"])
def test_fast_reads_only_while_the_link_stays_fast(
    srv: TimedServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch, rule: str
) -> None:
    """A link that never proves fast is read with read1 throughout. A whole-block read that
    turns out slow switches back to read1, so fast reads never run twice in a row."""
    from snapfs import _download

    calls: list[int] = []
    real = _download._body_file
    order: list[str] = []

    class Tracing(_CountingBody):
        def readinto(self, b: Any) -> int:
            order.append("fast")
            return super().readinto(b)

    def traced(raw: Any) -> Any:
        fp = real(raw)
        if fp is None:
            return None
        read1 = raw.read1

        def slow_read1(n: int = -1) -> bytes:
            order.append("read1")
            return bytes(read1(n))

        raw.read1 = slow_read1
        return Tracing(fp, calls)

    monkeypatch.setattr(_download, "_body_file", traced)
    if rule == "never proven fast":
        monkeypatch.setattr(_download, "FAST_RATE", float("inf"))
    else:
        monkeypatch.setattr(_download, "FAST_RATE", 0.0)
        monkeypatch.setattr(_download, "FAST_READ_SECONDS", 0.0)
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    cfg = fast(tmp_path, download_connections=1, download_chunk=SIZE)
    snapfs.download(srv.url("/f"), dest, **cfg)
    assert sha_of(dest) == blob.sha256
    if rule == "never proven fast":
        assert calls == [] and "read1" in order
    else:
        assert calls, "the link never counted as fast"
        assert ("fast", "fast") not in set(zip(order, order[1:], strict=False))


def test_body_file_only_for_undecoded_bodies() -> None:
    from snapfs._download import _body_file

    class Fp:
        def readinto(self, b: Any) -> int:
            return 0

    class Raw:
        def __init__(self, decode: bool, fp: Any) -> None:
            self.decode_content, self._fp = decode, fp

    fp = Fp()
    assert _body_file(Raw(False, fp)) is fp
    assert _body_file(Raw(True, fp)) is None  # urllib3 would decode: read through it
    assert _body_file(Raw(False, object())) is None  # no readinto
    assert _body_file(object()) is None  # not a urllib3 response at all


def test_truncated_body(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    """Content-Length promised, then a clean FIN: no error from the network, a short body."""
    srv.add("/f", blob.data)
    srv.inject("/f", Truncate(at=blob.size // 2 + 777))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent <= blob.size + READ
    assert r.retries >= 1
    assert any("Truncate" in q.faults for q in srv.requests)


def test_stall_is_caught_by_the_read_timeout(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    # Silent for far longer than read_timeout (1 s); the server is closed long before 30 s.
    srv.inject("/f", Stall(30, at=blob.size // 2 + 777))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent <= blob.size + READ
    assert r.retries >= 1


SLOW = 512 * KiB  # bytes/s: the throttled source
MIN_SPEED = 2 * MiB  # the downloader's floor
WINDOW = 0.25  # seconds


def _slow_primary(srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob) -> Any:
    """The first source is slow (but alive, so read_timeout never fires); the mirror is fast."""
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(SLOW))
    srv2.add("/f", blob.data)
    dest = tmp_path / "f"
    r = snapfs.download(
        srv.url("/f"),
        dest,
        mirrors=[srv2.url("/f")],
        **fast(tmp_path, min_speed=MIN_SPEED, min_speed_window=WINDOW, read_timeout=5),
    )
    assert sha_of(dest) == blob.sha256
    return r


def test_slow_source_is_dropped_by_the_min_speed_rule(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    r = _slow_primary(srv, srv2, tmp_path, blob)
    slow = srv.requests
    assert slow, "the first source was never tried"
    # Every response from the slow source was abandoned after at most one read (plus what
    # the throttle had in flight, a slice or two), although most asked for several MiB...
    assert all(q.body_bytes <= READ + 2 * (SLOW // 20) for q in slow), slow
    # ...the fast mirror did the work, and nothing it served was served twice.
    assert r.sources[host_of(srv2)] >= blob.size - srv.bytes_sent
    # Bytes the slow source delivered count; at most one read per abandoned response is lost.
    assert srv.bytes_sent + srv2.bytes_sent <= blob.size + len(slow) * (READ + SLOW // 20)
    assert r.retries >= 1


def test_min_speed_rule_acts_within_its_window(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    _slow_primary(srv, srv2, tmp_path, blob)
    first = srv.requests[0]
    # Judged after one window (plus one throttle slice of scheduling slack, twice over):
    # a slow response should carry no more than about rate * 2 windows.
    assert first.body_bytes <= SLOW * 2 * WINDOW + SLOW // 10, first.body_bytes


# ---- HTTP errors and Retry-After ------------------------------------------------------------


def _retry_gap(srv: TimedServer, code: int) -> tuple[float, float, float, float]:
    """(monotonic, wall) arrival of the error response, and of the first request after it."""
    line = srv.timeline()
    i = next(i for i, (_m, _w, q) in enumerate(line) if q.status == code)
    assert i + 1 < len(line), "no request after the error"
    return line[i][0], line[i][1], line[i + 1][0], line[i + 1][1]


@pytest.mark.parametrize("code", [500, 503, 429])
def test_retry_after_seconds_is_honoured(
    srv: TimedServer, tmp_path: Path, blob: Blob, code: int
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Status(code, retry_after=1))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size  # the error answer carried no file bytes
    assert r.retries == 1
    t_err, _w, t_next, _w2 = _retry_gap(srv, code)
    # The server noted the error's arrival before answering, and the client started its wait
    # after reading the answer: a retry on time cannot be sooner than 1 s after.
    assert t_next - t_err >= 1.0


@pytest.mark.parametrize("code", [503, 429])
def test_retry_after_http_date_is_honoured(
    srv: TimedServer, tmp_path: Path, blob: Blob, code: int
) -> None:
    srv.add("/f", blob.data)
    # A whole second (HTTP-dates have no fractions), 1 to 2 s from now.
    when = datetime.fromtimestamp(math.floor(time.time()) + 2, tz=timezone.utc)
    srv.inject("/f", Status(code, retry_after=when))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size
    assert r.retries == 1
    _m, _w, _m2, wall_next = _retry_gap(srv, code)
    # Compared on the wall clock, as the date is; 5 ms for the two clocks' different pace.
    assert wall_next >= when.timestamp() - 0.005


def test_retry_after_is_capped_by_retry_after_max(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Status(503, retry_after=30))  # a broken cap costs this test 30 s
    dest = tmp_path / "f"
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path, retry_after_max=0.5))
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size
    t_err, _w, t_next, _w2 = _retry_gap(srv, 503)
    assert t_next - t_err >= 0.5
    assert t_next - t_err < 30


def test_first_retry_without_retry_after_starts_within_two_seconds(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """With the shipped backoff settings (retry_base, retry_cap left alone)."""
    srv.add("/f", blob.data)
    srv.inject("/f", Status(503))
    overrides = fast(tmp_path)
    del overrides["retry_base"], overrides["retry_cap"]
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **overrides)
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size
    assert r.retries == 1
    t_err, _w, t_next, _w2 = _retry_gap(srv, 503)
    assert t_next - t_err < 2.0


def test_garbage_retry_after_is_ignored(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Status(503, retry_after="\u00b2"), Status(503, retry_after="soon"))
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size
    assert r.retries == 2


@pytest.mark.parametrize("code", [404, 401, 403, 410])
def test_permanent_http_errors_fail_fast(
    srv: TimedServer, tmp_path: Path, blob: Blob, code: int
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Status(code, times=None))
    dest = tmp_path / "f"
    with pytest.raises(snapfs.SourceUnavailable) as info:
        snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert str(code) in str(info.value)
    assert not dest.exists()
    assert len(srv.requests) == 1, "a permanent error must not be retried"
    assert srv.bytes_sent < 200  # the error's text body only


def test_missing_file_without_fault(srv: TimedServer, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(snapfs.SourceUnavailable):
        snapfs.download(srv.url("/nothing-here"), dest, **fast(tmp_path))
    assert not dest.exists()
    assert len(srv.requests) == 1


@pytest.mark.parametrize(
    "fault", [HtmlPage(), JsonError("quota exceeded")], ids=["html-login", "json-error"]
)
def test_error_page_with_status_200_is_bad_content(
    srv: TimedServer, tmp_path: Path, blob: Blob, fault: Any
) -> None:
    srv.add("/model.bin", blob.data)
    srv.inject("/model.bin", fault)
    dest = tmp_path / "model.bin"
    with pytest.raises(snapfs.BadContent):
        snapfs.download(srv.url("/model.bin"), dest, **fast(tmp_path))
    assert not dest.exists()
    assert len(srv.requests) == 1
    assert srv.bytes_sent < 1000
    part = part_of(dest)
    assert not part.exists() or b"<" not in part.read_bytes(), "the page was saved"


def test_html_body_without_html_content_type_is_bad_content(
    srv: TimedServer, tmp_path: Path
) -> None:
    page = b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n" * 50
    srv.add("/model.bin", page, content_type="application/octet-stream")
    dest = tmp_path / "model.bin"
    with pytest.raises(snapfs.BadContent):
        snapfs.download(srv.url("/model.bin"), dest, **fast(tmp_path))
    assert not dest.exists()
    assert srv.bytes_sent <= len(page)


def test_a_real_html_file_is_not_mistaken_for_an_error_page(
    srv: TimedServer, tmp_path: Path
) -> None:
    page = b"<!DOCTYPE html>\n<html><body>the documentation</body></html>\n" * 50
    srv.add("/index.html", page, content_type="text/html")
    dest = tmp_path / "index.html"
    snapfs.download(srv.url("/index.html"), dest, **fast(tmp_path))
    assert dest.read_bytes() == page
    assert srv.bytes_sent == len(page)


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_size_is_an_error_and_saves_nothing(
    srv: TimedServer, tmp_path: Path, blob: Blob, delta: int
) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    with pytest.raises(snapfs.DownloadError) as info:
        snapfs.download(srv.url("/f"), dest, size=blob.size + delta, **fast(tmp_path))
    assert isinstance(info.value, (snapfs.BadContent, snapfs.HashMismatch))
    assert not dest.exists()
    # The size is known from the response headers: the body is not read. What the server
    # pushed into socket buffers before the client hung up is counted, but never a whole copy.
    assert srv.bytes_sent < blob.size


def test_range_ignored(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", IgnoreRange())
    dest = tmp_path / "f"
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    # One full-body answer, read front to back: nothing is fetched twice on a fresh download.
    assert srv.bytes_sent == blob.size
    assert r.fetched == blob.size


def test_range_ignored_by_one_mirror_uses_the_other(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", IgnoreRange())
    srv2.add("/f", blob.data)
    dest = tmp_path / "f"
    snapfs.download(srv.url("/f"), dest, mirrors=[srv2.url("/f")], **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    # The 200 answer is dropped after its headers; what the server had pushed by then is lost.
    assert len(srv.requests) == 1
    assert srv2.bytes_sent <= blob.size
    assert srv.bytes_sent + srv2.bytes_sent <= blob.size + srv.requests[0].body_bytes


def _abort_part_way(srv: TimedServer, dest: Path, tmp_path: Path, at: int) -> None:
    """Run a throttled download of /f and stop it (as Ctrl-C would) once ``at`` bytes are in.
    Then clear the faults and the server's counters, for the next run to be measured alone."""
    srv.inject("/f", Throttle(4 * MiB))

    def stop(p: snapfs.DownloadProgress) -> None:
        if p.done >= at:
            raise Abort

    with pytest.raises(Abort):
        snapfs.download(srv.url("/f"), dest, progress=stop, **fast(tmp_path))
    assert not dest.exists() and part_of(dest).exists()
    srv.clear_faults()
    # The throttled responses of the stopped run may still push a slice into their closed
    # sockets; wait until the server is done with them, or they count against the next run.
    wait_for(lambda: all(q.finished for q in srv.requests), "the stopped run's responses")
    srv.reset_stats()


def test_range_ignored_on_resume(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    template = tmp_path / "f"
    _abort_part_way(srv, template, tmp_path, at=4 * MiB)
    srv.inject("/f", IgnoreRange())
    record = template.with_name(template.name + PART + ".db")
    for i in range(12):  # the same partial, resumed 12 times
        dest = tmp_path / f"f{i}"
        shutil.copyfile(part_of(template), part_of(dest))
        shutil.copyfile(record, dest.with_name(dest.name + PART + ".db"))
        wait_for(lambda: all(q.finished for q in srv.requests), "the last run's responses")
        srv.reset_stats()
        r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
        assert sha_of(dest) == blob.sha256
        assert r.resumed >= 4 * MiB
        # Without Range, the missing bytes come from one pass over the body, from byte 0 to
        # the end of the last missing range (the bytes we have are read past): at most one
        # copy read. Answers dropped because another connection already streams cost only
        # what the server pushed into socket buffers: generously, one more copy in all.
        assert r.fetched <= blob.size, f"run {i}: {r.fetched / blob.size:.2f} copies read"
        assert srv.bytes_sent <= 2 * blob.size, srv.bytes_sent / blob.size


@pytest.mark.parametrize("connections", [1, CONNS])
def test_range_ignored_with_a_reset(
    srv: TimedServer, tmp_path: Path, blob: Blob, connections: int
) -> None:
    cut = 9 * MiB + 5
    srv.add("/f", blob.data)
    srv.inject("/f", IgnoreRange(), Reset(at=cut))
    dest = tmp_path / "f"
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path, download_connections=connections))
    assert sha_of(dest) == blob.sha256
    # One pass up to the reset, then one from byte 0 again (Range is ignored) to the end.
    assert srv.bytes_sent <= blob.size + cut
    if connections == 1:
        assert len(srv.requests) == 2


# ---- resuming: what the partial holds -------------------------------------------------------


def test_damaged_partial_is_checked_and_refetched(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """Bytes behind a record can be lost (a power cut): every extent is re-read on resume."""
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    _abort_part_way(srv, dest, tmp_path, at=6 * MiB)
    with open(part_of(dest), "r+b") as f:
        f.seek(2 * MiB + 10)
        f.write(b"XXXX")
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert r.resumed >= 6 * MiB
    # What was missing, plus the one damaged extent (an extent is at most a chunk).
    assert srv.bytes_sent <= blob.size - r.resumed + CHUNK


def test_content_changed_between_runs_without_validators(
    srv: TimedServer, tmp_path: Path, blob: Blob, blob2: Blob
) -> None:
    srv.add("/f", blob.data, etag=False, last_modified=False)
    dest = tmp_path / "f"
    _abort_part_way(srv, dest, tmp_path, at=4 * MiB)
    srv.replace("/f", blob2.data)
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    got = sha_of(dest)
    assert got in (blob.sha256, blob2.sha256), "a splice of two versions"
    assert srv.bytes_sent <= blob2.size


def test_source_serving_another_file_is_dropped(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """The first source has a different file (1000 bytes short); the size we expect says so."""
    wrong, right = srv, srv2
    wrong.add("/f", blob.data[:-1000])
    right.add("/f", blob.data)
    dest = tmp_path / "f"
    r = snapfs.download(
        wrong.url("/f"), dest, mirrors=[right.url("/f")], size=blob.size, **fast(tmp_path)
    )
    assert sha_of(dest) == blob.sha256
    assert wrong.requests, "the first source was never asked: the test proves nothing"
    assert r.sources == {host_of(right): blob.size}
    assert right.bytes_sent == blob.size
    # Found out from the headers (Content-Range total): its bodies are not read, at most
    # pushed into socket buffers before the client hung up.
    assert wrong.bytes_sent <= sum(range_span(q)[1] - range_span(q)[0] for q in wrong.requests)


def test_empty_file(srv: TimedServer, tmp_path: Path) -> None:
    """A 0-byte file is complete as soon as its size is known; its digests must still be
    computed (a race between the hasher and the end of the run, hence the repetition)."""
    srv.add("/empty", b"")
    empty = hashlib.sha256(b"").hexdigest()
    for i in range(25):
        for expected in (None, empty):
            dest = tmp_path / f"empty-{i}-{bool(expected)}"
            r = snapfs.download(srv.url("/empty"), dest, sha256=expected, **fast(tmp_path))
            assert dest.read_bytes() == b""
            assert r.size == 0
            assert r.sha256 == empty, f"run {i}: the result must carry the empty file's digest"
    assert srv.bytes_sent < 100 * len(srv.requests)  # 416 answers' texts, no file bytes


def test_directory_dest_takes_a_safe_name_from_the_url(srv: TimedServer, tmp_path: Path) -> None:
    data = os.urandom(1000)
    srv.add("/a/..%2F..%2Fevil", data)
    out = tmp_path / "dl"
    out.mkdir()
    r = snapfs.download(srv.url("/a/..%2F..%2Fevil"), out, **fast(tmp_path))
    assert r.path.parent == out and os.listdir(out) == [r.path.name]
    assert r.path.read_bytes() == data
    assert set(os.listdir(tmp_path)) == {"dl", "state"}  # nothing landed next to dl/
    assert srv.bytes_sent == len(data)


# ---- integrity: corrupt sources -------------------------------------------------------------


def test_corrupt_source_is_repaired_from_a_mirror_and_demoted(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    bad, good = srv, srv2
    bad.add("/f", blob.data)
    bad.inject("/f", Corrupt(ranges=((5 * MiB + 100, 5 * MiB + 110),), every=7 * MiB + 3))
    good.add("/f", blob.data)
    dest = tmp_path / "f"
    r = snapfs.download(
        bad.url("/f"), dest, mirrors=[good.url("/f")], sha256=blob.sha256, **fast(tmp_path)
    )
    assert sha_of(dest) == blob.sha256
    assert r.sha256 == blob.sha256
    assert r.repaired > 0
    # Everything the bad source served may have to be compared against the good one, and
    # no more (no connection breaks here): total <= size + what the bad source served.
    total = bad.bytes_sent + good.bytes_sent
    assert total <= blob.size + bad.bytes_sent, (bad.bytes_sent, good.bytes_sent)
    assert health(tmp_path, host_of(bad)).corrupt >= 1
    assert health(tmp_path, host_of(good)).corrupt == 0

    # The next download prefers the host that never lied, although it is listed second.
    bad.reset_stats()
    good.reset_stats()
    bad.add("/g", blob.data)
    good.add("/g", blob.data)
    dest2 = tmp_path / "g"
    snapfs.download(bad.url("/g"), dest2, mirrors=[good.url("/g")], **fast(tmp_path))
    assert sha_of(dest2) == blob.sha256
    assert bad.requests == [] and bad.bytes_sent == 0
    assert good.bytes_sent == blob.size


def test_corrupt_mirror_used_after_the_primary_fails(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """The good primary answers 503 at first (back in 3 s, longer than the downloader waits
    for its best source), so the corrupt mirror stands in."""
    good, bad = srv, srv2
    good.add("/f", blob.data)
    good.inject("/f", Status(503, retry_after=3))
    bad.add("/f", blob.data)
    bad.inject("/f", Corrupt(every=3 * MiB + 1))
    dest = tmp_path / "f"
    r = snapfs.download(
        good.url("/f"), dest, mirrors=[bad.url("/f")], sha256=blob.sha256, **fast(tmp_path)
    )
    assert sha_of(dest) == blob.sha256
    assert bad.bytes_sent > 0, "the corrupt mirror was not used: the test proves nothing"
    assert r.repaired > 0
    # As above: at most one copy, plus a second of what the corrupt mirror served.
    total = file_bytes(good) + file_bytes(bad)
    assert total <= blob.size + file_bytes(bad), (file_bytes(good), file_bytes(bad))
    assert health(tmp_path, host_of(bad)).corrupt >= 1
    assert health(tmp_path, host_of(good)).corrupt == 0


def test_corrupt_single_source_is_a_hash_mismatch_then_a_mirror_repairs(
    srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    bad, good = srv, srv2
    bad.add("/f", blob.data)
    bad.inject("/f", Corrupt(ranges=((9 * MiB + 1, 9 * MiB + 2),)))
    good.add("/f", blob.data)
    dest = tmp_path / "f"
    with pytest.raises(snapfs.HashMismatch):
        snapfs.download(bad.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert not dest.exists()
    assert bad.bytes_sent == blob.size
    assert part_of(dest).exists(), "the verified partial must be kept for a repair"

    bad.reset_stats()
    r = snapfs.download(
        bad.url("/f"), dest, mirrors=[good.url("/f")], sha256=blob.sha256, **fast(tmp_path)
    )
    assert sha_of(dest) == blob.sha256
    assert r.repaired > 0
    assert r.resumed == blob.size
    # Nothing downloaded again from scratch: the bad source is not asked again, and the good
    # one sends at most one copy (to find the bad extent, every byte the bad source served
    # has to be compared, and it served them all).
    assert bad.bytes_sent == 0
    assert good.bytes_sent <= blob.size
    assert leftovers(dest) == []


# ---- the file changes upstream --------------------------------------------------------------


def test_content_changed_mid_download(
    srv: TimedServer, tmp_path: Path, blob: Blob, blob2: Blob
) -> None:
    srv.add("/f", blob.data)
    old_etag = srv.etag("/f")
    # Throttled, so the replace (at 2 MiB done) lands while later requests are still to come;
    # a reset after the replace guarantees at least one request is made after it.
    srv.inject("/f", Throttle(4 * MiB), Reset(at=12 * MiB + 5))
    replaced_at: list[float] = []

    def progress(p: snapfs.DownloadProgress) -> None:
        if not replaced_at and p.done >= 2 * MiB:
            srv.replace("/f", blob2.data)
            replaced_at.append(time.monotonic())

    dest = tmp_path / "f"
    r = snapfs.download(
        srv.url("/f"), dest, progress=progress, **fast(tmp_path, download_connections=2)
    )
    assert replaced_at
    got = sha_of(dest)
    assert got == blob2.sha256, "not the new version" + (
        " (the old one)" if got == blob.sha256 else " (a splice!)"
    )
    assert r.sha256 == blob2.sha256
    after = [q for m, _w, q in srv.timeline() if m >= replaced_at[0]]
    assert any(q.if_range == old_etag for q in after), "the change was never noticed"
    # The new version is fetched once: requests made after the change carry at most one
    # copy, plus one read per broken connection and the 200 answer that revealed the change.
    revealing = sum(q.body_bytes for q in after if q.status == 200)
    assert sum(q.body_bytes for q in after) <= blob2.size + revealing + 2 * READ


def test_content_changed_between_runs(
    srv: TimedServer, tmp_path: Path, blob: Blob, blob2: Blob
) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    _abort_part_way(srv, dest, tmp_path, at=blob.size // 4)
    srv.replace("/f", blob2.data)
    r = snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    got = sha_of(dest)
    assert got == blob2.sha256, "the old version" if got == blob.sha256 else "a splice!"
    assert r.sha256 == blob2.sha256
    # The old partial is worthless: the new version is fetched once (the 200 answers to
    # If-Range that reveal the change may push some bytes before the client hangs up).
    revealing = sum(q.body_bytes for q in srv.requests if q.status == 200)
    assert srv.bytes_sent <= blob2.size + revealing + READ
    assert leftovers(dest) == []


# ---- redirects and mirrors ------------------------------------------------------------------


def test_signed_redirect_that_expires(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", SignedRedirect(ttl=None, max_uses=1))  # each signed URL serves once
    dest = tmp_path / "f"
    # One connection: the expiry is met by one request at a time (parallel: the next test).
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path, download_connections=1))
    assert sha_of(dest) == blob.sha256
    assert file_bytes(srv) == blob.size
    assert srv.bytes_sent - file_bytes(srv) < 200 * len(srv.requests)  # 302 and 403 texts
    paths = [q.path for q in srv.requests]
    assert paths.count("/f") >= 2, f"never went back to the original URL: {paths}"
    assert any(q.status == 403 for q in srv.requests), "the signed URL never expired"


def test_signed_redirect_that_expires_with_parallel_connections(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """Several workers get 403 from the same expired URL at once: each must take it as an
    expiry (and refresh), not as "access denied", whatever the order they handle them in."""
    srv.add("/f", blob.data)
    srv.inject("/f", SignedRedirect(ttl=None, max_uses=1))
    for i in range(8):  # a race: a broken downloader loses it in most runs, not all
        srv.reset_stats()
        dest = tmp_path / f"f{i}"
        snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
        assert sha_of(dest) == blob.sha256
        assert file_bytes(srv) == blob.size


@pytest.fixture(params=["refused-url", "refuse", "blackhole", "reset", "http-503"])
def down(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, TimedServer | None]]:
    """(url, host, server-or-None) of a source that is down in one of several ways."""
    kind = request.param
    if kind == "refused-url":
        url = refused_url("/f")
        yield url, url.split("/")[2], None
    elif kind == "http-503":
        yield from ((s.url("/f"), host_of(s), s) for s in _with_503())
    else:
        with DeadEndpoint(DeadKind(kind)) as dead:
            yield dead.url("/f"), host_of(dead), None


def _with_503() -> Iterator[TimedServer]:
    for s in _serve():
        s.add("/f", b"")
        s.inject("/f", Status(503, times=None))
        yield s


def test_dead_mirror_listed_first(
    srv: TimedServer,
    tmp_path: Path,
    blob: Blob,
    down: tuple[str, str, TimedServer | None],
) -> None:
    dead_url, dead_host, dead_srv = down
    srv.add("/f", blob.data)
    cfg = fast(tmp_path, breaker_threshold=1)
    dest = tmp_path / "f"
    r = snapfs.download(dead_url, dest, mirrors=[srv.url("/f")], **cfg)
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size
    assert r.sources == {host_of(srv): blob.size}
    h = health(tmp_path, dead_host)
    assert h.failures >= 1 and h.opened is not None, h  # its breaker opened, on disk
    assert health(tmp_path, host_of(srv)).failures == 0

    # The next run starts with the healthy source: no failure at all this time.
    srv.reset_stats()
    if dead_srv is not None:
        dead_srv.reset_stats()
    dest2 = tmp_path / "g"
    r2 = snapfs.download(dead_url, dest2, mirrors=[srv.url("/f")], **cfg)
    assert sha_of(dest2) == blob.sha256
    assert srv.bytes_sent == blob.size
    assert r2.retries == 0, "the dead host was tried again first"
    if dead_srv is not None:
        assert dead_srv.requests == []


def test_damaged_host_record_does_not_stop_a_download(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """hosts.db is advice: junk in it means starting without history, not failing."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "hosts.db").write_bytes(b"this is not an SQLite database " * 100)
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size


def test_dest_in_a_missing_directory_is_a_usage_error(srv: TimedServer, tmp_path: Path) -> None:
    srv.add("/f", b"x" * 1000)
    dest = tmp_path / "no" / "such" / "dir" / "f"
    with pytest.raises(snapfs.UsageError):
        snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert not (tmp_path / "no").exists()
    assert srv.requests == []


def test_every_source_down_gives_up(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with pytest.raises(snapfs.DownloadError) as info:
        snapfs.download(
            refused_url("/f"),
            dest,
            mirrors=[refused_url("/f")],
            **fast(tmp_path, retry_attempts=3),
        )
    assert isinstance(info.value, (snapfs.DownloadFailed, snapfs.SourceUnavailable))
    assert not dest.exists()


# ---- already have it ------------------------------------------------------------------------


@pytest.mark.parametrize("digest", ["sha256", "xxh128"])
def test_already_in_a_shared_store(
    srv: TimedServer, tmp_path: Path, blob: Blob, digest: str
) -> None:
    import xxhash

    store = tmp_path / "store"
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    for p in (p1, p2):
        p.mkdir()
        snapfs.init(p, store=store).close()
    srv.add("/f", blob.data)
    want = {"sha256": blob.sha256, "xxh128": xxhash.xxh3_128_hexdigest(blob.data)}
    expected = {digest: want[digest]}

    r1 = snapfs.download(srv.url("/f"), "models/a.bin", project=p1, **expected, **fast(tmp_path))
    assert sha_of(p1 / "models/a.bin") == blob.sha256
    assert srv.bytes_sent == blob.size
    assert r1.path == p1 / "models/a.bin" and not r1.reused
    assert not any((p1 / ".snapfs" / "downloads").iterdir()), "partial left behind"

    srv.reset_stats()
    r2 = snapfs.download(srv.url("/f"), "copy/b.bin", project=p1, **expected, **fast(tmp_path))
    r3 = snapfs.download(srv.url("/f"), "c.bin", project=p2, **expected, **fast(tmp_path))
    assert sha_of(p1 / "copy/b.bin") == blob.sha256
    assert sha_of(p2 / "c.bin") == blob.sha256
    assert srv.bytes_sent == 0 and srv.requests == []
    for r in (r2, r3):
        assert r.reused and r.fetched == 0 and r.size == blob.size
        assert r.sha256 == blob.sha256


@pytest.mark.parametrize("busy", [False, True])
def test_already_in_the_store_leaves_a_live_partial_alone(
    srv: TimedServer, tmp_path: Path, blob: Blob, busy: bool
) -> None:
    """The store already holds the content, and DEST has a partial from another run. A dead
    run's partial is removed; a live run's (its lock held) is left to that run."""
    import fcntl

    import xxhash

    root = tmp_path / "p"
    root.mkdir()
    snapfs.init(root).close()
    srv.add("/f", blob.data)
    snapfs.download(srv.url("/f"), "a.bin", project=root, sha256=blob.sha256, **fast(tmp_path))
    part = root / ".snapfs/downloads" / f"{xxhash.xxh3_64_hexdigest(b'b.bin')}.snapfs-part"
    part.write_bytes(blob.data[: 3 * MiB])
    fd = os.open(part, os.O_RDWR)
    try:
        if busy:
            fcntl.flock(fd, fcntl.LOCK_EX)
        r = snapfs.download(
            srv.url("/f"), "b.bin", project=root, sha256=blob.sha256, **fast(tmp_path)
        )
        assert r.reused and sha_of(root / "b.bin") == blob.sha256
        assert part.exists() == busy
    finally:
        os.close(fd)


def test_dest_already_holding_the_right_bytes(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    dest.write_bytes(blob.data)
    r = snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert r.reused and r.fetched == 0
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == 0 and srv.requests == []
    assert leftovers(dest) == []


def test_dest_holding_other_bytes_is_replaced(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    old = b"an older version"
    dest.write_bytes(old)
    r = snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert not r.reused and r.resumed == 0
    assert sha_of(dest) == blob.sha256
    # One copy, plus the sample of the server's bytes that showed DEST was not a prefix.
    assert srv.bytes_sent <= blob.size + min(SAMPLE, len(old))


def test_incomplete_dest_is_adopted(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    """Another tool died half-way: DEST holds a prefix. With a digest to check the result,
    the prefix is kept (after comparing its tail with the server's) and only the rest fetched."""
    prefix = 6 * MiB + 123
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    dest.write_bytes(blob.data[:prefix])
    r = snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert r.resumed == prefix
    assert srv.bytes_sent <= blob.size - prefix + SAMPLE
    assert leftovers(dest) == []


def test_quarantines_in_the_same_second_keep_both_files(
    srv: TimedServer, tmp_path: Path, blob: Blob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incomplete DEST that isn't the source's prefix is moved aside, never deleted: a
    second one in the same second gets its own name instead of replacing the first."""
    import snapfs._download as dl

    monkeypatch.setattr(dl.time, "time", lambda: 1_800_000_000.0)
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    kept = []
    for old in (b"first unrelated bytes", b"second unrelated bytes"):
        dest.write_bytes(old)
        snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
        assert sha_of(dest) == blob.sha256
        kept.append(old)
    moved = sorted(tmp_path.glob("f.snapfs-quarantine-*"))
    assert sorted(m.read_bytes() for m in moved) == sorted(kept)


def test_incomplete_dest_with_a_bad_byte_is_repaired(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    """Only the tail of an adopted prefix is compared up front; the whole-file digest catches
    a bad byte further in, and repair fetches the adopted bytes again."""
    prefix = 6 * MiB
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    damaged = bytearray(blob.data[:prefix])
    damaged[MiB + 7] ^= 0xFF
    dest.write_bytes(damaged)
    r = snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert r.repaired > 0
    # The rest, the sample, and the adopted bytes once more to find the bad one.
    assert srv.bytes_sent <= blob.size - prefix + SAMPLE + prefix


def test_incomplete_dest_with_another_hard_link_is_not_written_in_place(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    prefix = 6 * MiB
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    dest.write_bytes(blob.data[:prefix])
    os.link(dest, tmp_path / "backup")
    snapfs.download(srv.url("/f"), dest, sha256=blob.sha256, **fast(tmp_path))
    assert sha_of(dest) == blob.sha256
    assert (tmp_path / "backup").read_bytes() == blob.data[:prefix], "the other link changed"
    assert srv.bytes_sent <= blob.size + SAMPLE


def test_incomplete_dest_in_a_project_leaves_snapshots_intact(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    prefix = 6 * MiB
    root = tmp_path / "proj"
    root.mkdir()
    with snapfs.init(root, hardlink_threshold=1) as proj:
        (root / "models").mkdir()
        (root / "models" / "f.bin").write_bytes(blob.data[:prefix])
        proj.snapshot(label="v1, half of v2")
    srv.add("/f", blob.data)
    r = snapfs.download(
        srv.url("/f"), "models/f.bin", project=root, sha256=blob.sha256, **fast(tmp_path)
    )
    assert sha_of(root / "models" / "f.bin") == blob.sha256
    assert srv.bytes_sent <= blob.size + SAMPLE
    assert r.sha256 == blob.sha256
    with snapfs.open(root) as proj:
        report = proj.verify()
    assert report.problems == [], report.problems


def test_project_object_keeps_the_callers_overrides(
    srv: TimedServer,
    tmp_path: Path,
    blob: Blob,
    project: snapfs.Project,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """download(project=<Project>, state_dir=...): the override is applied, or refused loudly;
    never silently dropped (here it would send host health to the home directory)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    srv.add("/f", blob.data)
    try:
        snapfs.download(srv.url("/f"), "f.bin", project=project, **fast(tmp_path))
    except snapfs.UsageError:
        assert srv.bytes_sent == 0
        assert not (project.root / "f.bin").exists()
    else:
        assert sha_of(project.root / "f.bin") == blob.sha256
        assert srv.bytes_sent == blob.size
        assert (tmp_path / "state" / "hosts.db").exists()
    assert not home.exists(), "host health was written under the home directory"


# ---- hostile destinations -------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("do not touch")
    return d


@pytest.mark.parametrize("dest", ["../x", "ABS", "sub/link/x", ".snapfs/x", "a/../../x", "./../x"])
def test_hostile_project_destinations(
    srv: TimedServer,
    tmp_path: Path,
    blob: Blob,
    project: snapfs.Project,
    outside: Path,
    dest: str,
) -> None:
    srv.add("/f", blob.data)
    (project.root / "sub").mkdir()
    os.symlink(outside, project.root / "sub" / "link")
    if dest == "ABS":
        dest = str(outside / "x")
    before_out = tree_state(outside)
    before_proj = tree_state(project.root)
    with pytest.raises((snapfs.UnsafePath, snapfs.UsageError)):
        snapfs.download(srv.url("/f"), dest, project=project.root, **fast(tmp_path))
    assert tree_state(outside) == before_out, "something was written outside the project"
    assert not (tmp_path / "x").exists()
    assert tree_state(project.root) == before_proj
    if "link" not in dest:
        assert srv.bytes_sent == 0, "a path refused on its face must be refused before fetching"
    else:  # the symlink is found when the file is put in place: one copy at most was fetched
        assert srv.bytes_sent <= blob.size


def test_project_dest_that_is_a_symlink_is_replaced_not_followed(
    srv: TimedServer, tmp_path: Path, blob: Blob, project: snapfs.Project, outside: Path
) -> None:
    srv.add("/f", blob.data)
    os.symlink(outside / "precious.txt", project.root / "model.bin")
    before = tree_state(outside)
    snapfs.download(srv.url("/f"), "model.bin", project=project.root, **fast(tmp_path))
    assert tree_state(outside) == before
    assert not (project.root / "model.bin").is_symlink()
    assert sha_of(project.root / "model.bin") == blob.sha256
    assert srv.bytes_sent == blob.size


def test_plain_symlink_planted_at_the_partial_is_not_written_through(
    srv: TimedServer, tmp_path: Path, blob: Blob, outside: Path
) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "dl" / "f"
    dest.parent.mkdir()
    os.symlink(outside / "precious.txt", part_of(dest))
    before = tree_state(outside)
    with pytest.raises(snapfs.SnapfsError):
        snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert tree_state(outside) == before
    assert not dest.exists()
    assert srv.bytes_sent == 0


def test_plain_symlink_planted_at_the_record_is_not_written_through(
    srv: TimedServer, tmp_path: Path, blob: Blob, outside: Path
) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "dl" / "f"
    dest.parent.mkdir()
    os.symlink(outside / "evil.db", dest.with_name(dest.name + PART + ".db"))
    before = tree_state(outside)
    try:
        snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    except snapfs.SnapfsError:
        assert not dest.exists()
    else:
        assert sha_of(dest) == blob.sha256
    assert tree_state(outside) == before, "a file was written through the symlink"


def test_plain_dest_that_is_a_symlink_is_replaced_not_followed(
    srv: TimedServer, tmp_path: Path, blob: Blob, outside: Path
) -> None:
    srv.add("/f", blob.data)
    dest = tmp_path / "f"
    os.symlink(outside / "precious.txt", dest)
    before = tree_state(outside)
    snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
    assert tree_state(outside) == before
    assert not dest.is_symlink() and sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size


# ---- disk full ------------------------------------------------------------------------------


def fill(fs: Path, name: str = "filler") -> Path:
    """Write to ``fs`` until it is full."""
    filler = fs / name
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 * KiB))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.fault
@pytest.mark.parametrize("size_known", [True, False], ids=["size-given", "size-learnt"])
def test_too_big_for_the_disk(
    srv: TimedServer, small_fs: Path, tmp_path: Path, size_known: bool
) -> None:
    big = make_blob(16 * MiB)  # the small filesystem has 8 MiB
    srv.add("/f", big.data)
    dest = small_fs / "f"
    # One connection when the size is learnt, so exactly one response precedes the check
    # whatever the thread timing.
    cfg = fast(tmp_path) if size_known else fast(tmp_path, download_connections=1)
    with pytest.raises(snapfs.DiskFull):
        snapfs.download(srv.url("/f"), dest, size=big.size if size_known else None, **cfg)
    assert not dest.exists()
    if size_known:  # nothing needs asking: the check comes before any request
        assert srv.requests == [] and srv.bytes_sent == 0
    else:  # the first response tells the size; its body is not read
        assert len(srv.requests) == 1
        assert srv.bytes_sent <= CHUNK


@pytest.mark.fault
def test_disk_full_mid_download_keeps_progress_and_resumes(
    srv: TimedServer, small_fs: Path, tmp_path: Path
) -> None:
    blob = make_blob(4 * MiB)
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(2 * MiB))
    dest = small_fs / "f"
    filled: list[Path] = []

    def progress(p: snapfs.DownloadProgress) -> None:
        if not filled and p.done >= 1 * MiB:
            filled.append(fill(small_fs))  # another program fills the disk meanwhile

    # The data file is preallocated, so what runs out of room is the extent record.
    # (size= given: the space is reserved before any request; see the next test for why.)
    cfg = fast(tmp_path, download_chunk=256 * KiB)
    with pytest.raises(snapfs.DiskFull) as info:
        snapfs.download(srv.url("/f"), dest, size=blob.size, progress=progress, **cfg)
    assert filled, f"failed before the disk was filled: {info.value!r}"
    assert not dest.exists() and part_of(dest).exists()

    filled[0].unlink()
    srv.clear_faults()
    r = snapfs.download(srv.url("/f"), dest, size=blob.size, **cfg)
    assert sha_of(dest) == blob.sha256
    assert r.resumed >= 1 * MiB, "verified progress was not kept"
    # Both runs together: one copy, plus per connection the chunk whose record could not be
    # written when the disk filled (its bytes arrived, but are not known to be good) and the
    # throttle's slice in flight. (Reads are at most a chunk long here.)
    assert srv.bytes_sent <= blob.size + CONNS * (256 * KiB + 2 * MiB // 20)
    assert leftovers(dest) == []


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip(reason="needs root to mount a tmpfs")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(reason=f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.fault
def test_a_file_that_fits_is_not_refused_for_lack_of_space(
    srv: TimedServer, tmp_path: Path
) -> None:
    big = make_blob(32 * MiB)
    srv.add("/f", big.data)
    with mounted_tmpfs(tmp_path / "fs", "48m") as fs:
        for i in range(15):
            dest = fs / "f"
            snapfs.download(srv.url("/f"), dest, **fast(tmp_path))
            assert sha_of(dest) == big.sha256, f"run {i}"
            dest.unlink()


# ---- processes: the CLI, kill -9 and resume, two at once ------------------------------------


def cli_env(tmp_path: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    env.update(
        SNAPFS_DOWNLOAD_CHUNK=str(CHUNK),
        SNAPFS_RETRY_BASE="0.05",
        SNAPFS_RETRY_CAP="0.2",
        SNAPFS_CONNECT_TIMEOUT="1",
        SNAPFS_READ_TIMEOUT="2",
        SNAPFS_STATE_DIR=str(tmp_path / "state"),
    )
    env.update(more)
    return env


def snapfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapfs", *args]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def recorded_extents(db: Path) -> int:
    """Extents the downloader has committed so far (0 if its record does not exist yet)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM extents").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_cli_download(srv: TimedServer, srv2: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/model.bin", blob.data)
    srv2.add("/model.bin", blob.data)
    dest = tmp_path / "out.bin"
    r = run(
        snapfs_cmd(
            "download",
            srv.url("/model.bin"),
            "-o",
            str(dest),
            "--sha256",
            blob.sha256.upper(),
            "--mirror",
            srv2.url("/model.bin"),
        ),
        cli_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(dest)
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent + srv2.bytes_sent == blob.size
    assert "Traceback" not in r.stderr


def test_cli_json(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    srv.add("/model.bin", blob.data)
    dest = tmp_path / "out.bin"
    r = run(
        snapfs_cmd("download", srv.url("/model.bin"), "-o", str(dest), "--json"),
        cli_env(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["sha256"] == blob.sha256 and got["size"] == blob.size and got["path"] == str(dest)
    assert sha_of(dest) == blob.sha256
    assert srv.bytes_sent == blob.size


@pytest.mark.parametrize(
    "args",
    [
        ["ftp://127.0.0.1/f"],
        ["file:///etc/passwd"],
        ["not a url"],
        ["http://127.0.0.1:9/f", "--sha256", "xyz"],
        ["http://127.0.0.1:9/f", "--sha256", "a" * 63],
        ["http://127.0.0.1:9/f", "--xxh128", "g" * 32],
        ["http://127.0.0.1:9/f", "--size", "lots"],
        ["http://127.0.0.1:9/f", "--mirror", "gopher://x/f"],
    ],
    ids=["ftp", "file", "junk", "hex", "short-hex", "xxh-hex", "size", "mirror"],
)
def test_cli_bad_input(tmp_path: Path, args: list[str]) -> None:
    dest = tmp_path / "out"
    r = run(snapfs_cmd("download", *args, "-o", str(dest)), cli_env(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert r.stdout == ""
    assert not dest.exists() and list(tmp_path.glob("out*")) == []


def test_kill_and_resume_in_a_new_process(srv: TimedServer, tmp_path: Path, blob: Blob) -> None:
    chunk = 512 * KiB
    rate = 2 * MiB  # per connection: ~2 s for the whole file over 4 connections
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(rate))
    dest = tmp_path / "f"
    env = cli_env(tmp_path, SNAPFS_DOWNLOAD_CHUNK=str(chunk))
    child = subprocess.Popen(
        snapfs_cmd("download", srv.url("/f"), "-o", str(dest)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        db = tmp_path / ("f" + PART + ".db")
        wait_for(lambda: recorded_extents(db) >= 4 or child.poll() is not None, "extents")
        assert child.poll() is None, "the download finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stderr is not None
        child.stderr.close()
    assert not dest.exists()
    killed_at = srv.bytes_sent
    assert killed_at < blob.size

    srv.clear_faults()
    r = run(snapfs_cmd("download", srv.url("/f"), "-o", str(dest), "--json"), env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert sha_of(dest) == blob.sha256 and got["sha256"] == blob.sha256
    assert got["resumed"] >= 4 * chunk
    # A kill -9 loses, per connection, the chunk being received (not yet recorded) and what
    # the throttled server had in flight or pushes once more before it notices the dead
    # socket (two slices of rate / 20).
    assert srv.bytes_sent <= blob.size + CONNS * (chunk + 2 * (rate // 20))
    assert leftovers(dest) == []


def test_sigterm_stops_cleanly_and_the_same_command_resumes(
    srv: TimedServer, tmp_path: Path, blob: Blob
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(2 * MiB))
    dest = tmp_path / "f"
    env = cli_env(tmp_path)
    cmd = snapfs_cmd("download", srv.url("/f"), "-o", str(dest), "--json")
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        db = tmp_path / ("f" + PART + ".db")
        wait_for(lambda: recorded_extents(db) >= 2 or child.poll() is not None, "extents")
        assert child.poll() is None, "the download finished before it could be stopped"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, (child.returncode, err)
    assert out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "resume" in err
    assert not dest.exists() and part_of(dest).exists()

    srv.clear_faults()
    r = run(cmd, env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert sha_of(dest) == blob.sha256
    assert got["resumed"] >= 2 * CHUNK
    # A clean stop records what arrived: per connection only the read in progress is lost,
    # plus the throttle's slices in flight (two of rate / 20, as above).
    assert srv.bytes_sent <= blob.size + CONNS * (READ + 2 * (2 * MiB // 20))


def _blocked_on_a_lock(pid: int) -> bool:
    """Is ``pid`` waiting for a file lock another process holds (a ``->`` line in /proc/locks)?"""
    with open("/proc/locks", encoding="ascii", errors="replace") as f:
        return any(
            len(parts := line.split()) > 5 and parts[1] == "->" and parts[5] == str(pid)
            for line in f
        )


@pytest.mark.parametrize("mode", ["plain", "project"])
def test_two_processes_download_the_same_file(
    srv: TimedServer, tmp_path: Path, blob: Blob, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv.add("/f", blob.data)
    srv.inject("/f", Throttle(4 * MiB))
    # No stall here, and the first process's requests are held below while the second one
    # starts: a read timeout is only a guard against a hang.
    env = cli_env(tmp_path, SNAPFS_READ_TIMEOUT="60")
    if mode == "plain":
        dest = tmp_path / "f"
        records = tmp_path  # <dest>.snapfs-part.db lives next to DEST
        cmd = snapfs_cmd("download", srv.url("/f"), "-o", str(dest), "--json")
    else:
        proj = tmp_path / "proj"
        proj.mkdir()
        snapfs.init(proj).close()
        dest = proj / "models" / "f.bin"
        records = proj / ".snapfs" / "downloads"
        cmd = snapfs_cmd("-C", str(proj), "download", srv.url("/f"), "-o", "models/f.bin", "--json")

    # The first process must still be downloading when the second reaches the lock, however
    # long the second takes to start: every request after the first waits until then (the
    # first request, for the first chunk, says the file is larger than one chunk).
    second_waits = threading.Event()
    decide = srv._decide

    def held(ex: Any) -> Any:
        if ex.seq > 1:
            second_waits.wait(60)  # a guard against a hang: set as soon as the second waits
        return decide(ex)

    monkeypatch.setattr(srv, "_decide", held)

    def first_extent_recorded() -> bool:
        dbs = list(records.glob("*" + PART + ".db")) if records.exists() else []
        return any(recorded_extents(db) >= 1 for db in dbs) or first.poll() is not None

    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second: subprocess.Popen[str] | None = None
    try:
        # Start the second only once the first is surely mid-download (it holds the lock).
        wait_for(first_extent_recorded, "the first process's first extent")
        assert first.poll() is None, "the first download finished before the second started"
        second = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        waiter = second
        wait_for(
            lambda: _blocked_on_a_lock(waiter.pid) or waiter.poll() is not None,
            "the second process to wait for the lock",
        )
        assert first.poll() is None, "the first download finished before the second waited"
        second_waits.set()
        out1, err1 = first.communicate(timeout=60)
        out2, err2 = second.communicate(timeout=60)
    finally:
        second_waits.set()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert sha_of(dest) == blob.sha256
    r1, r2 = json.loads(out1), json.loads(out2)
    assert r1["path"] == r2["path"] == str(dest)
    assert not r1["reused"] and r2["reused"] and r2["fetched"] == 0
    assert "waiting" in err2
    assert srv.bytes_sent == blob.size, "the file was fetched twice"
    assert list(records.glob("*" + PART + "*")) == []
