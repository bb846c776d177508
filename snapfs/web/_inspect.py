"""What the panel shows, read from a project: snapshots, operations, partial downloads, problems.

Everything here only reads. It uses the library's public API where there is one, and the
project's own records (``project.db``, ``.snapfs/downloads/*.snapfs-part.db``, the intent log)
where there is not yet: see the notes marked "library:" for what belongs in snapfs itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import xxhash

from snapfs._errors import SnapfsError, StateCorrupt
from snapfs._ops import OperationRecord, StepRecord, list_operations, load_operation
from snapfs._project import Project, SnapshotInfo, VerifyReport
from snapfs._restore import read_intent
from snapfs._txn import Owner

PART_SUFFIX = ".snapfs-part"
_PART_NAME = re.compile(r"^([0-9a-f]{16})\.snapfs-part$")
KEY = re.compile(r"^[0-9a-f]{16}$")
PREVIEW_LIMIT = 200  # paths listed per kind of change in a rollback preview


# ---- small helpers --------------------------------------------------------------------------
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


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


# ---- snapshots ------------------------------------------------------------------------------
def snapshot_dict(s: SnapshotInfo, head: int | None) -> dict[str, Any]:
    d = s.to_dict()
    d.update(
        created_ts=s.created,
        created=when(s.created),
        head=s.id == head,
        checkpoint=s.kind != "pre-restore",
        size=human_bytes(s.bytes),
        new_size=human_bytes(s.new_bytes),
        label=safe(s.label),
    )
    return d


def snapshots(p: Project) -> list[dict[str, Any]]:
    head = p.head
    return [snapshot_dict(s, head) for s in p.snapshots()]


def find_snapshot(p: Project, sid: int) -> SnapshotInfo | None:
    return next((s for s in p.snapshots() if s.id == sid), None)


def _items(n: int) -> str:
    return "1 file or folder" if n == 1 else f"{n} files or folders"


def rollback_preview(p: Project, sid: int) -> dict[str, Any]:
    """What changes on disk if the project is rolled back to snapshot ``sid``."""
    target = find_snapshot(p, sid)
    if target is None:
        raise LookupError(f"There is no snapshot {sid}.")
    ch = p.diff(sid)  # snapshot -> working tree; a rollback undoes exactly this
    groups = {
        "delete": [safe(x) for x in ch.added],  # new since the snapshot: removed
        "restore": [safe(x) for x in ch.deleted],  # gone since the snapshot: brought back
        "revert": [safe(x) for x in ch.modified],  # changed since: put back as they were
    }
    counts = {k: len(v) for k, v in groups.items()}
    total = sum(counts.values())
    if total:
        parts = []
        if counts["delete"]:
            parts.append(f"{_items(counts['delete'])} added since then will be deleted")
        if counts["revert"]:
            parts.append(f"{_items(counts['revert'])} changed since then will be put back")
        if counts["restore"]:
            parts.append(f"{_items(counts['restore'])} deleted since then will be brought back")
        summary = f"Rolling back to snapshot {sid}: " + "; ".join(parts) + "."
    else:
        summary = f"The project already matches snapshot {sid}; nothing would change."
    return {
        "snapshot": snapshot_dict(target, p.head),
        "changes": {k: v[:PREVIEW_LIMIT] for k, v in groups.items()},
        "counts": counts,
        "total": total,
        "truncated": any(len(v) > PREVIEW_LIMIT for v in groups.values()),
        "summary": summary,
        "kept": (
            "Your current files are saved first as a snapshot of kind pre-restore, so this "
            "rollback can be undone from the checkpoints page. Ignored paths are not touched."
        ),
    }


# ---- operations -----------------------------------------------------------------------------
def op_errors(p: Project, op: int) -> list[dict[str, Any]]:
    # library: an ops-level reader (errors of one operation) would replace this query.
    rows = p.state.db.execute(
        "SELECT at, step, category, code, retryable, message, detail FROM errors"
        " WHERE op = ? ORDER BY at",
        (op,),
    ).fetchall()
    return [
        {
            "at": when(r[0]),
            "step": r[1],
            "category": r[2],
            "code": r[3],
            "retryable": bool(r[4]),
            "message": r[5],
            "detail": r[6],
        }
        for r in rows
    ]


def op_state(rec: OperationRecord) -> str:
    """pending, running, done, failed, rolled-back, or interrupted (running, owner dead)."""
    if rec.status == "running" and not _owner_alive(rec.owner):
        return "interrupted"
    if rec.status == "failed" and (rec.error or {}).get("code") == "interrupted":
        return "interrupted"
    return rec.status


def _current_step(rec: OperationRecord) -> StepRecord | None:
    failed = rec.failed_step
    if failed is not None:
        return failed
    return next((s for s in rec.steps if s.status != "done"), None)


def step_dict(s: StepRecord) -> dict[str, Any]:
    d = asdict(s)
    d["number"] = s.index + 1
    d["seconds"] = round(s.seconds, 2)
    d["name"] = safe(s.name)
    return d


def operation_dict(p: Project, rec: OperationRecord, *, errors: bool = False) -> dict[str, Any]:
    cur = _current_step(rec)
    d: dict[str, Any] = {
        "id": rec.id,
        "kind": rec.kind,
        "label": safe(rec.label),
        "title": what_of(rec),
        "status": rec.status,
        "state": op_state(rec),
        "checkpoint": rec.checkpoint,
        "created": when(rec.created),
        "updated": when(rec.updated),
        "error": rec.error,
        "total": len(rec.steps),
        "done": sum(1 for s in rec.steps if s.status in ("done", "skipped")),
        "current": step_dict(cur) if cur is not None and rec.status != "done" else None,
        "steps": [step_dict(s) for s in rec.steps],
        "restore_points": [
            {"step": s.index + 1, "snapshot": s.checkpoint}
            for s in rec.steps
            if s.checkpoint is not None
        ],
    }
    if errors:
        d["errors"] = op_errors(p, rec.id)
    return d


def operations(p: Project, limit: int = 50) -> list[OperationRecord]:
    return list_operations(p, limit=limit)


def operation(p: Project, op: int) -> OperationRecord | None:
    exists = p.state.db.execute("SELECT 1 FROM operations WHERE id = ?", (op,)).fetchone()
    return load_operation(p, op) if exists else None


def running_operations(p: Project) -> list[OperationRecord]:
    """Operations some live process (this panel, a CLI) is running now."""
    return [r for r in operations(p, 20) if r.status == "running" and _owner_alive(r.owner)]


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
    # library: a public listing (snapfs._download.partials(project)) would replace this reader.
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
                if op_state(rec) in ("failed", "interrupted", "pending"):
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
        # library: the record has "size" only once a server stated it; the expected size
        # would belong there too. Until then: the plan's size, or the preallocated file's.
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
    """One click that addresses a problem. ``action`` names the API route that applies it."""

    id: str
    label: str
    confirm: str  # what will change, and what (if anything) will be lost
    action: str  # resume-op, rollback-op, recover, recover-keep, resume-download
    params: dict[str, Any] = field(default_factory=dict)
    loses_data: bool = False
    preview: int | None = None  # a snapshot whose rollback preview the confirmation shows


@dataclass(frozen=True)
class Issue:
    """A problem in plain language, with what state the project is in and the fixes on offer."""

    id: str  # stable within a project: op-7, download-<key>, txn-3, restore, verify-<oid>
    kind: str
    title: str  # the banner's sentence: "Import of X failed at step 3 of 6"
    message: str  # what happened, in plain language
    state: str  # where the project stands now
    advice: tuple[str, ...] = ()  # things only the user can do (check the link, free space)
    detail: str = ""  # technical, behind "show details"
    code: str = ""
    fixes: tuple[Fix, ...] = ()
    op: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["advice"] = list(self.advice)
        d["fixes"] = [asdict(f) for f in self.fixes]
        return d


# Diagnosis actions the panel applies itself (so they are fixes, not advice).
_APPLIED = {"resume", "retry", "rollback"}


def _kept(n: int) -> str:
    """'step 1 is kept.' / 'steps 1-3 are kept.' for the steps before step ``n``."""
    return "step 1 is kept." if n == 2 else f"steps 1-{n - 1} are kept."


def _op_issue(p: Project, rec: OperationRecord, downloads: Sequence[PartialDownload]) -> Issue:
    state = op_state(rec)
    total = len(rec.steps)
    cur = _current_step(rec)
    n = cur.index + 1 if cur is not None else total
    step_name = safe(cur.name) if cur is not None else ""
    diag: dict[str, Any] = rec.error or {}
    if cur is not None and cur.error:
        diag = cur.error
    what = what_of(rec)
    if state == "interrupted":
        title = f"{what} was interrupted at step {n} of {total}"
        message = f"It stopped during step {n} ({step_name}): its process ended before it finished."
        where = "The step that was running is rolled back before the import continues"
        where += f"; {_kept(n)}" if n > 1 else "."
    elif state == "pending":
        title = f"{what} has not started"
        message = "It was recorded, but none of its steps ran."
        where = "Nothing has changed in the project yet."
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
    fixes = [
        Fix(
            "resume",
            "Resume where it stopped" if state != "pending" else "Start it",
            f"Continue {what.lower()} from step {n} ({step_name}). Steps already done are "
            "checked, not redone, and downloaded bytes are kept. Nothing is lost.",
            "resume-op",
            {"op": rec.id},
        )
    ]
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
    from snapfs._txn import dead_transactions, describe_owner

    out: list[Issue] = []
    rows = dead_transactions(p.state.txns(status="open"))
    outers = [r for r in rows if r.parent is None or r.parent not in {x.id for x in rows}]
    unfinished = [r for r in ops if op_state(r) in ("interrupted", "failed", "pending")]
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
            advice=("Restore the snapshot you want from the checkpoints page",),
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
                advice=(
                    "If the file is still in the project unchanged, take a new snapshot",
                    "Restore another snapshot that doesn't use it",
                ),
                detail=f"object {pr.oid}\n{paths}",
                code=f"object.{pr.kind}",
            )
        )
    return out


def problems(
    p: Project,
    *,
    verify: VerifyReport | None = None,
    ops: Sequence[OperationRecord] | None = None,
    downloads: Sequence[PartialDownload] | None = None,
) -> list[Issue]:
    """The project's open problems, newest first. Work a live process is doing (an operation,
    a download, a restore holding the lock) is in progress, not a problem."""
    if ops is None:
        ops = operations(p, 20)
    if downloads is None:
        downloads = partial_downloads(p, ops)
    out: list[Issue] = []
    for rec in ops:
        if op_state(rec) in ("failed", "interrupted", "pending"):
            out.append(_op_issue(p, rec, downloads))
    restore = _restore_issue(p)
    if restore is not None:
        out.append(restore)
    out.extend(_txn_issues(p, ops))
    for d in downloads:
        # Bytes kept, no one downloading, no operation that resumes it: a problem to fix.
        if d.op is None and not d.active and d.done:
            out.append(_download_issue(d))
    if verify is not None:
        out.extend(_verify_issues(verify))
    return out


def banner_text(issue: Issue, more: int) -> str:
    """'Import of X failed at step 3 of 6, 2 fixes available'."""
    n = len(issue.fixes)
    text = issue.title
    if n:
        text += f", {n} fix{'es' if n != 1 else ''} available"
    if more:
        text += f" (and {more} more problem{'s' if more != 1 else ''})"
    return text


def summaries(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [i.to_dict() for i in items]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
