"""``snapfs doctor``: the project's problems with numbered fixes, and applying one.

Fixes are numbered across all problems in the order listed (1, 2, 3, ...), so ``--fix N``
names exactly one. With ``--problem ID`` only that problem is considered, and N counts its
own fixes; ``--fix`` also takes a fix's id (``resume``, ``skip-2``, ``rollback``...), which
is stable where numbers are not: scripts should say ``--problem op-7 --fix resume``.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from snapfs import ExitCode, UsageError
from snapfs._doctor import Fix, FixResult, Issue, apply_fix, problems

from .render import DownloadPrinter, op_event_printer, progress_printer, safe

if TYPE_CHECKING:
    from snapfs._project import Project

    from . import Ctx


def _numbered(issues: list[Issue], per_problem: bool) -> list[tuple[int, Issue, Fix]]:
    out: list[tuple[int, Issue, Fix]] = []
    n = 0
    for issue in issues:
        if per_problem:
            n = 0
        for f in issue.fixes:
            n += 1
            out.append((n, issue, f))
    return out


def _issue_json(issue: Issue, numbers: dict[tuple[str, str], int]) -> dict[str, Any]:
    d = issue.to_dict()
    for f in d["fixes"]:
        f["number"] = numbers[(issue.id, f["id"])]
        del f["action"], f["params"]
    return d


def _print(issues: list[Issue], numbers: dict[tuple[str, str], int], details: bool) -> None:
    if not issues:
        click.echo("No problems: the project is fine.")
        return
    click.echo(f"{len(issues)} problem{'s' if len(issues) != 1 else ''}:")
    for i, issue in enumerate(issues, 1):
        click.echo("")
        click.echo(safe(f"{i}. {issue.title}  [{issue.id}]"))
        click.echo(safe(f"   What happened: {issue.message}"))
        click.echo(safe(f"   Where it stands: {issue.state}"))
        for a in issue.advice:
            click.echo(safe(f"   You can also: {a}"))
        if details:
            if issue.code:
                click.echo(safe(f"   Error code: {issue.code}"))
            for line in issue.detail.splitlines()[-15:]:
                click.echo(safe(f"   | {line}"))
        if not issue.fixes:
            click.echo("   No fix snapfs can apply: see what you can do above.")
        for f in issue.fixes:
            warn = "  (loses data: asks first)" if f.loses_data else ""
            click.echo(safe(f"   [{numbers[(issue.id, f.id)]}] {f.label}{warn}"))
            if details:
                click.echo(safe(f"       {f.confirm}"))
                if f.loses:
                    click.echo(safe(f"       Gives up: {f.loses}"))
    click.echo("")
    hint = "Apply a fix with 'snapfs doctor --fix N'"
    click.echo(hint + ("." if details else "; --details says what each one does."))


def _choose(issues: list[Issue], fix: str, problem: str | None) -> tuple[Issue, Fix] | None:
    """The (problem, fix) that ``--fix`` names; None to let :func:`apply_fix` answer for
    ``--problem`` (one not open any more, or a fix already applied)."""
    if problem is not None:
        issues = [i for i in issues if i.id == problem]
        if not issues:
            return None
    table = _numbered(issues, per_problem=problem is not None)
    if fix.isdigit():
        n = int(fix)
        for num, issue, f in table:
            if num == n:
                return issue, f
        if not table:
            raise UsageError("There is no fix to apply: no problem has one.")
        raise UsageError(f"There is no fix {n}; the fixes are numbered 1-{len(table)}.")
    named = [(issue, f) for _n, issue, f in table if f.id == fix]
    if len(named) == 1:
        return named[0]
    if not named and problem is not None:
        return None  # apply_fix says why (a skip-N already done is not an error)
    if not named:
        ids = sorted({f.id for _n, _i, f in table})
        raise UsageError(
            f"No problem has a fix {safe(fix)[:40]!r}"
            + (f" (fix ids: {', '.join(ids)})." if ids else ".")
        )
    raise UsageError(f"Several problems have a fix {fix!r}: name one with --problem ID.")


def _apply(p: Project, issue: Issue, f: Fix, yes: bool, quiet: bool) -> FixResult:
    if f.loses_data and not yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"'{f.label}' loses data ({f.loses or f.confirm}); add --yes to apply it."
            )
        click.echo(safe(f.confirm), err=True)
        click.confirm(safe(f"{f.label}?"), default=False, abort=True, err=True)
    if not quiet:
        click.echo(safe(f"Applying: {f.label} ({issue.id})."), err=True)
    printer = DownloadPrinter()
    try:
        return apply_fix(
            p,
            issue.id,
            f.id,
            report=op_event_printer(),
            progress=progress_printer(),
            download_progress=printer,
        )
    finally:
        printer.clear()


def run_doctor(
    c: Ctx,
    *,
    details: bool,
    deep: bool,
    as_json: bool,
    fix: str | None,
    problem: str | None,
    yes: bool,
) -> int:
    from snapfs._ops import OperationFailed

    if problem is not None and not problem.strip():
        raise UsageError("--problem needs a problem id, like op-7 (see 'snapfs doctor').")
    # Not a recovering open: the doctor shows interrupted work as it is, and leaves the choice
    # of rolling back or keeping a dead transaction's changes to its fixes.
    with c.open(recover=False) as p:
        issues = problems(p, deep=deep, progress=progress_printer())
        if fix is None:
            shown = [i for i in issues if problem is None or i.id == problem]
            if problem is not None and not shown:
                raise UsageError(f"There is no open problem {safe(problem)[:60]!r}.")
            numbers = {(i.id, f.id): n for n, i, f in _numbered(shown, problem is not None)}
            if as_json:
                d = {"problems": [_issue_json(i, numbers) for i in shown]}
                click.echo(json.dumps(d, ensure_ascii=False))
            else:
                _print(shown, numbers, details)
            return ExitCode.FOUND if shown else ExitCode.OK
        chosen = _choose(issues, fix, problem)
        if chosen is None:
            assert problem is not None
            # Idempotent: asking again for a fix already applied is not an error.
            res = apply_fix(p, problem, fix if not fix.isdigit() else "")
        else:
            try:
                res = _apply(p, chosen[0], chosen[1], yes, as_json)
            except OperationFailed as exc:
                click.echo(f"snapfs: {safe(str(exc))}", err=True)
                click.echo("  Run 'snapfs doctor' to see what you can do now.", err=True)
                return ExitCode.ERROR
        left = problems(p)
    numbers = {(i.id, f.id): n for n, i, f in _numbered(left, False)}
    if as_json:
        applied: dict[str, Any] = {
            "problem": res.problem,
            "fix": res.fix,
            "changed": res.changed,
            "message": res.message,
            "data": res.data,
        }
        out = {"applied": applied, "problems": [_issue_json(i, numbers) for i in left]}
        click.echo(json.dumps(out, ensure_ascii=False))
        return ExitCode.OK
    click.echo(safe(res.message))
    if left:
        n = len(left)
        click.echo(f"{n} problem{'s' if n != 1 else ''} left: see 'snapfs doctor'.")
    else:
        click.echo("No problems left.")
    return ExitCode.OK
