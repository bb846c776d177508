"""Transactions through the Python API, on real directories, real SQLite and real processes.

A transaction takes a ``pre-op`` checkpoint on entry. Any exception (KeyboardInterrupt included)
puts the tree back exactly as it was and re-raises; success records the change set. Nested
transactions are savepoints. Preserved paths survive a rollback. A transaction whose process is
SIGKILLed is rolled back by the next ``snapfs`` command or ``snapfs.open()``, or kept on request;
a live owner is never disturbed. Automatic checkpoints are pruned to the newest ``auto_keep``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapfs
from snapfs._txn import Owner
from tests.helpers import (
    TreeState,
    mutate_tree,
    populate_tree,
    run_cli,
    tree_state,
    wait_for,
    write,
)

REPO = Path(__file__).resolve().parents[2]


def txn_rows(root: Path) -> list[dict[str, object]]:
    """The transactions as ``snapfs log --json`` shows them (newest first), read by a real CLI
    process. Note that this is a snapfs command, so it also applies the crash policy."""
    r = run_cli("-C", str(root), "log", "--json", "-n", "100")
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, object]] = json.loads(r.stdout)
    return rows


def preserved_merge(before: TreeState, after: TreeState, prefix: bytes) -> TreeState:
    """What a rollback with everything under ``prefix`` preserved must leave: ``before`` outside
    it, ``after`` inside it (and the directory itself, which holds the kept paths)."""
    top = prefix.rstrip(b"/")  # the directory holding preserved paths stays too
    inside = lambda p: p.startswith(prefix) or p == top  # noqa: E731
    out = {p: v for p, v in before.items() if not inside(p)}
    out.update({p: v for p, v in after.items() if inside(p)})
    return out


# ---- rollback on an exception ----------------------------------------------------------------


class ImportFailed(Exception):
    pass


@pytest.mark.parametrize("by_path", [False, True], ids=["project", "path"])
def test_exception_rolls_back_exactly_and_is_reraised_unchanged(
    project: snapfs.Project, by_path: bool
) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    err = ImportFailed("half-way through")
    target: snapfs.Project | Path = root if by_path else project
    with pytest.raises(ImportFailed) as raised:
        with snapfs.transaction(target, label="import portrait") as tx:
            assert tx.status == "open"
            mutate_tree(root)
            assert tree_state(root) != before
            raise err
    assert raised.value is err
    assert raised.value.args == ("half-way through",)
    assert tree_state(root) == before
    assert tx.status == "rolled-back"
    assert tx.checkpoint is not None and tx.checkpoint.kind == "pre-op"
    assert not project.status()  # HEAD is the checkpoint, and the tree equals it
    (row,) = project.state.txns()
    assert (row.status, row.label, row.checkpoint) == ("rolled-back", "import portrait", tx.checkpoint.id)
    assert row.error is not None and "ImportFailed" in row.error and "half-way through" in row.error


def test_keyboard_interrupt_rolls_back_exactly(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with pytest.raises(KeyboardInterrupt):
        with snapfs.transaction(project, label="ctrl-c") as tx:
            mutate_tree(root)
            raise KeyboardInterrupt
    assert tree_state(root) == before
    assert tx.status == "rolled-back"
    assert project.state.txns()[0].status == "rolled-back"


def test_rollback_of_a_project_that_started_empty(project: snapfs.Project) -> None:
    root = project.root
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project, label="first import"):
            populate_tree(root)
            raise ImportFailed
    assert tree_state(root) == {}


# ---- what changed, explicit rollback, commit -----------------------------------------------


def test_changes_name_added_modified_deleted_and_moved(project: snapfs.Project) -> None:
    root = project.root
    write(root, "keep.txt", "same")
    write(root, "edit.txt", "v1")
    write(root, "drop.txt", "bye")
    write(root, "old/name.txt", "moved content, unique")
    with snapfs.transaction(project, label="edit") as tx:
        assert not tx.changes
        (root / "edit.txt").write_text("v2")
        os.unlink(root / "drop.txt")
        os.rename(root / "old/name.txt", root / "old/renamed.txt")  # a pure rename
        write(root, "new/dir/file.txt", "new")
        ch = tx.changes
        assert ch.added == ["new/", "new/dir/", "new/dir/file.txt"]
        assert ch.modified == ["edit.txt"]
        assert ch.deleted == ["drop.txt"]
        assert ch.moved == [("old/name.txt", "old/renamed.txt")]
        during = tree_state(root)
    assert tx.status == "committed"
    assert tree_state(root) == during
    assert tx.changes == ch
    (row,) = project.state.txns()
    assert row.status == "committed" and row.post is None and row.error is None
    assert row.changes is not None and json.loads(row.changes) == ch.to_dict()
    assert json.loads(row.changes)["moved"] == [["old/name.txt", "old/renamed.txt"]]


def test_explicit_rollback_then_the_block_ends_normally(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with snapfs.transaction(project, label="try it") as tx:
        mutate_tree(root)
        expected = tx.changes
        undone = tx.rollback()
        assert tree_state(root) == before
        assert tx.status == "rolled-back"
    assert undone == expected and tx.changes == expected
    assert tx.status == "rolled-back"
    assert tree_state(root) == before
    (row,) = project.state.txns()
    assert row.status == "rolled-back" and row.post is None
    assert row.changes is not None and json.loads(row.changes) == expected.to_dict()
    with pytest.raises(snapfs.UsageError):
        tx.commit()
    with pytest.raises(snapfs.UsageError):
        tx.rollback()


@pytest.mark.parametrize("journal", [True, False])
def test_rollback_reads_only_what_could_be_a_move(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    """Files the checkpoint lacks are deleted by a rollback, so they are not read; only one as
    large as a file that went can be a move's destination, and only that one is hashed."""
    import snapfs._project as project_mod
    import snapfs._scan as scan_mod

    root = tmp_path / "proj"
    root.mkdir()
    write(root, "docs/old-name.txt", "moved content")
    write(root, "keep.txt", "k")
    time.sleep(0.05)  # past the racy window: a racy file is rightly read again
    with snapfs.init(root, journal=journal) as project:
        before = tree_state(root)
        reads: list[str] = []
        for mod, name in ((scan_mod, "read_all"), (scan_mod, "hash_fd"), (project_mod, "hash_fd")):
            real = getattr(mod, name)

            def counting(
                fd: int, *more: object, _real=real, _name=f"{mod.__name__}.{name}"
            ) -> object:
                reads.append(_name)
                return _real(fd, *more)

            monkeypatch.setattr(mod, name, counting)
        with snapfs.transaction(project, label="install") as tx:
            for i in range(40):
                write(root, f"plugin/p{i % 4}/f{i}.py", "x" * (100 + i))
            os.makedirs(root / "newdir")
            os.rename(root / "docs/old-name.txt", root / "newdir/new-name.txt")
            reads.clear()
            undone = tx.rollback()
        assert tree_state(root) == before
        assert undone.moved == [("docs/old-name.txt", "newdir/new-name.txt")]
        assert len([a for a in undone.added if a.endswith(".py")]) == 40
        assert reads == ["snapfs._project.hash_fd"], reads


def test_commit_with_a_post_snapshot_pairs_it_with_the_checkpoint(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with snapfs.transaction(project, label="import portrait", post_snapshot=True) as tx:
        mutate_tree(root)
    after = tree_state(root)
    assert tx.status == "committed"
    assert tx.checkpoint is not None and tx.post is not None
    assert tx.checkpoint.kind == "pre-op" and tx.post.kind == "post"
    assert tx.post.id > tx.checkpoint.id
    (row,) = project.state.txns()
    assert (row.status, row.checkpoint, row.post) == ("committed", tx.checkpoint.id, tx.post.id)
    assert row.changes is not None and json.loads(row.changes) == tx.changes.to_dict()
    # The pair brackets exactly the operation.
    d = project.diff(tx.checkpoint.id, tx.post.id)
    assert (d.added, d.modified, d.deleted) != ([], [], [])
    assert not project.diff(tx.post.id)
    project.restore(tx.checkpoint.id)
    assert tree_state(root) == before
    project.restore(tx.post.id)
    assert tree_state(root) == after


# ---- nested transactions are savepoints ------------------------------------------------------


def test_inner_exception_caught_in_outer_rolls_back_the_inner_only(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with snapfs.transaction(project, label="outer") as outer:
        write(root, "outer-1.txt", "outer before inner")
        (root / "src/app.py").write_text("outer edit\n")
        mid = tree_state(root)
        with pytest.raises(ImportFailed):
            with snapfs.transaction(project, label="inner") as inner:
                mutate_tree(root)
                write(root, "outer-1.txt", "inner overwrote this")
                raise ImportFailed
        assert inner.status == "rolled-back"
        assert tree_state(root) == mid
        write(root, "outer-2.txt", "outer after inner")
        final = tree_state(root)
    assert outer.status == "committed"
    assert tree_state(root) == final and final != before
    rows = {r.label: r for r in project.state.txns()}
    assert rows["inner"].status == "rolled-back" and rows["inner"].parent == outer.id
    assert rows["outer"].status == "committed" and rows["outer"].parent is None
    assert sorted(outer.changes.added) == ["outer-1.txt", "outer-2.txt"]
    assert outer.changes.modified == ["src/app.py"]


def test_inner_explicit_rollback_keeps_outer_changes(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    with snapfs.transaction(project, label="outer") as outer:
        os.unlink(root / "docs/readme.md")
        mid = tree_state(root)
        with snapfs.transaction(project, label="inner") as inner:
            mutate_tree(root)
            inner.rollback()
            assert tree_state(root) == mid
        assert inner.status == "rolled-back"
        assert tree_state(root) == mid
    assert outer.status == "committed"
    assert tree_state(root) == mid


def test_outer_rollback_undoes_a_committed_inner(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project, label="outer") as outer:
            write(root, "outer.txt", "o")
            with snapfs.transaction(project, label="inner") as inner:
                mutate_tree(root)
            assert inner.status == "committed"
            raise ImportFailed
    assert tree_state(root) == before
    assert outer.status == "rolled-back"
    rows = {r.label: r.status for r in project.state.txns()}
    assert rows == {"outer": "rolled-back", "inner": "committed"}


def test_an_inner_left_open_ends_with_its_outer(project: snapfs.Project) -> None:
    """A savepoint still open when its outer transaction commits is released with it: no
    record may stay "open", or the next process would "recover" it once this one exits and
    roll committed work back to the inner checkpoint."""
    root = project.root
    write(root, "a.txt", "a")
    with snapfs.transaction(project, label="outer") as outer:
        inner = snapfs.transaction(project, label="inner")
        inner.begin()  # never ended by the caller
        write(root, "b.txt", "b")
    try:
        assert outer.status == "committed"
        assert (root / "b.txt").read_text() == "b"
        assert [(r.label, r.status) for r in project.state.txns(status="open")] == []
        journal = [t.name for t in threading.enumerate() if t.name.startswith("snapfs-journal")]
        assert journal == [], "the inner transaction's journal outlived its outer"
    finally:
        # Clean-up only, so that a failure above doesn't also stall the thread-leak check.
        stop = getattr(inner, "_stop_journal", None)
        if stop is not None:
            stop()


# ---- preserved paths -------------------------------------------------------------------------


def _preserve_scenario(root: Path, out: str) -> None:
    write(root, f"{out}/modified.txt", "old result")
    write(root, f"{out}/deleted.txt", "a result the operation deletes")
    write(root, f"{out}/untouched.txt", "same")


def _preserve_mutation(root: Path, out: str) -> None:
    (root / f"{out}/modified.txt").write_text("new result")
    os.unlink(root / f"{out}/deleted.txt")
    write(root, f"{out}/new.txt", "a new result")
    write(root, f"{out}/run-2/deep/model.bin", os.urandom(3000))


def test_config_preserve_survives_a_rollback(project_dir: Path) -> None:
    root = project_dir
    snapfs.init(root).close()
    (root / ".snapfs/config").write_text('preserve = ["output/**"]\n')
    populate_tree(root)
    _preserve_scenario(root, "output")
    before = tree_state(root)
    with snapfs.open(root) as p:
        with pytest.raises(ImportFailed):
            with snapfs.transaction(p, label="render"):
                mutate_tree(root)
                _preserve_mutation(root, "output")
                failed = tree_state(root)
                raise ImportFailed
    after = tree_state(root)
    assert after == preserved_merge(before, failed, b"output/")
    # Spelled out: new kept, modified keeps its new content, deleted stays deleted.
    assert (root / "output/new.txt").read_text() == "a new result"
    assert (root / "output/run-2/deep/model.bin").is_file()
    assert (root / "output/modified.txt").read_text() == "new result"
    assert not (root / "output/deleted.txt").exists()
    assert (root / "src/app.py").read_text() == "print('v1')\n"


def test_preserve_argument_survives_a_rollback(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    _preserve_scenario(root, "results")
    before = tree_state(root)
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project, label="train", preserve=["results/**"]):
            mutate_tree(root)
            _preserve_mutation(root, "results")
            write(root, "not-preserved/output/x", "goes")  # same name elsewhere: not preserved
            failed = tree_state(root)
            raise ImportFailed
    assert tree_state(root) == preserved_merge(before, failed, b"results/")
    assert not (root / "not-preserved").exists()


def test_preserved_paths_in_a_new_directory_keep_it(project: snapfs.Project) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project, label="logs", preserve=["*.log"]):
            mutate_tree(root)
            write(root, "newdir/sub/run.log", "log line\n")
            write(root, "newdir/sub/junk.txt", "junk")
            write(root, "newdir/other/junk.txt", "junk")
            raise ImportFailed
    after = tree_state(root)
    extra = {p: v for p, v in after.items() if p not in before}
    assert set(extra) == {b"newdir", b"newdir/sub", b"newdir/sub/run.log"}
    assert {p: v for p, v in after.items() if p in before} == before
    assert (root / "newdir/sub/run.log").read_text() == "log line\n"


def test_config_and_argument_preserve_combine(project_dir: Path) -> None:
    root = project_dir
    snapfs.init(root).close()
    (root / ".snapfs/config").write_text('preserve = ["output/**"]\n')
    write(root, "src/a.txt", "a")
    before = tree_state(root)
    with snapfs.open(root) as p:
        with pytest.raises(ImportFailed):
            with snapfs.transaction(p, preserve=["cache/**"]):
                write(root, "output/o.txt", "o")
                write(root, "cache/c.txt", "c")
                write(root, "src/a.txt", "changed")
                raise ImportFailed
    assert (root / "output/o.txt").read_text() == "o"
    assert (root / "cache/c.txt").read_text() == "c"
    assert (root / "src/a.txt").read_text() == "a"
    assert {p: v for p, v in tree_state(root).items() if p in before} == before


def test_ignored_paths_are_left_alone_by_a_rollback(project: snapfs.Project) -> None:
    root = project.root
    write(root, ".snapfsignore", "*.tmp\n")
    write(root, "keep.tmp", "before")
    write(root, "a.txt", "a")
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project):
            write(root, "keep.tmp", "during")
            write(root, "new.tmp", "new")
            write(root, "a.txt", "changed")
            raise ImportFailed
    assert (root / "keep.tmp").read_text() == "during"
    assert (root / "new.tmp").read_text() == "new"
    assert (root / "a.txt").read_text() == "a"


# ---- a crash inside a transaction -------------------------------------------------------------

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import snapfs
from tests.helpers import mutate_tree, write

root, signals, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
preserve = sys.argv[4:]
with snapfs.transaction(root, label="crashy import", preserve=preserve) as tx:
    mutate_tree(root)
    write(root, "out/result.txt", "written before the crash")
    if how == "nested":
        with snapfs.transaction(tx.project, label="inner") as inner:
            write(root, "inner.txt", "inner")
            os.kill(os.getpid(), 9)
    (signals / "ready").write_text(str(tx.id))
    if how == "self-kill":
        os.kill(os.getpid(), 9)
    while not (signals / "go").exists():
        time.sleep(0.01)
print(json.dumps(tx.changes.to_dict()))
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts; any still running at the end is killed and reaped."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)  # reaps it and closes its pipes


def start_child(
    children: list[subprocess.Popen[str]], root: Path, how: str, *preserve: str
) -> tuple[subprocess.Popen[str], Path]:
    signals = root.parent / "signals"
    signals.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(signals), how, *preserve],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    return proc, signals


def crashed_project(project_dir: Path, config: str = "") -> tuple[Path, TreeState]:
    root = project_dir
    snapfs.init(root).close()
    if config:
        (root / ".snapfs/config").write_text(config)
    populate_tree(root)
    return root, tree_state(root)


def wait_ready(proc: subprocess.Popen[str], signals: Path) -> None:
    wait_for(
        lambda: (signals / "ready").exists() or proc.poll() is not None, "the child to be ready"
    )
    assert (signals / "ready").exists(), f"the child ended early:\n{proc.communicate()[1]}"


@pytest.mark.crash
def test_sigkill_self_inside_transaction_is_rolled_back_by_open(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, _ = start_child(children, root, "self-kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    partial = tree_state(root)
    assert partial != before and (root / "out/result.txt").exists()
    with snapfs.open(root) as p:
        assert tree_state(root) == before
        (row,) = p.state.txns()
        assert row.status == "recovered"
        assert row.error is not None and "died" in row.error
        assert not p.status()
    rows = txn_rows(root)
    assert [(r["label"], r["status"]) for r in rows] == [("crashy import", "recovered")]
    assert tree_state(root) == before


@pytest.mark.crash
def test_sigkill_from_outside_is_rolled_back_by_the_next_cli_command(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, signals = start_child(children, root, "wait")
    wait_ready(proc, signals)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert tree_state(root) != before
    r = run_cli("status", cwd=root)
    assert r.returncode == 0, r.stderr
    assert tree_state(root) == before
    assert "No changes since snapshot" in r.stdout
    assert [r["status"] for r in txn_rows(root)] == ["recovered"]


@pytest.mark.crash
def test_sigkill_in_a_nested_transaction_rolls_back_to_the_outer_checkpoint(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, _ = start_child(children, root, "nested")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (root / "inner.txt").exists()
    snapfs.open(root).close()
    assert tree_state(root) == before
    assert {(r["label"], r["status"]) for r in txn_rows(root)} == {
        ("crashy import", "recovered"),
        ("inner", "recovered"),
    }


@pytest.mark.crash
def test_crash_recovery_honours_the_transactions_preserve(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, _ = start_child(children, root, "self-kill", "out/**")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    partial = tree_state(root)
    snapfs.open(root).close()
    assert tree_state(root) == preserved_merge(before, partial, b"out/")
    assert (root / "out/result.txt").read_text() == "written before the crash"


@pytest.mark.crash
def test_recover_keep_first_keeps_the_partial_state(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, _ = start_child(children, root, "self-kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    partial = tree_state(root)
    r = run_cli("recover", "--keep", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "Kept the partial state" in r.stdout
    assert tree_state(root) == partial
    # Marked, and later commands leave it alone.
    rows = txn_rows(root)
    assert [(r["label"], r["status"]) for r in rows] == [("crashy import", "kept")]
    snapfs.open(root).close()
    assert tree_state(root) == partial
    r = run_cli("status", cwd=root)
    assert r.returncode == 0 and "src/app.py" in r.stdout
    assert tree_state(root) == partial


@pytest.mark.crash
def test_crash_policy_keep_in_config(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir, config='crash_policy = "keep"\n')
    proc, _ = start_child(children, root, "self-kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    partial = tree_state(root)
    with snapfs.open(root) as p:
        assert tree_state(root) == partial
        assert [r.status for r in p.state.txns()] == ["kept"]


@pytest.mark.crash
def test_an_unreaped_killed_owner_is_dead(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    """A SIGKILLed owner whose parent has not reaped it yet is a zombie: it can never finish its
    transaction, so the next open must roll back, not wait for it."""
    root, before = crashed_project(project_dir)
    proc, signals = start_child(children, root, "wait")
    wait_ready(proc, signals)
    os.kill(proc.pid, signal.SIGKILL)
    # Not reaped (no wait()): poll /proc until the kernel has made it a zombie.
    wait_for(lambda: _proc_state(proc.pid) == "Z", "the child to become a zombie")
    r = run_cli("status", cwd=root)
    assert r.returncode == 0, r.stderr
    assert tree_state(root) == before
    proc.wait(timeout=30)
    assert [r["status"] for r in txn_rows(root)] == ["recovered"]


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.mark.crash
def test_a_reused_pid_is_not_the_owner(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    """The owner died and its pid now belongs to another live process (here: this one). The
    process start time tells them apart, so the transaction is rolled back."""
    root, before = crashed_project(project_dir)
    proc, _ = start_child(children, root, "self-kill")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    db = sqlite3.connect(root / ".snapfs/project.db")
    try:
        with db:
            (owner,) = db.execute("SELECT owner FROM transactions").fetchone()
            reused = {**json.loads(owner), "pid": os.getpid()}
            db.execute("UPDATE transactions SET owner = ?", (json.dumps(reused),))
    finally:
        db.close()
    snapfs.open(root).close()
    assert tree_state(root) == before
    assert [r["status"] for r in txn_rows(root)] == ["recovered"]


# ---- a live owner is left alone ----------------------------------------------------------------


def test_live_owner_is_left_alone_then_commits(
    project_dir: Path, children: list[subprocess.Popen[str]]
) -> None:
    root, before = crashed_project(project_dir)
    proc, signals = start_child(children, root, "wait")
    wait_ready(proc, signals)
    partial = tree_state(root)
    assert partial != before
    for args in (("status",), ("recover",), ("recover", "--keep"), ("log",), ("list",)):
        r = run_cli(*args, cwd=root)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        assert tree_state(root) == partial, f"'snapfs {' '.join(args)}' disturbed a live owner"
    with snapfs.open(root) as p:
        assert tree_state(root) == partial
        assert [r.status for r in p.state.txns()] == ["open"]
        p.recover()
        p.recover(keep=True)
        assert tree_state(root) == partial
        assert [r.status for r in p.state.txns()] == ["open"]
    assert [r["status"] for r in txn_rows(root)] == ["open"]
    (signals / "go").write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert tree_state(root) == partial
    (row,) = txn_rows(root)
    assert row["status"] == "committed"
    assert row["changes"] == json.loads(out)
    assert "out/result.txt" in json.loads(out)["added"]


# ---- automatic checkpoints and retention --------------------------------------------------------


def test_retention_keeps_the_newest_automatic_checkpoints(project: snapfs.Project) -> None:
    root = project.root
    write(root, "f.txt", "0")
    manual = project.snapshot("by hand")
    with snapfs.transaction(project, label="op"):
        write(root, "op.txt", "op")
    auto_ids = []
    for i in range(25):
        write(root, "f.txt", str(i + 1))
        info = snapfs.checkpoint(project, kind="auto", label=f"auto {i}")
        assert info.kind == "auto"
        auto_ids.append(info.id)
    snaps = {s.id: s for s in project.snapshots()}
    assert sorted(i for i, s in snaps.items() if s.kind == "auto") == auto_ids[-20:]
    assert snaps[manual.id].kind == "manual"
    assert [s.kind for s in snaps.values() if s.kind not in ("auto",)] == ["manual", "pre-op"]
    assert project.head == auto_ids[-1]
    # A pruned checkpoint is gone; a kept one still restores exactly.
    with pytest.raises(snapfs.SnapshotNotFound):
        project.restore(auto_ids[0])
    project.restore(auto_ids[5])
    assert (root / "f.txt").read_text() == "6"


def test_retention_limit_comes_from_config(project_dir: Path) -> None:
    root = project_dir
    snapfs.init(root).close()
    (root / ".snapfs/config").write_text("auto_keep = 3\n")
    ids = []
    for i in range(6):
        write(root, "f.txt", str(i))
        ids.append(snapfs.checkpoint(root, kind="pre-import").id)
    with snapfs.open(root) as p:
        assert [s.id for s in p.snapshots()] == ids[-3:]


def test_retention_never_prunes_head(project: snapfs.Project) -> None:
    root = project.root
    ids = []
    for i in range(5):
        write(root, "f.txt", str(i))
        ids.append(snapfs.checkpoint(project, kind="auto").id)
    project.restore(ids[0])  # HEAD is now the oldest automatic checkpoint
    assert project.head == ids[0]
    doomed = project.prune_automatic(2)
    assert sorted(doomed) == ids[1:3]
    left = [s.id for s in project.snapshots() if s.kind == "auto"]
    assert left == [ids[0], *ids[3:]]


def test_gc_keep_last_never_deletes_an_open_transactions_checkpoint(
    project: snapfs.Project,
) -> None:
    root = project.root
    populate_tree(root)
    before = tree_state(root)
    with pytest.raises(ImportFailed):
        with snapfs.transaction(project, label="long import") as tx:
            assert tx.checkpoint is not None
            mutate_tree(root)
            for i in range(3):
                write(root, "progress.txt", str(i))
                snapfs.checkpoint(project, kind="auto")
            project.snapshot("manual inside")
            # Another process collects garbage while the transaction is open.
            r = run_cli("gc", "--keep-last", "1", cwd=root)
            assert r.returncode == 0, r.stderr
            ids = [s.id for s in project.snapshots()]
            assert tx.checkpoint.id in ids
            project.gc(keep_last=1)
            assert tx.checkpoint.id in [s.id for s in project.snapshots()]
            assert project.verify().ok
            raise ImportFailed
    assert tree_state(root) == before


def test_checkpointed_decorator_checkpoints_before_each_call(project: snapfs.Project) -> None:
    root = project.root
    write(root, "models.txt", "")
    calls: list[str] = []

    @snapfs.checkpointed(kind="pre-import")
    def import_model(project: snapfs.Project | Path | str, name: str) -> str:
        calls.append(name)
        with open(root / "models.txt", "a") as f:
            f.write(name + "\n")
        write(root, f"models/{name}.bin", name)
        return f"imported {name}"

    assert import_model(project, "a") == "imported a"
    assert import_model(name="b", project=root) == "imported b"
    assert import_model(str(root), "c") == "imported c"
    assert calls == ["a", "b", "c"]
    cps = [s for s in project.snapshots() if s.kind == "pre-import"]
    assert len(cps) == 3
    assert all(s.label == "before import_model" for s in cps)
    # Each checkpoint was taken before its call: it holds exactly the earlier imports.
    for n, cp in enumerate(cps):
        project.restore(cp.id)
        assert (root / "models.txt").read_text() == "".join(f"{x}\n" for x in "abc"[:n])
        assert sorted(p.name for p in (root / "models").glob("*")) == [
            f"{x}.bin" for x in "abc"[:n]
        ]


def test_checkpointed_without_a_project_argument_is_a_usage_error(
    project: snapfs.Project,
) -> None:
    calls: list[str] = []

    @snapfs.checkpointed(kind="pre-import")
    def import_model(name: str, project: snapfs.Project | None = None) -> None:
        calls.append(name)

    with pytest.raises(snapfs.UsageError, match="project"):
        import_model("a")
    assert calls == []
    assert project.snapshots() == []


def test_only_commits_that_outlive_no_process_skip_the_fsync(tmp_path: Path) -> None:
    """A transaction's owner and a watcher's mark matter only while processes live, so their
    commits skip the fsync; everything after them is fsynced again, even when one fails."""
    root = tmp_path / "p"
    root.mkdir()
    with snapfs.init(root) as p:
        db = p.state.db

        def synchronous() -> int:
            return int(db.execute("PRAGMA synchronous").fetchone()[0])

        assert synchronous() == 2  # FULL
        cp = p.snapshot("checkpoint").id
        owner = Owner.current().dumps()
        txn = p.state.begin_txn(label="t", parent=None, checkpoint=cp, owner=owner, preserve="")
        seen: list[str] = []
        db.set_trace_callback(seen.append)
        p.state.set_txn_owner(txn, owner)
        db.set_trace_callback(None)
        sync = [s for s in seen if "synchronous" in s or s.startswith(("UPDATE", "COMMIT"))]
        assert [s.split(" ")[0] for s in sync] == ["PRAGMA", "UPDATE", "COMMIT", "PRAGMA"]
        # NORMAL, not OFF: in WAL mode it skips the commit's fsync but still syncs the WAL
        # before a checkpoint, so a power cut can't corrupt the database.
        assert (sync[0], sync[-1]) == ("PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL")
        assert synchronous() == 2
        p.state.set_meta("k", "v", durable=False)
        assert synchronous() == 2 and p.state.get_meta("k") == "v"
        with pytest.raises(sqlite3.OperationalError):
            with p.state._synced(False), db:
                db.execute("UPDATE no_such_table SET x = 1")
        assert synchronous() == 2
    with snapfs.open(root) as p:  # written for every other process
        assert p.state.get_meta("k") == "v"
        assert [r.id for r in p.state.txns() if r.owner == owner] == [txn]


def test_pruning_the_journal_skips_the_fsync(tmp_path: Path) -> None:
    """A finished run's events are of no use to anyone: a power cut that brings them back
    costs nothing (the next prune drops them), so deleting them is not worth an fsync."""
    root = tmp_path / "p"
    root.mkdir()
    with snapfs.init(root) as p:
        with snapfs.transaction(p, "makes the journal table"):
            (root / "a").write_text("a")
        db = p.state.db
        seen: list[str] = []
        db.set_trace_callback(seen.append)
        p.state.prune_journal(keep_runs=(), only_run="some-run")
        p.state.prune_journal(keep_runs=(), older_than=0)
        db.set_trace_callback(None)
        sync = [s for s in seen if "synchronous" in s or s.startswith(("DELETE", "COMMIT"))]
        assert [s.split(" ")[0] for s in sync] == ["PRAGMA", "DELETE", "COMMIT", "PRAGMA"] * 2
        assert sync[0] == "PRAGMA synchronous=NORMAL" and sync[-1] == "PRAGMA synchronous=FULL"
        assert int(db.execute("PRAGMA synchronous").fetchone()[0]) == 2
        assert db.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
