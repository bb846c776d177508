"""Shared test helpers: exact tree fingerprints, running the CLI in a real subprocess."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TreeState = dict[bytes, tuple[str, int, bytes]]


def tree_state(root: str | os.PathLike[str], *, skip: tuple[bytes, ...] = (b".snapfs",)) -> TreeState:
    """Every path under root (bytes, so any name works) -> (kind, mode bits, content digest or
    link target). Directories are included, so empty dirs count."""
    out: TreeState = {}
    base = os.fsencode(os.fspath(root))

    def walk(rel: bytes) -> None:
        full = base + b"/" + rel if rel else base
        for name in os.listdir(full):
            r = rel + b"/" + name if rel else name
            if r in skip:
                continue
            p = base + b"/" + r
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", mode, b"")
                walk(r)
            else:
                with open(p, "rb") as f:
                    out[r] = ("file", mode, hashlib.sha256(f.read()).digest())

    walk(b"")
    return out


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m snapfs ARGS`` in a real subprocess."""
    full_env = dict(os.environ)
    full_env.pop("SNAPFS_STORE", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "snapfs", *args],
        cwd=cwd,
        env=full_env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(root: Path, rel: str, data: bytes | str = b"x", mode: int | None = None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(p, mode)
    return p


def corrupt_object(store: object, oid: bytes, at: int = 0) -> None:
    """Flip bytes of a stored object wherever it lives (a loose file or a slice of a pack)."""
    where = store.locate(oid)  # type: ignore[attr-defined]
    assert where is not None, "object not in the store"
    os.chmod(where.path, 0o644)
    with open(where.path, "r+b") as f:
        f.seek(where.offset + at)
        old = f.read(4)
        f.seek(where.offset + at)
        f.write(bytes(b ^ 0xFF for b in old))


def delete_object(store: object, oid: bytes) -> None:
    """Remove a stored object from the store, as if someone deleted it."""
    where = store.locate(oid)  # type: ignore[attr-defined]
    assert where is not None, "object not in the store"
    if where.packed:
        with store.db:  # type: ignore[attr-defined]
            store.db.execute("DELETE FROM packed WHERE oid = ?", (oid,))  # type: ignore[attr-defined]
    else:
        os.unlink(where.path)


# ---- trees for transaction tests ------------------------------------------------------------


def populate_tree(root: Path) -> None:
    """A small tree with every kind of entry: files with odd modes, symlinks (live, dangling,
    to a dir), empty and read-only dirs, and entries whose type a mutation will change."""
    write(root, "src/app.py", "print('v1')\n")
    write(root, "src/util/helpers.py", "def f():\n    return 1\n")
    write(root, "src/util/data.bin", os.urandom(200_000))
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


def mutate_tree(root: Path) -> None:
    """Every kind of change to a tree made by :func:`populate_tree`."""
    import shutil

    (root / "src/app.py").write_text("print('v2, broken')\n")
    os.chmod(root / "run.sh", 0o644)  # mode-only change
    os.unlink(root / "secret.key")
    os.rename(root / "docs/old-name.txt", root / "docs/new-name.txt")
    shutil.rmtree(root / "gone")
    os.unlink(root / "file-becomes-dir")
    write(root, "file-becomes-dir/child", "now a dir")
    shutil.rmtree(root / "dir-becomes-file")
    write(root, "dir-becomes-file", "now a file")
    os.unlink(root / "file-becomes-link")
    os.symlink("run.sh", root / "file-becomes-link")
    os.unlink(root / "link-to-dir")
    os.mkdir(root / "link-to-dir")  # symlink -> dir
    os.unlink(root / "dangling")
    os.symlink("elsewhere", root / "dangling")  # retargeted
    os.rmdir(root / "empty/deeper")
    os.chmod(root / "empty", 0o700)
    os.chmod(root / "ro", 0o755)
    write(root, "ro/added.txt", "written while writable")
    write(root, "added/deep/tree/n.bin", os.urandom(5000))
    (root / "added/empty-new").mkdir()
    write(root, "src/util/data.bin", os.urandom(200_000))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll until ``check()`` is true; fail naming ``what`` after ``timeout`` seconds. A guard
    against hanging, not a timing assertion."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
