"""The fault-injecting HTTP server the download tests rely on, proven against real sockets.

Byte-exact checks (how much arrived before a reset, whether the end was an RST or a FIN) use a
raw socket client; the rest uses ``requests``, as the downloader does.
"""

from __future__ import annotations

import email.utils
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

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
from tests.helpers import wait_for

DATA = random.Random(0).randbytes(300_000)
SIZE = len(DATA)


def _serving(content: bytes | Path) -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.add("/data", content)
        yield s
        assert s.errors == []


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    """A server with DATA at /data, served from memory."""
    yield from _serving(DATA)


@pytest.fixture(params=["bytes", "file"])
def any_srv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaultServer]:
    """DATA at /data from memory, then from a file (the sendfile path), for tests of how bytes
    are sent."""
    content: bytes | Path = DATA
    if request.param == "file":
        content = tmp_path / "data.bin"
        content.write_bytes(DATA)
    yield from _serving(content)


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes
    end: str  # "complete", "eof" (FIN before Content-Length), "reset" or "timeout"


def raw_get(
    srv: FaultServer,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    timeout: float = 5.0,
) -> Raw:
    """One request on a fresh connection; reads the body up to Content-Length, noting how the
    transfer ended."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before the response head: {buf!r}"
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        length = 0 if method == "HEAD" else int(hdrs.get("content-length", "0"))
        end = "complete"
        try:
            while len(body) < length:
                chunk = s.recv(1 << 20)
                if not chunk:
                    end = "eof"
                    break
                body += chunk
        except ConnectionResetError:
            end = "reset"
        except TimeoutError:
            end = "timeout"
        return Raw(int(status_line.split()[1]), hdrs, body, end)


# ---- ranges and validators -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=1000-", 1000, SIZE),
        ("bytes=-500", SIZE - 500, SIZE),
        ("bytes=-999999999", 0, SIZE),  # suffix longer than the file: the whole file
        (f"bytes={SIZE - 10}-{SIZE + 1000}", SIZE - 10, SIZE),  # end clamped
    ],
)
def test_range_gives_206_with_content_range(
    any_srv: FaultServer, spec: str, start: int, end: int
) -> None:
    r = requests.get(any_srv.url("/data"), headers={"Range": spec}, timeout=10)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert r.headers["Content-Length"] == str(end - start)
    assert r.content == DATA[start:end]


def test_full_get_and_head_carry_validators(any_srv: FaultServer) -> None:
    r = requests.get(any_srv.url("/data"), timeout=10)
    assert r.status_code == 200 and r.content == DATA
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/octet-stream"
    etag = r.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and etag == any_srv.etag("/data")
    assert email.utils.parsedate_to_datetime(r.headers["Last-Modified"]) is not None

    h = raw_get(any_srv, "/data", method="HEAD", headers={"Range": "bytes=0-9"})
    assert h.status == 200, "HEAD ignores Range"
    assert h.headers["content-length"] == str(SIZE) and h.body == b""
    assert h.headers["etag"] == etag


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0"])
def test_unsatisfiable_range_gives_416(srv: FaultServer, spec: str) -> None:
    r = requests.get(srv.url("/data"), headers={"Range": spec}, timeout=10)
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", ["bytes=0-1,5-9", "bytes=9-5", "items=0-5", "bytes=abc"])
def test_multi_or_invalid_range_is_ignored(srv: FaultServer, spec: str) -> None:
    r = requests.get(srv.url("/data"), headers={"Range": spec}, timeout=10)
    assert r.status_code == 200 and r.content == DATA
    assert "Content-Range" not in r.headers


def test_if_range(srv: FaultServer) -> None:
    etag, lm = srv.etag("/data"), srv.last_modified("/data")
    assert etag is not None and lm is not None

    def get(if_range: str) -> requests.Response:
        headers = {"Range": "bytes=100-199", "If-Range": if_range}
        return requests.get(srv.url("/data"), headers=headers, timeout=10)

    assert get(etag).status_code == 206
    assert get(lm).status_code == 206
    for stale in ('"other"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT", "garbage"):
        r = get(stale)
        assert r.status_code == 200 and r.content == DATA, stale


def test_replace_changes_content_and_validators(srv: FaultServer) -> None:
    etag, lm = srv.etag("/data"), srv.last_modified("/data")
    assert etag is not None and lm is not None
    new = DATA[::-1]
    srv.replace("/data", new)
    assert srv.etag("/data") != etag
    new_lm = srv.last_modified("/data")
    assert new_lm is not None
    assert email.utils.parsedate_to_datetime(new_lm) > email.utils.parsedate_to_datetime(lm)

    # A resume with the old validator must get the whole new body, not a mix.
    for old in (etag, lm):
        r = requests.get(
            srv.url("/data"), headers={"Range": "bytes=10-", "If-Range": old}, timeout=10
        )
        assert r.status_code == 200 and r.content == new


def test_etag_can_be_disabled_or_fixed(tmp_path: Path) -> None:
    with FaultServer() as s:
        s.add("/plain", b"abc", etag=False, last_modified=False, content_type="text/plain")
        s.add("/tagged", b"abc", etag="shared-tag")
        r = requests.get(s.url("/plain"), headers={"Range": "bytes=1-", "If-Range": '"x"'})
        assert "ETag" not in r.headers and "Last-Modified" not in r.headers
        assert r.headers["Content-Type"] == "text/plain"
        assert r.status_code == 200, "no validator can match"
        assert requests.get(s.url("/tagged"), timeout=10).headers["ETag"] == '"shared-tag"'
        assert requests.get(s.url("/missing"), timeout=10).status_code == 404
        s.remove("/plain")
        assert requests.get(s.url("/plain"), timeout=10).status_code == 404


# ---- accounting ----------------------------------------------------------------------------


def test_accounting_and_records_over_keep_alive(any_srv: FaultServer) -> None:
    with requests.Session() as session:
        session.get(any_srv.url("/data"), timeout=10)
        session.get(any_srv.url("/data"), headers={"Range": "bytes=0-99"}, timeout=10)
        session.head(any_srv.url("/data"), timeout=10)
        session.get(any_srv.url("/data?x=1"), headers={"Range": f"bytes={SIZE}-"}, timeout=10)
        other = session.get(any_srv.url("/missing"), timeout=10)
    recs = any_srv.requests
    assert [(r.method, r.status, r.body_bytes) for r in recs] == [
        ("GET", 200, SIZE),
        ("GET", 206, 100),
        ("HEAD", 200, 0),
        ("GET", 416, len(b"range not satisfiable\n")),
        ("GET", 404, len(other.content)),
    ]
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)
    assert [r.arrived for r in recs] == sorted(r.arrived for r in recs)
    assert len({r.client_port for r in recs}) == 1, "all on one keep-alive connection"
    assert recs[1].range == "bytes=0-99" and recs[3].query == "x=1"
    # Every body byte counts, error pages too, each towards its own path.
    assert any_srv.bytes_sent_for("/data") == SIZE + 100 + 22
    assert any_srv.bytes_sent == any_srv.bytes_sent_for("/data") + len(other.content)
    assert any_srv.bytes_sent == sum(r.body_bytes for r in recs)

    any_srv.reset_stats()
    assert any_srv.bytes_sent == 0 and any_srv.requests == []


def test_parallel_ranged_requests(any_srv: FaultServer) -> None:
    parts: dict[int, bytes] = {}
    step = SIZE // 8 + 1

    def fetch(start: int) -> None:
        end = min(start + step, SIZE) - 1
        r = requests.get(
            any_srv.url("/data"), headers={"Range": f"bytes={start}-{end}"}, timeout=10
        )
        parts[start] = r.content

    threads = [threading.Thread(target=fetch, args=(s,)) for s in range(0, SIZE, step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(parts[k] for k in sorted(parts)) == DATA
    assert any_srv.bytes_sent == SIZE


# ---- connection faults ---------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 1, 12_345, SIZE - 1])
def test_reset_after_n_bytes(any_srv: FaultServer, after: int) -> None:
    any_srv.inject("/data", Reset(after=after))
    r = raw_get(any_srv, "/data")
    assert r.status == 200 and r.headers["content-length"] == str(SIZE)
    assert (r.end, r.body) == ("reset", DATA[:after])
    assert any_srv.bytes_sent == after, "partial bodies count"
    assert any_srv.requests[-1].finished
    assert any_srv.requests[-1].faults == ("Reset",)
    assert any_srv.active_faults("/data") == (), "one-shot"
    assert raw_get(any_srv, "/data").body == DATA


def test_reset_at_file_offset_hits_only_the_covering_range(srv: FaultServer) -> None:
    srv.inject("/data", Reset(at=150_000, times=2))
    assert raw_get(srv, "/data", {"Range": "bytes=0-99999"}).end == "complete"
    r = raw_get(srv, "/data", {"Range": "bytes=100000-199999"})
    assert (r.end, r.body) == ("reset", DATA[100_000:150_000])
    assert raw_get(srv, "/data").body == DATA[:150_000]  # second and last time
    assert raw_get(srv, "/data").end == "complete"


def test_faults_are_used_up_only_by_a_body_that_reaches_them(srv: FaultServer) -> None:
    corrupt = Corrupt(ranges=((250_000, 250_010),), times=1)
    srv.inject("/data", Reset(after=1000), Truncate(at=200_000), corrupt)
    r = raw_get(srv, "/data")
    assert (r.end, r.body) == ("reset", DATA[:1000])
    assert srv.active_faults("/data") == (Truncate(at=200_000), corrupt)
    r = raw_get(srv, "/data", {"Range": "bytes=1000-"})
    assert (r.end, r.body) == ("eof", DATA[1000:200_000])
    r = raw_get(srv, "/data", {"Range": "bytes=200000-"})
    assert r.end == "complete" and r.body != DATA[200_000:]
    assert [rec.faults for rec in srv.requests] == [("Reset",), ("Truncate",), ("Corrupt",)]
    assert srv.active_faults("/data") == ()


def test_clear_faults_disarms_responses_under_way(
    srv: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import faultserver

    # The faults must be cleared during the stall, however slowly this thread gets to it: the
    # stall lasts until then (a 60 s guard against a hang), and 0.3 s more.
    cleared = threading.Event()
    act = faultserver._Handler._act

    def act_once_cleared(self: Any, rule: Any) -> bool:
        if isinstance(rule, Stall):
            cleared.wait(60)
        return act(self, rule)

    monkeypatch.setattr(faultserver._Handler, "_act", act_once_cleared)
    srv.inject("/data", Stall(seconds=0.3, after=1000), Reset(after=2000), ResetEvery(3000))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
        s.sendall(b"GET /data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        buf = b""
        while not buf.endswith(DATA[:1000]):
            buf += s.recv(65536)
        # The bytes arrive a moment before the server claims the stall that follows them.
        wait_for(lambda: srv.requests[-1].faults == ("Stall",), "the stall to begin")
        srv.clear_faults()  # during the stall
        cleared.set()
        while chunk := s.recv(1 << 20):
            buf += chunk
    assert buf.endswith(b"\r\n\r\n" + DATA)
    assert srv.requests[-1].faults == ("Stall",)


def test_reset_every_n_bytes_is_cumulative_across_requests(any_srv: FaultServer) -> None:
    any_srv.inject("/data", ResetEvery(100_000))
    got = b""
    ends = []
    while len(got) < SIZE:
        r = raw_get(any_srv, "/data", {"Range": f"bytes={len(got)}-"})
        got += r.body
        ends.append((r.end, len(r.body)))
    assert got == DATA
    assert ends == [("reset", 100_000), ("reset", 100_000), ("complete", 100_000)]
    # The last response ended exactly on the third multiple: the next byte sent is the reset.
    r = raw_get(any_srv, "/data")
    assert (r.end, r.body) == ("reset", b"")
    assert any_srv.active_faults("/data") == (ResetEvery(100_000),), "repeats until cleared"
    any_srv.clear_faults("/data")
    assert raw_get(any_srv, "/data").end == "complete"


def test_reset_every_stops_after_times(srv: FaultServer) -> None:
    srv.inject("/data", ResetEvery(50_000, times=1))
    assert len(raw_get(srv, "/data").body) == 50_000
    assert raw_get(srv, "/data").end == "complete"


def test_truncate_closes_cleanly_short_of_content_length(any_srv: FaultServer) -> None:
    any_srv.inject("/data", Truncate(after=1000))
    r = raw_get(any_srv, "/data")
    assert r.headers["content-length"] == str(SIZE)
    assert (r.end, r.body) == ("eof", DATA[:1000])
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        any_srv.inject("/data", Truncate(at=200_000))
        requests.get(any_srv.url("/data"), headers={"Range": "bytes=100000-"}, timeout=10)


@pytest.mark.parametrize("then", ["continue", "close", "reset"])
def test_stall(srv: FaultServer, then: str) -> None:
    srv.inject("/data", Stall(seconds=0.5, after=5000, then=then))  # type: ignore[arg-type]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /data HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = b""
        while not buf.endswith(DATA[:5000]):
            buf += s.recv(65536)
        s.settimeout(0.1)
        with pytest.raises(TimeoutError):
            s.recv(1)  # nothing during the stall
        s.settimeout(5)
        rest = b""
        try:
            while len(rest) < SIZE - 5000:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                rest += chunk
            end = "complete" if rest else "eof"
        except ConnectionResetError:
            end = "reset"
    expected = {
        "continue": ("complete", DATA[5000:]),
        "close": ("eof", b""),
        "reset": ("reset", b""),
    }
    assert (end, rest) == expected[then]
    assert srv.requests[-1].faults == ("Stall",)


def test_throttle(srv: FaultServer) -> None:
    srv.inject("/data", Throttle(bytes_per_second=1_000_000, times=1))
    t0 = time.monotonic()
    assert requests.get(srv.url("/data"), timeout=10).content == DATA
    # A lower bound only (a slow machine cannot break it): 300 kB at 1 MB/s takes >= 0.3 s.
    assert time.monotonic() - t0 >= 0.25
    assert srv.requests[-1].faults == ("Throttle",)
    assert srv.active_faults("/data") == ()


def test_shared_throttle_is_one_link_for_every_connection(srv: FaultServer) -> None:
    """Four responses at once share the rate: together they take as long as 1.2 MB alone."""
    srv.inject("/data", Throttle(bytes_per_second=2_000_000, shared=True))
    got: list[bytes] = []

    def fetch() -> None:
        got.append(requests.get(srv.url("/data"), timeout=20).content)

    t0 = time.monotonic()
    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A lower bound only: 4 x 300 kB over a 2 MB/s link takes >= 0.6 s (0.15 s if each
    # connection had the rate to itself); the first slice of each may go at once.
    assert time.monotonic() - t0 >= 0.45
    assert got == [DATA] * 4
    assert all(r.faults == ("Throttle",) for r in srv.requests)


# ---- answers instead of the content --------------------------------------------------------


@pytest.mark.parametrize("code", [500, 503, 429, 404, 401, 403, 410])
def test_status_for_the_next_k_requests(srv: FaultServer, code: int) -> None:
    srv.inject("/data", Status(code, retry_after=3, times=2))
    for _ in range(2):
        r = requests.get(srv.url("/data"), timeout=10)
        assert r.status_code == code and r.headers["Retry-After"] == "3"
        assert r.content != DATA
    assert ("WWW-Authenticate" in r.headers) == (code == 401)
    assert requests.get(srv.url("/data"), timeout=10).content == DATA


def test_status_skip_head_and_http_date(srv: FaultServer) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    srv.inject("/data", Status(503, retry_after=when, skip=1))
    assert requests.head(srv.url("/data"), timeout=10).status_code == 200  # skipped
    r = requests.head(srv.url("/data"), timeout=10)  # HEAD counts too
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "Wed, 02 Jan 2030 03:04:05 GMT"
    assert requests.get(srv.url("/data"), timeout=10).status_code == 200


def test_captive_portal_and_json_error(srv: FaultServer) -> None:
    srv.inject("/data", HtmlPage(times=1))
    r = requests.get(srv.url("/data"), headers={"Range": "bytes=0-9"}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<form" in r.content
    srv.inject("/data", JsonError("rate limited", status=429))
    r = requests.get(srv.url("/data"), timeout=10)
    assert (r.status_code, r.headers["Content-Type"]) == (429, "application/json")
    assert r.json() == {"error": "rate limited"}


def test_ignore_range(srv: FaultServer) -> None:
    srv.inject("/data", IgnoreRange())
    r = requests.get(srv.url("/data"), headers={"Range": "bytes=10-19"}, timeout=10)
    assert r.status_code == 200 and r.content == DATA
    assert r.headers["Accept-Ranges"] == "none"
    srv.clear_faults()
    srv.inject("/data", IgnoreRange(advertise=True, times=1))
    r = requests.get(srv.url("/data"), headers={"Range": "bytes=10-19"}, timeout=10)
    assert (r.status_code, r.headers["Accept-Ranges"]) == (200, "bytes")
    assert requests.get(srv.url("/data"), headers={"Range": "bytes=10-19"}).status_code == 206


def test_corrupt_is_deterministic_by_offset(any_srv: FaultServer) -> None:
    any_srv.inject("/data", Corrupt(ranges=((1000, 1010),), every=65536, phase=7))
    full = requests.get(any_srv.url("/data"), timeout=10).content
    bad = [i for i in range(SIZE) if full[i] != DATA[i]]
    assert bad == [7, *range(1000, 1010), 65543, 131079, 196615, 262151]
    assert all(full[i] == DATA[i] ^ 0xFF for i in bad)
    # Any range through the region gets the same wrong bytes.
    part = requests.get(any_srv.url("/data"), headers={"Range": "bytes=990-65550"}, timeout=10)
    assert part.content == full[990:65551]
    clean = requests.get(any_srv.url("/data"), headers={"Range": "bytes=2000-60000"}, timeout=10)
    assert clean.content == DATA[2000:60001]
    assert any_srv.requests[-1].faults == () and any_srv.requests[-2].faults == ("Corrupt",)


def test_corrupt_once_then_good(srv: FaultServer) -> None:
    srv.inject("/data", Corrupt(ranges=((0, SIZE),), times=1))
    assert requests.get(srv.url("/data"), timeout=10).content == bytes(b ^ 0xFF for b in DATA)
    assert requests.get(srv.url("/data"), timeout=10).content == DATA


# ---- signed redirects ----------------------------------------------------------------------


def test_signed_redirect_expires_by_uses(srv: FaultServer) -> None:
    srv.inject("/data", SignedRedirect(ttl=None, max_uses=2))
    with requests.Session() as session:
        r = session.get(srv.url("/data"), headers={"Range": "bytes=0-9"}, timeout=10)
        assert r.status_code == 206 and r.content == DATA[:10]
        assert [h.status_code for h in r.history] == [302]
        signed = r.url
        assert "/signed/data?expires=" in signed and "&sig=" in signed
        assert session.get(signed, timeout=10).content == DATA  # second use
        denied = session.get(signed, timeout=10)
        assert denied.status_code == 403 and b"expired" in denied.content
        # Back to the original URL: a fresh signed URL that works.
        again = session.get(srv.url("/data"), timeout=10)
        assert again.content == DATA and again.url != signed
    assert [(r.path, r.status) for r in srv.requests] == [
        ("/data", 302),
        ("/signed/data", 206),
        ("/signed/data", 200),
        ("/signed/data", 403),
        ("/data", 302),
        ("/signed/data", 200),
    ]
    assert srv.requests[0].faults == ("SignedRedirect",)
    content = [r.body_bytes for r in srv.requests if r.status in (200, 206)]
    assert content == [10, SIZE, SIZE]
    assert srv.bytes_sent_for("/data") == sum(r.body_bytes for r in srv.requests)


def test_signed_redirect_expires_by_time_and_rejects_forgeries(srv: FaultServer) -> None:
    srv.inject("/data", SignedRedirect(ttl=0.2))
    signed = requests.get(srv.url("/data"), timeout=10).url
    forged = signed[:-4] + "0000"
    assert requests.get(forged, timeout=10).status_code == 403
    time.sleep(0.25)
    assert requests.get(signed, timeout=10).status_code == 403


# ---- endpoints that are down ---------------------------------------------------------------


def test_dead_endpoints() -> None:
    with DeadEndpoint(DeadKind.REFUSE) as dead:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(dead.url("/x"), timeout=2)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(refused_url("/x"), timeout=2)
    with DeadEndpoint(DeadKind.BLACKHOLE) as dead:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(dead.url("/x"), timeout=0.2)
    with DeadEndpoint(DeadKind.RESET) as dead:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(dead.url("/x"), timeout=2)


# ---- shutdown ------------------------------------------------------------------------------


def test_close_joins_every_thread_even_with_busy_connections(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(1).randbytes(16 << 20))
    with FaultServer() as s:
        s.add("/big", big)
        s.add("/stalled", DATA)
        s.inject("/stalled", Stall(seconds=60, after=10))
        with requests.Session() as idle:  # an idle keep-alive connection
            idle.get(s.url("/stalled"), headers={"Range": "bytes=0-5"}, timeout=10)
            stalled = socket.create_connection(("127.0.0.1", s.port))
            stalled.sendall(b"GET /stalled HTTP/1.1\r\nHost: x\r\n\r\n")
            unread = socket.create_connection(("127.0.0.1", s.port))  # never reads its body
            unread.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            while len(s.active_faults("/stalled")) == 1:  # wait until the stall is claimed
                time.sleep(0.01)
            assert not s.requests_for("/stalled")[-1].finished
            s.close()
            started_by_server = [t for t in threading.enumerate() if "faultserver" in t.name]
            assert started_by_server == []
        stalled.close()
        unread.close()


def test_a_str_content_is_refused_with_a_message_that_says_what_to_pass(srv: FaultServer) -> None:
    with pytest.raises(TypeError, match=r"bytes or a pathlib.Path, not a str"):
        srv.add("/named", "models/x.bin")  # type: ignore[arg-type]
    assert requests.get(srv.url("/named"), timeout=10).status_code == 404


def test_a_connection_accepted_while_closing_is_dropped_without_deadlock() -> None:
    """close() sets the closing flag before it stops the accept loop: a connection accepted in
    between is shut at once. That took the server's lock twice and hung close() for good."""
    s = FaultServer().start()
    a, b = socket.socketpair()
    s._closing.set()
    t = threading.Thread(target=s._httpd.process_request, args=(a, ("127.0.0.1", 1)), daemon=True)
    t.start()
    t.join(10)
    # (If it deadlocked, its lock stays held and close() would hang too: leave the server.)
    assert not t.is_alive(), "process_request deadlocked while the server was closing"
    assert b.recv(1) == b""  # the accepted connection was shut
    b.close()
    s._closing.clear()
    s.close()
