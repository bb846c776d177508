"""The panel's mutating actions, each run as a job: one library call plus progress reporting.

Each function here builds the job's body (a closure over the project and the request's
validated parameters); the API layer checks ids, takes the per-project slot and starts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from snapfs._download import DownloadProgress
from snapfs._ops import OpEvent, load_operation, run_operation, skip_step, undo_operation
from snapfs._scan import Progress

from ._inspect import human_bytes, partial_download, safe, what_of
from ._jobs import JobContext, JobFn
from ._registry import ProjectRef, Registry

# Where each phase of a restore sits on one 0-100 bar: reading the tree, staging, landing.
_RESTORE_PHASES = {"scan": (0.0, 10.0), "stage": (10.0, 60.0), "apply": (60.0, 100.0)}


def restore_progress(
    ctx: JobContext, phases: dict[str, tuple[float, float]]
) -> Callable[[Progress], None]:
    def report(ev: Progress) -> None:
        lo, hi = phases.get(ev.phase, (0.0, 100.0))
        if ev.total:
            pct = lo + (hi - lo) * min(ev.done, ev.total) / ev.total
            ctx.progress(pct, _phase_text(ev))
        else:
            ctx.progress(lo if ctx.job.percent is not None else None, _phase_text(ev))

    return report


def _phase_text(ev: Progress) -> str:
    if ev.phase == "scan":
        return f"Reading the project: {ev.done} files"
    if ev.phase == "stage":
        return f"Preparing files: {ev.done} of {ev.total}"
    if ev.phase == "apply":
        return f"Putting files in place: {ev.done} of {ev.total}"
    if ev.phase == "verify":
        return f"Checking stored data: {ev.done} of {ev.total}"
    return f"{ev.phase}: {ev.done}"


class OpProgress:
    """OpEvents -> one bar over all steps (a download step moves with its bytes), plus the raw
    event for the live log."""

    def __init__(self, ctx: JobContext, total: int) -> None:
        self.ctx = ctx
        self.total = max(total, 1)

    def __call__(self, ev: OpEvent) -> None:
        pct: float | None = None
        if ev.kind == "step" and ev.step is not None:
            pct = 100.0 * ev.step / self.total
        elif ev.kind == "skip" and ev.step is not None:
            pct = 100.0 * (ev.step + 1) / self.total
        elif ev.kind == "progress" and ev.step is not None:
            done, size = ev.data.get("done"), ev.data.get("total")
            if isinstance(done, int) and isinstance(size, int) and size > 0:
                pct = 100.0 * (ev.step + min(done, size) / size) / self.total
        elif ev.kind == "done":
            pct = 100.0
        self.ctx.progress(pct if pct is not None else self.ctx.job.percent, safe(ev.message))
        data = {k: v for k, v in ev.data.items() if k in ("done", "total", "code", "message")}
        self.ctx.event(
            "op",
            {
                "op": ev.op,
                "kind": ev.kind,
                "message": safe(ev.message),
                "step": ev.step,
                "total": self.total,
                "data": data,
            },
        )


def resume_op(registry: Registry, ref: ProjectRef, op: int) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref, writer=True) as p:
            rec = load_operation(p, op)
            ctx.progress(
                100.0 * sum(s.status == "done" for s in rec.steps) / max(len(rec.steps), 1)
            )
            res = run_operation(p, op, report=OpProgress(ctx, len(rec.steps)))
            what = what_of(rec)
        msg = f"{what} finished: {res.ran} step(s) run, {res.skipped} already done"
        msg += f", {res.retries} retried." if res.retries else "."
        return {"message": msg, "op": op, "status": res.status, "checkpoint": res.checkpoint}

    return run


def rollback_op(registry: Registry, ref: ProjectRef, op: int) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref, writer=True) as p:
            rec = load_operation(p, op)
            res = undo_operation(p, op, progress=restore_progress(ctx, _RESTORE_PHASES))
            cp, pre = res.target, res.pre_restore
        msg = f"{what_of(rec)} was undone: the project is as it was at snapshot {cp}."
        if pre is not None:
            msg += f" The state before the rollback is saved as snapshot {pre}."
        return {"message": msg, "op": op, "snapshot": cp, "pre_restore": pre}

    return run


def skip_op(registry: Registry, ref: ProjectRef, op: int, step: int | None) -> JobFn:
    """Skip step ``step`` (1-based; None: the one it stopped at), then run the rest."""

    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref, writer=True) as p:
            skipped = skip_step(p, op, None if step is None else step - 1)
            rec = load_operation(p, op)
            ctx.progress(
                100.0
                * sum(s.status in ("done", "skipped") for s in rec.steps)
                / max(len(rec.steps), 1),
                f"Skipped step {skipped.index + 1} ({safe(skipped.name)})",
            )
            res = run_operation(p, op, report=OpProgress(ctx, len(rec.steps)))
            what = what_of(rec)
        done = ", ".join(str(i + 1) for i in res.skipped_steps)
        msg = f"{what} finished without step(s) {done}: {res.ran} step(s) run."
        return {
            "message": msg,
            "op": op,
            "status": res.status,
            "checkpoint": res.checkpoint,
            "post": res.post,
            "skipped": [i + 1 for i in res.skipped_steps],
        }

    return run


def apply_fix(registry: Registry, ref: ProjectRef, issue: str, fix: str) -> JobFn:
    """Any other fix the library's doctor offers, applied by problem and fix id."""

    def run(ctx: JobContext) -> dict[str, Any]:
        from snapfs._doctor import apply_fix as doctor_fix

        # Not a recovering open: that would apply the crash policy before the fix could choose.
        with registry.open(ref, writer=True, recover=False) as p:
            ctx.progress(None, "Applying the fix")
            res = doctor_fix(p, issue, fix, progress=restore_progress(ctx, _RESTORE_PHASES))
        return {"message": res.message, "changed": res.changed, **res.data}

    return run


def restore(registry: Registry, ref: ProjectRef, sid: int | None, *, verb: str) -> JobFn:
    """``restore``/``rollback`` to ``sid`` (None: the latest checkpoint)."""

    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref, writer=True) as p:
            progress = restore_progress(ctx, _RESTORE_PHASES)
            res = (
                p.rollback(sid, progress=progress)
                if sid is None
                else p.restore(sid, progress=progress)
            )
            label = next((s.label for s in p.snapshots() if s.id == res.target), "")
        named = f"snapshot {res.target}" + (f" ({safe(label)})" if label else "")
        if not res.changed:
            msg = f"The project already matched {named}; nothing changed."
        else:
            msg = f"{verb.capitalize()} to {named}: {res.changed} change(s) applied."
        if res.pre_restore is not None and res.changed:
            msg += f" Your previous state is saved as snapshot {res.pre_restore}."
        return {
            "message": msg,
            "snapshot": res.target,
            "pre_restore": res.pre_restore,
            "changed": res.changed,
        }

    return run


def recover(registry: Registry, ref: ProjectRef, *, keep: bool) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        # Not a writer open: that would apply the crash policy before 'keep' could say no.
        with registry.open(ref, writer=True, recover=False) as p:
            ctx.progress(None, "Finishing interrupted work")
            text = p.recover(keep=keep, progress=restore_progress(ctx, _RESTORE_PHASES))
        return {"message": safe(" ".join(text.split("\n")))}

    return run


def resume_download(registry: Registry, ref: ProjectRef, key: str) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        from snapfs._doctor import resume_partial

        with registry.open(ref, writer=True) as p:
            d = partial_download(p, key)
            if d is None:
                from snapfs._errors import UsageError

                raise UsageError("That download is no longer waiting: it finished or was removed.")

            def progress(ev: DownloadProgress) -> None:
                pct = 100.0 * ev.done / ev.total if ev.total else None
                text = ev.message or (
                    f"{safe(d.dest)}: {ev.phase}, {human_bytes(ev.done)} of {human_bytes(ev.total)}"
                )
                ctx.progress(pct, text)
                ctx.event("download", {"key": key, "done": ev.done, "total": ev.total})

            message = resume_partial(p, d, progress)
        return {"message": message, "dest": safe(d.dest)}

    return run


def verify(registry: Registry, ref: ProjectRef, store: Callable[[Any], None]) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref) as p:
            ctx.progress(None, "Checking stored data")
            report = p.verify(progress=restore_progress(ctx, {"verify": (0.0, 100.0)}))
        store(report)
        if report.ok:
            msg = f"No problems: checked {report.objects} objects and {report.trees} trees."
        else:
            msg = f"Found {len(report.problems)} problem(s) in {report.objects} objects."
        return {"message": msg, "ok": report.ok, "problems": len(report.problems)}

    return run


def snapshot(registry: Registry, ref: ProjectRef, label: str) -> JobFn:
    def run(ctx: JobContext) -> dict[str, Any]:
        with registry.open(ref, writer=True) as p:
            ctx.progress(None, "Reading the project")
            info = p.snapshot(label, progress=restore_progress(ctx, {"scan": (0.0, 100.0)}))
        return {
            "message": f"Saved snapshot {info.id}: {info.files} files, "
            f"{human_bytes(info.new_bytes)} new.",
            "snapshot": info.id,
        }

    return run
