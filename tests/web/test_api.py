"""The recovery panel's HTTP API and pages, through Flask's test client (issue 6).

Every project here is real (temp dirs, SQLite, the object store); failed imports come from a
real FaultServer on 127.0.0.1 that answers 404 once. Jobs run in the panel's own threads and
are waited for, never slept on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, render_template_string
from flask.testing import FlaskClient

import snapfs
from snapfs._ops import load_operation
from tests.faultserver import FaultServer, Reset, Status
from tests.helpers import corrupt_object, run_cli, tree_state, wait_for, write
from tests.importkit import make_blob, sha_of
from tests.web.conftest import (
    DONE,
    MODEL,
    WORKFLOW,
    FailedImport,
    blueprint,
    finish,
    post,
    token,
)

ONE_LINE_ERROR = re.compile(r"^\{\"error\":\"[^\n]+\"\}\n?$")


def one_line_error(r: Any, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.data[:300])
    assert r.mimetype == "application/json"
    body = r.get_data(as_text=True)
    assert ONE_LINE_ERROR.match(body), body
    message: str = r.get_json()["error"]
    assert "Traceback" not in message
    return message


# ---- reading ----------------------------------------------------------------------------------


def test_status_names_the_failed_import_and_its_fixes(
    ro_client: FlaskClient, ro_failed: FailedImport
) -> None:
    r = ro_client.get("/api/status")
    assert r.status_code == 200
    d = r.get_json()
    assert [p["id"] for p in d["projects"]] == ["0"]
    assert d["projects"][0]["root"] == str(ro_failed.root) and d["projects"][0]["problems"] == 1
    assert d["running"] == [] and d["jobs"] == []
    (problem,) = d["problems"]
    assert problem["title"] == "Import of portrait workflow failed at step 2 of 3"
    assert problem["kind"] == "operation.failed" and problem["code"] == "http.404"
    assert "not at that address" in problem["message"]
    assert problem["state"] == "The project is back as it was before step 2; step 1 is kept."
    assert "Check the link" in problem["advice"]
    assert "HTTP 404" in problem["detail"]
    assert [f["id"] for f in problem["fixes"]] == ["resume", "skip-2", "rollback"]
    resume, skip, rollback = problem["fixes"]
    assert resume["url"] == f"/api/projects/0/operations/{ro_failed.op}/resume"
    assert "Nothing is lost" in resume["confirm"]
    assert skip["url"] == f"/api/projects/0/operations/{ro_failed.op}/skip"
    assert skip["body"] == {"step": 2} and "skipped" in skip["confirm"]
    assert rollback["url"] == f"/api/projects/0/operations/{ro_failed.op}/rollback"
    assert "saved first as a pre-restore snapshot" in rollback["confirm"]
    assert rollback["preview"].endswith("/preview")
    assert d["banner"]["text"] == (
        "Import of portrait workflow failed at step 2 of 3, 3 fixes available"
    )


def test_every_read_route_answers(ro_client: FlaskClient, ro_failed: FailedImport) -> None:
    op = ro_failed.op
    d = ro_client.get("/api/projects").get_json()
    assert d["projects"][0]["links"]["checkpoints"] == "/projects/0/checkpoints"
    assert ro_client.get("/api/projects/0").get_json()["snapshots"] >= 3
    changes = ro_client.get("/api/projects/0/changes").get_json()
    assert changes["added"] == [] and changes["modified"] == [] and changes["deleted"] == []
    snaps = ro_client.get("/api/projects/0/snapshots").get_json()
    kinds = [s["kind"] for s in snaps["snapshots"]]
    assert kinds[:2] == ["manual", "pre-import"] and set(kinds[2:]) == {"pre-op"}
    assert sum(s["head"] for s in snaps["snapshots"]) == 1
    one = ro_client.get(f"/api/projects/0/snapshots/{ro_failed.initial}").get_json()
    assert one["label"] == "fresh install" and one["checkpoint"] is True
    prev = ro_client.get(f"/api/projects/0/snapshots/{ro_failed.initial}/preview").get_json()
    # Step 1 wrote the workflow: a rollback deletes the folder it created, and nothing else.
    gone = ["user/", "user/default/", "user/default/workflows/", WORKFLOW]
    assert prev["changes"] == {"delete": gone, "restore": [], "revert": []}
    assert prev["summary"] == (
        f"Rolling back to snapshot {ro_failed.initial}: 4 files or folders added since then "
        "will be deleted."
    )
    assert "pre-restore" in prev["kept"]
    ops = ro_client.get("/api/projects/0/operations").get_json()["operations"]
    assert [(o["id"], o["state"]) for o in ops] == [(op, "failed")]
    rec = ro_client.get(f"/api/projects/0/operations/{op}").get_json()
    assert [(s["status"], s["attempts"]) for s in rec["steps"]] == [
        ("done", 1),
        ("rolled-back", 1),
        ("pending", 0),
    ]
    assert rec["steps"][1]["checkpoint"] is not None and rec["checkpoint"] is not None
    assert [e["code"] for e in rec["errors"]] == ["http.404"]
    downloads = ro_client.get("/api/projects/0/downloads").get_json()["downloads"]
    assert [(d["dest"], d["op"]) for d in downloads] == [(MODEL, op)]
    problems = ro_client.get("/api/projects/0/problems").get_json()["problems"]
    assert [p["id"] for p in problems] == [f"op-{op}"]
    errors = ro_client.get("/api/projects/0/errors").get_json()["errors"]
    assert [(e["code"], e["count"]) for e in errors] == [("http.404", 1)]
    assert ro_client.get("/api/jobs").get_json() == {"jobs": []}
    assert ro_client.get("/api/csrf").get_json()["header"] == "X-CSRF-Token"


def test_pages_render_with_safe_headers(ro_client: FlaskClient, ro_failed: FailedImport) -> None:
    for url in ("/", "/projects/0/checkpoints", "/projects/0/operations"):
        r = ro_client.get(url)
        assert r.status_code == 200, url
        html = r.get_data(as_text=True)
        assert "Import of portrait workflow failed at step 2 of 3, 3 fixes available" in html
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'self'" in csp and r.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert r.headers["Cache-Control"] == "no-store"  # pages carry the CSRF token
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        # No inline script or style: every <script> has a src, no style="" or on*="" handlers.
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
        assert not re.search(r"\sstyle=|\son[a-z]+=", html)
        assert re.search(r'<meta name="snapfs-csrf" content="[0-9a-f]{64}">', html)
    panel = ro_client.get("/").get_data(as_text=True)
    assert 'data-fix="resume"' in panel and 'data-fix="rollback"' in panel
    assert "Show details" in panel and "HTTP 404" in panel
    cps = ro_client.get("/projects/0/checkpoints").get_data(as_text=True)
    assert "fresh install" in cps and "Saved by you" in cps and "Before an import" in cps
    assert "Roll back to this" in cps and "saved first as a pre-restore snapshot" in cps
    ops = ro_client.get("/projects/0/operations").get_data(as_text=True)
    assert "Rolled back" in ops and "Attempts" in ops and f"#op-{ro_failed.op}" not in ops
    assert ro_client.get("/checkpoints").headers["Location"].endswith("/projects/0/checkpoints")
    assert ro_client.get("/operations").headers["Location"].endswith("/projects/0/operations")
    for url in (
        "/banner",
        "/fragments/problems",
        "/fragments/projects/0/checkpoints",
        "/fragments/projects/0/operations",
    ):
        assert ro_client.get(url).status_code == 200, url
    assert "snapfs-banner--problem" in ro_client.get("/banner").get_data(as_text=True)
    static = ro_client.get("/snapfs-static/snapfs.js")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")
    static.close()
    r = ro_client.get("/projects/9/checkpoints")
    assert r.status_code == 404 and r.mimetype == "text/html"


def test_api_answers_are_not_cached(ro_client: FlaskClient, ro_failed: FailedImport) -> None:
    r = ro_client.get("/api/status")
    assert r.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in r.headers


# ---- security -----------------------------------------------------------------------------------


def _nothing_happened(app: Flask, failed: FailedImport) -> None:
    assert blueprint(app).panel.jobs.all() == []
    with snapfs.open(failed.root, recover=False) as p:
        assert load_operation(p, failed.op).status == "failed"


def test_a_mutation_without_a_csrf_token_is_refused(
    ro_app: Flask, ro_client: FlaskClient, ro_failed: FailedImport
) -> None:
    r = ro_client.post(f"/api/projects/0/operations/{ro_failed.op}/resume", json={})
    assert "CSRF" in one_line_error(r, 403)
    r = ro_client.post("/api/rollback", json={"project": "0", "to": ro_failed.initial})
    one_line_error(r, 403)
    _nothing_happened(ro_app, ro_failed)


def test_a_wrong_csrf_token_is_refused(
    ro_app: Flask, ro_client: FlaskClient, ro_failed: FailedImport
) -> None:
    good = token(ro_client)
    bad = ("0" if good[0] != "0" else "1") + good[1:]
    r = ro_client.post(
        "/api/rollback", json={"project": "0", "to": 1}, headers={"X-CSRF-Token": bad}
    )
    assert "CSRF" in one_line_error(r, 403)
    # Another session's token is no good either: tokens are bound to the session cookie.
    other = ro_app.test_client()
    r = other.post("/api/rollback", json={"project": "0", "to": 1}, headers={"X-CSRF-Token": good})
    one_line_error(r, 403)
    # And a token does not survive a server restart (a new key per panel).
    _nothing_happened(ro_app, ro_failed)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:1"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Referer": "http://evil.example/page"},
    ],
)
def test_a_cross_site_post_is_refused_even_with_a_token(
    ro_app: Flask, ro_client: FlaskClient, ro_failed: FailedImport, headers: dict[str, str]
) -> None:
    r = post(ro_client, "/api/rollback", {"project": "0", "to": ro_failed.initial}, **headers)
    assert "Refused" in one_line_error(r, 403)
    _nothing_happened(ro_app, ro_failed)


def test_a_same_origin_post_with_the_token_is_accepted(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    r = post(
        client,
        f"/api/projects/0/operations/{failed.op}/resume",
        Origin="http://localhost",
        **{"Sec-Fetch-Site": "same-origin", "Referer": "http://localhost/"},
    )
    finish(app, r)


def test_a_form_post_is_refused(ro_client: FlaskClient, ro_failed: FailedImport) -> None:
    r = ro_client.post(
        "/api/rollback",
        data="project=0&to=1",
        content_type="application/x-www-form-urlencoded",
        headers={"X-CSRF-Token": token(ro_client)},
    )
    one_line_error(r, 415)


def test_the_session_cookie_is_strict_and_httponly(
    ro_client: FlaskClient, ro_failed: FailedImport
) -> None:
    r = ro_client.get("/api/csrf")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("snapfs_sid=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_a_foreign_host_header_is_refused(ro_client: FlaskClient, ro_failed: FailedImport) -> None:
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    r = ro_client.get("/api/status", headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert ro_client.get("/api/status", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert ro_client.get("/api/status", headers={"Host": "localhost:8765"}).status_code == 200


@pytest.mark.parametrize(
    ("method", "url", "body", "status"),
    [
        ("GET", "/api/projects/9", None, 404),
        ("GET", "/api/projects/..%2F..%2Fetc/snapshots", None, 404),
        ("GET", "/api/projects/0/snapshots/abc", None, 400),
        ("GET", "/api/projects/0/snapshots/-1", None, 400),
        ("GET", "/api/projects/0/snapshots/0", None, 400),
        ("GET", "/api/projects/0/snapshots/99999999999999999999", None, 400),
        ("GET", "/api/projects/0/snapshots/999", None, 404),
        ("GET", "/api/projects/0/snapshots/999/preview", None, 404),
        ("GET", "/api/projects/0/operations/x", None, 400),
        ("GET", "/api/projects/0/operations/77", None, 404),
        ("GET", "/api/jobs/0", None, 400),
        ("GET", "/api/jobs/5", None, 404),
        ("GET", "/api/nope", None, 404),
        ("GET", "/api/events?project=7", None, 404),
        ("POST", "/api/rollback", {"project": "../../etc", "to": 1}, 404),
        ("POST", "/api/rollback", {"project": "/etc", "to": 1}, 404),
        ("POST", "/api/rollback", {"project": ["0"], "to": 1}, 404),
        ("POST", "/api/rollback", {"project": "0", "to": "1; rm -rf /"}, 400),
        ("POST", "/api/rollback", {"project": "0", "to": True}, 400),
        ("POST", "/api/rollback", {"project": "0", "to": 1.5}, 400),
        ("POST", "/api/rollback", {"project": "0", "to": 999}, 404),
        ("POST", "/api/rollback", {"project": "0"}, 400),
        ("POST", "/api/rollback", [1, 2], 400),
        ("POST", "/api/projects/0/rollback", {"to": "latest"}, 400),
        ("POST", "/api/projects/0/snapshots/999/restore", {}, 404),
        ("POST", "/api/projects/0/operations/77/resume", {}, 404),
        ("POST", "/api/projects/0/operations/77/rollback", {}, 404),
        ("POST", "/api/projects/0/downloads/..%2F..%2Fproject.db/resume", {}, 404),
        ("POST", "/api/projects/0/downloads/0123456789abcdef/resume", {}, 404),
        ("POST", "/api/projects/0/downloads/XYZ/resume", {}, 400),
        ("POST", "/api/projects/0/recover", {"keep": "yes"}, 400),
        ("POST", "/api/projects/0/snapshots", {"label": "a\nb"}, 400),
        ("POST", "/api/projects/0/status", {}, 404),
        ("DELETE", "/api/projects/0/snapshots/1", None, 404),
    ],
)
def test_bad_ids_and_bodies_get_one_line_json_errors(
    ro_app: Flask,
    ro_client: FlaskClient,
    ro_failed: FailedImport,
    method: str,
    url: str,
    body: Any,
    status: int,
) -> None:
    headers = {"X-CSRF-Token": token(ro_client)}
    r = ro_client.open(url, method=method, json=body, headers=headers)
    one_line_error(r, status)
    assert blueprint(ro_app).panel.jobs.all() == []


# ---- changing things ----------------------------------------------------------------------------


def test_resume_of_the_failed_import_finishes_it(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    r = post(client, f"/api/projects/0/operations/{failed.op}/resume")
    assert r.headers["Location"] == f"/api/jobs/{r.get_json()['job']['id']}"
    job = finish(app, r)
    assert job["percent"] == 100.0
    assert job["message"] == "Import of portrait workflow finished: 2 step(s) run, 1 already done."
    assert sha_of(failed.root / MODEL) == failed.blob.sha256
    assert (failed.root / WORKFLOW).read_text() == '{"nodes": []}'
    assert (failed.root / DONE).read_text() == "ok\n"
    with snapfs.open(failed.root) as p:
        assert load_operation(p, failed.op).status == "done"
    d = client.get("/api/status").get_json()
    assert d["problems"] == [] and d["banner"]["level"] == "ok"
    assert client.get(f"/api/jobs/{job['id']}").get_json()["status"] == "done"
    # Resuming a finished operation is refused in plain words.
    r = post(client, f"/api/projects/0/operations/{failed.op}/retry")
    assert "already finished" in one_line_error(r, 409)


def test_rollback_puts_the_files_on_disk_back_and_can_be_undone(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    finish(app, post(client, f"/api/projects/0/operations/{failed.op}/resume"))
    after_import = tree_state(failed.root)
    assert after_import != failed.before
    job = finish(app, post(client, "/api/rollback", {"project": "0", "to": failed.initial}))
    assert tree_state(failed.root) == failed.before
    assert not (failed.root / MODEL).exists() and not (failed.root / "user").exists()
    pre = job["result"]["pre_restore"]
    assert job["message"].startswith(f"Rolled back to snapshot {failed.initial} (fresh install)")
    assert f"saved as snapshot {pre}" in job["message"]
    snaps = client.get("/api/projects/0/snapshots").get_json()
    assert snaps["head"] == failed.initial
    # The state that was left is the import's post checkpoint: it recorded that state
    # exactly, so the restore took no pre-restore snapshot to repeat it.
    assert [s["kind"] for s in snaps["snapshots"] if s["id"] == pre] == ["post"]
    assert [s["kind"] for s in snaps["snapshots"]].count("pre-restore") == 0
    # The pre-restore snapshot undoes the rollback, exactly.
    finish(app, post(client, f"/api/projects/0/snapshots/{pre}/restore"))
    assert tree_state(failed.root) == after_import


def test_rollback_of_the_whole_operation(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    write(failed.root, "notes.txt", "written by hand after the import failed\n")
    job = finish(app, post(client, f"/api/projects/0/operations/{failed.op}/rollback"))
    assert tree_state(failed.root) == failed.before  # the pre-import checkpoint == fresh install
    assert job["result"]["pre_restore"] is not None
    with snapfs.open(failed.root) as p:
        assert load_operation(p, failed.op).status == "rolled-back"
        pre = p.resolve(job["result"]["pre_restore"])
        assert pre.kind == "pre-restore"
    assert client.get("/api/status").get_json()["problems"] == []
    r = post(client, f"/api/projects/0/operations/{failed.op}/rollback")
    assert "already rolled back" in one_line_error(r, 409)
    r = post(client, f"/api/projects/0/operations/{failed.op}/resume")
    assert "rolled back" in one_line_error(r, 409)


def test_project_rollback_defaults_to_the_latest_checkpoint(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    write(failed.root, "scratch.txt", "x")
    job = finish(app, post(client, "/api/projects/0/rollback", {}))
    assert not (failed.root / "scratch.txt").exists()
    assert job["result"]["changed"] >= 1


def test_only_one_action_per_project_at_a_time(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    release = threading.Event()
    panel = blueprint(app).panel

    def blocker(ctx: Any) -> dict[str, Any]:
        ctx.progress(40.0, "holding the project")
        assert release.wait(30)
        return {"message": "released"}

    job = panel.jobs.start("0", "test", "A long action", blocker)
    try:
        r = post(client, "/api/rollback", {"project": "0", "to": failed.initial})
        message = one_line_error(r, 409)
        assert message == (
            "Project 0 is busy: a long action is still running. Wait for it to finish, then "
            "try again."
        )
        d = client.get("/api/status").get_json()
        assert d["projects"][0]["busy"] is True and d["jobs"][0]["percent"] == 40.0
        assert d["banner"]["level"] == "problem"  # the failed import is still open
    finally:
        release.set()
        panel.jobs.wait(job.id, 30)
    assert tree_state(failed.root) != failed.before  # the refused rollback changed nothing


def test_a_writer_in_another_process_gives_409(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    from snapfs._lock import Lock

    lock = Lock(failed.root / ".snapfs" / "lock", "project")
    lock.acquire(purpose="someone else")
    try:
        r = post(client, "/api/rollback", {"project": "0", "to": failed.initial})
        assert "Another snapfs process" in one_line_error(r, 409)
    finally:
        lock.release()


def test_save_a_checkpoint(app: Flask, client: FlaskClient, failed: FailedImport) -> None:
    write(failed.root, "extra.txt", "more")
    job = finish(app, post(client, "/api/projects/0/snapshots", {"label": "by the panel"}))
    sid = job["result"]["snapshot"]
    one = client.get(f"/api/projects/0/snapshots/{sid}").get_json()
    assert (one["label"], one["kind"], one["head"]) == ("by the panel", "manual", True)


def test_a_failing_job_reports_a_plain_message(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    failed.srv.inject("/portrait.bin", Status(404, times=None))
    job = finish(app, post(client, f"/api/projects/0/operations/{failed.op}/resume"), "failed")
    assert job["error"]["code"] == "http.404"
    assert job["message"].startswith(
        "Step 2 of 3 (download models/checkpoints/portrait.safetensors)"
    )
    assert "\n" not in job["message"] and "Traceback" not in job["message"]
    failed.srv.clear_faults()


# ---- other problems: partial downloads, dead transactions, interrupted restores, verify -------


def test_a_stopped_download_is_a_problem_with_a_resume_fix(
    app: Flask, client: FlaskClient, failed: FailedImport, srv: FaultServer
) -> None:
    blob = make_blob(3 << 20)
    srv.add("/lora.bin", blob.data)
    # The first response breaks after 1.5 MiB; then the server is down for good.
    srv.inject("/lora.bin", Reset(after=3 << 19), Status(503, times=None, skip=1))
    dest = "models/loras/lora.safetensors"
    with snapfs.open(failed.root, **failed.options) as p, pytest.raises(snapfs.DownloadError):
        snapfs.download(srv.url("/lora.bin"), dest, sha256=blob.sha256, size=blob.size, project=p)
    (d,) = [
        x
        for x in client.get("/api/projects/0/downloads").get_json()["downloads"]
        if x["op"] is None
    ]
    assert d["dest"] == dest and d["size"] == blob.size and 0 < d["done"] < blob.size
    assert d["active"] is False and d["sha256"] == blob.sha256
    problems = {p["id"]: p for p in client.get("/api/projects/0/problems").get_json()["problems"]}
    problem = problems[f"download-{d['key']}"]
    assert problem["title"] == f"Download of {dest} stopped at {d['percent']:.0f}%"
    (fix,) = problem["fixes"]
    assert fix["url"] == f"/api/projects/0/downloads/{d['key']}/resume"
    # The event stream reports downloads from their records (whoever runs them).
    resp = client.get("/api/events?project=0", buffered=False)
    try:
        events = _read_events(resp, lambda evs: any(e == "downloads" for _i, e, _d in evs))
    finally:
        resp.close()
    (listed,) = [x for _i, e, x in events if e == "downloads"][0]["projects"]["0"]
    assert (listed["key"], listed["done"], listed["active"]) == (d["key"], d["done"], False)
    srv.clear_faults()
    srv.reset_stats()
    job = finish(app, post(client, fix["url"]))
    assert sha_of(failed.root / dest) == blob.sha256
    assert srv.bytes_sent_for("/lora.bin") <= blob.size - d["done"] + (1 << 20)  # resumed
    assert job["percent"] == 100.0 and "Downloaded" in job["message"]
    assert not [
        x
        for x in client.get("/api/projects/0/downloads").get_json()["downloads"]
        if x["op"] is None
    ]


_CRASH_TXN = """
import os, signal, sys
import snapfs
p = snapfs.open(sys.argv[1])
tx = snapfs.transaction(p, label="install custom nodes")
tx.__enter__()
with open(os.path.join(sys.argv[1], "custom_nodes.txt"), "w") as f:
    f.write("half done")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _crash(*args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, *args], env={**os.environ, **(env or {})}, capture_output=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("keep", [False, True])
def test_a_transaction_whose_process_died_offers_rollback_or_keep(
    app: Flask, client: FlaskClient, failed: FailedImport, keep: bool
) -> None:
    before = tree_state(failed.root)
    _crash("-c", _CRASH_TXN, str(failed.root))
    problems = {p["id"]: p for p in client.get("/api/projects/0/problems").get_json()["problems"]}
    (txn,) = [p for p in problems.values() if p["kind"] == "transaction.orphaned"]
    assert txn["title"] == "Install custom nodes was interrupted"
    discard, keeper = txn["fixes"]
    assert discard["loses_data"] is True and "can't be brought back" in discard["confirm"]
    assert discard["preview"] is not None and keeper["loses_data"] is False
    fix = keeper if keep else discard
    assert fix["body"] == {"keep": keep}
    job = finish(app, post(client, fix["url"], fix["body"]))
    if keep:
        assert (failed.root / "custom_nodes.txt").read_text() == "half done"
        assert "Kept the partial state" in job["message"]
    else:
        assert tree_state(failed.root) == before
        assert "Rolled back transaction" in job["message"]
    kinds = [p["kind"] for p in client.get("/api/projects/0/problems").get_json()["problems"]]
    assert "transaction.orphaned" not in kinds


def test_an_interrupted_restore_is_finished_by_recover(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    write(failed.root, "later.txt", "a later change")
    _crash(
        "-m",
        "snapfs",
        "-C",
        str(failed.root),
        "restore",
        str(failed.initial),
        "-y",
        env={"SNAPFS_CRASH_AT": "restore.intent_written"},
    )
    problems = client.get("/api/projects/0/problems").get_json()["problems"]
    (restore,) = [p for p in problems if p["id"] == "restore"]
    assert restore["title"] == f"A restore of snapshot {failed.initial} was interrupted"
    (fix,) = restore["fixes"]
    assert fix["label"] == "Finish the restore"
    job = finish(app, post(client, fix["url"], fix["body"]))
    assert "Finished an interrupted restore" in job["message"]
    assert tree_state(failed.root) == failed.before
    assert not (failed.root / ".snapfs" / "intent.json").exists()


def test_verify_on_demand_lists_damaged_data(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    job = finish(app, post(client, "/api/projects/0/verify"))
    assert job["result"]["ok"] is True
    with snapfs.open(failed.root, recover=False) as p:
        entry = p.state.load_cache()[b"main.py"]
        corrupt_object(p.store, entry.oid)
    job = finish(app, post(client, "/api/projects/0/verify"))
    assert job["result"]["ok"] is False
    kinds = [p["kind"] for p in client.get("/api/projects/0/problems").get_json()["problems"]]
    assert "store.corrupt" in kinds


# ---- live progress ----------------------------------------------------------------------------


def _read_events(resp: Any, until: Any, limit: float = 30) -> list[tuple[str | None, str, Any]]:
    """(id, event, data) from an SSE response until ``until(events)`` is true."""
    events: list[tuple[str | None, str, Any]] = []
    buf = ""
    deadline = time.monotonic() + limit
    for chunk in resp.response:
        buf += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k] = v.strip()
            if "event" in fields:
                events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        if until(events) or time.monotonic() > deadline:
            break
    return events


def test_events_stream_progress_and_replay_after_a_reconnect(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    job = finish(app, post(client, f"/api/projects/0/operations/{failed.op}/resume"))
    # A client that saw nothing (Last-Event-ID: 0) gets every event it missed, in order.
    resp = client.get("/api/events", headers={"Last-Event-ID": "0"}, buffered=False)
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-store"

    def done(evs: list[Any]) -> bool:
        return any(e == "job" and d["status"] == "done" for _i, e, d in evs)

    try:
        events = _read_events(resp, done)
    finally:
        resp.close()
    ids = [int(i) for i, _e, _d in events if i is not None]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    jobs = [d for _i, e, d in events if e == "job"]
    assert jobs[0]["status"] == "running" and jobs[-1]["status"] == "done"
    assert jobs[-1]["id"] == job["id"] and jobs[-1]["percent"] == 100.0
    ops = [d for _i, e, d in events if e == "op"]
    assert [o["kind"] for o in ops][-1] == "done"
    assert any(o["kind"] == "step" and o["step"] == 1 for o in ops)
    # Reconnecting after the last event: nothing replayed, the stream waits for new ones.
    last = ids[-1]
    resp = client.get("/api/events", headers={"Last-Event-ID": str(last + 1000)}, buffered=False)
    try:
        (hello,) = _read_events(resp, lambda evs: len(evs) >= 1)
    finally:
        resp.close()
    assert hello[1] == "hello" and hello[2]["reset"] is True and hello[2]["last_id"] == last
    assert [j["status"] for j in hello[2]["jobs"]] == ["done"]
    # A fresh connection starts from the current state.
    resp = client.get("/api/events?project=0", buffered=False)
    try:
        (hello,) = _read_events(resp, lambda evs: len(evs) >= 1)
    finally:
        resp.close()
    assert hello[1] == "hello" and hello[2]["reset"] is False


def test_events_end_when_the_panel_closes(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    resp = client.get("/api/events", buffered=False)
    chunks: list[bytes] = []

    def read() -> None:
        for chunk in resp.response:
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: len(chunks) >= 2, "the stream's first events")
    blueprint(app).panel.broker.close()
    reader.join(10)
    assert not reader.is_alive()
    resp.close()


# ---- embedding, the CLI -----------------------------------------------------------------------


def test_the_banner_in_a_host_app(web: Any, failed: FailedImport) -> None:
    host = Flask("host")
    bp = web.create_blueprint([failed.root], open_options=failed.options)
    host.register_blueprint(bp, url_prefix="/snapfs")
    try:

        @host.get("/")
        def home() -> str:
            return render_template_string("<h1>My launcher</h1>{{ snapfs_banner() }}")

        c = host.test_client()
        html = c.get("/").get_data(as_text=True)
        assert "Import of portrait workflow failed at step 2 of 3, 3 fixes available" in html
        assert 'href="/snapfs/#problem-0-op-' in html and "/snapfs/snapfs-static/snapfs.css" in html
        assert 'data-snapfs-events="/snapfs/api/events"' in html
        # The host's own pages get none of the panel's headers.
        assert "Content-Security-Policy" not in c.get("/").headers
        assert c.get("/snapfs/api/status").status_code == 200
        r = c.post("/snapfs/api/rollback", json={"project": "0", "to": 1})
        assert r.status_code == 403
    finally:
        bp.close()


def test_projects_by_name_and_unknown_folders(
    web: Any, failed: FailedImport, tmp_path: Path
) -> None:
    bp = web.create_blueprint({"comfy": failed.root})
    try:
        assert [r.id for r in bp.panel.registry] == ["comfy"]
    finally:
        bp.close()
    (tmp_path / "plain").mkdir()
    with pytest.raises(snapfs.NotAProject):
        web.create_blueprint([tmp_path / "plain"])
    with pytest.raises(ValueError):
        web.create_blueprint({"../x": failed.root})


def test_cli_ui_refuses_a_non_loopback_host(failed: FailedImport) -> None:
    r = run_cli("-C", str(failed.root), "ui", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2, r.stderr
    assert "Refusing to serve on 0.0.0.0" in r.stderr and "--i-know-this-is-exposed" in r.stderr


def test_cli_ui_loopback_check() -> None:
    from snapfs.cli.ui import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.0.0.2") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.com") and not is_loopback("::")


def test_cli_ui_serves_the_panel_and_stops_on_sigterm(failed: FailedImport) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "ui", "--port", "0", "--project", str(failed.root)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        lines = []
        while url is None:
            line = proc.stderr.readline()
            assert line, f"snapfs ui ended early: {''.join(lines)}"
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert f"Project 0: {failed.root}" in "".join(lines)
        with urllib.request.urlopen(url + "api/status", timeout=10) as resp:
            d = json.load(resp)
        assert d["problems"][0]["title"] == "Import of portrait workflow failed at step 2 of 3"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "Stopping the panel" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_openapi_documents_every_api_route(ro_app: Flask) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text()
    documented: dict[str, set[str]] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"^  (/api/\S*):$", line)
        if m:
            current = m.group(1)
            documented[current] = set()
            continue
        m = re.match(r"^    (get|post|put|patch|delete):$", line)
        if m and current is not None:
            documented[current].add(m.group(1).upper())
    names = {"pid": "project", "sid": "snapshot", "job_id": "job"}
    served: dict[str, set[str]] = {}
    for rule in ro_app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or rule.endpoint.endswith(".api_not_found"):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda g: "{" + names.get(g[1], g[1]) + "}", rule.rule)
        served.setdefault(path, set()).update((rule.methods or set()) - {"HEAD", "OPTIONS"})
    assert served == documented


def test_cli_ui_exposed_host_warns_and_drops_the_host_check(
    failed: FailedImport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--i-know-this-is-exposed: served with a warning (the server itself is a stand-in, so
    nothing listens beyond loopback in this test)."""
    from click.testing import CliRunner
    from werkzeug import serving

    from snapfs.cli import cli

    made: dict[str, Any] = {}

    class FakeServer:
        server_port = 4321

        def serve_forever(self) -> None:
            made["served"] = True

        def server_close(self) -> None:
            made["closed"] = True

    def fake_make_server(host: str, port: int, app: Flask, threaded: bool) -> FakeServer:
        made.update(host=host, port=port, app=app, threaded=threaded)
        return FakeServer()

    monkeypatch.setattr(serving, "make_server", fake_make_server)
    args = ["-C", str(failed.root), "ui", "--host", "192.0.2.7", "--i-know-this-is-exposed"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "WARNING: serving on 192.0.2.7, which is not loopback" in r.output
    assert "http://192.0.2.7:4321/" in r.output and "Stopping the panel" in r.output
    assert made["threaded"] is True and made["served"] and made["closed"]
    assert made["app"].config.get("TRUSTED_HOSTS") is None
