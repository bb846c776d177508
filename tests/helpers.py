"""Shared test helpers: exact tree fingerprints, running the CLI in a real subprocess."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
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
