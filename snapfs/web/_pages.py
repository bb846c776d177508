"""Server-rendered pages and the fragments the script swaps in after a change.

Pages: the recovery panel (``/``), a checkpoints timeline and an operations page per project,
and the status banner (``/banner``, also ``{{ snapfs_banner() }}`` in the host's templates).
Each page section that changes after an action is also served alone under ``/fragments/``,
so the page is refreshed by the same templates, not re-rendered in JavaScript.
"""

from __future__ import annotations

from typing import Any

from flask import Response, g, redirect, render_template, request, url_for
from markupsafe import Markup

from . import _inspect as inspect
from ._panel import Panel, ProjectView, SnapfsBlueprint, banner, issue_dict

KIND_NAMES = {
    "manual": "Saved by you",
    "auto": "Automatic",
    "pre-op": "Before a step",
    "pre-import": "Before an import",
    "pre-restore": "Before a rollback",
    "post": "After an operation",
}
STATE_NAMES = {
    "pending": "Not started",
    "running": "Running",
    "interrupted": "Interrupted",
    "failed": "Failed",
    "done": "Done",
    "done-with-skips": "Done, steps skipped",
    "paused": "Waiting to continue",
    "rolled-back": "Rolled back",
    "skipped": "Skipped",
}


def _urls(bp: str, pid: str | None = None) -> dict[str, str]:
    """The URLs every page needs; the nav's links point at project ``pid`` when given."""
    urls = {
        "panel": url_for(f"{bp}.panel_page"),
        "checkpoints": url_for(f"{bp}.checkpoints_index"),
        "operations": url_for(f"{bp}.operations_index"),
        "banner": url_for(f"{bp}.banner_fragment"),
        "events": url_for(f"{bp}.api_events"),
        "problems": url_for(f"{bp}.problems_fragment"),
        "css": url_for(f"{bp}.static", filename="snapfs.css"),
        "js": url_for(f"{bp}.static", filename="snapfs.js"),
    }
    if pid is not None:
        urls["checkpoints"] = url_for(f"{bp}.checkpoints_page", pid=pid)
        urls["operations"] = url_for(f"{bp}.operations_page", pid=pid)
    return urls


def _base(bp: str, panel: Panel, active: str, title: str, pid: str | None = None) -> dict[str, Any]:
    views = panel.views()
    return {
        "bp": bp,
        "panel_title": panel.title,
        "page_title": title,
        "active": active,
        "csrf": panel.csrf.token(g.snapfs_sid),
        "urls": _urls(bp, pid),
        "banner": banner(bp, views),
        "views": views,
        "projects": [
            {
                **v.ref.to_dict(),
                "checkpoints": url_for(f"{bp}.checkpoints_page", pid=v.ref.id),
                "operations": url_for(f"{bp}.operations_page", pid=v.ref.id),
                "current": v.ref.id == pid,
            }
            for v in views
        ],
    }


def _project_block(bp: str, panel: Panel, v: ProjectView) -> dict[str, Any]:
    return {
        **v.ref.to_dict(),
        "error": v.error,
        "head": v.head,
        "problems": [issue_dict(bp, v.ref.id, i) for i in v.problems],
        "running": [
            {
                "id": r.id,
                "title": inspect.what_of(r),
                "done": sum(1 for s in r.steps if s.status == "done"),
                "total": len(r.steps),
            }
            for r in v.running
        ],
        # A partial with no verified byte yet holds nothing worth showing (or losing).
        "downloads": [d.to_dict() for d in v.downloads if d.done or d.active],
        "verify_url": url_for(f"{bp}.api_verify", pid=v.ref.id),
        "checkpoints": url_for(f"{bp}.checkpoints_page", pid=v.ref.id),
        "operations": url_for(f"{bp}.operations_page", pid=v.ref.id),
        "job": v.job,
    }


def _checkpoints(bp: str, panel: Panel, pid: str) -> dict[str, Any]:
    ref = panel.project(pid)
    with panel.registry.open(ref) as p:
        snaps = inspect.snapshots(p)
        ops = inspect.operations(p, 50)
    points: dict[int, str] = {}
    for rec in ops:
        if rec.checkpoint is not None:
            points.setdefault(rec.checkpoint, f"Restore point of {inspect.what_of(rec).lower()}")
        for step in rec.steps:
            if step.checkpoint is not None:
                points.setdefault(
                    step.checkpoint, f"Before step {step.index + 1} of operation {rec.id}"
                )
    for s in snaps:
        s["kind_name"] = KIND_NAMES.get(s["kind"], s["kind"])
        s["restore_point"] = points.get(s["id"], "")
        s["preview_url"] = url_for(f"{bp}.api_snapshot_preview", pid=pid, sid=str(s["id"]))
        s["restore_url"] = url_for(f"{bp}.api_snapshot_restore", pid=pid, sid=str(s["id"]))
    return {
        "project": ref.to_dict(),
        "snapshots": list(reversed(snaps)),
        "snapshot_url": url_for(f"{bp}.api_snapshot_create", pid=pid),
        "fragment_url": url_for(f"{bp}.checkpoints_fragment", pid=pid),
    }


def _operations(bp: str, panel: Panel, pid: str) -> dict[str, Any]:
    ref = panel.project(pid)
    with panel.registry.open(ref) as p:
        ops = [inspect.operation_dict(p, r, errors=True) for r in inspect.operations(p, 50)]
    for op in ops:
        op["state_name"] = STATE_NAMES.get(op["state"], op["state"])
        for s in op["steps"]:
            s["state_name"] = STATE_NAMES.get(s["status"], s["status"])
        unfinished = op["state"] in inspect.UNFINISHED
        op["resume_url"] = (
            url_for(f"{bp}.api_op_resume", pid=pid, op=str(op["id"])) if unfinished else None
        )
        cur = op["current"]
        op["skip_url"] = (
            url_for(f"{bp}.api_op_skip", pid=pid, op=str(op["id"]))
            if op["state"] in ("failed", "interrupted") and cur is not None
            else None
        )
        op["skip_step"] = cur["number"] if cur is not None else None
        op["rollback_url"] = (
            url_for(f"{bp}.api_op_rollback", pid=pid, op=str(op["id"]))
            if op["checkpoint"] is not None and op["state"] not in ("running", "rolled-back")
            else None
        )
        op["preview_url"] = (
            url_for(f"{bp}.api_snapshot_preview", pid=pid, sid=str(op["checkpoint"]))
            if op["checkpoint"] is not None
            else None
        )
        op["checkpoints_url"] = url_for(f"{bp}.checkpoints_page", pid=pid)
    return {
        "project": ref.to_dict(),
        "operations": ops,
        "fragment_url": url_for(f"{bp}.operations_fragment", pid=pid),
    }


def render_banner(bp: str, panel: Panel, *, standalone: bool = True) -> Markup:
    """The banner as HTML for a host app's page: the partial, its stylesheet and (for live
    updates) the panel's script, which only touches the elements it knows."""
    views = panel.views()
    html = render_template(
        "snapfs/_banner.html",
        banner=banner(bp, views),
        urls=_urls(bp),
        standalone=standalone,
    )
    return Markup(html)


def register(bp: SnapfsBlueprint, panel: Panel) -> None:
    name = bp.name

    @bp.get("/")
    def panel_page() -> str:
        ctx = _base(name, panel, "panel", "Recovery")
        ctx["blocks"] = [_project_block(name, panel, v) for v in ctx["views"]]
        return render_template("snapfs/panel.html", **ctx)

    @bp.get("/checkpoints")
    def checkpoints_index() -> Response:
        first = next(iter(panel.registry))
        return redirect(url_for(f"{name}.checkpoints_page", pid=first.id))  # type: ignore[return-value]

    @bp.get("/operations")
    def operations_index() -> Response:
        first = next(iter(panel.registry))
        return redirect(url_for(f"{name}.operations_page", pid=first.id))  # type: ignore[return-value]

    @bp.get("/projects/<pid>/checkpoints")
    def checkpoints_page(pid: str) -> str:
        panel.project(pid)
        ctx = _base(name, panel, "checkpoints", "Checkpoints", pid)
        ctx.update(_checkpoints(name, panel, pid))
        return render_template("snapfs/checkpoints.html", **ctx)

    @bp.get("/projects/<pid>/operations")
    def operations_page(pid: str) -> str:
        panel.project(pid)
        ctx = _base(name, panel, "operations", "Operations", pid)
        ctx.update(_operations(name, panel, pid))
        return render_template("snapfs/operations.html", **ctx)

    # ---- fragments --------------------------------------------------------------------------
    @bp.get("/banner")
    def banner_fragment() -> str:
        standalone = request.args.get("standalone") == "1"
        return str(render_banner(name, panel, standalone=standalone))

    @bp.get("/fragments/problems")
    def problems_fragment() -> str:
        views = panel.views()
        blocks = [_project_block(name, panel, v) for v in views]
        return render_template("snapfs/_problems.html", blocks=blocks, urls=_urls(name), bp=name)

    @bp.get("/fragments/projects/<pid>/checkpoints")
    def checkpoints_fragment(pid: str) -> str:
        return render_template("snapfs/_timeline.html", **_checkpoints(name, panel, pid))

    @bp.get("/fragments/projects/<pid>/operations")
    def operations_fragment(pid: str) -> str:
        return render_template("snapfs/_operations.html", **_operations(name, panel, pid))
