"""Turn any failure into a :class:`Diagnosis`: what happened in plain words, and what to do next.

The recovery manager, the CLI and the web panel all show a failure the same way: a one-line
``message`` ("Downloading models/x.safetensors stopped: the disk is full. Free up disk space, then
resume."), buttons for its ``actions``, and the technical ``detail`` on request. Whether to retry,
and when (``retry_after``), comes from the same place.

How it works
    A :class:`Classifier` holds an ordered list of *rules*. A rule is any callable
    ``rule(exc, context) -> Diagnosis | None``. :meth:`Classifier.classify` walks the
    exception's chain (the exception itself, then its ``__cause__`` / ``__context__``,
    outermost first) and asks each rule in turn about each link; the first answer wins. So the
    outermost error a rule recognises decides: a ``HashMismatch`` raised while handling a reset
    is a hash mismatch, and a full disk met while handling a timeout is a full disk. A generic
    wrapper (a ``FilesystemError`` without an errno, a ``CommandFailed`` whose output no table
    knows, a bare ``SnapfsError``) has no rule, so its cause decides; only when no link is
    recognised do the *fallbacks* describe the outermost wrapper by its own message. A rule that
    raises is skipped; anything else becomes ``internal`` with a ``report-bug`` action.
    ``classify`` never raises.

Most rules are tables: :data:`KINDS` is the catalog of diagnoses (code, category, retryable,
message, actions), and small tables map errnos, exception types, HTTP statuses and regexes over
git/pip output to codes. :class:`OutputRule` and :class:`ErrnoRule` build rules from such
tables, so a plugin can add its own (``classifier.register(OutputRule("uv", [...]))``).

requests and urllib3 are never imported here: their rules look them up in ``sys.modules``, and
an exception of theirs can only exist if they are loaded.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import re
import shlex
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from ._errors import (
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
)
from ._retry import parse_retry_after

log = logging.getLogger("snapfs")

NETWORK, VALIDATION, DEPENDENCY, SYSTEM = (
    Category.NETWORK,
    Category.VALIDATION,
    Category.DEPENDENCY,
    Category.SYSTEM,
)


# ---- values ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """Something the user (or the recovery manager on their behalf) can do next."""

    id: str  # stable machine id: "retry", "free-space", ...
    label: str  # button text: "Try again"


@dataclass(frozen=True)
class Diagnosis:
    """What a failure means for the user. ``message`` is one plain line; ``detail`` is technical."""

    category: Category
    code: str  # stable, dotted: "net.timeout", "disk.full", "pip.conflict"
    retryable: bool
    message: str
    detail: str
    actions: tuple[Action, ...]
    retry_after: float | None = None  # seconds, when the server said (HTTP Retry-After)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for the web panel and ``--json`` output."""
        return {
            "category": self.category.value,
            "code": self.code,
            "retryable": self.retryable,
            "message": self.message,
            "detail": self.detail,
            "actions": [{"id": a.id, "label": a.label} for a in self.actions],
            "retry_after": self.retry_after,
        }


_ACTION_LIST = (
    Action("retry", "Try again"),
    Action("resume", "Resume where it stopped"),
    Action("wait", "Wait for the other task to finish, then try again"),
    Action("next-source", "Try another download source"),
    Action("redownload", "Download it again from scratch"),
    Action("free-space", "Free up disk space, then resume"),
    Action("rollback", "Roll back to the last snapshot"),
    Action("check-url", "Check the link"),
    Action("check-network", "Check the internet connection"),
    Action("login", "Log in or add an access token"),
    Action("check-permissions", "Check the folder's owner and permissions"),
    Action("check-path", "Check the file or folder"),
    Action("shorten-path", "Use a shorter name or folder"),
    Action("same-disk", "Keep the project and its store on one disk"),
    Action("check-disk", "Check the disk for errors"),
    Action("close-programs", "Close some programs, then try again"),
    Action("fix-plan", "Fix the import plan"),
    Action("fix-command", "Check what you typed"),
    Action("choose-snapshot", "Pick a snapshot from the list"),
    Action("open-project", "Open or create a snapfs project"),
    Action("verify", "Check the stored files (snapfs verify)"),
    Action("pin-version", "Choose another version"),
    Action("install-build-tools", "Install build tools (a C compiler)"),
    Action("install-tool", "Install the missing program"),
    Action("report-bug", "Report a bug"),
)

#: Every built-in action by id.
ACTIONS: Mapping[str, Action] = MappingProxyType({a.id: a for a in _ACTION_LIST})


class _Fields(dict[str, str]):
    """Template fields; a missing one reads as a neutral default instead of raising."""

    DEFAULTS = {
        "path": "that path",
        "pkg": "a package",
        "tool": "a build tool",
        "what": "a file",
        "by": "this",
    }

    def __missing__(self, key: str) -> str:
        return self.DEFAULTS.get(key, "")


@dataclass(frozen=True)
class Kind:
    """One entry of the catalog: everything about a diagnosis except the failure's specifics.

    ``reason`` (what happened) and ``advice`` (what to do) are templates that may name fields:
    ``{path}``, ``{pkg}``, ``{tool}``, ``{what}``, ``{where}``, ``{why}``, ``{text}``, ``{wait}``,
    ``{by}``.
    """

    code: str
    category: Category
    retryable: bool
    reason: str
    advice: str
    actions: tuple[Action, ...]

    def diagnose(
        self,
        context: str = "",
        *,
        detail: str = "",
        retry_after: float | None = None,
        fields: Mapping[str, object] | None = None,
        **more: object,
    ) -> Diagnosis:
        """The diagnosis for this kind; ``fields`` and keywords fill the message templates."""
        given = {**(fields or {}), **more}
        # One line each, but a leading space (" at steps[2]") is part of the value.
        values = _Fields({k: _field(v) for k, v in given.items() if v is not None})
        if retry_after is not None and "wait" not in values:
            values["wait"] = f" in {_duration(retry_after)}"
        reason = self.reason.format_map(values)
        advice = self.advice.format_map(values)
        return Diagnosis(
            category=self.category,
            code=self.code,
            retryable=self.retryable,
            message=_compose(context, reason, advice),
            detail=detail,
            actions=self.actions,
            retry_after=retry_after,
        )


def _kind(
    code: str, category: Category, retryable: bool, reason: str, advice: str, actions: str
) -> Kind:
    return Kind(
        code, category, retryable, reason, advice, tuple(ACTIONS[a] for a in actions.split())
    )


# The catalog. docs/errors.md shows it as a table (a test keeps the two in step).
_KIND_LIST = (
    # -- the network
    _kind("net.timeout", NETWORK, True, "the server took too long to answer", "Try again",
          "retry check-network"),
    _kind("net.reset", NETWORK, True, "the connection dropped before the transfer finished",
          "Try again", "retry check-network"),
    _kind("net.refused", NETWORK, True, "the server refused the connection (it may be down)",
          "Try again later, or use another source", "retry next-source"),
    _kind("net.dns", NETWORK, True,
          "the server's name could not be looked up (no internet connection, or a mistyped address)",
          "Check the internet connection and the link, then try again",
          "check-network check-url retry"),
    _kind("net.unreachable", NETWORK, True, "the network could not be reached",
          "Check the internet connection, then try again", "check-network retry"),
    _kind("net.connect", NETWORK, True, "the server could not be reached",
          "Check the internet connection, then try again", "check-network retry next-source"),
    _kind("net.tls", NETWORK, False, "the secure connection to the server failed",
          "Check the link; a proxy or firewall may be in the way",
          "check-url check-network next-source"),
    _kind("net.tls-cert", NETWORK, False, "the server's security certificate could not be verified",
          "Check the link and the computer's date and time, or use another source",
          "check-url next-source"),
    _kind("net.redirects", NETWORK, False, "the server kept redirecting without sending the file",
          "Check the link, or use another source", "check-url next-source"),
    _kind("net.error", NETWORK, True, "a network error interrupted the transfer", "Try again",
          "retry check-network"),
    _kind("url.invalid", VALIDATION, False, "the link is not a valid web address",
          "Check the link", "check-url"),
    # -- HTTP answers
    _kind("http.401", NETWORK, False, "the server wants you to log in first",
          "Log in or add an access token, then try again", "login check-url next-source"),
    _kind("http.403", NETWORK, False, "the server refused access to the file",
          "Log in with an account that has access, or use another source",
          "login check-url next-source"),
    _kind("http.404", NETWORK, False,
          "the file is not at that address (it may have been moved or deleted)",
          "Check the link, or use another source", "check-url next-source"),
    _kind("http.410", NETWORK, False, "the file was removed from that address",
          "Check the link, or use another source", "check-url next-source"),
    _kind("http.408", NETWORK, True, "the server gave up waiting for the request",
          "Try again{wait}", "retry"),
    _kind("http.429", NETWORK, True, "the server is limiting how often it may be asked",
          "Wait, then try again{wait}", "retry next-source"),
    _kind("http.5xx", NETWORK, True, "the server had a problem on its side",
          "Try again{wait}, or use another source", "retry next-source"),
    _kind("http.4xx", NETWORK, False, "the server refused the request",
          "Check the link, or use another source", "check-url next-source"),
    # -- downloads
    _kind("download.failed", NETWORK, True, "the connection kept failing, so the download paused",
          "Resume it; the part already checked is kept", "resume next-source check-network"),
    _kind("download.error", NETWORK, False, "{text}", "Check the link, or use another source",
          "check-url next-source"),
    _kind("source.unavailable", NETWORK, False, "no download source could provide the file",
          "Check the link, or add another source", "check-url next-source"),
    _kind("content.web-page", VALIDATION, False,
          "the server sent a web page or an error message (maybe a login page) instead of the file",
          "Log in or add an access token, or use another source", "login next-source"),
    _kind("content.wrong", VALIDATION, False, "the server sent something other than the file",
          "Check the link, or use another source", "check-url next-source"),
    _kind("size.mismatch", VALIDATION, False, "the file is not the size it should be",
          "Use another source, or check the expected size", "next-source redownload check-url"),
    _kind("hash.mismatch", VALIDATION, False,
          "the file does not match its expected checksum (it is damaged or a different version)",
          "Use another source, or download it again", "next-source redownload"),
    # -- the disk and the filesystem
    _kind("disk.full", SYSTEM, True, "the disk is full", "Free up disk space, then resume",
          "free-space resume"),
    _kind("fs.permission", SYSTEM, False, "access to {path} was denied",
          "Check who owns it and its permissions, then try again", "check-permissions"),
    _kind("fs.readonly", SYSTEM, False, "the disk holding {path} cannot be written to",
          "Make the disk writable, or use another folder", "check-permissions"),
    _kind("fs.too-many-files", SYSTEM, True, "too many files are open at once",
          "Close some programs, then try again", "close-programs retry"),
    _kind("fs.name-too-long", SYSTEM, False, "a file name or path is too long for this disk",
          "Use a shorter name, or move the project to a shorter folder path", "shorten-path"),
    _kind("fs.cross-device", SYSTEM, False, "a file would have to move between two disks",
          "Keep the project and the snapfs store on one disk", "same-disk report-bug"),
    _kind("fs.not-found", SYSTEM, False, "nothing is at {path} (it may have been moved or deleted)",
          "Check that it is still there", "check-path rollback"),
    _kind("fs.io-error", SYSTEM, False, "the disk reported a read or write failure",
          "Check the disk for errors; it may be failing", "check-disk"),
    _kind("fs.exists", SYSTEM, False, "something is already at {path} and in the way",
          "Move it aside, then try again", "check-path"),
    _kind("fs.symlink-loop", SYSTEM, False, "a link on the way to {path} loops or is not allowed here",
          "Replace the link with a real file or folder", "check-path"),
    _kind("fs.not-a-folder", SYSTEM, False, "part of {path} is a file, not a folder",
          "Check the path", "check-path"),
    _kind("fs.is-a-folder", SYSTEM, False, "there is a folder at {path} where a file was expected",
          "Check the path", "check-path"),
    _kind("fs.busy", SYSTEM, True, "another program is using {path}",
          "Close the program using it, then try again", "close-programs retry"),
    _kind("fs.error", SYSTEM, False, "a file operation failed ({why})", "Check the file or folder",
          "check-path report-bug"),
    _kind("sys.out-of-memory", SYSTEM, True, "the computer ran out of memory",
          "Close some programs, then try again", "close-programs retry"),
    # -- snapfs itself
    _kind("lock.busy", SYSTEM, True, "another snapfs task is working on this project",
          "Wait for it to finish, then try again", "wait"),
    _kind("state.corrupt", SYSTEM, False, "the records snapfs keeps for this project are damaged",
          "Check the project; restore its .snapfs folder from a backup if you have one",
          "verify report-bug"),
    _kind("object.missing", VALIDATION, False, "the stored copy of {what} is missing",
          "Check the stored files", "verify"),
    _kind("object.corrupt", VALIDATION, False, "the stored copy of {what} is damaged",
          "Check the stored files", "verify"),
    _kind("object.modified", VALIDATION, False,
          "the stored copy of {what} was changed in place after its snapshot",
          "Check the stored files; take a new snapshot to keep the change", "verify"),
    _kind("path.unsafe", VALIDATION, False, "a path would lead outside the project, so it was refused",
          "Check the paths you gave", "check-path fix-plan"),
    _kind("plan.invalid", VALIDATION, False, "the import plan has a problem{where}{why}; nothing was changed",
          "Fix the plan and run it again", "fix-plan"),
    _kind("snapshot.not-found", VALIDATION, False, "{text}", "Pick a snapshot from the list",
          "choose-snapshot"),
    _kind("usage", VALIDATION, False, "{text}", "Check what you typed", "fix-command"),
    _kind("project.not-found", VALIDATION, False, "this folder is not a snapfs project",
          "Open a project folder, or create one here", "open-project"),
    _kind("project.not-a-folder", VALIDATION, False, "the project path is not a folder",
          "Check the path", "check-path"),
    _kind("interrupted", SYSTEM, True, "it was interrupted", "Resume it when you are ready",
          "resume"),
    # -- git
    _kind("git.repo-gone", DEPENDENCY, False,
          "the repository cannot be found (it may have been deleted, renamed or made private)",
          "Check its address, or use another source", "check-url login next-source"),
    _kind("git.commit-missing", DEPENDENCY, False,
          "the recorded version no longer exists in the repository",
          "Choose another version, or roll back", "pin-version rollback"),
    _kind("git.auth-required", DEPENDENCY, False, "the repository asks for a login",
          "Log in or add an access token, then try again", "login check-url"),
    _kind("git.network", NETWORK, True, "the repository's server could not be reached",
          "Check the internet connection, then try again", "retry check-network"),
    _kind("git.failed", DEPENDENCY, False, "git failed for a reason snapfs does not recognise",
          "Open the details to see git's message", "report-bug rollback"),
    # -- pip
    _kind("pip.network", NETWORK, True, "the package index could not be reached",
          "Check the internet connection, then try again", "retry check-network"),
    _kind("pip.no-match", DEPENDENCY, False, "no version of {pkg} matches what was asked for",
          "Check the package name, or choose another version", "pin-version rollback"),
    _kind("pip.python-version", DEPENDENCY, False, "this version of Python is not supported by {pkg}",
          "Choose another version of it", "pin-version rollback"),
    _kind("pip.constraint", DEPENDENCY, False,
          "{by} needs a different version of {pkg}, which must stay as it is",
          "Choose versions that work with the current {pkg}, or roll back", "pin-version rollback"),
    _kind("pip.conflict", DEPENDENCY, False,
          "the packages asked for need versions of each other that cannot be installed together",
          "Choose compatible versions, or roll back", "pin-version rollback"),
    _kind("pip.build-tools-missing", DEPENDENCY, False, "building {pkg} needs {tool}, which is not installed",
          "Install build tools, or choose a version with a ready-made download",
          "install-build-tools pin-version"),
    _kind("pip.build-failed", DEPENDENCY, False, "building {pkg} from its source code failed",
          "Choose a version with a ready-made download, or install build tools",
          "pin-version install-build-tools rollback"),
    _kind("pip.venv-missing", DEPENDENCY, False, "the Python environment for this step is missing",
          "Create it, or fix the plan's venv, then try again", "fix-plan rollback"),
    _kind("pip.failed", DEPENDENCY, False, "pip failed for a reason snapfs does not recognise",
          "Open the details to see pip's message", "report-bug rollback"),
    # -- other tools, and the rest
    _kind("tool.missing", DEPENDENCY, False, "the program {tool} is not installed",
          "Install it, then try again", "install-tool"),
    _kind("tool.timeout", DEPENDENCY, True, "the program {tool} took too long and was stopped",
          "Try again; if it happens again, check the internet connection", "retry check-network"),
    _kind("command.failed", DEPENDENCY, False, "the program {tool} failed",
          "Open the details to see its message", "report-bug rollback"),
    _kind("error", SYSTEM, False, "{text}", "Open the details for more", "report-bug"),
    _kind("internal", SYSTEM, False, "something unexpected went wrong inside snapfs",
          "Report a bug and include the details", "report-bug"),
)  # fmt: skip

#: The catalog of built-in diagnoses by code.
KINDS: Mapping[str, Kind] = MappingProxyType({k.code: k for k in _KIND_LIST})


# ---- the classifier -------------------------------------------------------------------------
Rule = Callable[[BaseException, str], "Diagnosis | None"]
"""``rule(exc, context)``: a diagnosis for this exception (one link of a chain), or None."""


class Classifier:
    """An ordered list of rules. For the outermost link any rule answers, the first rule wins.

    ``fallbacks`` are rules for generic wrappers, asked only when no rule recognised any link
    of the chain (by default: describe a ``SnapfsError`` by its own message and class).
    """

    def __init__(
        self, rules: Iterable[Rule] | None = None, fallbacks: Iterable[Rule] | None = None
    ) -> None:
        self._rules: list[Rule] = list(default_rules() if rules is None else rules)
        self._fallbacks: tuple[Rule, ...] = tuple(
            default_fallbacks() if fallbacks is None else fallbacks
        )
        self._lock = threading.Lock()

    @property
    def rules(self) -> tuple[Rule, ...]:
        with self._lock:
            return tuple(self._rules)

    def register(self, rule: Rule, *, first: bool = True) -> Rule:
        """Add ``rule`` before the others (it overrides them for the same exception), or after
        them with ``first=False`` (it only sees what no other rule claims). Returns ``rule``, so
        it also works as a decorator."""
        with self._lock:
            if first:
                self._rules.insert(0, rule)
            else:
                self._rules.append(rule)
        return rule

    def unregister(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def classify(self, exc: BaseException, context: str = "") -> Diagnosis:
        """Diagnose ``exc``. Never raises (an exception inside a rule skips that rule)."""
        try:
            chain = exception_chain(exc)
            for rules in (self.rules, self._fallbacks):
                for link in chain:
                    for rule in rules:
                        found = _ask(rule, link, context)
                        if found is not None:
                            return _finish(found, chain)
            return _internal(exc, context, chain)
        except Exception:  # pragma: no cover - belt and braces: describing the failure failed
            log.debug("classifying %r failed", exc, exc_info=True)
            return KINDS["internal"].diagnose(context, detail=_safe_str(exc) or type(exc).__name__)


def _ask(rule: Rule, exc: BaseException, context: str) -> Diagnosis | None:
    try:
        found = rule(exc, context)
    except Exception:  # a broken plugin rule must not hide the real failure
        log.debug("error rule %r failed on %r", rule, exc, exc_info=True)
        return None
    if found is not None and not isinstance(found, Diagnosis):
        log.debug("error rule %r returned %r, not a Diagnosis", rule, found)
        return None
    return found


# Exceptions that mean "snapfs has a bug here". One raised while handling another failure is the
# news: its __context__ (an implicit chain) is not walked, or the bug would pass for, say, a
# network error. An explicit ``raise ... from`` is always walked.
_BUG_TYPES = (
    AssertionError,
    AttributeError,
    NameError,
    TypeError,
    ArithmeticError,
    KeyError,
    IndexError,
    NotImplementedError,
    RecursionError,
    ValueError,
    LookupError,
)


def exception_chain(exc: BaseException, limit: int = 16) -> tuple[BaseException, ...]:
    """``exc`` and what caused it, outermost first, without repeats.

    Follows ``__cause__``, ``__context__`` (unless suppressed, or ``exc`` looks like a bug),
    urllib3's ``reason`` and exceptions carried in ``args`` (requests wraps urllib3 that way).
    """
    out: list[BaseException] = []
    seen: set[int] = set()
    todo = [exc]
    while todo and len(out) < limit:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        nxt: list[BaseException] = []
        if e.__cause__ is not None:
            nxt.append(e.__cause__)
        elif (
            e.__context__ is not None
            and not e.__suppress_context__
            and (isinstance(e, SnapfsError) or not isinstance(e, _BUG_TYPES))
        ):
            nxt.append(e.__context__)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            nxt.append(reason)
        nxt.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        todo.extend(nxt)
    return tuple(out)


def _finish(d: Diagnosis, chain: Sequence[BaseException]) -> Diagnosis:
    """Hold every diagnosis to the contract: one line, at least one action, a detail."""
    message = _one_line(d.message, 400) or "Something went wrong."
    actions = d.actions or ((ACTIONS["retry"],) if d.retryable else (ACTIONS["report-bug"],))
    detail = d.detail or describe(chain)
    return replace(d, message=message, actions=tuple(actions), detail=detail)


def _internal(exc: BaseException, context: str, chain: Sequence[BaseException]) -> Diagnosis:
    detail = describe(chain)
    tb = ""
    if exc.__traceback__ is not None:  # where the bug is: worth having in a bug report
        try:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except Exception:  # pragma: no cover - formatting is best effort
            pass
    if tb:
        detail = f"{detail}\n\n{tb.rstrip()}"
    return _finish(KINDS["internal"].diagnose(context, detail=detail), chain)


# ---- describing the failure (the detail) ----------------------------------------------------
_DETAIL_MAX = 8000
_OUTPUT_LINES = 25


def describe(chain: Sequence[BaseException]) -> str:
    """The technical detail: each link's type and text, plus errno, HTTP status, URL, command."""
    parts: list[str] = []
    for i, e in enumerate(chain):
        name = type(e).__qualname__
        module = type(e).__module__
        if module not in ("builtins", "__main__"):
            name = f"{module}.{name}"
        head = f"{name}: {_safe_str(e)}" if _safe_str(e) else name
        lines = [head if i == 0 else f"caused by {head}"]
        try:
            lines.extend(f"  {x}" for x in _extras(e))
        except Exception:  # pragma: no cover - extras are best effort
            pass
        parts.append("\n".join(lines))
    text = _redact("\n".join(parts))
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 20] + "\n... (cut short)"
    return text


# The detail ends up in bug reports: keep passwords and signed-URL secrets out of it.
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@'\"]+@", re.IGNORECASE)
_SECRET_PARAM = re.compile(
    r"([?&][^=&#\s]*(?:token|signature|sig|secret|password|passwd|credential|key|auth)"
    r"[^=&#\s]*=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def _redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def _extras(e: BaseException) -> list[str]:
    out: list[str] = []
    if isinstance(e, OSError) and isinstance(e.errno, int):
        name = _errno.errorcode.get(e.errno, "?")
        out.append(f"errno {name} ({e.errno}): {e.strerror or os.strerror(e.errno)}")
        for attr in ("filename", "filename2"):
            value = getattr(e, attr, None)
            if value is not None:
                out.append(f"{attr}: {_decode(value)}")
    status, headers, url = _http_parts(e)
    if status is not None:
        out.append(f"HTTP status: {status}")
        retry = headers.get("Retry-After") if headers is not None else None
        if retry:
            out.append(f"Retry-After: {retry}")
    if url:
        out.append(f"url: {url}")
    for attr in ("where", "owner", "oid"):
        value = getattr(e, attr, None)
        if isinstance(value, str) and value:
            out.append(f"{attr}: {value}")
    paths = getattr(e, "paths", None)
    if isinstance(paths, tuple) and paths:
        out.append("paths: " + ", ".join(map(str, paths[:10])))
    cmd = _command_parts(e)
    if cmd is not None:
        tool, argv, rc, output = cmd
        out.append(f"command: {shlex.join(argv) if argv else tool}")
        out.append(f"exit code: {rc}")
        tail = output.rstrip().splitlines()[-_OUTPUT_LINES:]
        if tail:
            out.append(f"output (last {len(tail)} lines):")
            out.extend(f"  {line}" for line in tail)
    return out


def _http_parts(e: BaseException) -> tuple[int | None, Any, str]:
    """(status, headers, url) of an HTTP error from requests or urllib, else (None, None, url)."""
    response = getattr(e, "response", None)
    if response is not None and isinstance(getattr(response, "status_code", None), int):
        return response.status_code, response.headers, str(getattr(response, "url", "") or "")
    urllib_error = sys.modules.get("urllib.error")
    if urllib_error is not None and isinstance(e, urllib_error.HTTPError):
        return int(e.code), e.headers, str(e.url or "")
    url = getattr(e, "url", None)
    return None, None, url if isinstance(url, str) else ""


# ---- rule: interrupted ----------------------------------------------------------------------
def _interrupted(exc: BaseException, context: str) -> Diagnosis | None:
    # The CLI turns SIGTERM/SIGHUP into KeyboardInterrupt("signal N") so cleanup runs.
    if isinstance(exc, KeyboardInterrupt):
        return KINDS["interrupted"].diagnose(context)
    return None


# ---- rule: snapfs's own errors --------------------------------------------------------------
_HTTP_IN_MESSAGE = re.compile(r"\(HTTP (\d{3})\)")
_SIZE_IN_MESSAGE = re.compile(r"\b\d+ bytes, expected \d+")


def _fields_of(exc: SnapfsError) -> dict[str, object]:
    paths = getattr(exc, "paths", ())
    return {"text": exc.message, "what": paths[0] if paths else None}


def _plan(exc: BaseException, context: str) -> Diagnosis:
    assert isinstance(exc, PlanError)
    why = exc.message
    if exc.where and why.startswith(f"{exc.where}: "):
        why = why[len(exc.where) + 2 :]
    why = _one_line(why, 100)
    return KINDS["plan.invalid"].diagnose(
        context,
        where=f" at {exc.where}" if exc.where else "",
        why=f" ({_lower_first(why.rstrip('.'))})" if why else "",
    )


def _hash_mismatch(exc: BaseException, context: str) -> Diagnosis:
    code = "size.mismatch" if _is_size_mismatch(exc) else "hash.mismatch"
    return KINDS[code].diagnose(context)


def _bad_content(exc: BaseException, context: str) -> Diagnosis:
    text = str(exc)
    if _is_size_mismatch(exc):
        code = "size.mismatch"
    elif "web page" in text or "JSON" in text or "login" in text:
        code = "content.web-page"
    else:
        code = "content.wrong"
    return KINDS[code].diagnose(context)


def _is_size_mismatch(exc: BaseException) -> bool:
    if hasattr(exc, "expected_size") and hasattr(exc, "actual_size"):
        return True
    return bool(_SIZE_IN_MESSAGE.search(str(exc)))


def _source_unavailable(exc: BaseException, context: str) -> Diagnosis:
    status = getattr(exc, "status", None)
    statuses = {int(s) for s in _HTTP_IN_MESSAGE.findall(str(exc))}
    if not isinstance(status, int) and len(statuses) == 1:
        status = statuses.pop()
    if isinstance(status, int):
        code = _http_code(status)
        # Only a "won't change" status fits an error that says retrying is useless.
        if not KINDS[code].retryable:
            return KINDS[code].diagnose(context)
    return KINDS["source.unavailable"].diagnose(context)


def _simple(code: str) -> Callable[[BaseException, str], Diagnosis]:
    def diagnose(exc: BaseException, context: str) -> Diagnosis:
        assert isinstance(exc, SnapfsError)
        return KINDS[code].diagnose(context, fields=_fields_of(exc))

    return diagnose


# Subclasses before their bases: the first isinstance match wins.
_SNAPFS_TABLE: tuple[tuple[type[SnapfsError], Callable[[BaseException, str], Diagnosis]], ...] = (
    (DiskFull, _simple("disk.full")),
    (LockBusy, _simple("lock.busy")),
    (StateCorrupt, _simple("state.corrupt")),
    (SealBroken, _simple("object.modified")),
    (ObjectCorrupt, _simple("object.corrupt")),
    (ObjectMissing, _simple("object.missing")),
    (UnsafePath, _simple("path.unsafe")),
    (PlanError, _plan),
    (SnapshotNotFound, _simple("snapshot.not-found")),
    (UsageError, _simple("usage")),
    (NotAProject, _simple("project.not-found")),
    (ProjectPathError, _simple("project.not-a-folder")),
    (HashMismatch, _hash_mismatch),
    (BadContent, _bad_content),
    (SourceUnavailable, _source_unavailable),
    (DownloadFailed, _simple("download.failed")),
)


def _snapfs(exc: BaseException, context: str) -> Diagnosis | None:
    if not isinstance(exc, SnapfsError):
        return None
    for cls, diagnose in _SNAPFS_TABLE:
        if isinstance(exc, cls):
            d = diagnose(exc, context)
            # The error's own class says whether retrying helps; the diagnosis agrees with it.
            return replace(d, category=exc.category, retryable=exc.retryable)
    return None


# ---- rule: a mismatch told by attributes ----------------------------------------------------
def _mismatch_attributes(exc: BaseException, context: str) -> Diagnosis | None:
    """Any exception carrying expected/actual sizes or digests (a plain ValueError is not one)."""
    if isinstance(exc, SnapfsError):
        return None
    if hasattr(exc, "expected_size") and hasattr(exc, "actual_size"):
        return KINDS["size.mismatch"].diagnose(context)
    for stem in ("digest", "hash", "sha256"):
        if hasattr(exc, f"expected_{stem}") and hasattr(exc, f"actual_{stem}"):
            return KINDS["hash.mismatch"].diagnose(context)
    return None


# ---- rules: external tools (git, pip, ...) --------------------------------------------------
def _command_parts(e: BaseException) -> tuple[str, tuple[str, ...], int | None, str] | None:
    """(tool, argv, returncode, output) of a failed command: CommandFailed or CalledProcessError."""
    if isinstance(e, CommandFailed):
        return e.tool, tuple(e.argv), e.returncode, e.output or ""
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None and isinstance(e, subprocess.CalledProcessError):
        argv = _argv(e.cmd)
        out = "".join(
            x.decode(errors="replace") if isinstance(x, bytes) else x
            for x in (e.stdout, e.stderr)
            if x
        )
        return (argv[0] if argv else "?"), argv, e.returncode, out
    return None


def _argv(cmd: object) -> tuple[str, ...]:
    if isinstance(cmd, (list, tuple)):
        return tuple(os.fsdecode(c) if isinstance(c, (bytes, os.PathLike)) else str(c) for c in cmd)
    text = os.fsdecode(cmd) if isinstance(cmd, (bytes, os.PathLike)) else str(cmd)
    try:
        return tuple(shlex.split(text))
    except ValueError:  # unbalanced quotes: a shell would have refused it too
        return tuple(text.split())


def tool_name(tool: str, argv: Sequence[str] = ()) -> str:
    """``/usr/bin/pip3.11`` -> ``pip``; ``python -m pip`` -> ``pip``."""
    base = os.path.basename(tool).lower()
    if base.endswith(".exe"):
        base = base[:-4]
    base = re.sub(r"[\d.]+$", "", base)
    if base == "python" and "-m" in argv:
        i = list(argv).index("-m")
        if i + 1 < len(argv):
            return tool_name(argv[i + 1])
    return base


Row = tuple["Kind | str", str]
"""A row of an :class:`OutputRule`: the kind (or its code in :data:`KINDS`) and a regex."""


class OutputRule:
    """A table of regexes over a failed command's output; the first row that matches wins.

    Named groups in a regex (``(?P<pkg>...)``) fill the kind's message fields. ``tools`` limits
    the rule to some tools (by :func:`tool_name`); an empty one applies it to every tool.
    """

    def __init__(self, tools: str | Iterable[str], rows: Iterable[Row]) -> None:
        self.tools = frozenset([tools] if isinstance(tools, str) else tools)
        self.rows: tuple[tuple[Kind, re.Pattern[str]], ...] = tuple(
            (KINDS[k] if isinstance(k, str) else k, re.compile(rx, re.IGNORECASE | re.MULTILINE))
            for k, rx in rows
        )

    def __repr__(self) -> str:
        return f"OutputRule({sorted(self.tools)!r}, {len(self.rows)} rows)"

    def __call__(self, exc: BaseException, context: str) -> Diagnosis | None:
        parts = _command_parts(exc)
        if parts is None:
            return None
        tool, argv, _, output = parts
        if self.tools and tool_name(tool, argv) not in self.tools:
            return None
        for kind, rx in self.rows:
            m = rx.search(output)
            if m is not None:
                fields = {k: _clean_name(v) for k, v in m.groupdict().items() if v}
                return kind.diagnose(context, fields=fields)
        return None


def _clean_name(value: str) -> str:
    return value.strip().strip("'\"`‘’“”").rstrip(".,;:)")


# What any tool can say. The disk filling up is the disk's fault, whatever was running.
_ANY_TOOL_ROWS: tuple[Row, ...] = (("disk.full", r"No space left on device|Disk quota exceeded"),)

# Order matters: the first match wins. Auth before "repository gone" before "network", because
# git says "unable to access" for a 403 and "Could not read from remote repository" for many
# things.
GIT_ROWS: tuple[Row, ...] = (
    ("git.auth-required", r"could not read (Username|Password)"),
    ("git.auth-required", r"terminal prompts disabled"),
    ("git.auth-required", r"Authentication failed"),
    ("git.auth-required", r"Permission denied \(publickey"),
    ("git.auth-required", r"The requested URL returned error: 40[13]\b"),
    ("git.repo-gone", r"Repository not found"),
    ("git.repo-gone", r"does not appear to be a git repository"),
    ("git.repo-gone", r"repository '[^'\n]*' (does not exist|not found)"),
    ("git.repo-gone", r"^fatal: '[^'\n]*' does not exist"),
    ("git.repo-gone", r"The requested URL returned error: (404|410)\b"),
    ("git.commit-missing", r"reference is not a tree"),
    ("git.commit-missing", r"did not match any"),
    ("git.commit-missing", r"unknown revision"),
    ("git.commit-missing", r"not our ref"),
    ("git.commit-missing", r"couldn't find remote ref"),
    ("git.commit-missing", r"Remote branch \S+ not found"),
    ("git.commit-missing", r"Could not parse object|bad object|invalid reference"),
    ("git.network", r"Could not resolve host"),
    ("git.network", r"Connection (timed out|refused|reset)"),
    ("git.network", r"Operation timed out|Failed to connect|Couldn't connect to server"),
    ("git.network", r"unable to access"),
    ("git.network", r"early EOF|RPC failed|Empty reply from server"),
    ("git.network", r"remote end hung up unexpectedly"),
)

# Network first: pip reports an index it cannot reach as "No matching distribution found" and
# only says why in its "Retrying ..." warnings. Then the specific resolver and build failures,
# most specific first (a missing compiler is also a failed build).
PIP_ROWS: tuple[Row, ...] = (
    ("pip.network", r"NewConnectionError|NameResolutionError|ConnectTimeoutError|ReadTimeoutError"),
    ("pip.network", r"Read timed out|Max retries exceeded|ProxyError"),
    ("pip.network", r"Could not fetch URL|connection error|Temporary failure in name resolution"),
    ("pip.network", r"Connection (reset|refused|aborted)|IncompleteRead|ChunkedEncodingError"),
    ("fs.permission", r"due to an OSError: \[Errno 13\][^'\n]*(?:'(?P<path>[^'\n]+)')?"),
    ("fs.readonly", r"due to an OSError: \[Errno 30\][^'\n]*(?:'(?P<path>[^'\n]+)')?"),
    # A caller that holds packages in place may say so in the output ("torch must not change").
    ("pip.constraint", r"\b(?P<pkg>[A-Za-z0-9][\w.-]*)(?:[=<>!~]=?[^\s,;()]*)? must not"
                       r" (change|be changed)"),
    # Pinned by a constraint, and pip says which requirement wanted another version: name it,
    # so the user knows what to change (pip lists the conflict's causes in either order).
    ("pip.constraint", r"^\s*(?P<by>[A-Za-z0-9][\w.-]*) \S+ depends on (?P<pkg>[A-Za-z0-9][\w.-]*)"
                       r"[^\n]*\n\s*The user requested \(constraint\) (?P=pkg)\b"),
    ("pip.constraint", r"The user requested \(constraint\) (?P<pkg>[A-Za-z0-9][\w.-]*)[^\n]*\n"
                       r"\s*(?P<by>[A-Za-z0-9][\w.-]*) \S+ depends on (?P=pkg)\b"),
    ("pip.constraint", r"The user requested \(constraint\) (?P<pkg>[A-Za-z0-9][A-Za-z0-9._-]*)"),
    # What snapfs's import says when pip moved a package the plan protects.
    ("pip.constraint", r"protected package changed: (?P<pkg>\S+)"),
    ("pip.conflict", r"ResolutionImpossible|conflicting dependencies|dependency conflict"),
    ("pip.venv-missing", r"/bin/python[\d.]*: No such file or directory"),
    ("pip.python-version", r"require a different python version[\s\S]*"
                           r"No matching distribution found for (?P<pkg>\S+)"),
    ("pip.python-version", r"Package '(?P<pkg>[^']+)' requires a different Python"),
    ("pip.build-tools-missing", r"command '(?:[^'\n]*[/\\])?(?P<tool>[^'/\\\n]+)' failed: "
                                r"No such file or directory"),
    ("pip.build-tools-missing", r"unable to execute '(?P<tool>[^'\n]+)'"),
    ("pip.build-tools-missing", r"\b(?P<tool>gcc|cc|g\+\+|c\+\+|clang|cmake|make|rustc|cargo)"
                                r": (command )?not found"),
    ("pip.build-tools-missing", r"(?P<tool>Microsoft Visual C\+\+) [\d.]+ or greater is required"),
    ("pip.no-match", r"No matching distribution found for (?P<pkg>\S+)"),
    ("pip.no-match", r"Could not find a version that satisfies the requirement (?P<pkg>\S+)"),
    ("pip.build-failed", r"Failed building wheel for (?P<pkg>\S+)"),
    ("pip.build-failed", r"Failed to build (?!installable|one or more)(?P<pkg>\S+)"),
    ("pip.build-failed", r"Could not build wheels for (?P<pkg>[^\s,]+)"),
    ("pip.build-failed", r"Failed to build installable wheels for [^(\n]*\((?P<pkg>[^)\s,]+)"),
    ("pip.build-failed", r"legacy-install-failure|metadata-generation-failed"),
    ("pip.build-failed", r"subprocess-exited-with-error"),
)  # fmt: skip


def _tool_state(exc: BaseException, context: str) -> Diagnosis | None:
    """The tool is not installed (exit status 127, or its exec failed with ENOENT), or it ran
    past its time limit and was killed."""
    subprocess = sys.modules.get("subprocess")
    expired = subprocess.TimeoutExpired if subprocess is not None else ()
    if expired and isinstance(exc, expired):
        argv = _argv(exc.cmd)
        name = tool_name(argv[0], argv) if argv else "a program"
        return KINDS["tool.timeout"].diagnose(context, tool=name)
    parts = _command_parts(exc)
    if parts is None:
        return None
    tool, argv, rc, _ = parts
    name = tool_name(tool, argv) or tool
    cause = exc.__cause__ or exc.__context__
    if rc == 127 or (isinstance(cause, FileNotFoundError) and cause.filename in (tool, *argv[:1])):
        return KINDS["tool.missing"].diagnose(context, tool=name)
    if expired and isinstance(cause, expired):
        return KINDS["tool.timeout"].diagnose(context, tool=name)
    return None


# ---- rule: requests, urllib3 and the standard library's network errors ----------------------
_CONNECT_HINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("net.dns", ("NameResolutionError", "Name or service not known", "nodename nor servname",
                 "Temporary failure in name resolution", "getaddrinfo failed",
                 "No address associated", "Failed to resolve")),
    ("net.refused", ("Connection refused", "ConnectionRefusedError", "actively refused")),
    ("net.unreachable", ("Network is unreachable", "No route to host")),
    ("net.reset", ("Connection reset", "ConnectionResetError", "RemoteDisconnected",
                   "Connection aborted", "BrokenPipe", "Connection broken")),
    ("net.timeout", ("timed out",)),
)  # fmt: skip


def _connect_error(exc: BaseException, context: str) -> Diagnosis:
    text = _safe_str(exc)
    for code, needles in _CONNECT_HINTS:
        if any(n in text for n in needles):
            return KINDS[code].diagnose(context)
    return KINDS["net.connect"].diagnose(context)


def _tls_error(exc: BaseException, context: str) -> Diagnosis:
    text = _safe_str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text.lower():
        return KINDS["net.tls-cert"].diagnose(context)
    if "EOF occurred" in text or "UNEXPECTED_EOF" in text:  # the link dropped mid-handshake
        return KINDS["net.reset"].diagnose(context)
    return KINDS["net.tls"].diagnose(context)


def _http_code(status: int) -> str:
    if status in (401, 403, 404, 408, 410, 429):
        return f"http.{status}"
    return "http.5xx" if status >= 500 else "http.4xx"


def _http_error(exc: BaseException, context: str) -> Diagnosis | None:
    status, headers, _ = _http_parts(exc)
    if status is None:
        return KINDS["net.error"].diagnose(context)
    kind = KINDS[_http_code(status)]
    retry_after = None
    if kind.retryable and headers is not None:
        try:
            retry_after = parse_retry_after(headers.get("Retry-After"))
        except ValueError:  # a header like "²" passes isdigit() but not int()
            retry_after = None
    return kind.diagnose(context, retry_after=retry_after)


def _max_retry(exc: BaseException, context: str) -> Diagnosis | None:
    if isinstance(getattr(exc, "reason", None), BaseException):
        return None  # the chain holds the reason: let it speak
    return _connect_error(exc, context)


# (module, class name, code or handler), subclasses before their bases.
_LIBRARY_TABLE: tuple[
    tuple[str, str, str | Callable[[BaseException, str], Diagnosis | None]], ...
] = (
    ("requests.exceptions", "SSLError", _tls_error),
    ("requests.exceptions", "ConnectTimeout", "net.timeout"),
    ("requests.exceptions", "ReadTimeout", "net.timeout"),
    ("requests.exceptions", "Timeout", "net.timeout"),
    ("requests.exceptions", "TooManyRedirects", "net.redirects"),
    ("requests.exceptions", "ChunkedEncodingError", "net.reset"),
    ("requests.exceptions", "ContentDecodingError", "net.reset"),
    ("requests.exceptions", "InvalidURL", "url.invalid"),
    ("requests.exceptions", "MissingSchema", "url.invalid"),
    ("requests.exceptions", "InvalidSchema", "url.invalid"),
    ("requests.exceptions", "HTTPError", _http_error),
    ("requests.exceptions", "RetryError", "http.5xx"),
    ("requests.exceptions", "ConnectionError", _connect_error),
    ("requests.exceptions", "RequestException", "net.error"),
    ("urllib3.exceptions", "SSLError", _tls_error),
    ("urllib3.exceptions", "NameResolutionError", "net.dns"),
    ("urllib3.exceptions", "ConnectTimeoutError", "net.timeout"),
    ("urllib3.exceptions", "ReadTimeoutError", "net.timeout"),
    ("urllib3.exceptions", "TimeoutError", "net.timeout"),
    ("urllib3.exceptions", "IncompleteRead", "net.reset"),
    ("urllib3.exceptions", "ProtocolError", "net.reset"),
    ("urllib3.exceptions", "NewConnectionError", _connect_error),
    ("urllib3.exceptions", "MaxRetryError", _max_retry),
    ("urllib.error", "HTTPError", _http_error),
    ("http.client", "IncompleteRead", "net.reset"),
    ("http.client", "RemoteDisconnected", "net.reset"),
    ("ssl", "SSLCertVerificationError", "net.tls-cert"),
    ("ssl", "SSLEOFError", "net.reset"),
    ("ssl", "SSLError", _tls_error),
)

# Builtins, by type: the errno may be missing (``TimeoutError()``), so the type decides.
_BUILTIN_TABLE: tuple[tuple[type[BaseException], str], ...] = (
    (socket.gaierror, "net.dns"),
    (ConnectionRefusedError, "net.refused"),
    (ConnectionResetError, "net.reset"),
    (ConnectionAbortedError, "net.reset"),
    (BrokenPipeError, "net.reset"),
    (TimeoutError, "net.timeout"),  # socket.timeout is TimeoutError
)


def _network(exc: BaseException, context: str) -> Diagnosis | None:
    for module, name, handler in _LIBRARY_TABLE:
        mod = sys.modules.get(module)  # never import: if it isn't loaded, exc can't be one of its
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            if isinstance(handler, str):
                return KINDS[handler].diagnose(context)
            return handler(exc, context)
    for cls_, code in _BUILTIN_TABLE:
        if isinstance(exc, cls_):
            return KINDS[code].diagnose(context)
    return None


# ---- rule: OSError by errno -----------------------------------------------------------------
def _errnos(*names: str) -> tuple[int, ...]:
    return tuple(getattr(_errno, n) for n in names if hasattr(_errno, n))


ERRNO_TABLE: tuple[tuple[tuple[int, ...], str], ...] = (
    (_errnos("ENOSPC", "EDQUOT"), "disk.full"),
    (_errnos("EACCES", "EPERM"), "fs.permission"),
    (_errnos("EROFS"), "fs.readonly"),
    (_errnos("EMFILE", "ENFILE"), "fs.too-many-files"),
    (_errnos("ENAMETOOLONG"), "fs.name-too-long"),
    (_errnos("EXDEV"), "fs.cross-device"),
    (_errnos("ENOENT"), "fs.not-found"),
    (_errnos("EIO"), "fs.io-error"),
    (_errnos("ENOTEMPTY", "EEXIST"), "fs.exists"),
    (_errnos("ELOOP"), "fs.symlink-loop"),
    (_errnos("ENOTDIR"), "fs.not-a-folder"),
    (_errnos("EISDIR"), "fs.is-a-folder"),
    (_errnos("EBUSY", "ETXTBSY"), "fs.busy"),
    (_errnos("ENOMEM"), "sys.out-of-memory"),
    (_errnos("ECONNRESET", "ECONNABORTED", "EPIPE"), "net.reset"),
    (_errnos("ECONNREFUSED"), "net.refused"),
    (_errnos("ETIMEDOUT"), "net.timeout"),
    (_errnos("ENETUNREACH", "EHOSTUNREACH", "ENETDOWN", "EHOSTDOWN"), "net.unreachable"),
)
"""errno values -> code. Rows are tried in order; unlisted errnos become ``fs.error``."""


class ErrnoRule:
    """Diagnose an OSError by its errno through a table; ``fallback`` (a code) for the rest."""

    def __init__(
        self, table: Iterable[tuple[Iterable[int], Kind | str]], fallback: str | None = None
    ) -> None:
        self.table: dict[int, Kind] = {}
        for numbers, kind in table:
            for n in numbers:
                self.table.setdefault(n, KINDS[kind] if isinstance(kind, str) else kind)
        self.fallback = KINDS[fallback] if fallback else None

    def __repr__(self) -> str:
        return f"ErrnoRule({len(self.table)} errnos)"

    def __call__(self, exc: BaseException, context: str) -> Diagnosis | None:
        if not isinstance(exc, OSError) or not isinstance(exc.errno, int):
            return None
        kind = self.table.get(exc.errno, self.fallback)
        if kind is None:
            return None
        path = exc.filename if exc.filename is not None else None
        return kind.diagnose(
            context,
            path=_short_path(_decode(path)) if path is not None else None,
            why=_lower_first(exc.strerror or os.strerror(exc.errno)),
        )


# ---- rule: generic snapfs errors (last: their cause, output or errno says more) -------------
def _generic_snapfs(exc: BaseException, context: str) -> Diagnosis | None:
    if not isinstance(exc, SnapfsError):
        return None
    parts = _command_parts(exc)
    if parts is not None:
        name = tool_name(parts[0], parts[1])
        code = f"{name}.failed" if name in ("git", "pip") else "command.failed"
        d = KINDS[code].diagnose(context, tool=name)
    elif isinstance(exc, FilesystemError):
        d = KINDS["fs.error"].diagnose(context, why=_lower_first(exc.message.rstrip(".")))
    elif isinstance(exc, DownloadError):
        d = KINDS["download.error"].diagnose(context, text=exc.message)
    else:
        d = KINDS["error"].diagnose(context, text=exc.message)
        if exc.retryable:
            d = replace(d, actions=(ACTIONS["retry"],))
    return replace(d, category=exc.category, retryable=exc.retryable)


def default_rules() -> list[Rule]:
    """The built-in rules, in order: a fresh list each time."""
    return [
        _interrupted,
        _snapfs,
        _mismatch_attributes,
        _tool_state,
        OutputRule((), _ANY_TOOL_ROWS),
        OutputRule("git", GIT_ROWS),
        OutputRule("pip", PIP_ROWS),
        _network,
        ErrnoRule(ERRNO_TABLE, fallback="fs.error"),
    ]


def default_fallbacks() -> list[Rule]:
    """Rules for what no rule recognised: a generic snapfs error speaks for itself."""
    return [_generic_snapfs]


#: The classifier :func:`classify` uses. Register plugin rules here.
default_classifier = Classifier()


def classify(exc: BaseException, context: str = "") -> Diagnosis:
    """Diagnose ``exc`` with :data:`default_classifier`. ``context`` says what was going on,
    as a phrase like "downloading models/x.safetensors". Never raises."""
    return default_classifier.classify(exc, context)


# ---- text helpers ---------------------------------------------------------------------------
def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not break the diagnosis
        return ""


def _field(value: object, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", str(value))
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _lower_first(text: str) -> str:
    # "Permission denied" -> "permission denied", but "URL ..." stays.
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _compose(context: str, reason: str, advice: str) -> str:
    reason = reason.strip().rstrip(".")
    context = _one_line(context, 160).rstrip(".:")
    head = f"{_upper_first(context)} stopped: {_lower_first(reason)}" if context else reason
    advice = advice.strip().rstrip(".")
    return _one_line(
        f"{_upper_first(head)}. {advice}." if advice else f"{_upper_first(head)}.", 400
    )


def _duration(seconds: float) -> str:
    s = max(1, round(seconds))
    if s < 90:
        return f"about {s} second{'s' if s != 1 else ''}"
    m = round(s / 60)
    if m < 90:
        return f"about {m} minutes"
    return f"about {round(m / 60)} hours"


def _decode(value: object) -> str:
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return str(value)


def _short_path(path: str, limit: int = 80) -> str:
    return path if len(path) <= limit else "…" + path[-(limit - 1) :]
