"""Builders for the import/operation tests: real git repositories, real wheels, plans, configs.

Everything here is offline. Git repositories are made with ``git init`` and cloned through
``file://``; wheels are written as zip files directly (METADATA, WHEEL, RECORD with sha256 and
sizes, as pip checks them), so pip installs them from a ``--find-links`` folder with
``--no-index`` and nothing is built; downloads come from :class:`tests.faultserver.FaultServer`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
KiB = 1 << 10
CHUNK = 1 * MiB  # download_chunk in these tests
CONNS = 4  # download_connections (the default)
READ = 1 << 20  # the downloader's socket read: a broken connection may cost this much again

# ---- blobs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    data: bytes
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def make_blob(size: int) -> Blob:
    data = os.urandom(size)
    return Blob(data, hashlib.sha256(data).hexdigest())


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- configuration --------------------------------------------------------------------------


def fast(tmp_path: Path, **more: Any) -> dict[str, Any]:
    """Project config overrides that keep faults cheap: short timeouts and download backoff,
    1 MiB chunks, host health kept under tmp_path (never in ~/.local/state)."""
    base: dict[str, Any] = dict(
        download_chunk=CHUNK,
        download_connections=CONNS,
        retry_base=0.05,
        retry_cap=0.2,
        connect_timeout=1,
        read_timeout=1,
        min_speed=1024,
        min_speed_window=0.5,
        state_dir=tmp_path / "state",
    )
    base.update(more)
    return base


def cli_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """The environment for a ``snapfs`` subprocess: the same fast settings as :func:`fast`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    env.update(
        SNAPFS_DOWNLOAD_CHUNK=str(CHUNK),
        SNAPFS_RETRY_BASE="0.05",
        SNAPFS_RETRY_CAP="0.2",
        SNAPFS_CONNECT_TIMEOUT="1",
        SNAPFS_READ_TIMEOUT="1",
        SNAPFS_MIN_SPEED_WINDOW="0.5",
        SNAPFS_STATE_DIR=str(tmp_path / "state"),
    )
    env.update(more)
    return env


def snapfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snapfs", *args]


# ---- git ------------------------------------------------------------------------------------

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git for the test's own setup (never through snapfs); return its stdout."""
    env = {**os.environ, **_GIT_ENV}
    r = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    if r.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


@dataclass(frozen=True)
class GitRepo:
    path: Path
    shas: tuple[str, ...]  # commit ids, oldest first
    tags: Mapping[str, str]  # tag -> commit id
    files: tuple[Mapping[str, bytes], ...]  # the full tree at each commit

    @property
    def url(self) -> str:
        return self.path.as_uri()


def make_repo(
    path: Path,
    commits: Sequence[Mapping[str, str | bytes | None]],
    tags: Mapping[str, int] | None = None,
) -> GitRepo:
    """A repository at ``path`` with one commit per mapping (relpath -> content; None deletes
    the file), and lightweight tags naming commits by index."""
    path.mkdir(parents=True)
    git("init", "-q", str(path))
    shas: list[str] = []
    trees: list[dict[str, bytes]] = []
    tree: dict[str, bytes] = {}
    for i, change in enumerate(commits):
        for rel, content in change.items():
            f = path / rel
            if content is None:
                f.unlink()
                tree.pop(rel, None)
                continue
            data = content.encode() if isinstance(content, str) else content
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
            tree[rel] = data
        git("add", "-A", cwd=path)
        git("commit", "-q", "--allow-empty", "-m", f"commit {i}", cwd=path)
        shas.append(git("rev-parse", "HEAD", cwd=path).strip())
        trees.append(dict(tree))
    named = {}
    for tag, idx in (tags or {}).items():
        git("tag", tag, shas[idx], cwd=path)
        named[tag] = shas[idx]
    return GitRepo(path, tuple(shas), named, tuple(trees))


def head_of(checkout: Path) -> str:
    return git("-C", str(checkout), "rev-parse", "HEAD").strip()


def tracked_files(checkout: Path) -> dict[str, bytes]:
    """The files of a checkout outside .git, relpath -> content."""
    out: dict[str, bytes] = {}
    for p in sorted(checkout.rglob("*")):
        rel = p.relative_to(checkout).as_posix()
        if rel == ".git" or rel.startswith(".git/") or not p.is_file():
            continue
        out[rel] = p.read_bytes()
    return out


# ---- wheels ---------------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    *,
    requires: Iterable[str] = (),
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """A pure-Python wheel ``name-version-py3-none-any.whl`` in ``folder``, written directly.

    It holds a package ``<name>`` whose ``__init__`` has ``__version__``, the dist-info files
    (METADATA with ``Requires-Dist`` lines, WHEEL, RECORD listing every file with its sha256
    and size) and ``extra_files`` (relpath -> bytes) as given.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dist = _norm_name(name)
    info = f"{dist}-{version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            f"Name: {name}\n",
            f"Version: {version}\n",
            "Summary: a wheel built by the snapfs tests\n",
            *(f"Requires-Dist: {r}\n" for r in requires),
        ]
    )
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: snapfs-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files: dict[str, bytes] = {
        f"{dist}/__init__.py": f"__version__ = {version!r}\n".encode(),
        **(extra_files or {}),
        f"{info}/METADATA": metadata.encode(),
        f"{info}/WHEEL": wheel_meta.encode(),
    }
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in files.items())
    record += f"{info}/RECORD,,\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{info}/RECORD", record)
    return path


# ---- venvs ----------------------------------------------------------------------------------


def make_venv(path: Path) -> Path:
    """``python -m venv path`` (with pip): the same command the venv step runs."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path


def copy_venv(template: Path, dest: Path) -> Path:
    """A copy of a venv. bin/python is a symlink to the base interpreter and the venv is found
    from pyvenv.cfg next to it, so ``dest/bin/python -m pip`` works in the copy."""
    shutil.copytree(template, dest, symlinks=True)
    return dest


def offline_pip_env(find_links: Path) -> dict[str, str]:
    """The environment for a pip that sees only ``find_links``: no config file, no index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(find_links),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def pip_install(venv: Path, find_links: Path, *reqs: str) -> None:
    """Install ``reqs`` into ``venv`` from ``find_links`` only (the test's own setup)."""
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            str(find_links),
            *reqs,
        ],
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=offline_pip_env(find_links),
    )


def installed(venv: Path, *names: str) -> dict[str, str | None]:
    """The versions installed in a venv, asked of its own Python (None: not installed)."""
    code = (
        "import json,sys\nfrom importlib import metadata\nout={}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n]=metadata.version(n)\n"
        "    except metadata.PackageNotFoundError: out[n]=None\n"
        "print(json.dumps(out))"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *names],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return dict(json.loads(r.stdout))


# ---- plans ----------------------------------------------------------------------------------


def write_plan(path: Path, steps: Sequence[Mapping[str, Any]], **top: Any) -> Path:
    """Write a version-1 plan with ``steps`` (and top-level keys) as JSON; return its path."""
    plan: dict[str, Any] = {"snapfs_import": 1, "name": top.pop("name", "test import")}
    plan.update(top)
    plan["steps"] = [dict(s) for s in steps]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))
    return path


def download_step(
    dest: str, blob: Blob, *urls: str, size: bool = True, sha256: str | None = None, **more: Any
) -> dict[str, Any]:
    step: dict[str, Any] = {"type": "download", "sources": list(urls), "dest": dest}
    step["sha256"] = sha256 if sha256 is not None else blob.sha256
    if size:
        step["size"] = blob.size
    step.update(more)
    return step


def write_step(dest: str, text: str, **more: Any) -> dict[str, Any]:
    return {"type": "write", "dest": dest, "text": text, **more}


def git_step(repo: GitRepo, commit: str, dest: str, **more: Any) -> dict[str, Any]:
    return {"type": "git", "repo": repo.url, "commit": commit, "dest": dest, **more}


# ---- reading the operation's records --------------------------------------------------------


def step_table(project: Any, op: int) -> list[tuple[str, int]]:
    """(status, attempts) of each step, in order."""
    from snapfs._ops import load_operation

    return [(s.status, s.attempts) for s in load_operation(project, op).steps]


def error_counts(project: Any) -> dict[str, int]:
    """The project's error history as code -> count."""
    from snapfs._ops import error_history

    return {e.code: e.count for e in error_history(project)}


def partials(project_root: Path) -> list[str]:
    d = project_root / ".snapfs" / "downloads"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def extents_of(part_db: Path) -> list[tuple[int, int, str]]:
    """(start, length, source) of each verified extent in a partial download's record."""
    import sqlite3

    con = sqlite3.connect(f"file:{part_db}?mode=ro", uri=True)
    try:
        return [
            (int(a), int(b), str(c))
            for a, b, c in con.execute("SELECT start, length, source FROM extents ORDER BY start")
        ]
    finally:
        con.close()
