"""Operations: named sequences of persisted steps that finish, resume, or roll back cleanly.

An operation (a workflow import, say) is recorded in ``project.db`` with its plan, so any later
process can pick it up. Running it::

    restore point        a snapshot of kind pre-import before the first step
    for each step:
        done before?     verify() it is still done; skip it if so
        already done?    verify() says the work is there (idempotent steps): skip it
        run it           inside a transaction: the step's own restore point, its exact changes
        on failure       classify the error, then in this order:
                           retryable (network, busy)  -> roll the step back, back off, retry
                           a known fix for it          -> roll back, apply the fix, retry
                           otherwise                   -> roll the step back (policy "rollback")
                                                          or keep its partial work ("keep"),
                                                          and stop with a guided message
    done                 a post checkpoint (kind post) records the result, and a summary
                         transaction (checkpoint -> post) shows in 'snapfs log' what the
                         whole operation changed; the operation is marked done, or
                         done-with-skips if the user skipped a step (skip_step)

A killed process leaves the operation ``running`` with a dead owner and the step's transaction
open. The next snapfs command rolls that transaction back (the crash policy), and
``snapfs resume`` continues from the first unfinished step. Partial downloads live under
``.snapfs/downloads``, which no rollback touches, so their verified chunks are resumed.

Recovery never loops (every retry and fix is counted, and download hosts have circuit
breakers) and never makes things worse: if undoing a step fails, the error says so and the
open transaction is rolled back by ``snapfs recover``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._crash import crash_point
from ._errors import Category, LockBusy, SnapfsError, UsageError
from ._lock import Lock
from ._retry import RetryPolicy
from ._scan import ProgressFn, no_progress
from ._txn import Owner, Transaction

if TYPE_CHECKING:
    from ._classify import Diagnosis
    from ._project import Project, RestoreResult


# Retryable, but not by waiting: the user has to act first (free space), then resume.
NEEDS_USER = frozenset({"disk.full"})

# An operation that finished: every step done, or some skipped on the user's request.
DONE = "done"
DONE_WITH_SKIPS = "done-with-skips"
FINISHED = (DONE, DONE_WITH_SKIPS)


# ---- steps ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpEvent:
    """Something an operation did, for a progress display (CLI, web panel)."""

    op: int
    kind: str  # checkpoint, step, skip, retry, fix, rollback, failed, done, progress
    message: str
    step: int | None = None  # 0-based index
    total: int = 0  # number of steps
    data: dict[str, Any] = field(default_factory=dict)


def _no_events(_: OpEvent) -> None:
    pass


@dataclass
class StepContext:
    """What a running step may use."""

    project: Project
    op: int
    index: int
    attempt: int
    report: Callable[[OpEvent], None]

    def say(self, message: str, **data: Any) -> None:
        self.report(OpEvent(self.op, "progress", message, self.index, data=data))


class Step:
    """One idempotent unit of an operation. Subclasses implement :meth:`run`."""

    kind = "step"
    major = True  # a restore point before it (every step runs in a transaction)

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def verify(self, ctx: StepContext) -> bool:
        """Is the step's work already there? Then it is not run (again)."""
        return False

    def compensate(self, ctx: StepContext) -> None:
        """Undo effects outside the project after the step was rolled back (the project's
        own files are restored by the rollback). Default: nothing to undo."""

    def fix(self, ctx: StepContext, diagnosis: Diagnosis) -> str | None:
        """Apply a known fix for a validation failure; return what was done, or None."""
        return None


StepsFor = Callable[[dict[str, Any]], Sequence[Step]]
_BUILDERS: dict[str, StepsFor] = {}


def register_kind(kind: str, build: StepsFor) -> None:
    """Teach snapfs to rebuild the steps of operations of ``kind`` from their stored plan."""
    _BUILDERS[kind] = build


# ---- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRecord:
    index: int
    name: str
    kind: str
    status: str  # pending, running, done, failed, rolled-back, skipped
    attempts: int
    checkpoint: int | None
    seconds: float
    error: dict[str, Any] | None


@dataclass(frozen=True)
class OperationRecord:
    id: int
    kind: str
    label: str
    status: str  # pending, running, done, done-with-skips, failed, rolled-back
    checkpoint: int | None
    owner: str
    created: float
    updated: float
    error: dict[str, Any] | None
    steps: tuple[StepRecord, ...]
    plan: dict[str, Any]
    post: int | None = None  # the post checkpoint taken when it finished

    @property
    def failed_step(self) -> StepRecord | None:
        return next((s for s in self.steps if s.status in ("failed", "rolled-back")), None)

    @property
    def next_step(self) -> StepRecord | None:
        """The step a resume starts at: the failed one, else the first not done or skipped."""
        failed = self.failed_step
        if failed is not None:
            return failed
        return next((s for s in self.steps if s.status not in ("done", "skipped")), None)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("plan")
        return d


def create_operation(project: Project, kind: str, label: str, plan: dict[str, Any]) -> int:
    """Record a new operation (nothing runs yet). Its steps are built from ``plan`` now, so a
    plan that can't be turned into steps is refused before anything changes."""
    steps = _build(kind, plan)
    now = time.time()
    db = project.state.db
    with db:
        cur = db.execute(
            "INSERT INTO operations (kind, label, plan, status, created, updated)"
            " VALUES (?, ?, ?, 'pending', ?, ?)",
            (kind, label, json.dumps(plan), now, now),
        )
        op = int(cur.lastrowid or 0)
        db.executemany(
            "INSERT INTO op_steps (op, idx, name, kind, status) VALUES (?, ?, ?, ?, 'pending')",
            [(op, i, s.name, s.kind) for i, s in enumerate(steps)],
        )
    return op


def _build(kind: str, plan: dict[str, Any]) -> Sequence[Step]:
    if kind not in _BUILDERS:
        import importlib

        importlib.import_module("snapfs._import")  # registers "import" (a new process resuming)
    build = _BUILDERS.get(kind)
    if build is None:
        raise UsageError(f"Unknown operation kind {kind!r}.")
    return build(plan)


def load_operation(project: Project, op: int) -> OperationRecord:
    db = project.state.db
    row = db.execute(
        "SELECT id, kind, label, status, checkpoint, owner, created, updated, error, plan, post"
        " FROM operations WHERE id = ?",
        (op,),
    ).fetchone()
    if row is None:
        raise UsageError(f"No operation {op}.", hint="'snapfs ops' lists them.")
    steps = tuple(
        StepRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]) if r[7] else None)
        for r in db.execute(
            "SELECT idx, name, kind, status, attempts, checkpoint, seconds, error FROM op_steps"
            " WHERE op = ? ORDER BY idx",
            (op,),
        )
    )
    return OperationRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        json.loads(row[8]) if row[8] else None,
        steps,
        json.loads(row[9]),
        row[10],
    )


def list_operations(project: Project, limit: int | None = None) -> list[OperationRecord]:
    q = "SELECT id FROM operations ORDER BY id DESC"
    if limit is not None:
        q += f" LIMIT {int(limit)}"
    return [load_operation(project, r[0]) for r in project.state.db.execute(q).fetchall()]


def resumable(project: Project) -> OperationRecord | None:
    """The newest operation that is not finished: failed, interrupted, or never started."""
    for op in list_operations(project, limit=20):
        if op.status in ("pending", "failed") or (
            op.status == "running" and not _owner_alive(op.owner)
        ):
            return op
    return None


def _owner_alive(owner: str) -> bool:
    try:
        return Owner.parse(owner).alive()
    except (ValueError, KeyError, TypeError):
        return False


def _set_op(project: Project, op: int, **cols: Any) -> None:
    cols["updated"] = time.time()
    sets = ", ".join(f"{k} = ?" for k in cols)
    with project.state.db:
        project.state.db.execute(f"UPDATE operations SET {sets} WHERE id = ?", (*cols.values(), op))


def _set_step(project: Project, op: int, idx: int, **cols: Any) -> None:
    sets = ", ".join(f"{k} = ?" for k in cols)
    with project.state.db:
        project.state.db.execute(
            f"UPDATE op_steps SET {sets} WHERE op = ? AND idx = ?", (*cols.values(), op, idx)
        )


def record_error(
    project: Project, diagnosis: Diagnosis, *, op: int | None = None, step: int | None = None
) -> None:
    """Add a failure to the project's error history (``snapfs errors``). Best effort: with the
    disk full, the history is what gives way, not the recovery."""
    try:
        _record_error(project, diagnosis, op, step)
    except (sqlite3.Error, SnapfsError, OSError):
        pass


def _record_error(project: Project, diagnosis: Diagnosis, op: int | None, step: int | None) -> None:
    with project.state.db:
        project.state.db.execute(
            "INSERT INTO errors (at, op, step, category, code, retryable, message, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(),
                op,
                step,
                diagnosis.category.value,
                diagnosis.code,
                int(diagnosis.retryable),
                diagnosis.message,
                diagnosis.detail,
            ),
        )


@dataclass(frozen=True)
class ErrorStats:
    code: str
    category: str
    count: int
    last: float
    message: str


def error_history(project: Project) -> list[ErrorStats]:
    """Failures by code, most frequent first."""
    rows = project.state.db.execute(
        "SELECT code, category, COUNT(*), MAX(at),"
        " (SELECT message FROM errors e2 WHERE e2.code = e.code ORDER BY at DESC LIMIT 1)"
        " FROM errors e GROUP BY code ORDER BY COUNT(*) DESC, MAX(at) DESC"
    ).fetchall()
    return [ErrorStats(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def _diag_dict(d: Diagnosis) -> dict[str, Any]:
    return {
        "category": d.category.value,
        "code": d.code,
        "retryable": d.retryable,
        "message": d.message,
        "detail": d.detail,
        "actions": [{"id": a.id, "label": a.label} for a in d.actions],
    }


# ---- failure --------------------------------------------------------------------------------
class OperationFailed(SnapfsError):
    """An operation stopped at a step. Carries the diagnosis and what state the project is in."""

    def __init__(
        self,
        message: str,
        *,
        op: int,
        step: int,
        step_name: str,
        diagnosis: Diagnosis,
        rolled_back: bool,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.op = op
        self.step = step
        self.step_name = step_name
        self.diagnosis = diagnosis
        self.rolled_back = rolled_back
        self.category = diagnosis.category
        self.retryable = diagnosis.retryable


@dataclass(frozen=True)
class OpResult:
    id: int
    status: str  # done, or done-with-skips
    ran: int  # steps run this time
    skipped: int  # steps found done
    retries: int
    checkpoint: int | None
    seconds: float
    post: int | None = None  # the post checkpoint: the project as the operation left it
    skipped_steps: tuple[int, ...] = ()  # 0-based indexes of the steps skipped on request


# ---- running --------------------------------------------------------------------------------
def run_operation(
    project: Project,
    op: int,
    *,
    report: Callable[[OpEvent], None] = _no_events,
    retries: int | None = None,
    policy: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> OpResult:
    """Run (or resume) operation ``op`` from its first unfinished step."""
    retries = project.config.step_retries if retries is None else retries
    policy = project.config.on_failure if policy is None else policy
    lock = Lock(project.state_dir / "operation.lock", "operation")
    try:
        lock.acquire(wait=False, purpose=f"operation {op}")
    except LockBusy as exc:
        raise LockBusy(
            "Another operation is running on this project.",
            owner=exc.owner,
            hint="Wait for it to finish, or check it with 'snapfs ops'.",
        ) from exc
    try:
        return _Runner(project, op, report, retries, policy, sleep).run()
    finally:
        lock.release()


class _Runner:
    def __init__(
        self,
        project: Project,
        op: int,
        report: Callable[[OpEvent], None],
        retries: int,
        policy: str,
        sleep: Callable[[float], None],
    ) -> None:
        self.project = project
        self.op = op
        self.report = report
        self.retries = retries
        self.policy = policy
        self.sleep = sleep
        c = project.config
        self.backoff = RetryPolicy(
            base=c.retry_base, cap=c.retry_cap, retry_after_max=c.retry_after_max
        )
        self.retried = 0

    def run(self) -> OpResult:
        p, op = self.project, self.op
        rec = load_operation(p, op)
        if rec.finished:
            gone = tuple(s.index for s in rec.steps if s.status == "skipped")
            done = len(rec.steps) - len(gone)
            return OpResult(op, rec.status, 0, done, 0, rec.checkpoint, 0.0, rec.post, gone)
        if rec.status == "rolled-back":
            raise UsageError(
                f"Operation {op} was rolled back; start it again instead of resuming it."
            )
        steps = _build(rec.kind, rec.plan)
        if len(steps) != len(rec.steps):
            raise UsageError(f"Operation {op}'s stored plan no longer matches its steps.")
        t0 = time.monotonic()
        _set_op(p, op, status="running", owner=Owner.current().dumps(), error=None)
        # One journal for the whole operation: after the restore point, every step's
        # checkpoint and the post checkpoint read only what changed since the one before.
        with p.journal_scope():
            return self._run(rec, steps, t0)

    def _run(self, rec: OperationRecord, steps: Sequence[Step], t0: float) -> OpResult:
        p, op = self.project, self.op
        checkpoint = rec.checkpoint
        if checkpoint is None:
            info = p.snapshot(f"before {rec.label or rec.kind}", kind="pre-import")
            checkpoint = info.id
            crash_point("op.checkpoint_taken")
            _set_op(p, op, checkpoint=checkpoint)
            self.report(
                OpEvent(op, "checkpoint", f"Restore point: snapshot {info.id}.", total=len(steps))
            )
        ran = skipped = 0
        skips: list[int] = []
        try:
            for idx, (step, srec) in enumerate(zip(steps, rec.steps, strict=True)):
                ctx = StepContext(p, op, idx, 0, self.report)
                if srec.status == "skipped":  # the user chose to go on without it
                    skips.append(idx)
                    self.report(
                        OpEvent(op, "skip", f"{step.name}: skipped, as you asked.", idx, len(steps))
                    )
                    continue
                if self._already_done(step, srec, ctx, len(steps)):
                    skipped += 1
                    continue
                then = steps[idx + 1] if idx + 1 < len(steps) else None
                self._run_step(step, ctx, len(steps), rec.label or rec.kind, then)
                ran += 1
        except KeyboardInterrupt:
            _set_op(p, op, status="failed", error=json.dumps({"code": "interrupted"}))
            raise
        status = DONE_WITH_SKIPS if skips else DONE
        post = self._finish(rec, checkpoint)
        _set_op(p, op, status=status, post=post)
        what = (
            f"Done; skipped step(s) {', '.join(str(i + 1) for i in skips)}." if skips else "Done."
        )
        self.report(OpEvent(op, "done", what, total=len(steps), data={"post": post}))
        return OpResult(
            op,
            status,
            ran,
            skipped,
            self.retried,
            checkpoint,
            time.monotonic() - t0,
            post,
            tuple(skips),
        )

    def _finish(self, rec: OperationRecord, checkpoint: int) -> int:
        """The post checkpoint, and the whole operation as one committed transaction from its
        restore point to it, so 'snapfs log' shows what the operation changed.

        A crash between the snapshot and the operation's record leaves the operation running
        with a dead owner; resuming it verifies every step and takes the post checkpoint again
        (one redundant snapshot, nothing lost)."""
        from ._diff import change_set

        p = self.project
        what = rec.label or rec.kind
        info = p.snapshot(f"after {what}", kind="post")
        crash_point("op.post_taken")
        pre = p.state.snapshot(checkpoint)
        post = p.state.snapshot(info.id)
        if pre is not None and post is not None:
            changed = change_set(p.state.tree, pre.root, post.root)
            p.state.record_txn(
                label=f"{rec.kind} {what}" if rec.label else rec.kind,
                checkpoint=checkpoint,
                post=info.id,
                owner=Owner.current().dumps(),
                started=rec.created,
                changes=json.dumps(changed.to_dict()),
            )
        return info.id

    def _already_done(self, step: Step, srec: StepRecord, ctx: StepContext, total: int) -> bool:
        try:
            done = step.verify(ctx)
        except Exception:  # a verify that can't tell means "not done": the step is idempotent
            done = False
        if done:
            if srec.status != "done":
                _set_step(self.project, self.op, ctx.index, status="done", ended=time.time())
            what = "still in place" if srec.status == "done" else "already there"
            self.report(OpEvent(self.op, "skip", f"{step.name}: {what}.", ctx.index, total))
            return True
        if srec.status == "done":
            self.report(
                OpEvent(
                    self.op,
                    "progress",
                    f"{step.name}: changed since it was done; redoing it.",
                    ctx.index,
                    total,
                )
            )
        return False

    def _run_step(
        self, step: Step, ctx: StepContext, total: int, label: str, then: Step | None
    ) -> None:
        """Run one step in a transaction; ``then`` is the step after it, if any."""
        p, op, idx = self.project, self.op, ctx.index
        fixes: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            ctx.attempt = attempt
            started = time.time()
            _set_step(p, op, idx, status="running", started=started, attempts=attempt)
            self.report(OpEvent(op, "step", f"Step {idx + 1}/{total}: {step.name}", idx, total))
            # Chained: a step's post snapshot is the next one's restore point (one snapshot per
            # step, and a change set that is the diff of two trees, not another walk). The last
            # step's result is the operation's post checkpoint, taken at the end.
            tx = Transaction(
                p,
                f"{label}: {step.name}",
                post_snapshot=then is not None,
                reuse_head=True,
                post_kind="pre-op",
                post_label=f"before {label}: {then.name}" if then is not None else "",
            )
            tx.begin()
            crash_point("op.step_began")
            if attempt == 1 and tx.checkpoint is not None:
                _set_step(p, op, idx, checkpoint=tx.checkpoint.id)
            try:
                step.run(ctx)
            except KeyboardInterrupt:
                self._undo(tx, "interrupted", step, ctx)
                _set_step(p, op, idx, status="pending", ended=time.time())
                raise
            except Exception as exc:
                from ._classify import classify

                diag = classify(exc, context=step.name)
                record_error(p, diag, op=op, step=idx)
                if diag.retryable and diag.code not in NEEDS_USER and attempt <= self.retries:
                    self._try_undo(tx, diag.code, step, ctx, diag, exc, total)
                    delay = self.backoff.wait_for(attempt, diag.retry_after)
                    self.retried += 1
                    self.report(
                        OpEvent(
                            op,
                            "retry",
                            f"{diag.message} Retrying in {delay:.0f} s"
                            f" (attempt {attempt + 1} of {self.retries + 1}).",
                            idx,
                            total,
                        )
                    )
                    self.sleep(delay)
                    continue
                if diag.category == Category.VALIDATION and diag.code not in fixes:
                    fixes.add(diag.code)
                    self._try_undo(tx, diag.code, step, ctx, diag, exc, total)
                    try:
                        done = step.fix(ctx, diag)
                    except Exception:
                        done = None  # a fix that fails is no fix; report the original error
                    if done:
                        self.report(OpEvent(op, "fix", f"{step.name}: {done}", idx, total))
                        continue
                    tx = None  # type: ignore[assignment]
                self._give_up(step, ctx, tx, diag, exc, total)
            else:
                crash_point("op.step_ran")
                tx.commit()
                crash_point("op.step_committed")
                _set_step(
                    p,
                    op,
                    idx,
                    status="done",
                    ended=time.time(),
                    error=None,
                    seconds=time.time() - started,
                )
                return

    def _try_undo(
        self,
        tx: Transaction,
        why: str,
        step: Step,
        ctx: StepContext,
        diag: Diagnosis,
        exc: BaseException,
        total: int,
    ) -> None:
        """Roll the step back before a retry or a fix; if that fails, stop with both errors."""
        try:
            self._undo(tx, why, step, ctx)
        except Exception as undo:
            self._give_up(step, ctx, tx, diag, exc, total, undo_failed=undo)

    def _undo(
        self,
        tx: Transaction | None,
        why: str,
        step: Step | None = None,
        ctx: StepContext | None = None,
    ) -> None:
        if tx is not None and tx.status == "open":
            tx.rollback(error=why)
        if step is not None and ctx is not None:
            step.compensate(ctx)

    def _give_up(
        self,
        step: Step,
        ctx: StepContext,
        tx: Transaction | None,
        diag: Diagnosis,
        exc: BaseException,
        total: int,
        undo_failed: BaseException | None = None,
    ) -> None:
        p, op, idx = self.project, self.op, ctx.index
        rolled_back = undo_failed is None
        undo_error = f"{type(undo_failed).__name__}: {undo_failed}" if undo_failed else ""
        if undo_failed is None and tx is not None and tx.status == "open":
            try:
                if self.policy == "keep":
                    tx.commit()
                    rolled_back = False
                else:
                    tx.rollback(error=diag.code)
                    step.compensate(ctx)
            except Exception as undo:  # recovery must not crash: say what failed and stop
                undo_error = f"{type(undo).__name__}: {undo}"
                rolled_back = False
        status = "rolled-back" if rolled_back else "failed"
        try:
            _set_step(
                p, op, idx, status=status, ended=time.time(), error=json.dumps(_diag_dict(diag))
            )
            _set_op(p, op, status="failed", error=json.dumps(_diag_dict(diag)))
        except (sqlite3.Error, SnapfsError):
            pass  # a full disk: the row stays "running" with a dead owner, resumable all the same
        self.report(OpEvent(op, "failed", diag.message, idx, total, data=_diag_dict(diag)))
        if undo_error:
            state = (
                f"Undoing the step also failed ({undo_error}); 'snapfs recover' will roll it back."
            )
        elif rolled_back:
            state = "The project is back as it was before this step"
            state += f"; the {idx} step(s) before it are kept." if idx else "."
        else:
            state = "The step's partial work was kept (on_failure = keep)."
        raise OperationFailed(
            f"Step {idx + 1} of {total} ({step.name}) failed: {diag.message} {state}",
            op=op,
            step=idx,
            step_name=step.name,
            diagnosis=diag,
            rolled_back=rolled_back,
        ) from exc


def rollback_operation(project: Project, op: int, *, progress: ProgressFn = no_progress) -> int:
    """Undo a whole operation: restore its pre-operation restore point. Returns that id."""
    return undo_operation(project, op, progress=progress).target


def undo_operation(
    project: Project, op: int, *, progress: ProgressFn = no_progress
) -> RestoreResult:
    """:func:`rollback_operation`, returning the restore's result (its ``pre_restore`` holds
    the state that was left, so the rollback itself can be undone)."""
    rec = load_operation(project, op)
    if rec.checkpoint is None:
        raise UsageError(f"Operation {op} never started; there is nothing to undo.")
    if rec.status == "running" and _owner_alive(rec.owner):
        raise LockBusy(f"Operation {op} is still running.", owner=rec.owner)
    if rec.status == "rolled-back":
        # Again would throw away whatever was done since, for nothing the user asked for.
        raise UsageError(
            f"Operation {op} was already rolled back; nothing to undo.",
            hint=f"To go back to its restore point anyway: snapfs restore {rec.checkpoint}",
        )
    res = project.restore(rec.checkpoint, progress=progress)
    _set_op(project, op, status="rolled-back")
    return res


def skip_step(project: Project, op: int, index: int | None = None) -> StepRecord:
    """Mark step ``index`` (0-based; default: the step the operation stopped at) of a failed or
    interrupted operation as ``skipped``, so that :func:`resume` continues after it.

    Nothing on disk changes: a step that failed was rolled back already (or, with
    ``on_failure = keep``, its partial work stays). The operation ends as ``done-with-skips``.
    Skipping a step that is already skipped does nothing, so this is safe to repeat.
    """
    from ._txn import dead_transactions

    rec = load_operation(project, op)
    total = len(rec.steps)
    if index is not None and not 0 <= index < total:
        raise UsageError(f"Operation {op} has steps 1-{total}; there is no step {index + 1}.")
    if index is not None and rec.steps[index].status == "skipped":
        return rec.steps[index]
    if rec.status == "running" and _owner_alive(rec.owner):
        raise LockBusy(f"Operation {op} is running; wait for it to stop first.", owner=rec.owner)
    if rec.status in FINISHED:
        raise UsageError(f"Operation {op} already finished; there is nothing to skip.")
    if rec.status == "rolled-back":
        raise UsageError(f"Operation {op} was rolled back; there is nothing to skip.")
    nxt = rec.next_step
    if index is None:
        if nxt is None:
            raise UsageError(f"Operation {op} has no unfinished step to skip.")
        index = nxt.index
    if nxt is None or nxt.index != index:
        where = f"step {nxt.index + 1}" if nxt is not None else "no step"
        raise UsageError(
            f"Only the step operation {op} stopped at ({where}) can be skipped, not step"
            f" {index + 1}."
        )
    if dead_transactions(project.state.txns(status="open")):
        # The interrupted step's changes are still on disk; undo them before going past it.
        raise UsageError(
            "An interrupted step's changes are still open.",
            hint="Run 'snapfs recover' first, then skip the step.",
        )
    _set_step(project, op, index, status="skipped", ended=time.time())
    _set_op(project, op, status="failed" if rec.status == "running" else rec.status)
    return load_operation(project, op).steps[index]


def resume(
    project: Project, op: int | None = None, *, report: Callable[[OpEvent], None] = _no_events
) -> OpResult:
    """Continue operation ``op`` (default: the newest unfinished one) from its first
    unfinished step. Steps already done are verified, not redone."""
    if op is None:
        rec = resumable(project)
        if rec is None:
            raise UsageError("Nothing to resume: every operation finished or was rolled back.")
        op = rec.id
    return run_operation(project, op, report=report)
