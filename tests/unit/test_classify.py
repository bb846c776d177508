"""The error classifier: any failure becomes a code, a one-line message and actions.

Exceptions are real objects: requests/urllib3 errors come from real requests to a server on
127.0.0.1 where that is cheap, OSErrors from real system calls where possible, and the git and
pip output the tables are checked against comes from really running git and pip (offline:
local repositories, a local HTTP server, hand-made wheels, a closed port).
"""

from __future__ import annotations

import base64
import email.utils
import errno
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import urllib3

from snapfs._classify import (
    ACTIONS,
    ERRNO_TABLE,
    KINDS,
    Action,
    Classifier,
    Diagnosis,
    ErrnoRule,
    Kind,
    OutputRule,
    classify,
    default_classifier,
    exception_chain,
    tool_name,
)
from snapfs._errors import (
    BadContent,
    Category,
    CommandFailed,
    DiskFull,
    DownloadError,
    DownloadFailed,
    FilesystemError,
    HashMismatch,
    LockBusy,
    NotAProject,
    ObjectCorrupt,
    ObjectMissing,
    PlanError,
    ProjectPathError,
    SealBroken,
    SnapfsError,
    SnapshotNotFound,
    SourceUnavailable,
    StateCorrupt,
    UnsafePath,
    UsageError,
    from_oserror,
)
from snapfs._fsops import split_relpath
from snapfs._lock import Lock

ROOT = Path(__file__).resolve().parents[2]
ERRNO_NAME = re.compile(r"\bE[A-Z]{2,}[A-Z0-9]*\b")  # ENOSPC, EACCES, ENAMETOOLONG...
TYPE_NAME = re.compile(r"[A-Za-z]+(Error|Exception|Timeout)\b")  # ConnectionError, ReadTimeout...


def ok(d: Diagnosis, code: str) -> Diagnosis:
    """``d`` has ``code`` and keeps the contract every diagnosis must keep."""
    assert d.code == code, f"expected {code}, got {d.code}: {d.message}\n{d.detail}"
    assert_contract(d)
    return d


def assert_contract(d: Diagnosis) -> None:
    assert isinstance(d.category, Category)
    assert d.message and "\n" not in d.message and d.message == d.message.strip()
    assert d.message[0].isupper() and d.message.endswith("."), d.message
    assert len(d.message) <= 300, d.message
    assert not ERRNO_NAME.search(d.message), d.message
    assert not TYPE_NAME.search(d.message), d.message
    for jargon in ("Traceback", "errno", "Errno", 'File "', "0x"):
        assert jargon not in d.message, d.message
    assert d.actions, d
    assert all(isinstance(a, Action) and a.label for a in d.actions)
    assert d.detail
    assert d.retry_after is None or d.retry_after >= 0
    kind = KINDS[d.code]
    assert d.actions == kind.actions


# ---- local servers -------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0 (one request per connection): nothing outlives the request."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
            self.send_response(status)
            retry_after = self.headers.get("X-Retry-After")
            if retry_after:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/broken-chunked":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx")
            self.wfile.flush()
            self.close_connection = True
        elif path == "/truncated":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            self.wfile.flush()
            self.close_connection = True
        elif path.startswith("/auth/"):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="models"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/forbidden/"):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/down/"):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/cut/"):
            self.close_connection = True  # no answer at all
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_server() -> Iterator[str]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(
        target=srv.serve_forever, args=(0.05,), name="test-classify-http", daemon=True
    )
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


@pytest.fixture
def server() -> Iterator[str]:
    with http_server() as url:
        yield url


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # no proxy from the environment between us and 127.0.0.1
    yield s
    s.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # whatever it raised, Ctrl-C included
        return exc
    raise AssertionError("expected an exception")


# ---- the catalog and the contract ----------------------------------------------------------
@pytest.mark.parametrize("code", sorted(KINDS))
@pytest.mark.parametrize("context", ["", "downloading models/x.safetensors"])
def test_every_kind_renders_one_plain_line_with_actions(code: str, context: str) -> None:
    kind = KINDS[code]
    d = kind.diagnose(
        context, detail="x", path="models/x.bin", pkg="torch", tool="gcc", text="Bad input."
    )
    ok(d, code)
    assert (d.category, d.retryable) == (kind.category, kind.retryable)
    if context:
        assert d.message.startswith("Downloading models/x.safetensors stopped: ")
    assert "{" not in d.message and "}" not in d.message


def test_kinds_without_fields_read_naturally() -> None:
    d = KINDS["fs.permission"].diagnose()
    assert d.message == (
        "Access to that path was denied. Check who owns it and its permissions, then try again."
    )


def test_every_action_is_in_the_catalog_and_ids_are_unique() -> None:
    assert all(ACTIONS[a.id] is a for k in KINDS.values() for a in k.actions)
    used = {a.id for k in KINDS.values() for a in k.actions}
    assert used == set(ACTIONS), "an action nobody offers, or one missing from ACTIONS"
    for required in (
        "retry resume next-source free-space rollback check-url login check-permissions"
        " fix-plan pin-version install-build-tools report-bug"
    ).split():
        assert required in ACTIONS


def test_codes_are_stable_dotted_ids() -> None:
    for code in KINDS:
        assert re.fullmatch(r"[a-z0-9]+(\.[a-z0-9x-]+)?", code), code


def _docs_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m is None:
            continue
        cells = re.split(r"(?<!\\)\|", m.group(2))
        if len(cells) == 4:  # the codes table (the actions table has 2 columns)
            rows[m.group(1)] = [c.strip() for c in cells]
    return rows


def test_docs_table_lists_every_code_as_it_is() -> None:
    rows = _docs_rows()
    assert set(rows) == set(KINDS), "docs/errors.md and KINDS list different codes"
    for code, kind in KINDS.items():
        category, retryable, message, actions = rows[code]
        assert category == kind.category.value, code
        assert retryable == ("yes" if kind.retryable else "no"), code
        assert message == f"{kind.reason}. {kind.advice}.".replace("|", "\\|"), code
        assert actions == ", ".join(f"`{a.id}`" for a in kind.actions), code


def test_as_dict_is_json_ready() -> None:
    d = classify(OSError(errno.ENOSPC, "No space left on device"), "saving x")
    data = json.loads(json.dumps(d.as_dict()))
    assert data["code"] == "disk.full" and data["category"] == "system"
    assert data["actions"][0] == {"id": "free-space", "label": "Free up disk space, then resume"}


def test_classifying_never_imports_requests() -> None:
    code = (
        "import sys, errno, socket\n"
        "import snapfs._classify as c\n"
        "for e in (OSError(errno.ENOSPC, 'x'), TimeoutError(), ValueError('x'),"
        " c.CommandFailed('x', tool='git', output='early EOF')):\n"
        "    c.classify(e)\n"
        "assert 'requests' not in sys.modules, 'requests was imported'\n"
        "assert 'urllib3' not in sys.modules, 'urllib3 was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


# ---- context makes the message specific ----------------------------------------------------
def test_context_names_what_was_going_on() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/p/models/x.safetensors")
    d = ok(classify(exc, "downloading models/x.safetensors"), "disk.full")
    assert d.message == (
        "Downloading models/x.safetensors stopped: the disk is full."
        " Free up disk space, then resume."
    )
    assert ok(classify(exc), "disk.full").message == (
        "The disk is full. Free up disk space, then resume."
    )


def test_a_multi_line_context_still_gives_one_line() -> None:
    d = ok(
        classify(TimeoutError(), "installing\nrequirements for ComfyUI-Manager\n"), "net.timeout"
    )
    assert d.message.startswith("Installing requirements for ComfyUI-Manager stopped: ")


# ---- requests and urllib3 (real responses and real failures) -------------------------------
@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (401, "http.401", False),
        (403, "http.403", False),
        (404, "http.404", False),
        (410, "http.410", False),
        (408, "http.408", True),
        (429, "http.429", True),
        (500, "http.5xx", True),
        (502, "http.5xx", True),
        (503, "http.5xx", True),
        (504, "http.5xx", True),
        (418, "http.4xx", False),
    ],
)
def test_http_error_by_status(
    server: str, session: requests.Session, status: int, code: str, retryable: bool
) -> None:
    resp = session.get(f"{server}/status/{status}")
    exc = raised(resp.raise_for_status)
    assert isinstance(exc, requests.HTTPError)
    d = ok(classify(exc, "downloading models/x.safetensors"), code)
    assert d.retryable is retryable and d.category is Category.NETWORK
    assert d.retry_after is None
    assert f"HTTP status: {status}" in d.detail and f"/status/{status}" in d.detail
    if status in (401, 403):
        assert d.actions[0].id == "login"
    if status in (404, 410):
        assert {a.id for a in d.actions} == {"check-url", "next-source"}


def test_retry_after_in_seconds_is_kept(server: str, session: requests.Session) -> None:
    resp = session.get(f"{server}/status/429", headers={"X-Retry-After": "7"})
    d = ok(classify(raised(resp.raise_for_status)), "http.429")
    assert d.retry_after == 7.0
    assert "in about 7 seconds" in d.message
    assert "Retry-After: 7" in d.detail


def test_retry_after_as_an_http_date(server: str, session: requests.Session) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    resp = session.get(f"{server}/status/503", headers={"X-Retry-After": when})
    d = ok(classify(raised(resp.raise_for_status)), "http.5xx")
    assert d.retry_after is not None and 100 <= d.retry_after <= 121
    assert "about 2 minutes" in d.message


@pytest.mark.parametrize("value", ["soon", "\u00b2", "-5", ""])
def test_a_bad_retry_after_is_ignored(value: str) -> None:
    resp = requests.Response()
    resp.status_code = 503
    resp.headers["Retry-After"] = value
    resp.url = "https://h/x"
    d = ok(classify(raised(resp.raise_for_status)), "http.5xx")
    assert d.retry_after is None and "about" not in d.message


def test_retry_after_is_not_taken_for_a_404(server: str, session: requests.Session) -> None:
    resp = session.get(f"{server}/status/404", headers={"X-Retry-After": "5"})
    assert ok(classify(raised(resp.raise_for_status)), "http.404").retry_after is None


def test_http_error_without_a_response() -> None:
    ok(classify(requests.HTTPError("500 Server Error")), "net.error")


def test_connection_refused(session: requests.Session) -> None:
    exc = raised(lambda: session.get(f"http://127.0.0.1:{closed_port()}/x"))
    assert type(exc) is requests.ConnectionError
    d = ok(classify(exc, "downloading x"), "net.refused")
    assert d.retryable and d.category is Category.NETWORK


def test_read_timeout(session: requests.Session) -> None:
    with silent_listener() as port:
        exc = raised(lambda: session.get(f"http://127.0.0.1:{port}/x", timeout=0.3))
    assert isinstance(exc, requests.ReadTimeout)
    assert ok(classify(exc), "net.timeout").retryable


def test_connect_timeout() -> None:
    exc = requests.ConnectTimeout("HTTPSConnectionPool(host='hf.co', port=443): connect timeout")
    assert ok(classify(exc), "net.timeout").retryable
    assert ok(classify(requests.Timeout("timed out")), "net.timeout").retryable


def test_dns_failure() -> None:
    # What requests raises for an unknown host: ConnectionError(MaxRetryError(reason=
    # NameResolutionError(..., gaierror))). Built by hand: a real lookup may wait on the network.
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    nre = urllib3.exceptions.NameResolutionError("nonexistent.invalid", None, gai)  # type: ignore[arg-type]
    mre = urllib3.exceptions.MaxRetryError(None, "/x", reason=nre)  # type: ignore[arg-type]
    d = ok(classify(requests.ConnectionError(mre)), "net.dns")
    assert "Failed to resolve" in d.detail
    ok(classify(mre), "net.dns")
    ok(classify(gai), "net.dns")


def test_tls_failure_talking_to_a_plain_http_server(server: str, session: requests.Session) -> None:
    exc = raised(lambda: session.get(server.replace("http://", "https://") + "/x", timeout=5))
    assert isinstance(exc, requests.exceptions.SSLError)
    d = ok(classify(exc), "net.tls")
    assert not d.retryable


def test_untrusted_certificate() -> None:
    text = (
        "HTTPSConnectionPool(host='mirror.example', port=443): Max retries exceeded (Caused by"
        " SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate"
        " verify failed: self-signed certificate (_ssl.c:1006)')))"
    )
    assert not ok(classify(requests.exceptions.SSLError(text)), "net.tls-cert").retryable
    cert = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    ok(classify(cert), "net.tls-cert")
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2426)")
    assert ok(classify(eof), "net.reset").retryable


def test_too_many_redirects(server: str, session: requests.Session) -> None:
    session.max_redirects = 3
    exc = raised(lambda: session.get(f"{server}/loop"))
    assert isinstance(exc, requests.TooManyRedirects)
    d = ok(classify(exc), "net.redirects")
    assert not d.retryable and {a.id for a in d.actions} == {"check-url", "next-source"}


def test_broken_chunked_body(server: str, session: requests.Session) -> None:
    resp = session.get(f"{server}/broken-chunked", stream=True)
    exc = raised(lambda: b"".join(resp.iter_content(1024)))
    resp.close()
    assert isinstance(exc, requests.exceptions.ChunkedEncodingError)
    assert ok(classify(exc), "net.reset").retryable


def test_urllib3_incomplete_read(server: str) -> None:
    with urllib3.PoolManager(retries=False) as pool:
        resp = pool.request("GET", f"{server}/truncated", preload_content=False)
        exc = raised(lambda: resp.read())
        resp.release_conn()
    assert isinstance(exc, urllib3.exceptions.ProtocolError)
    assert ok(classify(exc), "net.reset").retryable
    ok(classify(urllib3.exceptions.IncompleteRead(10, 90)), "net.reset")


def test_urllib3_read_timeout() -> None:
    with silent_listener() as port, urllib3.PoolManager(retries=False, timeout=0.3) as pool:
        exc = raised(lambda: pool.request("GET", f"http://127.0.0.1:{port}/x"))
    assert isinstance(exc, urllib3.exceptions.ReadTimeoutError)
    assert ok(classify(exc), "net.timeout").retryable


def test_invalid_url(session: requests.Session) -> None:
    exc = raised(lambda: session.get("models/x.safetensors"))
    assert isinstance(exc, requests.exceptions.MissingSchema)
    assert not ok(classify(exc), "url.invalid").retryable


def test_stdlib_urllib_http_error() -> None:
    import urllib.error
    from email.message import Message

    headers = Message()
    headers["Retry-After"] = "3"
    exc = urllib.error.HTTPError("http://h/x", 503, "Service Unavailable", headers, None)
    assert ok(classify(exc), "http.5xx").retry_after == 3.0


# ---- plain sockets -------------------------------------------------------------------------
def test_socket_timeout() -> None:
    with silent_listener() as port, socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(0.1)
        exc = raised(lambda: c.recv(1))
    assert isinstance(exc, socket.timeout)
    assert ok(classify(exc), "net.timeout").retryable
    ok(classify(TimeoutError()), "net.timeout")


def test_connection_refused_socket() -> None:
    exc = raised(lambda: socket.create_connection(("127.0.0.1", closed_port()), timeout=2))
    assert isinstance(exc, ConnectionRefusedError)
    assert ok(classify(exc), "net.refused").retryable
    ok(classify(ConnectionRefusedError()), "net.refused")


def test_connection_reset_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as c:
            peer, _ = listener.accept()
            # SO_LINGER with a zero timeout: close sends RST instead of FIN.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            time.sleep(0.05)
            exc = raised(lambda: c.recv(1))
    assert isinstance(exc, ConnectionResetError)
    assert ok(classify(exc), "net.reset").retryable
    ok(classify(ConnectionResetError()), "net.reset")


# ---- OSError by errno ----------------------------------------------------------------------
ERRNO_CASES = [
    ("ENOSPC", "disk.full", True),
    ("EDQUOT", "disk.full", True),
    ("EACCES", "fs.permission", False),
    ("EPERM", "fs.permission", False),
    ("EROFS", "fs.readonly", False),
    ("EMFILE", "fs.too-many-files", True),
    ("ENFILE", "fs.too-many-files", True),
    ("ENAMETOOLONG", "fs.name-too-long", False),
    ("EXDEV", "fs.cross-device", False),
    ("ENOENT", "fs.not-found", False),
    ("EIO", "fs.io-error", False),
    ("ENOTEMPTY", "fs.exists", False),
    ("EEXIST", "fs.exists", False),
    ("ELOOP", "fs.symlink-loop", False),
    ("ENOTDIR", "fs.not-a-folder", False),
    ("EISDIR", "fs.is-a-folder", False),
    ("EBUSY", "fs.busy", True),
    ("ENOMEM", "sys.out-of-memory", True),
    ("ECONNRESET", "net.reset", True),
    ("ETIMEDOUT", "net.timeout", True),
    ("ENETUNREACH", "net.unreachable", True),
]


@pytest.mark.parametrize(("name", "code", "retryable"), ERRNO_CASES)
def test_oserror_by_errno(name: str, code: str, retryable: bool) -> None:
    n = getattr(errno, name)
    exc = OSError(n, os.strerror(n), "/home/u/proj/models/x.safetensors")
    d = ok(classify(exc, "restoring snapshot 3"), code)
    assert d.retryable is retryable
    assert d.message.startswith("Restoring snapshot 3 stopped: ")
    assert f"errno {name} ({n})" in d.detail  # the technical name is in the detail only
    assert "filename: /home/u/proj/models/x.safetensors" in d.detail
    if "{path}" in KINDS[code].reason:
        assert "/home/u/proj/models/x.safetensors" in d.message


def test_disk_full_says_free_space_then_resume() -> None:
    d = ok(classify(OSError(errno.ENOSPC, "No space left on device")), "disk.full")
    assert [a.id for a in d.actions] == ["free-space", "resume"]
    assert d.retryable and d.category is Category.SYSTEM


def test_real_oserrors_from_system_calls(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "dir" / "f")
    real = {
        "fs.not-found": lambda: open(tmp_path / "missing"),
        "fs.name-too-long": lambda: open(tmp_path / ("x" * 300)),
        "fs.exists": lambda: os.mkdir(tmp_path / "dir"),
        "fs.symlink-loop": lambda: os.open(tmp_path / "link", os.O_RDONLY | os.O_NOFOLLOW),
        "fs.not-a-folder": lambda: open(tmp_path / "dir" / "f" / "g"),
        "fs.is-a-folder": lambda: open(tmp_path / "dir", "w"),
    }
    for code, call in real.items():
        ok(classify(raised(call)), code)
    ok(classify(raised(lambda: os.rmdir(tmp_path / "dir"))), "fs.exists")  # ENOTEMPTY


def test_long_paths_are_shortened_in_the_message() -> None:
    path = "/" + "/".join(["deep"] * 60) + "/x.bin"
    d = ok(
        classify(FileNotFoundError(errno.ENOENT, "No such file or directory", path)), "fs.not-found"
    )
    assert "x.bin" in d.message and path not in d.message and path in d.detail


def test_an_unlisted_errno_is_a_system_error_not_a_crash() -> None:
    d = ok(classify(OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))), "fs.error")
    assert "operation not supported" in d.message.lower()
    assert "ENOTSUP" in d.detail


def test_errno_table_has_no_duplicates() -> None:
    seen = [n for numbers, _ in ERRNO_TABLE for n in numbers]
    assert len(seen) == len(set(seen))


# ---- snapfs's own errors -------------------------------------------------------------------
SNAPFS_CASES: list[tuple[SnapfsError, str]] = [
    (DiskFull("Not enough space for x: it needs 2 GB more, and 1 GB is free."), "disk.full"),
    (LockBusy("The project is busy: another snapfs process is writing to it.", owner="pid 7"), "lock.busy"),
    (StateCorrupt("The snapfs state file project.db is damaged (malformed)."), "state.corrupt"),
    (SealBroken("Stored file ab12 was modified in place.", oid="ab12"), "object.modified"),
    (ObjectCorrupt("Stored object ab12 is corrupt.", oid="ab12"), "object.corrupt"),
    (ObjectMissing("Stored object ab12 is missing.", oid="ab12", paths=("models/x.bin",)), "object.missing"),
    (UnsafePath("Refusing path '../x': it would leave the project."), "path.unsafe"),
    (PlanError("must be a project-relative path", where="steps[2].dest"), "plan.invalid"),
    (SnapshotNotFound("No snapshot 'nightly' in this project."), "snapshot.not-found"),
    (UsageError("Not a downloadable URL: 'ftp://x' (use http:// or https://)."), "usage"),
    (NotAProject("No snapfs project here or above /tmp."), "project.not-found"),
    (ProjectPathError("/tmp/x is not a directory."), "project.not-a-folder"),
    (DownloadFailed("Download of x gave up after 10 failures in a row (h: connection reset).", url="https://h/x"), "download.failed"),
    (SourceUnavailable("Can't download x: h: invalid URL.", url="https://h/x"), "source.unavailable"),
    (SourceUnavailable("Can't download x: h: not found (HTTP 404).", url="https://h/x"), "http.404"),
    (SourceUnavailable("Can't download x: h: access denied (HTTP 403).", url="https://h/x"), "http.403"),
    (SourceUnavailable("Can't download x: a: not found (HTTP 404); b: access denied (HTTP 401)."), "source.unavailable"),
    (BadContent("Can't download x: h: sent a web page (perhaps a login or captive portal) instead of the file."), "content.web-page"),
    (BadContent("Can't download x: h: sent a JSON message (perhaps an error) instead of the file."), "content.web-page"),
    (BadContent("Can't download x: h: serves a file of 10 bytes, expected 20."), "size.mismatch"),
    (BadContent("Can't download x: h: sent another file."), "content.wrong"),
    (HashMismatch("The download of x from h has SHA-256 ab, expected cd, and no other source could repair it."), "hash.mismatch"),
    (HashMismatch("The download of x from h is 10 bytes, expected 20, and no other source could repair it."), "size.mismatch"),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "code"), SNAPFS_CASES, ids=[c for _, c in SNAPFS_CASES])
def test_snapfs_errors(exc: SnapfsError, code: str) -> None:
    d = ok(classify(exc, "importing the ComfyUI bundle"), code)
    # The error's own class says what kind of failure it is and whether retrying helps.
    assert d.category is exc.category and d.retryable is exc.retryable
    assert str(exc) in d.detail


def test_snapfs_kinds_agree_with_the_classes() -> None:
    """The catalog's category/retryable for each error class match the class attributes,
    so the advice in the message never contradicts ``exc.retryable``."""
    for exc, code in SNAPFS_CASES:
        kind = KINDS[code]
        assert (kind.category, kind.retryable) == (exc.category, exc.retryable), code


def test_the_expected_actions_for_snapfs_errors() -> None:
    def ids(exc: BaseException) -> list[str]:
        return [a.id for a in classify(exc).actions]

    assert ids(SourceUnavailable("x")) == ["check-url", "next-source"]
    assert ids(BadContent("sent a web page instead of the file")) == ["login", "next-source"]
    assert ids(HashMismatch("has SHA-256 a, expected b")) == ["next-source", "redownload"]
    assert ids(LockBusy("busy")) == ["wait"]
    assert ids(PlanError("bad", where="steps[0]")) == ["fix-plan"]
    assert "verify" in ids(ObjectMissing("gone")) and "verify" in ids(ObjectCorrupt("bad"))
    assert "resume" in ids(DownloadFailed("gave up"))


def test_plan_error_names_where() -> None:
    d = ok(
        classify(PlanError("must be a project-relative path", where="steps[2].dest")),
        "plan.invalid",
    )
    assert d.message == (
        "The import plan has a problem at steps[2].dest (must be a project-relative path);"
        " nothing was changed. Fix the plan and run it again."
    )
    assert "where: steps[2].dest" in d.detail
    d = ok(classify(PlanError("The plan is empty.")), "plan.invalid")
    assert d.message.startswith("The import plan has a problem (the plan is empty);")


def test_object_missing_names_the_file() -> None:
    d = ok(classify(ObjectMissing("x", oid="ab", paths=("models/x.bin",))), "object.missing")
    assert "models/x.bin" in d.message and "oid: ab" in d.detail


def test_real_snapfs_errors(tmp_path: Path) -> None:
    lock = Lock(tmp_path / "lock", "project")
    lock.acquire()
    try:
        busy = raised(lambda: Lock(tmp_path / "lock", "project").acquire(wait=False))
    finally:
        lock.release()
    assert ok(classify(busy), "lock.busy").retryable
    ok(classify(raised(lambda: split_relpath(b"../etc/passwd"))), "path.unsafe")
    full = from_oserror(OSError(errno.ENOSPC, "No space left on device"), "Saving x", "/p/x")
    assert isinstance(full, DiskFull)
    ok(classify(full), "disk.full")
    denied = from_oserror(PermissionError(errno.EACCES, "Permission denied"), "Saving x", "/p/x")
    assert type(denied) is FilesystemError
    d = ok(classify(denied), "fs.permission")
    assert "/p/x" in d.message


def test_generic_snapfs_errors_speak_for_themselves() -> None:
    d = ok(classify(SnapfsError("The import could not finish.")), "error")
    assert d.message == "The import could not finish. Open the details for more."
    assert (d.category, d.retryable) == (Category.SYSTEM, False)

    class Flaky(SnapfsError):
        category = Category.NETWORK
        retryable = True

    d = classify(Flaky("The hub is busy."))
    assert_contract_loose(d)
    assert (d.code, d.category, d.retryable) == ("error", Category.NETWORK, True)
    assert [a.id for a in d.actions] == ["retry"]
    d = ok(classify(DownloadError("Can't download x.")), "download.error")
    assert d.category is Category.NETWORK
    d = ok(classify(FilesystemError("Saving x stopped: Operation not supported (x).")), "fs.error")


def assert_contract_loose(d: Diagnosis) -> None:
    """The contract, minus "the actions are the kind's" (a fallback may adapt them)."""
    assert d.message and "\n" not in d.message and d.actions and d.detail


# ---- hash and size mismatches are told by type or attributes, not by words -----------------
def test_a_plain_value_error_is_not_a_mismatch() -> None:
    ok(classify(ValueError("hash mismatch: expected ab, got cd")), "internal")


def test_explicit_mismatch_attributes() -> None:
    class Mismatch(Exception):
        def __init__(self, **kw: object) -> None:
            super().__init__("mismatch")
            self.__dict__.update(kw)

    ok(classify(Mismatch(expected_size=10, actual_size=9)), "size.mismatch")
    ok(classify(Mismatch(expected_sha256="ab", actual_sha256="cd")), "hash.mismatch")
    ok(classify(Mismatch(expected_digest="ab", actual_digest="cd")), "hash.mismatch")


# ---- git (real output) ---------------------------------------------------------------------
def _git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/false",
        SSH_ASKPASS="/bin/false",
        GIT_SSH_COMMAND="ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=5",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        HOME=str(home),
        LC_ALL="C",
        LANG="C",
    )
    return env


@pytest.fixture(scope="module")
def git_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CommandFailed]:
    """Real failures of real git commands, as the installer would wrap them."""
    git = shutil.which("git")
    if git is None:
        pytest.skip(reason="git is not installed")
    work = tmp_path_factory.mktemp("git")
    env = _git_env(work)

    def run(*argv: str, cwd: Path = work) -> CommandFailed:
        r = subprocess.run(
            [git, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0, f"git {argv} unexpectedly worked"
        return CommandFailed(
            f"git {argv[0]} failed.", tool=git, argv=(git, *argv), returncode=r.returncode,
            output=r.stdout + r.stderr,
        )  # fmt: skip

    src = work / "src"
    subprocess.run([git, "init", "-q", str(src)], env=env, check=True)
    subprocess.run(
        [git, "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
         "--allow-empty", "-m", "init"], env=env, check=True,
    )  # fmt: skip
    gone = "0123456789abcdef0123456789abcdef01234567"
    out = {
        "file-url-gone": run("clone", "-q", "file:///nonexistent/repo.git", "a"),
        "path-gone": run("clone", "-q", "/nonexistent/repo.git", "b"),
        "not-a-tree": run("-C", str(src), "checkout", gone),
        "pathspec": run("-C", str(src), "checkout", "no-such-branch"),
        "unknown-revision": run("-C", str(src), "log", "no-such-rev"),
        "not-our-ref": run("-C", str(src), "fetch", str(src), gone),
        "no-remote-ref": run("-C", str(src), "fetch", str(src), "refs/heads/no-such"),
        "remote-branch": run("clone", "-q", "--branch", "no-such", str(src), "c"),
        "refused": run("ls-remote", f"http://127.0.0.1:{closed_port()}/x.git"),
    }
    with http_server() as url:
        out["http-auth"] = run("ls-remote", f"{url}/auth/x.git")
        out["http-bad-password"] = run(
            "ls-remote", url.replace("http://", "http://user:wrong@") + "/auth/x.git"
        )
        out["http-403"] = run("ls-remote", f"{url}/forbidden/x.git")
        out["http-404"] = run("ls-remote", f"{url}/missing/x.git")
        out["http-503"] = run("ls-remote", f"{url}/down/x.git")
        out["http-empty-reply"] = run("ls-remote", f"{url}/cut/x.git")
    if shutil.which("ssh"):
        out["ssh-refused"] = run("ls-remote", f"ssh://git@127.0.0.1:{closed_port()}/x.git")
    return out


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("file-url-gone", "git.repo-gone", "does not appear to be a git repository"),
        ("path-gone", "git.repo-gone", "does not exist"),
        ("http-404", "git.repo-gone", "not found"),
        ("not-a-tree", "git.commit-missing", "reference is not a tree"),
        ("pathspec", "git.commit-missing", "did not match any"),
        ("unknown-revision", "git.commit-missing", "unknown revision"),
        ("not-our-ref", "git.commit-missing", "not our ref"),
        ("no-remote-ref", "git.commit-missing", "couldn't find remote ref"),
        ("remote-branch", "git.commit-missing", "Remote branch no-such not found"),
        ("http-auth", "git.auth-required", "terminal prompts disabled"),
        ("http-bad-password", "git.auth-required", "Authentication failed"),
        ("http-403", "git.auth-required", "returned error: 403"),
        ("refused", "git.network", "unable to access"),
        ("http-503", "git.network", "returned error: 503"),
        ("http-empty-reply", "git.network", "Empty reply from server"),
        ("ssh-refused", "git.network", "Connection refused"),
    ],
)
def test_git_failures(
    git_output: dict[str, CommandFailed], case: str, code: str, needle: str
) -> None:
    if case not in git_output:
        pytest.skip(reason=f"{case}: the tool it needs is not installed")
    exc = git_output[case]
    assert needle in exc.output, f"git's wording changed: {exc.output!r}"
    d = ok(classify(exc, "installing ComfyUI-Manager"), code)
    assert d.retryable is (code == "git.network")  # only a network failure is worth a retry
    assert d.message.startswith("Installing ComfyUI-Manager stopped: ")
    assert "command: " in d.detail and "exit code: " in d.detail and needle in d.detail


@pytest.mark.parametrize(
    ("output", "code"),
    [
        # Wordings from real runs against hosts this test can't reach (GitHub, ssh servers).
        ("remote: Repository not found.\nfatal: repository 'https://github.com/a/b.git/' not found", "git.repo-gone"),
        ("fatal: 'origin' does not appear to be a git repository", "git.repo-gone"),
        ("fatal: could not read Username for 'https://github.com': terminal prompts disabled", "git.auth-required"),
        ("git@github.com: Permission denied (publickey).\nfatal: Could not read from remote repository.\n\nPlease make sure you have the correct access rights\nand the repository exists.", "git.auth-required"),
        ("ssh: connect to host github.com port 22: Connection timed out\nfatal: Could not read from remote repository.", "git.network"),
        ("fatal: unable to access 'https://github.com/a/b.git/': Could not resolve host: github.com", "git.network"),
        ("error: RPC failed; curl 92 HTTP/2 stream 5 was not closed cleanly: CANCEL (err 8)\nerror: 4 bytes of body are still expected\nfetch-pack: unexpected disconnect while reading sideband packet\nfatal: early EOF\nfatal: fetch-pack: invalid index-pack output", "git.network"),
        ("fatal: write error: No space left on device\nfatal: fetch-pack: invalid index-pack output", "disk.full"),
        ("fatal: something new and strange", "git.failed"),
    ],
)  # fmt: skip
def test_git_wordings_seen_in_the_wild(output: str, code: str) -> None:
    exc = CommandFailed("git clone failed.", tool="git", returncode=128, output=output)
    d = ok(classify(exc), code)
    if code == "git.failed":
        assert (d.category, d.retryable) == (exc.category, exc.retryable)


def test_git_failure_as_called_process_error(git_output: dict[str, CommandFailed]) -> None:
    src = git_output["not-a-tree"].argv[2]
    exc = raised(
        lambda: subprocess.run(
            ["git", "-C", src, "checkout", "0" * 40], capture_output=True, check=True,
            env=_git_env(Path(src)),
        )
    )  # fmt: skip
    assert isinstance(exc, subprocess.CalledProcessError)
    d = ok(classify(exc), "git.commit-missing")
    assert "command: git -C" in d.detail


# ---- pip (real output) ---------------------------------------------------------------------
def _wheel(d: Path, name: str, version: str, meta: str = "") -> None:
    """A minimal valid pure-Python wheel, so pip can resolve offline."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(d / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
            record.append(f"{path},sha256={digest.rstrip(b'=').decode()},{len(text)}")
        z.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")


_BACKEND = """
import os

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    d = os.path.join(metadata_directory, "fastkernel-1.0.dist-info")
    os.makedirs(d)
    with open(os.path.join(d, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: fastkernel\\nVersion: 1.0\\n")
    return "fastkernel-1.0.dist-info"

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    from setuptools import Extension, setup
    setup(name="fastkernel", version="1.0", script_args=["build_ext", "--inplace"],
          ext_modules=[Extension("fastkernel", ["fastkernel.c"])])
    raise SystemExit("no wheel was built")
"""


@pytest.fixture(scope="module")
def pip_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CommandFailed]:
    work = tmp_path_factory.mktemp("pip")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.update(LC_ALL="C", PYTHONWARNINGS="ignore")
    pip = (sys.executable, "-m", "pip")

    def run(*argv: str, **extra: str) -> CommandFailed:
        r = subprocess.run(
            [*pip, *argv], cwd=work, env={**env, **extra}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert r.returncode != 0, f"pip {argv} unexpectedly worked: {r.stdout}"
        return CommandFailed(
            "pip failed.", tool=sys.executable, argv=(*pip, *argv), returncode=r.returncode,
            output=r.stdout + r.stderr,
        )  # fmt: skip

    wheels = work / "wheels"
    wheels.mkdir()
    _wheel(wheels, "alpha", "1.0", "Requires-Dist: gamma==2\n")
    _wheel(wheels, "beta", "1.0", "Requires-Dist: gamma==1\n")
    _wheel(wheels, "gamma", "1.0")
    _wheel(wheels, "gamma", "2.0")
    _wheel(wheels, "futurepkg", "1.0", "Requires-Python: >=4\n")
    (work / "empty").mkdir()
    (work / "pins.txt").write_text("gamma==1.0\n")
    offline = ("download", "--no-index", "-d", str(work / "out"))
    out = {
        "no-match": run(*offline, "--find-links", str(work / "empty"), "nosuchpkg-xyz"),
        "conflict": run(*offline, "--find-links", str(wheels), "alpha", "beta"),
        "constraint": run(*offline, "--find-links", str(wheels), "-c", "pins.txt", "alpha"),
        "python-version": run(*offline, "--find-links", str(wheels), "futurepkg"),
    }
    index = ("download", "--retries", "1", "--timeout", "1", "-d", str(work / "out"))
    out["refused"] = run(*index, "--index-url", f"http://127.0.0.1:{closed_port()}/simple", "x")
    with silent_listener() as port:
        out["read-timeout"] = run(*index, "--index-url", f"http://127.0.0.1:{port}/simple", "x")

    if importlib.util.find_spec("setuptools") is None:
        return out
    src = work / "fastkernel"
    src.mkdir()
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    (src / "backend.py").write_text(_BACKEND)
    (src / "fastkernel.c").write_text("this is not C;\n")
    build = ("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(work / "out"))
    out["no-compiler"] = run(*build, str(src), CC="/nonexistent/bin/cc")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is not None:
        out["build-failed"] = run(*build, str(src), CC=cc)
    return out


@pytest.mark.parametrize(
    ("case", "code", "needle", "named"),
    [
        ("no-match", "pip.no-match", "No matching distribution found", "nosuchpkg-xyz"),
        ("conflict", "pip.conflict", "ResolutionImpossible", None),
        ("constraint", "pip.constraint", "The user requested (constraint) gamma==1.0", "gamma"),
        ("python-version", "pip.python-version", "requires a different Python", "futurepkg"),
        ("refused", "pip.network", "Connection refused", None),
        ("read-timeout", "pip.network", "Read timed out", None),
        ("no-compiler", "pip.build-tools-missing", "failed: No such file or directory", "cc"),
        ("build-failed", "pip.build-failed", "Failed building wheel for fastkernel", "fastkernel"),
    ],
)
def test_pip_failures(
    pip_output: dict[str, CommandFailed], case: str, code: str, needle: str, named: str | None
) -> None:
    if case not in pip_output:
        pytest.skip(reason=f"{case}: needs setuptools and a C compiler")
    exc = pip_output[case]
    assert needle in exc.output, f"pip's wording changed: {exc.output!r}"
    d = ok(classify(exc, "installing requirements for ComfyUI-Manager"), code)
    assert d.retryable is (code == "pip.network")  # only a network failure is worth a retry
    assert d.message.startswith("Installing requirements for ComfyUI-Manager stopped: ")
    if named:
        assert named in d.message
    assert needle in d.detail


def test_pip_network_failure_is_not_a_missing_package(pip_output: dict[str, CommandFailed]) -> None:
    # pip ends an unreachable index with "No matching distribution found": the order of the
    # table is what keeps this a network failure.
    assert "No matching distribution found" in pip_output["refused"].output
    assert classify(pip_output["refused"]).category is Category.NETWORK


@pytest.mark.parametrize(
    ("output", "code", "named"),
    [
        ("  error: legacy-install-failure\n\n× Encountered error while trying to install package.\n╰─> insightface", "pip.build-failed", None),
        ("      error: Microsoft Visual C++ 14.0 or greater is required. Get it with \"Microsoft C++ Build Tools\"", "pip.build-tools-missing", "Microsoft Visual C++"),
        ("      sh: 1: gcc: not found\n      error: command 'gcc' failed with exit status 127\n  ERROR: Failed building wheel for insightface", "pip.build-tools-missing", "gcc"),
        ("  ERROR: Failed building wheel for insightface\nFailed to build insightface\nERROR: Could not build wheels for insightface, which is required to install pyproject.toml-based projects", "pip.build-failed", "insightface"),
        ("ERROR: Failed to build installable wheels for some pyproject.toml based projects (insightface)", "pip.build-failed", "insightface"),
        ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/torch/", "pip.network", None),
        ("Could not fetch URL https://pypi.org/simple/torch/: connection error: HTTPSConnectionPool(host='pypi.org', port=443): Read timed out. - skipping", "pip.network", None),
        ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device", "disk.full", None),
        ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied: '/usr/lib/python3/dist-packages/x'", "fs.permission", "/usr/lib/python3/dist-packages/x"),
        ("ERROR: Ignored the following versions that require a different python version: 2.0 Requires-Python >=3.12\nERROR: Could not find a version that satisfies the requirement numpy==2.0 (from versions: 1.26)\nERROR: No matching distribution found for numpy==2.0", "pip.python-version", "numpy==2.0"),
        ("snapfs: torch==2.1.0 must not change (ComfyUI needs it)\nERROR: ResolutionImpossible", "pip.constraint", "version of torch,"),
        ("ERROR: Cannot install xformers==0.0.28 because these package versions have conflicting dependencies.", "pip.conflict", None),
        ("something new went wrong", "pip.failed", None),
    ],
)  # fmt: skip
def test_pip_wordings_seen_in_the_wild(output: str, code: str, named: str | None) -> None:
    exc = CommandFailed("pip install failed.", tool="pip3", returncode=1, output=output)
    d = ok(classify(exc), code)
    if named:
        assert named in d.message


def test_tool_names() -> None:
    assert tool_name("/usr/bin/pip3.11") == "pip"
    assert tool_name("pip") == "pip"
    assert tool_name("C:\\Python\\Scripts\\pip.exe".replace("\\", "/")) == "pip"
    assert tool_name(sys.executable, (sys.executable, "-m", "pip", "install")) == "pip"
    assert tool_name("/usr/bin/git") == "git"


def test_git_table_does_not_apply_to_pip() -> None:
    exc = CommandFailed("x", tool="pip", output="fatal: reference is not a tree: abc")
    ok(classify(exc), "pip.failed")


# ---- other tools ---------------------------------------------------------------------------
def test_a_missing_tool() -> None:
    not_found = raised(lambda: subprocess.run(["snapfs-no-such-tool"], capture_output=True))
    assert isinstance(not_found, FileNotFoundError)
    try:
        raise CommandFailed(
            "Could not run it.", tool="snapfs-no-such-tool", argv=("snapfs-no-such-tool",)
        ) from not_found
    except CommandFailed as exc:
        d = ok(classify(exc), "tool.missing")
    assert "snapfs-no-such-tool" in d.message
    ok(classify(CommandFailed("x", tool="/usr/bin/git-lfs", returncode=127)), "tool.missing")


def test_a_tool_that_ran_too_long() -> None:
    argv = (sys.executable, "-c", "import time; time.sleep(30)")
    expired = raised(lambda: subprocess.run(argv, timeout=0.2))
    assert isinstance(expired, subprocess.TimeoutExpired)
    try:
        # As snapfs's import runs tools: the timeout becomes CommandFailed, raised from it.
        raise CommandFailed(
            "git did not finish within 0 s.", tool="git", argv=("git", "clone", "x"),
            returncode=None, output="timed out",
        ) from expired  # fmt: skip
    except CommandFailed as exc:
        d = ok(classify(exc), "tool.timeout")
    assert d.retryable and "git" in d.message
    ok(classify(expired), "tool.timeout")


@pytest.mark.parametrize(
    ("output", "code", "named"),
    [
        # The strings snapfs's import puts in CommandFailed.output for these two cases.
        ("/p/venv/bin/python: No such file or directory", "pip.venv-missing", None),
        ("protected package changed: torch 2.1.0 -> 2.5.1", "pip.constraint", "torch"),
    ],
)
def test_import_step_failures(output: str, code: str, named: str | None) -> None:
    exc = CommandFailed("pip failed.", tool="pip", returncode=None, output=output)
    d = ok(classify(exc, "pip install (requirements.txt)"), code)
    assert named is None or named in d.message


def test_an_unknown_tool_failure() -> None:
    d = ok(classify(CommandFailed("x", tool="ffmpeg", returncode=1, output="??")), "command.failed")
    assert "ffmpeg" in d.message and d.category is Category.DEPENDENCY


# ---- interrupted ---------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), KeyboardInterrupt("signal 15")])
def test_interrupted(exc: KeyboardInterrupt) -> None:
    d = ok(classify(exc, "downloading x"), "interrupted")
    assert d.category is Category.SYSTEM and d.retryable
    assert [a.id for a in d.actions] == ["resume"]


# ---- walking the chain ---------------------------------------------------------------------
def test_a_generic_wrapper_is_diagnosed_by_its_cause() -> None:
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            raise FilesystemError("Snapshot stopped.") from exc
    except FilesystemError as outer:
        d = ok(classify(outer), "fs.too-many-files")
    assert d.retryable
    assert d.detail.startswith("snapfs._errors.FilesystemError: Snapshot stopped.")
    assert "caused by OSError: [Errno 24] Too many open files" in d.detail


def test_a_bare_snapfs_error_from_a_network_error(session: requests.Session) -> None:
    with silent_listener() as port:
        timeout = raised(lambda: session.get(f"http://127.0.0.1:{port}/x", timeout=0.2))
    try:
        raise SnapfsError("The import could not finish.") from timeout
    except SnapfsError as exc:
        ok(classify(exc), "net.timeout")


def test_an_implicit_context_is_walked_for_snapfs_errors() -> None:
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        except ConnectionResetError:
            raise SnapfsError("The import could not finish.")  # noqa: B904 - on purpose
    except SnapfsError as exc:
        ok(classify(exc), "net.reset")


def test_a_specific_error_wins_over_its_cause() -> None:
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError:
            raise HashMismatch("has SHA-256 a, expected b")  # noqa: B904
    except HashMismatch as exc:
        ok(classify(exc), "hash.mismatch")


def test_the_outermost_recognised_error_wins() -> None:
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError:
            raise OSError(errno.ENOSPC, "No space left on device")  # noqa: B904
    except OSError as exc:
        ok(classify(exc), "disk.full")


def test_a_bug_while_handling_a_failure_is_not_passed_off_as_that_failure() -> None:
    try:
        try:
            raise ConnectionResetError()
        except ConnectionResetError:
            None.retry  # type: ignore[attr-defined]  # noqa: B018 - the bug
    except AttributeError as exc:
        d = ok(classify(exc), "internal")
    assert "AttributeError" in d.detail and "report-bug" in [a.id for a in d.actions]


def test_an_explicit_cause_is_always_walked() -> None:
    try:
        raise RuntimeError("worker failed") from ConnectionRefusedError()
    except RuntimeError as exc:
        ok(classify(exc), "net.refused")


def test_a_suppressed_context_is_not_walked() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise SnapfsError("Gave up.") from None
    except SnapfsError as exc:
        ok(classify(exc), "error")


def test_chains_with_cycles_end() -> None:
    a, b = SnapfsError("a"), SnapfsError("b")
    a.__context__, b.__context__ = b, a
    assert exception_chain(a) == (a, b)
    ok(classify(a), "error")


def test_the_chain_includes_wrapped_exceptions() -> None:
    inner = ConnectionRefusedError()
    mre = urllib3.exceptions.MaxRetryError(None, "/x", reason=inner)  # type: ignore[arg-type]
    outer = requests.ConnectionError(mre)
    assert exception_chain(outer) == (outer, mre, inner)


# ---- the classifier: order, extension, robustness ------------------------------------------
def test_register_first_overrides_the_built_in_rules() -> None:
    c = Classifier()
    mine = Kind(
        "disk.quota",
        Category.SYSTEM,
        False,
        "your quota is used up",
        "Ask IT",
        (ACTIONS["report-bug"],),
    )

    @c.register
    def quota(exc: BaseException, context: str) -> Diagnosis | None:
        if isinstance(exc, OSError) and exc.errno == errno.EDQUOT:
            return mine.diagnose(context)
        return None

    assert c.rules[0] is quota
    assert c.classify(OSError(errno.EDQUOT, "Disk quota exceeded")).code == "disk.quota"
    assert c.classify(OSError(errno.ENOSPC, "No space left on device")).code == "disk.full"
    assert classify(OSError(errno.EDQUOT, "x")).code == "disk.full"  # the default is untouched
    c.unregister(quota)
    assert c.classify(OSError(errno.EDQUOT, "x")).code == "disk.full"


def test_register_last_only_sees_what_nothing_else_claims() -> None:
    class HubError(Exception):
        pass

    c = Classifier()
    calls: list[BaseException] = []

    def late(exc: BaseException, context: str) -> Diagnosis | None:
        calls.append(exc)
        return KINDS["net.error"].diagnose(context) if isinstance(exc, HubError) else None

    c.register(late, first=False)
    assert c.rules[-1] is late
    assert c.classify(OSError(errno.ENOSPC, "x")).code == "disk.full"
    assert c.classify(HubError("hub down")).code == "net.error"
    assert classify(HubError("hub down")).code == "internal"


def test_a_rule_that_raises_is_skipped() -> None:
    c = Classifier()

    def broken(exc: BaseException, context: str) -> Diagnosis | None:
        raise RuntimeError("plugin bug")

    def junk(exc: BaseException, context: str) -> Diagnosis | None:
        return "not a diagnosis"  # type: ignore[return-value]

    c.register(broken)
    c.register(junk)
    ok(c.classify(OSError(errno.ENOSPC, "x")), "disk.full")
    ok(c.classify(ValueError("x")), "internal")


def test_table_rules_for_plugins() -> None:
    c = Classifier()
    c.register(OutputRule("uv", [("pip.no-match", r"no version of (?P<pkg>\S+) found")]))
    c.register(ErrnoRule([((errno.ENOSPC,), "fs.io-error")]))
    exc = CommandFailed("x", tool="uv", output="error: no version of torchx found")
    d = ok(c.classify(exc), "pip.no-match")
    assert "torchx" in d.message
    ok(c.classify(OSError(errno.ENOSPC, "x")), "fs.io-error")
    ok(classify(exc), "command.failed")


def test_an_empty_classifier_still_answers() -> None:
    c = Classifier(rules=[], fallbacks=[])
    ok(c.classify(OSError(errno.ENOSPC, "x")), "internal")
    ok(Classifier(rules=[]).classify(SnapfsError("It broke.")), "error")


def test_a_diagnosis_that_breaks_the_contract_is_repaired() -> None:
    c = Classifier(rules=[])
    c.register(lambda exc, ctx: Diagnosis(Category.SYSTEM, "x.y", True, "two\nlines", "", ()))
    d = c.classify(ValueError("v"))
    assert d.message == "two lines" and [a.id for a in d.actions] == ["retry"]
    assert "ValueError: v" in d.detail


def test_unknown_errors_are_internal_with_the_text_in_the_detail() -> None:
    d = ok(classify(ZeroDivisionError("division by zero"), "snapshotting"), "internal")
    assert d.category is Category.SYSTEM and not d.retryable
    assert [a.id for a in d.actions] == ["report-bug"]
    assert "ZeroDivisionError: division by zero" in d.detail
    assert d.message == (
        "Snapshotting stopped: something unexpected went wrong inside snapfs."
        " Report a bug and include the details."
    )


def test_an_exception_that_cannot_be_printed() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    ok(classify(Weird()), "internal")


def test_the_command_output_in_the_detail_is_the_tail() -> None:
    output = "\n".join(f"line {i}" for i in range(100)) + "\nfatal: early EOF\n"
    d = ok(
        classify(
            CommandFailed("x", tool="git", argv=("git", "fetch"), returncode=128, output=output)
        ),
        "git.network",
    )
    assert "line 99" in d.detail and "line 10\n" not in d.detail
    assert "command: git fetch" in d.detail and "exit code: 128" in d.detail


def test_secrets_stay_out_of_the_detail(git_output: dict[str, CommandFailed]) -> None:
    d = ok(classify(git_output["http-bad-password"]), "git.auth-required")
    assert "user:wrong@" in " ".join(git_output["http-bad-password"].argv)
    assert "wrong" not in d.detail and "http://***@127.0.0.1" in d.detail
    url = "https://cdn.example/x.bin?X-Amz-Signature=abc123&X-Amz-Credential=AKIA9&Expires=9&v=2"
    exc = DownloadFailed("gave up", url=url)
    d = ok(classify(exc), "download.failed")
    assert "abc123" not in d.detail and "AKIA9" not in d.detail
    assert "X-Amz-Signature=***" in d.detail and "Expires=9&v=2" in d.detail


def test_a_tool_is_never_taken_for_a_code() -> None:
    exc = CommandFailed("x", tool="download", returncode=1, output="??")
    ok(classify(exc), "command.failed")


def test_the_default_classifier_is_shared() -> None:
    assert default_classifier.classify(TimeoutError()) == classify(TimeoutError())
