"""SIGKILL ``snapfs gc --keep-last 1`` at every crash point it passes, then check every snapshot
it keeps.

The scenario makes four snapshots whose deletions give gc every kind of work: a pack with
nothing live (``gc.pack_forgotten``), a pack half dead (``gc.repack_written``,
``gc.repack_committed``) and loose objects of large files (``gc.after_unlink``); then it
restores snapshot 2, so HEAD (2) and the last snapshot (4) are kept and 1 and 3 go. Two
variants: large files stored as copies, and as sealed hardlinks (``hardlink_threshold`` below
their size), where gc also drops the seals of unlinked objects.

gc changes only the store, so "pre- or post-state" is about the store. After the kill the next
command (``snapfs status``) must work and see the working tree unchanged, the snapshot list must
be exactly the kept one, ``snapfs verify`` must pass, every kept snapshot must restore exactly
(tree compared by content, mode and link with the tree it was taken from) and nothing may be
left in ``.snapfs/tmp`` or staging. Then gc, run again, must leave the store exactly as an
uncrashed gc leaves it: the same loose objects, the same packed objects, and no pack file that
the index does not name (or the reverse).

CI runs ``test_gc_crash_sample`` (``.ci/run``: ``-m slow -k sample``). The full sweep::

    python -m pytest -m slow -s -k every_hit tests/crash/test_gc_crash.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.crash.sweep import (
    Case,
    describe_diff,
    every_hit,
    expect_sigkill,
    json_of,
    pick,
    project_leftovers,
    read_hits,
    sweep,
)
from tests.helpers import TreeState, run_cli, tree_state, write

pytestmark = pytest.mark.crash

BIG = 3 << 19  # 1.5 MiB: above pack_threshold (1 MiB), so a loose object
KEPT = [2, 4]  # HEAD and the last snapshot
CONFIG = {"copy": "", "hardlink": "hardlink_threshold = 1048576\n"}


# ---- the scenario ---------------------------------------------------------------------------


@dataclass
class Scenario:
    root: Path
    states: dict[int, TreeState]  # snapshot id -> the tree it was taken from


def make_scenario(base: Path, name: str, variant: str) -> Scenario:
    """Seeded, so every scenario stores the very same objects."""
    rng = random.Random(5)
    root = base / name
    root.mkdir()
    states: dict[int, TreeState] = {}

    def cli(*args: str) -> str:
        r = run_cli("-C", str(root), *args, input="")
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    def snap() -> None:
        info = json.loads(cli("snapshot", "--json"))
        states[info["id"]] = tree_state(root)

    cli("init")
    (root / ".snapfs/config").write_text(CONFIG[variant])
    for i in range(40):  # snapshot 1: only what later goes, so its pack dies whole
        write(root, f"a/f{i}.txt", rng.randbytes(2000))
    write(root, "bigA.bin", rng.randbytes(BIG))
    snap()
    shutil.rmtree(root / "a")
    os.unlink(root / "bigA.bin")
    write(root, "keep/readme.md", "always here\n")
    for i in range(40):  # snapshot 2: all kept
        write(root, f"b/f{i}.txt", rng.randbytes(2000), mode=0o600 if i % 5 == 0 else None)
    write(root, "bigB.bin", rng.randbytes(BIG))
    os.symlink("keep/readme.md", root / "link")
    snap()
    for i in range(40):  # snapshot 3: c goes later, d stays: its pack is half dead
        write(root, f"c/f{i}.txt", rng.randbytes(2000))
        write(root, f"d/f{i}.txt", rng.randbytes(2000))
    write(root, "bigC.bin", rng.randbytes(BIG))
    snap()
    shutil.rmtree(root / "c")
    os.unlink(root / "bigC.bin")
    os.chmod(root / "d", 0o750)
    snap()  # snapshot 4
    cli("restore", "2", "--yes")
    assert tree_state(root) == states[2]
    listed = [s["id"] for s in json.loads(cli("list", "--json"))]
    assert listed == [1, 2, 3, 4], listed  # HEAD recorded the tree: no pre-restore snapshot
    return Scenario(root, states)


@dataclass(frozen=True)
class Store:
    loose: frozenset[str]
    packed: frozenset[str]
    seals: frozenset[str]  # sealed hardlinked objects
    orphans: tuple[str, ...]  # pack files not indexed, and indexed packs without a file


def store_of(root: Path) -> Store:
    state = root / ".snapfs"
    con = sqlite3.connect(f"file:{state / 'store.db'}?mode=ro", uri=True)
    try:
        packed = frozenset(bytes(r[0]).hex() for r in con.execute("SELECT oid FROM packed"))
        indexed = {str(r[0]) for r in con.execute("SELECT DISTINCT pack FROM packed")}
        seals = frozenset(bytes(r[0]).hex() for r in con.execute("SELECT oid FROM seals"))
    finally:
        con.close()
    loose = frozenset(
        p.parent.name + p.name for p in (state / "objects").glob("*/*") if p.is_file()
    )
    on_disk = set(os.listdir(state / "packs"))
    return Store(loose, packed, seals, tuple(sorted(on_disk ^ indexed)))


# ---- one case -------------------------------------------------------------------------------


def check_case(base: Path, variant: str, after: Store, case: Case, name: str) -> list[str]:
    sc = make_scenario(base, name, variant)
    try:
        return _check(sc, after, case)
    finally:
        shutil.rmtree(sc.root, ignore_errors=True)


def _check(sc: Scenario, after: Store, case: Case) -> list[str]:
    root = str(sc.root)
    r = run_cli("-C", root, "gc", "--keep-last", "1", env={"SNAPFS_CRASH_AT": case.spec})
    problems = expect_sigkill(r, case)
    s = run_cli("-C", root, "status", "--json")
    if s.returncode != 0 or json_of(s) != {"added": [], "modified": [], "deleted": []}:
        problems.append(f"status after the kill: exit {s.returncode} {s.stdout} {s.stderr}")
    if tree_state(sc.root) != sc.states[2]:
        problems.append(
            "gc changed the working tree: " + describe_diff(tree_state(sc.root), sc.states[2])
        )
    listed = json_of(run_cli("-C", root, "list", "--json"))
    ids = [x["id"] for x in listed] if isinstance(listed, list) else listed
    if ids != KEPT:
        problems.append(f"snapshots after the kill: {ids}, want {KEPT}")
    v = run_cli("-C", root, "verify")
    if v.returncode != 0:
        problems.append(f"verify: {v.stdout.strip()} {v.stderr.strip()}")
    problems += project_leftovers(sc.root)
    # Every kept snapshot restores exactly (2 is HEAD and the tree: go to 4, then back).
    for sid in (4, 2):
        r = run_cli("-C", root, "restore", str(sid), "--yes", input="")
        if r.returncode != 0:
            problems.append(f"restore {sid}: {r.stderr.strip()[-300:]}")
        elif tree_state(sc.root) != sc.states[sid]:
            problems.append(f"restore {sid}: {describe_diff(tree_state(sc.root), sc.states[sid])}")
    listed = json_of(run_cli("-C", root, "list", "--json"))
    ids = [x["id"] for x in listed] if isinstance(listed, list) else listed
    if ids != KEPT:
        problems.append(f"snapshots after the restores: {ids}, want {KEPT}")
    # gc again ends where an uncrashed gc ends.
    r = run_cli("-C", root, "gc", "--keep-last", "1")
    if r.returncode != 0:
        problems.append(f"gc again: {r.stderr.strip()[-300:]}")
    got = store_of(sc.root)
    if got.loose != after.loose:
        problems.append(
            f"loose objects after gc again: extra {sorted(got.loose - after.loose)},"
            f" missing {sorted(after.loose - got.loose)}"
        )
    if got.packed != after.packed:
        problems.append(
            f"packed objects after gc again: {len(got.packed - after.packed)} extra,"
            f" {len(after.packed - got.packed)} missing"
        )
    if got.seals != after.seals:
        problems.append(f"seals after gc again: {sorted(got.seals)}, want {sorted(after.seals)}")
    if got.orphans:
        problems.append(f"pack files and index disagree after gc again: {got.orphans}")
    v = run_cli("-C", root, "verify")
    if v.returncode != 0:
        problems.append(f"verify after gc again: {v.stdout.strip()}")
    problems += [f"{p} (after gc again)" for p in project_leftovers(sc.root)]
    return problems


def count(base: Path, variant: str) -> tuple[list[Case], Store]:
    sc = make_scenario(base, "probe", variant)
    before = store_of(sc.root)
    hits = base / "hits"
    r = run_cli("-C", str(sc.root), "gc", "--keep-last", "1", env={"SNAPFS_CRASH_COUNT": str(hits)})
    assert r.returncode == 0, r.stderr
    after = store_of(sc.root)
    seq = read_hits(hits)
    # Packs are swept in the order of their (random) names: only the multiset is fixed, and
    # each point's hits mean the same thing in every scenario.
    assert sorted(seq) == [
        "gc.after_unlink",
        "gc.after_unlink",
        "gc.pack_forgotten",
        "gc.repack_committed",
        "gc.repack_written",
    ], seq
    assert len(before.loose) == 3 and len(after.loose) == 1 and after.orphans == ()
    assert after.packed < before.packed and len(after.packed) == 81  # b, d, readme
    sealed = variant == "hardlink"
    assert (len(before.seals), len(after.seals)) == ((3, 1) if sealed else (0, 0))
    for sid in KEPT:
        r = run_cli("-C", str(sc.root), "restore", str(sid), "--yes", input="")
        assert r.returncode == 0 and tree_state(sc.root) == sc.states[sid], r.stderr
    shutil.rmtree(sc.root)
    return every_hit(seq, lambda _s, _i: "kept"), after


def run_sweep(base: Path, variant: str, chosen: Sequence[tuple[str, int | str]] | None) -> None:
    cases, after = count(base, variant)
    if chosen is not None:
        cases = pick(cases, *chosen)
    sweep(f"gc ({variant})", cases, lambda c, i: check_case(base, variant, after, c, f"c{i}"))


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_gc_crash_sample(tmp_path: Path) -> None:
    # The repacked pack is durable but not indexed; a whole dead pack forgotten, not unlinked.
    run_sweep(tmp_path, "copy", [("gc.repack_written", 1), ("gc.pack_forgotten", 1)])


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(CONFIG))
def test_gc_crash_sweep_every_hit(tmp_path: Path, variant: str) -> None:
    run_sweep(tmp_path, variant, None)
