"""Concurrency soak: several snapfs processes at once on one project, for a while.

Workers loop on random operations until the time is up, each command under a timeout (a
deadlock fails the test): snapshots of a tree another worker keeps changing, restores, gc,
transactions (``snapfs run -- sh -c ...``), downloads from a server on 127.0.0.1, all while
``snapfs watch`` runs; and a second project that shares the object store (``--store``) takes
snapshots while the first one's gc runs. At the end every snapshot of both projects verifies
and restores exactly, nothing is left in ``.snapfs``, and every command that had to wait for the
project lock said so in one line.

CI runs ``test_soak_sample`` (about 20 s). The long run::

    python -m pytest -m soak -s -k minutes tests/soak
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.crash.sweep import force_rmtree, project_leftovers
from tests.faultserver import FaultServer
from tests.helpers import run_cli, tree_state, write

pytestmark = [pytest.mark.soak, pytest.mark.slow]

TIMEOUT = 120  # seconds any one command may take; longer is a deadlock
BLOB = random.Random(3).randbytes(2 << 20)
SHA = hashlib.sha256(BLOB).hexdigest()


def snap_ids(root: Path, env: dict[str, str]) -> list[int]:
    import json

    r = run_cli("-C", str(root), "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return [s["id"] for s in json.loads(r.stdout)]


def soak(tmp_path: Path, seconds: float) -> None:
    store = tmp_path / "store"
    a, b = tmp_path / "a", tmp_path / "b"
    env = {"SNAPFS_STATE_DIR": str(tmp_path / "state")}
    for root in (a, b):
        root.mkdir()
        for i in range(30):
            write(root, f"src/d{i % 5}/f{i}.txt", f"{root.name} {i}\n" * (i + 1))
        write(root, "shared.bin", random.Random(1).randbytes(1_500_000))  # in both: deduplicated
        r = run_cli("-C", str(root), "--store", str(store), "init", env=env)
        assert r.returncode == 0, r.stderr
        assert run_cli("-C", str(root), "snapshot", env=env).returncode == 0

    problems: list[str] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def cmd(who: str, root: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            r = run_cli("-C", str(root), *args, env=env, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            with lock:
                problems.append(f"{who}: {' '.join(args)} took over {TIMEOUT} s (deadlock?)")
            return None
        err = r.stderr.strip().splitlines()
        waits = [ln for ln in err if ln.startswith("Waiting for another snapfs process")]
        rest = [ln for ln in err if ln not in waits]
        with lock:
            counts[args[0]] = counts.get(args[0], 0) + 1
            counts["waited"] = counts.get("waited", 0) + bool(waits)
            if r.returncode != 0:
                problems.append(f"{who}: {' '.join(args)} exited {r.returncode}: {rest[-1:]}")
            elif "Traceback" in r.stderr:
                problems.append(f"{who}: {' '.join(args)}: {r.stderr[-300:]}")
        return r

    def snapshotter(rng: random.Random) -> None:
        while time.monotonic() < deadline:
            write(
                a,
                f"src/d{rng.randrange(5)}/w{rng.randrange(20)}.txt",
                os.urandom(rng.randrange(5000)),
            )
            cmd("snapshotter", a, "snapshot", "-m", "soak")

    def restorer(rng: random.Random) -> None:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2))
            cmd("restorer", a, "restore", "latest~1" if rng.random() < 0.5 else "latest")

    def collector(rng: random.Random) -> None:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1, 3))
            cmd("gc", a, "gc", "--keep-last", "4")

    def transactor(rng: random.Random) -> None:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2))
            code = rng.choice([0, 0, 3])
            sh = f"echo {rng.random()} > src/txn.txt; exit {code}"
            r = cmd("txn", a, "run", "--", "sh", "-c", sh) if code == 0 else None
            if code:  # a failing command is rolled back: exit 3 is the expected outcome
                try:
                    r = run_cli("-C", str(a), "run", "--", "sh", "-c", sh, env=env, timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    with lock:
                        problems.append(f"txn: failing run took over {TIMEOUT} s")
                    continue
                if r.returncode != 3 or "Traceback" in r.stderr:
                    with lock:
                        problems.append(
                            f"txn: failing run exited {r.returncode}: {r.stderr[-200:]}"
                        )

    def downloader(rng: random.Random, srv: FaultServer) -> None:
        n = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 2))
            n += 1
            dest = f"models/m{n % 3}.bin"
            r = cmd("download", a, "download", srv.url("/m.bin"), "-o", dest, "--sha256", SHA)
            if r is not None and r.returncode == 0 and (a / dest).exists():
                if (a / dest).read_bytes() != BLOB:
                    with lock:
                        problems.append(f"download: {dest} is not the file")

    def neighbour(rng: random.Random) -> None:  # the other project, on the shared store
        while time.monotonic() < deadline:
            write(b, f"src/d{rng.randrange(5)}/n{rng.randrange(10)}.txt", os.urandom(3000))
            cmd("neighbour", b, "snapshot")
            b_states[snap_ids(b, env)[-1]] = tree_state(b)

    b_states: dict[int, object] = {1: tree_state(b)}
    watch = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "-C", str(a), "watch"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    with FaultServer() as srv:
        srv.add("/m.bin", BLOB)
        workers = [
            threading.Thread(target=fn, args=(random.Random(i), *extra), name=fn.__name__)
            for i, (fn, extra) in enumerate(
                [
                    (snapshotter, ()),
                    (restorer, ()),
                    (collector, ()),
                    (transactor, ()),
                    (downloader, (srv,)),
                    (neighbour, ()),
                ]
            )
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=seconds + 4 * TIMEOUT)
        stuck = [t.name for t in workers if t.is_alive()]
        assert not stuck, f"workers stuck: {stuck}"
    watch.send_signal(signal.SIGTERM)
    try:
        _, werr = watch.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        watch.kill()
        watch.communicate()
        problems.append("snapfs watch did not stop on SIGTERM")
    else:
        if "Traceback" in werr:
            problems.append(f"snapfs watch: {werr[-300:]}")

    # Everything recorded is whole and lands exactly.
    for root in (a, b):
        v = run_cli("-C", str(root), "verify", env=env)
        if v.returncode != 0:
            problems.append(f"verify {root.name}: {v.stdout[-300:]} {v.stderr[-300:]}")
        for sid in snap_ids(root, env):
            r = run_cli("-C", str(root), "restore", str(sid), env=env)
            if r.returncode != 0:
                problems.append(f"restore {root.name} {sid}: {r.stderr.strip()[-200:]}")
            elif root == b and sid in b_states and tree_state(b) != b_states[sid]:
                problems.append(f"snapshot {sid} of the neighbour restores wrong")
        problems += [f"{root.name}: {p}" for p in project_leftovers(root)]
    print(f"\nsoak {seconds:.0f} s: {sorted(counts.items())}, {len(problems)} problems")
    assert counts.get("snapshot", 0) >= 3 and counts.get("gc", 0) >= 1, counts
    assert not problems, "\n".join(problems)
    for root in (a, b):
        force_rmtree(root)


def test_soak_sample(tmp_path: Path) -> None:
    soak(tmp_path, 20)


def test_soak_minutes(tmp_path: Path) -> None:
    soak(tmp_path, float(os.environ.get("SOAK_SECONDS", "180")))
