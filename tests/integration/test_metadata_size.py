"""Recovery metadata (state DB, journal, trees, stat cache — not file content) stays small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import snapfs

LIMIT = 10 << 20


def _metadata_bytes(state_dir: Path) -> int:
    names = ("project.db", "project.db-wal", "project.db-shm", "index", "store.db")
    return sum((state_dir / n).stat().st_size for n in names if (state_dir / n).exists())


@pytest.mark.slow
def test_20k_files_50_checkpoints_stay_under_10_mb(project: snapfs.Project) -> None:
    root = project.root
    for p in range(40):
        for d in range(25):
            sub = root / f"custom_nodes/plugin{p}/pkg{d}"
            sub.mkdir(parents=True)
            for f in range(20):
                (sub / f"mod{f}.py").write_bytes(b"x" * 64)
    project.snapshot("base")
    for i in range(50):
        with snapfs.transaction(project, f"import {i}"):
            for f in range(40):  # an import-like change: new files, edits, deletions
                (root / f"custom_nodes/plugin{i % 40}/pkg{f % 25}/new{i}_{f}.py").write_text("n")
            (root / f"custom_nodes/plugin{(i + 1) % 40}/pkg0/mod1.py").write_text(f"edit {i}")
        snapfs.checkpoint(project, kind="auto", label=f"after import {i}")
    project.gc()
    size = _metadata_bytes(project.state_dir)
    print(f"metadata for 20k files and {len(project.snapshots())} snapshots: {size / 1e6:.1f} MB")
    assert size < LIMIT
    assert os.path.exists(project.state_dir / "index")
