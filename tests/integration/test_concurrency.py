"""Several snapfs processes on one project (or one store) at once: writers serialise, readers don't
wait, and a writer that dies never leaves the project locked."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import snapfs
from tests.helpers import run_cli, tree_state, write

HOLD_LOCK = """
import sys, snapfs
p = snapfs.open(sys.argv[1], recover=sys.argv[2] == "recover")
p.lock.acquire(wait=False, purpose="held by the test")
print("locked", flush=True)
sys.stdin.read()  # hold the project lock until the test closes our stdin
p.close()
"""


def populate(root: Path, n: int = 300) -> None:
    for i in range(n):
        write(root, f"d{i % 10}/f{i}.txt", f"file {i}\n" * (i % 50 + 1))
    write(root, "model.bin", os.urandom(2 << 20))
    os.symlink("d0/f0.txt", root / "link")


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    populate(root)
    r = run_cli("-C", str(root), "init")
    assert r.returncode == 0, r.stderr
    return root


def read_line(proc: subprocess.Popen[bytes], stream: str = "stdout", timeout: float = 60) -> str:
    """One line from a child's pipe, or fail (instead of hanging) if none comes."""
    fd = getattr(proc, stream).fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no line on {stream} within {timeout}s (got {buf!r}); exit {proc.poll()}"
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


@contextmanager
def lock_holder(root: Path, *, recover: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """A separate process holding the project's write lock until the block ends (or it is killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root), "recover" if recover else "no"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = read_line(holder)
        assert line == "locked\n", (
            f"lock holder failed: {line!r} {holder.stderr.read() if holder.poll() is not None else ''}"
        )  # type: ignore[union-attr]
        yield holder
    finally:
        if holder.poll() is None:
            holder.stdin.close()  # type: ignore[union-attr]
            try:
                holder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        for pipe in (holder.stdin, holder.stdout, holder.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


def release(holder: subprocess.Popen[bytes]) -> None:
    holder.stdin.close()  # type: ignore[union-attr]
    assert holder.wait(timeout=60) == 0, holder.stderr.read()  # type: ignore[union-attr]


def snapfs_popen(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("SNAPFS_STORE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "snapfs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def snapshots(root: Path) -> list[dict[str, object]]:
    r = run_cli("-C", str(root), "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_two_snapshots_at_once_are_serialised(proj: Path) -> None:
    state = tree_state(proj)
    with lock_holder(proj) as holder:
        # Both start while the project is locked, so both must wait, then take turns.
        a = snapfs_popen("-C", str(proj), "snapshot", "-m", "one")
        b = snapfs_popen("-C", str(proj), "snapshot", "-m", "two")
        for p in (a, b):
            line = read_line(p, "stderr")
            assert line.startswith("Waiting for another snapfs process"), line
            assert f"pid {holder.pid} " in line, line
        assert a.poll() is None and b.poll() is None, "a snapshot ran while the project was locked"
        release(holder)
    out = {}
    for p in (a, b):
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr.decode()
        assert b"Traceback" not in stderr
        out[p] = int(stdout.split()[0])
    assert sorted(out.values()) == [1, 2]
    snaps = snapshots(proj)
    assert sorted(s["label"] for s in snaps) == ["one", "two"]
    assert snaps[0]["root"] == snaps[1]["root"]
    # Serialised: the second one found every object already stored by the first.
    assert sorted(s["new_objects"] for s in snaps)[0] == 0, snaps  # type: ignore[type-var]
    assert max(s["new_objects"] for s in snaps) > 0, snaps  # type: ignore[type-var]
    assert run_cli("-C", str(proj), "verify").returncode == 0
    for sid in (1, 2):
        (proj / "d3/f3.txt").write_text("broken")
        os.unlink(proj / "model.bin")
        r = run_cli("-C", str(proj), "restore", str(sid), "--yes")
        assert r.returncode == 0, r.stderr
        assert tree_state(proj) == state


def test_no_wait_fails_at_once_then_a_waiting_writer_succeeds(proj: Path) -> None:
    with lock_holder(proj) as holder:
        r = run_cli("--no-wait", "-C", str(proj), "snapshot", timeout=60)
        assert r.returncode == 3, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "busy" in lines[0] and f"pid {holder.pid} " in lines[0], lines[0]
        assert "Traceback" not in r.stderr and r.stdout == ""

        waiter = snapfs_popen("-C", str(proj), "snapshot", "-m", "waited")
        line = read_line(waiter, "stderr")
        assert (
            line.startswith("Waiting for another snapfs process") and f"pid {holder.pid} " in line
        )
        assert "--no-wait" in line
        assert waiter.poll() is None, "the snapshot did not wait for the lock"
        assert snapshots(proj) == []  # nothing was written while the lock was held
        release(holder)
    stdout, stderr = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, stderr.decode()
    assert stdout.split()[0] == b"1"
    assert [s["label"] for s in snapshots(proj)] == ["waited"]
    assert run_cli("-C", str(proj), "verify").returncode == 0


def test_readers_do_not_wait_for_a_writer(proj: Path) -> None:
    assert run_cli("-C", str(proj), "snapshot").returncode == 0
    write(proj, "new.txt", "n")
    with lock_holder(proj):
        for args, code in (
            (["status"], 0),
            (["status", "--json"], 0),
            (["list"], 0),
            (["list", "--json"], 0),
            (["diff", "1"], 1),
            (["verify"], 0),
        ):
            # A reader that blocked would hang until the timeout: the holder never lets go.
            r = run_cli("--no-wait", "-C", str(proj), *args, timeout=60)
            assert r.returncode == code, (args, r.returncode, r.stderr)
            assert "Waiting" not in r.stderr and "busy" not in r.stderr, (args, r.stderr)
        st = json.loads(run_cli("-C", str(proj), "status", "--json", timeout=60).stdout)
        assert st["added"] == ["new.txt"]


def test_reader_does_not_wait_for_a_writer_over_an_interrupted_restore(proj: Path) -> None:
    """An intent on disk makes commands try to recover, but never wait for a live writer."""
    target = tree_state(proj)
    assert run_cli("-C", str(proj), "snapshot").returncode == 0
    for i in range(20):
        (proj / f"d1/f{i * 10 + 1}.txt").write_text("changed")
    r = run_cli(
        "-C", str(proj), "restore", "1", "--yes", env={"SNAPFS_CRASH_AT": "restore.after_op:5"}
    )
    assert r.returncode == -signal.SIGKILL
    assert (proj / ".snapfs/intent.json").exists()
    with lock_holder(proj, recover=False):  # a writer that hasn't got round to recovering yet
        r = run_cli("-C", str(proj), "list", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        assert (proj / ".snapfs/intent.json").exists()  # the writer owns recovery meanwhile
    r = run_cli("-C", str(proj), "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {
        "added": [],
        "modified": [],
        "deleted": [],
    }
    assert not (proj / ".snapfs/intent.json").exists()
    assert tree_state(proj) == target


def test_lock_released_when_holder_is_sigkilled(proj: Path) -> None:
    with lock_holder(proj) as holder:
        assert run_cli("--no-wait", "-C", str(proj), "snapshot").returncode == 3
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=60) == -signal.SIGKILL
        r = run_cli("--no-wait", "-C", str(proj), "snapshot", timeout=60)
        assert r.returncode == 0, r.stderr
    assert [s["id"] for s in snapshots(proj)] == [1]


def test_lock_released_when_a_real_snapshot_is_sigkilled(proj: Path) -> None:
    r = run_cli("-C", str(proj), "snapshot", env={"SNAPFS_CRASH_AT": "snapshot.objects_synced"})
    assert r.returncode == -signal.SIGKILL
    r = run_cli("--no-wait", "-C", str(proj), "snapshot", "-m", "after the crash", timeout=60)
    assert r.returncode == 0, r.stderr
    assert [s["label"] for s in snapshots(proj)] == ["after the crash"]
    assert run_cli("-C", str(proj), "verify").returncode == 0
    assert os.listdir(proj / ".snapfs/tmp") == []


def test_two_projects_sharing_a_store_snapshot_at_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = os.urandom(1 << 20)
    roots = []
    for name in ("p1", "p2"):
        root = tmp_path / name
        root.mkdir()
        populate(root, 200)
        write(root, "shared.bin", common)  # the same content in both: both may race to store it
        assert run_cli("--store", str(store), "-C", str(root), "init").returncode == 0
        roots.append(root)
    states = [tree_state(r) for r in roots]
    procs = [snapfs_popen("--store", str(store), "-C", str(r), "snapshot") for r in roots]
    for p in procs:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr.decode()
    for root, state in zip(roots, states, strict=True):
        r = run_cli("--store", str(store), "-C", str(root), "verify")
        assert r.returncode == 0, r.stdout + r.stderr
        os.unlink(root / "shared.bin")
        (root / "d2/f2.txt").write_text("broken")
        r = run_cli("--store", str(store), "-C", str(root), "restore", "1", "--yes")
        assert r.returncode == 0, r.stderr
        assert tree_state(root) == state
    assert os.listdir(store / "tmp") == []


def test_threads_in_one_process_snapshot_projects_sharing_a_store(tmp_path: Path) -> None:
    """A long-lived process (a web panel, say) serving two projects on one store at once."""
    store = tmp_path / "store"
    projects = []
    for name in ("p1", "p2"):
        root = tmp_path / name
        root.mkdir()
        for i in range(1500):
            write(root, f"{name}/f{i}.txt", os.urandom(200 + i))
        write(root, "big.bin", os.urandom(3 << 20))
        projects.append(snapfs.init(root, store=store))
    states = [tree_state(p.root) for p in projects]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(p: snapfs.Project) -> None:
        try:
            start.wait()
            for round_ in range(3):
                write(p.root, f"round{round_}.bin", os.urandom(100_000))
                p.snapshot(f"round {round_}")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in projects]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    try:
        assert not errors, f"a concurrent snapshot failed: {errors[0]!r}"
        for p, state in zip(projects, states, strict=True):
            assert [s.label for s in p.snapshots()] == ["round 0", "round 1", "round 2"]
            assert p.verify().ok
            p.restore(1)
            now = tree_state(p.root)
            assert {k: v for k, v in now.items() if k != b"round0.bin"} == state
    finally:
        for p in projects:
            p.close()
    assert os.listdir(store / "tmp") == []


def test_a_long_lived_project_releases_the_lock_between_writes(tmp_path: Path) -> None:
    """A host app keeps its Project open; other writers must not wait for it to close."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "f").write_text("1")
    with snapfs.init(root) as app:
        app.snapshot()
        app.restore(1)
        app.gc()
        r = run_cli("--no-wait", "-C", str(root), "snapshot")
        assert r.returncode == 0, r.stderr
