"""SIGKILL ``snapfs download`` at every crash point it passes, then run the same command again.

Two modes, each a real CLI child process fetching a 6 MiB file in 256 KiB extents over 4
connections from a throttled :class:`tests.faultserver.FaultServer` on 127.0.0.1:

=======  ========================================================================
plain    ``snapfs download URL -o DIR/m.bin --sha256 H --size N``
project  ``snapfs download URL -o models/m.bin -C PROJECT --sha256 H --size N``
=======  ========================================================================

Points: ``download.extent_recorded`` (once per extent), ``download.verified``, and
``download.placed``; in project mode also ``place.renamed``, ``place.stored`` and the
``snapshot.*`` points of storing the file as an object.

Right after the kill, DEST must be absent (before the rename onto it) with a resumable partial
whose recorded extents hold exactly the server's bytes (``extent_recorded:N`` means exactly N
extents), or complete and correct (from the rename on): never a wrong or partial file at DEST.
In project mode the tree must be exactly without DEST or with it. Then the same command, run
again, must finish with the right SHA-256, report the kept bytes as resumed, and fetch only what
was missing: the second run sends at most ``size - kept`` bytes and both runs together at most
``size`` plus what was in flight when the process died (per connection, one unrecorded extent
and two throttle slices). Nothing may be left behind (partials, temp files); in project mode
``snapfs verify`` must pass and the next ``snapfs snapshot`` must record the tree.

CI runs ``test_download_crash_sample`` (``.ci/run``: ``-m slow -k sample``). The full sweep::

    python -m pytest -m slow -s -k every_hit tests/crash/test_download_crash.py
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.crash.sweep import (
    Case,
    KnownBug,
    describe_diff,
    every_hit,
    expect_only,
    expect_sigkill,
    json_of,
    pick,
    project_leftovers,
    read_hits,
    sweep,
)
from tests.faultserver import FaultServer, Throttle
from tests.helpers import TreeState, run_cli, tree_state, wait_for, write

pytestmark = pytest.mark.crash

KiB, MiB = 1 << 10, 1 << 20
SIZE = 6 * MiB
CHUNK = 256 * KiB
CONNS = 4
RATE = 3 * MiB  # per connection: the whole file in about half a second over 4 connections
SLACK = CONNS * (CHUNK + 2 * (RATE // 20))  # in flight when killed: see the module docstring
PATH = "/m.bin"

PART_RECORD = KnownBug(
    key="orphan-part-record",
    reason=(
        "BUG: a download killed after its file was renamed onto DEST leaves the partial's"
        " extent record (<part>.snapfs-part.db, -wal, -shm) for ever: _run (snapfs/_download.py)"
        " drops it only after finish() returns, and re-running the command takes an 'already"
        " there' shortcut (_already_there in _download_plain; the store lookup or _already_there"
        " in _download_into) that returns without looking at the record"
    ),
    symptom=r"^leftover (\.snapfs/downloads/[0-9a-f]+|m\.bin)\.snapfs-part\.db(-wal|-shm)?$",
    witnesses=("download.placed:1", "place.renamed:1", "place.stored:1"),
)


@dataclass(frozen=True)
class Blob:
    data: bytes
    sha256: str


def make_blob() -> Blob:
    data = random.Random(21).randbytes(SIZE)
    return Blob(data, hashlib.sha256(data).hexdigest())


def env_for(base: Path, **more: str) -> dict[str, str]:
    env = {
        "SNAPFS_DOWNLOAD_CHUNK": str(CHUNK),
        "SNAPFS_DOWNLOAD_CONNECTIONS": str(CONNS),
        "SNAPFS_RETRY_BASE": "0.05",
        "SNAPFS_RETRY_CAP": "0.2",
        "SNAPFS_CONNECT_TIMEOUT": "2",
        "SNAPFS_READ_TIMEOUT": "5",
        "SNAPFS_STATE_DIR": str(base / "state"),  # host health: never ~/.local/state
    }
    env.update(more)
    return env


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


# ---- one scenario ---------------------------------------------------------------------------


@dataclass
class Scenario:
    mode: str
    base: Path  # plain: the folder holding DEST; project: the project root
    dest: Path

    @property
    def project(self) -> bool:
        return self.mode == "project"

    def argv(self, srv: FaultServer, blob: Blob) -> list[str]:
        where = (
            ["-o", "models/m.bin", "-C", str(self.base)] if self.project else ["-o", str(self.dest)]
        )
        return [
            "download",
            srv.url(PATH),
            *where,
            "--sha256",
            blob.sha256,
            "--size",
            str(SIZE),
            "--json",
        ]

    def part_record(self) -> Path | None:
        """The partial's extent record, if there is one."""
        if self.project:
            found = sorted((self.base / ".snapfs/downloads").glob("*.snapfs-part.db"))
            return found[0] if found else None
        db = self.dest.with_name(self.dest.name + ".snapfs-part.db")
        return db if db.exists() else None

    def leftovers(self) -> list[str]:
        if self.project:
            return project_leftovers(self.base)
        return [f"leftover {n}" for n in sorted(os.listdir(self.base)) if n != self.dest.name]


def make_scenario(tmp_path: Path, mode: str, name: str) -> Scenario:
    base = tmp_path / name
    base.mkdir()
    if mode == "plain":
        return Scenario(mode, base, base / "m.bin")
    write(base, "README.md", "a project that downloads a model\n")
    write(base, "workflows/a.json", '{"nodes": []}')
    (base / "models").mkdir()
    for args in (("init",), ("snapshot",)):
        r = run_cli("-C", str(base), *args)
        assert r.returncode == 0, r.stderr
    return Scenario(mode, base, base / "models/m.bin")


def extents(db: Path) -> list[tuple[int, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(int(a), int(b)) for a, b in con.execute("SELECT start, length FROM extents")]
    finally:
        con.close()


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sent_when_settled(srv: FaultServer) -> int:
    """Body bytes sent, once the server has noticed every dead connection."""
    wait_for(lambda: all(r.finished for r in srv.requests), "the server to notice the kill")
    return srv.bytes_sent_for(PATH)


def landing(seq: Sequence[str], i: int) -> str:
    """DEST appears with the rename onto it: place.renamed (project) or just before
    download.placed (plain)."""
    return "complete" if {"place.renamed", "download.placed"} & set(seq[: i + 1]) else "absent"


# ---- one case -------------------------------------------------------------------------------


@dataclass
class Reference:
    tree: TreeState | None  # project mode: the tree with DEST in place (from the counted run)
    mode_bits: int  # DEST's permission bits after an uncrashed run


def check_case(
    tmp_path: Path, srv: FaultServer, blob: Blob, mode: str, ref: Reference, case: Case, name: str
) -> list[str]:
    sc = make_scenario(tmp_path, mode, name)
    try:
        return _check(tmp_path, srv, blob, sc, ref, case)
    finally:
        shutil.rmtree(sc.base, ignore_errors=True)


def _check(
    tmp_path: Path, srv: FaultServer, blob: Blob, sc: Scenario, ref: Reference, case: Case
) -> list[str]:
    pre = tree_state(sc.base) if sc.project else None
    srv.clear_faults()
    srv.inject(PATH, Throttle(RATE))
    srv.reset_stats()
    r = run_cli(*sc.argv(srv, blob), env=env_for(tmp_path, SNAPFS_CRASH_AT=case.spec), input="")
    problems = expect_sigkill(r, case)
    sent1 = sent_when_settled(srv)
    srv.clear_faults()

    # Right after the kill: DEST absent with a resumable partial, or complete and correct.
    kept = 0
    if os.path.lexists(sc.dest):
        if not sc.dest.is_file() or sha_of(sc.dest) != blob.sha256:
            problems.append(
                f"DEST holds a wrong or partial file ({os.path.getsize(sc.dest)} bytes)"
            )
        if case.expect == "absent":
            problems.append("DEST appeared before the download was verified and renamed")
    else:
        if case.expect == "complete":
            problems.append("DEST is missing although it had been renamed into place")
        db = sc.part_record()
        part = db.with_suffix("") if db is not None else None  # <x>.snapfs-part
        if db is None or part is None or not part.exists():
            problems.append("no partial download to resume")
        else:
            got = extents(db)
            kept = sum(n for _s, n in got)
            data = part.read_bytes()
            bad = [s for s, n in got if data[s : s + n] != blob.data[s : s + n]]
            if bad:
                problems.append(f"recorded extents at {bad[:4]} don't hold the server's bytes")
            want = case.n * CHUNK if case.point == "download.extent_recorded" else SIZE
            if kept != want:
                problems.append(f"{kept} bytes recorded as verified, expected {want}")
    if sc.project:
        assert pre is not None and ref.tree is not None
        now = tree_state(sc.base)
        want_tree = ref.tree if case.expect == "complete" else pre
        if now != want_tree:
            problems.append(
                f"tree after the kill is not the {case.expect} one: "
                + describe_diff(now, want_tree)
            )

    # The same command again: it finishes, correct, fetching only what was missing.
    srv.reset_stats()
    r = run_cli(*sc.argv(srv, blob), env=env_for(tmp_path), input="")
    res = json_of(r)
    sent2 = sent_when_settled(srv)
    if r.returncode != 0 or not isinstance(res, dict):
        problems.append(f"re-run failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        res = {}
    if not sc.dest.is_file() or sha_of(sc.dest) != blob.sha256 or res.get("sha256") != blob.sha256:
        problems.append("after the re-run DEST is not the file")
    elif (os.stat(sc.dest).st_mode & 0o7777) != ref.mode_bits:
        problems.append(f"DEST mode {os.stat(sc.dest).st_mode & 0o7777:o}, want {ref.mode_bits:o}")
    # Resumed from the partial, or (killed after storing the object) linked from the store.
    if case.expect == "absent" and res.get("resumed") != kept and not res.get("reused"):
        problems.append(f"re-run resumed {res.get('resumed')} bytes, {kept} were kept")
    if sent2 > SIZE - kept:
        problems.append(f"re-run fetched {sent2} bytes; only {SIZE - kept} were missing")
    if sent1 + sent2 > SIZE + SLACK:
        problems.append(f"{sent1} + {sent2} bytes sent in all, more than {SIZE} + {SLACK}")
    problems += sc.leftovers()
    if sc.project:
        assert ref.tree is not None
        now = tree_state(sc.base)
        if now != ref.tree:
            problems.append(f"tree after the re-run: {describe_diff(now, ref.tree)}")
        v = run_cli("-C", str(sc.base), "verify")
        if v.returncode != 0:
            problems.append(f"verify: {v.stdout.strip()} {v.stderr.strip()}")
        s = run_cli("-C", str(sc.base), "snapshot")
        st = run_cli("-C", str(sc.base), "status", "--json")
        if s.returncode != 0 or json_of(st) != {"added": [], "modified": [], "deleted": []}:
            problems.append(f"the next snapshot: {s.stderr.strip()[-200:]} then {st.stdout}")
    return problems


def count(tmp_path: Path, srv: FaultServer, blob: Blob, mode: str) -> tuple[list[Case], Reference]:
    sc = make_scenario(tmp_path, mode, "probe")
    hits = tmp_path / "hits"
    srv.inject(PATH, Throttle(RATE))
    r = run_cli(*sc.argv(srv, blob), env=env_for(tmp_path, SNAPFS_CRASH_COUNT=str(hits)), input="")
    assert r.returncode == 0, r.stderr
    assert sent_when_settled(srv) == SIZE
    assert sha_of(sc.dest) == blob.sha256 and sc.leftovers() == []
    seq = read_hits(hits)
    assert seq.count("download.extent_recorded") == SIZE // CHUNK, seq
    tail = [p for p in seq if p != "download.extent_recorded" and not p.startswith("snapshot.")]
    want = ["download.verified", "place.stored", "place.renamed", "download.placed"]
    assert tail == (want if sc.project else [want[0], want[-1]]), seq
    ref = Reference(tree_state(sc.base) if sc.project else None, os.stat(sc.dest).st_mode & 0o7777)
    shutil.rmtree(sc.base)
    return every_hit(seq, landing), ref


def run_sweep(
    tmp_path: Path, srv: FaultServer, mode: str, chosen: Sequence[tuple[str, int | str]] | None
) -> None:
    blob = make_blob()
    srv.add(PATH, blob.data)
    cases, ref = count(tmp_path, srv, blob, mode)
    if chosen is not None:
        cases = pick(cases, *chosen)

    def one(case: Case, i: int) -> list[str]:
        return check_case(tmp_path, srv, blob, mode, ref, case, f"c{i}")

    sweep(f"download {mode}", cases, one, [])  # PART_RECORD is fixed: guarded below
    assert srv.errors == []


# ---- tests ----------------------------------------------------------------------------------

SAMPLE: dict[str, list[tuple[str, int | str]]] = {
    "plain": [("download.extent_recorded", "mid")],  # half the extents verified
    "project": [("place.stored", 1)],  # killed half-way through placing the finished file
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(SAMPLE))
def test_download_crash_sample(tmp_path: Path, srv: FaultServer, mode: str) -> None:
    run_sweep(tmp_path, srv, mode, SAMPLE[mode])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "project"])
def test_download_crash_sweep_every_hit(tmp_path: Path, srv: FaultServer, mode: str) -> None:
    run_sweep(tmp_path, srv, mode, None)


@pytest.mark.parametrize(
    ("mode", "point"), [("plain", "download.placed"), ("project", "place.renamed")]
)
def test_download_killed_after_placing_leaves_no_part_record(
    tmp_path: Path, srv: FaultServer, mode: str, point: str
) -> None:
    blob = make_blob()
    srv.add(PATH, blob.data)
    cases, ref = count(tmp_path, srv, blob, mode)
    (case,) = pick(cases, (point, 1))
    expect_only(check_case(tmp_path, srv, blob, mode, ref, case, "c"), PART_RECORD, case.spec)
