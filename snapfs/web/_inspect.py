"""What the panel shows, read from a project: snapshots, operations, partial downloads, problems.

Everything here only reads. The problems and their fixes, partial downloads and operation
states come from the library's doctor (``snapfs._doctor``); this module shapes them for the
panel's JSON and pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

from snapfs._config import human_bytes
from snapfs._doctor import (
    KEY,
    PART_SUFFIX,
    UNFINISHED,
    Fix,
    Issue,
    PartialDownload,
    flock_held,
    op_state,
    partial_download,
    partial_downloads,
    partial_downloads_at,
    safe,
    what_of,
    when,
)
from snapfs._doctor import problems as _problems
from snapfs._ops import OperationRecord, StepRecord, list_operations, load_operation
from snapfs._project import Project, SnapshotInfo, VerifyReport

PREVIEW_LIMIT = 200  # paths listed per kind of change in a rollback preview

__all__ = [
    "KEY",
    "PART_SUFFIX",
    "UNFINISHED",
    "Fix",
    "Issue",
    "PartialDownload",
    "flock_held",
    "human_bytes",
    "op_state",
    "partial_download",
    "partial_downloads",
    "partial_downloads_at",
    "safe",
    "what_of",
    "when",
]


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


def step_dict(s: StepRecord) -> dict[str, Any]:
    d = asdict(s)
    d["number"] = s.index + 1
    d["seconds"] = round(s.seconds, 2)
    d["name"] = safe(s.name)
    return d


def operation_dict(p: Project, rec: OperationRecord, *, errors: bool = False) -> dict[str, Any]:
    cur = rec.next_step
    d: dict[str, Any] = {
        "id": rec.id,
        "kind": rec.kind,
        "label": safe(rec.label),
        "title": what_of(rec),
        "status": rec.status,
        "state": op_state(rec),
        "checkpoint": rec.checkpoint,
        "post": rec.post,
        "created": when(rec.created),
        "updated": when(rec.updated),
        "error": rec.error,
        "total": len(rec.steps),
        "done": sum(1 for s in rec.steps if s.status in ("done", "skipped")),
        "current": step_dict(cur) if cur is not None and not rec.finished else None,
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
    return [r for r in operations(p, 20) if op_state(r) == "running"]


# ---- problems --------------------------------------------------------------------------------
def problems(
    p: Project,
    *,
    verify: VerifyReport | None = None,
    ops: Sequence[OperationRecord] | None = None,
    downloads: Sequence[PartialDownload] | None = None,
) -> list[Issue]:
    """The project's open problems (the library's doctor, cheap mode), plus the damage found
    by the last "Check stored data" if the panel ran one."""
    return _problems(p, verify=verify, ops=ops, downloads=downloads)


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
