"""The ``snapfs`` command line. Each command parses, makes one library call, and renders.

Exit codes: 0 ok, 1 "found something" (verify problems, diff differences), 2 usage, 3 other
errors. Errors are one plain-language line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import atexit
import gc as _gc
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

import snapfs
from snapfs import ExitCode, SnapfsError
from snapfs._config import human_bytes
from snapfs._state import from_sqlite

if TYPE_CHECKING:
    from snapfs._project import Project

from .render import (
    print_changes,
    print_plan,
    print_snapshots,
    progress_printer,
    safe,
)


class Ctx:
    def __init__(self, path: str | None, store: str | None, debug: bool, no_wait: bool) -> None:
        self.path = path
        self.store = store
        self.debug = debug
        self.no_wait = no_wait

    def open(self, *, recover: bool = True) -> Project:
        overrides: dict[str, Any] = {"lock_wait": False} if self.no_wait else {}
        project = snapfs.open(
            self.path or ".", store=self.store, env=dict(os.environ), recover=recover, **overrides
        )
        project.on_wait = _say_waiting
        return project


def _say_waiting(owner: str) -> None:
    click.echo(
        f"Waiting for another snapfs process to finish ({owner or 'owner unknown'})..."
        " Use --no-wait to fail instead.",
        err=True,
    )


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "path", metavar="PATH", help="Run as if started in PATH (the project).")
@click.option("--store", metavar="DIR", help="Object store shared by several projects.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--no-wait", is_flag=True, help="Fail at once if another writer holds the project.")
@click.version_option(snapfs.__version__, prog_name="snapfs")
@click.pass_context
def cli(
    ctx: click.Context, path: str | None, store: str | None, debug: bool, no_wait: bool
) -> None:
    """Crash-safe snapshots and rollback for project folders."""
    store = store or os.environ.get("SNAPFS_STORE") or None
    if path and store and not os.path.isabs(os.path.expanduser(store)):
        store = os.path.join(path, store)  # -C PATH: as if started in PATH, like git
    ctx.obj = Ctx(path, store, debug, no_wait)


@cli.command()
@pass_ctx
def init(c: Ctx) -> None:
    """Make the folder a snapfs project (creates .snapfs/)."""
    already = (Path(c.path or ".") / ".snapfs" / "project.db").exists()
    with snapfs.init(c.path or ".", store=c.store, env=dict(os.environ)) as p:
        verb = "Already a snapfs project" if already else "Initialized snapfs project"
        click.echo(safe(f"{verb}: {p.root} (store: {p.store.root})"))


@cli.command()
@click.option("-m", "--label", "label", default="", help="A note to recognise it by.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@pass_ctx
def snapshot(c: Ctx, label: str, as_json: bool) -> None:
    """Record the project's current state. Prints the new id."""
    with c.open() as p:
        info = p.snapshot(label, progress=progress_printer())
    if as_json:
        click.echo(json.dumps(info.to_dict()))
        return
    click.echo(info.id)
    click.echo(
        f"Snapshot {info.id}: {info.files} files, {human_bytes(info.bytes)};"
        f" {human_bytes(info.new_bytes)} new in the store ({info.seconds:.2f} s).",
        err=True,
    )


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def list_(c: Ctx, as_json: bool) -> None:
    """List the snapshots, oldest first (* marks HEAD)."""
    with c.open() as p:
        snaps, head = p.snapshots(), p.head
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in snaps]))
    else:
        print_snapshots(snaps, head)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Show what changed since HEAD (the snapshot last taken or restored)."""
    with c.open() as p:
        ch, head = p.status(progress=progress_printer()), p.head
    if as_json:
        click.echo(json.dumps(ch.to_dict()))
    elif not ch:
        click.echo(f"No changes since snapshot {head}." if head else "No snapshots yet.")
    else:
        print_changes(ch)


@cli.command()
@click.argument("a")
@click.argument("b", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def diff(c: Ctx, a: str, b: str | None, as_json: bool) -> None:
    """Compare snapshot A with snapshot B (default: the working tree). Exit 1 if they differ."""
    with c.open() as p:
        ch = p.diff(a, b, progress=progress_printer())
    if as_json:
        click.echo(json.dumps(ch.to_dict()))
    else:
        print_changes(ch) if ch else click.echo("No differences.")
    if ch:
        sys.exit(ExitCode.FOUND)


def _confirm_restore(p: Project, ref: str, yes: bool, dry_run: bool) -> bool:
    if dry_run or not yes and sys.stdin.isatty():
        preview = p.restore(ref, dry_run=True, progress=progress_printer())
        if dry_run:
            print_plan(preview.plan)
            return False
        if not preview.plan:
            return True
        print_plan(preview.plan, limit=20)
        click.echo("Your current state is saved first, so this restore can be undone.")
        if not click.confirm(f"Restore snapshot {preview.target}?", default=False):
            click.echo("Nothing was changed.")
            return False
    return True


def _report_restore(res: snapfs.RestoreResult) -> None:
    if not res.changed:
        click.echo(f"The project already matches snapshot {res.target}.")
        return
    click.echo(f"Restored snapshot {res.target}: {res.changed} changes applied.")
    if res.pre_restore:
        click.echo(f"To undo: snapfs restore {res.pre_restore}")


@cli.command()
@click.argument("ref", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@click.option("--dry-run", "-n", is_flag=True, help="Print the plan and change nothing.")
@pass_ctx
def restore(c: Ctx, ref: str, yes: bool, dry_run: bool) -> None:
    """Make the project exactly equal to snapshot ID (a number, latest, latest~N)."""
    with c.open() as p:
        if _confirm_restore(p, ref, yes, dry_run):
            _report_restore(p.restore(ref, progress=progress_printer()))


@cli.command()
@click.option("--to", "to", metavar="ID", help="Checkpoint to roll back to (default: the latest).")
@click.option("--yes", "-y", is_flag=True, help="Don't ask for confirmation.")
@click.option("--dry-run", "-n", is_flag=True, help="Print the plan and change nothing.")
@pass_ctx
def rollback(c: Ctx, to: str | None, yes: bool, dry_run: bool) -> None:
    """Restore the latest checkpoint (the newest snapshot that isn't a pre-restore or post one)."""
    from snapfs._state import NOT_ROLLBACK_TARGETS

    with c.open() as p:
        if to is None:
            rows = [s for s in p.snapshots() if s.kind not in NOT_ROLLBACK_TARGETS]
            if not rows:
                raise snapfs.SnapshotNotFound("There is no checkpoint to roll back to yet.")
            to = str(rows[-1].id)
        if _confirm_restore(p, to, yes, dry_run):
            _report_restore(p.rollback(to, progress=progress_printer()))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def verify(c: Ctx, as_json: bool) -> None:
    """Re-hash everything the snapshots need. Exit 1 if anything is missing or corrupt."""
    with c.open() as p:
        rep = p.verify(progress=progress_printer())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": rep.ok,
                    "objects": rep.objects,
                    "trees": rep.trees,
                    "problems": [pr._asdict() for pr in rep.problems],
                }
            )
        )
    else:
        for pr in rep.problems:
            where = "; ".join(pr.paths) if pr.paths else ""
            click.echo(safe(f"{pr.kind.upper()}: {where + ': ' if where else ''}{pr.message}"))
        verdict = "OK" if rep.ok else f"{len(rep.problems)} problem(s)"
        click.echo(f"{verdict}: checked {rep.objects} objects and {rep.trees} trees.")
    if not rep.ok:
        sys.exit(ExitCode.FOUND)


@cli.command()
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N newest snapshots.")
@click.option("--keep-within", metavar="DURATION", help="Keep snapshots newer than e.g. 7d, 12h.")
@click.option("--dry-run", "-n", is_flag=True, help="Report what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gc(
    c: Ctx, keep_last: int | None, keep_within: str | None, dry_run: bool, as_json: bool
) -> None:
    """Delete snapshots outside the retention policy and unreferenced data."""
    with c.open() as p:
        rep = p.gc(keep_last=keep_last, keep_within=keep_within, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(rep._asdict()))
        return
    ids = rep.deleted_snapshots
    snaps = f"snapshots {', '.join(map(str, ids))}" if ids else "no snapshots"
    click.echo(
        f"{'Would delete' if dry_run else 'Deleted'} {snaps}, {rep.objects} unused object(s)"
        f" and {rep.trees} tree(s); {'would free' if dry_run else 'freed'}"
        f" {human_bytes(rep.freed_bytes)}."
    )


@cli.command()
@click.option("--discard", is_flag=True, help="Forget a damaged record of an interrupted restore.")
@click.option(
    "--keep", is_flag=True, help="Keep the partial state of a crashed transaction (mark it)."
)
@pass_ctx
def recover(c: Ctx, discard: bool, keep: bool) -> None:
    """Finish work a crash interrupted (done automatically by the next command too)."""
    path = c.path or "."
    with snapfs.open(path, store=c.store, env=dict(os.environ), recover=False) as p:
        click.echo(safe(p.recover(discard=discard, keep=keep, progress=progress_printer())))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-m", "--label", default="", help="Name the operation (default: the command).")
@click.option("--post", is_flag=True, help="Also take a snapshot after a successful run.")
@click.option(
    "--preserve", multiple=True, metavar="PATTERN", help="Never roll back these paths (glob)."
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def run(
    c: Ctx, label: str, post: bool, preserve: tuple[str, ...], command: tuple[str, ...]
) -> None:
    """Run COMMAND in a transaction: if it fails, the project is rolled back exactly.

    Use '--' before the command: snapfs run -- pip install -r requirements.txt
    """
    from snapfs._txn import run_command

    with c.open() as p:
        res = run_command(
            p,
            command,
            cwd=c.path,  # -C PATH: the command runs as if started in PATH
            label=label,
            post_snapshot=post,
            preserve=preserve,
            progress=progress_printer(),
        )
    if res.rolled_back:
        click.echo(safe(f"snapfs: {res.error} Rolled back: {res.changes.summary()}."), err=True)
        for path in _listing(res.changes):
            click.echo(safe(f"  {path}"), err=True)
    else:
        click.echo(f"snapfs: done; {res.changes.summary()} (see 'snapfs log').", err=True)
    sys.exit(res.returncode)


def _listing(ch: snapfs.ChangeSet, limit: int = 20) -> list[str]:
    rows = [f"A {p}" for p in ch.added] + [f"M {p}" for p in ch.modified]
    rows += [f"D {p}" for p in ch.deleted] + [f"R {a} -> {b}" for a, b in ch.moved]
    return rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else [])


@cli.command()
@click.option(
    "-n", "limit", type=click.IntRange(min=1), default=20, help="How many (newest first)."
)
@click.option("-v", "--verbose", is_flag=True, help="List the changed paths of each operation.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def log(c: Ctx, limit: int, verbose: bool, as_json: bool) -> None:
    """Show past operations (transactions) and what each changed."""
    with c.open() as p:
        rows = p.state.txns(limit=limit)
    if as_json:
        click.echo(json.dumps([_txn_dict(r) for r in rows]))
        return
    if not rows:
        click.echo("No operations yet. Wrap one with 'snapfs run -- COMMAND'.")
        return
    for r in rows:
        ch = snapfs.ChangeSet.from_dict(json.loads(r.changes)) if r.changes else None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started))
        summary = ch.summary() if ch is not None else "in progress"
        post = f" -> {r.post}" if r.post else ""
        click.echo(
            safe(f"#{r.id}  {when}  {r.status:11}  checkpoint {r.checkpoint}{post}  {r.label}")
        )
        click.echo(f"      {summary}" + (f"; {r.error}" if r.error else ""))
        if verbose and ch is not None:
            for line in _listing(ch, limit=1000):
                click.echo(safe(f"      {line}"))


def _txn_dict(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "label": r.label,
        "status": r.status,
        "parent": r.parent,
        "checkpoint": r.checkpoint,
        "post": r.post,
        "started": r.started,
        "ended": r.ended,
        "changes": json.loads(r.changes) if r.changes else None,
        "error": r.error,
    }


@cli.command()
@click.argument("url")
@click.option(
    "-o", "--output", "dest", metavar="DEST", help="Where to save (default: the URL's file name)."
)
@click.option(
    "--mirror", "mirrors", multiple=True, metavar="URL", help="Another source (repeatable)."
)
@click.option("--sha256", metavar="HEX", help="Expected SHA-256; the file is checked and repaired.")
@click.option("--xxh128", metavar="HEX", help="Expected XXH3-128 (snapfs's own digest).")
@click.option("--size", metavar="N", help="Expected size (bytes, or like 4GiB).")
@click.option("-C", "project", metavar="PATH", help="Save into this project (DEST relative to it).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_ctx
def download(
    c: Ctx,
    url: str,
    dest: str | None,
    mirrors: tuple[str, ...],
    sha256: str | None,
    xxh128: str | None,
    size: str | None,
    project: str | None,
    as_json: bool,
) -> None:
    """Download URL resumably: verified chunks, retries, mirrors. Run it again to resume."""
    from snapfs._config import parse_size
    from snapfs._download import name_from_url

    from .render import DownloadPrinter

    project = project or c.path
    printer = DownloadPrinter()
    try:
        res = snapfs.download(
            url,
            dest or name_from_url(url),
            mirrors=mirrors,
            sha256=sha256,
            xxh128=xxh128,
            size=parse_size(size) if size is not None else None,
            project=project,
            progress=printer,
            env=dict(os.environ),
            **({"store": c.store} if project and c.store else {}),
        )
    except KeyboardInterrupt:
        printer.clear()
        click.echo("snapfs: interrupted; run the same command to resume.", err=True)
        sys.exit(130)
    finally:
        printer.clear()
    if as_json:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in res.__dict__.items()}
        click.echo(json.dumps(d))
        return
    click.echo(safe(str(res.path)))
    if res.reused:
        how = "already there; nothing downloaded"
    else:
        how = f"{human_bytes(res.fetched)} fetched"
        if res.resumed:
            how += f", resumed from {human_bytes(res.resumed)}"
        if res.retries:
            how += f", {res.retries} retries"
        if res.repaired:
            how += f", {human_bytes(res.repaired)} repaired"
    click.echo(f"Downloaded {human_bytes(res.size)} ({how}). SHA-256 {res.sha256 or '?'}", err=True)


def _op_events() -> Any:
    from .render import op_event_printer

    return op_event_printer()


def _run_op(p: Project, op: int) -> None:
    from snapfs._ops import OperationFailed, run_operation

    from .render import print_guidance

    try:
        res = run_operation(p, op, report=_op_events())
    except OperationFailed as exc:
        print_guidance(exc, p)
        sys.exit(ExitCode.ERROR)
    except KeyboardInterrupt:
        click.echo(
            f"snapfs: interrupted. The step in progress was rolled back; 'snapfs resume {op}'"
            " continues (downloaded bytes are kept).",
            err=True,
        )
        sys.exit(130)
    skipped = ", ".join(str(i + 1) for i in res.skipped_steps)
    click.echo(
        f"Operation {op} done: {res.ran} step(s) run, {res.skipped} already done"
        + (f", {res.retries} retried" if res.retries else "")
        + (f", step(s) {skipped} skipped" if skipped else "")
        + f" ({res.seconds:.1f} s). Restore point: snapshot {res.checkpoint}."
        + (f" Result: snapshot {res.post}." if res.post is not None else ""),
        err=True,
    )


@cli.command(name="import")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option(
    "--dry-run", is_flag=True, help="Validate the plan and list its steps; change nothing."
)
@pass_ctx
def import_(c: Ctx, plan: str, dry_run: bool) -> None:
    """Import a workflow from PLAN.json: a checkpointed operation that resumes or rolls back."""
    from snapfs._import import load_plan, start_import

    with c.open() as p:
        if dry_run:
            data = load_plan(plan, p.root)
            click.echo(f"Plan {data['name']!r} is valid: {len(data['steps'])} step(s).")
            for i, st in enumerate(data["steps"], 1):
                click.echo(safe(f"  {i}. {st['name']}"))
            return
        op = start_import(p, plan)
        click.echo(f"Operation {op}: import {safe(plan)}", err=True)
        _run_op(p, op)


@cli.command()
@click.argument("op", type=int, required=False)
@pass_ctx
def resume(c: Ctx, op: int | None) -> None:
    """Continue an interrupted or failed operation from its first unfinished step."""
    from snapfs._ops import resumable

    with c.open() as p:
        if op is None:
            rec = resumable(p)
            if rec is None:
                click.echo("Nothing to resume: every operation finished or was rolled back.")
                return
            op = rec.id
        click.echo(f"Resuming operation {op}.", err=True)
        _run_op(p, op)


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ops(ctx: click.Context, as_json: bool) -> None:
    """List operations (imports) with their status; see 'ops show ID', 'ops rollback ID'."""
    if ctx.invoked_subcommand is not None:
        return
    from snapfs._ops import list_operations

    from .render import print_operations

    c: Ctx = ctx.obj
    with c.open() as p:
        rows = list_operations(p, limit=50)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows]))
    else:
        print_operations(rows)


@ops.command(name="show")
@click.argument("op", type=int)
@click.option("-v", "--verbose", is_flag=True, help="Technical details of errors.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def ops_show(c: Ctx, op: int, verbose: bool, as_json: bool) -> None:
    """Show one operation: its steps, errors and restore points."""
    from snapfs._ops import load_operation

    from .render import print_operation

    with c.open() as p:
        rec = load_operation(p, op)
    if as_json:
        click.echo(json.dumps(rec.to_dict()))
    else:
        print_operation(rec, verbose)


@ops.command(name="rollback")
@click.argument("op", type=int)
@click.option("-y", "--yes", is_flag=True, help="Don't ask.")
@pass_ctx
def ops_rollback(c: Ctx, op: int, yes: bool) -> None:
    """Undo a whole operation: restore the snapshot taken before it started."""
    from snapfs._ops import load_operation, rollback_operation

    with c.open() as p:
        rec = load_operation(p, op)
        if rec.checkpoint is None:
            raise snapfs.UsageError(f"Operation {op} never started; there is nothing to undo.")
        if not yes and sys.stdin.isatty():
            click.confirm(
                f"Restore snapshot {rec.checkpoint} (before operation {op})? Later changes are"
                " saved in a pre-restore snapshot first.",
                abort=True,
            )
        cp = rollback_operation(p, op)
    click.echo(f"Operation {op} rolled back: the project is as it was at snapshot {cp}.")


@ops.command(name="skip")
@click.argument("op", type=int)
@click.argument("step", type=click.IntRange(min=1), required=False)
@pass_ctx
def ops_skip(c: Ctx, op: int, step: int | None) -> None:
    """Skip STEP (default: the step operation OP stopped at); 'snapfs resume' then goes on."""
    from snapfs._ops import skip_step

    with c.open() as p:
        rec = skip_step(p, op, None if step is None else step - 1)
    click.echo(
        safe(
            f"Step {rec.index + 1} of operation {op} ({rec.name}) is skipped."
            f" Run 'snapfs resume {op}' to continue after it."
        )
    )


@cli.command()
@click.option("--details", is_flag=True, help="Show the technical detail and what each fix does.")
@click.option("--deep", is_flag=True, help="Also re-hash all stored data (like 'snapfs verify').")
@click.option("--json", "as_json", is_flag=True, help="Print the problems (and fix) as JSON.")
@click.option("--fix", "fix", metavar="N|ID", help="Apply fix N (as numbered in the listing).")
@click.option("--problem", "problem", metavar="ID", help="Only this problem (e.g. op-7).")
@click.option("--yes", "-y", is_flag=True, help="Don't ask before a fix that loses data.")
@pass_ctx
def doctor(
    c: Ctx,
    details: bool,
    deep: bool,
    as_json: bool,
    fix: str | None,
    problem: str | None,
    yes: bool,
) -> None:
    """List the project's problems with numbered fixes; --fix N applies one.

    Exit 0: no problems (or the fix was applied), 1: problems found, 2: bad usage, 3: the fix
    failed.
    """
    from .doctor import run_doctor

    code = run_doctor(
        c, details=details, deep=deep, as_json=as_json, fix=fix, problem=problem, yes=yes
    )
    sys.exit(code)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def errors(c: Ctx, as_json: bool) -> None:
    """Show the project's error history: what failed, how often, by category."""
    from snapfs._ops import error_history

    with c.open() as p:
        rows = error_history(p)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows]))
        return
    if not rows:
        click.echo("No errors recorded.")
        return
    by_cat: dict[str, int] = {}
    for r in rows:
        by_cat[r.category] = by_cat.get(r.category, 0) + r.count
    click.echo("By category: " + ", ".join(f"{k} {v}" for k, v in sorted(by_cat.items())))
    click.echo(f"  {'COUNT':>5}  {'LAST':19}  {'CODE':22}  MESSAGE")
    for r in rows:
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.last))
        click.echo(safe(f"  {r.count:>5}  {last}  {r.code:22}  {r.message}"))


@cli.command()
@pass_ctx
def watch(c: Ctx) -> None:
    """Watch the project for changes (foreground), so snapshots and transactions read only
    what changed. Stop it with Ctrl-C or SIGTERM; run it under systemd for always-on use."""
    from snapfs._watch import serve

    with c.open() as p:

        def ready(run: str) -> None:
            click.echo(safe(f"Watching {p.root} (journal run {run[:8]}). Ctrl-C stops."), err=True)

        try:
            serve(p, on_ready=ready)
        except KeyboardInterrupt:
            click.echo("Stopped watching.", err=True)


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo folder afterwards.")
def demo(keep: bool) -> None:
    """Make a sample project, snapshot it, break it, and roll it back."""
    from snapfs._demo import run_demo

    ok = run_demo(say=click.echo, keep=keep)
    sys.exit(ExitCode.OK if ok else ExitCode.ERROR)


def _print_traceback() -> None:
    import traceback  # only with --debug

    traceback.print_exc()


def _terminate(signum: int, _frame: object) -> NoReturn:
    # Turn SIGTERM/SIGHUP into an exception so cleanup (temp files, locks) runs.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # Registered first, so it runs last: the interpreter's final collection walks every object
    # a command left (a project's stat cache is tens of thousands), about 10 ms of a 150 ms
    # `snapfs status`, only for the OS to free them anyway. Nothing we rely on waits for it:
    # files and databases are closed by their `with` blocks.
    atexit.register(_gc.freeze)
    from snapfs._trash import enable_fork

    enable_fork()  # a command returns as soon as the tree is right; its trash goes after
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        cli.main(args=argv, prog_name="snapfs", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted; nothing was changed.", err=True)
        sys.exit(ExitCode.ERROR)
    except click.ClickException as exc:
        hint = " (see 'snapfs --help')" if isinstance(exc, click.UsageError) else ""
        click.echo(f"snapfs: {safe(exc.format_message())}{hint}", err=True)
        sys.exit(ExitCode.USAGE)
    except SnapfsError as exc:
        if debug:
            _print_traceback()
        click.echo(f"snapfs: {safe(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("snapfs: interrupted.", err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            _print_traceback()
        err = snapfs_error_from(exc, _command(argv if argv is not None else sys.argv[1:]))
        click.echo(f"snapfs: {safe(str(err))}", err=True)
        sys.exit(ExitCode.ERROR)
    except sqlite3.Error as exc:
        if debug:
            _print_traceback()
        err = from_sqlite(exc, Path(".snapfs/project.db"))
        click.echo(f"snapfs: {safe(str(err))}", err=True)
        sys.exit(err.exit_code)
    except Exception as exc:  # the last line of defence: one line, never a bare traceback
        if debug:
            _print_traceback()
        click.echo(
            safe(f"snapfs: internal error: {type(exc).__name__}: {exc} (rerun with --debug)"),
            err=True,
        )
        sys.exit(ExitCode.ERROR)
    sys.exit(ExitCode.OK)


def snapfs_error_from(exc: OSError, command: str = "") -> SnapfsError:
    from snapfs._errors import from_oserror

    return from_oserror(exc, f"'snapfs {command}'" if command else "The command")


def _command(argv: list[str]) -> str:
    """The subcommand ``argv`` ran (global options and their values skipped), or ""."""
    args = iter(argv)
    for a in args:
        if a in ("-C", "--store"):
            next(args, None)
        elif not a.startswith("-"):
            return a if a in cli.commands else ""
    return ""


from .ui import ui as _ui  # noqa: E402 - registered last: it needs the group defined above

cli.add_command(_ui)

__all__ = ["cli", "main"]
