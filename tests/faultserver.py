"""A real HTTP/1.1 file server on 127.0.0.1 with Range/ETag/If-Range and injectable faults.

Used by the download tests (in-process, and by CLI subprocesses that connect to it) and by
``benchmarks/download.py`` (gigabyte files: bodies go out with ``os.sendfile`` or 1 MiB writes).

    with FaultServer() as srv:
        srv.add("/model.bin", data)                 # bytes, or a Path served with sendfile
        srv.inject("/model.bin", Reset(after=1 << 20), Status(503, retry_after=1))
        download(srv.url("/model.bin"), dest)
        assert srv.bytes_sent_for("/model.bin") < 2 * len(data)

Protocol
    GET and HEAD, keep-alive (HTTP/1.1), ``Accept-Ranges: bytes``, strong quoted ``ETag`` and an
    HTTP-date ``Last-Modified`` (both optional per resource). ``Range: bytes=a-b | a- | -n`` gets
    206 with ``Content-Range``; an unsatisfiable range gets 416 with ``Content-Range: bytes */N``.
    A multi-range or syntactically invalid ``Range`` is ignored (200, full body), which RFC 9110
    allows; no multipart/byteranges. HEAD ignores ``Range`` (RFC 9110 defines it for GET only).
    ``If-Range`` is compared strongly against the current ETag (a weak ``W/`` tag never matches)
    or, if it is a date, for equality with ``Last-Modified``; no match means 200 with the full
    body. Conditional GETs (If-None-Match, If-Modified-Since) are not implemented.

Faults
    Each fault is a small frozen dataclass, injected per path with :meth:`FaultServer.inject` at
    any time (also while a download runs) and removed with :meth:`FaultServer.clear_faults`.
    ``times`` says for how many requests/responses a rule fires (``None``: until cleared); an
    exhausted rule disappears from :meth:`FaultServer.active_faults`. Rules are checked in this
    order for each request, and the first that answers wins:

    1. :class:`Status` (a canned error, any method), then :class:`HtmlPage` / :class:`JsonError`
    2. :class:`SignedRedirect` (302 to a signed URL, 403 once that URL has expired)
    3. the resource, with :class:`IgnoreRange` applied to the Range header

    A GET body then meets the body faults armed when it started: :class:`Reset`,
    :class:`Truncate` and :class:`Stall` at their positions (the first Reset or Truncate to fire
    ends the response), :class:`Corrupt`, one :class:`Throttle` and one :class:`ResetEvery`.
    Position faults and Corrupt are claimed (``times`` counted) only when a body actually
    reaches them, so a response cut short earlier does not use them up, and among parallel
    ranged responses the first to get there is hit. HEAD bodies are empty: nothing to claim.

Accounting
    ``bytes_sent`` counts body bytes the kernel accepted for sending (headers excluded), including
    the partial body of a response that was reset. Before a deliberate reset the server waits
    (up to 0.5 s) for the client to acknowledge what was sent, so a reading client really gets
    ``after`` bytes before the RST. :attr:`FaultServer.requests` has one :class:`RequestRecord`
    per request. Records and counters are updated before the client can see the effect, so
    once a client has its response (or its reset) the stats already show it.

Threads
    One thread runs the accept loop, one thread per connection. :meth:`FaultServer.close` (also
    on leaving ``with``) stops accepting, wakes stalled and throttled responses, shuts down idle
    keep-alive connections and joins every thread it started.
"""

from __future__ import annotations

import email.utils
import enum
import errno
import fcntl
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import socket
import struct
import sys
import termios
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeAlias, cast
from urllib.parse import urlsplit

__all__ = [
    "Corrupt",
    "DeadEndpoint",
    "DeadKind",
    "Fault",
    "FaultServer",
    "HtmlPage",
    "IgnoreRange",
    "JsonError",
    "RequestRecord",
    "Reset",
    "ResetEvery",
    "SignedRedirect",
    "Stall",
    "Status",
    "Throttle",
    "Truncate",
    "refused_url",
]

HOST = "127.0.0.1"
BLOCK = 1 << 20
SIGNED_PREFIX = "/signed"
_DRAIN_TIMEOUT = 0.5
_XOR_TABLES: dict[int, bytes] = {}


# ---- fault rules ---------------------------------------------------------------------------


def _check_times(times: int | None) -> None:
    if times is not None and times < 1:
        raise ValueError(f"times must be >= 1 or None (forever), got {times}")


def _check_position(after: int | None, at: int | None) -> None:
    if (after is None) == (at is None):
        raise ValueError("give exactly one of after= (bytes into the body) or at= (file offset)")
    if (after if after is not None else at or 0) < 0:
        raise ValueError("positions must be >= 0")


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP RST (``SO_LINGER`` 0, then close) in the middle of a body.

    ``after``: after this many body bytes of the response. ``at``: just before the byte at this
    absolute file offset, in whichever response covers it (what a multi-connection client needs:
    "the transfer breaks around offset X"). Fires for ``times`` responses.
    """

    after: int | None = None
    at: int | None = None
    times: int | None = 1

    def __post_init__(self) -> None:
        _check_position(self.after, self.at)
        _check_times(self.times)


@dataclass(frozen=True)
class Truncate:
    """Promise the full Content-Length, then close cleanly (FIN) at the position (as in
    :class:`Reset`), so the client sees a short body without an error from the network."""

    after: int | None = None
    at: int | None = None
    times: int | None = 1

    def __post_init__(self) -> None:
        _check_position(self.after, self.at)
        _check_times(self.times)


@dataclass(frozen=True)
class Stall:
    """Stop sending for ``seconds`` at the position (as in :class:`Reset`), then ``then``:
    ``"continue"`` the body, ``"close"`` cleanly (a short body) or ``"reset"``. The connection
    stays open and silent meanwhile, as a hung CDN node would; closing the server ends it."""

    seconds: float
    after: int | None = None
    at: int | None = None
    then: Literal["continue", "close", "reset"] = "continue"
    times: int | None = 1

    def __post_init__(self) -> None:
        _check_position(self.after, self.at)
        _check_times(self.times)
        if self.seconds < 0 or self.then not in ("continue", "close", "reset"):
            raise ValueError(f"bad Stall: {self}")


@dataclass(frozen=True)
class ResetEvery:
    """Reset whichever connection is about to send the byte after each multiple of ``every``,
    counting the body bytes served for the path since injection, all requests together (a
    response that ends exactly on a multiple completes; the next one is reset before its first
    byte). ``times``: number of resets."""

    every: int
    times: int | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)
        if self.every < 1:
            raise ValueError("every must be >= 1")


@dataclass(frozen=True)
class Status:
    """Answer with ``code`` (and a short text body) instead of the content, for ``times``
    requests, after letting the first ``skip`` requests to the path through. Any method counts.

    ``retry_after``: an int (seconds), a datetime (sent as an HTTP-date) or a string sent
    verbatim (for malformed values). A 401 also carries ``WWW-Authenticate``.
    """

    code: int
    retry_after: int | datetime | str | None = None
    times: int | None = 1
    skip: int = 0
    body: bytes | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)
        if not 400 <= self.code <= 599 or self.skip < 0:
            raise ValueError(f"bad Status: {self}")


@dataclass(frozen=True)
class Corrupt:
    """Serve wrong bytes (each XORed with ``xor``), deterministically by file offset, so a bad
    mirror always serves the same wrong bytes wherever a range starts.

    ``ranges``: half-open ``(start, end)`` file offsets, every byte inside is flipped.
    ``every``: additionally one byte per ``every`` bytes, at offsets ``k * every + phase``.
    ``times`` counts responses whose body contains at least one flipped byte (None: forever).
    """

    ranges: tuple[tuple[int, int], ...] = ()
    every: int | None = None
    phase: int = 0
    xor: int = 0xFF
    times: int | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)
        if not self.ranges and self.every is None:
            raise ValueError("Corrupt needs ranges= or every=")
        if self.every is not None and not 0 <= self.phase < self.every:
            raise ValueError("phase must be in [0, every)")
        if not 1 <= self.xor <= 0xFF or any(not 0 <= a <= b for a, b in self.ranges):
            raise ValueError(f"bad Corrupt: {self}")

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any byte in ``[start, end)`` is corrupted."""
        if any(a < end and start < b for a, b in self.ranges):
            return True
        return self.every is not None and _first_hit(start, self.every, self.phase) < end

    def apply(self, buf: bytearray, offset: int) -> None:
        """Corrupt ``buf``, which holds the file bytes starting at ``offset``, in place."""
        end = offset + len(buf)
        table = _xor_table(self.xor)
        for a, b in self.ranges:
            lo, hi = max(a, offset) - offset, min(b, end) - offset
            if lo < hi:
                buf[lo:hi] = buf[lo:hi].translate(table)
        if self.every is not None:
            for pos in range(_first_hit(offset, self.every, self.phase), end, self.every):
                buf[pos - offset] ^= self.xor


def _first_hit(start: int, every: int, phase: int) -> int:
    return start + (phase - start) % every


def _xor_table(xor: int) -> bytes:
    table = _XOR_TABLES.get(xor)
    if table is None:
        table = _XOR_TABLES[xor] = bytes(b ^ xor for b in range(256))
    return table


@dataclass(frozen=True)
class IgnoreRange:
    """Answer requests that carry ``Range`` with 200 and the full body, for ``times`` such
    requests. While the rule is active every response says ``Accept-Ranges: none``, or, with
    ``advertise=True``, still claims ``bytes`` (a server that lies)."""

    advertise: bool = False
    times: int | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)


@dataclass(frozen=True)
class HtmlPage:
    """A captive portal: answer with a small ``text/html`` login page (status ``status``)."""

    status: int = 200
    times: int | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)


@dataclass(frozen=True)
class JsonError:
    """An API gateway's soft error: ``application/json`` ``{"error": message}``."""

    message: str = "quota exceeded"
    status: int = 200
    times: int | None = None

    def __post_init__(self) -> None:
        _check_times(self.times)


@dataclass(frozen=True)
class SignedRedirect:
    """``GET/HEAD /path`` answers ``status`` (302) with ``Location: /signed/path?expires=T&sig=HEX``,
    a fresh URL each time. The signed URL serves the resource until it expires: ``ttl`` seconds of
    wall time after it was issued, and/or after ``max_uses`` requests; then, and for unknown
    signatures, it answers 403 with an S3-like XML body. Active until cleared."""

    ttl: float | None = 60.0
    max_uses: int | None = None
    status: int = 302

    def __post_init__(self) -> None:
        if self.ttl is None and self.max_uses is None:
            raise ValueError("a signed URL needs ttl= and/or max_uses=")
        if self.status not in (301, 302, 303, 307, 308):
            raise ValueError(f"not a redirect status: {self.status}")


@dataclass(frozen=True)
class Throttle:
    """Pace each response's body at ``bytes_per_second`` (per connection, in 20 slices a
    second), for ``times`` responses.

    ``shared=True`` makes it a link: ``bytes_per_second`` is then what all the responses it
    paces get together, so four connections share the rate one would get alone."""

    bytes_per_second: int
    times: int | None = None
    shared: bool = False

    def __post_init__(self) -> None:
        _check_times(self.times)
        if self.bytes_per_second < 1:
            raise ValueError("bytes_per_second must be >= 1")


Fault: TypeAlias = (
    Reset
    | Truncate
    | Stall
    | ResetEvery
    | Status
    | Corrupt
    | IgnoreRange
    | HtmlPage
    | JsonError
    | SignedRedirect
    | Throttle
)


# ---- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One answered request. ``path`` is as requested (``/signed/x`` for a signed hop),
    ``resource`` the served path (``/x``); ``headers`` has lower-case names; ``faults`` names the
    rules that acted on it (``"Reset"``, ``"Status"``...), in the order they acted.
    ``finished``: the server is done with it (set before a reset, but it may lag a moment
    behind a client that has read a complete body)."""

    seq: int
    method: str
    path: str
    query: str
    resource: str
    headers: Mapping[str, str]
    status: int
    body_bytes: int
    faults: tuple[str, ...]
    client_port: int
    finished: bool
    arrived: float  # time.monotonic() when the request head had been read
    arrived_wall: float  # time.time() then (to compare with a signed URL's expiry)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def if_range(self) -> str | None:
        return self.headers.get("if-range")


# ---- internal state ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Resource:
    data: bytes | None
    file: Path | None
    size: int
    etag: str | None
    last_modified: int | None  # unix seconds
    content_type: str

    @property
    def last_modified_http(self) -> str | None:
        if self.last_modified is None:
            return None
        return email.utils.formatdate(self.last_modified, usegmt=True)


@dataclass
class _Armed:
    """A rule plus its mutable counters (guarded by the server lock)."""

    rule: Fault
    left: int | None
    seen: int = 0  # Status: requests to the path since injection
    served: int = 0  # ResetEvery: bytes served since the last reset


@dataclass
class _Ticket:
    path: str
    deadline: float | None
    uses_left: int | None


@dataclass(frozen=True)
class _Canned:
    """A complete small response."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class _Event:
    """A Reset, Truncate or Stall that fits in a response, at body position ``at``."""

    at: int
    armed: _Armed


@dataclass(frozen=True)
class _Stream:
    """A content response: bytes ``[start, end)`` of the resource and the body faults that may
    act on it. Position faults and corruption are only claimed when the body reaches them."""

    resource: _Resource
    status: int
    start: int
    end: int
    headers: tuple[tuple[str, str], ...]
    events: tuple[_Event, ...] = ()  # sorted by position
    corrupt: tuple[_Armed, ...] = ()
    throttle: int | None = None
    shared: bool = False  # the throttle is the server's link, shared with other responses
    reset_every: _Armed | None = None


@dataclass
class _Exchange:
    seq: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    client_port: int
    arrived: float
    arrived_wall: float
    resource: str = ""
    status: int = 0
    body_bytes: int = 0
    faults: list[str] = field(default_factory=list)
    finished: bool = False

    def record(self) -> RequestRecord:
        return RequestRecord(
            seq=self.seq,
            method=self.method,
            path=self.path,
            query=self.query,
            resource=self.resource,
            headers=dict(self.headers),
            status=self.status,
            body_bytes=self.body_bytes,
            faults=tuple(self.faults),
            client_port=self.client_port,
            finished=self.finished,
            arrived=self.arrived,
            arrived_wall=self.arrived_wall,
        )


class _Aborted(Exception):
    """The server is closing: stop this response and drop the connection."""


class _CorruptState:
    """The Corrupt rules of one response: each is claimed when the body first reaches one of
    its bytes, and then applies to the rest of the response (or never, if used up by then)."""

    def __init__(self, candidates: tuple[_Armed, ...]) -> None:
        self._pending = list(candidates)
        self._active: list[Corrupt] = []

    def hits(self, start: int, end: int, owner: FaultServer, ex: _Exchange) -> list[Corrupt]:
        for armed in [a for a in self._pending if cast(Corrupt, a.rule).overlaps(start, end)]:
            self._pending.remove(armed)
            if owner._claim(armed, ex):
                self._active.append(cast(Corrupt, armed.rule))
        return [c for c in self._active if c.overlaps(start, end)]


# ---- the server ----------------------------------------------------------------------------


class FaultServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 (port chosen by the OS) serving added resources
    with injectable faults. Thread-safe: resources, faults and stats may change at any time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._resources: dict[str, _Resource] = {}
        self._faults: dict[str, list[_Armed]] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._exchanges: list[_Exchange] = []  # one per answered request
        self._errors: list[str] = []
        self._sent_total = 0
        self._sent_by_path: dict[str, int] = {}
        self._link_free = 0.0  # a shared Throttle: when the link is next free (monotonic)
        self._seq = itertools.count(1)
        self._serial = itertools.count(1)
        self._token = secrets.token_hex(4)  # ETags differ between servers, as real mirrors' do
        self._secret = secrets.token_bytes(16)

    # -- lifecycle --

    def start(self) -> FaultServer:
        """Bind 127.0.0.1:0 and start serving; returns self."""
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._closing.clear()
        self._httpd = _HTTPServer(self)
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.01},  # close() waits up to one interval
            name=f"faultserver:{self.port}:accept",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def close(self) -> None:
        """Stop serving, drop every connection (idle keep-alive ones included) and join every
        thread the server started; RuntimeError if one is still alive after 10 s."""
        httpd = self._httpd
        if httpd is None:
            return
        self._closing.set()  # wakes stalls, throttles and drains
        httpd.shutdown()
        assert self._serve_thread is not None
        self._serve_thread.join()
        httpd.server_close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            # Wakes a handler blocked reading the next keep-alive request or sending a body.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(timeout=10)
        self._httpd = None
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"faultserver threads still running after close: {alive}")

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except RuntimeError:
            if exc is None:
                raise

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (which may carry a query string)."""
        return self.base_url + _norm(path)

    # -- content --

    def add(
        self,
        path: str,
        content: bytes | Path,
        *,
        etag: bool | str = True,
        last_modified: bool = True,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Serve ``content`` (bytes, or a file served with sendfile) at ``path``. ``etag``: True
        for a generated strong ETag, a string for that exact tag (e.g. shared by mirrors)."""
        path = _norm(path)
        with self._lock:
            self._resources[path] = self._make_resource(
                path, content, etag, last_modified, content_type
            )

    def replace(self, path: str, content: bytes | Path, *, etag: str | None = None) -> None:
        """Change the content upstream: new bytes, a new ETag (generated unless given) and a
        strictly later Last-Modified. In-flight responses finish with what they started.
        A file is opened per response, so give a new file rather than rewriting the old one."""
        path = _norm(path)
        with self._lock:
            old = self._resources[path]
            tag: bool | str = etag if etag is not None else old.etag is not None
            self._resources[path] = self._make_resource(
                path, content, tag, old.last_modified is not None, old.content_type
            )

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (later requests get 404)."""
        with self._lock:
            del self._resources[_norm(path)]

    def etag(self, path: str) -> str | None:
        """The current ETag of ``path``, quotes included."""
        with self._lock:
            return self._resources[_norm(path)].etag

    def last_modified(self, path: str) -> str | None:
        """The current Last-Modified of ``path`` as an HTTP-date."""
        with self._lock:
            return self._resources[_norm(path)].last_modified_http

    def _make_resource(
        self, path: str, content: bytes | Path, etag: bool | str, last_modified: bool, ctype: str
    ) -> _Resource:
        # bytes(str) would fail with "string argument without an encoding", naming nothing.
        if isinstance(content, str):
            raise TypeError(
                f"FaultServer content for {path} must be bytes or a pathlib.Path, not a str"
                f" ({content[:40]!r}): wrap a file name in Path(), encode text."
            )
        if isinstance(content, Path):
            data, file, size = None, content, content.stat().st_size
        else:
            data, file, size = bytes(content), None, len(content)
        tag: str | None = None
        if isinstance(etag, str):
            tag = etag if etag.startswith('"') else f'"{etag}"'
        elif etag:
            tag = f'"{self._token}-{next(self._serial)}-{size:x}"'
        stamp: int | None = None
        if last_modified:
            old = self._resources.get(path)
            prev = old.last_modified if old and old.last_modified is not None else 0
            stamp = max(int(time.time()), prev + 1)  # a replace must change the date
        return _Resource(data, file, size, tag, stamp, ctype)

    # -- faults --

    def inject(self, path: str, *faults: Fault) -> None:
        """Arm ``faults`` for ``path`` (added after those already armed)."""
        with self._lock:
            armed = self._faults.setdefault(_norm(path), [])
            armed.extend(_Armed(f, getattr(f, "times", None)) for f in faults)

    def clear_faults(self, path: str | None = None) -> None:
        """Disarm every fault of ``path``, or of every path, also in responses already under
        way (except a Throttle already pacing one). Issued signed URLs stay valid."""
        with self._lock:
            paths = list(self._faults) if path is None else [_norm(path)]
            for p in paths:
                for armed in self._faults.pop(p, []):
                    armed.left = 0  # in-flight responses check this before a fault fires

    def active_faults(self, path: str) -> tuple[Fault, ...]:
        """The rules of ``path`` that are not exhausted yet."""
        with self._lock:
            return tuple(a.rule for a in self._faults.get(_norm(path), []))

    # -- stats --

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent on all paths since start or :meth:`reset_stats`."""
        with self._lock:
            return self._sent_total

    def bytes_sent_for(self, path: str) -> int:
        """Body bytes sent for the resource ``path`` (its signed URLs included)."""
        with self._lock:
            return self._sent_by_path.get(_norm(path), 0)

    @property
    def requests(self) -> list[RequestRecord]:
        """Records of the requests so far, in the order the server began answering them (a
        snapshot: in-flight ones have ``finished=False`` and the body bytes sent so far)."""
        with self._lock:
            return [ex.record() for ex in self._exchanges]

    def requests_for(self, path: str) -> list[RequestRecord]:
        """Records whose resource is ``path`` (signed hops included)."""
        path = _norm(path)
        return [r for r in self.requests if r.resource == path]

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions in handlers (client disconnects excluded)."""
        with self._lock:
            return list(self._errors)

    def reset_stats(self) -> None:
        """Forget records and byte counters (resources and faults stay)."""
        with self._lock:
            self._exchanges.clear()
            self._sent_total = 0
            self._sent_by_path.clear()

    # -- used by the handler --

    # Records and counters are updated *before* the client can see the effect (a response
    # starting, bytes arriving, a reset), so a test that has seen it also sees it in the stats.

    def _begin(self, ex: _Exchange) -> None:
        with self._lock:
            self._exchanges.append(ex)

    def _account(self, ex: _Exchange, n: int) -> None:
        """Count ``n`` body bytes (negative: take back bytes counted but not sent)."""
        with self._lock:
            ex.body_bytes += n
            self._sent_total += n
            self._sent_by_path[ex.resource] = self._sent_by_path.get(ex.resource, 0) + n

    def _note(self, ex: _Exchange, fault: str) -> None:
        with self._lock:
            ex.faults.append(fault)

    def _finish(self, ex: _Exchange) -> None:
        with self._lock:
            ex.finished = True

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _link_wait(self, rate: int, n: int) -> float:
        """A shared Throttle: book the link for ``n`` bytes; the seconds until they may go."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._link_free)
            self._link_free = start + n / rate
        return start - now

    def _reserve(self, armed: _Armed, n: int) -> tuple[int, bool]:
        """ResetEvery: how many of the next ``n`` bytes may go out, and whether to reset after."""
        rule = cast(ResetEvery, armed.rule)
        with self._lock:
            if armed.left == 0:
                return n, False
            if armed.served + n <= rule.every:
                armed.served += n
                return n, False
            allowed = rule.every - armed.served
            armed.served = 0
            if armed.left is not None:
                armed.left -= 1
                self._drop_exhausted_locked(armed)
            return allowed, True

    def _drop_exhausted_locked(self, armed: _Armed) -> None:
        if armed.left == 0:
            for rules in self._faults.values():
                if armed in rules:
                    rules.remove(armed)

    def _use(self, armed: _Armed, ex: _Exchange) -> None:
        """Count one firing of a rule (lock held)."""
        ex.faults.append(type(armed.rule).__name__)
        if armed.left is not None:
            armed.left -= 1
            self._drop_exhausted_locked(armed)

    def _claim(self, armed: _Armed, ex: _Exchange) -> bool:
        """Fire a body fault the response has reached, unless it is used up meanwhile."""
        with self._lock:
            if armed.left == 0:
                return False
            self._use(armed, ex)
            return True

    def _decide(self, ex: _Exchange) -> _Canned | _Stream:
        """Plan the response to one request (everything the faults decide happens here)."""
        path, head = ex.path, ex.method == "HEAD"
        signed = path.startswith(SIGNED_PREFIX + "/")
        resource_path = path[len(SIGNED_PREFIX) :] if signed else path
        ex.resource = resource_path
        with self._lock:
            armed = list(self._faults.get(resource_path, []))

            fire: _Armed | None = None
            for a in armed:
                if isinstance(a.rule, Status):
                    a.seen += 1  # every Status rule counts the request towards its skip
                    if fire is None and a.seen > a.rule.skip:
                        fire = a
            if fire is not None:
                self._use(fire, ex)
                return _status_response(cast(Status, fire.rule))
            for a in armed:
                if isinstance(a.rule, (HtmlPage, JsonError)):
                    self._use(a, ex)
                    return _soft_error(a.rule)

            redirect = next((a.rule for a in armed if isinstance(a.rule, SignedRedirect)), None)
            if signed:
                denied = self._check_ticket_locked(resource_path, ex.query)
                if denied is not None:
                    return denied
            elif redirect is not None:
                ex.faults.append("SignedRedirect")
                return self._issue_ticket_locked(resource_path, redirect)

            res = self._resources.get(resource_path)
            if res is None:
                return _text(404, "not found")

            ignore = next((a for a in armed if isinstance(a.rule, IgnoreRange)), None)
            headers = _content_headers(res, ignore)
            rng = None if head else ex.headers.get("range")
            if rng is not None and ignore is not None:
                self._use(ignore, ex)
                rng = None
            if rng is not None and "if-range" in ex.headers:
                if not _if_range_matches(ex.headers["if-range"], res):
                    rng = None
            span = _parse_range(rng, res.size) if rng is not None else None
            if span == "unsatisfiable":
                return _Canned(
                    416,
                    (("Content-Range", f"bytes */{res.size}"), ("Content-Type", "text/plain")),
                    b"range not satisfiable\n",
                )
            if span is None:
                status, start, end = 200, 0, res.size
            else:
                status, (start, end) = 206, span
                headers += (("Content-Range", f"bytes {start}-{end - 1}/{res.size}"),)
            headers += (("Content-Length", str(end - start)),)
            if head:
                return _Stream(res, status, start, start, headers)
            return self._body_faults_locked(armed, ex, res, status, start, end, headers)

    def _body_faults_locked(
        self,
        armed: list[_Armed],
        ex: _Exchange,
        res: _Resource,
        status: int,
        start: int,
        end: int,
        headers: tuple[tuple[str, str], ...],
    ) -> _Stream:
        total = end - start
        events: list[_Event] = []
        corrupt: list[_Armed] = []
        throttle: int | None = None
        shared = False
        reset_every: _Armed | None = None
        for a in armed:
            rule = a.rule
            if isinstance(rule, (Reset, Truncate, Stall)):
                rel = rule.after if rule.after is not None else cast(int, rule.at) - start
                if 0 <= rel < total:
                    events.append(_Event(rel, a))
            elif isinstance(rule, Corrupt) and rule.overlaps(start, end):
                corrupt.append(a)
            elif isinstance(rule, Throttle) and throttle is None and total:
                throttle, shared = rule.bytes_per_second, rule.shared
                self._use(a, ex)
            elif isinstance(rule, ResetEvery) and reset_every is None:
                reset_every = a
        # At one position a stall comes first: it can end in a close or reset itself.
        events.sort(key=lambda e: (e.at, not isinstance(e.armed.rule, Stall)))
        return _Stream(
            res,
            status,
            start,
            end,
            headers,
            tuple(events),
            tuple(corrupt),
            throttle,
            shared,
            reset_every,
        )

    def _issue_ticket_locked(self, path: str, rule: SignedRedirect) -> _Canned:
        now = time.time()
        deadline = None if rule.ttl is None else now + rule.ttl
        expires = int(deadline if deadline is not None else now + 365 * 86400)
        msg = f"{path}\n{expires}\n{next(self._serial)}".encode()
        sig = hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]
        self._tickets[sig] = _Ticket(path, deadline, rule.max_uses)
        location = f"{self.base_url}{SIGNED_PREFIX}{path}?expires={expires}&sig={sig}"
        return _Canned(
            rule.status,
            (("Location", location), ("Content-Type", "text/plain"), ("Cache-Control", "no-store")),
            b"redirecting to a signed URL\n",
        )

    def _check_ticket_locked(self, path: str, query: str) -> _Canned | None:
        """None if the signed URL is valid (and count one use), else the 403 to send."""
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        ticket = self._tickets.get(params.get("sig", ""))
        if ticket is None or ticket.path != path:
            return _s3_denied("SignatureDoesNotMatch", "The request signature is not valid.")
        expired = ticket.deadline is not None and time.time() >= ticket.deadline
        if expired or ticket.uses_left == 0:
            return _s3_denied("AccessDenied", "Request has expired")
        if ticket.uses_left is not None:
            ticket.uses_left -= 1
        return None


# ---- response building ---------------------------------------------------------------------


def _norm(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def _text(code: int, text: str) -> _Canned:
    return _Canned(code, (("Content-Type", "text/plain; charset=utf-8"),), (text + "\n").encode())


def _status_response(rule: Status) -> _Canned:
    try:
        phrase = HTTPStatus(rule.code).phrase
    except ValueError:
        phrase = ""
    body = rule.body if rule.body is not None else f"{rule.code} {phrase}\n".encode()
    headers: list[tuple[str, str]] = [("Content-Type", "text/plain; charset=utf-8")]
    if isinstance(rule.retry_after, datetime):
        headers.append(("Retry-After", email.utils.format_datetime(rule.retry_after, usegmt=True)))
    elif rule.retry_after is not None:
        headers.append(("Retry-After", str(rule.retry_after)))
    if rule.code == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="faultserver"'))
    return _Canned(rule.code, tuple(headers), body)


_LOGIN_PAGE = b"""<!DOCTYPE html>
<html><head><title>Sign in to continue</title></head>
<body><h1>Welcome to Guest Wi-Fi</h1>
<form method="post" action="/login"><input name="user"><input name="password" type="password">
<button>Sign in</button></form></body></html>
"""


def _soft_error(rule: HtmlPage | JsonError) -> _Canned:
    if isinstance(rule, HtmlPage):
        return _Canned(rule.status, (("Content-Type", "text/html; charset=utf-8"),), _LOGIN_PAGE)
    body = json.dumps({"error": rule.message}).encode()
    return _Canned(rule.status, (("Content-Type", "application/json"),), body)


def _s3_denied(code: str, message: str) -> _Canned:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>\n"
    return _Canned(403, (("Content-Type", "application/xml"),), body.encode())


def _content_headers(res: _Resource, ignore: _Armed | None) -> tuple[tuple[str, str], ...]:
    advertise = ignore is None or cast(IgnoreRange, ignore.rule).advertise
    headers = [
        ("Content-Type", res.content_type),
        ("Accept-Ranges", "bytes" if advertise else "none"),
    ]
    if res.etag is not None:
        headers.append(("ETag", res.etag))
    lm = res.last_modified_http
    if lm is not None:
        headers.append(("Last-Modified", lm))
    return tuple(headers)


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)


def _parse_range(value: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """``(start, end)`` half-open, "unsatisfiable", or None to ignore the header (invalid or
    multi-range: RFC 9110 lets a server ignore Range and send 200)."""
    m = _RANGE_RE.fullmatch(value.replace(" ", ""))
    if m is None:
        return None
    first, last = m.groups()
    if not first:
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    a = int(first)
    b = int(last) if last else size - 1
    if last and b < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(b, size - 1) + 1


def _if_range_matches(value: str, res: _Resource) -> bool:
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return res.etag is not None and value == res.etag  # strong comparison: W/ never equals
    if res.last_modified is None:
        return False
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(when.timestamp()) == res.last_modified


# ---- the HTTP layer ------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # aria2c & co open many connections at once

    def __init__(self, owner: FaultServer) -> None:
        self.owner = owner
        super().__init__((HOST, 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can be slow; not needed.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        # Our own thread bookkeeping: daemon threads are not joined by server_close(), and we
        # must join them all on close (the test suite fails on leaked threads).
        owner = self.owner
        with owner._lock:
            closing = owner._closing.is_set()
            if not closing:
                owner._threads = [t for t in owner._threads if t.is_alive()]
                owner._conns.add(request)
                t = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name=f"faultserver:{self.server_port}:conn:{client_address[1]}",
                    daemon=True,
                )
                owner._threads.append(t)
                t.start()
        # Outside the lock: shutdown_request takes it too, and it is not reentrant (a connection
        # accepted while close() ran deadlocked the accept thread, and close() with it).
        if closing:
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self.owner._lock:
            self.owner._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if _is_disconnect(exc) or self.owner._closing.is_set():
            return
        self.owner._error(traceback.format_exc())


def _is_disconnect(exc: BaseException | None) -> bool:
    return isinstance(exc, (ConnectionError, _Aborted)) or (
        isinstance(exc, OSError)
        and exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN)
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultserver/1"
    server: _HTTPServer
    _exchange: _Exchange  # the request being answered

    def setup(self) -> None:
        super().setup()
        # Headers and body are separate writes: without NODELAY, Nagle + delayed ACK add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the records are the log

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        ex = _Exchange(
            seq=next(owner._seq),
            method=self.command,
            path=url.path,
            query=url.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            client_port=int(self.client_address[1]),
            arrived=time.monotonic(),
            arrived_wall=time.time(),
        )
        plan = owner._decide(ex)
        ex.status = plan.status
        self._exchange = ex
        owner._begin(ex)
        try:
            if isinstance(plan, _Canned):
                self._send_canned(plan, ex)
            else:
                self._send_head(plan.status, plan.headers)
                if self.command == "GET":
                    self._stream(plan, ex)
        except (OSError, _Aborted) as e:
            self.close_connection = True
            if not _is_disconnect(e):
                raise
        finally:
            owner._finish(ex)

    def _send_head(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _send_canned(self, plan: _Canned, ex: _Exchange) -> None:
        self._send_head(plan.status, (*plan.headers, ("Content-Length", str(len(plan.body)))))
        if self.command == "GET":
            self._send_buffer(memoryview(plan.body), ex)

    # -- bodies --

    def _stream(self, plan: _Stream, ex: _Exchange) -> None:
        owner = self.server.owner
        res = plan.resource
        fd = os.open(res.file, os.O_RDONLY) if res.file is not None else -1
        try:
            total, pos = plan.end - plan.start, 0
            events = list(plan.events)
            corrupt = _CorruptState(plan.corrupt)
            t0 = time.monotonic()
            while True:
                while events and events[0].at == pos:
                    armed = events.pop(0).armed
                    if owner._claim(armed, ex) and self._act(armed.rule):
                        return  # the response ended here
                if pos >= total:
                    return
                n = min(BLOCK, total - pos)
                if events:
                    n = min(n, events[0].at - pos)
                if plan.throttle is not None:
                    n = min(n, max(1, plan.throttle // 20))
                    if plan.shared:
                        delay = owner._link_wait(plan.throttle, n)
                        if delay > 0 and owner._closing.wait(delay):
                            raise _Aborted
                fire = False
                if plan.reset_every is not None:
                    n, fire = owner._reserve(plan.reset_every, n)
                self._send_slice(fd, res, plan.start + pos, n, corrupt, ex)
                pos += n
                if fire:
                    owner._note(ex, "ResetEvery")
                    self._reset()
                    return
                if plan.throttle is not None and not plan.shared and pos < total:
                    delay = t0 + pos / plan.throttle - time.monotonic()
                    if delay > 0 and owner._closing.wait(delay):
                        raise _Aborted
        finally:
            if fd >= 0:
                os.close(fd)

    def _act(self, rule: Fault) -> bool:
        """Carry out a Reset, Truncate or Stall; True if that ended the response."""
        if isinstance(rule, Stall):
            if self.server.owner._closing.wait(rule.seconds):
                raise _Aborted
            if rule.then == "continue":
                return False
            if rule.then == "reset":
                self._reset()
        elif isinstance(rule, Reset):
            self._reset()
        self.close_connection = True  # Truncate, or a Stall that closes: a clean FIN
        return True

    def _send_slice(
        self,
        fd: int,
        res: _Resource,
        offset: int,
        n: int,
        corrupt: _CorruptState,
        ex: _Exchange,
    ) -> None:
        """Send file bytes ``[offset, offset + n)``, counting every partial write."""
        owner = self.server.owner
        hits = corrupt.hits(offset, offset + n, owner, ex)
        if not hits and fd >= 0:
            out = self.connection.fileno()
            while n:
                owner._account(ex, n)  # counted up front, corrected below
                try:
                    k = os.sendfile(out, fd, offset, n)
                except BaseException:
                    owner._account(ex, -n)
                    raise
                if k < n:
                    owner._account(ex, k - n)
                if k == 0:
                    raise RuntimeError(f"{res.file} shrank while being served")
                offset, n = offset + k, n - k
            return
        if fd >= 0:
            buf = bytearray(n)
            got = os.preadv(fd, [buf], offset)
            if got != n:
                raise RuntimeError(f"{res.file} shrank while being served")
        else:
            buf = bytearray(cast(bytes, res.data)[offset : offset + n])
        for c in hits:
            c.apply(buf, offset)
        self._send_buffer(memoryview(buf), ex)

    def _send_buffer(self, view: memoryview, ex: _Exchange) -> None:
        owner = self.server.owner
        while view:
            n = len(view)
            owner._account(ex, n)  # counted up front, corrected below
            try:
                k = self.connection.send(view)
            except BaseException:
                owner._account(ex, -n)
                raise
            if k < n:
                owner._account(ex, k - n)
            view = view[k:]

    def _reset(self) -> None:
        """Abort the connection with RST, after the client has received what was sent."""
        sock = self.connection
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while time.monotonic() < deadline and not self.server.owner._closing.is_set():
            # Unacknowledged bytes in the send queue: an RST would discard them.
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
            except OSError:
                break
            if queued[0] <= 0:
                break
            time.sleep(0.001)
        self.server.owner._finish(self._exchange)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # socket.close() only closes the fd once no makefile() reader is open: close rfile first.
        self.rfile.close()
        sock.close()
        self.close_connection = True


# ---- endpoints that are down ---------------------------------------------------------------


class DeadKind(enum.Enum):
    REFUSE = "refuse"  # nothing listens: connect() fails with ECONNREFUSED
    BLACKHOLE = "blackhole"  # listens but never accepts: connect() works, no byte ever comes back
    RESET = "reset"  # accepts every connection and resets it (RST) at once


class DeadEndpoint:
    """A 127.0.0.1 port that is down in the way ``kind`` says, for "mirror is down" tests.

    REFUSE keeps the port bound (not listening) while open, so no one else can take it.
    """

    def __init__(self, kind: DeadKind = DeadKind.REFUSE) -> None:
        self.kind = kind
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> DeadEndpoint:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self._sock = sock
        if self.kind is not DeadKind.REFUSE:
            sock.listen(128)
        if self.kind is DeadKind.RESET:
            sock.settimeout(0.05)
            self._thread = threading.Thread(
                target=self._reset_loop, name=f"deadendpoint:{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def _reset_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DeadEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("not started")
        return int(self._sock.getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + _norm(path)


def refused_url(path: str = "/") -> str:
    """A URL on a 127.0.0.1 port that nothing listens on (bound, then released: another process
    could take the port meanwhile; :class:`DeadEndpoint` holds it instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    return f"http://{HOST}:{port}{_norm(path)}"
