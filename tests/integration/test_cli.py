"""The ``snapfs`` command-line contract, exercised through real subprocesses.

Every test runs ``python -m snapfs`` against real temp directories and a real SQLite state, and
checks what a user or a script sees: stdout, stderr, exit codes and the tree on disk.

Exit codes: 0 ok, 1 "found something" (verify, diff), 2 usage, 3 other errors. Errors are one
line on stderr and never a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.helpers import TreeState, run_cli, tree_state, write

# ---- helpers -------------------------------------------------------------------------------


def cli(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    input: str = "",
) -> subprocess.CompletedProcess[str]:
    """run_cli with stdin always a pipe, never the developer's terminal (restore may prompt)."""
    return run_cli(*args, cwd=cwd, env=env, input=input)


def ok(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = cli(*args, **kw)
    assert r.returncode == 0, f"snapfs {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def as_json(*args: str, **kw: Any) -> Any:
    return json.loads(ok(*args, "--json", **kw).stdout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The error contract: the given exit code, exactly one line on stderr, no traceback."""
    assert r.returncode == code, f"exit {r.returncode}, expected {code}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].strip(), "the error line is empty"
    return lines[0]


def init(root: Path, *extra: str) -> None:
    ok("-C", str(root), *extra, "init")


def snap(root: Path, label: str | None = None) -> int:
    args = ["-C", str(root), "snapshot"] + (["-m", label] if label else [])
    return int(ok(*args).stdout.strip())


def listing(root: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = as_json("-C", str(root), "list")
    return result


def populate(root: Path) -> None:
    write(root, "a.txt", "alpha\n")
    write(root, "src/main.py", "print('hi')\n")
    write(root, "bin/run.sh", "#!/bin/sh\necho run\n", mode=0o755)
    write(root, "data/blob.bin", os.urandom(40_000))
    (root / "empty/inner").mkdir(parents=True)
    os.symlink("src/main.py", root / "link")


def mutate(root: Path) -> None:
    (root / "a.txt").write_text("changed\n")
    os.chmod(root / "bin/run.sh", 0o644)
    os.unlink(root / "data/blob.bin")
    os.rmdir(root / "empty/inner")
    write(root, "new/file.txt", "new")
    os.unlink(root / "link")
    write(root, "link", "now a file")


LOOSE = 1_500_000  # above the pack threshold (1 MiB): stored as its own object file


def loose_object(store: Path, content: bytes) -> Path:
    """The object file holding ``content``, found by its XXH3-128 digest (objects/ab/<30 hex>)."""
    h = xxhash.xxh3_128_hexdigest(content)
    p = store / "objects" / h[:2] / h[2:]
    assert p.is_file(), f"no loose object for digest {h} under {store}"
    return p


def count_loose(store: Path) -> int:
    return sum(len(files) for _d, _s, files in os.walk(store / "objects"))


def damage(path: Path) -> None:
    """Overwrite bytes in the middle of a read-only store file, the way bit rot would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xde\xad\xbe\xef" * 4)


# ---- init, -C, discovery, stores -------------------------------------------------------------


def test_init_is_idempotent(project_dir: Path) -> None:
    first = ok("init", cwd=project_dir)
    assert (project_dir / ".snapfs" / "project.db").is_file()
    write(project_dir, "f", "1")
    sid = snap(project_dir)
    second = ok("init", cwd=project_dir)
    assert first.stdout != second.stdout  # the second run says it was already a project
    assert [s["id"] for s in listing(project_dir)] == [sid]


def test_dash_C_and_discovery_from_a_subdirectory(tmp_path: Path, project_dir: Path) -> None:
    write(project_dir, "sub/deeper/keep.txt", "k")
    ok("-C", str(project_dir), "init", cwd=tmp_path)
    deeper = project_dir / "sub" / "deeper"
    # No -C: the project is found by walking up from the current directory.
    assert ok("snapshot", cwd=deeper).stdout.strip() == "1"
    write(project_dir, "sub/deeper/new.txt", "n")
    # Paths are project-relative however the project was found.
    from_cwd = as_json("status", cwd=deeper)
    from_c = as_json("-C", str(project_dir / "sub"), "status", cwd=tmp_path)
    assert from_cwd == from_c == {"added": ["sub/deeper/new.txt"], "modified": [], "deleted": []}


def test_shared_store_via_flag_and_env_dedups_across_projects(tmp_path: Path) -> None:
    store = tmp_path / "shared-store"
    model = os.urandom(LOOSE)
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    for p in (p1, p2):
        write(p, "models/model.bin", model)
    init(p1, "--store", str(store))
    ok("-C", str(p2), "init", env={"SNAPFS_STORE": str(store)})

    s1 = as_json("-C", str(p1), "--store", str(store), "snapshot")
    s2 = as_json("-C", str(p2), "snapshot", env={"SNAPFS_STORE": str(store)})
    assert s1["new_objects"] == 1
    assert s2["new_objects"] == 0 and s2["new_bytes"] == 0  # the same model is stored once
    assert count_loose(store) == 1
    for p in (p1, p2):
        assert not (p / ".snapfs" / "objects").exists()

    # The project remembers its store: later commands need neither the flag nor the variable.
    os.unlink(p2 / "models/model.bin")
    ok("-C", str(p2), "restore", str(s2["id"]), "--yes")
    assert (p2 / "models/model.bin").read_bytes() == model
    assert ok("-C", str(p1), "verify").returncode == 0


def test_a_different_store_on_an_existing_project_is_a_usage_error(
    tmp_path: Path, project_dir: Path
) -> None:
    write(project_dir, "f", "x")
    init(project_dir)
    snap(project_dir)
    other = str(tmp_path / "other-store")
    for args, env in (
        (("--store", other, "status"), None),
        (("status",), {"SNAPFS_STORE": other}),
        (("--store", other, "snapshot"), None),
        (("--store", other, "init"), None),
    ):
        r = cli("-C", str(project_dir), *args, env=env)
        assert_one_line_error(r, 2)
    assert [s["id"] for s in listing(project_dir)] == [1]


def test_project_reached_through_a_symlinked_path(tmp_path: Path) -> None:
    """-C through a symlink (a symlinked home or workspace dir) is the same project as the real
    path. The no-follow rule is for links inside the project, not for the way to its root."""
    real = tmp_path / "real"
    write(real, "f.txt", "v1")
    link = tmp_path / "link"
    os.symlink(real, link)
    ok("-C", str(link), "init")
    assert ok("-C", str(link), "snapshot").stdout.strip() == "1"
    (real / "f.txt").write_text("v2")
    ok("-C", str(link), "restore", "1", "--yes")
    assert (real / "f.txt").read_text() == "v1"
    assert as_json("-C", str(real), "status") == {"added": [], "modified": [], "deleted": []}


def test_the_same_store_spelled_differently_is_the_same_store(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    roundabout = tmp_path / "elsewhere" / ".." / "store"  # the same directory as tmp_path/store
    proj = tmp_path / "proj"
    write(proj, "f.txt", "x")
    init(proj, "--store", str(roundabout))
    assert (tmp_path / "store").is_dir()
    ok("-C", str(proj), "--store", str(tmp_path / "store"), "snapshot")
    ok("-C", str(proj), "status", env={"SNAPFS_STORE": str(tmp_path / "store") + "/"})


def test_relative_store_is_relative_to_dash_C(tmp_path: Path) -> None:
    """-C PATH means "run as if started in PATH" (like git -C): relative paths in other options
    are taken from there."""
    elsewhere, proj = tmp_path / "elsewhere", tmp_path / "work" / "proj"
    elsewhere.mkdir()
    write(proj, "f.txt", "x")
    ok("-C", str(proj), "--store", "../store", "init", cwd=elsewhere)
    assert (tmp_path / "work" / "store").is_dir()
    assert not (tmp_path / "store").exists()


def test_failed_init_with_an_unusable_store_can_be_retried(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    write(proj, "f.txt", "x")
    blocker = write(tmp_path, "a-file", "not a directory")
    assert_one_line_error(cli("-C", str(proj), "--store", str(blocker / "store"), "init"), 3)
    # The failed attempt must not leave the project tied to the store it could not create.
    ok("-C", str(proj), "--store", str(tmp_path / "good-store"), "init")
    assert snap(proj) == 1
    assert (tmp_path / "good-store" / "objects").is_dir()


def test_gc_frees_space_when_the_project_was_named_by_a_relative_path(tmp_path: Path) -> None:
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir()
    elsewhere.mkdir()
    ok("-C", "../proj", "init", cwd=elsewhere)  # the project spelled as .../elsewhere/../proj
    for _ in range(3):
        write(proj, "model.bin", os.urandom(LOOSE))
        ok("snapshot", cwd=proj)
    loose = count_loose(proj / ".snapfs")
    rep = as_json("gc", "--keep-last", "1", cwd=proj)
    assert rep["deleted_snapshots"] == [1, 2]
    assert rep["objects"] == 2, rep  # the two old models are unreferenced now
    assert rep["freed_bytes"] >= 2 * LOOSE
    assert count_loose(proj / ".snapfs") == loose - 2


def test_a_nested_project_state_is_not_part_of_the_outer_project(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    write(outer, "a.txt", "a")
    write(outer, "inner/b.txt", "b")
    init(outer)
    init(outer / "inner")
    snap(outer / "inner")
    added = as_json("-C", str(outer), "status")["added"]
    assert "inner/b.txt" in added
    leaked = [p for p in added if ".snapfs" in p.split("/")]
    assert not leaked, f"the outer project would snapshot (and restore over) {leaked}"


# ---- snapshot, list, status ------------------------------------------------------------------


def test_snapshot_prints_the_id_and_json(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    r = ok("-C", str(project_dir), "snapshot", "-m", "first one")
    assert r.stdout == "1\n"  # only the id on stdout, so $(snapfs snapshot) works
    js = as_json("-C", str(project_dir), "snapshot")
    assert js["id"] == 2

    snaps = listing(project_dir)
    assert [s["id"] for s in snaps] == [1, 2]
    for s in snaps:
        assert {"id", "label", "kind", "created", "files", "bytes"} <= s.keys()
        assert s["kind"] == "manual"
        assert s["files"] == 4  # a.txt, src/main.py, bin/run.sh, data/blob.bin
        assert s["bytes"] == sum(
            len(x) for x in ("alpha\n", "print('hi')\n", "#!/bin/sh\necho run\n")
        ) + 40_000
        assert s["created"]
    assert [s["label"] for s in snaps] == ["first one", ""]


def test_status_json_lists_added_modified_deleted(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    snap(project_dir)
    assert as_json("-C", str(project_dir), "status") == {"added": [], "modified": [], "deleted": []}

    (project_dir / "a.txt").write_text("edited\n")
    os.chmod(project_dir / "bin/run.sh", 0o700)  # a mode change alone counts as modified
    os.unlink(project_dir / "src/main.py")
    write(project_dir, "notes.md", "n")
    st = as_json("-C", str(project_dir), "status")
    assert set(st) == {"added", "modified", "deleted"}
    assert st["added"] == ["notes.md"]
    assert sorted(st["modified"]) == ["a.txt", "bin/run.sh"]
    assert st["deleted"] == ["src/main.py"]


def test_status_json_spells_non_utf8_names_with_surrogate_escapes(project_dir: Path) -> None:
    init(project_dir)
    write(project_dir, "plain.txt", "p")
    snap(project_dir)
    base = os.fsencode(project_dir)
    # b"\xed\xb3\xbf" is the UTF-8 encoding of the lone surrogate U+DCFF: it must not be confused
    # with the escaped single byte 0xFF.
    names = [b"bad\xffname", b"lat\xe9", b"\xed\xb3\xbf", "café".encode()]
    for n in names:
        with open(base + b"/" + n, "wb") as f:
            f.write(n)
    r = ok("-C", str(project_dir), "status", "--json")
    assert '"bad\\udcffname"' in r.stdout  # the JSON spelling: a \udcNN escape per bad byte
    assert '"lat\\udce9"' in r.stdout
    added = json.loads(r.stdout)["added"]
    assert sorted(os.fsencode(a) for a in added) == sorted(names)

    snap(project_dir)
    for n in names:
        os.unlink(base + b"/" + n)
    deleted = as_json("-C", str(project_dir), "status")["deleted"]
    assert sorted(os.fsencode(d) for d in deleted) == sorted(names)
    r = cli("-C", str(project_dir), "diff", "1", "2", "--json")
    assert r.returncode == 1
    diffed = json.loads(r.stdout)
    assert sorted(os.fsencode(a) for a in diffed["added"]) == sorted(names)


def test_plain_output_with_non_utf8_names_on_a_utf8_terminal(project_dir: Path) -> None:
    """Plain (non-JSON) output never crashes on a name that is not UTF-8. PYTHONIOENCODING=utf-8
    gives stdout the strict UTF-8 encoding a typical desktop locale (en_US.UTF-8) has."""
    utf8 = {"PYTHONIOENCODING": "utf-8"}
    base = os.fsencode(project_dir)
    content = os.urandom(LOOSE)
    with open(base + b"/weights\xfe.bin", "wb") as f:
        f.write(content)
    init(project_dir)
    snap(project_dir)
    with open(base + b"/new\xff.txt", "wb") as f:
        f.write(b"n")
    C = ("-C", str(project_dir))
    for args, code in ((["status"], 0), (["diff", "1"], 1), (["restore", "1", "--dry-run"], 0)):
        r = cli(*C, *args, env=utf8)
        assert r.returncode == code, (args, r.stderr)
        assert "new" in r.stdout
    damage(loose_object(project_dir / ".snapfs", content))
    r = cli(*C, "verify", env=utf8)
    assert "internal error" not in r.stderr, r.stderr
    assert r.returncode == 1, r.stderr
    assert "weights" in r.stdout


def test_verify_names_a_missing_object(project_dir: Path) -> None:
    content = os.urandom(LOOSE)
    write(project_dir, "models/gone.bin", content)
    write(project_dir, "kept.txt", "k")
    init(project_dir)
    snap(project_dir)
    os.unlink(loose_object(project_dir / ".snapfs", content))
    r = cli("-C", str(project_dir), "verify")
    assert r.returncode == 1
    assert "models/gone.bin" in r.stdout and "kept.txt" not in r.stdout


# ---- diff ----------------------------------------------------------------------------------


def test_diff_exit_codes_and_the_working_tree_default(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    s1 = snap(project_dir)
    (project_dir / "a.txt").write_text("v2\n")
    s2 = snap(project_dir)
    C = ("-C", str(project_dir))

    r = cli(*C, "diff", str(s1), str(s2), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == {"added": [], "modified": ["a.txt"], "deleted": []}
    r = cli(*C, "diff", str(s1), str(s2))
    assert r.returncode == 1 and "a.txt" in r.stdout

    assert cli(*C, "diff", str(s2), str(s2)).returncode == 0
    r = cli(*C, "diff", str(s2), "--json")  # B defaults to the working tree, which matches s2
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"added": [], "modified": [], "deleted": []}

    write(project_dir, "extra.txt", "e")
    r = cli(*C, "diff", str(s2), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == {"added": ["extra.txt"], "modified": [], "deleted": []}
    r = cli(*C, "diff", str(s1), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout) == {"added": ["extra.txt"], "modified": ["a.txt"], "deleted": []}

    assert_one_line_error(cli(*C, "diff", "99"), 2)


# ---- restore ---------------------------------------------------------------------------------


def test_restore_yes_makes_the_tree_exact_and_is_undoable(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    before = tree_state(project_dir)
    sid = snap(project_dir)
    mutate(project_dir)
    broken = tree_state(project_dir)

    r = ok("-C", str(project_dir), "restore", str(sid), "--yes")
    assert tree_state(project_dir) == before
    pre = [s for s in listing(project_dir) if s["kind"] == "pre-restore"]
    assert len(pre) == 1
    assert str(pre[0]["id"]) in r.stdout  # the output says how to undo
    ok("-C", str(project_dir), "restore", str(pre[0]["id"]), "--yes")
    assert tree_state(project_dir) == broken


def test_restore_dry_run_prints_the_plan_and_changes_nothing(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    sid = snap(project_dir)
    mutate(project_dir)
    state = tree_state(project_dir)
    snaps = listing(project_dir)

    r = ok("-C", str(project_dir), "restore", str(sid), "--dry-run")
    for path in ("a.txt", "new", "data/blob.bin", "bin/run.sh", "empty/inner", "link"):
        # one plan line per path (a whole new directory goes in one step)
        assert re.search(rf"\s{re.escape(path)}/?(\s|$)", r.stdout, re.M), (
            f"the plan does not mention {path}:\n{r.stdout}"
        )
    assert "src/main.py" not in r.stdout.replace("-> src/main.py", "")  # unchanged: not in it
    assert tree_state(project_dir) == state
    assert listing(project_dir) == snaps  # not even a pre-restore snapshot
    assert as_json("-C", str(project_dir), "status")["added"] == ["new/", "new/file.txt"]


def test_restore_ids_latest_and_latest_tilde_n(project_dir: Path) -> None:
    init(project_dir)
    states: list[TreeState] = []
    for v in ("v1", "v2", "v3"):
        write(project_dir, "f.txt", v)
        write(project_dir, f"only-{v}", v)
        snap(project_dir, v)
        states.append(tree_state(project_dir))
    C = ("-C", str(project_dir))
    ok(*C, "restore", "latest~2", "--yes")
    assert tree_state(project_dir) == states[0]
    ok(*C, "restore", "latest", "--yes")
    assert tree_state(project_dir) == states[2]
    ok(*C, "restore", "latest~1", "--yes")
    assert tree_state(project_dir) == states[1]


def test_restore_unknown_id_is_a_one_line_usage_error(project_dir: Path) -> None:
    init(project_dir)
    write(project_dir, "f.txt", "1")
    snap(project_dir)
    write(project_dir, "f.txt", "2")
    state = tree_state(project_dir)
    for bad in ("99", "latest~9", "nope", "0", "1.5"):
        assert_one_line_error(cli("-C", str(project_dir), "restore", bad, "--yes"), 2)
    assert tree_state(project_dir) == state
    assert len(listing(project_dir)) == 1


def test_restore_without_yes_proceeds_when_stdin_is_not_a_terminal(project_dir: Path) -> None:
    """Without --yes snapfs asks only when stdin is a terminal. In a pipe or a script (stdin not a
    tty) nobody can answer, so the restore goes ahead as if --yes had been given. It stays
    undoable through the pre-restore snapshot."""
    populate(project_dir)
    init(project_dir)
    before = tree_state(project_dir)
    sid = snap(project_dir)
    mutate(project_dir)
    r = cli("-C", str(project_dir), "restore", str(sid), input="n\n")
    assert r.returncode == 0, r.stderr
    assert tree_state(project_dir) == before


def _restore_on_a_terminal(root: Path, answer: str) -> subprocess.CompletedProcess[str]:
    """Run ``snapfs restore 1`` with a pseudo-terminal as stdin and type ``answer``."""
    master, slave = os.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapfs", "-C", str(root), "restore", "1"],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        os.close(slave)
        slave = -1
        os.write(master, answer.encode())  # queued in the tty until the prompt reads it
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_restore_on_a_terminal_asks_and_no_changes_nothing(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    before = tree_state(project_dir)
    snap(project_dir)
    mutate(project_dir)
    broken = tree_state(project_dir)

    r = _restore_on_a_terminal(project_dir, "n\n")
    assert r.returncode == 0, r.stderr
    assert "Restore snapshot 1?" in r.stdout  # it asked
    assert "a.txt" in r.stdout  # and showed what would change
    assert tree_state(project_dir) == broken
    assert [s["kind"] for s in listing(project_dir)] == ["manual"]

    r = _restore_on_a_terminal(project_dir, "y\n")
    assert r.returncode == 0, r.stderr
    assert "Restore snapshot 1?" in r.stdout
    assert tree_state(project_dir) == before


# ---- rollback --------------------------------------------------------------------------------


def test_rollback_restores_the_newest_checkpoint_not_a_pre_restore(project_dir: Path) -> None:
    init(project_dir)
    C = ("-C", str(project_dir))
    assert_one_line_error(cli(*C, "rollback", "--yes"), 2)  # nothing to roll back to yet

    write(project_dir, "f.txt", "v1")
    write(project_dir, "one", "1")
    snap(project_dir)
    v1 = tree_state(project_dir)
    write(project_dir, "f.txt", "v2")
    write(project_dir, "two", "2")
    snap(project_dir)
    v2 = tree_state(project_dir)
    write(project_dir, "f.txt", "v3 (broken)")
    write(project_dir, "three", "3")

    ok(*C, "rollback", "--yes")
    assert tree_state(project_dir) == v2
    kinds = [s["kind"] for s in listing(project_dir)]
    assert kinds == ["manual", "manual", "pre-restore"]
    # The newest snapshot is now the pre-restore one; rollback still means "the last checkpoint".
    ok(*C, "rollback", "--yes")
    assert tree_state(project_dir) == v2
    write(project_dir, "f.txt", "broken again")
    ok(*C, "rollback", "--yes")
    assert tree_state(project_dir) == v2

    ok(*C, "rollback", "--to", "1", "--yes")
    assert tree_state(project_dir) == v1
    assert_one_line_error(cli(*C, "rollback", "--to", "99", "--yes"), 2)
    assert tree_state(project_dir) == v1


# ---- verify --------------------------------------------------------------------------------


@pytest.mark.parametrize("stored_as", ["loose", "packed-raw", "packed-zstd"])
def test_verify_names_the_project_path_of_a_corrupt_object(
    project_dir: Path, stored_as: str
) -> None:
    if stored_as == "loose":
        content, other = os.urandom(LOOSE), b"fine"
    elif stored_as == "packed-raw":
        content, other = os.urandom(100_000), os.urandom(LOOSE)
    else:
        content, other = b"weights " * 40_000, os.urandom(LOOSE)
    write(project_dir, "models/weights.bin", content)
    write(project_dir, "other.bin", other)
    init(project_dir)
    snap(project_dir)
    C = ("-C", str(project_dir))
    assert ok(*C, "verify").returncode == 0
    assert as_json(*C, "verify")["ok"] is True

    store = project_dir / ".snapfs"
    if stored_as == "loose":
        damage(loose_object(store, content))
    else:
        # weights.bin is the only small file, so the only pack holds only its bytes.
        packs = list((store / "packs").iterdir())
        assert len(packs) == 1, packs
        damage(packs[0])

    r = cli(*C, "verify")
    assert r.returncode == 1
    assert "models/weights.bin" in r.stdout
    assert "other.bin" not in r.stdout
    r = cli(*C, "verify", "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert len(report["problems"]) == 1
    assert any("models/weights.bin" in p for p in report["problems"][0]["paths"])

    # A restore that needs the object refuses before touching anything, and says which file.
    os.unlink(project_dir / "models/weights.bin")
    (project_dir / "other.bin").write_bytes(b"changed")
    state = tree_state(project_dir)
    line = assert_one_line_error(cli(*C, "restore", "1", "--yes"), 3)
    assert "models/weights.bin" in line
    assert tree_state(project_dir) == state


# ---- gc ------------------------------------------------------------------------------------


def _three_versions(root: Path) -> list[bytes]:
    init(root)
    versions = []
    for _ in range(3):
        data = os.urandom(LOOSE)
        write(root, "model.bin", data)
        write(root, "same.txt", "unchanged")
        snap(root)
        versions.append(data)
    return versions


def test_gc_keep_last_dry_run_then_for_real(project_dir: Path) -> None:
    versions = _three_versions(project_dir)
    C = ("-C", str(project_dir))
    store = project_dir / ".snapfs"
    objects_before = count_loose(store)
    snaps_before = listing(project_dir)

    dry = as_json(*C, "gc", "--keep-last", "1", "--dry-run")
    assert dry["dry_run"] is True
    assert dry["deleted_snapshots"] == [1, 2]
    assert dry["freed_bytes"] >= 2 * LOOSE
    assert listing(project_dir) == snaps_before
    assert count_loose(store) == objects_before
    plain_dry = ok(*C, "gc", "--keep-last", "1", "--dry-run")
    assert re.search(r"would free [1-9]", plain_dry.stdout), plain_dry.stdout

    r = ok(*C, "gc", "--keep-last", "1")
    assert re.search(r"freed [1-9]", r.stdout), r.stdout  # reports the space it freed
    assert [s["id"] for s in listing(project_dir)] == [3]
    assert count_loose(store) == objects_before - 2
    assert ok(*C, "verify").returncode == 0
    assert_one_line_error(cli(*C, "restore", "1", "--yes"), 2)
    os.unlink(project_dir / "model.bin")
    ok(*C, "restore", "3", "--yes")
    assert (project_dir / "model.bin").read_bytes() == versions[2]


def test_gc_keep_within_keeps_recent_snapshots(project_dir: Path) -> None:
    _three_versions(project_dir)
    C = ("-C", str(project_dir))
    rep = as_json(*C, "gc", "--keep-within", "1h")
    assert rep["deleted_snapshots"] == [] and rep["objects"] == 0
    assert [s["id"] for s in listing(project_dir)] == [1, 2, 3]

    # Age snapshots 1 and 2 by two hours, straight in the real SQLite state.
    db = sqlite3.connect(project_dir / ".snapfs" / "project.db")
    try:
        with db:
            db.execute("UPDATE snapshots SET created = created - 7200 WHERE id IN (1, 2)")
    finally:
        db.close()
    dry = as_json(*C, "gc", "--keep-within", "90m", "--dry-run")
    assert dry["deleted_snapshots"] == [1, 2]
    assert [s["id"] for s in listing(project_dir)] == [1, 2, 3]
    rep = as_json(*C, "gc", "--keep-within", "1h")
    assert rep["deleted_snapshots"] == [1, 2] and rep["freed_bytes"] > 0
    assert [s["id"] for s in listing(project_dir)] == [3]
    assert ok(*C, "verify").returncode == 0


def test_gc_bad_duration_is_a_usage_error(project_dir: Path) -> None:
    _three_versions(project_dir)
    for duration in ("1x", "1.5h", "-1h", ""):
        assert_one_line_error(cli("-C", str(project_dir), "gc", "--keep-within", duration), 2)
    assert len(listing(project_dir)) == 3


def test_gc_negative_keep_last_is_a_usage_error(project_dir: Path) -> None:
    init(project_dir)
    r = cli("-C", str(project_dir), "gc", "--keep-last", "-1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


# ---- recover, demo -----------------------------------------------------------------------------


def test_recover_with_nothing_pending(project_dir: Path) -> None:
    populate(project_dir)
    init(project_dir)
    snap(project_dir)
    state = tree_state(project_dir)
    r = ok("-C", str(project_dir), "recover")
    assert "nothing to recover" in r.stdout.lower()
    assert tree_state(project_dir) == state


def test_demo_tells_the_story_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "demo-tmp"
    tmp.mkdir()
    r = ok("demo", cwd=tmp_path, env={"TMPDIR": str(tmp)})
    out = r.stdout
    assert "snapshot" in out.lower()
    assert "Rolled back" in out
    assert "byte-for-byte what it was: yes" in out
    assert "verify: OK" in out
    assert list(tmp.iterdir()) == []  # the sample project is removed afterwards


# ---- errors and exit codes -------------------------------------------------------------------


def test_not_a_project_is_a_one_line_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in (["status"], ["snapshot"], ["list"], ["restore", "1", "--yes"], ["recover"]):
        line = assert_one_line_error(cli(*cmd, cwd=empty), 2)
        assert "init" in line  # says what to do next
    assert not (empty / ".snapfs").exists()


def test_dash_C_on_a_file_or_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    f = write(tmp_path, "file.txt", "not a dir")
    for cmd in (["status"], ["init"], ["snapshot"]):
        assert_one_line_error(cli("-C", str(f), *cmd, cwd=tmp_path), 2)
        assert_one_line_error(cli("-C", str(tmp_path / "missing"), *cmd, cwd=tmp_path), 2)
    assert not (tmp_path / "missing").exists()


def test_bad_options_and_arguments_are_usage_errors(project_dir: Path) -> None:
    init(project_dir)
    for args in (["snapshot", "--bogus"], ["--bogus", "status"], ["restore"], ["nosuchcommand"]):
        r = cli("-C", str(project_dir), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_corrupt_state_is_one_line_without_debug_and_a_traceback_with_it(
    project_dir: Path,
) -> None:
    write(project_dir, "f", "x")
    init(project_dir)
    snap(project_dir)
    db = project_dir / ".snapfs" / "project.db"
    for side in ("-wal", "-shm"):
        Path(str(db) + side).unlink(missing_ok=True)
    db.write_bytes(b"this is not an SQLite database" * 100)

    line = assert_one_line_error(cli("-C", str(project_dir), "status"), 3)
    assert "project.db" in line
    r = cli("-C", str(project_dir), "--debug", "status")
    assert r.returncode == 3
    assert "Traceback" in r.stderr
