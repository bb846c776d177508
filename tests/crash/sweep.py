"""Shared machinery of the crash sweeps: count the crash points an operation passes, turn the
count into (point, hit) cases, run each case, and report the figure.

A sweep runs the operation once with ``SNAPFS_CRASH_COUNT`` to learn the exact sequence of
crash points it passes (deterministic scenarios make it the same every time), then re-runs it
in a fresh scenario once per case with ``SNAPFS_CRASH_AT=point:n``. Each case returns *every*
problem it found rather than stopping at the first, one problem per line, so a known defect
doesn't hide an unknown one in the same case.

Known defects
    A sweep that finds a real defect keeps it visible instead of going red for ever: the defect
    is listed as a :class:`KnownBug` with the exact symptom it produces (a regex on the problem
    text) and the cases that must show it (its witnesses; each also has its own
    ``xfail(strict=True)`` test). The sweep then fails on any problem no known bug explains,
    *and* when a witness no longer shows its bug (fixed: remove the entry and the xfail). The
    known failures are counted in the figure, never dropped.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import TreeState

# ---- cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Crash at the ``n``-th pass through ``point``; ``expect`` names the state to land in."""

    point: str
    n: int
    expect: str = ""
    index: int = 0  # position of this hit in the counted run (0-based)

    @property
    def spec(self) -> str:
        return f"{self.point}:{self.n}"


def read_hits(count_file: Path) -> list[str]:
    """The crash points a run with ``SNAPFS_CRASH_COUNT=count_file`` passed, in order."""
    return count_file.read_text().split() if count_file.exists() else []


def every_hit(seq: Sequence[str], expect: Callable[[Sequence[str], int], str]) -> list[Case]:
    """One case per hit of the counted run ``seq``; ``expect(seq, i)`` names where a crash at
    ``seq[i]`` must land."""
    seen: collections.Counter[str] = collections.Counter()
    cases = []
    for i, name in enumerate(seq):
        seen[name] += 1
        cases.append(Case(name, seen[name], expect(seq, i), i))
    return cases


def even_sample(specs: list[tuple[str, int, str]], sample: int) -> list[tuple[str, int, str]]:
    """A deterministic sample of about ``sample`` (point, hit, landing) triples, in run order:
    every point hit once, the last hit of every other point, and an even spread of the rest."""
    seen: collections.Counter[str] = collections.Counter(s[0] for s in specs)
    if len(specs) <= sample:
        return specs
    singles = [s for s in specs if seen[s[0]] == 1]
    lasts = [s for s in specs if seen[s[0]] > 1 and s[1] == seen[s[0]]]
    rest = [s for s in specs if seen[s[0]] > 1 and s not in lasts]
    want = max(0, sample - len(singles) - len(lasts))
    picked = [rest[int(i * len(rest) / want)] for i in range(want)] if want else []
    chosen = set(singles + lasts + picked)
    return [s for s in specs if s in chosen]  # keep the order of the run


def pick(cases: Sequence[Case], *wanted: tuple[str, int | str]) -> list[Case]:
    """The cases for (point, hit) pairs, hit being a number, ``"mid"`` or ``"last"``. Fails if a
    point was never reached: a sample that tries nothing cannot fail."""
    out = []
    for point, which in wanted:
        hits = [c for c in cases if c.point == point]
        assert hits, f"the counted run never reached {point}: {sorted({c.point for c in cases})}"
        if which == "last":
            out.append(hits[-1])
        elif which == "mid":
            out.append(hits[(len(hits) - 1) // 2])
        else:
            assert isinstance(which, int) and 1 <= which <= len(hits), (point, which, len(hits))
            out.append(hits[which - 1])
    return out


# ---- known bugs and the sweep ---------------------------------------------------------------


@dataclass(frozen=True)
class KnownBug:
    key: str
    reason: str  # "BUG: ..."; also the reason of its xfail test
    symptom: str  # a regex that matches every problem line this bug explains, and nothing else
    witnesses: tuple[str, ...] = ()  # "point:n" specs that must show it when they are swept
    where: str = ""  # a regex on "point:n": the cases it can explain (default: any)

    def explains(self, problem: str, spec: str = "") -> bool:
        return re.search(self.symptom, problem) is not None and (
            not self.where or re.search(self.where, spec) is not None
        )


class KnownBugShows(AssertionError):
    """Raised by an xfail test when its known bug (and nothing else) is what went wrong."""


def expect_only(
    problems: list[str], bug: KnownBug, spec: str, also: Sequence[KnownBug] = ()
) -> None:
    """For an ``xfail(strict=True, raises=KnownBugShows)`` test of case ``spec``: fail for real
    on any problem neither ``bug`` nor the other known bugs in ``also`` explain; raise
    :class:`KnownBugShows` if ``bug`` shows; pass otherwise (so a fixed bug turns the strict
    xfail into a failure that says so)."""
    other = [p for p in problems if not any(b.explains(p, spec) for b in (bug, *also))]
    assert not other, "problems no known bug explains:\n  " + "\n  ".join(other)
    mine = [p for p in problems if bug.explains(p, spec)]
    if mine:
        raise KnownBugShows(f"{bug.key} at {spec}: " + "\n  ".join(mine))


@dataclass
class SweepResult:
    operation: str
    cases: list[Case]
    problems: dict[str, list[str]] = field(default_factory=dict)  # spec -> problems
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return len({c.point for c in self.cases})

    def figure(self, known: Sequence[KnownBug]) -> str:
        failing = [s for s, ps in self.problems.items() if ps]
        unexplained = [
            s for s, ps in self.problems.items() if any(not _explained(p, s, known) for p in ps)
        ]
        by_bug = {
            b.key: sum(1 for s, ps in self.problems.items() if any(b.explains(p, s) for p in ps))
            for b in known
        }
        bugs = ", ".join(f"{k}: {v}" for k, v in by_bug.items() if v)
        return (
            f"{self.operation}: 1 operation x {self.points} points x {len(self.cases)} hits tried,"
            f" {len(failing)} failures ({len(unexplained)} unexplained"
            + (f"; known bugs {bugs}" if bugs else "")
            + f") in {self.seconds:.1f} s"
        )


def _explained(problem: str, spec: str, known: Sequence[KnownBug]) -> bool:
    return any(b.explains(problem, spec) for b in known)


def sweep(
    operation: str,
    cases: Sequence[Case],
    run_case: Callable[[Case, int], list[str]],
    known: Sequence[KnownBug] = (),
) -> SweepResult:
    """Run every case (``run_case(case, i)`` returns its problems), print the figure, and fail
    on any problem no known bug explains, or on a witness that no longer shows its bug."""
    t0 = time.monotonic()
    result = SweepResult(operation, list(cases))
    for i, case in enumerate(cases):
        try:
            result.problems[case.spec] = run_case(case, i)
        except Exception as exc:  # a crashed check is a finding too, not the end of the sweep
            result.problems[case.spec] = [f"the case raised {type(exc).__name__}: {exc}"]
    result.seconds = time.monotonic() - t0
    print("\n" + result.figure(known))
    lines = []
    for spec, problems in result.problems.items():
        for p in problems:
            tag = next((b.key for b in known if b.explains(p, spec)), None)
            if tag is None:
                lines.append(f"{spec}: {p}")
            else:
                print(f"  known bug {tag} at {spec}: {p}")
    for b in known:
        for w in b.witnesses:
            if w in result.problems and not any(b.explains(p, w) for p in result.problems[w]):
                lines.append(f"{w}: known bug {b.key} no longer shows here (fixed? remove it)")
    assert not lines, f"{operation}: {len(lines)} unexplained problem(s):\n" + "\n".join(lines)
    return result


# ---- running snapfs and checking its state --------------------------------------------------


def expect_sigkill(r: subprocess.CompletedProcess[str], case: Case) -> list[str]:
    if r.returncode == -signal.SIGKILL:
        return []
    return [
        f"expected death by SIGKILL at {case.spec}, got exit {r.returncode}: "
        + (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    ]


def force_rmtree(path: Path) -> None:
    """Remove a scenario, read-only directories included (as a non-root user too)."""
    if not path.exists():
        return
    for dirpath, dirnames, _files in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)


def project_leftovers(root: Path) -> list[str]:
    """What a finished (or recovered) operation must not leave under ``.snapfs/``: restore
    staging and trash, temp dirs, dot-temp files, an intent, journal cookies of dead journals, and partial
    downloads (removed once DEST is in place). One line per leftover."""
    state = root / ".snapfs"
    found: list[str] = []
    for sub in ("staging", "tmp", "downloads", "trash"):
        if (state / sub).is_dir():
            found += [f"{sub}/{n}" for n in sorted(os.listdir(state / sub))]
    for n in sorted(os.listdir(state)):
        if n.startswith(".") or n.startswith("journal-cookie-") or n == "intent.json":
            found.append(n)
    return [f"leftover .snapfs/{n}" for n in found]


def describe_diff(got: TreeState, want: TreeState, limit: int = 6) -> str:
    keys = sorted(set(got) ^ set(want) | {k for k in set(got) & set(want) if got[k] != want[k]})
    shown = [
        f"{k.decode(errors='replace')}: got {_short(got.get(k))} want {_short(want.get(k))}"
        for k in keys[:limit]
    ]
    return f"{len(keys)} paths differ: " + "; ".join(shown)


def _short(v: tuple[str, int, bytes] | None) -> str:
    if v is None:
        return "absent"
    kind, mode, data = v
    return f"{kind} {mode:o} {data[:6].hex()}"


def json_of(r: subprocess.CompletedProcess[str]) -> object:
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None
