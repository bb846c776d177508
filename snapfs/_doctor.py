"""The doctor: a project's open problems in plain language, each with the fixes on offer.

::

    for issue in snapfs.problems(project):          # cheap: records and stats, no re-hashing
        print(issue.title, [f.label for f in issue.fixes])
    snapfs.apply_fix(project, "op-7", "resume")      # safe to repeat

A problem (:class:`Issue`) is one thing a user can act on: an import that failed or was
interrupted, an interrupted restore, a transaction whose process died, a download that stopped
with verified bytes kept, a download source whose circuit breaker is open, stored data that is
damaged (a sealed hardlink written in place is found cheaply, by its stat; missing and corrupt
objects only by ``deep=True``, which re-hashes everything like ``snapfs verify``).

Each has a stable id within its project (``op-7``, ``restore``, ``txn-3``, ``download-<key>``,
``source-<host>``, ``verify-<kind>-<oid>``), a plain-language title, message and state, the
technical detail for those who ask, and fixes. A :class:`Fix` says what it will do and what,
if anything, it loses. Fix ids are stable too:

=================  ==============================================================  ==========
fix id             what it does                                                    loses data
=================  ==============================================================  ==========
``resume``         run the operation on from the step it stopped at (a retry)      no
``skip-N``         mark step N skipped, then resume after it (done-with-skips)     no (*)
``rollback``       restore the operation's restore point (pre-restore saved first) no
``recover``        finish an interrupted restore / roll back a dead transaction    yes for a
                                                                                   transaction
``recover-keep``   keep a dead transaction's half-done changes                     no
``resume-download`` continue a stopped download from its verified bytes           no
``retry``          close a source's circuit breaker: try it again now              no
``keep``           leave a source's breaker open: use the other sources for now    no
=================  ==============================================================  ==========

(*) what step N would have done is not done; ``Fix.loses`` says so.

:func:`apply_fix` is idempotent: a problem that is no longer open (fixed already) is a no-op
that says so, and so is ``skip-N`` for a step already skipped.

Work a live process is doing (an operation whose owner is alive, a download whose partial file
is locked, a restore holding the project lock) is in progress, not a problem.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import xxhash

from ._config import human_bytes
from ._errors import SnapfsError, StateCorrupt, UsageError
from ._ops import (
    OperationRecord,
    OpEvent,
    list_operations,
    load_operation,
    run_operation,
    skip_step,
    undo_operation,
)
from ._restore import read_intent
from ._scan import ProgressFn, no_progress
from ._txn import Owner, dead_transactions, describe_owner

if TYPE_CHECKING:
    from ._download import DownloadProgress
    from ._project import Project, VerifyReport

PART_SUFFIX = ".snapfs-part"
_PART_NAME = re.compile(r"^([0-9a-f]{16})\.snapfs-part$")
KEY = re.compile(r"^[0-9a-f]{16}$")
_ISSUE_ID = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,300}$")

# Operation states that are a problem to fix (see op_state).
UNFINISHED = ("failed", "interrupted", "pending", "paused")


# ---- small helpers --------------------------------------------------------------------------
def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def safe(text: str) -> str:
    """Printable form of a name that may hold undecodable bytes (PEP 383 surrogates)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def flock_held(path: Path) -> bool:
    """Does some process hold an flock on ``path``? Read from /proc/locks, so asking takes no
    lock that a real writer could trip over; without /proc, a non-blocking probe."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return _probe(path)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(
        "->" not in line and len(parts := line.split()) >= 6 and parts[5] == want for line in lines
    )


def _probe(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing drops our probe lock at once
    return False


def _owner_alive(owner: str) -> bool:
    return Owner.parse(owner).alive() if owner else False


def what_of(rec: OperationRecord) -> str:
    """'Import of portrait workflow', for sentences about an operation."""
    kind = "Import" if rec.kind == "import" else rec.kind.replace("-", " ").capitalize()
    return f"{kind} of {rec.label}" if rec.label else f"{kind} {rec.id}"


def op_state(rec: OperationRecord) -> str:
    """The operation's status as a user sees it: pending, running, done, done-with-skips,
    rolled-back, failed, interrupted (running with a dead owner, or stopped by a signal), or
    paused (a step was skipped and the rest has not run yet)."""
    if rec.status == "running" and not _owner_alive(rec.owner):
        return "interrupted"
    if rec.status == "failed" and (rec.error or {}).get("code") == "interrupted":
        return "interrupted"
    if rec.status in ("failed", "pending") and rec.failed_step is None:
        if any(s.status == "skipped" for s in rec.steps):
            return "paused"
    return rec.status


# ---- partial downloads ----------------------------------------------------------------------
@dataclass(frozen=True)
class PartialDownload:
    key: str  # the partial's file name stem: xxh3-64 of its project-relative DEST
    dest: str
    url: str
    sources: tuple[str, ...]
    size: int | None
    done: int  # verified bytes (the sum of the recorded extents)
    sha256: str
    xxh128: str
    active: bool  # a live process holds the partial's lock: it is downloading now
    updated: float
    op: int | None = None  # the unfinished operation whose download step writes DEST

    @property
    def percent(self) -> float | None:
        return round(100.0 * self.done / self.size, 1) if self.size else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            sources=list(self.sources),
            percent=self.percent,
            done_h=human_bytes(self.done),
            size_h=human_bytes(self.size),
            updated=when(self.updated),
            dest=safe(self.dest),
        )
        return d


def _read_part_record(db_path: Path) -> tuple[dict[str, str], int] | None:
    """(meta, verified bytes) of a partial's SQLite record, read-only; None if unreadable."""
    for suffix in ("", "-wal", "-shm"):  # SQLite follows symlinks; a planted one is not ours
        side = Path(str(db_path) + suffix)
        if side.is_symlink():
            return None
    if not db_path.is_file():
        return None
    try:
        # A URI, for mode=ro; quoted, since a folder name may hold '?' or '#'.
        con = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return None
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        done = con.execute("SELECT COALESCE(SUM(length), 0) FROM extents").fetchone()[0]
        return {str(k): str(v) for k, v in meta.items()}, int(done)
    except sqlite3.Error:
        return None
    finally:
        con.close()


def partial_downloads(p: Project, ops: Sequence[OperationRecord] = ()) -> list[PartialDownload]:
    """Downloads that stopped (or are running) with bytes kept under .snapfs/downloads."""
    return partial_downloads_at(p.state_dir, ops)


def partial_downloads_at(
    state_dir: Path, ops: Sequence[OperationRecord] = ()
) -> list[PartialDownload]:
    """:func:`partial_downloads` from the state folder alone (no Project to open): cheap enough
    to poll for live progress of downloads other processes run."""
    folder = state_dir / "downloads"
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    owners: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for rec in ops:
        for s in rec.plan.get("steps", []):
            if isinstance(s, dict) and s.get("type") == "download" and not s.get("shared"):
                if isinstance(s.get("size"), int):
                    sizes.setdefault(str(s.get("dest")), s["size"])
                if op_state(rec) in UNFINISHED:
                    owners.setdefault(str(s.get("dest")), rec.id)
    out: list[PartialDownload] = []
    for name in names:
        m = _PART_NAME.match(name)
        if not m:
            continue
        part = folder / name
        record = _read_part_record(folder / (name + ".db"))
        if record is None:
            continue
        meta, done = record
        dest = meta.get("dest", "")
        url = meta.get("url", "")
        if not dest or not url:
            continue
        sources = [url] + sorted(
            k[len("validator:") :]
            for k in meta
            if k.startswith("validator:") and k[len("validator:") :] != url
        )
        try:
            st = os.lstat(part)
        except OSError:
            continue
        # The record has "size" only once a server stated it: until then, the plan's size,
        # or the preallocated file's.
        size = int(meta["size"]) if meta.get("size", "").isdigit() else sizes.get(dest)
        if size is None and st.st_size > done:
            size = st.st_size
        out.append(
            PartialDownload(
                key=m.group(1),
                dest=dest,
                url=url,
                sources=tuple(sources),
                size=size,
                done=done,
                sha256=meta.get("sha256", ""),
                xxh128=meta.get("xxh128", ""),
                active=flock_held(part),
                updated=st.st_mtime,
                op=owners.get(dest),
            )
        )
    return out


def partial_download(p: Project, key: str) -> PartialDownload | None:
    if not KEY.match(key):
        return None
    for d in partial_downloads(p):
        # The record must be the one its name says: the key is the hash of its DEST.
        if d.key == key and xxhash.xxh3_64_hexdigest(os.fsencode(d.dest)) == key:
            return d
    return None


# ---- problems and their fixes ---------------------------------------------------------------
@dataclass(frozen=True)
class Fix:
    """One way to address a problem. ``action`` names what :func:`apply_fix` does (and, in the
    web panel, which API route applies it)."""

    id: str  # stable: resume, skip-N, rollback, recover, recover-keep, resume-download, ...
    label: str
    confirm: str  # what will change, and what (if anything) will be lost
    action: str  # resume-op, skip-op, rollback-op, recover, resume-download, reset-source, none
    params: dict[str, Any] = field(default_factory=dict)
    loses_data: bool = False  # files or bytes go and can't be brought back: ask first
    preview: int | None = None  # a snapshot whose rollback preview the confirmation shows
    loses: str = ""  # what the fix gives up, in plain words ("" = nothing)


@dataclass(frozen=True)
class Issue:
    """A problem in plain language, with where the project stands and the fixes on offer."""

    id: str  # stable within a project: op-7, download-<key>, txn-3, restore, verify-<kind>-<oid>
    kind: str
    title: str  # one sentence: "Import of X failed at step 3 of 6"
    message: str  # what happened, in plain language
    state: str  # where the project stands now
    advice: tuple[str, ...] = ()  # things only the user can do (check the link, free space)
    detail: str = ""  # technical, shown on request
    code: str = ""
    fixes: tuple[Fix, ...] = ()
    op: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["advice"] = list(self.advice)
        d["fixes"] = [asdict(f) for f in self.fixes]
        return d


# Diagnosis actions that are fixes here (so they are not repeated as advice).
_APPLIED = {"resume", "retry", "rollback"}


def _kept(n: int) -> str:
    """'step 1 is kept.' / 'steps 1-3 are kept.' for the steps before step ``n``."""
    return "step 1 is kept." if n == 2 else f"steps 1-{n - 1} are kept."


def _op_issue(rec: OperationRecord, downloads: Sequence[PartialDownload]) -> Issue:
    state = op_state(rec)
    total = len(rec.steps)
    cur = rec.next_step
    n = cur.index + 1 if cur is not None else total
    # No unfinished step: it stopped after the last one, while recording its result.
    step_name = safe(cur.name) if cur is not None else "recording the result"
    diag: dict[str, Any] = rec.error or {}
    if cur is not None and cur.error:
        diag = cur.error
    what = what_of(rec)
    skipped = [s.index + 1 for s in rec.steps if s.status == "skipped"]
    if state == "interrupted":
        title = f"{what} was interrupted at step {n} of {total}"
        message = f"It stopped during step {n} ({step_name}): its process ended before it finished."
        where = "The step that was running is rolled back before the import continues"
        where += f"; {_kept(n)}" if n > 1 else "."
    elif state == "pending":
        title = f"{what} has not started"
        message = "It was recorded, but none of its steps ran."
        where = "Nothing has changed in the project yet."
    elif state == "paused":
        title = f"{what} is waiting to continue at step {n} of {total}"
        message = (
            f"Step{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))} "
            f"{'were' if len(skipped) > 1 else 'was'} skipped; the steps after "
            f"{'them' if len(skipped) > 1 else 'it'} have not run yet."
        )
        where = "The steps done so far are kept."
        diag = {}
    else:
        title = f"{what} failed at step {n} of {total}"
        message = str(diag.get("message") or f"Step {n} ({step_name}) failed.")
        if cur is not None and cur.status == "rolled-back":
            where = f"The project is back as it was before step {n}"
            where += f"; {_kept(n)}" if n > 1 else "."
        else:
            where = f"Step {n}'s partial work was kept."
    kept = [d for d in downloads if d.op == rec.id and d.done]
    if kept:
        where += " " + "; ".join(
            f"{human_bytes(d.done)} of {safe(d.dest)} already downloaded" for d in kept
        )
        where += " (kept for the next try)."
    advice = tuple(
        str(a.get("label"))
        for a in diag.get("actions", [])
        if isinstance(a, dict) and a.get("id") not in _APPLIED
    )
    labels = {"pending": "Start it", "paused": "Continue after the skipped step"}
    fixes = [
        Fix(
            "resume",
            labels.get(state, "Resume where it stopped"),
            f"Continue {what.lower()} from step {n} ({step_name}). Steps already done are "
            "checked, not redone, and downloaded bytes are kept. Nothing is lost.",
            "resume-op",
            {"op": rec.id},
        )
    ]
    if state in ("failed", "interrupted") and cur is not None:
        fixes.append(
            Fix(
                f"skip-{n}",
                "Skip this step and continue",
                f"Mark step {n} ({step_name}) as skipped and run the steps after it. Nothing "
                f"already on disk changes; {what.lower()} then finishes as done with skipped "
                "steps.",
                "skip-op",
                {"op": rec.id, "step": n},
                loses=f"What step {n} ({step_name}) would have done is not done; the "
                "workflow may not work without it.",
            )
        )
    if rec.checkpoint is not None:
        fixes.append(
            Fix(
                "rollback",
                "Undo the whole import" if rec.kind == "import" else "Undo the whole operation",
                f"Put the project back as it was at snapshot {rec.checkpoint}, taken before "
                f"{what.lower()} started. Everything changed since then is undone, including "
                "changes made by hand after it. Your current files are saved first as a "
                "pre-restore snapshot, so this can be undone from the checkpoints page.",
                "rollback-op",
                {"op": rec.id},
                preview=rec.checkpoint,
                loses=f"The work {what.lower()} did (it can be brought back from the "
                "pre-restore snapshot).",
            )
        )
    return Issue(
        id=f"op-{rec.id}",
        kind=f"operation.{state}",
        title=title,
        message=message,
        state=where,
        advice=advice,
        detail=str(diag.get("detail") or ""),
        code=str(diag.get("code") or ""),
        fixes=tuple(fixes),
        op=rec.id,
    )


def _download_issue(d: PartialDownload) -> Issue:
    pct = f"{d.percent:.0f}%" if d.percent is not None else human_bytes(d.done)
    return Issue(
        id=f"download-{d.key}",
        kind="download.partial",
        title=f"Download of {safe(d.dest)} stopped at {pct}",
        message=(
            f"{human_bytes(d.done)} of {human_bytes(d.size)} are downloaded and verified; "
            "the rest is missing."
        ),
        state="The verified bytes are kept; the file appears in the project only when complete.",
        detail=f"source: {d.url}" + (f"\nsha256: {d.sha256}" if d.sha256 else ""),
        code="download.partial",
        fixes=(
            Fix(
                "resume-download",
                "Resume the download",
                f"Continue downloading {safe(d.dest)} from where it stopped; the "
                f"{human_bytes(d.done)} already verified are kept. Nothing is lost.",
                "resume-download",
                {"key": d.key},
            ),
        ),
    )


def _txn_issues(p: Project, ops: Sequence[OperationRecord]) -> list[Issue]:
    """Transactions left open by a process that died (not those of an operation, which the
    operation's own problem covers: resuming it rolls the step back first)."""
    out: list[Issue] = []
    rows = dead_transactions(p.state.txns(status="open"))
    outers = [r for r in rows if r.parent is None or r.parent not in {x.id for x in rows}]
    unfinished = [r for r in ops if op_state(r) in UNFINISHED]
    step_cps = {s.checkpoint for r in unfinished for s in r.steps if s.checkpoint is not None}
    prefixes = tuple(f"{r.label or r.kind}: " for r in unfinished)
    for r in outers:
        # A step's transaction: its restore point is the step's, or (on a retry) its label
        # is the one the operation runner gives ("<operation>: <step>").
        if r.checkpoint in step_cps or (prefixes and r.label.startswith(prefixes)):
            continue
        label = safe(r.label) or f"transaction {r.id}"
        out.append(
            Issue(
                id=f"txn-{r.id}",
                kind="transaction.orphaned",
                title=f"{label[:1].upper() + label[1:]} was interrupted",
                message=(
                    f"The process running it ({describe_owner(r)}) ended before it finished, "
                    "so its changes are only partly done."
                ),
                state=f"The project holds the half-done changes; checkpoint {r.checkpoint} "
                "has the state from before it.",
                detail=f"transaction {r.id}, started {when(r.started)}, owner {r.owner}",
                code="transaction.orphaned",
                fixes=(
                    Fix(
                        "recover",
                        "Roll back the half-done changes",
                        f"Put the project back to checkpoint {r.checkpoint}, from before "
                        f"{label} started. The half-done changes are discarded and are NOT "
                        "saved first: they can't be brought back.",
                        "recover",
                        {},
                        loses_data=True,
                        preview=r.checkpoint,
                        loses="The half-done changes, for good.",
                    ),
                    Fix(
                        "recover-keep",
                        "Keep the half-done changes",
                        "Leave every file as it is now and mark the interrupted work as kept. "
                        "Nothing changes on disk; checkpoint "
                        f"{r.checkpoint} stays available for a rollback later.",
                        "recover",
                        {"keep": True},
                    ),
                ),
            )
        )
    return out


def _restore_issue(p: Project) -> Issue | None:
    path = p.state_dir / "intent.json"
    if not path.exists() or flock_held(p.state_dir / "lock"):
        return None  # none, or a live writer is landing it right now
    try:
        intent = read_intent(path)
    except (StateCorrupt, SnapfsError) as exc:
        return Issue(
            id="restore",
            kind="restore.damaged",
            title="An interrupted restore can't be finished",
            message="The record of a restore that was interrupted is damaged.",
            state="Some files may be from the old state and some from the new one.",
            advice=(
                "Run 'snapfs recover --discard', then restore the snapshot you want from the "
                "checkpoints page",
            ),
            detail=str(exc),
            code="state.corrupt",
        )
    if intent is None:
        return None
    undo = f" The state before it was saved as snapshot {intent.pre}." if intent.pre else ""
    return Issue(
        id="restore",
        kind="restore.interrupted",
        title=f"A restore of snapshot {intent.target} was interrupted",
        message="The process restoring it ended before it finished.",
        state="Some files are already restored and some are not yet." + undo,
        detail=f"intent: {path}, pid {intent.pid}, started {when(intent.started)}",
        code="restore.interrupted",
        fixes=(
            Fix(
                "recover",
                "Finish the restore",
                f"Finish making the project equal to snapshot {intent.target}." + undo,
                "recover",
                {},
            ),
        ),
    )


_DATA_ADVICE = (
    "If the file is still in the project unchanged, take a new snapshot",
    "Restore another snapshot that doesn't use it",
)


def _verify_issues(report: VerifyReport) -> list[Issue]:
    out = []
    for pr in report.problems[:50]:
        paths = "; ".join(safe(x) for x in pr.paths)
        out.append(
            Issue(
                id=f"verify-{pr.kind}-{pr.oid[:16]}",
                kind=f"store.{pr.kind}",
                title=f"Stored data is {pr.kind}" + (f": {paths}" if paths else ""),
                message=safe(pr.message),
                state="Snapshots that need this data can't be fully restored.",
                advice=_DATA_ADVICE,
                detail=f"object {pr.oid}\n{paths}",
                code=f"object.{pr.kind}",
            )
        )
    return out


def _seal_issues(p: Project) -> list[Issue]:
    """Sealed hardlinks of this project's files written in place, found by their stat alone
    (no re-hashing): the write moved the inode's size or mtime away from its seal."""
    cache = p.state.load_cache()
    store = p.store
    with store.db_mutex:
        seals = store.db.execute("SELECT oid, ino, size, mtime_ns FROM seals").fetchall()
    if not seals:
        return []
    paths: dict[bytes, list[str]] = {}
    for relpath, entry in cache.items():
        paths.setdefault(bytes(entry.oid), []).append(os.fsdecode(relpath))
    out: list[Issue] = []
    for oid, ino, size, mtime_ns in seals:
        oid = bytes(oid)
        users = paths.get(oid)
        if not users:
            continue
        try:
            st = os.lstat(store.loose_path(oid))
        except FileNotFoundError:
            continue  # gone: a deep check names missing objects
        except OSError:
            continue
        if (st.st_ino, st.st_size, st.st_mtime_ns) == (ino, size, mtime_ns):
            continue
        names = "; ".join(safe(u) for u in sorted(users)[:5])
        out.append(
            Issue(
                id=f"verify-tampered-{oid.hex()[:16]}",
                kind="store.tampered",
                title=f"Stored data is tampered: {names}",
                message=(
                    f"{names} was changed in place. snapfs stores this large file as a "
                    "hardlink, so the copy the snapshots hold was changed with it."
                ),
                state="Snapshots that need the old content of this file can't restore it.",
                advice=_DATA_ADVICE,
                detail=f"object {oid.hex()}: sealed inode {ino}, size {size}, mtime_ns "
                f"{mtime_ns}; now inode {st.st_ino}, size {st.st_size}, mtime_ns "
                f"{st.st_mtime_ns}",
                code="object.tampered",
            )
        )
    return out


def _source_hosts(ops: Sequence[OperationRecord], downloads: Sequence[PartialDownload]) -> set[str]:
    """The download hosts this project's unfinished work depends on."""
    from ._download import _host

    urls: list[str] = [u for d in downloads for u in d.sources]
    for rec in ops:
        if op_state(rec) not in UNFINISHED:
            continue
        for s in rec.plan.get("steps", []):
            if isinstance(s, dict) and s.get("type") == "download":
                urls.extend(str(u) for u in s.get("sources") or [] if isinstance(u, str))
    return {_host(u) for u in urls}


def _hosts_path(p: Project) -> Path:
    state = p.config.state_dir or Path.home() / ".local" / "state" / "snapfs"
    return Path(state) / "hosts.db"


def _source_issues(
    p: Project, ops: Sequence[OperationRecord], downloads: Sequence[PartialDownload]
) -> list[Issue]:
    """Download sources of this project's unfinished work whose circuit breaker is open."""
    path = _hosts_path(p)
    hosts = _source_hosts(ops, downloads)
    if not hosts or not path.is_file():  # never create the per-user database just to look
        return []
    from ._download import _hosts_for

    book = _hosts_for(p.config)
    try:
        out = []
        now = book.clock()
        for host in sorted(hosts):
            h = book.health(host)
            if h.state(now, book.cooldown) != "open" or h.opened is None:
                continue
            wait = max(0, round(h.opened + book.cooldown - now))
            out.append(
                Issue(
                    id=f"source-{host}",
                    kind="source.unavailable",
                    title=f"The download source {safe(host)} is failing",
                    message=(
                        f"The last {h.failures} requests to {safe(host)} failed, so snapfs "
                        "stopped asking it for now and uses the other sources first."
                    ),
                    state=f"snapfs tries {safe(host)} again by itself in about {wait} s.",
                    advice=("Check your network connection, or whether the site is down",),
                    detail=f"host {host}: {h.failures} failures in a row, breaker opened "
                    f"{when(h.opened)}, {h.corrupt} corrupt answers, {h.successes} successes;"
                    f" health in {path}",
                    code="source.breaker_open",
                    fixes=(
                        Fix(
                            "retry",
                            "Try this source again now",
                            f"Forget the recent failures of {safe(host)}, so the next download"
                            " asks it again at once. Nothing else changes.",
                            "reset-source",
                            {"host": host},
                        ),
                        Fix(
                            "keep",
                            "Use the other sources for now",
                            f"Leave it as it is: downloads use the other sources first and try"
                            f" {safe(host)} again in about {wait} s. Nothing changes.",
                            "none",
                            {"host": host},
                        ),
                    ),
                )
            )
        return out
    finally:
        book.close()


def problems(
    project: Project,
    *,
    deep: bool = False,
    verify: VerifyReport | None = None,
    ops: Sequence[OperationRecord] | None = None,
    downloads: Sequence[PartialDownload] | None = None,
    progress: ProgressFn = no_progress,
) -> list[Issue]:
    """The project's open problems, newest operation first.

    Cheap by default: it reads the project's records and stats sealed hardlinks. ``deep=True``
    also re-hashes every stored object and tree (``snapfs verify``) to find missing and corrupt
    data; a ``verify`` report made earlier can be passed instead. ``ops`` and ``downloads``
    save reading them again when the caller has them.

    Open the project with ``snapfs.open(path, recover=False)`` to see the problems as they
    are: a default open finishes interrupted restores and rolls back dead transactions first.
    """
    if ops is None:
        ops = list_operations(project, limit=20)
    if downloads is None:
        downloads = partial_downloads(project, ops)
    out: list[Issue] = []
    for rec in ops:
        if op_state(rec) in UNFINISHED:
            out.append(_op_issue(rec, downloads))
    restore = _restore_issue(project)
    if restore is not None:
        out.append(restore)
    out.extend(_txn_issues(project, ops))
    for d in downloads:
        # Bytes kept, no one downloading, no operation that resumes it: a problem to fix.
        if d.op is None and not d.active and d.done:
            out.append(_download_issue(d))
    out.extend(_source_issues(project, ops, downloads))
    if deep and verify is None:
        verify = project.verify(progress=progress)
    found = _verify_issues(verify) if verify is not None else []
    seen = {i.id for i in found}
    out.extend(i for i in _seal_issues(project) if i.id not in seen)
    out.extend(found)
    return out


# ---- applying fixes -------------------------------------------------------------------------
@dataclass(frozen=True)
class FixResult:
    """What :func:`apply_fix` did. ``changed`` is False when there was nothing left to do."""

    problem: str
    fix: str
    changed: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def _no_events(_: OpEvent) -> None:
    pass


def _no_download_events(_: DownloadProgress) -> None:
    pass


def apply_fix(
    project: Project,
    problem: str,
    fix: str,
    *,
    report: Callable[[OpEvent], None] = _no_events,
    progress: ProgressFn = no_progress,
    download_progress: Callable[[DownloadProgress], None] | None = None,
) -> FixResult:
    """Apply fix ``fix`` (an id such as ``resume`` or ``skip-2``) to open problem ``problem``.

    Idempotent: a problem that is no longer open, or a ``skip-N`` whose step is already
    skipped, changes nothing and says so. A fix that can't be completed raises what the work
    raised (:class:`OperationFailed` for an operation that fails again, ...). The project must
    be open for writing; open it with ``recover=False`` to keep the choice between rolling back
    and keeping a dead transaction's changes (``recover`` / ``recover-keep``).
    """
    if not _ISSUE_ID.match(problem):
        raise UsageError(f"{safe(problem)[:60]!r} is not a problem id (like op-7 or restore).")
    issue = next((i for i in problems(project) if i.id == problem), None)
    if issue is None:
        return FixResult(
            problem,
            fix,
            False,
            f"Problem {problem} is not open (fixed already, or there is no such problem);"
            " nothing was done.",
        )
    chosen = next((f for f in issue.fixes if f.id == fix), None)
    if chosen is None:
        already = _already_skipped(project, issue, fix)
        if already is not None:
            return already
        offered = ", ".join(f.id for f in issue.fixes) or "none: it needs you to act"
        raise UsageError(f"Problem {problem} has no fix {safe(fix)[:40]!r} (its fixes: {offered}).")
    return _APPLY[chosen.action](project, issue, chosen, report, progress, download_progress)


def _already_skipped(project: Project, issue: Issue, fix: str) -> FixResult | None:
    m = re.match(r"^skip-(\d{1,6})$", fix)
    if m is None or issue.op is None:
        return None
    rec = load_operation(project, issue.op)
    n = int(m.group(1))
    if 1 <= n <= len(rec.steps) and rec.steps[n - 1].status == "skipped":
        return FixResult(issue.id, fix, False, f"Step {n} is already skipped; nothing was done.")
    return None


_Applier = Callable[
    [
        "Project",
        Issue,
        Fix,
        Callable[[OpEvent], None],
        ProgressFn,
        "Callable[[DownloadProgress], None] | None",
    ],
    FixResult,
]


def _settle(project: Project) -> None:
    """Before an operation runs on: apply the crash policy to transactions whose process died
    (an interrupted step's), like any other snapfs command opened for writing does."""
    if dead_transactions(project.state.txns(status="open")):
        project.recover(keep=project.config.crash_policy == "keep")


def _op_done(issue: Issue, fix: Fix, res: Any, what: str) -> FixResult:
    msg = f"{what} finished: {res.ran} step(s) run, {res.skipped} already done"
    if res.skipped_steps:
        msg += f", step(s) {', '.join(str(i + 1) for i in res.skipped_steps)} skipped"
    msg += f", {res.retries} retried." if res.retries else "."
    if res.post is not None:
        msg += f" Its result is saved as snapshot {res.post}."
    data = {"op": res.id, "status": res.status, "checkpoint": res.checkpoint, "post": res.post}
    return FixResult(issue.id, fix.id, True, msg, data)


def _resume_op(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    op = int(fix.params["op"])
    _settle(p)
    what = what_of(load_operation(p, op))
    return _op_done(issue, fix, run_operation(p, op, report=report), what)


def _skip_op(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    op, n = int(fix.params["op"]), int(fix.params["step"])
    _settle(p)
    skip_step(p, op, n - 1)
    what = what_of(load_operation(p, op))
    return _op_done(issue, fix, run_operation(p, op, report=report), what)


def _rollback_op(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    op = int(fix.params["op"])
    rec = load_operation(p, op)
    res = undo_operation(p, op, progress=progress)
    pre = res.pre_restore
    msg = f"{what_of(rec)} was undone: the project is as it was at snapshot {res.target}."
    if pre is not None:
        msg += f" The state before the rollback is saved as snapshot {pre}."
    data = {"op": op, "snapshot": res.target, "pre_restore": pre}
    return FixResult(issue.id, fix.id, True, msg, data)


def _recover(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    text = p.recover(keep=bool(fix.params.get("keep")), progress=progress)
    return FixResult(issue.id, fix.id, True, safe(" ".join(text.split("\n"))))


def _resume_download(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    d = partial_download(p, str(fix.params["key"]))
    if d is None:
        return FixResult(issue.id, fix.id, False, "That download finished or was removed.")
    message = resume_partial(p, d, dl or _no_download_events)
    return FixResult(issue.id, fix.id, True, message, {"dest": safe(d.dest)})


def resume_partial(
    p: Project, d: PartialDownload, progress: Callable[[DownloadProgress], None]
) -> str:
    """Finish a stopped download from its recorded sources and digests; says what it did."""
    from ._download import download

    res = download(
        d.url,
        d.dest,
        mirrors=d.sources[1:],
        sha256=d.sha256 or None,
        xxh128=d.xxh128 or None,
        size=d.size,
        project=p,
        progress=progress,
    )
    return (
        f"Downloaded {safe(d.dest)} ({human_bytes(res.size)}; {human_bytes(res.fetched)} "
        f"fetched, {human_bytes(res.resumed)} resumed)."
    )


def _reset_source(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    from ._download import _hosts_for

    host = str(fix.params["host"])
    book = _hosts_for(p.config)
    try:
        book.forget(host)
    finally:
        book.close()
    return FixResult(
        issue.id, fix.id, True, f"{safe(host)} will be asked again by the next download."
    )


def _nothing(
    p: Project,
    issue: Issue,
    fix: Fix,
    report: Callable[[OpEvent], None],
    progress: ProgressFn,
    dl: Callable[[DownloadProgress], None] | None,
) -> FixResult:
    return FixResult(issue.id, fix.id, False, "Left as it is; nothing was changed.")


_APPLY: dict[str, _Applier] = {
    "resume-op": _resume_op,
    "skip-op": _skip_op,
    "rollback-op": _rollback_op,
    "recover": _recover,
    "resume-download": _resume_download,
    "reset-source": _reset_source,
    "none": _nothing,
}
