"""The JSON API and the event stream. Routes are named ``api_*``; see docs/openapi.yaml.

Reads open the project for the request and close it after. Mutations validate their ids
here, claim the project's slot and start a job; they answer 202 with the job, whose progress
then arrives on ``GET /api/events`` (or by polling ``GET /api/jobs/<id>``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Response, g, jsonify, request, url_for

from snapfs._ops import OperationRecord

from . import _actions as actions
from . import _inspect as inspect
from ._jobs import Busy, Event, JobFn
from ._panel import (
    ApiError,
    Panel,
    ProjectView,
    SnapfsBlueprint,
    banner,
    issue_dict,
    parse_id,
)
from ._registry import ProjectRef

KEEPALIVE = 15.0  # seconds of silence before a comment line keeps proxies from closing a stream
POLL = 1.0  # how often a stream wakes to look at downloads other processes run
DOWNLOADS_EVERY = 2.0


def _body() -> dict[str, Any]:
    if not request.content_length:
        return {}
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return data


def _reply(data: Any, status: int = 200) -> Response:
    resp = jsonify(data)
    resp.status_code = status
    return resp


def project_summary(bp: str, v: ProjectView) -> dict[str, Any]:
    return {
        **v.ref.to_dict(),
        "head": v.head,
        "snapshots": v.snapshot_count,
        "problems": len(v.problems),
        "busy": v.job is not None,
        "job": v.job,
        "error": v.error,
        "links": {
            "checkpoints": url_for(f"{bp}.checkpoints_page", pid=v.ref.id),
            "operations": url_for(f"{bp}.operations_page", pid=v.ref.id),
        },
    }


def running_dict(pid: str, rec: OperationRecord) -> dict[str, Any]:
    cur = next((s for s in rec.steps if s.status == "running"), None)
    return {
        "project": pid,
        "op": rec.id,
        "title": inspect.what_of(rec),
        "step": cur.index + 1 if cur is not None else None,
        "total": len(rec.steps),
        "step_name": inspect.safe(cur.name) if cur is not None else None,
    }


def register(bp: SnapfsBlueprint, panel: Panel) -> None:
    name = bp.name

    def start(ref: ProjectRef, kind: str, title: str, fn: JobFn, op: int | None = None) -> Response:
        panel.check_idle(ref)
        try:
            job = panel.jobs.start(ref.id, kind, title, fn, op=op)
        except Busy as exc:
            raise ApiError(409, str(exc)) from None
        resp = _reply({"job": panel.jobs.snapshot(job)}, 202)
        resp.headers["Location"] = url_for(f"{name}.api_job", job_id=str(job.id))
        return resp

    # ---- overview ---------------------------------------------------------------------------
    @bp.get("/api/status")
    def api_status() -> Response:
        views = panel.views()
        problems = [issue_dict(name, v.ref.id, i) for v in views for i in v.problems]
        running = [running_dict(v.ref.id, r) for v in views for r in v.running]
        jobs = [panel.jobs.snapshot(j) for j in panel.jobs.all() if j.status == "running"]
        return _reply(
            {
                "projects": [project_summary(name, v) for v in views],
                "problems": problems,
                "running": running,
                "jobs": jobs,
                "banner": banner(name, views),
            }
        )

    @bp.get("/api/csrf")
    def api_csrf() -> Response:
        return _reply({"token": panel.csrf.token(g.snapfs_sid), "header": "X-CSRF-Token"})

    @bp.get("/api/projects")
    def api_projects() -> Response:
        return _reply({"projects": [project_summary(name, v) for v in panel.views()]})

    @bp.get("/api/projects/<pid>")
    def api_project(pid: str) -> Response:
        return _reply(project_summary(name, panel.view(panel.project(pid))))

    @bp.get("/api/projects/<pid>/changes")
    def api_changes(pid: str) -> Response:
        ref = panel.project(pid)
        with panel.registry.open(ref) as p:
            ch = p.status()
            head = p.head
        d = {k: [inspect.safe(x) for x in v] for k, v in ch.to_dict().items()}
        return _reply({"head": head, **d})

    @bp.get("/api/projects/<pid>/problems")
    def api_problems(pid: str) -> Response:
        v = panel.view(panel.project(pid))
        return _reply({"problems": [issue_dict(name, pid, i) for i in v.problems]})

    @bp.get("/api/projects/<pid>/errors")
    def api_errors(pid: str) -> Response:
        from snapfs._ops import error_history

        ref = panel.project(pid)
        with panel.registry.open(ref) as p:
            rows = error_history(p)
        return _reply({"errors": [r.__dict__ for r in rows]})

    # ---- snapshots ----------------------------------------------------------------------------
    @bp.get("/api/projects/<pid>/snapshots")
    def api_snapshots(pid: str) -> Response:
        ref = panel.project(pid)
        with panel.registry.open(ref) as p:
            return _reply({"head": p.head, "snapshots": inspect.snapshots(p)})

    @bp.post("/api/projects/<pid>/snapshots")
    def api_snapshot_create(pid: str) -> Response:
        ref = panel.project(pid)
        label = _body().get("label", "")
        if not isinstance(label, str) or len(label) > 200 or "\n" in label:
            raise ApiError(400, "A label is one line of at most 200 characters.")
        return start(
            ref, "snapshot", "Save a checkpoint", actions.snapshot(panel.registry, ref, label)
        )

    @bp.get("/api/projects/<pid>/snapshots/<sid>")
    def api_snapshot(pid: str, sid: str) -> Response:
        ref, n = panel.project(pid), parse_id(sid, "snapshot")
        with panel.registry.open(ref) as p:
            s = inspect.find_snapshot(p, n)
            if s is None:
                raise ApiError(404, f"There is no snapshot {n} in project {pid}.")
            return _reply(inspect.snapshot_dict(s, p.head))

    @bp.get("/api/projects/<pid>/snapshots/<sid>/preview")
    def api_snapshot_preview(pid: str, sid: str) -> Response:
        ref, n = panel.project(pid), parse_id(sid, "snapshot")
        with panel.registry.open(ref) as p:
            if inspect.find_snapshot(p, n) is None:
                raise ApiError(404, f"There is no snapshot {n} in project {pid}.")
            return _reply(inspect.rollback_preview(p, n))

    @bp.post("/api/projects/<pid>/snapshots/<sid>/restore")
    def api_snapshot_restore(pid: str, sid: str) -> Response:
        ref, n = panel.project(pid), parse_id(sid, "snapshot")
        return _rollback(ref, n)

    def _rollback(ref: ProjectRef, n: int | None) -> Response:
        if n is not None:
            with panel.registry.open(ref) as p:
                if inspect.find_snapshot(p, n) is None:
                    raise ApiError(404, f"There is no snapshot {n} in project {ref.id}.")
        title = f"Roll back to snapshot {n}" if n else "Roll back to the latest checkpoint"
        return start(
            ref, "rollback", title, actions.restore(panel.registry, ref, n, verb="rolled back")
        )

    @bp.post("/api/projects/<pid>/rollback")
    def api_project_rollback(pid: str) -> Response:
        ref = panel.project(pid)
        to = _body().get("to")
        return _rollback(ref, None if to is None else parse_id(to, "snapshot"))

    @bp.post("/api/rollback")
    def api_rollback() -> Response:
        body = _body()
        if "project" not in body:
            if len(panel.registry) != 1:
                raise ApiError(400, 'Say which project: {"project": ID, "to": SNAPSHOT}.')
            ref = next(iter(panel.registry))
        else:
            ref = panel.project(body["project"])
        if "to" not in body:
            raise ApiError(400, 'Say which snapshot to roll back to: {"to": SNAPSHOT}.')
        to = body["to"]
        return _rollback(ref, None if to is None else parse_id(to, "snapshot"))

    # ---- operations ---------------------------------------------------------------------------
    def _op(ref: ProjectRef, op: str) -> tuple[int, Any]:
        n = parse_id(op, "operation")
        with panel.registry.open(ref) as p:
            rec = inspect.operation(p, n)
            if rec is None:
                raise ApiError(404, f"There is no operation {n} in project {ref.id}.")
            return n, rec

    @bp.get("/api/projects/<pid>/operations")
    def api_operations(pid: str) -> Response:
        ref = panel.project(pid)
        with panel.registry.open(ref) as p:
            ops = [inspect.operation_dict(p, r) for r in inspect.operations(p)]
        return _reply({"operations": ops})

    @bp.get("/api/projects/<pid>/operations/<op>")
    def api_operation(pid: str, op: str) -> Response:
        ref = panel.project(pid)
        n = parse_id(op, "operation")
        with panel.registry.open(ref) as p:
            rec = inspect.operation(p, n)
            if rec is None:
                raise ApiError(404, f"There is no operation {n} in project {pid}.")
            return _reply(inspect.operation_dict(p, rec, errors=True))

    def _resume(pid: str, op: str) -> Response:
        ref = panel.project(pid)
        n, rec = _op(ref, op)
        state = inspect.op_state(rec)
        if rec.finished:
            raise ApiError(409, f"Operation {n} already finished; there is nothing to resume.")
        if state == "rolled-back":
            raise ApiError(409, f"Operation {n} was rolled back; start it again instead.")
        if state == "running":
            raise ApiError(409, f"Operation {n} is running in another process.")
        title = f"Resume {inspect.what_of(rec)[:1].lower()}{inspect.what_of(rec)[1:]}"
        return start(ref, "resume", title, actions.resume_op(panel.registry, ref, n), op=n)

    @bp.post("/api/projects/<pid>/operations/<op>/resume")
    def api_op_resume(pid: str, op: str) -> Response:
        return _resume(pid, op)

    @bp.post("/api/projects/<pid>/operations/<op>/retry")
    def api_op_retry(pid: str, op: str) -> Response:
        """Retry the failed step: the same as resuming (the step runs again first)."""
        return _resume(pid, op)

    @bp.post("/api/projects/<pid>/operations/<op>/skip")
    def api_op_skip(pid: str, op: str) -> Response:
        """Skip the step the operation stopped at ({"step": N} names it, 1-based), then run
        the steps after it."""
        ref = panel.project(pid)
        n, rec = _op(ref, op)
        raw = _body().get("step")
        step = None if raw is None else parse_id(raw, "step")
        state = inspect.op_state(rec)
        if rec.finished:
            raise ApiError(409, f"Operation {n} already finished; there is nothing to skip.")
        if state == "rolled-back":
            raise ApiError(409, f"Operation {n} was rolled back; there is nothing to skip.")
        if state == "running":
            raise ApiError(409, f"Operation {n} is running in another process.")
        cur = rec.next_step
        if step is not None and step > len(rec.steps):
            raise ApiError(400, f"Operation {n} has steps 1-{len(rec.steps)}, not {step}.")
        if step is not None and rec.steps[step - 1].status == "skipped":
            raise ApiError(409, f"Step {step} of operation {n} is already skipped.")
        if cur is None:
            raise ApiError(409, f"Operation {n} has no unfinished step to skip.")
        if step is not None and step != cur.index + 1:
            raise ApiError(
                409,
                f"Only the step operation {n} stopped at (step {cur.index + 1}) can be skipped.",
            )
        what = inspect.what_of(rec)
        title = f"Skip step {cur.index + 1} of {what[:1].lower()}{what[1:]}"
        return start(ref, "skip", title, actions.skip_op(panel.registry, ref, n, step), op=n)

    @bp.post("/api/projects/<pid>/operations/<op>/rollback")
    def api_op_rollback(pid: str, op: str) -> Response:
        ref = panel.project(pid)
        n, rec = _op(ref, op)
        if rec.checkpoint is None:
            raise ApiError(409, f"Operation {n} never started; there is nothing to undo.")
        if inspect.op_state(rec) == "running":
            raise ApiError(409, f"Operation {n} is running in another process.")
        if rec.status == "rolled-back":
            raise ApiError(409, f"Operation {n} was already rolled back.")
        title = f"Undo {inspect.what_of(rec)[:1].lower()}{inspect.what_of(rec)[1:]}"
        return start(ref, "rollback-op", title, actions.rollback_op(panel.registry, ref, n), op=n)

    # ---- downloads ----------------------------------------------------------------------------
    @bp.get("/api/projects/<pid>/downloads")
    def api_downloads(pid: str) -> Response:
        ref = panel.project(pid)
        with panel.registry.open(ref) as p:
            items = inspect.partial_downloads(p, inspect.operations(p, 20))
        return _reply({"downloads": [d.to_dict() for d in items]})

    @bp.post("/api/projects/<pid>/downloads/<key>/resume")
    def api_download_resume(pid: str, key: str) -> Response:
        ref = panel.project(pid)
        if not inspect.KEY.match(key):
            raise ApiError(400, "A download key is 16 hex digits.")
        with panel.registry.open(ref) as p:
            d = inspect.partial_download(p, key)
        if d is None:
            raise ApiError(404, f"There is no stopped download {key} in project {pid}.")
        if d.active:
            raise ApiError(409, f"{inspect.safe(d.dest)} is being downloaded right now.")
        title = f"Resume the download of {inspect.safe(d.dest)}"
        return start(
            ref, "resume-download", title, actions.resume_download(panel.registry, ref, key)
        )

    # ---- recovery -----------------------------------------------------------------------------
    @bp.post("/api/projects/<pid>/recover")
    def api_recover(pid: str) -> Response:
        ref = panel.project(pid)
        keep = _body().get("keep", False)
        if not isinstance(keep, bool):
            raise ApiError(400, '"keep" is true or false.')
        title = "Keep the interrupted changes" if keep else "Finish interrupted work"
        return start(ref, "recover", title, actions.recover(panel.registry, ref, keep=keep))

    @bp.post("/api/projects/<pid>/problems/<problem>/fixes/<fix>")
    def api_problem_fix(pid: str, problem: str, fix: str) -> Response:
        """Apply one of a problem's fixes by its ids (what the library's doctor offers)."""
        ref = panel.project(pid)
        v = panel.view(ref)
        found = next((i for i in v.problems if i.id == problem), None)
        if found is None:
            raise ApiError(404, f"There is no open problem {problem[:80]!r} in project {pid}.")
        chosen = next((f for f in found.fixes if f.id == fix), None)
        if chosen is None:
            raise ApiError(404, f"Problem {found.id} has no fix {fix[:40]!r}.")
        return start(
            ref, "fix", chosen.label, actions.apply_fix(panel.registry, ref, found.id, chosen.id)
        )

    @bp.post("/api/projects/<pid>/verify")
    def api_verify(pid: str) -> Response:
        ref = panel.project(pid)

        def keep_report(report: Any) -> None:
            panel.set_verify(ref.id, report)

        return start(
            ref, "verify", "Check stored data", actions.verify(panel.registry, ref, keep_report)
        )

    # ---- jobs and events ----------------------------------------------------------------------
    @bp.get("/api/jobs")
    def api_jobs() -> Response:
        return _reply({"jobs": [panel.jobs.snapshot(j) for j in panel.jobs.all()]})

    @bp.get("/api/jobs/<job_id>")
    def api_job(job_id: str) -> Response:
        job = panel.jobs.get(parse_id(job_id, "job"))
        if job is None:
            raise ApiError(404, f"There is no job {job_id}.")
        return _reply(panel.jobs.snapshot(job))

    @bp.get("/api/events")
    def api_events() -> Response:
        pid = request.args.get("project")
        ref = panel.project(pid) if pid is not None else None
        raw = request.headers.get("Last-Event-ID") or request.args.get("last_id")
        last: int | None = None
        if raw:
            try:
                last = int(raw)
            except ValueError:
                last = None
        refs = [ref] if ref is not None else list(panel.registry)
        stream = _stream(panel, refs, last)
        return Response(
            stream,
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @bp.route("/api/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def api_not_found(rest: str) -> Response:
        raise ApiError(404, f"There is no API route {request.method} /api/{rest[:80]}.")


def _sse(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {name}")
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


def _hello(panel: Panel, refs: list[ProjectRef], cursor: int, reset: bool) -> str:
    ids = {r.id for r in refs}
    jobs = [panel.jobs.snapshot(j) for j in panel.jobs.all() if j.project in ids]
    return _sse("hello", {"last_id": cursor, "jobs": jobs[-20:], "reset": reset}, cursor)


def _downloads(refs: list[ProjectRef]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ref in refs:
        items = [
            d for d in inspect.partial_downloads_at(ref.root / ".snapfs") if d.done or d.active
        ]
        out[ref.id] = [
            {
                "key": d.key,
                "dest": d.dest,
                "done": d.done,
                "size": d.size,
                "active": d.active,
                "percent": d.percent,
            }
            for d in items
        ]
    return out


def _stream(panel: Panel, refs: list[ProjectRef], last: int | None) -> Iterator[str]:
    """The event stream: what was missed (or the current state), then events as they come,
    plus the progress of downloads other processes run, polled from their records."""
    broker = panel.broker
    ids = {r.id for r in refs}

    def wanted(e: Event) -> bool:
        return e.project is None or e.project in ids

    yield "retry: 2000\n\n"
    replay = broker.since(last) if last is not None else None
    if replay is None:
        cursor = broker.last_id
        yield _hello(panel, refs, cursor, reset=last is not None)
    else:
        cursor = last if last is not None else 0
        for e in replay:
            cursor = e.id
            if wanted(e):
                yield _sse(e.name, e.data, e.id)
    quiet_since = time.monotonic()
    polled = 0.0
    seen: dict[str, Any] | None = None
    while not broker.closed:
        events = broker.wait(cursor, POLL)
        now = time.monotonic()
        if events is None:  # fell out of the buffer: start over from the current state
            cursor = broker.last_id
            yield _hello(panel, refs, cursor, reset=True)
            quiet_since = now
            continue
        for e in events:
            cursor = e.id
            if wanted(e):
                yield _sse(e.name, e.data, e.id)
                quiet_since = now
        if now - polled >= DOWNLOADS_EVERY:
            polled = now
            current = _downloads(refs)
            if current != seen:
                if seen is not None or any(current.values()):
                    yield _sse("downloads", {"projects": current})
                    quiet_since = now
                seen = current
        if now - quiet_since >= KEEPALIVE:
            yield ": keepalive\n\n"
            quiet_since = now
