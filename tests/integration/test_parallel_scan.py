"""Helper processes in a full walk (``_pscan``): the same result as the walker alone, always.

Every test compares a scan with helpers against a scan by the walker alone, on a real tree,
after a change made inside a subtree a helper checks. Helpers are forced on (a pytest process
has threads, where ``procs_available`` would say 1), and the tree is made big enough to split.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs import _pscan, _scan
from snapfs._ignore import Ignore
from snapfs._index import RACY_NS
from tests.helpers import run_cli, tree_state, write

TOPS = 12  # top-level folders, each a subtree of 3 x 8 folders with a few files
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="helpers fork")


def _build(root: Path) -> None:
    root.mkdir()
    write(root, ".snapfsignore", "*.log\ncache/\n")
    write(root, "top.txt", "top")
    for t in range(TOPS):
        for a in range(3):
            for b in range(8):
                d = f"node{t:02d}/pkg{a}/mod{b}"
                write(root, f"{d}/__init__.py", f"# {t} {a} {b}\n")
                write(root, f"{d}/data.bin", os.urandom(64 + b))
        write(root, f"node{t:02d}/README.md", f"node {t}")
    os.symlink("pkg0", root / "node03" / "link")
    os.mkfifo(root / "node05" / "pkg1" / "pipe")
    write(root, "node07/pkg2/mod1/run.log", "ignored")
    write(root, "node07/cache/x.bin", "ignored too")


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "p"
    _build(root)
    monkeypatch.setattr(_pscan, "MIN_DIRS", 16)
    with snapfs.init(root) as p:
        p.snapshot("base")  # records every directory
        yield p


def _scan_with(p: Any, procs: int, monkeypatch: pytest.MonkeyPatch) -> _scan.ScanResult:
    monkeypatch.setattr(_pscan, "procs_available", lambda: procs)
    ignore = Ignore.load(p.root)
    return _scan.scan(
        p.root,
        ignore=ignore,
        cache=p.state.file_records(),
        batch=None,
        helpers=procs - 1,
        dirs=p.state.load_dir_cache(ignore.fingerprint),
    )


def _settle() -> None:
    """Wait out the racy window: a folder changed within it gets no record, and whether the
    first or only the second of two scans falls inside it is a matter of timing."""
    time.sleep(2 * RACY_NS / 1e9)


def _same(a: _scan.ScanResult, b: _scan.ScanResult) -> None:
    assert a.root == b.root
    assert (a.files, a.nbytes) == (b.files, b.nbytes)
    assert a.dirs == b.dirs
    assert sorted(a.skipped) == sorted(b.skipped)
    assert sorted(a.cache_deletes) == sorted(b.cache_deletes)
    assert sorted(p for p, _e in a.cache_updates) == sorted(p for p, _e in b.cache_updates)


def test_helpers_vouch_for_an_unchanged_tree(project: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    alone = _scan_with(project, 1, monkeypatch)
    helped = _scan_with(project, 3, monkeypatch)
    _same(helped, alone)
    assert alone.helped == 0
    assert helped.helped >= 2, "no helper vouched for anything"
    assert [s for s, _why in helped.skipped] == ["node05/pkg1/pipe"]


def _edit(root: Path) -> None:
    f = root / "node04/pkg1/mod2/__init__.py"
    st = f.stat()
    f.write_text("# changed, same size!\n"[: st.st_size].ljust(st.st_size))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime reset: only ctime tells


def _chmod_dir(root: Path) -> None:
    os.chmod(root / "node06/pkg0/mod3", 0o700)


def _dir_to_symlink(root: Path) -> None:
    d = root / "node09/pkg2/mod7"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    os.symlink("/etc", d)


def _delete_subtree(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "node10")


def _rename_dir(root: Path) -> None:
    os.rename(root / "node11/pkg1", root / "node11/pkg9")


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "edit in place, mtime reset": _edit,
    "new file": lambda r: write(r, "node02/pkg0/mod0/new.py", "new"),
    "deleted file": lambda r: (r / "node08/pkg2/mod5/data.bin").unlink(),
    "new empty folder": lambda r: (r / "node01/pkg2/empty").mkdir(),
    "chmod of a folder": _chmod_dir,
    "chmod of a file": lambda r: os.chmod(r / "node00/pkg0/mod0/data.bin", 0o600),
    "folder swapped for a symlink": _dir_to_symlink,
    "subtree deleted": _delete_subtree,
    "folder renamed": _rename_dir,
    "ignored file added": lambda r: write(r, "node03/pkg0/mod0/more.log", "x"),
    "fifo removed": lambda r: (r / "node05/pkg1/pipe").unlink(),
    "symlink retargeted": lambda r: (
        (r / "node03/link").unlink(),
        os.symlink("pkg1", r / "node03/link"),
    ),
}


@pytest.mark.parametrize("change", list(MUTATIONS))
def test_a_change_inside_a_helped_subtree_is_found(
    project: Any, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    before = _scan_with(project, 1, monkeypatch)
    MUTATIONS[change](project.root)
    _settle()
    alone = _scan_with(project, 1, monkeypatch)
    helped = _scan_with(project, 3, monkeypatch)
    _same(helped, alone)
    # Neither an ignored file nor a fifo is part of a snapshot; the fifo's skip notice goes.
    if change in ("ignored file added", "fifo removed"):
        assert helped.root == before.root
        assert (helped.skipped == []) == (change == "fifo removed")
    else:
        assert helped.root != before.root


def test_a_snapshot_with_helpers_restores_exactly(
    project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pscan, "procs_available", lambda: 3)
    (project.root / "node05/pkg1/pipe").unlink()  # tree_state would block reading it
    base = tree_state(project.root)
    first = project.snapshot("helped, unchanged")
    _edit(project.root)
    _rename_dir(project.root)
    project.snapshot("helped, changed")
    project.restore(first.id)
    assert tree_state(project.root) == base


@pytest.mark.parametrize("how", ["raises", "dies", "garbage", "answers another tree"])
def test_a_failing_helper_only_costs_time(
    project: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    _edit(project.root)
    _settle()
    alone = _scan_with(project, 1, monkeypatch)
    real = _pscan.check_subtree

    def broken(fd: int, rel: bytes, *args: Any) -> Any:
        if how == "raises":
            raise RuntimeError("helper bug")
        if how == "dies":
            os._exit(3)
        if how == "garbage":
            return rel, ("not", "a", "verdict")
        verdict = real(fd, rel, *args)
        if verdict[1] is not None:
            return verdict  # honest where it can vouch
        # The changed subtree: vouched for, but by the stat of some other folder.
        return rel, ((1, 2, 3, 4, 5, 0o40755), 0, 0, [rel], [])

    monkeypatch.setattr(_pscan, "check_subtree", broken)
    helped = _scan_with(project, 3, monkeypatch)
    _same(helped, alone)
    assert (helped.helped > 0) == (how == "answers another tree")


@pytest.mark.parametrize("setting", [0, 1, 3])
def test_the_scan_helpers_setting_caps_the_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: int
) -> None:
    root = tmp_path / "p"
    _build(root)
    (root / "node05/pkg1/pipe").unlink()
    monkeypatch.setattr(_pscan, "MIN_DIRS", 16)
    monkeypatch.setattr(_pscan, "procs_available", lambda: 8)
    started: list[int] = []
    real = _pscan.start

    def counting(fd: int, shares: list[list[bytes]], check: Any) -> list[_pscan.Helper]:
        started.append(len(shares))
        return real(fd, shares, check)

    monkeypatch.setattr(_pscan, "start", counting)
    with snapfs.init(root, scan_helpers=setting) as p:
        p.snapshot("records")
        p.snapshot("helped")
        assert not p.status()
    assert started == ([setting, setting] if setting else [])


def test_no_helpers_while_other_threads_run() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert _pscan.procs_available() == 1
    finally:
        stop.set()
        t.join()


def test_plan_shares_disjoint_subtrees_of_the_recorded_tree() -> None:
    dirs: dict[bytes, Any] = {b"": None}
    for t in range(40):
        for a in range(10):
            dirs[f"n{t}/p{a}".encode()] = None
        dirs[f"n{t}".encode()] = None
    dirs[b"big"] = None
    for a in range(200):
        dirs[f"big/x{a}".encode()] = None
    shares = _pscan.plan(dirs, 3)  # type: ignore[arg-type]
    assert len(shares) == 2
    roots = [r for share in shares for r in share]
    assert len(roots) == len(set(roots))
    for r in roots:  # no root inside another
        assert not any(r != o and r.startswith(o + b"/") for o in roots)
    assert b"big" not in roots  # too large a share: split into its subdirectories
    sizes = [sum(1 + sum(k.startswith(r + b"/") for k in dirs) for r in s) for s in shares]
    assert max(sizes) <= 1.5 * min(sizes)
    assert _pscan.plan(dict(list(dirs.items())[:100]), 3) == []  # type: ignore[arg-type]
    assert _pscan.plan(dirs, 1) == []  # type: ignore[arg-type]
    # Folders without a record (racy at the last snapshot: the root often is) are split into
    # their recorded subfolders, never handed out themselves.
    partial = {k: v for k, v in dirs.items() if k not in (b"", b"n5", b"big")}
    roots = [r for share in _pscan.plan(partial, 3) for r in share]  # type: ignore[arg-type]
    assert roots and set(roots) <= set(partial)
    assert any(r.startswith(b"big/") for r in roots)


def test_cli_snapshots_of_a_big_tree_use_helpers_and_stay_exact(tmp_path: Path) -> None:
    """The CLI is single-threaded, so a tree of more than MIN_DIRS folders gets helpers there
    without any forcing. Snapshot, change deep inside, snapshot, restore the first: exact."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip(reason="helpers need a second CPU; this process may use only one")
    root = tmp_path / "big"
    root.mkdir()
    for t in range(30):
        for a in range(10):
            write(root, f"n{t}/p{a}/f.py", f"{t}/{a}")
    run_cli("init", cwd=root)
    run_cli("snapshot", "-m", "first", cwd=root)
    base = tree_state(root)
    again = json.loads(run_cli("snapshot", "-m", "again", "--json", cwd=root).stdout)
    assert again["files"] == 300
    write(root, "n17/p4/f.py", "changed")
    (root / "n3/p9/f.py").unlink()
    status = run_cli("status", cwd=root).stdout
    assert "n17/p4/f.py" in status and "n3/p9/f.py" in status
    run_cli("snapshot", "-m", "changed", cwd=root)
    run_cli("restore", "1", "--yes", cwd=root)
    assert tree_state(root) == base
