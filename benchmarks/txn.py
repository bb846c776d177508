"""The transaction suite: entry cost, rollback of an import-like change, and wrapping overhead.

Run through the one benchmark command (``python -m benchmarks.run --suite txn``; the default
``--suite core,txn`` runs both). Everything is measured twice on the same snapfs project, once
without and once with ``snapfs watch`` running in the background, next to git and the walk floor
on copies of the same tree in the same run. See benchmarks/README.md ("The transaction suite").
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import genproject, treecheck
from benchmarks.tools import (
    CmdError,
    Git,
    Snapfs,
    loop_mode,
    loop_note,
    run,
    snapfs_cli,
    watching,
)

HERE = Path(__file__).resolve().parent
FLOORS_SCRIPT = HERE / "floors.py"
WRITE2K_SCRIPT = HERE / "write2k.py"
WRITE2K_DIR = "bench_write2k"  # a new top-level dir of the project, deleted after every run
CONDITIONS = ("watch", "nowatch")  # table column order
ENTER_TARGET_S = 0.100
OVERHEAD_TARGET = 0.05


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _timed(fn: Callable[[], Any]) -> float:
    os.sync()  # don't bill this step for the previous step's writeback
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _driver(*args: str) -> dict[str, Any]:
    out = run([sys.executable, "-m", "benchmarks.txn_driver", *args], env=Snapfs.ENV)
    result: dict[str, Any] = json.loads(out)
    return result


# ---------------------------------------------------------------------------
# the snapfs blocks (run once per condition)


def snapfs_block(project: Path, pristine: Path, args: Any, errors: list[str]) -> dict[str, Any]:
    n, n_rb = args.txn_repeat, args.txn_rollbacks
    out: dict[str, Any] = {}
    dest = project / WRITE2K_DIR

    def attempt(key: str, fn: Callable[[], Any]) -> None:
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing measurement must not stop the others
            errors.append(f"{key}: {e}" if isinstance(e, CmdError) else traceback.format_exc())
            log(f"  ERROR in {key}: {str(e).splitlines()[0][:300] if str(e) else e!r}")

    attempt("enter", lambda: _driver("enter", str(project), str(n)))
    log(f"    enter: {_fmt_s(_med(out, 'enter', 'begin'))} s")
    run_true = [sys.executable, "-m", "snapfs", "-C", str(project), "run", "--", "true"]
    attempt(
        "cli_run_true", lambda: [_timed(lambda: run(run_true, env=Snapfs.ENV)) for _ in range(n)]
    )
    log(f"    snapfs run -- true: {_fmt_s(_median(out.get('cli_run_true', [])))} s")

    def cli_write2k() -> dict[str, list[float]]:
        # Interleaved plain / wrapped so slow drift hits both alike; reset to unchanged between.
        plain_cmd = [sys.executable, str(WRITE2K_SCRIPT), str(dest)]
        wrapped_cmd = [sys.executable, "-m", "snapfs", "-C", str(project), "run", "--", *plain_cmd]
        res: dict[str, list[float]] = {"plain": [], "wrapped": []}
        snapfs_cli(project, "snapshot", "-m", "bench write2k start")
        for _ in range(n):
            for key, cmd in (("plain", plain_cmd), ("wrapped", wrapped_cmd)):
                res[key].append(_timed(functools.partial(run, cmd, env=Snapfs.ENV)))
                shutil.rmtree(dest)
                snapfs_cli(project, "snapshot", "-m", "bench write2k reset")
        return res

    attempt("cli_write2k", cli_write2k)
    attempt(
        "inproc_write2k", lambda: _driver("write2k", str(project), str(n), "--dir", WRITE2K_DIR)
    )
    log(f"    write2k done; rollback x{n_rb}")
    attempt(
        "rollback",
        lambda: _driver(
            "rollback",
            str(project),
            str(n_rb),
            "--scale",
            str(args.scale),
            "--pristine",
            str(pristine),
        ),
    )
    log(f"    rollback: {_fmt_s(_med(out, 'rollback', 'rollback'))} s")
    return out


# ---------------------------------------------------------------------------
# peers and floors (same tree, same run)


def peers_block(area: Path, pristine: Path, args: Any, errors: list[str]) -> dict[str, Any]:
    n, n_rb = args.txn_repeat, args.txn_rollbacks
    out: dict[str, Any] = {}
    walks = [
        json.loads(run([sys.executable, str(FLOORS_SCRIPT), "walk", str(pristine)]))
        for _ in range(n)
    ]
    out["walk"] = [w["seconds"] for w in walks]
    out["entries"], out["bytes"] = walks[0]["entries"], walks[0]["bytes"]
    version = [sys.executable, "-m", "snapfs", "--version"]
    out["snapfs_startup"] = [_timed(lambda: run(version, env=Snapfs.ENV)) for _ in range(n)]
    out["python_startup"] = [_timed(lambda: run([sys.executable, "-c", "pass"])) for _ in range(n)]
    if "git" not in args.peers or Git.unavailable_reason():
        log("  SKIP git peer")
        return out
    git_area = area / "git"
    git_area.mkdir()
    git = Git(git_area)
    try:
        log("  git: copying, init, add, commit (untimed)")
        run(["cp", "-a", str(pristine), str(git.project)])
        git.init()
        git.snapshot("base")
        git.status()  # untimed: refresh the index's stat data once, as any earlier command would
        out["git_status"] = [_timed(git.status) for _ in range(n)]
        log(f"  git status: {_fmt_s(_median(out['git_status']))} s")
        expected = treecheck.manifest(pristine)
        rb: list[float] = []
        verdicts: list[str] = []
        for _ in range(n_rb):
            genproject.apply_change(git.project, args.scale)
            os.sync()  # as for snapfs: the change's writeback is not the undo's cost

            def undo() -> None:
                git._git("reset", "--hard", "-q")
                git._git("clean", "-fdq")

            rb.append(_timed(undo))
            verdicts.append(
                treecheck.verdict(treecheck.diff(expected, treecheck.manifest(git.project)))
            )
        out["git_rollback"], out["git_rollback_exact"] = rb, verdicts
        log(f"  git reset --hard + clean -fd: {_fmt_s(_median(rb))} s")
    except CmdError as e:
        errors.append(f"git: {e}")
        log(f"  git: ERROR {e}")
    finally:
        shutil.rmtree(git_area, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------


def bench_txn(fs: str, base: Path, pristine: Path, args: Any) -> dict[str, Any]:
    """The whole transaction suite on one filesystem; prints its tables, returns raw results."""
    area = base / "txn"
    area.mkdir()
    errors: list[str] = []
    res: dict[str, Any] = {"errors": errors, "snapfs": {}, "watch": None}
    try:
        res["peers"] = peers_block(area, pristine, args, errors)
        reason = Snapfs.unavailable_reason()
        if reason:
            errors.append(f"snapfs skipped: {reason}")
            log(f"SKIP snapfs: {reason}")
        else:
            project = area / "snapfs"
            log(f"[{fs}] txn: snapfs project: copy, init, first snapshot (untimed)")
            run(["cp", "-a", str(pristine), str(project)])
            snapfs_cli(project, "init")
            snapfs_cli(project, "snapshot", "-m", "base")
            log(f"[{fs}] txn: snapfs without watch")
            res["snapfs"]["nowatch"] = snapfs_block(project, pristine, args, errors)
            log(f"[{fs}] txn: snapfs with `snapfs watch` running")
            info: dict[str, Any] = {}
            try:
                with watching(project, area / "watch.log") as info:
                    log(f"  watch ready after {info['ready_seconds']:.1f} s")
                    res["snapfs"]["watch"] = snapfs_block(project, pristine, args, errors)
            except CmdError as e:
                errors.append(f"watch: {e}")
                log(f"  watch: ERROR {e}")
            res["watch"] = info
    finally:
        shutil.rmtree(area, ignore_errors=True)
    info_line = {
        "scale": args.scale,
        "repeat": args.txn_repeat,
        "rollbacks": args.txn_rollbacks,
        "loop": loop_mode(area),
    }
    print("\n" + txn_report(fs, info_line, res) + "\n", flush=True)
    return res


# ---------------------------------------------------------------------------
# report


def _med(block: dict[str, Any] | None, key: str, field: str) -> float | None:
    if not block or key not in block:
        return None
    return _median([s[field] for s in block[key]["samples"]])


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _joined(values: list[Any]) -> str:
    uniq = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
    return " / ".join(uniq) if uniq else "n/a"


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Medians per condition (watch / nowatch) plus the peers: what the tables and targets use."""
    peers = res.get("peers", {})
    s: dict[str, Any] = {
        "git_status": _median(peers.get("git_status", [])),
        "walk": _median(peers.get("walk", [])),
        "snapfs_startup": _median(peers.get("snapfs_startup", [])),
        "python_startup": _median(peers.get("python_startup", [])),
        "git_rollback": _median(peers.get("git_rollback", [])),
        "git_rollback_exact": _joined(peers.get("git_rollback_exact", [])),
    }
    for cond in CONDITIONS:
        b = res["snapfs"].get(cond)
        c: dict[str, Any] = {}
        if b:
            enter = b.get("enter", {})
            rb = b.get("rollback", {}).get("samples", [])
            cli = b.get("cli_write2k", {})
            c = {
                "begin": _med(b, "enter", "begin"),
                "commit": _med(b, "enter", "commit"),
                "warmup_begin": enter.get("warmup", {}).get("begin"),
                "enter_journal": _joined([x["journal"] for x in enter.get("samples", [])]),
                "enter_changes": _joined([x["changes"] for x in enter.get("samples", [])]),
                "cli_run_true": _median(b.get("cli_run_true", [])),
                "rollback": _med(b, "rollback", "rollback"),
                "rollback_journal": _joined([x["journal"] for x in rb]),
                "rollback_note": _joined([x["journal_note"] for x in rb]),
                "exact_vs_pristine": _joined([x["exact_vs_pristine"] for x in rb]),
                "exact_vs_checkpoint": _joined([x["exact_vs_checkpoint"] for x in rb]),
                "cli_plain": _median(cli.get("plain", [])),
                "cli_wrapped": _median(cli.get("wrapped", [])),
                "inproc_plain": _med(b, "inproc_write2k", "plain"),
                "inproc_wrapped": _med(b, "inproc_write2k", "wrapped"),
                "inproc_begin": _med(b, "inproc_write2k", "begin"),
                "inproc_commit": _med(b, "inproc_write2k", "commit"),
            }
        s[cond] = c
    return s


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _overhead(wrapped: float | None, plain: float | None) -> float | None:
    r = _ratio(wrapped, plain)
    return None if r is None else r - 1


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def medians_table(s: dict[str, Any]) -> str:
    w, nw = s["watch"], s["nowatch"]

    def secs(*keys: str) -> Callable[[dict[str, Any]], str]:
        return lambda c: " / ".join(_fmt_s(c.get(k)) for k in keys)

    def text(*keys: str) -> Callable[[dict[str, Any]], str]:
        return lambda c: " / ".join(str(c.get(k, "n/a")) for k in keys)

    def row(label: str, cell: Callable[[dict[str, Any]], str], peer: str = "") -> str:
        cells = [cell(c) if c else "n/a" for c in (w, nw)]
        return f"| {label} | {cells[0]} | {cells[1]} | {peer} |"

    return "\n".join(
        [
            "| metric (median s) | snapfs + watch | snapfs, no watch | peer / floor |",
            "|---|---|---|---|",
            row(
                "enter: `tx.begin()` in-process, unchanged tree",
                secs("begin"),
                f"`git status --porcelain`: {_fmt_s(s['git_status'])}",
            ),
            row(
                "first `begin()` after open (warm-up, not in the median)",
                secs("warmup_begin"),
                f"scandir+lstat walk: {_fmt_s(s['walk'])}",
            ),
            row("commit of that empty transaction", secs("commit")),
            row("journal used / changes seen on commit", text("enter_journal", "enter_changes")),
            row(
                "`snapfs run -- true`, CLI wall time",
                secs("cli_run_true"),
                f"`python -m snapfs --version`: {_fmt_s(s['snapfs_startup'])}",
            ),
            row(
                "rollback of the import-like change: `tx.rollback()`",
                secs("rollback"),
                f"`git reset --hard -q && git clean -fdq`: {_fmt_s(s['git_rollback'])}",
            ),
            row(
                "rollback exact vs pristine tree",
                text("exact_vs_pristine"),
                f"git: {s['git_rollback_exact']}",
            ),
            row("rollback exact vs its checkpoint", text("exact_vs_checkpoint")),
            row("rollback: journal used / its note", text("rollback_journal", "rollback_note")),
            row(
                "write 2k files: plain subprocess",
                secs("cli_plain"),
                f"`python -c pass`: {_fmt_s(s['python_startup'])}",
            ),
            row("write 2k files: `snapfs run -- python write2k.py`", secs("cli_wrapped")),
            row("write 2k files: plain, in-process", secs("inproc_plain")),
            row("write 2k files: in `with snapfs.transaction(p)`", secs("inproc_wrapped")),
            row("  of which begin / commit", secs("inproc_begin", "inproc_commit")),
        ]
    )


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target from the issue: what was measured against what, and whether it is met."""
    w, nw = s["watch"], s["nowatch"]
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, shown: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "shown": shown, "met": ok})

    b = w.get("begin")
    add(
        "enter with watch < 100 ms",
        b,
        "n/a" if b is None else f"{b * 1000:.0f} ms",
        None if b is None else b < ENTER_TARGET_S,
    )
    r = _ratio(b, s["git_status"])
    add(
        "enter with watch ≤ 2× git status",
        r,
        "n/a" if r is None else f"{r:.2f}×",
        None if r is None else r <= 2.0,
    )
    r = _ratio(nw.get("begin"), s["walk"])
    add(
        "enter without watch ≤ 2× walk floor",
        r,
        "n/a" if r is None else f"{r:.2f}×",
        None if r is None else r <= 2.0,
    )
    for cond, c in (("watch", w), ("no watch", nw)):
        r = _ratio(c.get("rollback"), s["git_rollback"])
        add(
            f"rollback ({cond}) ≤ git reset+clean",
            r,
            "n/a" if r is None else f"{r:.2f}×",
            None if r is None else r <= 1.0,
        )
    for cond, c in (("watch", w), ("no watch", nw)):
        for how, wk, pk in (
            ("`snapfs run`", "cli_wrapped", "cli_plain"),
            ("in-process", "inproc_wrapped", "inproc_plain"),
        ):
            o = _overhead(c.get(wk), c.get(pk))
            add(
                f"wrap overhead {how} ({cond}) < 5%",
                o,
                "n/a" if o is None else f"{o:+.0%}",
                None if o is None else o < OVERHEAD_TARGET,
            )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['shown']} | {_yes(r['met'])} |" for r in rows]
    return "\n".join(lines)


def txn_report(fs: str, info: dict[str, Any], res: dict[str, Any]) -> str:
    s = summarize(res)
    res["summary"], res["targets"] = s, targets(s)
    peers = res.get("peers", {})
    head = (
        f"## {fs}{loop_note(info)}: transactions  (scale {info['scale']}, median of {info['repeat']}, rollback "
        f"median of {info['rollbacks']}, {peers.get('entries', '?')} entries, "
        f"{peers.get('bytes', 0) / 1e6:.0f} MB; warm page cache; in-process = timed inside a "
        "driver process that imported snapfs and opened the project)"
    )
    parts = [
        head,
        "### median times",
        medians_table(s),
        "### targets",
        targets_table(res["targets"]),
    ]
    watch = res.get("watch") or {}
    if watch.get("returncode") not in (None, 0) or watch.get("killed"):
        parts.append(
            f"`snapfs watch` ended with {watch.get('returncode')}: "
            f"{watch.get('stderr', '').strip()[-300:]}"
        )
    if res["errors"]:
        parts.append(
            "### errors\n\n" + "\n".join(f"- {e.splitlines()[0][:300]}" for e in res["errors"])
        )
    return "\n\n".join(parts)
