"""Rendering for the CLI: tables, change lists, plans and a progress line on terminals."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from snapfs._config import human_bytes

if TYPE_CHECKING:
    from snapfs import Changes, Progress, SnapshotInfo
    from snapfs._download import DownloadProgress
    from snapfs._restore import Op
    from snapfs._scan import ProgressFn


def safe(text: str) -> str:
    """Printable form of text that may hold undecodable bytes of a file name (PEP 383)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def print_snapshots(snaps: Sequence[SnapshotInfo], head: int | None) -> None:
    if not snaps:
        click.echo("No snapshots yet. Take one with 'snapfs snapshot'.")
        return
    click.echo(
        f"  {'ID':>4}  {'CREATED':19}  {'KIND':11}  {'FILES':>7}  {'SIZE':>10}  {'NEW':>10}  LABEL"
    )
    for s in snaps:
        mark = "*" if s.id == head else " "
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created))
        click.echo(
            f"{mark} {s.id:>4}  {created}  {s.kind:11}  {s.files:>7}  {human_bytes(s.bytes):>10}"
            f"  {human_bytes(s.new_bytes):>10}  {safe(s.label)}"
        )


def print_changes(ch: Changes) -> None:
    rows = [("A", p) for p in ch.added] + [("M", p) for p in ch.modified]
    rows += [("D", p) for p in ch.deleted]
    for mark, path in sorted(rows, key=lambda r: r[1]):
        click.echo(safe(f"{mark} {path}"))
    click.echo(f"{len(ch.added)} added, {len(ch.modified)} modified, {len(ch.deleted)} deleted.")


def print_plan(plan: Sequence[Op], limit: int | None = None) -> None:
    if not plan:
        click.echo("Nothing to change: the project already matches.")
        return
    shown = plan if limit is None else plan[:limit]
    for op in shown:
        click.echo(
            "  " + op.describe().encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        )
    if len(shown) < len(plan):
        click.echo(f"  ... and {len(plan) - len(shown)} more")
    counts: dict[str, int] = {}
    for op in plan:
        counts[op.action] = counts.get(op.action, 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    click.echo(f"Plan: {len(plan)} changes ({summary}).")


class _Printer:
    """A one-line progress display on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        done = p.total is not None and p.done >= p.total
        if not done and now - self.last < 0.2:
            return
        self.last = now
        total = f"/{p.total}" if p.total is not None else ""
        sys.stderr.write(f"\r\x1b[K{p.phase}: {p.done}{total}")
        if done:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def progress_printer() -> ProgressFn:
    from snapfs._scan import no_progress

    return _Printer() if sys.stderr.isatty() else no_progress


class DownloadPrinter:
    """Download progress: a live bar on a terminal; otherwise only the notable events."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.shown = False
        self.said: set[str] = set()

    def __call__(self, p: DownloadProgress) -> None:
        if p.message and p.message not in self.said:
            self.said.add(p.message)
            self.clear()
            click.echo(safe(f"snapfs: {p.message}"), err=True)
        if not self.tty or p.phase not in ("downloading", "checking", "verifying"):
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        width = 24
        if p.total:
            filled = int(width * p.done / p.total)
            bar = "#" * filled + "-" * (width - filled)
            amount = f"{human_bytes(p.done)}/{human_bytes(p.total)}"
        else:
            bar, amount = "?" * width, human_bytes(p.done)
        eta = f" ETA {_clock(p.eta)}" if p.eta is not None else ""
        retries = f" {p.retries} retries" if p.retries else ""
        line = f"[{bar}] {amount} {human_bytes(int(p.rate))}/s{eta} from {p.source}{retries}"
        sys.stderr.write("\r\x1b[K" + safe(line))
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _clock(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def op_event_printer() -> Any:
    """Operation progress on stderr: one line per step, retries and fixes, a live line for
    downloads on a terminal."""
    tty = sys.stderr.isatty()
    state = {"live": False}

    def show(ev: Any) -> None:
        if ev.kind == "progress":
            if not tty:
                return
            sys.stderr.write("\r\x1b[K    " + safe(ev.message)[:100])
            sys.stderr.flush()
            state["live"] = True
            return
        if state["live"]:
            sys.stderr.write("\r\x1b[K")
            state["live"] = False
        mark = {"retry": "  ! ", "fix": "  + ", "skip": "  = ", "failed": "  x "}.get(ev.kind, "")
        if ev.kind in ("failed", "done"):
            return  # the final report says it
        click.echo(safe(f"{mark}{ev.message}"), err=True)

    return show


def print_guidance(exc: Any, project: Any) -> None:
    """The plain-language report of a failed operation, with the fixes on offer."""
    d = exc.diagnosis
    op = exc.op
    click.echo(safe(f"snapfs: step {exc.step + 1} ({exc.step_name}) failed."), err=True)
    click.echo(safe(f"  What happened: {d.message}"), err=True)
    if exc.rolled_back:
        kept = {0: "", 1: " Step 1 is kept."}.get(exc.step, f" Steps 1-{exc.step} are kept.")
        click.echo(f"  The project is back as it was before this step.{kept}", err=True)
    else:
        click.echo(safe(f"  {exc.message.split(d.message, 1)[-1].strip()}"), err=True)
    click.echo("  What you can do:", err=True)
    for a in d.actions:
        click.echo(safe(f"    - {a.label}"), err=True)
    click.echo(
        f"    snapfs resume {op}        try again from this step (downloads resume)", err=True
    )
    click.echo(f"    snapfs ops rollback {op}  undo the whole operation", err=True)
    click.echo(f"    snapfs ops show {op} -v   technical details", err=True)


def print_operations(rows: Sequence[Any]) -> None:
    if not rows:
        click.echo("No operations yet. Run one with 'snapfs import PLAN.json'.")
        return
    click.echo(f"  {'ID':>4}  {'STARTED':19}  {'STATUS':11}  {'STEPS':>7}  {'RESTORE':>7}  NAME")
    for r in rows:
        done = sum(1 for s in r.steps if s.status == "done")
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        cp = str(r.checkpoint) if r.checkpoint is not None else "-"
        click.echo(
            safe(
                f"  {r.id:>4}  {created}  {r.status:11}  {done:>3}/{len(r.steps):<3}  {cp:>7}"
                f"  {r.kind}: {r.label}"
            )
        )


def print_operation(r: Any, verbose: bool) -> None:
    cp = f"snapshot {r.checkpoint}" if r.checkpoint is not None else "none yet"
    click.echo(safe(f"Operation {r.id} ({r.kind}: {r.label}): {r.status}; restore point {cp}"))
    for s in r.steps:
        extra = f" x{s.attempts}" if s.attempts > 1 else ""
        rp = f" [restore point {s.checkpoint}]" if s.checkpoint is not None else ""
        click.echo(safe(f"  {s.index + 1}. {s.status:11} {s.name}{extra}{rp} {s.seconds:.1f} s"))
        if s.error:
            click.echo(safe(f"       {s.error.get('code')}: {s.error.get('message')}"))
            if verbose and s.error.get("detail"):
                for line in str(s.error["detail"]).splitlines()[-15:]:
                    click.echo(safe(f"         {line}"))
