"""Fixtures for the recovery panel's tests: a project whose import failed, the panel app.

``snapfs.web`` is imported inside fixtures, never at module level: importing a subpackage
makes it an attribute of ``snapfs``, and tests/unit/test_public_api.py checks that
``dir(snapfs)`` is exactly ``__all__`` (collection imports every test module first).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import snapfs
from snapfs._import import start_import
from snapfs._ops import OperationFailed, run_operation
from tests.faultserver import FaultServer, Status
from tests.helpers import TreeState, tree_state, write
from tests.importkit import Blob, download_step, fast, make_blob, write_plan, write_step

if TYPE_CHECKING:
    from flask import Flask
    from flask.testing import FlaskClient

    from snapfs.web import SnapfsBlueprint

MODEL = "models/checkpoints/portrait.safetensors"
WORKFLOW = "user/default/workflows/portrait.json"
DONE = "user/default/workflows/portrait.ready"


@dataclass
class FailedImport:
    """A project whose import of "portrait workflow" failed at step 2 of 3 (a 404)."""

    root: Path
    tmp: Path
    srv: FaultServer
    blob: Blob
    op: int
    initial: int  # the snapshot taken by hand before the import
    before: TreeState  # the tree at that snapshot
    options: dict[str, Any] = field(default_factory=dict)  # snapfs.open overrides


def make_failed_import(tmp: Path, srv: FaultServer, blob_size: int = 2 << 20) -> FailedImport:
    root = tmp / "comfy"
    root.mkdir()
    write(root, "main.py", "print('comfy')\n")
    write(root, "models/checkpoints/README", "put models here\n")
    blob = make_blob(blob_size)
    srv.add("/portrait.bin", blob.data)
    srv.inject("/portrait.bin", Status(404, times=1))  # the first try fails; a resume works
    options = fast(tmp)
    with snapfs.init(root, **options) as p:
        initial = p.snapshot("fresh install").id
        before = tree_state(root)
        plan = write_plan(
            tmp / "portrait.json",
            [
                write_step(WORKFLOW, '{"nodes": []}'),
                download_step(MODEL, blob, srv.url("/portrait.bin")),
                write_step(DONE, "ok\n"),
            ],
            name="portrait workflow",
        )
        op = start_import(p, plan)
        with pytest.raises(OperationFailed):
            run_operation(p, op)
    return FailedImport(root, tmp, srv, blob, op, initial, before, options)


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


@pytest.fixture
def failed(tmp_path: Path, srv: FaultServer) -> FailedImport:
    return make_failed_import(tmp_path, srv)


@pytest.fixture(scope="module")
def web() -> Any:
    return importlib.import_module("snapfs.web")


def _app(web: Any, failed: FailedImport) -> Iterator[Flask]:
    application: Flask = web.create_app([failed.root], open_options=failed.options)
    application.testing = True
    try:
        yield application
    finally:
        blueprint(application).close()


@pytest.fixture
def app(web: Any, failed: FailedImport) -> Iterator[Flask]:
    yield from _app(web, failed)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# Read-only tests (reads, and requests that must be refused) share one project and one app per
# module: building a failed import costs about a second. They must not change anything.
@pytest.fixture(scope="module")
def ro_failed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailedImport]:
    with FaultServer() as s:
        yield make_failed_import(tmp_path_factory.mktemp("ro"), s)
        assert s.errors == [], s.errors[0]


@pytest.fixture(scope="module")
def ro_app(web: Any, ro_failed: FailedImport) -> Iterator[Flask]:
    yield from _app(web, ro_failed)


@pytest.fixture
def ro_client(ro_app: Flask) -> FlaskClient:
    return ro_app.test_client()  # a fresh cookie jar: a new session per test


def blueprint(application: Flask) -> SnapfsBlueprint:
    bp: SnapfsBlueprint = application.extensions["snapfs"]
    return bp


def token(client: FlaskClient) -> str:
    r = client.get("/api/csrf")
    assert r.status_code == 200
    value = r.get_json()["token"]
    assert isinstance(value, str) and len(value) == 64
    return value


def post(client: FlaskClient, url: str, body: Any = None, **headers: str) -> Any:
    """POST JSON with this session's CSRF token (unless headers say otherwise)."""
    h = {"X-CSRF-Token": token(client), **headers}
    return client.post(url, json=body if body is not None else {}, headers=h)


def finish(application: Flask, response: Any, status: str = "done") -> dict[str, Any]:
    """Wait for the job a 202 response started; check how it ended; return it."""
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["job"]["id"]
    job = blueprint(application).panel.jobs.wait(job_id, timeout=60)
    assert job is not None
    d: dict[str, Any] = job.to_dict()
    assert d["status"] == status, d
    return d
