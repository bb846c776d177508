"""The trash: a restore moves what it removes out of the project in one rename each, and the
moved entries are deleted afterwards, at once, by a daemon thread, or by a detached child of
the CLI. What an interrupted deletion leaves is swept by the next command."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import snapfs
import snapfs._trash as trash_mod
from tests.helpers import run_cli, tree_state, write


def _trash(root: Path) -> list[str]:
    base = root / ".snapfs" / "trash"
    return sorted(os.listdir(base)) if base.is_dir() else []


def _wait_empty(root: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout  # a safety net for a stuck purge, not a speed check
    while _trash(root) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _trash(root) == []


def _import_like(root: Path) -> None:
    for d in range(20):
        for f in range(10):
            write(root, f"custom_nodes/new-plugin/m{d}/f{f}.py", f"{d}/{f}")
    write(root, "models/new.bin", os.urandom(200_000))


def test_removed_trees_go_through_the_trash_and_are_deleted(
    project: snapfs.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project.root
    write(root, "keep.txt", "k")
    first = project.snapshot()
    want = tree_state(root)
    _import_like(root)
    project.snapshot()
    taken: list[bytes] = []
    real_take = trash_mod.Trash.take

    def spy(self: trash_mod.Trash, dir_fd: int, name: bytes, *a: object) -> bool:
        ok = real_take(self, dir_fd, name, *a)  # type: ignore[arg-type]
        if ok:
            taken.append(name)
        return ok

    monkeypatch.setattr(trash_mod.Trash, "take", spy)
    project.restore(first.id)
    assert tree_state(root) == want
    assert sorted(taken) == [b"custom_nodes", b"models"]  # two renames for 201 files
    assert _trash(root) == []  # SNAPFS_PURGE=now: emptied before restore returned


def test_a_tree_holding_a_kept_path_is_deleted_in_place(project: snapfs.Project) -> None:
    root = project.root
    write(root, ".snapfsignore", "*.log\n")
    first = project.snapshot()
    _import_like(root)
    write(root, "custom_nodes/new-plugin/m3/run.log", "ignored, so kept")
    project.snapshot()
    project.restore(first.id)
    assert (root / "custom_nodes/new-plugin/m3/run.log").read_text() == "ignored, so kept"
    left = sorted(
        str(p.relative_to(root / "custom_nodes")) for p in (root / "custom_nodes").rglob("*")
    )
    assert left == ["new-plugin", "new-plugin/m3", "new-plugin/m3/run.log"]
    assert not (root / "models/new.bin").exists()
    assert _trash(root) == []


def test_background_thread_empties_the_trash(
    project: snapfs.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPFS_PURGE", "background")
    monkeypatch.setattr(trash_mod, "_fork_ok", False)  # in a library host: a thread, never a fork
    root = project.root
    first = project.snapshot()
    _import_like(root)
    project.snapshot()
    project.restore(first.id)
    assert not (root / "custom_nodes").exists()  # the tree is right at once
    for t in threading.enumerate():
        if t.name == "snapfs-trash":
            t.join(timeout=30)
    assert _trash(root) == []


def test_cli_returns_and_a_detached_child_empties_the_trash(project_dir: Path) -> None:
    root = project_dir
    env = {"SNAPFS_PURGE": "background"}
    assert run_cli("-C", str(root), "init", env=env).returncode == 0
    assert run_cli("-C", str(root), "snapshot", env=env).returncode == 0
    want = tree_state(root)
    _import_like(root)
    assert run_cli("-C", str(root), "snapshot", env=env).returncode == 0
    # run_cli waits for EOF on the pipes: the child holds none of them open.
    r = run_cli("-C", str(root), "restore", "1", "--yes", env=env, input="")
    assert r.returncode == 0, r.stderr
    assert tree_state(root) == want
    _wait_empty(root)
    assert run_cli("-C", str(root), "verify", env=env).returncode == 0


def test_a_dead_owners_trash_is_swept_by_the_next_command(project: snapfs.Project) -> None:
    root = project.root
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    left = root / ".snapfs" / "trash" / f"{dead}-0badc0de" / "1"
    write(left, "a/b.py", "what a killed purge left")
    write(root / ".snapfs" / "trash" / f"{os.getpid()}-live", "x", "a live owner's")
    project.close()
    r = run_cli("-C", str(root), "status")
    assert r.returncode == 0, r.stderr
    assert _trash(root) == [f"{os.getpid()}-live"]  # only the dead owner's is taken
