"""The panel on top of the library's doctor: skipping a step, and fixes applied by id."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.testing import FlaskClient

import snapfs
from snapfs._hosts import HostBook
from snapfs._ops import load_operation
from tests.faultserver import FaultServer, Status
from tests.web.conftest import DONE, MODEL, WORKFLOW, FailedImport, finish, post


def _problems(client: FlaskClient) -> dict[str, Any]:
    return {p["id"]: p for p in client.get("/api/projects/0/problems").get_json()["problems"]}


def test_skip_the_failed_step_then_the_rest_runs(
    app: Flask, client: FlaskClient, failed: FailedImport
) -> None:
    failed.srv.inject("/portrait.bin", Status(404, times=None))  # it would fail again
    skip = _problems(client)[f"op-{failed.op}"]["fixes"][1]
    assert (skip["id"], skip["label"]) == ("skip-2", "Skip this step and continue")
    job = finish(app, post(client, skip["url"], skip["body"]))
    assert job["result"]["status"] == "done-with-skips" and job["result"]["skipped"] == [2]
    assert job["message"] == (
        "Import of portrait workflow finished without step(s) 2: 1 step(s) run."
    )
    assert not (failed.root / MODEL).exists()
    assert (failed.root / WORKFLOW).exists() and (failed.root / DONE).read_text() == "ok\n"
    with snapfs.open(failed.root) as p:
        rec = load_operation(p, failed.op)
        assert [s.status for s in rec.steps] == ["done", "skipped", "done"]
    op = client.get(f"/api/projects/0/operations/{failed.op}").get_json()
    assert op["state"] == "done-with-skips" and op["post"] == rec.post is not None
    assert op["current"] is None
    page = client.get("/projects/0/operations").get_data(as_text=True)
    assert "Done, steps skipped" in page and ">Skipped<" in page
    assert "Skip step" not in page  # nothing left to skip
    assert client.get("/api/status").get_json()["problems"] == []
    # Twice: refused in plain words, nothing runs.
    r = post(client, skip["url"], skip["body"])
    assert r.status_code == 409 and "already finished" in r.get_json()["error"]
    failed.srv.clear_faults()


def test_skip_route_checks_its_input(app: Flask, client: FlaskClient, failed: FailedImport) -> None:
    url = f"/api/projects/0/operations/{failed.op}/skip"
    page = client.get("/projects/0/operations").get_data(as_text=True)
    assert f'data-action="{url}"' in page and "Skip step 2 and continue" in page
    for body, status, says in (
        ({"step": 1}, 409, "Only the step operation 1 stopped at (step 2)"),
        ({"step": 9}, 400, "has steps 1-3"),
        ({"step": "2; rm"}, 400, "whole number"),
        ({"step": True}, 400, "whole number"),
    ):
        r = post(client, url, body)
        assert r.status_code == status and says in r.get_json()["error"], r.get_json()
    r = post(client, "/api/projects/0/operations/77/skip")
    assert r.status_code == 404
    with snapfs.open(failed.root) as p:
        assert load_operation(p, failed.op).status == "failed"  # nothing was skipped


def test_a_failing_source_is_fixed_through_the_generic_fix_route(
    app: Flask, client: FlaskClient, failed: FailedImport, srv: FaultServer
) -> None:
    host = srv.url("/").split("/")[2]
    book = HostBook(failed.tmp / "state" / "hosts.db", threshold=1)
    book.failure(host)
    book.close()
    problem = _problems(client)[f"source-{host}"]
    retry, keep = problem["fixes"]
    assert retry["url"] == f"/api/projects/0/problems/source-{host}/fixes/retry"
    assert keep["url"].endswith("/fixes/keep")
    job = finish(app, post(client, keep["url"], keep["body"]))
    assert job["result"]["changed"] is False and f"source-{host}" in _problems(client)
    job = finish(app, post(client, retry["url"], retry["body"]))
    assert job["result"]["changed"] is True and f"source-{host}" not in _problems(client)
    r = post(client, retry["url"], retry["body"])
    assert r.status_code == 404 and "no open problem" in r.get_json()["error"]
    r = post(client, f"/api/projects/0/problems/op-{failed.op}/fixes/explode")
    assert r.status_code == 404 and "has no fix" in r.get_json()["error"]
