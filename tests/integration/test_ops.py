"""The operation engine (snapfs._ops): retries, exact rollbacks, resume, restore points, locks.

Most tests drive the engine with *scripted* steps (an operation kind registered here whose steps
do what the test says: change the tree, fail with a given error, block), so each rule of the
engine is hit on purpose. Where a real step shows the rule as well (a download that keeps
failing, a git clone, a write), the real one is used. Everything runs on real temp dirs, a real
SQLite state and, for downloads, a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs._errors import CommandFailed, LockBusy, UsageError
from snapfs._import import start_import
from snapfs._journal_proc import ProcessJournal
from snapfs._ops import (
    OperationFailed,
    OpEvent,
    Step,
    StepContext,
    create_operation,
    error_history,
    load_operation,
    register_kind,
    resumable,
    rollback_operation,
    run_operation,
)
from snapfs._txn import Transaction
from tests.faultserver import FaultServer, Status
from tests.helpers import mutate_tree, populate_tree, run_cli, tree_state, write
from tests.importkit import (
    MiB,
    cli_env,
    download_step,
    error_counts,
    fast,
    git_step,
    make_blob,
    make_repo,
    sha_of,
    step_table,
    tracked_files,
    write_plan,
    write_step,
)

# ---- scripted steps -------------------------------------------------------------------------


@dataclass
class Script:
    """What one scripted step does. ``run(ctx, n)`` gets the call number (1, 2, ...)."""

    run: Callable[[StepContext, int], None] = lambda ctx, n: None
    verify: Callable[[StepContext], bool] = lambda ctx: False
    runs: int = 0
    verifies: int = 0
    trees_at_start: list[Any] = field(default_factory=list)  # the tree as each run began


SCRIPTS: dict[str, Script] = {}


class ScriptStep(Step):
    kind = "script"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.key = spec["key"]

    def run(self, ctx: StepContext) -> None:
        s = SCRIPTS[self.key]
        s.runs += 1
        s.trees_at_start.append(tree_state(ctx.project.root))
        s.run(ctx, s.runs)

    def verify(self, ctx: StepContext) -> bool:
        s = SCRIPTS[self.key]
        s.verifies += 1
        return s.verify(ctx)


register_kind("test-script", lambda plan: [ScriptStep(s) for s in plan["steps"]])


def scripted(project: snapfs.Project, *scripts: Script, label: str = "scripted") -> int:
    """Record an operation whose steps are ``scripts``, in order."""
    steps = []
    for i, s in enumerate(scripts):
        key = uuid.uuid4().hex
        SCRIPTS[key] = s
        steps.append({"name": f"step {i + 1}", "key": key})
    return create_operation(project, "test-script", label, {"steps": steps})


@pytest.fixture(autouse=True)
def _forget_scripts() -> Iterator[None]:
    yield
    SCRIPTS.clear()


def writes(rel: str, data: str) -> Script:
    """A step that writes one file, and is done when the file holds ``data``."""

    def run(ctx: StepContext, n: int) -> None:
        write(ctx.project.root, rel, data)

    def verify(ctx: StepContext) -> bool:
        p = ctx.project.root / rel
        return p.is_file() and p.read_text() == data

    return Script(run=run, verify=verify)


def mutates_then(exc: Callable[[int], BaseException | None]) -> Script:
    """A step that makes every kind of change to the tree (helpers.mutate_tree), then raises
    ``exc(n)`` on call n (None: succeeds)."""

    def run(ctx: StepContext, n: int) -> None:
        mutate_tree(ctx.project.root)
        e = exc(n)
        if e is not None:
            raise e

    return Script(run=run)


def raises_on(failures: dict[int, BaseException]) -> Script:
    """A step that changes nothing and raises ``failures[n]`` on call n (else succeeds)."""

    def run(ctx: StepContext, n: int) -> None:
        if n in failures:
            raise failures[n]

    return Script(run=run)


def git_gone() -> CommandFailed:
    """What a clone of a deleted repository raises (not retryable: git.repo-gone)."""
    return CommandFailed(
        "git failed (exit 128): fatal: repository not found",
        tool="git",
        argv=("git", "clone", "--", "https://example.invalid/gone", "x"),
        returncode=128,
        output="remote: Repository not found.\nfatal: repository 'https://example.invalid/gone/'"
        " not found\n",
    )


class FakeSleep:
    """Stands in for time.sleep in run_operation: records the backoff delays, waits nothing."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    populate_tree(r)
    return r


@pytest.fixture
def project(root: Path, tmp_path: Path) -> Iterator[snapfs.Project]:
    with snapfs.init(root, **fast(tmp_path)) as p:
        yield p


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


# ---- retries --------------------------------------------------------------------------------


def test_a_retryable_failure_is_retried_up_to_step_retries_then_rolled_back(
    root: Path, tmp_path: Path
) -> None:
    before = tree_state(root)
    # Each attempt changes the whole tree, then the connection "drops" (net.reset: retryable).
    script = mutates_then(lambda n: ConnectionResetError(errno.ECONNRESET, "Connection reset"))
    with snapfs.init(root, **fast(tmp_path, step_retries=2)) as p:
        op = scripted(p, script)
        sleep = FakeSleep()
        events: list[OpEvent] = []
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=sleep, report=events.append)
        err = info.value
        assert (err.diagnosis.code, err.diagnosis.retryable, err.rolled_back) == (
            "net.reset",
            True,
            True,
        )
        assert script.runs == 3  # the first try and step_retries=2 retries, no more
        # Every retry started from the step's restore point: the last attempt's changes were
        # undone before the next one.
        assert script.trees_at_start == [before] * 3
        assert tree_state(root) == before
        assert step_table(p, op) == [("rolled-back", 3)]
        assert error_counts(p) == {"net.reset": 3}
        # Backoff: full jitter in [0, 2^(n-1)] seconds (base 1 s) before retry n.
        assert len(sleep.calls) == 2
        assert all(0 <= d <= 2**i for i, d in enumerate(sleep.calls)), sleep.calls
        retries = [e for e in events if e.kind == "retry"]
        assert [e.step for e in retries] == [0, 0]
        assert "attempt 2 of 3" in retries[0].message and "attempt 3 of 3" in retries[1].message
        rec = load_operation(p, op)
        assert rec.status == "failed" and rec.error is not None
        assert rec.error["code"] == "net.reset"
        assert rec.steps[0].error is not None and rec.steps[0].error["code"] == "net.reset"


def test_a_retry_that_succeeds_finishes_the_operation(project: snapfs.Project, root: Path) -> None:
    flaky = mutates_then(lambda n: TimeoutError("timed out") if n < 3 else None)
    op = scripted(project, flaky)
    before = tree_state(root)
    sleep = FakeSleep()
    res = run_operation(project, op, sleep=sleep)
    assert (res.status, res.ran, res.skipped, res.retries) == ("done", 1, 0, 2)
    assert flaky.trees_at_start == [before] * 3
    assert step_table(project, op) == [("done", 3)]
    assert error_counts(project) == {"net.timeout": 2}
    assert (root / "src/app.py").read_text() == "print('v2, broken')\n"  # the last try's work


def test_a_download_that_keeps_failing_is_retried_then_rolled_back(
    root: Path, tmp_path: Path, srv: FaultServer
) -> None:
    """The same rule with a real step: a server answering 503 forever. The download gives up
    at once (retry_attempts=1, a retryable DownloadFailed), the engine retries the step
    step_retries times, then stops; the partial file stays under .snapfs/downloads."""
    blob = make_blob(1 * MiB)
    srv.add("/m.bin", blob.data)
    srv.inject("/m.bin", Status(503, times=None))
    plan = write_plan(
        tmp_path / "plan.json",
        [write_step("a.json", "{}"), download_step("models/m.bin", blob, srv.url("/m.bin"))],
    )
    with snapfs.init(root, **fast(tmp_path, step_retries=2, retry_attempts=1)) as p:
        op = start_import(p, plan)
        before = tree_state(root)
        sleep = FakeSleep()
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=sleep)
        assert info.value.diagnosis.code == "download.failed"
        assert step_table(p, op) == [("done", 1), ("rolled-back", 3)]
        assert error_counts(p) == {"download.failed": 3}
        assert len(sleep.calls) == 2
        # One request per attempt (the 1 MiB file is one chunk): no loop anywhere.
        assert len(srv.requests_for("/m.bin")) == 3
        assert not (root / "models").exists()
        after = tree_state(root)
        assert after == {**before, b"a.json": after[b"a.json"]}
        assert (root / "a.json").read_text() == "{}"


def test_a_busy_project_lock_is_retried(project: snapfs.Project, root: Path) -> None:
    busy = raises_on({1: LockBusy("busy")})
    op = scripted(project, busy)
    sleep = FakeSleep()
    assert run_operation(project, op, sleep=sleep).status == "done"
    assert busy.runs == 2 and len(sleep.calls) == 1
    assert error_counts(project) == {"lock.busy": 1}


def test_retry_after_from_the_server_sets_the_wait(project: snapfs.Project) -> None:
    """A 503 with Retry-After: 7 (a requests HTTPError) waits 7 s, not a random backoff."""
    import requests

    def run(ctx: StepContext, n: int) -> None:
        if n == 1:
            resp = requests.Response()
            resp.status_code = 503
            resp.headers["Retry-After"] = "7"
            raise requests.HTTPError("503 Server Error", response=resp)

    step = Script(run=run)
    op = scripted(project, step)
    sleep = FakeSleep()
    run_operation(project, op, sleep=sleep)
    assert sleep.calls == [7.0]
    assert error_counts(project) == {"http.5xx": 1}


# ---- rollback of a step ---------------------------------------------------------------------


def test_a_failed_step_is_rolled_back_exactly_to_its_restore_point(
    project: snapfs.Project, root: Path
) -> None:
    first = writes("user/first.json", '{"a": 1}')
    breaks = mutates_then(lambda n: git_gone())
    op = scripted(project, first, breaks)
    with pytest.raises(OperationFailed) as info:
        run_operation(project, op, sleep=FakeSleep())
    err = info.value
    assert (err.step, err.diagnosis.code, err.rolled_back) == (1, "git.repo-gone", True)
    assert "back as it was before this step; the 1 step(s) before it are kept" in str(err)
    # The tree is exactly the step's restore point: step 1's file kept, step 2's changes gone.
    assert breaks.trees_at_start == [tree_state(root)]
    assert (root / "user/first.json").read_text() == '{"a": 1}'
    rec = load_operation(project, op)
    assert [(s.status, s.attempts) for s in rec.steps] == [("done", 1), ("rolled-back", 1)]
    assert rec.steps[1].checkpoint is not None
    # And that restore point is a snapshot of that very tree, taken as the step before it
    # ended (each step's post snapshot is the next one's restore point).
    cp = project.resolve(rec.steps[1].checkpoint)
    (first_txn,) = [t for t in project.state.txns() if t.status == "committed"]
    assert cp.kind == "pre-op" and cp.id == first_txn.post
    assert not project.diff(cp.id), project.diff(cp.id)
    assert breaks.runs == 1  # not retryable: tried once


# ---- one journal for the whole operation ---------------------------------------------------


def _spy_scans(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    from snapfs import _project

    seen: list[object] = []
    real = _project.scan

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("hint"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_project, "scan", spy)
    return seen


def test_one_journal_serves_every_step_and_checkpoint(
    project: snapfs.Project, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the restore point walks the tree: each step's checkpoint, each step's account and
    the post checkpoint read what changed since the previous mark of one journal."""
    from snapfs import _journal

    starts: list[str] = []

    def counted(real: Callable[..., int]) -> Callable[..., int]:
        def start(self: _journal.Journal, timeout: float = 5.0) -> int:
            starts.append(self.run)
            return real(self, timeout)

        return start

    # In threads or in a helper process (the default), whichever this machine gives.
    for cls in (_journal.Journal, ProcessJournal):
        monkeypatch.setattr(cls, "start", counted(cls.start))
    hints = _spy_scans(monkeypatch)
    op = scripted(
        project, writes("user/a.json", "1"), writes("models/b.txt", "2"), writes("c", "3")
    )
    res = run_operation(project, op)
    assert res.status == "done" and res.ran == 3
    assert len(starts) == 1
    assert hints[0] is None  # the restore point: a full walk
    assert hints[1:] and all(h is not None for h in hints[1:]), hints
    # What each step changed is still exact, and the journal's rows are gone with it.
    txns = sorted(
        (t for t in project.state.txns() if t.label and t.label.startswith("scripted: ")),
        key=lambda t: t.id,
    )
    added = [json.loads(t.changes or "{}")["added"] for t in txns]
    files = [[a for a in step if not a.endswith("/")] for step in added]  # new folders aside
    assert files == [["user/a.json"], ["models/b.txt"], ["c"]]
    (left,) = project.state.db.execute(
        "SELECT count(*) FROM journal WHERE run = ?", (starts[0],)
    ).fetchone()
    assert left == 0


def test_a_step_rolled_back_under_the_shared_journal_leaves_the_next_checkpoint_exact(
    project: snapfs.Project, root: Path
) -> None:
    """A failed step's rollback lands while the operation's journal keeps running; the retry's
    checkpoint must see the tree as the rollback left it, not as the failed attempt did."""
    calls: list[int] = []

    def run(ctx: StepContext, n: int) -> None:
        calls.append(n)
        mutate_tree(ctx.project.root)
        if n == 1:
            raise OSError(errno.ECONNRESET, "Connection reset by peer")

    flaky_retry = Script(run=run)
    op = scripted(project, writes("user/first.json", "1"), flaky_retry)
    run_operation(project, op, sleep=FakeSleep())
    assert calls == [1, 2]
    rec = load_operation(project, op)
    assert [s.status for s in rec.steps] == ["done", "done"]
    assert flaky_retry.trees_at_start[0] == flaky_retry.trees_at_start[1]
    # The step's restore point is the tree before its first attempt, exactly.
    cp = project.resolve(rec.steps[1].checkpoint)
    project.restore(cp.id)
    assert tree_state(root) == flaky_retry.trees_at_start[0]


@pytest.mark.parametrize("scope", [False, True], ids=["own journal", "shared journal"])
def test_a_sealed_model_written_in_place_is_named_in_the_warnings(
    root: Path, tmp_path: Path, scope: bool
) -> None:
    """A model stored as a sealed hardlink shares its inode with the snapshot; writing it in
    place damages the checkpoint's copy too, and the transaction says so by name."""
    write(root, "models/m.bin", os.urandom(3 << 20))
    with snapfs.init(root, hardlink_threshold=1 << 20, **fast(tmp_path)) as p:
        p.snapshot()
        assert p.store.seal_of(p.state.load_cache()[b"models/m.bin"].oid) is not None
        os.chmod(root / "models/m.bin", 0o644)  # the user undoes the seal
        with p.journal_scope() if scope else contextlib.nullcontext():
            tx = Transaction(p, "op")
            tx.begin()
            with open(root / "models/m.bin", "r+b") as f:
                f.write(b"overwritten")
            tx.commit()
    assert len(tx.warnings) == 1 and "models/m.bin was written in place" in tx.warnings[0]


def test_a_real_git_step_that_fails_after_cloning_is_rolled_back(
    root: Path, tmp_path: Path
) -> None:
    """The clone is moved into place, then its requirements can't be installed (the venv has
    no python): the clone must go, the earlier write must stay."""
    repo = make_repo(tmp_path / "repos/nodes", [{"n.py": "x = 1\n", "requirements.txt": "six\n"}])
    (root / "venv").mkdir()  # present, so the plan is valid, but not a working venv
    plan = write_plan(
        tmp_path / "plan.json",
        [
            write_step("user/wf.json", "{}"),
            git_step(repo, repo.shas[0], "custom_nodes/nodes", requirements="requirements.txt"),
        ],
        venv="venv",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=FakeSleep())
        assert info.value.diagnosis.code == "tool.missing"
        assert step_table(p, op) == [("done", 1), ("rolled-back", 1)]
        rec = load_operation(p, op)
        assert not (root / "custom_nodes").exists()
        assert (root / "user/wf.json").read_text() == "{}"
        assert not p.diff(rec.steps[1].checkpoint), p.diff(rec.steps[1].checkpoint)
        # Nothing of the clone is left in snapfs's own scratch space either.
        assert os.listdir(root / ".snapfs" / "tmp") == []


def test_on_failure_keep_keeps_the_partial_work(root: Path, tmp_path: Path) -> None:
    with snapfs.init(root, **fast(tmp_path, on_failure="keep")) as p:
        breaks = mutates_then(lambda n: git_gone())
        op = scripted(p, writes("k.txt", "kept"), breaks)
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=FakeSleep())
        err = info.value
        assert err.rolled_back is False
        assert "partial work was kept (on_failure = keep)" in str(err)
        expected = breaks.trees_at_start[0]
        # The partial state is the step's changes applied to its restore point.
        assert tree_state(root) != expected
        assert (root / "src/app.py").read_text() == "print('v2, broken')\n"
        assert (root / "added/deep/tree/n.bin").exists()
        assert step_table(p, op) == [("done", 1), ("failed", 1)]

    # The run's policy argument overrides the setting (here the default, rollback).
    def half(ctx: StepContext, n: int) -> None:
        write(ctx.project.root, "half/done.txt", "half")
        raise git_gone()

    with snapfs.init(root, **fast(tmp_path)) as p:
        op2 = scripted(p, Script(run=half))
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op2, policy="keep", sleep=FakeSleep())
        assert info.value.rolled_back is False
        assert (root / "half/done.txt").read_text() == "half"


# ---- resume ---------------------------------------------------------------------------------


def test_done_steps_are_verified_and_skipped_on_resume(project: snapfs.Project, root: Path) -> None:
    a, b = writes("a.txt", "A"), writes("b.txt", "B")
    c = mutates_then(lambda n: git_gone() if n == 1 else None)
    op = scripted(project, a, b, c)
    with pytest.raises(OperationFailed):
        run_operation(project, op, sleep=FakeSleep())
    assert (a.runs, b.runs, c.runs) == (1, 1, 1)
    found = resumable(project)
    assert found is not None and found.id == op
    events: list[OpEvent] = []
    res = run_operation(project, op, report=events.append, sleep=FakeSleep())
    assert (res.status, res.ran, res.skipped) == ("done", 1, 2)
    assert (a.runs, b.runs, c.runs) == (1, 1, 2)  # a and b verified, not redone
    assert a.verifies >= 2 and b.verifies >= 2
    skips = [e for e in events if e.kind == "skip"]
    assert [(e.step, e.message) for e in skips] == [
        (0, "step 1: still in place."),
        (1, "step 2: still in place."),
    ]
    assert step_table(project, op) == [("done", 1), ("done", 1), ("done", 1)]
    assert load_operation(project, op).status == "done"
    assert resumable(project) is None
    # A finished operation runs nothing again.
    again = run_operation(project, op, sleep=FakeSleep())
    assert (again.status, again.ran) == ("done", 0)
    assert (a.runs, b.runs, c.runs) == (1, 1, 2)


def test_a_step_whose_work_is_already_there_is_not_run(project: snapfs.Project, root: Path) -> None:
    write(root, "a.txt", "A")
    a = writes("a.txt", "A")
    op = scripted(project, a)
    events: list[OpEvent] = []
    res = run_operation(project, op, report=events.append)
    assert (res.ran, res.skipped, a.runs) == (0, 1, 0)
    assert [e.message for e in events if e.kind == "skip"] == ["step 1: already there."]
    assert step_table(project, op) == [("done", 0)]


def test_a_done_step_whose_work_was_removed_is_redone(
    root: Path, tmp_path: Path, srv: FaultServer
) -> None:
    """Real steps: a write and a download are done, the third step fails; the user deletes the
    written file and the model; resume redoes both (the model from the store, no bytes)."""
    blob = make_blob(1 * MiB)
    srv.add("/m.bin", blob.data)
    plan = write_plan(
        tmp_path / "plan.json",
        [
            write_step("user/wf.json", '{"v": 1}'),
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            download_step("models/late.bin", blob, srv.url("/late.bin"), sha256="0" * 64),
        ],
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=FakeSleep())
        assert info.value.diagnosis.code == "http.404"
        assert step_table(p, op) == [("done", 1), ("done", 1), ("rolled-back", 1)]
        (root / "user/wf.json").unlink()
        (root / "models/m.bin").unlink()
        srv.add("/late.bin", blob.data)
        # Make the third step succeed now: its expected digest is fixed in the stored plan.
        rec = load_operation(p, op)
        rec.plan["steps"][2]["sha256"] = blob.sha256
        with p.state.db:
            p.state.db.execute(
                "UPDATE operations SET plan = ? WHERE id = ?", (json.dumps(rec.plan), op)
            )
        srv.reset_stats()
        events: list[OpEvent] = []
        res = run_operation(p, op, report=events.append, sleep=FakeSleep())
        assert (res.status, res.ran, res.skipped) == ("done", 3, 0)
        redo = [e.message for e in events if "changed since it was done" in e.message]
        assert redo == [
            "write user/wf.json: changed since it was done; redoing it.",
            "download models/m.bin: changed since it was done; redoing it.",
        ]
        assert (root / "user/wf.json").read_text() == '{"v": 1}'
        assert sha_of(root / "models/m.bin") == blob.sha256
        assert sha_of(root / "models/late.bin") == blob.sha256
        # The store had both files' content: nothing was fetched again.
        assert srv.bytes_sent == 0


def test_a_done_git_step_whose_checkout_was_changed_is_redone(
    root: Path, tmp_path: Path, srv: FaultServer
) -> None:
    repo = make_repo(
        tmp_path / "repos/nodes", [{"a.py": "a = 1\n", "b.py": "b = 1\n"}, {"a.py": "a = 2\n"}]
    )
    blob = make_blob(64 * 1024)
    plan = write_plan(
        tmp_path / "plan.json",
        [
            git_step(repo, repo.shas[0], "custom_nodes/nodes"),
            download_step("models/m.bin", blob, srv.url("/m.bin")),
        ],
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        with pytest.raises(OperationFailed):
            run_operation(p, op, sleep=FakeSleep())  # 404: the model isn't there yet
        clone = root / "custom_nodes/nodes"
        (clone / "a.py").write_text("hacked\n")
        (clone / "b.py").unlink()
        srv.add("/m.bin", blob.data)
        res = run_operation(p, op, sleep=FakeSleep())
        assert res.status == "done"
        assert tracked_files(clone) == repo.files[0]


# ---- the whole operation --------------------------------------------------------------------


def test_rollback_operation_restores_the_pre_import_checkpoint(
    project: snapfs.Project, root: Path
) -> None:
    before = tree_state(root)
    op = scripted(
        project, writes("a.txt", "A"), writes("b.txt", "B"), mutates_then(lambda n: git_gone())
    )
    with pytest.raises(OperationFailed):
        run_operation(project, op, sleep=FakeSleep())
    assert (root / "a.txt").exists() and (root / "b.txt").exists()
    rec = load_operation(project, op)
    assert rec.checkpoint is not None
    assert project.resolve(rec.checkpoint).kind == "pre-import"
    assert rollback_operation(project, op) == rec.checkpoint
    assert tree_state(root) == before
    assert load_operation(project, op).status == "rolled-back"
    assert resumable(project) is None
    with pytest.raises(UsageError, match="was rolled back"):
        run_operation(project, op)
    # Work done since the rollback is not thrown away by a second one.
    write(root, "later.txt", "work done after the rollback")
    with pytest.raises(UsageError, match="already rolled back"):
        rollback_operation(project, op)
    assert (root / "later.txt").read_text() == "work done after the rollback"


def test_rollback_of_an_operation_that_never_started(project: snapfs.Project) -> None:
    op = scripted(project, writes("a.txt", "A"))
    with pytest.raises(UsageError, match="never started"):
        rollback_operation(project, op)
    assert load_operation(project, op).status == "pending"
    assert resumable(project) is not None


def test_ops_rollback_via_the_cli(root: Path, tmp_path: Path, srv: FaultServer) -> None:
    """snapfs ops / ops show -v / ops rollback -y, against an import that failed half-way."""
    before = tree_state(root)
    blob = make_blob(256 * 1024)
    srv.add("/m.bin", blob.data)
    plan = write_plan(
        tmp_path / "plan.json",
        [
            write_step("user/wf.json", "{}"),
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            download_step("models/bad.bin", blob, srv.url("/m.bin"), sha256="1" * 64),
        ],
        name="half way",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        with pytest.raises(OperationFailed):
            run_operation(p, op, sleep=FakeSleep())
    env = cli_env(tmp_path)
    r = run_cli("-C", str(root), "ops", env=env, input="")
    assert r.returncode == 0, r.stderr
    assert "failed" in r.stdout and "2/3" in r.stdout and "import: half way" in r.stdout
    r = run_cli("-C", str(root), "ops", "show", str(op), "-v", env=env, input="")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"Operation {op} (import: half way): failed; restore point")
    assert "1. done" in lines[1] and "2. done" in lines[2]
    assert "3. rolled-back download models/bad.bin x2" in lines[3]
    assert "hash.mismatch:" in r.stdout and "HashMismatch" in r.stdout  # -v: technical detail
    r = run_cli("-C", str(root), "ops", "--json", env=env, input="")
    rows = json.loads(r.stdout)
    assert [(o["id"], o["status"]) for o in rows] == [(op, "failed")]
    r = run_cli("-C", str(root), "ops", "rollback", str(op), "-y", env=env, input="")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Operation {op} rolled back" in r.stdout
    assert tree_state(root) == before
    rows = json.loads(run_cli("-C", str(root), "ops", "--json", env=env, input="").stdout)
    assert rows[0]["status"] == "rolled-back"
    r = run_cli("-C", str(root), "ops", "rollback", str(op), "-y", env=env, input="")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "already rolled back" in r.stderr


# ---- error history --------------------------------------------------------------------------


def test_error_history_counts_by_code(root: Path, tmp_path: Path) -> None:
    with snapfs.init(root, **fast(tmp_path, step_retries=2)) as p:
        resets = mutates_then(lambda n: ConnectionResetError(errno.ECONNRESET, "reset"))
        with pytest.raises(OperationFailed):
            run_operation(p, scripted(p, resets), sleep=FakeSleep())
        for _ in range(2):
            with pytest.raises(OperationFailed):
                run_operation(p, scripted(p, mutates_then(lambda n: git_gone())), sleep=FakeSleep())
        full = raises_on({1: OSError(errno.ENOSPC, "No space left on device")})
        with pytest.raises(OperationFailed):
            run_operation(p, scripted(p, full), sleep=FakeSleep())
        hist = error_history(p)
        assert [(e.code, e.category, e.count) for e in hist] == [
            ("net.reset", "network", 3),
            ("git.repo-gone", "dependency", 2),
            ("disk.full", "system", 1),
        ]
        assert all(e.message and e.last > 0 for e in hist)
        assert "disk is full" in hist[2].message
    env = cli_env(tmp_path)
    r = run_cli("-C", str(root), "errors", env=env, input="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "By category: dependency 2, network 3, system 1"
    assert "net.reset" in r.stdout and "git.repo-gone" in r.stdout
    rows = json.loads(run_cli("-C", str(root), "errors", "--json", env=env, input="").stdout)
    assert {row["code"]: row["count"] for row in rows} == {
        "net.reset": 3,
        "git.repo-gone": 2,
        "disk.full": 1,
    }


def test_disk_full_in_a_step_is_not_retried(project: snapfs.Project, root: Path) -> None:
    before = tree_state(root)

    def run(ctx: StepContext, n: int) -> None:
        mutate_tree(ctx.project.root)
        raise snapfs.DiskFull("Writing x stopped: the disk is full.")

    full = Script(run=run)
    op = scripted(project, full)
    sleep = FakeSleep()
    with pytest.raises(OperationFailed) as info:
        run_operation(project, op, sleep=sleep)
    d = info.value.diagnosis
    assert (d.code, d.retryable) == ("disk.full", True)
    assert [a.id for a in d.actions] == ["free-space", "resume"]
    assert full.runs == 1 and sleep.calls == []
    assert tree_state(root) == before
    assert step_table(project, op) == [("rolled-back", 1)]


# ---- restore points and retention -----------------------------------------------------------


def test_restore_points_survive_gc_and_auto_prune_while_the_operation_is_unfinished(
    root: Path, tmp_path: Path
) -> None:
    before = tree_state(root)
    with snapfs.init(root, **fast(tmp_path, auto_keep=1)) as p:
        first = writes("a.txt", "A")
        breaks = mutates_then(lambda n: git_gone())
        op = scripted(p, first, breaks)
        with pytest.raises(OperationFailed):
            run_operation(p, op, sleep=FakeSleep())
        rec = load_operation(p, op)
        kept = {rec.checkpoint, *(s.checkpoint for s in rec.steps)}
        # The first step starts on the operation's restore point (the same tree, not recorded
        # twice); the second on the first one's post snapshot.
        assert rec.steps[0].checkpoint == rec.checkpoint
        assert None not in kept and len(kept) == 2
        # Many automatic checkpoints later, with a retention of one (the op's restore point is
        # an automatic one too: kind pre-import)...
        for i in range(4):
            write(root, f"later/{i}.txt", str(i))
            snapfs.checkpoint(p, kind="auto")
        kinds = [s.kind for s in p.snapshots()]
        assert kinds.count("auto") == 1, kinds  # the retention did prune
        assert kept <= {s.id for s in p.snapshots()}
        # ... and a gc that keeps nothing but HEAD.
        p.snapshot("head")
        report = p.gc(keep_last=0)
        assert report.deleted_snapshots, "gc deleted nothing: the test proves nothing"
        assert set(report.deleted_snapshots) & kept == set()
        assert kept <= {s.id for s in p.snapshots()}
        assert p.verify().ok
        # The restore point still works, exactly.
        rollback_operation(p, op)
        assert tree_state(root) == before
        # Once the operation is over, its restore points are ordinary automatic ones.
        p.snapshot("new head")
        p.gc(keep_last=0)
        assert not kept & {s.id for s in p.snapshots()}, "the protection above proved nothing"


def test_cli_gc_keeps_the_restore_points_of_an_unfinished_operation(
    root: Path, tmp_path: Path
) -> None:
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = scripted(p, writes("a.txt", "A"), mutates_then(lambda n: git_gone()))
        with pytest.raises(OperationFailed):
            run_operation(p, op, sleep=FakeSleep())
        rec = load_operation(p, op)
    r = run_cli("-C", str(root), "gc", "--keep-last", "0", env=cli_env(tmp_path), input="")
    assert r.returncode == 0, r.stdout + r.stderr
    with snapfs.open(root, **fast(tmp_path)) as p:
        ids = {s.id for s in p.snapshots()}
        assert {rec.checkpoint, *(s.checkpoint for s in rec.steps)} <= ids


# ---- when undoing fails ---------------------------------------------------------------------


def _broken_rollback(self: Transaction, *, error: str | None = None) -> Any:
    raise OSError(errno.EIO, "Input/output error", "/dev/broken-disk")


def test_an_exception_inside_the_rollback_is_reported_and_the_operation_fails(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # journal=False: the patched rollback never stops a transaction's journal thread.
    with snapfs.init(root, **fast(tmp_path, journal=False)) as p:
        breaks = mutates_then(lambda n: git_gone())
        op = scripted(p, writes("a.txt", "A"), breaks)
        monkeypatch.setattr(Transaction, "rollback", _broken_rollback)
        with pytest.raises(OperationFailed) as info:
            run_operation(p, op, sleep=FakeSleep())
        monkeypatch.undo()
        err = info.value
        assert err.rolled_back is False
        assert err.diagnosis.code == "git.repo-gone"  # the step's own failure, not the undo's
        msg = str(err)
        assert "Undoing the step also failed (OSError: [Errno 5] Input/output error" in msg
        assert "'snapfs recover' will roll it back" in msg
        assert step_table(p, op) == [("done", 1), ("failed", 1)]
        assert load_operation(p, op).status == "failed"
        # The tree is the step's work, whole: nothing was half undone.
        partial = tree_state(root)
        assert partial != breaks.trees_at_start[0]
        assert (root / "src/app.py").read_text() == "print('v2, broken')\n"
        # The step's transaction is still open, so it can still be undone, exactly.
        open_txns = p.state.txns(status="open")
        assert len(open_txns) == 1
        [tx] = p._transactions
        tx.rollback(error="test")
        assert tree_state(root) == breaks.trees_at_start[0]


def test_an_exception_inside_the_rollback_before_a_retry_is_reported(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with snapfs.init(root, **fast(tmp_path, journal=False)) as p:
        resets = mutates_then(lambda n: ConnectionResetError(errno.ECONNRESET, "reset"))
        op = scripted(p, resets)
        monkeypatch.setattr(Transaction, "rollback", _broken_rollback)
        try:
            with pytest.raises(OperationFailed) as info:
                run_operation(p, op, sleep=FakeSleep())
        finally:
            monkeypatch.undo()
            for tx in list(p._transactions):
                tx.rollback(error="test cleanup")
        assert "Undoing the step also failed" in str(info.value)
        assert load_operation(p, op).status == "failed"


# ---- interruptions and concurrency ----------------------------------------------------------


def test_keyboard_interrupt_during_a_step_leaves_the_operation_resumable(
    project: snapfs.Project, root: Path
) -> None:
    first = writes("a.txt", "A")
    ctrl_c = mutates_then(lambda n: KeyboardInterrupt() if n == 1 else None)
    op = scripted(project, first, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_operation(project, op, sleep=FakeSleep())
    at_step = ctrl_c.trees_at_start[0]
    assert tree_state(root) == at_step  # the interrupted step was rolled back
    rec = load_operation(project, op)
    assert rec.status == "failed" and rec.error == {"code": "interrupted"}
    assert [(s.status, s.attempts) for s in rec.steps] == [("done", 1), ("pending", 1)]
    found = resumable(project)
    assert found is not None and found.id == op
    res = run_operation(project, op, sleep=FakeSleep())
    assert (res.status, res.ran, res.skipped) == ("done", 1, 1)
    assert first.runs == 1 and ctrl_c.runs == 2


def test_a_second_run_of_the_operation_gets_lock_busy(root: Path, tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def run(ctx: StepContext, n: int) -> None:
        write(ctx.project.root, "in-progress.txt", "x")
        started.set()
        assert release.wait(30), "the test never released the step"

    blocking = Script(run=run)
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = scripted(p, blocking)

    def first_run() -> None:
        try:
            with snapfs.open(root, **fast(tmp_path)) as p1:
                outcome.append(run_operation(p1, op, sleep=FakeSleep()))
        except BaseException as exc:  # reported to the main thread
            outcome.append(exc)

    t = threading.Thread(target=first_run, name="first-run")
    t.start()
    try:
        assert started.wait(30), "the first run never started its step"
        with snapfs.open(root, **fast(tmp_path)) as p2:
            with pytest.raises(LockBusy) as info:
                run_operation(p2, op, sleep=FakeSleep())
            assert "Another operation is running on this project" in str(info.value)
            assert info.value.owner.startswith(f"pid {os.getpid()}")
            # The refused run changed nothing: the first run's step is still the only one going.
            assert step_table(p2, op) == [("running", 1)]
            rec = load_operation(p2, op)
            assert rec.status == "running"
            # Nor may the operation be rolled back under the running one.
            with pytest.raises(LockBusy):
                rollback_operation(p2, op)
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].status == "done"
    assert blocking.runs == 1
