"""Bad input on real directories: wrong project paths, unreadable trees, symlinks pointing out of
the project, and special files (FIFOs, sockets) inside it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapfs
from tests.helpers import run_cli, tree_state, write

# ---- a project path that is not a directory -----------------------------------------------------


def test_project_path_that_is_not_a_directory(tmp_path: Path) -> None:
    f = write(tmp_path, "plain-file", "x")
    for path in (f, f / "below", tmp_path / "missing"):
        with pytest.raises(snapfs.ProjectPathError):
            snapfs.init(path)
        with pytest.raises(snapfs.ProjectPathError):
            snapfs.open(path)
        r = run_cli("-C", str(path), "init", input="")
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert f.read_text() == "x"
    assert not (tmp_path / "missing").exists()


def test_project_whose_own_path_is_not_utf8(tmp_path: Path) -> None:
    """Linux paths are bytes: a project may live in a folder whose name is not valid UTF-8."""
    proj = os.fsdecode(os.fsencode(tmp_path) + b"/proj\xff")
    os.mkdir(proj)
    write(Path(proj), "f.txt", "v1")
    r = run_cli("-C", proj, "init", input="")
    assert r.returncode == 0, r.stderr
    r = run_cli("-C", proj, "snapshot", input="")
    assert r.returncode == 0, r.stderr
    expected = tree_state(proj)
    write(Path(proj), "f.txt", "v2")
    r = run_cli("restore", "1", "--yes", cwd=proj, input="")
    assert r.returncode == 0, r.stderr
    assert tree_state(proj) == expected


# ---- a tree that cannot be read ----------------------------------------------------------------

_NO_DAC = "dac_override,dac_read_search"


@dataclass(frozen=True)
class Unprivileged:
    """How to run the CLI without the right to read other people's files."""

    prefix: tuple[str, ...]
    who: str  # "nobody", or "root without CAP_DAC_*" when nobody can't reach the interpreter

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
        return subprocess.run(
            [*self.prefix, sys.executable, "-m", "snapfs", *args],
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _find_unprivileged() -> Unprivileged | str:
    """A way to run snapfs that file permissions apply to, or why there is none."""
    if os.geteuid() != 0:
        return "needs root to switch to an unprivileged user"
    setpriv = shutil.which("setpriv")
    runuser = shutil.which("runuser")
    candidates: list[Unprivileged] = []
    if setpriv:
        candidates.append(
            Unprivileged(
                (setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"), "nobody"
            )
        )
    if runuser:
        candidates.append(Unprivileged((runuser, "-u", "nobody", "--"), "nobody"))
    if setpriv:
        # Root without the capabilities that bypass file permissions: the mode bits bind it too.
        candidates.append(
            Unprivileged(
                (setpriv, f"--inh-caps=-{_NO_DAC.replace(',', ',-')}",
                 f"--bounding-set=-{_NO_DAC.replace(',', ',-')}", "--"),
                "root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH",
            )
        )
    for c in candidates:
        probe = subprocess.run(
            [*c.prefix, sys.executable, "-c", "import snapfs"],
            cwd="/",
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        if probe.returncode == 0:
            return c
    return "neither setpriv nor runuser can run this Python as an unprivileged user"


@pytest.fixture(scope="module")
def unprivileged() -> Unprivileged:
    found = _find_unprivileged()
    if isinstance(found, str):
        pytest.skip(reason=found)
    return found


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A temp dir every user can traverse (pytest's tmp_path is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="snapfs-perm-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o700, follow_symlinks=False)
        shutil.rmtree(base, ignore_errors=True)


def _give_to(u: Unprivileged, path: Path) -> None:
    """Make ``path`` (recursively) writable by the unprivileged runner."""
    if u.who == "nobody":
        for dirpath, dirnames, filenames in os.walk(path):
            for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                os.chown(n, 65534, 65534, follow_symlinks=False)


def _assert_one_line_error(r: subprocess.CompletedProcess[str], codes: tuple[int, ...]) -> str:
    assert r.returncode in codes, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_unreadable_project_directory(unprivileged: Unprivileged, open_base: Path) -> None:
    # Mode 000 and owned by root: unreadable for nobody and for root without CAP_DAC_*.
    fresh = open_base / "fresh"
    fresh.mkdir()
    os.chmod(fresh, 0o000)
    line = _assert_one_line_error(unprivileged.run("-C", str(fresh), "init"), (2, 3))
    assert str(fresh) in line
    assert not (fresh / ".snapfs").exists()

    proj = open_base / "proj"
    write(proj, "f.txt", "x")
    with snapfs.init(proj) as p:
        p.snapshot()
    os.chmod(proj, 0o000)
    for cmd in (["status"], ["snapshot"], ["list"]):
        line = _assert_one_line_error(unprivileged.run("-C", str(proj), *cmd), (2, 3))
        assert str(proj) in line


@pytest.mark.parametrize("what", ["dir", "file"])
def test_unreadable_path_inside_the_project(
    unprivileged: Unprivileged, open_base: Path, what: str
) -> None:
    proj = open_base / "proj"
    write(proj, "readable.txt", "fine")
    write(proj, "sub/also-fine.txt", "fine")
    with snapfs.init(proj):
        pass
    _give_to(unprivileged, proj)
    if what == "dir":
        locked = proj / "sub/secret"
        write(proj, "sub/secret/inside.txt", "hidden")
    else:
        locked = write(proj, "sub/secret.bin", "hidden")
    os.chmod(locked, 0o000)  # stays root-owned

    r = unprivileged.run("-C", str(proj), "snapshot")
    line = _assert_one_line_error(r, (2, 3))
    assert "secret" in line  # names what it could not read
    assert r.stdout == ""
    with snapfs.open(proj) as p:
        assert p.snapshots() == []  # no partial snapshot was recorded
        tmp = p.store.root / "tmp"
        assert not tmp.exists() or os.listdir(tmp) == []

    r = unprivileged.run("-C", str(proj), "status")
    _assert_one_line_error(r, (2, 3))


# ---- symlinks pointing out of the project -------------------------------------------------------


@dataclass
class Outside:
    root: Path

    def fingerprint(self) -> dict[bytes, tuple[object, ...]]:
        """Content, modes and mtimes of everything under root, so any write shows."""
        out: dict[bytes, tuple[object, ...]] = {}
        for k, v in tree_state(self.root, skip=()).items():
            st = os.lstat(os.fsencode(self.root) + b"/" + k)
            out[k] = (*v, st.st_mtime_ns, st.st_ino)
        st = os.lstat(self.root)
        out[b"."] = ("root", st.st_mtime_ns, st.st_ino)
        return out


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    root = tmp_path / "outside-dir"
    write(root, "f.txt", "outside's own f.txt")
    write(root, "sub/g.txt", "outside's own g.txt")
    write(root, "config.json", '{"outside": true}')
    write(root, "unrelated", "u")
    return Outside(root)


def test_symlink_to_outside_is_stored_as_a_link(project: snapfs.Project, outside: Outside) -> None:
    root = project.root
    write(root, "own.txt", "mine")
    os.symlink(outside.root, root / "evil")
    os.symlink(outside.root / "f.txt", root / "evil-file")
    before = outside.fingerprint()
    snap = project.snapshot()
    assert snap.files == 1  # nothing behind the links was read as part of the project
    assert not project.status()

    os.unlink(root / "evil")
    os.unlink(root / "evil-file")
    project.restore(snap.id)
    assert os.readlink(root / "evil") == str(outside.root)
    assert os.readlink(root / "evil-file") == str(outside.root / "f.txt")
    assert outside.fingerprint() == before


def test_restore_never_writes_through_a_symlink_that_replaced_a_directory(
    project: snapfs.Project, outside: Outside
) -> None:
    root = project.root
    write(root, "evil/f.txt", "the project's f.txt")
    write(root, "evil/sub/g.txt", "the project's g.txt")
    write(root, "evil/only-in-project.txt", "p")
    expected = tree_state(root)
    snap = project.snapshot()

    shutil.rmtree(root / "evil")
    os.symlink(outside.root, root / "evil")  # same names behind it, different content
    before = outside.fingerprint()
    assert "evil" in project.status().modified

    project.restore(snap.id)
    assert outside.fingerprint() == before
    assert stat.S_ISDIR(os.lstat(root / "evil").st_mode)  # a real directory again
    assert tree_state(root) == expected


def test_restore_never_writes_through_a_symlinked_parent(
    project: snapfs.Project, outside: Outside
) -> None:
    root = project.root
    write(root, "deep/sub/g.txt", "the project's g.txt")
    write(root, "deep/new-in-snapshot.txt", "n")
    write(root, "config.json", '{"project": true}')
    expected = tree_state(root)
    snap = project.snapshot()

    shutil.rmtree(root / "deep")
    os.symlink(outside.root, root / "deep")
    os.unlink(root / "config.json")
    os.symlink(outside.root / "config.json", root / "config.json")  # a file swapped for a link
    before = outside.fingerprint()

    project.restore(snap.id)
    assert outside.fingerprint() == before
    assert not (outside.root / "new-in-snapshot.txt").exists()
    assert stat.S_ISREG(os.lstat(root / "config.json").st_mode)
    assert tree_state(root) == expected


def test_cli_restore_through_a_planted_symlink(project_dir: Path, outside: Outside) -> None:
    write(project_dir, "evil/f.txt", "the project's f.txt")
    assert run_cli("-C", str(project_dir), "init").returncode == 0
    assert run_cli("-C", str(project_dir), "snapshot").returncode == 0
    expected = tree_state(project_dir)
    shutil.rmtree(project_dir / "evil")
    os.symlink(outside.root, project_dir / "evil")
    before = outside.fingerprint()
    r = run_cli("-C", str(project_dir), "restore", "1", "--yes", input="")
    assert r.returncode == 0, r.stderr
    assert outside.fingerprint() == before
    assert tree_state(project_dir) == expected


def test_a_directory_swapped_for_a_symlink_between_plan_and_apply(
    project: snapfs.Project, outside: Outside, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the plan was made against a real directory, which is replaced by a link out
    of the project just before the files land. Nothing lands outside; the restore stops or
    lands safely, and recovery finishes it exactly."""
    import snapfs._restore as restore_mod

    root = project.root
    write(root, "plugin/f.txt", "the project's f.txt")
    write(root, "plugin/sub/g.txt", "the project's g.txt")
    expected = tree_state(root)
    snap = project.snapshot()
    write(root, "plugin/f.txt", "changed")  # the restore has to put f.txt and sub/g.txt back
    write(root, "plugin/sub/g.txt", "changed too")
    project.snapshot()
    before = outside.fingerprint()
    real_apply = restore_mod._apply

    def swap_then_apply(*args: object, **kwargs: object) -> object:
        shutil.rmtree(root / "plugin")
        os.symlink(outside.root, root / "plugin")
        return real_apply(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_mod, "_apply", swap_then_apply)
    with pytest.raises(snapfs.UnsafePath):
        project.restore(snap.id)
    monkeypatch.setattr(restore_mod, "_apply", real_apply)
    assert outside.fingerprint() == before
    assert (project.state_dir / "intent.json").exists()  # stopped after the intent: recoverable
    project.recover()
    assert outside.fingerprint() == before
    assert tree_state(root) == expected


def test_a_case_only_rename_round_trips(project: snapfs.Project) -> None:
    root = project.root
    write(root, "models/Model.safetensors", "weights")
    write(root, "README.md", "r")
    first = tree_state(root)
    snap = project.snapshot()
    os.rename(root / "models/Model.safetensors", root / "models/model.safetensors")
    os.rename(root / "README.md", root / "readme.md")
    renamed = tree_state(root)
    assert project.status().added == ["models/model.safetensors", "readme.md"]
    snap2 = project.snapshot()
    project.restore(snap.id)
    assert tree_state(root) == first
    project.restore(snap2.id)
    assert tree_state(root) == renamed


# ---- FIFOs and sockets ---------------------------------------------------------------------


def _plant_socket(dest: Path) -> None:
    """A Unix socket file at ``dest`` (bound in a short dir: socket paths are limited to ~107
    bytes, then moved into place)."""
    short = Path(tempfile.mkdtemp(prefix="sfs", dir="/tmp"))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(short / "s"))
        finally:
            s.close()
        os.rename(short / "s", dest)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_fifo_and_socket_are_skipped_without_hanging(project_dir: Path) -> None:
    write(project_dir, "a.txt", "a")
    write(project_dir, "sub/b.txt", "b")
    write(project_dir, "data.txt", "the data")
    os.mkfifo(project_dir / "pipe")
    os.mkfifo(project_dir / "sub/pipe2")
    _plant_socket(project_dir / "sock")
    C = ("-C", str(project_dir))
    # The timeouts are a safety net against a hang (a FIFO opened for reading blocks forever),
    # not a speed assertion.
    assert run_cli(*C, "init", timeout=60).returncode == 0
    r = run_cli(*C, "snapshot", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"] == 3
    r = run_cli(*C, "status", "--json", timeout=60)
    assert json.loads(r.stdout) == {"added": [], "modified": [], "deleted": []}

    # A FIFO where the snapshot has a regular file: restore puts the file back, without opening it.
    os.unlink(project_dir / "data.txt")
    os.mkfifo(project_dir / "data.txt")
    r = run_cli(*C, "status", "--json", timeout=60)
    assert json.loads(r.stdout)["deleted"] == ["data.txt"]
    r = run_cli(*C, "restore", "1", "--yes", timeout=60, input="")
    assert r.returncode == 0, r.stderr
    assert (project_dir / "data.txt").read_text() == "the data"
    assert stat.S_ISFIFO(os.lstat(project_dir / "pipe").st_mode)
    assert stat.S_ISSOCK(os.lstat(project_dir / "sock").st_mode)
