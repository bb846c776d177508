"""In-process timings of snapfs transactions, the way a host application embeds the library.

Run as a subprocess by benchmarks/txn.py (one process per measurement block, so start-up and
imports are excluded from every number here). Prints one JSON object on stdout::

    python -m benchmarks.txn_driver enter    PROJECT N
    python -m benchmarks.txn_driver rollback PROJECT N --scale S --pristine DIR
    python -m benchmarks.txn_driver write2k  PROJECT N --dir RELDIR

* enter: on an unchanged tree, one untimed warm-up, then N times ``begin()`` and ``commit()``
  of an empty transaction, each timed separately.
* rollback: N times: ``begin()``, the import-like change (genproject.apply_change), ``sync``,
  then only ``tx.rollback()`` is timed; after each, the tree is compared with the pristine tree
  and with the tree as it was at the checkpoint.
* write2k: N times, interleaved: write_2k() plain, and inside ``with snapfs.transaction(p)``;
  the dir is deleted and an untimed snapshot taken after each, so every run starts unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import snapfs
from benchmarks import genproject, treecheck
from benchmarks.write2k import write_2k


def _journal_kind(tx: snapfs.Transaction) -> str:
    """Which journal the open transaction uses: WatchView (snapfs watch), Journal (its own), none."""
    j = getattr(tx, "_journal", None)  # diagnostic only: private, may change
    return type(j).__name__ if j is not None else "none"


def enter(project: Path, n: int) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    with snapfs.open(project) as p:
        for _ in range(n + 1):  # the first one is the warm-up, reported apart
            os.sync()
            tx = snapfs.transaction(p, "bench enter")
            t0 = time.perf_counter()
            tx.begin()
            t1 = time.perf_counter()
            kind = _journal_kind(tx)
            done = tx.commit()
            t2 = time.perf_counter()
            samples.append(
                {
                    "begin": t1 - t0,
                    "commit": t2 - t1,
                    "total": t2 - t0,
                    "journal": kind,
                    "journal_note": tx.journal_note,
                    "changes": done.summary(),
                }
            )
    return {"warmup": samples[0], "samples": samples[1:]}


def rollback(project: Path, n: int, scale: float, pristine: Path) -> dict[str, Any]:
    want_pristine = treecheck.manifest(pristine)
    samples: list[dict[str, Any]] = []
    with snapfs.open(project) as p:
        want_base = treecheck.manifest(project)  # the tree each checkpoint will hold
        for _ in range(n):
            os.sync()
            tx = snapfs.transaction(p, "bench rollback")
            tx.begin()
            kind = _journal_kind(tx)
            change = genproject.apply_change(project, scale)
            os.sync()  # like every timed step: don't bill rollback for the change's writeback
            t0 = time.perf_counter()
            undone = tx.rollback()
            seconds = time.perf_counter() - t0
            now = treecheck.manifest(project)
            vs_pristine = treecheck.diff(want_pristine, now)
            vs_base = treecheck.diff(want_base, now)
            samples.append(
                {
                    "rollback": seconds,
                    "journal": kind,
                    "journal_note": tx.journal_note,
                    "applied": change.counts(),
                    "undone": undone.summary(),
                    "exact_vs_pristine": treecheck.verdict(vs_pristine),
                    "exact_vs_checkpoint": treecheck.verdict(vs_base),
                    "diffs_sample": (vs_base or vs_pristine)[:20],
                }
            )
    return {"samples": samples}


def write2k(project: Path, n: int, reldir: str) -> dict[str, Any]:
    dest = project / reldir
    samples: list[dict[str, Any]] = []
    with snapfs.open(project) as p:

        def reset() -> None:
            shutil.rmtree(dest)
            p.snapshot("bench write2k reset")
            os.sync()

        p.snapshot("bench write2k start")
        os.sync()
        for _ in range(n):
            t0 = time.perf_counter()
            write_2k(str(dest))
            plain = time.perf_counter() - t0
            reset()
            tx = snapfs.transaction(p, "bench write2k")
            t0 = time.perf_counter()
            tx.begin()
            t1 = time.perf_counter()
            write_2k(str(dest))
            t2 = time.perf_counter()
            done = tx.commit()
            t3 = time.perf_counter()
            samples.append(
                {
                    "plain": plain,
                    "wrapped": t3 - t0,
                    "begin": t1 - t0,
                    "op_inside": t2 - t1,
                    "commit": t3 - t2,
                    "journal": tx.journal_note or "ok",
                    "changes": done.summary(),
                }
            )
            reset()
    return {"samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["enter", "rollback", "write2k"])
    ap.add_argument("project", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--pristine", type=Path)
    ap.add_argument("--dir", default="bench_write2k")
    a = ap.parse_args()
    if a.mode == "enter":
        out = enter(a.project, a.n)
    elif a.mode == "rollback":
        out = rollback(a.project, a.n, a.scale, a.pristine)
    else:
        out = write2k(a.project, a.n, a.dir)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
