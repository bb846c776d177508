"""SIGKILL a real ``snapfs restore`` at every named crash point, then recover and check exactness.

Each case builds a project, snapshots it (the target), mutates it heavily (the pre-state), and runs
``python -m snapfs restore 1 --yes`` in a child process with ``SNAPFS_CRASH_AT`` set. The child must
die by SIGKILL. The next command (``snapfs status``) recovers, after which the tree must be exactly
the pre-state (crash before the intent was written) or exactly the target (crash after it), the
store must verify, and no staging or temp files may be left behind.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapfs
from tests.crash.sweep import even_sample
from tests.helpers import TreeState, run_cli, tree_state, write

pytestmark = pytest.mark.crash

TARGET_ID = "1"


# ---- the scenario ---------------------------------------------------------------------------


def build_base(root: Path, *, files: int = 300, big: int = 2 << 20, seed: int = 1) -> None:
    """A few hundred small files in nested dirs with mixed modes, symlinks, empty and read-only
    dirs, and one large incompressible file."""
    rng = random.Random(seed)
    for i in range(files):
        rel = f"src/pkg{i % 6}/sub{i % 4}/f{i}.txt"
        mode = 0o755 if i % 7 == 0 else 0o600 if i % 11 == 0 else 0o444 if i % 13 == 0 else 0o644
        write(root, rel, rng.randbytes(rng.randint(0, 3000)), mode=mode)
    write(root, "big.bin", rng.randbytes(big))
    write(root, "docs/readme.md", "# readme\n")
    write(root, "docs/empty.txt", b"")
    (root / "empty" / "deeper").mkdir(parents=True)
    os.symlink("src/pkg0/sub0/f0.txt", root / "link-to-file")
    os.symlink("docs", root / "link-to-dir")
    os.symlink("../../nowhere", root / "dangling")
    os.symlink("/etc/hostname", root / "absolute")
    write(root, "becomes-dir", "file that turns into a dir")
    (root / "dir-becomes-file").mkdir()
    write(root, "dir-becomes-file/inner", "i")
    (root / "dir-becomes-link").mkdir()
    write(root, "dir-becomes-link/inner", "j")
    os.symlink("docs/readme.md", root / "link-becomes-file")
    os.symlink("docs", root / "link-becomes-dir")
    write(root, "file-becomes-link", "k")
    write(root, "ro/inside.txt", "in a read-only dir")
    os.chmod(root / "ro", 0o555)
    (root / "private").mkdir(mode=0o700)
    write(root, "private/key", "secret", mode=0o600)


def mutate(root: Path, *, seed: int = 2) -> None:
    """Every kind of change: edits, deletes, adds, chmods and file/dir/symlink type changes."""
    rng = random.Random(seed)
    paths = sorted((root / "src").rglob("*.txt"))
    for p in paths[::5]:  # edits, some same-size
        os.chmod(p, 0o644)
        data = p.read_bytes()
        p.write_bytes(
            bytes(b ^ 0xFF for b in data) if data and rng.random() < 0.5 else rng.randbytes(100)
        )
    for p in paths[1::9]:
        p.unlink()
    for p in paths[2::17]:
        if p.exists():
            os.chmod(p, 0o700)
    shutil.rmtree(root / "src/pkg5/sub1")
    for i in range(50):
        write(root, f"added/d{i % 5}/n{i}.bin", rng.randbytes(rng.randint(1, 4000)))
    with open(root / "big.bin", "r+b") as f:  # a new 2 MB object for the pre-restore snapshot
        f.seek(1 << 20)
        f.write(rng.randbytes(4096))
    os.unlink(root / "becomes-dir")
    write(root, "becomes-dir/child/x", "now a dir")
    shutil.rmtree(root / "dir-becomes-file")
    write(root, "dir-becomes-file", "now a file")
    shutil.rmtree(root / "dir-becomes-link")
    os.symlink("docs", root / "dir-becomes-link")
    os.unlink(root / "link-becomes-file")
    write(root, "link-becomes-file", "now a file", mode=0o755)
    os.unlink(root / "link-becomes-dir")
    write(root, "link-becomes-dir/y", "now a dir")
    os.unlink(root / "file-becomes-link")
    os.symlink("big.bin", root / "file-becomes-link")
    os.unlink(root / "dangling")
    os.symlink("retargeted", root / "dangling")
    os.chmod(root / "ro", 0o755)
    write(root, "ro/added.txt", "written while writable")
    os.chmod(root / "empty", 0o711)
    os.rmdir(root / "empty/deeper")
    write(root, "docs/empty.txt", b"no longer empty")


@dataclass
class Scenario:
    root: Path
    target: TreeState
    pre: TreeState
    plan_ops: int  # restore.after_op hits
    renames: int  # restore.after_rename hits


def make_scenario(root: Path, *, files: int = 300) -> Scenario:
    root.mkdir()
    build_base(root, files=files)
    target = tree_state(root)
    with snapfs.init(root) as p:
        assert p.snapshot("target").id == int(TARGET_ID)
    mutate(root)
    pre = tree_state(root)
    assert pre != target
    with snapfs.open(root) as p:
        plan = p.restore(TARGET_ID, dry_run=True).plan
    assert tree_state(root) == pre  # a dry run changes nothing
    renames = sum(1 for op in plan if op.action in ("put", "link"))
    return Scenario(root, target, pre, len(plan), renames)


# ---- checks ---------------------------------------------------------------------------------


def leftovers(root: Path) -> list[str]:
    """Everything a finished (or recovered) operation must not leave in .snapfs/."""
    state = root / ".snapfs"
    found = [f"staging/{n}" for n in os.listdir(state / "staging")]
    found += [f"tmp/{n}" for n in os.listdir(state / "tmp")] if (state / "tmp").exists() else []
    found += [n for n in os.listdir(state) if n.startswith(".")]  # .tmp-*, .index-<pid>
    if (state / "intent.json").exists():
        found.append("intent.json")
    return found


def describe_diff(got: TreeState, want: TreeState, limit: int = 8) -> str:
    keys = sorted(set(got) ^ set(want) | {k for k in set(got) & set(want) if got[k] != want[k]})
    lines = [f"{k!r}: got {got.get(k)!r:.60} want {want.get(k)!r:.60}" for k in keys[:limit]]
    return f"{len(keys)} paths differ:\n  " + "\n  ".join(lines)


def crash_restore(sc: Scenario, spec: str) -> subprocess.CompletedProcess[str]:
    r = run_cli("-C", str(sc.root), "restore", TARGET_ID, "--yes", env={"SNAPFS_CRASH_AT": spec})
    assert r.returncode == -signal.SIGKILL, (
        f"SNAPFS_CRASH_AT={spec}: expected death by SIGKILL, got exit {r.returncode}\n{r.stderr}"
    )
    return r


def recover_and_check(
    sc: Scenario, expect: str, label: str, *, from_is_head: bool = False
) -> tuple[str, bool]:
    """Recover with an ordinary command and check every invariant.

    Returns where the tree landed ('pre' or 'target') and whether status is clean there.
    ``from_is_head``: the pre-state is what HEAD recorded before the restore began.
    """
    r = run_cli("-C", str(sc.root), "status", "--json")
    assert r.returncode == 0, f"{label}: status after crash failed: {r.stderr}"
    now = tree_state(sc.root)
    landed = "target" if now == sc.target else "pre" if now == sc.pre else None
    assert landed is not None, (
        f"{label}: the tree is neither the pre-state nor the target.\n"
        f"vs target: {describe_diff(now, sc.target)}\nvs pre: {describe_diff(now, sc.pre)}"
    )
    if expect != "either":
        assert landed == expect, f"{label}: recovered to the {landed} state, expected the {expect}"
    changes = json.loads(r.stdout)
    clean = not any(changes.values())
    # HEAD must agree with the tree: the target after a finished restore, unchanged otherwise.
    if landed == "target":
        assert clean, f"{label}: HEAD is not the restored snapshot: {changes}"
    else:
        assert clean == from_is_head, f"{label}: HEAD moved although the restore did not happen"
    v = run_cli("-C", str(sc.root), "verify")
    assert v.returncode == 0, f"{label}: verify after recovery: {v.stdout}{v.stderr}"
    return landed, clean


def assert_clean(sc: Scenario, left: list[str], label: str) -> None:
    assert left == [], f"{label}: left behind after recovery (status, verify): {left}"


def check_undo(sc: Scenario, label: str) -> None:
    """After recovery the restore can be completed and undone exactly, like an uncrashed one."""
    with snapfs.open(sc.root) as p:
        p.restore(TARGET_ID)
        assert tree_state(sc.root) == sc.target, f"{label}: re-running the restore"
        undo = [s for s in p.snapshots() if s.kind == "pre-restore"]
        assert undo, f"{label}: no pre-restore snapshot was recorded"
        p.restore(undo[-1].id)
        assert tree_state(sc.root) == sc.pre, (
            f"{label}: the pre-restore snapshot does not hold the pre-state: "
            + describe_diff(tree_state(sc.root), sc.pre)
        )
        assert p.verify().ok
    assert leftovers(sc.root) == [], f"{label}: {leftovers(sc.root)}"


def resolve_hit(sc: Scenario, point: str, which: str) -> int:
    total = {"restore.after_op": sc.plan_ops, "restore.after_rename": sc.renames}.get(point, 1)
    if which == "first":
        return 1
    if which == "last":
        return total
    return max(1, round(total * int(which.rstrip("%")) / 100))


# ---- tests ----------------------------------------------------------------------------------

CASES = [
    ("restore.intent_written", "first", "target"),
    ("restore.after_op", "first", "target"),
    ("restore.after_op", "10%", "target"),
    ("restore.after_op", "35%", "target"),
    ("restore.after_op", "60%", "target"),
    ("restore.after_op", "85%", "target"),
    ("restore.after_op", "last", "target"),
    ("restore.after_rename", "first", "target"),
    ("restore.after_rename", "50%", "target"),
    ("restore.after_rename", "last", "target"),
    ("restore.head_moved", "first", "target"),
    ("restore.applied", "first", "target"),
    ("snapshot.objects_synced", "first", "pre"),
    ("snapshot.objects_renamed", "first", "pre"),
    ("snapshot.index_committed", "first", "pre"),
]


@pytest.mark.parametrize(("point", "which", "expect"), CASES, ids=[f"{p}:{w}" for p, w, _ in CASES])
def test_crash_at_named_point_recovers_exactly(
    tmp_path: Path, point: str, which: str, expect: str
) -> None:
    sc = make_scenario(tmp_path / "proj")
    n = resolve_hit(sc, point, which)
    label = f"{point}:{n}"
    crash_restore(sc, label)
    recover_and_check(sc, expect, label)
    left = leftovers(sc.root)
    check_undo(sc, label)  # checked first: the next write sweeps what recovery left
    assert_clean(sc, left, label)


@pytest.mark.parametrize(
    "second", ["restore.intent_written", "restore.after_op:3", "restore.after_rename:2"]
)
def test_crash_during_recovery_recovers_exactly(tmp_path: Path, second: str) -> None:
    """Recovery is a restore too: killing it part-way must still end at the target."""
    sc = make_scenario(tmp_path / "proj")
    crash_restore(sc, f"restore.after_op:{sc.plan_ops // 2}")
    r = run_cli("-C", str(sc.root), "status", env={"SNAPFS_CRASH_AT": second})
    assert r.returncode == -signal.SIGKILL, f"recovery did not reach {second}: {r.stderr}"
    assert (sc.root / ".snapfs/intent.json").exists()
    recover_and_check(sc, "target", f"crash in recovery at {second}")
    assert_clean(sc, leftovers(sc.root), second)
    check_undo(sc, second)


def count_hits(sc: Scenario, count_file: Path) -> list[str]:
    """Run the restore to the end with SNAPFS_CRASH_COUNT; every point reached, in order."""
    r = run_cli(
        "-C",
        str(sc.root),
        "restore",
        TARGET_ID,
        "--yes",
        env={"SNAPFS_CRASH_COUNT": str(count_file)},
    )
    assert r.returncode == 0, r.stderr
    assert tree_state(sc.root) == sc.target
    return count_file.read_text().split()


def test_crash_point_hit_counts_match_the_plan(tmp_path: Path) -> None:
    sc = make_scenario(tmp_path / "proj")
    seq = count_hits(sc, tmp_path / "hits")
    hits = collections.Counter(seq)
    restore_hits = {k: v for k, v in hits.items() if k.startswith("restore.")}
    assert restore_hits == {
        "restore.intent_written": 1,
        "restore.after_op": sc.plan_ops,
        "restore.after_rename": sc.renames,
        "restore.head_moved": 1,
        "restore.applied": 1,
    }
    # The pre-restore snapshot stores new content once, through each of its durable steps.
    snapshot_hits = {k: v for k, v in hits.items() if not k.startswith("restore.")}
    assert {"snapshot.objects_synced", "snapshot.objects_renamed"} <= set(snapshot_hits)
    assert all(k.startswith("snapshot.") and v == 1 for k, v in snapshot_hits.items()), hits
    # The protocol's order: snapshot, intent, apply, done.
    intent_at = seq.index("restore.intent_written")
    assert all(k.startswith("snapshot.") for k in seq[:intent_at])
    assert all(k in ("restore.after_op", "restore.after_rename") for k in seq[intent_at + 1 : -2])
    assert seq[-2:] == ["restore.head_moved", "restore.applied"]
    assert leftovers(sc.root) == []


def _holds_lock(lock: Path, pid: int) -> bool:
    """Has process ``pid`` taken the project lock? (The holder writes its pid into the file.)"""
    try:
        return f"pid {pid} " in lock.read_text()
    except FileNotFoundError:
        return False


def _wait_then_kill(
    child: subprocess.Popen[bytes], ready: Callable[[], bool], delay: float
) -> bool:
    """Kill ``child`` ``delay`` seconds after ``ready()`` first holds. False if it exited first."""
    while not ready():
        if child.poll() is not None:
            return False
        time.sleep(0.0005)
    time.sleep(delay)
    if child.poll() is not None:
        return False
    child.send_signal(signal.SIGKILL)
    child.wait()
    return True


def test_sigkill_from_outside_during_large_restore(tmp_path: Path) -> None:
    """Kill 3000-file restores at seeded random moments, half of them after the intent exists.

    One project goes back and forth between its two states: each attempt restores towards the
    state it is not in, and is killed from outside while it runs.
    """
    rng = random.Random(7)
    sc = make_scenario(tmp_path / "proj", files=3000)
    state = sc.root / ".snapfs"
    states = {"base": sc.target, "mutated": sc.pre}
    current, head_clean = "mutated", False
    outcomes = []
    for attempt in range(4):
        goal = "base" if current == "mutated" else "mutated"
        snaps = json.loads(run_cli("-C", str(sc.root), "list", "--json").stdout)
        holding = [s["id"] for s in snaps if (s["root"] == snaps[0]["root"]) == (goal == "base")]
        assert holding, f"attempt {attempt}: no snapshot holds the {goal} state"
        errlog = (tmp_path / f"stderr{attempt}").open("w+")
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapfs",
                "-C",
                str(sc.root),
                "restore",
                str(holding[0]),
                "--yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=errlog,
        )
        try:
            if attempt % 2 == 0:
                # Anywhere from the lock onwards: scan, pre-restore snapshot, staging or apply.
                ready = functools.partial(_holds_lock, state / "lock", child.pid)
                delay = rng.uniform(0.0, 0.5)
            else:
                ready = (state / "intent.json").exists
                delay = rng.uniform(0.0, 0.1)
            killed = _wait_then_kill(child, ready, delay)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            errlog.seek(0)
            stderr = errlog.read()
            errlog.close()
        label = f"attempt {attempt}, {current} -> {goal} ({'killed' if killed else 'finished'})"
        assert child.returncode in (0, -signal.SIGKILL), (
            f"{label}: exit {child.returncode}: {stderr}"
        )
        intent_on_disk = (state / "intent.json").exists()
        step = Scenario(sc.root, states[goal], states[current], 0, 0)
        expect = "target" if intent_on_disk or not killed else "either"
        landed, head_clean = recover_and_check(step, expect, label, from_is_head=head_clean)
        outcomes.append(
            (label, f"intent on disk: {intent_on_disk}", f"landed: {landed}", leftovers(sc.root))
        )
        if landed == "target":
            current = goal
    print("\noutside kills:", *outcomes, sep="\n  ")
    # Checked last, so one attempt's leftovers don't hide another attempt's wrong tree.
    for label, _i, _l, left in outcomes:
        assert_clean(sc, left, label)


def _sweep_specs(seq: list[str], sample: int | None) -> list[tuple[str, int, str]]:
    """(point, hit, expected landing) for every hit in a counted run, or an even sample of them.

    A crash before the intent is on disk must leave the pre-state; from the intent on, the target.
    """
    specs: list[tuple[str, int, str]] = []
    seen: collections.Counter[str] = collections.Counter()
    landing = "pre"
    for name in seq:
        seen[name] += 1
        if name == "restore.intent_written":
            landing = "target"
        specs.append((name, seen[name], landing))
    if sample is not None:
        specs = even_sample(specs, sample)  # every single, every last, an even spread of the rest
    return specs


def _sweep(tmp_path: Path, sample: int | None) -> None:
    probe = make_scenario(tmp_path / "probe")
    specs = _sweep_specs(count_hits(probe, tmp_path / "hits"), sample)
    failures: list[str] = []
    for i, (point, n, expect) in enumerate(specs):
        sc = make_scenario(tmp_path / f"p{i}")
        assert (sc.plan_ops, sc.renames) == (
            probe.plan_ops,
            probe.renames,
        )  # deterministic scenario
        label = f"{point}:{n}"
        try:
            crash_restore(sc, label)
            recover_and_check(sc, expect, label)
            assert_clean(sc, leftovers(sc.root), label)
        except AssertionError as exc:
            failures.append(f"{label}: {str(exc).splitlines()[0]}")
        finally:
            shutil.rmtree(sc.root, ignore_errors=True)
    points = len({p for p, _, _ in specs})
    print(
        f"\nrestore: 1 operation x {points} points x {len(specs)} hits tried, {len(failures)} failures"
    )
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_crash_sweep_sample(tmp_path: Path) -> None:
    """A deterministic sample of ~50 (point, hit) pairs; CI runs this one."""
    _sweep(tmp_path, sample=50)


@pytest.mark.slow
def test_crash_sweep_every_hit(tmp_path: Path) -> None:
    """Every hit of every point (several hundred SIGKILLs)."""
    _sweep(tmp_path, sample=None)
