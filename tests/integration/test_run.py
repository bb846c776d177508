"""``snapfs run -- CMD``: a shell command inside a transaction, through real CLI subprocesses.

A non-zero exit or a signal rolls the project back exactly and says what was rolled back; the
command's exit code (128+N for signal N) is passed through, and its stdin, stdout and stderr are
untouched. Success keeps the changes and records them for ``snapfs log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import snapfs
from tests.helpers import TreeState, populate_tree, run_cli, tree_state, wait_for, write

# What the failing commands below do to a tree made by populate_tree: every kind of change.
BREAK = (
    "echo broken > src/app.py; chmod 644 run.sh; rm secret.key; rm -r gone;"
    " mv docs/old-name.txt docs/new-name.txt; rm file-becomes-dir; mkdir file-becomes-dir;"
    " rm dangling; ln -s elsewhere dangling; rmdir empty/deeper; chmod 755 ro; echo x > ro/new;"
    " mkdir -p added/deep/empty; echo n > added/deep/n.txt;"
)


def snapfs_cmd(
    *args: str, cwd: str | os.PathLike[str], input: bytes = b"", timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """``python -m snapfs ARGS`` in a real subprocess, with bytes in and out (stdout is compared
    byte for byte)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    return subprocess.run(
        [sys.executable, "-m", "snapfs", *args],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        timeout=timeout,
    )


def log_json(root: Path) -> list[dict[str, Any]]:
    r = snapfs_cmd("log", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


@pytest.fixture
def proj(project_dir: Path) -> tuple[Path, TreeState]:
    """A project made by populate_tree, and its exact state."""
    snapfs.init(project_dir).close()
    populate_tree(project_dir)
    return project_dir, tree_state(project_dir)


# ---- failure rolls back ----------------------------------------------------------------------


def test_failed_command_rolls_back_and_passes_its_exit_code_and_stdout(
    proj: tuple[Path, TreeState],
) -> None:
    root, before = proj
    script = BREAK + r" printf 'out\000put\r\nno newline'; printf 'own stderr\n' >&2; exit 3"
    r = snapfs_cmd("run", "--", "sh", "-c", script, cwd=root)
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"out\x00put\r\nno newline"
    assert tree_state(root) == before
    err = r.stderr.decode()
    assert err.startswith("own stderr\n")  # the command's own stderr comes first, untouched
    assert "exit status 3" in err and "Rolled back" in err
    for line in (
        "M src/app.py",
        "M run.sh",
        "D secret.key",
        "D gone/",
        "A added/",
        "R docs/old-name.txt -> docs/new-name.txt",
        "M file-becomes-dir",
    ):
        assert f"  {line}\n" in err, f"{line!r} not named in:\n{err}"
    (row,) = log_json(root)
    assert row["status"] == "rolled-back"
    assert "src/app.py" in row["changes"]["modified"]


def test_stdin_is_passed_through(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    data = b"line 1\n\x00binary\xff\r\nlast"
    r = snapfs_cmd("run", "--", "sh", "-c", "cat > piped.bin", cwd=root, input=data)
    assert r.returncode == 0, r.stderr
    assert (root / "piped.bin").read_bytes() == data
    assert tree_state(root) == {**before, b"piped.bin": tree_state(root)[b"piped.bin"]}
    # The same on failure: the file the command wrote is rolled back.
    r = snapfs_cmd("run", "--", "sh", "-c", "cat > piped2.bin; exit 1", cwd=root, input=data)
    assert r.returncode == 1
    assert not (root / "piped2.bin").exists()
    assert (root / "piped.bin").read_bytes() == data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_command_killed_by_a_signal_is_rolled_back(
    proj: tuple[Path, TreeState], sig: signal.Signals
) -> None:
    root, before = proj
    r = snapfs_cmd("run", "--", "sh", "-c", BREAK + f" kill -{int(sig)} $$", cwd=root)
    assert r.returncode == 128 + sig, r.stderr
    assert tree_state(root) == before
    assert sig.name in r.stderr.decode() and "Rolled back" in r.stderr.decode()
    assert log_json(root)[0]["status"] == "rolled-back"


@pytest.fixture
def running() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)  # reaps it and closes its pipes


def _waiting_in_wait(pid: int) -> bool:
    """Is ``pid`` blocked in wait() for its child? Then its forwarding handlers are installed."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().startswith("do_wait")
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_snapfs_run_is_forwarded_to_the_command(
    proj: tuple[Path, TreeState], running: list[subprocess.Popen[bytes]], sig: signal.Signals
) -> None:
    root, before = proj
    script = (
        BREAK + " trap 'echo trapped; echo t > trapped.txt; exit 130' TERM INT;"
        " echo r > ready.txt; while :; do sleep 0.05; done"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "run", "--", "sh", "-c", script],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running.append(proc)
    wait_for(lambda: (root / "ready.txt").exists() or proc.poll() is not None, "the command")
    assert proc.poll() is None, proc.communicate()[1]
    wait_for(lambda: _waiting_in_wait(proc.pid), "snapfs run to wait for its command")
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert out == b"trapped\n", err  # the command got the signal and ran its trap
    assert proc.returncode == 130, err
    assert tree_state(root) == before  # ready.txt and trapped.txt too
    assert b"exit status 130" in err and b"Rolled back" in err
    assert b"interrupted" not in err


@pytest.mark.crash
def test_sigkill_of_run_and_its_command_is_recovered_by_the_next_command(
    proj: tuple[Path, TreeState], running: list[subprocess.Popen[bytes]]
) -> None:
    root, before = proj
    script = BREAK + " echo r > ready.txt; while :; do sleep 0.05; done"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "snapfs",
            "run",
            "--preserve",
            "ready.txt",
            "--",
            "sh",
            "-c",
            script,
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so both can be killed at once
    )
    running.append(proc)
    wait_for(lambda: (root / "ready.txt").exists() or proc.poll() is not None, "the command")
    assert proc.poll() is None, proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not _group_alive(proc.pid), "the killed command to be gone")
    assert tree_state(root) != before
    r = snapfs_cmd("status", cwd=root)
    assert r.returncode == 0, r.stderr
    # Rolled back, except the path the run asked to preserve.
    after = tree_state(root)
    assert {p: v for p, v in after.items() if p != b"ready.txt"} == before
    assert (root / "ready.txt").read_text() == "r\n"
    (row,) = log_json(root)
    assert row["status"] == "recovered"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_command_not_found_is_127_one_line_nothing_changed(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    r = snapfs_cmd("run", "--", "no-such-command-snapfs-test", "arg", cwd=root)
    assert r.returncode == 127
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "no-such-command-snapfs-test" in lines[0]
    assert r.stdout == b""
    assert tree_state(root) == before


def test_command_not_executable_is_126(proj: tuple[Path, TreeState]) -> None:
    root, _ = proj
    write(root, "not-exec.sh", "#!/bin/sh\necho hi\n", mode=0o644)
    before = tree_state(root)
    r = snapfs_cmd("run", "--", "./not-exec.sh", cwd=root)
    assert r.returncode == 126
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert tree_state(root) == before


# ---- success keeps the changes -------------------------------------------------------------


def test_success_keeps_changes_and_logs_them(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    script = (
        "echo v2 > src/app.py; rm secret.key; mv docs/old-name.txt docs/new-name.txt;"
        " mkdir -p new/dir; echo n > new/dir/f.txt; echo ok"
    )
    r = snapfs_cmd("run", "--", "sh", "-c", script, cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"ok\n"
    assert b"snapfs: done" in r.stderr
    after = tree_state(root)
    assert (root / "src/app.py").read_text() == "v2\n"
    assert not (root / "secret.key").exists()
    assert {p for p in after if p not in before} == {
        b"new",
        b"new/dir",
        b"new/dir/f.txt",
        b"docs/new-name.txt",
    }
    assert {p for p in before if p not in after} == {b"secret.key", b"docs/old-name.txt"}
    (row,) = log_json(root)
    assert row["status"] == "committed"
    assert row["label"] == f"sh -c {script}"
    assert row["post"] is None
    assert row["changes"] == {
        "added": ["new/", "new/dir/", "new/dir/f.txt"],
        "modified": ["src/app.py"],
        "deleted": ["secret.key"],
        "moved": [["docs/old-name.txt", "docs/new-name.txt"]],
    }


def test_label_and_post_snapshot(proj: tuple[Path, TreeState]) -> None:
    root, _ = proj
    r = snapfs_cmd(
        "run", "-m", "install deps", "--post", "--", "sh", "-c", "echo 1 > dep.txt", cwd=root
    )
    assert r.returncode == 0, r.stderr
    (row,) = log_json(root)
    assert row["label"] == "install deps" and row["status"] == "committed"
    assert row["post"] is not None
    snaps = {s["id"]: s for s in json.loads(snapfs_cmd("list", "--json", cwd=root).stdout)}
    assert snaps[row["post"]]["kind"] == "post"
    assert snaps[row["checkpoint"]]["kind"] == "pre-op"
    text = snapfs_cmd("log", cwd=root)
    assert text.returncode == 0 and b"install deps" in text.stdout
    assert f"checkpoint {row['checkpoint']} -> {row['post']}".encode() in text.stdout
    # The post snapshot holds the result; the checkpoint does not.
    r = snapfs_cmd("diff", str(row["checkpoint"]), str(row["post"]), "--json", cwd=root)
    assert json.loads(r.stdout)["added"] == ["dep.txt"]


def test_failed_run_takes_no_post_snapshot(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    r = snapfs_cmd("run", "--post", "--", "sh", "-c", "echo 1 > dep.txt; exit 1", cwd=root)
    assert r.returncode == 1
    assert tree_state(root) == before
    (row,) = log_json(root)
    assert row["post"] is None
    kinds = [s["kind"] for s in json.loads(snapfs_cmd("list", "--json", cwd=root).stdout)]
    assert "post" not in kinds


def test_a_command_that_runs_snapfs_itself(proj: tuple[Path, TreeState]) -> None:
    """The wrapped command may use snapfs on the same project: no deadlock on the project lock,
    an inner ``snapfs run`` is its own transaction, and the outer rollback still undoes all."""
    root, before = proj
    snap = f"{sys.executable} -m snapfs"
    script = (
        f"echo o > outer.txt; {snap} snapshot -m inside >/dev/null 2>&1 || exit 90;"
        f" {snap} run -m inner -- sh -c 'echo i > inner.txt; exit 5' 2>/dev/null;"
        " echo inner=$?; test -e inner.txt && exit 91; exit 6"
    )
    r = snapfs_cmd("run", "-m", "outer", "--", "sh", "-c", script, cwd=root)
    assert r.stdout == b"inner=5\n", r.stderr
    assert r.returncode == 6, r.stderr
    assert tree_state(root) == before
    rows = {row["label"]: row for row in log_json(root)}
    assert rows["inner"]["status"] == "rolled-back"
    assert rows["inner"]["changes"]["added"] == ["inner.txt"]
    assert rows["outer"]["status"] == "rolled-back"
    assert rows["outer"]["changes"]["added"] == ["outer.txt"]


# ---- preserve, -C, usage -------------------------------------------------------------------


def test_preserve_keeps_outputs_after_a_failed_run(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    script = (
        BREAK + " mkdir -p out/logs; echo result > out/r.txt; echo l > out/logs/run.log; exit 1"
    )
    r = snapfs_cmd("run", "--preserve", "out/**", "--", "sh", "-c", script, cwd=root)
    assert r.returncode == 1, r.stderr
    after = tree_state(root)
    kept = {p: v for p, v in after.items() if p not in before}
    assert set(kept) == {b"out", b"out/r.txt", b"out/logs", b"out/logs/run.log"}
    assert {p: v for p, v in after.items() if p in before} == before
    assert (root / "out/r.txt").read_text() == "result\n"


def test_dash_C_rolls_back_that_project(proj: tuple[Path, TreeState]) -> None:
    root, before = proj
    elsewhere = root.parent
    r = snapfs_cmd(
        "-C",
        str(root),
        "run",
        "--",
        "sh",
        "-c",
        f"echo broken > '{root}/src/app.py'; exit 4",
        cwd=elsewhere,
    )
    assert r.returncode == 4, r.stderr
    assert tree_state(root) == before
    assert log_json(root)[0]["status"] == "rolled-back"


def test_dash_C_runs_the_command_in_the_project(proj: tuple[Path, TreeState]) -> None:
    """``-C PATH``: "run as if started in PATH", like ``git -C``: relative paths of the command
    are in the project."""
    root, before = proj
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    r = snapfs_cmd(
        "-C", str(root), "run", "--", "sh", "-c", "pwd; echo made > made.txt", cwd=elsewhere
    )
    assert r.returncode == 0, r.stderr
    assert not (elsewhere / "made.txt").exists()
    assert (root / "made.txt").read_text() == "made\n"
    assert r.stdout.decode().strip() == str(root)
    assert log_json(root)[0]["changes"]["added"] == ["made.txt"]


@pytest.mark.parametrize("args", [("run",), ("run", "--"), ("run", "-m", "x", "--")])
def test_run_without_a_command_is_a_usage_error(
    proj: tuple[Path, TreeState], args: tuple[str, ...]
) -> None:
    root, before = proj
    r = snapfs_cmd(*args, cwd=root)
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr
    assert tree_state(root) == before
    assert log_json(root) == []


def _wait_for_rollback(root: Path, before: TreeState) -> None:
    """Run `status` until its recovery has put the tree back to ``before``."""

    def rolled_back() -> bool:
        run_cli("-C", str(root), "status")
        return tree_state(root) == before

    wait_for(rolled_back, "recovery after the command ended")


def _release(proc: subprocess.Popen[bytes], go: Path) -> None:
    """Let an orphaned command end (it waits for ``go``), and reap snapfs run if it lives."""
    go.touch()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.crash
def test_a_command_outliving_a_killed_snapfs_run_is_not_rolled_back_under(tmp_path: Path) -> None:
    """Only snapfs run is SIGKILLed: its command still runs, so the transaction is still live.
    Once the command ends too, the next command rolls back."""
    root = tmp_path / "proj"
    root.mkdir()
    write(root, "base.txt", "base")
    assert run_cli("-C", str(root), "init").returncode == 0
    before = tree_state(root)
    go = tmp_path / "go"
    script = f"echo partial > {root}/partial.txt; while [ ! -e {go} ]; do sleep 0.05; done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(root), "run", "--", "sh", "-c", script],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (root / "partial.txt").exists(), "the command to start")
        proc.kill()
        proc.wait(10)
        r = run_cli("-C", str(root), "status")
        assert r.returncode == 0, r.stderr
        assert (root / "partial.txt").exists()  # the command is alive: nothing rolled back
        go.touch()  # let the orphaned command finish
        _wait_for_rollback(root, before)
    finally:
        _release(proc, go)


@pytest.mark.crash
def test_snapfs_killed_before_recording_its_command_does_not_roll_back_under_it(
    tmp_path: Path,
) -> None:
    """SIGKILLed just after starting the command, before its pid is in the owner record: the
    command is known by the token in its environment, so the tree is left alone while it runs,
    and rolled back once it has ended. (Without the token, the next command rolled back under
    the running command: the race test_a_command_outliving_... hit on a loaded machine.)"""
    root = tmp_path / "proj"
    root.mkdir()
    write(root, "base.txt", "base")
    assert run_cli("-C", str(root), "init").returncode == 0
    before = tree_state(root)
    go, started = tmp_path / "go", tmp_path / "started"
    script = (
        f'[ -n "$SNAPFS_RUN_TOKEN" ] && touch {started}; echo partial > {root}/partial.txt;'
        f" while [ ! -e {go} ]; do sleep 0.05; done"
    )
    env = {k: v for k, v in os.environ.items() if k != "SNAPFS_STORE"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(root), "run", "--", "sh", "-c", script],
        stderr=subprocess.DEVNULL,
        env={**env, "SNAPFS_CRASH_AT": "run.spawned"},
    )
    try:
        assert proc.wait(30) == -signal.SIGKILL  # killed at the crash point, the command running
        wait_for(lambda: (root / "partial.txt").exists(), "the command to write")
        assert started.exists()  # the command saw its token
        with snapfs.open(root) as p:
            rows = p.state.txns(status="open")
        assert len(rows) == 1 and json.loads(rows[0].owner)["child"] == 0  # pid never recorded
        for _ in range(2):
            r = run_cli("-C", str(root), "status")
            assert r.returncode == 0, r.stderr
            assert (root / "partial.txt").exists()  # the command is alive: nothing rolled back
        go.touch()
        _wait_for_rollback(root, before)
    finally:
        _release(proc, go)


def test_an_owner_with_a_token_lives_while_a_process_carries_it() -> None:
    """Owner.alive: a dead owner with no child recorded is alive exactly while a process whose
    environment holds its token runs; once a child is recorded, only that child counts."""
    from snapfs._txn import RUN_TOKEN_VAR, Owner

    token = os.urandom(8).hex()
    dead = Owner.current()._replace(pid=2**22 + 12345, start="1", token=token)
    assert not dead.alive()  # nobody carries the token yet
    holder = subprocess.Popen(["sleep", "30"], env={**os.environ, RUN_TOKEN_VAR: token})
    try:
        wait_for(lambda: dead.alive(), "the token's holder to be seen")
        assert not dead._replace(token=os.urandom(8).hex()).alive()  # another token: dead
        assert not dead.with_child(2**22 + 12346).alive()  # a recorded child is what counts
    finally:
        holder.kill()
        holder.wait()
    assert not dead.alive()  # the holder is gone (reaped): dead again
