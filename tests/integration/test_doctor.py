"""The doctor (issue 5, guided recovery): ``snapfs.problems``, ``snapfs.apply_fix`` and
``snapfs doctor``, on real projects (temp dirs, SQLite, the object store), imports that fail
against a FaultServer on 127.0.0.1, processes killed mid-transaction and mid-restore.

Every fix kind is applied once and then again, to show that applying it twice is safe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs._hosts import HostBook
from snapfs._import import start_import
from snapfs._ops import OperationFailed, load_operation, run_operation, skip_step
from tests.faultserver import FaultServer, Reset, Status
from tests.helpers import TreeState, corrupt_object, delete_object, run_cli, tree_state, write
from tests.importkit import (
    Blob,
    cli_env,
    download_step,
    fast,
    make_blob,
    sha_of,
    write_plan,
    write_step,
)

MODEL = "models/checkpoints/portrait.safetensors"
WORKFLOW = "user/default/workflows/portrait.json"
DONE = "user/default/workflows/portrait.ready"


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


@dataclass
class Failed:
    root: Path
    tmp: Path
    blob: Blob
    op: int
    initial: int
    before: TreeState  # the tree at the hand-made snapshot, before the import
    options: dict[str, Any]

    def open(self, **more: Any) -> snapfs.Project:
        return snapfs.open(self.root, recover=False, **{**self.options, **more})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("-C", str(self.root), *args, env=cli_env(self.tmp))


def _failed_import(tmp: Path, srv: FaultServer, *, times: int | None = 1) -> Failed:
    """Import 'portrait workflow' (write, download, write) whose download answers 404
    ``times`` times (None: always), so it fails at step 2 of 3."""
    root = tmp / "comfy"
    root.mkdir()
    write(root, "main.py", "print('comfy')\n")
    blob = make_blob(1 << 20)
    srv.add("/portrait.bin", blob.data)
    srv.inject("/portrait.bin", Status(404, times=times))
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
    return Failed(root, tmp, blob, op, initial, before, options)


@pytest.fixture
def failed(tmp_path: Path, srv: FaultServer) -> Failed:
    return _failed_import(tmp_path, srv)


@pytest.fixture
def plain(tmp_path: Path) -> Failed:
    """A project with one snapshot and no operation."""
    root = tmp_path / "plain"
    root.mkdir()
    write(root, "main.py", "print('comfy')\n")
    options = fast(tmp_path)
    with snapfs.init(root, **options) as p:
        initial = p.snapshot("fresh install").id
    return Failed(root, tmp_path, make_blob(1), 0, initial, tree_state(root), options)


def _ids(project: snapfs.Project) -> list[str]:
    return [i.id for i in snapfs.problems(project)]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- the library ---------------------------------------------------------------------------


def test_a_failed_import_is_a_problem_with_numbered_plain_fixes(failed: Failed) -> None:
    with failed.open() as p:
        (issue,) = snapfs.problems(p)
    assert issue.id == f"op-{failed.op}" and issue.kind == "operation.failed"
    assert issue.title == "Import of portrait workflow failed at step 2 of 3"
    assert "not at that address" in issue.message  # plain language, no status code
    assert "404" not in issue.message and "HTTP 404" in issue.detail
    assert issue.state == "The project is back as it was before step 2; step 1 is kept."
    assert [f.id for f in issue.fixes] == ["resume", "skip-2", "rollback"]
    resume, skip, rollback = issue.fixes
    assert "Nothing is lost" in resume.confirm and not resume.loses
    assert "step 2" in skip.loses and not skip.loses_data
    assert rollback.preview is not None and "pre-restore" in rollback.confirm
    assert isinstance(issue, snapfs.Issue) and isinstance(resume, snapfs.Fix)


def test_nothing_wrong_means_no_problems(plain: Failed) -> None:
    with plain.open() as p:
        assert snapfs.problems(p) == []
        assert snapfs.problems(p, deep=True) == []
    r = plain.cli("doctor")
    assert (r.returncode, r.stdout.strip()) == (0, "No problems: the project is fine."), r.stderr


def test_fix_resume_finishes_the_import_and_twice_is_safe(failed: Failed) -> None:
    with failed.open() as p:
        res = snapfs.apply_fix(p, f"op-{failed.op}", "resume")
        assert res.changed and "finished: 2 step(s) run, 1 already done" in res.message
        assert sha_of(failed.root / MODEL) == failed.blob.sha256
        rec = load_operation(p, failed.op)
        assert rec.status == "done" and rec.post is not None
        assert f"saved as snapshot {rec.post}" in res.message
        assert snapfs.problems(p) == []
        again = snapfs.apply_fix(p, f"op-{failed.op}", "resume")
        assert not again.changed and "not open" in again.message
        assert load_operation(p, failed.op).status == "done"


def test_fix_skip_then_the_import_ends_done_with_skips(failed: Failed) -> None:
    with failed.open() as p:
        res = snapfs.apply_fix(p, f"op-{failed.op}", "skip-2")
        assert res.changed and res.data["status"] == "done-with-skips"
        rec = load_operation(p, failed.op)
        assert [s.status for s in rec.steps] == ["done", "skipped", "done"]
        assert rec.status == "done-with-skips" and rec.post is not None
        assert not (failed.root / MODEL).exists()  # the skipped step did nothing
        assert (failed.root / DONE).read_text() == "ok\n"  # the step after it ran
        assert snapfs.problems(p) == []
        # Twice: the problem is gone, and the step stays skipped.
        again = snapfs.apply_fix(p, f"op-{failed.op}", "skip-2")
        assert not again.changed
        assert load_operation(p, failed.op).status == "done-with-skips"
        # A finished operation resumes to the same result, running nothing.
        out = snapfs.resume(p, failed.op)
        assert (out.status, out.ran, out.skipped_steps) == ("done-with-skips", 0, (1,))


def test_skip_step_alone_pauses_and_resume_goes_on_after_it(
    failed: Failed, srv: FaultServer
) -> None:
    srv.inject("/portrait.bin", Status(404, times=None))  # the download would fail again
    with failed.open() as p:
        rec = skip_step(p, failed.op)  # default: the step it stopped at
        assert (rec.index, rec.status) == (1, "skipped")
        assert skip_step(p, failed.op, 1) == rec  # idempotent
        (issue,) = snapfs.problems(p)
        assert issue.kind == "operation.paused"
        assert issue.title == "Import of portrait workflow is waiting to continue at step 3 of 3"
        assert [f.id for f in issue.fixes] == ["resume", "rollback"]
        with pytest.raises(snapfs.UsageError, match="Only the step"):
            skip_step(p, failed.op, 0)  # a done step can't be skipped
        with pytest.raises(snapfs.UsageError, match="no step 9"):
            skip_step(p, failed.op, 8)
        res = snapfs.resume(p, failed.op)
        assert (res.status, res.ran, res.skipped_steps) == ("done-with-skips", 1, (1,))
    srv.clear_faults()
    r = failed.cli("ops", "show", str(failed.op))
    assert r.returncode == 0, r.stderr
    assert "done-with-skips" in r.stdout and "2. skipped" in r.stdout
    r = failed.cli("ops", "skip", str(failed.op))
    assert r.returncode == 2 and "already finished" in _one_line(r.stderr)


def test_fix_rollback_undoes_the_import_and_twice_is_safe(failed: Failed) -> None:
    with failed.open() as p:
        res = snapfs.apply_fix(p, f"op-{failed.op}", "rollback")
        assert res.changed and res.data["pre_restore"] is not None
        assert tree_state(failed.root) == failed.before
        assert load_operation(p, failed.op).status == "rolled-back"
        again = snapfs.apply_fix(p, f"op-{failed.op}", "rollback")
        assert not again.changed
    assert tree_state(failed.root) == failed.before


def test_bad_problem_and_fix_ids_are_clear_errors(failed: Failed) -> None:
    with failed.open() as p:
        with pytest.raises(snapfs.UsageError, match="not a problem id"):
            snapfs.apply_fix(p, "../../etc", "resume")
        with pytest.raises(snapfs.UsageError, match=r"has no fix 'explode' \(its fixes: resume"):
            snapfs.apply_fix(p, f"op-{failed.op}", "explode")
        assert not snapfs.apply_fix(p, "op-999", "resume").changed


# ---- the command line ----------------------------------------------------------------------


def test_cli_doctor_lists_problems_with_numbered_fixes(failed: Failed, srv: FaultServer) -> None:
    # A second problem: a download that stopped with verified bytes kept.
    blob = make_blob(3 << 20)
    srv.add("/lora.bin", blob.data)
    srv.inject("/lora.bin", Reset(after=3 << 19), Status(503, times=None, skip=1))
    with failed.open() as p, pytest.raises(snapfs.DownloadError):
        snapfs.download(srv.url("/lora.bin"), "models/lora.bin", sha256=blob.sha256, project=p)
    r = failed.cli("doctor")
    assert r.returncode == 1, r.stderr
    out = r.stdout
    # Three: the failed import, the stopped download, and the source that kept failing it
    # (its circuit breaker opened after the 503s).
    assert "3 problems:" in out
    assert f"1. Import of portrait workflow failed at step 2 of 3  [op-{failed.op}]" in out
    assert "What happened: " in out and "not at that address" in out
    assert "   [1] Resume where it stopped" in out
    assert "   [2] Skip this step and continue" in out
    assert "   [3] Undo the whole import" in out
    assert "2. Download of models/lora.bin stopped at" in out
    assert "   [4] Resume the download" in out
    host = srv.url("/").split("/")[2]
    assert f"3. The download source {host} is failing  [source-{host}]" in out
    assert "   [5] Try this source again now" in out
    assert "   [6] Use the other sources for now" in out
    assert "HTTP 404" not in out and "Gives up" not in out  # technical detail on request only
    r = failed.cli("doctor", "--details")
    assert r.returncode == 1
    assert "HTTP 404" in r.stdout and "Error code: http.404" in r.stdout
    assert "Gives up: What step 2" in r.stdout and "Nothing is lost" in r.stdout
    r = failed.cli("doctor", "--json")
    d = json.loads(r.stdout)
    assert [i["id"] for i in d["problems"]][0] == f"op-{failed.op}"
    numbers = [(f["number"], f["id"]) for i in d["problems"] for f in i["fixes"]]
    assert numbers == [
        (1, "resume"),
        (2, "skip-2"),
        (3, "rollback"),
        (4, "resume-download"),
        (5, "retry"),
        (6, "keep"),
    ]
    # --problem narrows the listing, and numbers count within it.
    r = failed.cli("doctor", "--problem", d["problems"][1]["id"])
    assert "[1] Resume the download" in r.stdout and "op-" not in r.stdout
    # The download fix, by number: the lora arrives, resumed.
    srv.clear_faults()
    r = failed.cli("doctor", "--fix", "4")
    assert r.returncode == 0, r.stderr
    assert "Downloaded models/lora.bin" in r.stdout and "1 problem left" in r.stdout
    assert sha_of(failed.root / "models/lora.bin") == blob.sha256


def test_cli_fix_by_id_resumes_and_repeating_it_is_safe(failed: Failed) -> None:
    r = failed.cli("doctor", "--fix", "resume")
    assert r.returncode == 0, r.stderr
    assert "Applying: Resume where it stopped" in r.stderr
    assert "finished: 2 step(s) run" in r.stdout and "No problems left." in r.stdout
    r = failed.cli("doctor", "--problem", f"op-{failed.op}", "--fix", "resume")
    assert r.returncode == 0, r.stderr
    assert "is not open" in r.stdout
    assert failed.cli("doctor").returncode == 0


def test_cli_fix_skip_and_ops_show(failed: Failed) -> None:
    r = failed.cli("doctor", "--fix", "2", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["applied"]["fix"] == "skip-2" and d["applied"]["data"]["status"] == "done-with-skips"
    assert d["problems"] == []
    r = failed.cli("doctor", "--problem", f"op-{failed.op}", "--fix", "skip-2")
    assert r.returncode == 0 and "nothing was done" in r.stdout
    r = failed.cli("ops")
    assert "done-with-skips" in r.stdout


def test_cli_fix_rollback(failed: Failed) -> None:
    r = failed.cli("doctor", "--fix", "3")
    assert r.returncode == 0, r.stderr
    assert "was undone" in r.stdout
    assert tree_state(failed.root) == failed.before


def test_cli_fix_that_fails_again_says_so_in_one_line_plus_a_hint(
    tmp_path: Path, srv: FaultServer
) -> None:
    failed = _failed_import(tmp_path, srv, times=None)
    r = failed.cli("doctor", "--fix", "1")
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert "Step 2 of 3 (download models/checkpoints/portrait.safetensors) failed" in r.stderr
    assert "Run 'snapfs doctor' to see what you can do now." in r.stderr


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--fix", "99"], 2, "There is no fix 99; the fixes are numbered 1-3."),
        (["--fix", "0"], 2, "There is no fix 0"),
        (["--fix", "explode"], 2, "No problem has a fix 'explode'"),
        (["--problem", "op-999"], 2, "There is no open problem 'op-999'."),
        (["--problem", "bad id!", "--fix", "1"], 2, "is not a problem id"),
        (["--problem", "", "--fix", "1"], 2, "--problem needs a problem id"),
        (["--fix"], 2, "Option '--fix' requires an argument"),
    ],
)
def test_cli_bad_input_is_one_line(failed: Failed, args: list[str], code: int, says: str) -> None:
    r = failed.cli("doctor", *args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert says in _one_line(r.stderr)
    with failed.open() as p:
        assert load_operation(p, failed.op).status == "failed"  # nothing was applied


# ---- problems besides operations -----------------------------------------------------------

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


def test_a_dead_transaction_asks_before_discarding_its_changes(plain: Failed) -> None:
    _crash("-c", _CRASH_TXN, str(plain.root))
    r = plain.cli("doctor")
    assert r.returncode == 1, r.stderr
    assert "Install custom nodes was interrupted" in r.stdout
    assert "[1] Roll back the half-done changes  (loses data: asks first)" in r.stdout
    assert "[2] Keep the half-done changes" in r.stdout
    # Without a terminal and without --yes, a fix that loses data is refused.
    r = plain.cli("doctor", "--fix", "1")
    assert r.returncode == 2
    assert "loses data" in _one_line(r.stderr) and "--yes" in r.stderr
    assert (plain.root / "custom_nodes.txt").read_text() == "half done"
    r = plain.cli("doctor", "--fix", "1", "--yes")
    assert r.returncode == 0, r.stderr
    assert "Rolled back transaction" in r.stdout
    assert tree_state(plain.root) == plain.before
    with plain.open() as p:
        assert snapfs.problems(p) == []
        assert not snapfs.apply_fix(p, "txn-1", "recover").changed  # twice: nothing to do


def test_a_dead_transaction_can_be_kept(plain: Failed) -> None:
    _crash("-c", _CRASH_TXN, str(plain.root))
    with plain.open() as p:
        (issue,) = snapfs.problems(p)
        res = snapfs.apply_fix(p, issue.id, "recover-keep")
        assert res.changed and "Kept the partial state" in res.message
        assert snapfs.problems(p) == []
        assert not snapfs.apply_fix(p, issue.id, "recover-keep").changed
    assert (plain.root / "custom_nodes.txt").read_text() == "half done"


def test_an_interrupted_restore_is_finished(plain: Failed) -> None:
    write(plain.root, "later.txt", "a later change")
    _crash(
        "-m",
        "snapfs",
        "-C",
        str(plain.root),
        "restore",
        str(plain.initial),
        "-y",
        env={"SNAPFS_CRASH_AT": "restore.intent_written"},
    )
    r = plain.cli("doctor")
    assert r.returncode == 1
    assert f"A restore of snapshot {plain.initial} was interrupted  [restore]" in r.stdout
    r = plain.cli("doctor", "--fix", "1")
    assert r.returncode == 0, r.stderr
    assert "Finished an interrupted restore" in r.stdout
    assert tree_state(plain.root) == plain.before
    r = plain.cli("doctor", "--problem", "restore", "--fix", "recover")
    assert r.returncode == 0 and "is not open" in r.stdout


def test_a_failing_download_source_can_be_tried_again(failed: Failed, srv: FaultServer) -> None:
    host = srv.url("/").split("/")[2]
    book = HostBook(failed.tmp / "state" / "hosts.db", threshold=1)
    book.failure(host)
    book.close()
    with failed.open() as p:
        issues = {i.id: i for i in snapfs.problems(p)}
        issue = issues[f"source-{host}"]
        assert issue.kind == "source.unavailable" and "is failing" in issue.title
        assert [f.id for f in issue.fixes] == ["retry", "keep"]
        kept = snapfs.apply_fix(p, issue.id, "keep")
        assert not kept.changed and f"source-{host}" in _ids(p)
        res = snapfs.apply_fix(p, issue.id, "retry")
        assert res.changed and f"source-{host}" not in _ids(p)
        assert not snapfs.apply_fix(p, issue.id, "retry").changed
    book = HostBook(failed.tmp / "state" / "hosts.db")
    assert book.state(host) == "closed"
    book.close()


def test_a_sealed_hardlink_written_in_place_is_found_without_rehashing(tmp_path: Path) -> None:
    root = tmp_path / "sealed"
    root.mkdir()
    big = write(root, "models/big.bin", os.urandom(256 << 10))
    write(root, "main.py", "print('comfy')\n")
    opts = {**fast(tmp_path), "link_mode": "hardlink", "hardlink_threshold": 1 << 10}
    with snapfs.init(root, **opts) as p:
        p.snapshot("with the model")
        assert p.store.seal_of(p.state.load_cache()[b"models/big.bin"].oid) is not None
    os.chmod(big, 0o644)
    with open(big, "r+b") as f:
        f.seek(100)
        f.write(b"damage")
    with snapfs.open(root, recover=False, **opts) as p:
        (issue,) = snapfs.problems(p)
        assert issue.kind == "store.tampered" and "models/big.bin" in issue.title
        assert "changed in place" in issue.message and issue.fixes == ()
        assert issue.advice  # what only the user can do
        # The deep check agrees on the same problem (one entry, not two).
        assert [i.id for i in snapfs.problems(p, deep=True)] == [issue.id]
    r = run_cli("-C", str(root), "doctor", env=cli_env(tmp_path))
    assert r.returncode == 1 and "No fix snapfs can apply" in r.stdout


def test_deep_finds_missing_and_corrupt_objects(plain: Failed) -> None:
    write(plain.root, "notes.txt", "some notes\n")
    with plain.open() as p:
        p.snapshot("notes")
        cache = p.state.load_cache()
        delete_object(p.store, cache[b"notes.txt"].oid)
        corrupt_object(p.store, cache[b"main.py"].oid)
        assert snapfs.problems(p) == []  # cheap: no re-hashing
        kinds = sorted(i.kind for i in snapfs.problems(p, deep=True))
    assert kinds == ["store.corrupt", "store.missing"]
    r = plain.cli("doctor", "--deep")
    assert r.returncode == 1 and "Stored data is missing" in r.stdout


# ---- the post checkpoint and the log (issue 5, scenario 12) --------------------------------


def test_a_successful_import_takes_a_post_checkpoint_and_log_shows_its_changes(
    failed: Failed,
) -> None:
    with failed.open() as p:
        res = snapfs.resume(p, failed.op)
        rec = load_operation(p, failed.op)
        assert res.post == rec.post is not None
        snaps = {s.id: s for s in p.snapshots()}
        assert snaps[rec.post].kind == "post" and snaps[rec.post].label == (
            "after portrait workflow"
        )
        assert p.head == rec.post and not p.status()  # it records the result exactly
        assert rec.checkpoint is not None
        changed = p.diff(rec.checkpoint, rec.post)
        assert WORKFLOW in changed.added and MODEL in changed.added
        # A plain rollback skips the post checkpoint (it equals the working tree): it goes
        # back to the newest restore point, the last step's.
        target = max(s.id for s in p.snapshots() if s.kind not in ("post", "pre-restore"))
        assert snaps[target].kind == "pre-op"
        back = p.rollback()
        assert back.target == target and not (failed.root / DONE).exists()
        assert back.pre_restore == rec.post  # the post checkpoint holds what was left
    r = failed.cli("log", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    summary = next(row for row in rows if row["label"] == "import portrait workflow")
    assert (summary["status"], summary["checkpoint"], summary["post"]) == (
        "committed",
        rec.checkpoint,
        rec.post,
    )
    assert set(summary["changes"]["added"]) >= {WORKFLOW, MODEL, DONE}
    r = failed.cli("log", "-v")
    assert f"checkpoint {rec.checkpoint} -> {rec.post}  import portrait workflow" in r.stdout
    assert f"A {MODEL}" in r.stdout


def test_a_failed_import_takes_no_post_checkpoint(failed: Failed) -> None:
    with failed.open() as p:
        assert "post" not in {s.kind for s in p.snapshots()}
        assert load_operation(p, failed.op).post is None


def test_an_older_project_db_gains_the_post_column(plain: Failed) -> None:
    import sqlite3

    db = sqlite3.connect(plain.root / ".snapfs" / "project.db")
    db.execute("PRAGMA user_version = 0")
    db.execute("ALTER TABLE operations DROP COLUMN post")
    db.commit()
    db.close()
    with plain.open() as p:
        assert snapfs.list_operations(p) == []
        cols = {r[1] for r in p.state.db.execute("PRAGMA table_info(operations)")}
        assert "post" in cols


def test_cli_ops_skip_then_resume(tmp_path: Path, srv: FaultServer) -> None:
    failed = _failed_import(tmp_path, srv, times=None)
    r = failed.cli("ops", "skip", str(failed.op), "1")
    assert r.returncode == 2 and "Only the step operation 1 stopped at (step 2)" in r.stderr
    r = failed.cli("ops", "skip", str(failed.op))
    assert r.returncode == 0, r.stderr
    assert (
        "Step 2 of operation 1 (download models/checkpoints/portrait.safetensors) is skipped"
        in (r.stdout)
    )
    r = failed.cli("resume", str(failed.op))
    assert r.returncode == 0, r.stderr
    assert "Operation 1 done: 1 step(s) run, 1 already done, step(s) 2 skipped" in r.stderr
    assert "Result: snapshot" in r.stderr
    assert not (failed.root / MODEL).exists() and (failed.root / DONE).exists()
