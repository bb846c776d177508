"""Fail every file and OS call of snapshot, restore, gc and download, one at a time.

Each operation runs once with ``SNAPFS_FAULT_COUNT`` to learn the calls it makes, per kind
(open, write, fsync, rename, link, ioctl, unlink, mkdir, truncate, chmod; see
``snapfs/_faults.py``). Then, in a fresh scenario per case, the CLI runs with
``SNAPFS_FAULT_AT=KIND:N:ERRNO``: the Nth call of that kind fails once with an errno picked in
turn from the ones that kind meets in real life (ENOSPC, EIO, EACCES, EMFILE, EXDEV).

After every fault, whatever the operation did:

- it either tolerated the fault (exit 0: a fallback, or a cleanup that the next command
  finishes) or stopped with exit 3 and one line on stderr, ``snapfs: ...``, that names the
  operation and a file (never a traceback, never "internal error", never "(?)");
- ``snapfs recover`` succeeds, and the tree is exactly the pre-state or the post-state;
- nothing is partially written under a final name: every snapshot restores exactly, ``snapfs
  verify`` is clean, a downloaded DEST is absent or whole;
- the operation run again without a fault does what it always does, and nothing is left in
  ``.snapfs`` (temp dirs, staging, intent, dot-temp files, partial downloads).

CI runs ``test_fault_sweep_sample`` (one case per kind and operation). The full sweep, every
call of every kind of every operation::

    python -m pytest -m slow -s -k every_call tests/fault/test_fault_sweep.py
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import random
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.crash.sweep import describe_diff, force_rmtree, project_leftovers
from tests.faultserver import FaultServer
from tests.helpers import TreeState, run_cli, tree_state, write

pytestmark = pytest.mark.fault

MiB = 1 << 20

# The errnos each kind of call meets in real life; a case (kind, n) uses them in turn.
ERRNOS: dict[str, tuple[str, ...]] = {
    "open": ("ENOSPC", "EMFILE", "EACCES", "EIO"),
    "write": ("ENOSPC", "EIO"),
    "fsync": ("EIO", "ENOSPC"),
    "rename": ("ENOSPC", "EXDEV", "EACCES", "EIO"),
    "link": ("EXDEV", "ENOSPC", "EACCES", "EIO"),
    "ioctl": ("EIO", "EXDEV", "ENOSPC"),
    "unlink": ("EACCES", "EIO"),
    "mkdir": ("ENOSPC", "EACCES"),
    "truncate": ("ENOSPC", "EIO"),
    "chmod": ("EACCES", "EIO"),
}

OPS = ("snapshot", "restore", "gc", "download")
NAMES = {  # what the one-line error must say the operation was
    "snapshot": r"snapshot|reading the project",
    "restore": r"restor|reading the project",  # the scan that saves the state it leaves
    "gc": r"gc|garbage",
    "download": r"download|placing the file",
}


@dataclass(frozen=True)
class FaultCase:
    op: str
    kind: str
    n: int

    @property
    def errno_name(self) -> str:
        names = ERRNOS[self.kind]
        return names[(self.n - 1) % len(names)]

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.n}:{self.errno_name}"


# ---- scenarios ------------------------------------------------------------------------------


def build(root: Path, seed: int = 5) -> None:
    """A small tree with every kind of entry: packed small files, a loose object, a symlink, an
    empty dir, a read-only file."""
    rng = random.Random(seed)
    for i in range(8):
        write(root, f"src/pkg{i % 2}/f{i}.txt", rng.randbytes(rng.randint(0, 3000)))
    write(root, "big.bin", rng.randbytes(1_200_000))  # above pack_threshold: a loose object
    write(root, "run.sh", "#!/bin/sh\n", mode=0o755)
    write(root, "secret.key", "k", mode=0o600)
    (root / "empty").mkdir()
    os.symlink("src/pkg0/f0.txt", root / "link")


def mutate(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    write(root, "src/pkg0/f0.txt", f"edited {seed}\n")
    os.unlink(root / f"src/pkg{seed % 2}/f{seed}.txt")
    write(root, f"added/n{seed}.bin", rng.randbytes(2000))
    write(root, "big.bin", rng.randbytes(1_100_000 + seed))
    os.chmod(root / "run.sh", 0o644 if seed % 2 else 0o755)
    (root / "link").unlink()
    os.symlink(f"elsewhere-{seed}", root / "link")


def cli(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("-C", str(root), *args, env={**ENV, **(env or {})})


ENV: dict[str, str] = {}  # per-sweep settings (the host-health state dir)


def ok(r: subprocess.CompletedProcess[str], what: str) -> None:
    assert r.returncode == 0, f"{what}: exit {r.returncode}: {r.stderr.strip()}"


def snapshot_ids(root: Path) -> list[int]:
    con = sqlite3.connect(f"file:{root / '.snapfs/project.db'}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in con.execute("SELECT id FROM snapshots ORDER BY id")]
    finally:
        con.close()


@dataclass
class Scenario:
    root: Path
    states: dict[int, TreeState] = field(default_factory=dict)  # snapshot id -> its tree
    pre: TreeState = field(default_factory=dict)


def make(base: Path, op: str, name: str, srv: FaultServer | None) -> Scenario:
    root = base / name
    root.mkdir()
    build(root)
    sc = Scenario(root)
    ok(cli(root, "init"), "init")
    ok(cli(root, "snapshot"), "snapshot 1")
    sc.states[1] = tree_state(root)
    if op == "snapshot":
        mutate(root, 1)
    elif op == "restore":
        mutate(root, 2)
        ok(cli(root, "snapshot"), "snapshot 2")
        sc.states[2] = tree_state(root)
        write(root, "src/pkg0/dirty.txt", "not in any snapshot\n")  # restore saves it first
    elif op == "gc":
        for sid in (2, 3):
            mutate(root, sid)
            ok(cli(root, "snapshot"), f"snapshot {sid}")
            sc.states[sid] = tree_state(root)
    sc.pre = tree_state(root)
    return sc


BLOB = random.Random(9).randbytes(3 * MiB + 123)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()


def op_argv(op: str, srv: FaultServer | None) -> list[str]:
    if op == "snapshot":
        return ["snapshot", "-m", "under fault"]
    if op == "restore":
        return ["restore", "1"]
    if op == "gc":
        return ["gc", "--keep-last", "1"]
    assert srv is not None
    return ["download", srv.url("/m.bin"), "-o", "models/m.bin", "--sha256", BLOB_SHA]


# ---- one case -------------------------------------------------------------------------------

HIT = re.compile(r"^!(\w+)\t(.*)$", re.M)
IN_PARENS = re.compile(r"\([^()?\s]+\)")  # "(models/m.bin)", "(link)": a project path
PATHLIKE = re.compile(r"[\w.-]+/[\w./-]+|\b[\w-]+\.\w{1,12}\b")


def check_error(r: subprocess.CompletedProcess[str], case: FaultCase, hit: str) -> list[str]:
    """Exit 0 (tolerated), or exit 3 with one clear line naming the operation and a file."""
    if r.returncode == 0:
        return []
    problems = []
    if r.returncode != 3:
        problems.append(f"exit {r.returncode}, want 0 or 3")
    err = r.stderr.strip()
    lines = err.splitlines()
    if len(lines) != 1:
        problems.append(f"stderr is {len(lines)} lines, want one: {err[-400:]!r}")
    line = lines[-1] if lines else ""
    if "Traceback" in err or "internal error" in err:
        problems.append(f"not a clear error: {line!r}")
    if not line.startswith("snapfs: "):
        problems.append(f"stderr does not start with 'snapfs: ': {line!r}")
    if not re.search(NAMES[case.op], line, re.I):
        problems.append(f"the error does not name the operation ({case.op}): {line!r}")
    # A file: the one the fault hit, its folder, or the project file the step was about.
    names = {os.path.basename(hit), os.path.basename(os.path.dirname(hit))} - {"", "?"}
    if "(?)" in line or not (
        any(n in line for n in names) or PATHLIKE.search(line) or IN_PARENS.search(line)
    ):
        problems.append(f"the error does not name the file ({hit}): {line!r}")
    return problems


def run_case(base: Path, case: FaultCase, name: str, srv: FaultServer | None) -> list[str]:
    sc = make(base, case.op, name, srv)
    log = base / f"{name}.calls"
    try:
        before = snapshot_ids(sc.root)
        r = cli(
            sc.root,
            *op_argv(case.op, srv),
            env={"SNAPFS_FAULT_AT": case.spec, "SNAPFS_FAULT_COUNT": str(log)},
        )
        hits = HIT.findall(log.read_text()) if log.exists() else []
        if not hits:  # a thread's calls may come in another order: the Nth came to nothing
            return [] if r.returncode == 0 else [f"no fault injected, yet exit {r.returncode}"]
        problems = check_error(r, case, hits[0][1])
        rc = cli(sc.root, "recover")
        if rc.returncode != 0:
            problems.append(f"recover failed: {rc.stderr.strip()[-300:]}")
        problems += check_state(sc, case, before, r.returncode)
        return [f"{p} [fault hit {hits[0][1]}]" for p in problems]
    finally:
        force_rmtree(sc.root)
        log.unlink(missing_ok=True)


def check_state(sc: Scenario, case: FaultCase, before: list[int], rc: int) -> list[str]:
    root, problems = sc.root, []
    now = tree_state(root)
    ids = snapshot_ids(root)
    if case.op == "snapshot":
        if now != sc.pre:
            problems.append(f"a snapshot changed the tree: {describe_diff(now, sc.pre)}")
        if ids not in (before, before + [before[-1] + 1]):
            problems.append(f"snapshots {ids} after a snapshot from {before}")
        if rc != 0 and ids != before:
            problems.append(f"a failed snapshot recorded snapshot {ids[-1]}")
    elif case.op == "restore":
        if now not in (sc.pre, sc.states[1]):
            problems.append(f"restore left neither state: {describe_diff(now, sc.states[1])}")
    elif case.op == "gc":
        if now != sc.pre:
            problems.append(f"gc changed the tree: {describe_diff(now, sc.pre)}")
        if 3 not in ids or not set(ids) <= {1, 2, 3}:
            problems.append(f"snapshots {ids} after gc --keep-last 1 of {before}")
    else:
        dest = root / "models/m.bin"
        if dest.exists() or dest.is_symlink():
            data = dest.read_bytes()
            if data != BLOB:
                problems.append(f"DEST holds {len(data)} bytes that are not the file")
        elif rc == 0:
            problems.append("download exited 0 without DEST")
    v = cli(root, "verify")
    if v.returncode != 0:
        problems.append(f"verify: {(v.stdout + v.stderr).strip()[-300:]}")
    # The operation again, without a fault, does what it always does.
    argv = ["restore", "1"] if case.op == "restore" else op_argv(case.op, SERVER[0])
    r = cli(root, *argv)
    if r.returncode != 0:
        problems.append(f"{case.op} again: exit {r.returncode}: {r.stderr.strip()[-200:]}")
    states = dict(sc.states)
    if case.op == "restore" and tree_state(root) != sc.states[1]:
        problems.append(f"restore again: {describe_diff(tree_state(root), sc.states[1])}")
    if case.op == "download" and (root / "models/m.bin").read_bytes() != BLOB:
        problems.append("download again: DEST is wrong")
    ids = snapshot_ids(root)
    if case.op in ("snapshot", "restore") and ids[-1] not in states:
        states[ids[-1]] = sc.pre  # the snapshot taken again, or the one the restore saved first
    if case.op == "gc" and ids != [3]:
        problems.append(f"gc again left snapshots {ids}")
    # Nothing partial under a final name: every snapshot left lands exactly, verify is clean.
    for sid in ids:
        want = states.get(sid)
        if want is None:
            continue
        r = cli(root, "restore", str(sid))
        if r.returncode != 0:
            problems.append(f"restore {sid}: {r.stderr.strip()[-200:]}")
        elif tree_state(root) != want:
            problems.append(
                f"snapshot {sid} restores wrong: {describe_diff(tree_state(root), want)}"
            )
    v = cli(root, "verify")
    if v.returncode != 0:
        problems.append(f"verify at the end: {(v.stdout + v.stderr).strip()[-300:]}")
    problems += project_leftovers(root)
    return problems


SERVER: list[FaultServer | None] = [None]


# ---- the sweep ------------------------------------------------------------------------------


def count(base: Path, op: str, srv: FaultServer | None) -> dict[str, int]:
    """Run ``op`` without a fault; the number of calls of each kind it makes."""
    sc = make(base, op, f"probe-{op}", srv)
    log = base / f"probe-{op}.calls"
    r = cli(sc.root, *op_argv(op, srv), env={"SNAPFS_FAULT_COUNT": str(log)})
    assert r.returncode == 0, r.stderr
    kinds = collections.Counter(line.split("\t", 1)[0] for line in log.read_text().splitlines())
    force_rmtree(sc.root)
    log.unlink()
    assert kinds["open"] and kinds["rename"] and kinds["fsync"], kinds  # it did real work
    return dict(kinds)


def every_call(counts: dict[str, int], op: str) -> list[FaultCase]:
    return [FaultCase(op, k, n) for k in sorted(counts) for n in range(1, counts[k] + 1)]


def sample(counts: dict[str, int], op: str) -> list[FaultCase]:
    """One case per kind: the middle call (the first calls are mostly the lock and config)."""
    return [
        FaultCase(op, k, (counts[k] + 1) // 2 + 1 if counts[k] > 2 else counts[k])
        for k in sorted(counts)
    ]


def sweep(
    base: Path, op: str, srv: FaultServer | None, pick: Callable[..., list[FaultCase]]
) -> None:
    SERVER[0] = srv
    counts = count(base, op, srv)
    cases = pick(counts, op)
    t0 = time.monotonic()
    failures: dict[str, list[str]] = {}
    for i, case in enumerate(cases):
        try:
            problems = run_case(base, case, f"c{i}", srv)
        except Exception as exc:  # a crashed check is a finding, not the end of the sweep
            problems = [f"the case raised {type(exc).__name__}: {exc}"]
        if problems:
            failures[case.spec] = problems
    calls = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
        f"\nfault sweep {op}: {len(counts)} kinds x {len(cases)} calls tried ({calls}),"
        f" {len(failures)} failures in {time.monotonic() - t0:.1f} s"
    )
    lines = [f"{spec}: {p}" for spec, ps in failures.items() for p in ps]
    assert not lines, f"{op}: {len(failures)} failing case(s):\n" + "\n".join(lines)


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        s.add("/m.bin", BLOB)
        yield s


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path) -> Iterator[None]:
    ENV["SNAPFS_STATE_DIR"] = str(tmp_path / "state")  # host health: not the user's
    yield
    ENV.clear()


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_fault_sweep_sample(tmp_path: Path, srv: FaultServer, op: str) -> None:
    sweep(tmp_path, op, srv if op == "download" else None, sample)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_fault_sweep_every_call(tmp_path: Path, srv: FaultServer, op: str) -> None:
    sweep(tmp_path, op, srv if op == "download" else None, every_call)


def test_fault_seam_counts_and_fails_the_named_call(tmp_path: Path) -> None:
    """The seam itself: counting sees the calls, and KIND:N:ERRNO fails exactly the Nth."""
    root = tmp_path / "p"
    root.mkdir()
    write(root, "a.txt", "a")
    ok(cli(root, "init"), "init")
    log = tmp_path / "calls"
    ok(cli(root, "snapshot", env={"SNAPFS_FAULT_COUNT": str(log)}), "counted snapshot")
    renames = [ln for ln in log.read_text().splitlines() if ln.startswith("rename\t")]
    n = next(i for i, ln in enumerate(renames, 1) if ln.endswith(".pack"))
    log.unlink()
    write(root, "b.txt", "b")
    r = cli(
        root,
        "snapshot",
        env={"SNAPFS_FAULT_AT": f"rename:{n}:ENOSPC", "SNAPFS_FAULT_COUNT": str(log)},
    )
    assert r.returncode == 3, r.stderr
    assert "disk is full" in r.stderr
    failed = [ln for ln in log.read_text().splitlines() if ln.startswith("!")]
    assert len(failed) == 1 and failed[0].startswith("!rename\t"), failed
    assert snapshot_ids(root) == [1]
    bad = cli(root, "status", env={"SNAPFS_FAULT_AT": "nonsense"})
    assert bad.returncode != 0 and "SNAPFS_FAULT_AT" in bad.stderr
    assert errno.ENOSPC  # the names in ERRNOS are real errnos
    assert all(isinstance(getattr(errno, n), int) for ns in ERRNOS.values() for n in ns)
