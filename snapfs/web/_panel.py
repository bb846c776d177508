"""The panel's state (projects, jobs, events, CSRF key) and the blueprint that serves it."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, jsonify, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from snapfs._errors import LockBusy, SnapfsError, SnapshotNotFound, UsageError
from snapfs._ops import OperationRecord
from snapfs._project import Project, VerifyReport

from . import _inspect as inspect
from ._jobs import Broker, Busy, Jobs
from ._registry import ProjectRef, ProjectsArg, Registry, UnknownProject
from ._security import COOKIE, HEADER, UNSAFE, Csrf, cross_origin, secure_headers

_SID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class ApiError(Exception):
    """An error answered as one line of JSON: ``{"error": "..."}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


def error_response(status: int, message: str) -> Response:
    resp = jsonify(error=" ".join(message.split()))
    resp.status_code = status
    return resp


def parse_id(value: object, what: str) -> int:
    """A snapshot/operation/job id from a URL or a JSON body: a positive whole number."""
    if isinstance(value, bool):
        raise ApiError(400, f"A {what} id is a whole number.")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        n = int(value)
    else:
        raise ApiError(400, f"A {what} id is a whole number, not {str(value)[:40]!r}.")
    if n < 1 or n > 2**62:
        raise ApiError(400, f"A {what} id is a whole number from 1 up.")
    return n


@dataclass
class ProjectView:
    """Everything the panel shows about one project, read once per request."""

    ref: ProjectRef
    head: int | None
    snapshot_count: int
    problems: list[inspect.Issue]
    operations: list[OperationRecord]
    running: list[OperationRecord]
    downloads: list[inspect.PartialDownload]
    job: dict[str, Any] | None  # this panel's running job on it, as a snapshot
    error: str | None = None


class Panel:
    """One mounted panel: its projects, jobs, event feed and the CSRF key."""

    def __init__(
        self,
        projects: ProjectsArg,
        *,
        open_options: Mapping[str, Any] | None = None,
        allowed_origins: Iterable[str] = (),
        title: str = "snapfs recovery",
    ) -> None:
        self.registry = Registry(projects, open_options)
        self.broker = Broker()
        self.jobs = Jobs(self.broker)
        self.csrf = Csrf()
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self.title = title
        self._verify: dict[str, VerifyReport] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Wait for running jobs and end every event stream. Call it when the server stops."""
        self.broker.close()
        self.jobs.close()

    # ---- verify reports (kept in memory: a verify is on demand, not a record) -----------------
    def set_verify(self, pid: str, report: VerifyReport) -> None:
        with self._lock:
            self._verify[pid] = report

    def verify_report(self, pid: str) -> VerifyReport | None:
        with self._lock:
            return self._verify.get(pid)

    # ---- reading ------------------------------------------------------------------------------
    def project(self, pid: object) -> ProjectRef:
        try:
            return self.registry.get(pid)
        except UnknownProject as exc:
            raise ApiError(404, str(exc)) from None

    def view(self, ref: ProjectRef) -> ProjectView:
        running = self.jobs.running_for(ref.id)
        job = self.jobs.snapshot(running) if running is not None else None
        try:
            with self.registry.open(ref) as p:
                return self._view(ref, p, job)
        except SnapfsError as exc:
            return ProjectView(ref, None, 0, [], [], [], [], job, error=str(exc))

    def _view(self, ref: ProjectRef, p: Project, job: dict[str, Any] | None) -> ProjectView:
        ops = inspect.operations(p, 20)
        downloads = inspect.partial_downloads(p, ops)
        issues = inspect.problems(
            p, verify=self.verify_report(ref.id), ops=ops, downloads=downloads
        )
        running = [r for r in ops if r.status == "running" and inspect.op_state(r) == "running"]
        snaps = p.state.snapshots()
        return ProjectView(ref, p.head, len(snaps), issues, ops, running, downloads, job)

    def views(self) -> list[ProjectView]:
        return [self.view(ref) for ref in self.registry]

    # ---- the per-project slot -------------------------------------------------------------------
    def check_idle(self, ref: ProjectRef) -> None:
        """409 if this panel, or another snapfs process, is already changing the project."""
        job = self.jobs.running_for(ref.id)
        if job is not None:
            raise ApiError(409, str(Busy(job)))
        state = ref.root / ".snapfs"
        for lock, what in (("lock", "writing to"), ("operation.lock", "running an operation on")):
            if inspect.flock_held(state / lock):
                raise ApiError(
                    409,
                    f"Another snapfs process is {what} project {ref.id}. Wait for it to "
                    "finish, then try again.",
                )


def fix_dict(bp: str, pid: str, fix: inspect.Fix, issue_id: str = "") -> dict[str, Any]:
    """A fix as the client applies it: the route to POST, its JSON body, the preview to show."""
    body: dict[str, Any] = {}
    if fix.action == "resume-op":
        url = url_for(f"{bp}.api_op_resume", pid=pid, op=fix.params["op"])
    elif fix.action == "rollback-op":
        url = url_for(f"{bp}.api_op_rollback", pid=pid, op=fix.params["op"])
    elif fix.action == "recover":
        url = url_for(f"{bp}.api_recover", pid=pid)
        body = {"keep": bool(fix.params.get("keep"))}
    elif fix.action == "resume-download":
        url = url_for(f"{bp}.api_download_resume", pid=pid, key=fix.params["key"])
    elif fix.action == "skip-op":
        url = url_for(f"{bp}.api_op_skip", pid=pid, op=fix.params["op"])
        body = {"step": int(fix.params["step"])}
    else:  # anything else the library's doctor offers: applied by problem and fix id
        url = url_for(f"{bp}.api_problem_fix", pid=pid, problem=issue_id, fix=fix.id)
    preview = (
        url_for(f"{bp}.api_snapshot_preview", pid=pid, sid=str(fix.preview))
        if fix.preview is not None
        else None
    )
    return {
        "id": fix.id,
        "label": fix.label,
        "confirm": fix.confirm,
        "loses_data": fix.loses_data,
        "method": "POST",
        "url": url,
        "body": body,
        "preview": preview,
    }


def issue_dict(bp: str, pid: str, issue: inspect.Issue) -> dict[str, Any]:
    d = issue.to_dict()
    d["project"] = pid
    d["fixes"] = [fix_dict(bp, pid, f, issue.id) for f in issue.fixes]
    return d


def banner(bp: str, views: list[ProjectView]) -> dict[str, Any]:
    """The status banner's sentence and where it links."""
    issues = [(v, i) for v in views for i in v.problems]
    jobs = [v.job for v in views if v.job is not None]
    panel_url = url_for(f"{bp}.panel_page")
    if issues:
        v, first = issues[0]
        text = inspect.banner_text(first, len(issues) - 1)
        if len(views) > 1:
            text = f"{v.ref.name}: {text}"
        return {
            "level": "problem",
            "text": text,
            "href": f"{panel_url}#problem-{v.ref.id}-{first.id}",
            "link": "Open the recovery panel",
            "count": len(issues),
        }
    if jobs:
        return {
            "level": "busy",
            "text": f"{jobs[0]['title']} is running.",
            "href": panel_url,
            "link": "Show progress",
            "count": 0,
        }
    errors = [v for v in views if v.error]
    if errors:
        return {
            "level": "problem",
            "text": f"{errors[0].ref.name}: {errors[0].error}",
            "href": panel_url,
            "link": "Open the recovery panel",
            "count": len(errors),
        }
    n = len(views)
    return {
        "level": "ok",
        "text": "No problems: the project is fine." if n == 1 else f"No problems in {n} projects.",
        "href": panel_url,
        "link": "Open the recovery panel",
        "count": 0,
    }


class SnapfsBlueprint(Blueprint):
    """The panel's blueprint. ``panel`` holds its state; call :meth:`close` on shutdown."""

    panel: Panel

    def close(self) -> None:
        self.panel.close()


def build_blueprint(panel: Panel, name: str) -> SnapfsBlueprint:
    from . import _api, _pages

    bp = SnapfsBlueprint(
        name,
        __name__,
        static_folder="static",
        static_url_path="/snapfs-static",
        template_folder="templates",
    )
    bp.panel = panel

    @bp.before_request
    def _guard() -> Response | None:
        sid = request.cookies.get(COOKIE)
        if not sid or not _SID.match(sid):
            sid = panel.csrf.new_session()
            g.snapfs_new_sid = sid
        g.snapfs_sid = sid
        if request.method in UNSAFE:
            why = cross_origin(request, panel.allowed_origins)
            if why is not None:
                return error_response(403, why)
            if not panel.csrf.check(request.cookies.get(COOKIE), request.headers.get(HEADER)):
                return error_response(
                    403, "Missing or wrong CSRF token: reload the page and try again."
                )
            if request.content_length and not request.is_json:
                return error_response(415, "Send the request body as JSON.")
        return None

    @bp.after_request
    def _headers(response: Response) -> Response:
        new = g.get("snapfs_new_sid")
        if new:
            response.set_cookie(
                COOKIE,
                new,
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
                path="/",
            )
        return secure_headers(response, cache=request.endpoint == f"{name}.static")

    def _error(status: int, message: str) -> Response:
        """JSON for the API, a small page for everything else."""
        endpoint = request.endpoint or ""
        if endpoint.startswith(f"{name}.api_") or "/api/" in request.path:
            return error_response(status, message)
        html = render_template(
            "snapfs/error.html",
            title="Not found" if status == 404 else "Something went wrong",
            message=" ".join(message.split()),
            css=url_for(f"{name}.static", filename="snapfs.css"),
            home=url_for(f"{name}.panel_page"),
        )
        return Response(html, status=status, mimetype="text/html")

    @bp.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.message)

    @bp.errorhandler(SnapfsError)
    def _snapfs_error(exc: SnapfsError) -> Response:
        if isinstance(exc, SnapshotNotFound):
            return _error(404, str(exc))
        if isinstance(exc, LockBusy):
            return _error(409, str(exc))
        if isinstance(exc, UsageError):
            return _error(400, str(exc))
        return _error(500, str(exc))

    @bp.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    _api.register(bp, panel)
    _pages.register(bp, panel)

    @bp.app_template_global(f"{name}_banner")
    def _banner_global() -> Any:
        """``{{ snapfs_banner() }}`` in any template of the host app: the status banner."""
        return _pages.render_banner(bp.name, panel)

    return bp
