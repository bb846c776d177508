"""SIGKILL a transaction at every crash point it passes, then check the next command's recovery.

Four wrapped operations, each in a child process with ``SNAPFS_CRASH_AT`` set:

=========  ===========================================================================
run-ok     ``snapfs run --post -- python mutate.py ROOT 0`` (succeeds; a post snapshot)
run-fail   ``snapfs run --preserve 'output/**' -- python mutate.py ROOT 3`` (fails)
py-ok      ``with snapfs.transaction(ROOT): mutate()`` in a child Python process
py-fail    the same block raising, so it rolls back
=========  ===========================================================================

They pass ``txn.begun``, ``txn.rolled_back`` / ``txn.before_commit_record``, the checkpoint's
(and post snapshot's) ``snapshot.*`` points and the rollback's ``restore.*`` points. None of
them lies after the commit record, so a transaction killed at any of them is rolled back by the
default crash policy: after ``snapfs status`` the tree must be exactly the pre-state — plus, for
run-fail, the preserved ``output/`` the command wrote, once the command has run. HEAD must
agree with the tree, the transaction must be marked ``recovered`` (none recorded if the kill
came before ``txn.begun``), ``snapfs verify`` must pass and nothing may be left in
``.snapfs``. Then the same command, run again without a crash, must do exactly what it does
in a fresh project. py-ok goes on after its commit with a checkpoint: a kill there lies after
the commit record and must keep the post-state, with the transaction ``committed``.

Recovery is a rollback, so it can be killed too: ``test_txn_recovery_*`` kill a transaction,
then kill the recovering command at every point *it* passes, and check the same invariants
after the next command.

CI runs ``test_txn_crash_sample`` and ``test_txn_recovery_crash_sample`` (``.ci/run``:
``-m slow -k sample``). The full sweep, every hit of every point of every variant::

    python -m pytest -m slow -s -k every_hit tests/crash/test_txn_crash.py
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.crash.sweep import (
    Case,
    describe_diff,
    every_hit,
    expect_sigkill,
    force_rmtree,
    json_of,
    pick,
    project_leftovers,
    read_hits,
    sweep,
)
from tests.helpers import TreeState, run_cli, tree_state, write

pytestmark = pytest.mark.crash

# The wrapped command: every kind of change, deterministic, and a file in the preserved output/.
MUTATE = r"""
import os, shutil, sys

def w(rel, data, mode=None):
    os.makedirs(os.path.dirname(rel) or ".", exist_ok=True)
    with open(rel, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(rel, mode)

def mutate(root):
    os.chdir(root)
    w("src/app.py", "print('v2, broken')\n")
    os.chmod("run.sh", 0o644)
    os.unlink("secret.key")
    os.rename("docs/old-name.txt", "docs/new-name.txt")
    shutil.rmtree("gone")
    os.unlink("file-becomes-dir"); w("file-becomes-dir/child", "now a dir")
    shutil.rmtree("dir-becomes-file"); w("dir-becomes-file", "now a file")
    os.unlink("file-becomes-link"); os.symlink("run.sh", "file-becomes-link")
    os.unlink("link-to-dir"); os.mkdir("link-to-dir")
    os.unlink("dangling"); os.symlink("elsewhere", "dangling")
    os.rmdir("empty/deeper"); os.chmod("empty", 0o700)
    os.chmod("ro", 0o755); w("ro/added.txt", "written while writable")
    for i in range(0, 40, 3):
        os.unlink(f"src/pkg{i % 4}/f{i}.txt")
    for i in range(1, 40, 5):
        w(f"src/pkg{i % 4}/f{i}.txt", bytes([i]) * (100 + i))
    for i in range(12):
        w(f"added/d{i % 3}/n{i}.bin", bytes([i]) * (1000 + i), 0o600 if i % 4 == 0 else None)
    with open("big.bin", "r+b") as f:
        f.seek(300_000)
        f.write(b"changed in place" * 64)
    w("output/render.png", b"\x89PNG rendered by the command")

if __name__ == "__main__":
    mutate(sys.argv[1])
    sys.exit(int(sys.argv[2]))
"""

# A transaction in a child Python process, around the same change.
TXN_CHILD = r"""
import runpy, sys
import snapfs

root, mutate_py, how = sys.argv[1:4]
mutate = runpy.run_path(mutate_py, run_name="mutate")["mutate"]

class BlockFailed(Exception):
    pass

try:
    with snapfs.transaction(root, label="crash sweep") as tx:
        mutate(root)
        if how == "fail":
            raise BlockFailed("the block failed")
except BlockFailed:
    sys.exit(3)
# Committed; a crash in what comes next (the snapshot.* points of this checkpoint) lies after
# the commit record, so it must leave the post-state.
snapfs.checkpoint(root, kind="manual", label="after the transaction")
"""

OUT_ADDED: dict[str, list[str]] = {
    "added": ["output/", "output/render.png"],
    "modified": [],
    "deleted": [],
}
CLEAN: dict[str, list[str]] = {"added": [], "modified": [], "deleted": []}


@dataclass(frozen=True)
class Variant:
    name: str
    python: bool  # snapfs.transaction in a child Python, else snapfs run
    fails: bool
    preserve: bool = False  # run --preserve 'output/**'
    post: bool = False  # run --post

    @property
    def exit_code(self) -> int:
        return 3 if self.fails else 0

    @property
    def final(self) -> str:
        """Where an uncrashed run leaves the tree."""
        if not self.fails:
            return "post"
        return "pre+out" if self.preserve else "pre"


VARIANTS = {
    v.name: v
    for v in (
        Variant("run-ok", python=False, fails=False, post=True),
        Variant("run-fail", python=False, fails=True, preserve=True),
        Variant("py-ok", python=True, fails=False),  # then a checkpoint, after the commit
        Variant("py-fail", python=True, fails=True),
    )
}

# ---- the scenario ---------------------------------------------------------------------------


def build(root: Path) -> None:
    """A small tree with every kind of entry (seeded, so every scenario is the same)."""
    rng = random.Random(11)
    for i in range(40):
        mode = 0o755 if i % 7 == 0 else 0o600 if i % 11 == 0 else 0o644
        write(root, f"src/pkg{i % 4}/f{i}.txt", rng.randbytes(rng.randint(0, 2000)), mode=mode)
    write(root, "big.bin", rng.randbytes(1_500_000))  # a loose object, changed in place
    write(root, "src/app.py", "print('v1')\n")
    write(root, "run.sh", "#!/bin/sh\necho run\n", mode=0o755)
    write(root, "secret.key", "secret", mode=0o600)
    write(root, "docs/readme.md", "# readme\n")
    write(root, "docs/old-name.txt", "content that will move\n")
    write(root, "gone/inner/deep.txt", "a whole dir that will be deleted")
    write(root, "file-becomes-dir", "f")
    write(root, "dir-becomes-file/x", "x")
    write(root, "file-becomes-link", "k")
    (root / "empty" / "deeper").mkdir(parents=True)
    os.symlink("src/app.py", root / "link-to-file")
    os.symlink("docs", root / "link-to-dir")
    os.symlink("../nowhere", root / "dangling")
    write(root, "ro/inside.txt", "in a read-only dir")
    os.chmod(root / "ro", 0o555)


def dirty(root: Path) -> None:
    """Changes after snapshot 1, so the checkpoint stores new objects (its snapshot.* points)."""
    write(root, "src/pkg1/f1.txt", "edited after snapshot 1\n")
    write(root, "notes/dirty.txt", "not in any snapshot yet\n")
    os.unlink(root / "src/pkg2/f2.txt")


@dataclass
class Scenario:
    root: Path
    scripts: Path
    states: dict[str, TreeState]  # pre, pre+out, post
    dirty_status: object  # `status --json` of the pre-state against snapshot 1


def scripts_dir(base: Path) -> Path:
    d = base / "scripts"
    if not d.exists():
        d.mkdir()
        (d / "mutate.py").write_text(MUTATE)
        (d / "txn_child.py").write_text(TXN_CHILD)
    return d


def make_scenario(base: Path, name: str) -> Scenario:
    scripts = scripts_dir(base)
    root = base / name
    root.mkdir()
    build(root)
    for args in (("init",), ("snapshot", "-m", "base")):
        r = run_cli("-C", str(root), *args)
        assert r.returncode == 0, r.stderr
    dirty(root)
    pre = tree_state(root)
    r = run_cli("-C", str(root), "status", "--json")
    assert r.returncode == 0, r.stderr
    # The post-state is what the command does to the tree, found without snapfs in a copy.
    copy = base / f"{name}-copy"
    shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns(".snapfs"))
    assert tree_state(copy) == pre
    subprocess.run([sys.executable, str(scripts / "mutate.py"), str(copy), "0"], check=True)
    post = tree_state(copy)
    force_rmtree(copy)
    out = {k: v for k, v in post.items() if k == b"output" or k.startswith(b"output/")}
    assert len(out) == 2 and pre != post
    return Scenario(
        root, scripts, {"pre": pre, "pre+out": {**pre, **out}, "post": post}, json_of(r)
    )


def run_variant(sc: Scenario, v: Variant, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if v.python:
        full = {k: val for k, val in os.environ.items() if not k.startswith("SNAPFS_")}
        full.update(env)
        return subprocess.run(
            [
                sys.executable,
                str(sc.scripts / "txn_child.py"),
                str(sc.root),
                str(sc.scripts / "mutate.py"),
                "fail" if v.fails else "ok",
            ],
            env=full,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    flags = ["--post"] if v.post else []
    flags += ["--preserve", "output/**"] if v.preserve else []
    return run_cli(
        "-C",
        str(sc.root),
        "run",
        *flags,
        "--",
        sys.executable,
        str(sc.scripts / "mutate.py"),
        str(sc.root),
        str(v.exit_code),
        env=env,
        input="",
    )


def head_of(root: Path) -> int | None:
    con = sqlite3.connect(f"file:{root / '.snapfs/project.db'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()
    finally:
        con.close()
    return int(row[0]) if row and row[0] else None


def landing_for(v: Variant) -> Callable[[Sequence[str], int], str]:
    """A killed transaction is rolled back; with --preserve, what the command wrote to output/
    stays once the command has run (it runs right after txn.begun). A kill after the commit
    record (only py-ok goes on after it) keeps the post-state."""

    def expect(seq: Sequence[str], i: int) -> str:
        if "txn.before_commit_record" in seq[:i]:
            return "post"
        ran = "txn.begun" in seq[:i]
        return "pre+out" if v.preserve and ran else "pre"

    return expect


# ---- one case -------------------------------------------------------------------------------


def check_case(
    base: Path, v: Variant, case: Case, began: bool, name: str, then: Case | None = None
) -> list[str]:
    """Crash ``v`` at ``case`` (and, with ``then``, the recovery too, at ``then``); every
    problem found, one per line."""
    sc = make_scenario(base, name)
    try:
        problems = expect_sigkill(run_variant(sc, v, {"SNAPFS_CRASH_AT": case.spec}), case)
        if then is not None:  # recovery is a restore too: kill it part-way
            r = run_cli("-C", str(sc.root), "status", env={"SNAPFS_CRASH_AT": then.spec})
            problems += expect_sigkill(r, then)
        r = run_cli("-C", str(sc.root), "status", "--json")  # the next command recovers
        if r.returncode != 0:
            return problems + [f"status after the crash failed: {r.stderr.strip()[-300:]}"]
        now = tree_state(sc.root)
        want = sc.states[case.expect]
        if now != want:
            problems.append(f"tree is not the {case.expect}-state: {describe_diff(now, want)}")
        # HEAD agrees with the tree: rolled back, it is still snapshot 1 (killed before the
        # checkpoint was recorded) or the checkpoint 2 the rollback landed on; committed, it
        # is the checkpoint (status: what the transaction did) or the checkpoint after it, 3.
        head = head_of(sc.root)
        if case.expect == "post":
            d = run_cli("-C", str(sc.root), "diff", "2", "--json")
            want_status = {2: json_of(d), 3: CLEAN}
            if want_status[2] in (None, CLEAN):
                problems.append(f"diff 2 after a committed transaction: {d.stdout} {d.stderr}")
        else:
            want_status = {1: sc.dirty_status, 2: OUT_ADDED if case.expect == "pre+out" else CLEAN}
        if head not in want_status:
            problems.append(f"HEAD is snapshot {head}, not one of {sorted(want_status)}")
        elif json_of(r) != want_status[head]:
            problems.append(
                f"status at HEAD {head} is {r.stdout.strip()}, want {want_status[head]}"
            )
        log = json_of(run_cli("-C", str(sc.root), "log", "--json"))
        statuses = [t["status"] for t in log] if isinstance(log, list) else log
        outcome = "committed" if case.expect == "post" else "recovered"
        if statuses != ([outcome] if began else []):
            problems.append(f"transactions after recovery: {statuses}, want [{outcome}]")
        v_ = run_cli("-C", str(sc.root), "verify")
        if v_.returncode != 0:
            problems.append(f"verify after recovery: {v_.stdout.strip()} {v_.stderr.strip()}")
        problems += project_leftovers(sc.root)
        if case.expect == "post":  # done already: the next snapshot works and records it
            r = run_cli("-C", str(sc.root), "snapshot")
            st = run_cli("-C", str(sc.root), "status", "--json")
            if r.returncode != 0 or json_of(st) != CLEAN:
                problems.append(f"the next snapshot: {r.stderr.strip()[-200:]} {st.stdout}")
        else:  # the project works as before: the same command does what it always does
            r = run_variant(sc, v, {})
            if r.returncode != v.exit_code:
                problems.append(f"re-run exited {r.returncode}: {r.stderr.strip()[-300:]}")
        now = tree_state(sc.root)
        if now != sc.states[v.final]:
            problems.append(
                f"re-run: tree is not the {v.final}-state: "
                + describe_diff(now, sc.states[v.final])
            )
        v_ = run_cli("-C", str(sc.root), "verify")
        if v_.returncode != 0:
            problems.append(f"verify after the re-run: {v_.stdout.strip()}")
        problems += [
            f"{p} (after the re-run)" for p in project_leftovers(sc.root) if p not in problems
        ]
        return problems
    finally:
        force_rmtree(sc.root)


def count(base: Path, v: Variant) -> list[Case]:
    """Run the variant uncrashed with SNAPFS_CRASH_COUNT; one case per hit."""
    sc = make_scenario(base, "probe")
    hits = base / "hits"
    r = run_variant(sc, v, {"SNAPFS_CRASH_COUNT": str(hits)})
    assert r.returncode == v.exit_code, r.stderr
    assert tree_state(sc.root) == sc.states[v.final]
    seq = read_hits(hits)
    ends = ["txn.rolled_back"] if v.fails else ["txn.before_commit_record"]
    assert [p for p in seq if p.startswith("txn.")] == ["txn.begun", *ends], seq
    assert {"snapshot.objects_synced", "snapshot.objects_renamed"} <= set(seq), seq
    after = seq[seq.index(ends[0]) + 1 :]
    assert bool(after) == (v.name == "py-ok"), seq  # only py-ok goes on after its commit
    if v.fails:
        assert {"restore.intent_written", "restore.after_op", "restore.applied"} <= set(seq)
    force_rmtree(sc.root)
    return every_hit(seq, landing_for(v))


def run_sweep(tmp_path: Path, v: Variant, counted: list[Case], cases: list[Case]) -> None:
    began_at = next(c.index for c in counted if c.point == "txn.begun")

    def one(case: Case, i: int) -> list[str]:
        return check_case(tmp_path, v, case, case.index >= began_at, f"c{i}")

    sweep(f"transaction {v.name}", cases, one)


# Killed transactions whose recovery is itself killed at every point it passes: one rolled back
# from the committed-looking post-state, one whose own rollback was cut half-way.
RECOVERY: dict[str, tuple[str, int | str]] = {
    "py-ok": ("txn.before_commit_record", 1),
    "run-fail": ("restore.after_op", "mid"),
}


def count_recovery(base: Path, v: Variant, first: Case) -> list[Case]:
    """Crash ``v`` at ``first``, then count what the recovering command passes."""
    sc = make_scenario(base, "probe-recovery")
    assert expect_sigkill(run_variant(sc, v, {"SNAPFS_CRASH_AT": first.spec}), first) == []
    hits = base / "recovery-hits"
    r = run_cli("-C", str(sc.root), "status", env={"SNAPFS_CRASH_COUNT": str(hits)})
    assert r.returncode == 0, r.stderr
    assert tree_state(sc.root) == sc.states[first.expect]
    seq = read_hits(hits)
    assert "restore.after_op" in seq and all(p.startswith("restore.") for p in seq), seq
    force_rmtree(sc.root)
    return every_hit(seq, lambda _seq, _i: first.expect)


def run_recovery_sweep(tmp_path: Path, v: Variant, which: int | str | None) -> None:
    (first,) = pick(count(tmp_path, v), RECOVERY[v.name])
    cases = count_recovery(tmp_path, v, first)
    if which is not None:
        cases = pick(cases, ("restore.after_op", which))

    def one(case: Case, i: int) -> list[str]:
        return check_case(tmp_path, v, first, True, f"r{i}", then=case)

    sweep(f"transaction {v.name} killed at {first.spec}, recovery", cases, one)


# ---- tests ----------------------------------------------------------------------------------

SAMPLE: dict[str, list[tuple[str, int | str]]] = {
    "run-fail": [("restore.after_op", "mid")],  # killed half-way through the rollback
    "py-ok": [
        ("txn.before_commit_record", 1),  # the block finished, the commit not recorded
        ("snapshot.objects_synced", "last"),  # committed, then killed in the next checkpoint
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(SAMPLE))
def test_txn_crash_sample(tmp_path: Path, variant: str) -> None:
    v = VARIANTS[variant]
    cases = count(tmp_path, v)
    run_sweep(tmp_path, v, cases, pick(cases, *SAMPLE[variant]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_txn_crash_sweep_every_hit(tmp_path: Path, variant: str) -> None:
    v = VARIANTS[variant]
    cases = count(tmp_path, v)
    run_sweep(tmp_path, v, cases, cases)


@pytest.mark.slow
def test_txn_recovery_crash_sample(tmp_path: Path) -> None:
    run_recovery_sweep(tmp_path, VARIANTS["py-ok"], "mid")


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(RECOVERY))
def test_txn_recovery_crash_sweep_every_hit(tmp_path: Path, variant: str) -> None:
    run_recovery_sweep(tmp_path, VARIANTS[variant], None)


def test_txn_killed_with_its_journal_running_leaves_no_cookie(tmp_path: Path) -> None:
    # Was a known bug: only Journal.stop() removed .snapfs/journal-cookie-<run>, so a killed
    # transaction left it for ever; recovery now sweeps the cookies of dead journals.
    v = VARIANTS["run-ok"]
    problems = check_case(tmp_path, v, Case("txn.begun", 1, "pre"), True, "c")
    assert problems == []
