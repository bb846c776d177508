"""Issue 5's success criteria on a randomized fault run (``benchmarks/recovery.py``).

"Report the measured rates over these scenarios and a randomized fault run (many imports with
random faults) against the brief's success criteria: at least 80% of network errors recovered
automatically (aim for 100% of transient ones); at least 60% of validation errors fixed without
the user; average recovery time under 30 s; zero corrupted projects."

Fixed seeds, so a failure can be replayed with ``python -m benchmarks.recovery --runs N --seed
S``. The rates are asserted; recovery *time* is only reported (tests never assert on wall-clock
time). The default suite runs a small sample; ``-m slow`` runs the full fault run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.recovery import TARGET_NETWORK, TARGET_VALIDATION, Rates, rates_table, run_rates


def _check(r: Rates, runs: int) -> None:
    table = rates_table(r)
    assert len(r.runs) == runs
    # A run that leaves a project half-imported, with wrong bytes, with temp files, or not
    # back at its pre-import tree after a rollback is a corrupted project: never acceptable.
    assert r.corrupted == [], table
    hit = [i for i in r.incidents if i.fired]
    assert hit, "no injected fault was hit: the run proves nothing"
    transient = [i for i in hit if i.cls == "transient"]
    assert transient and all(i.recovered for i in transient), table
    # Whatever nothing could recover (every source 404s, corrupt bytes everywhere) must
    # have stopped its import, not been "recovered" into a wrong file.
    for i in hit:
        if not i.recoverable:
            assert not i.recovered, (i, table)
    assert r.network is not None and r.network >= TARGET_NETWORK, table
    if r.validation is not None:
        assert r.validation >= TARGET_VALIDATION, table


def test_sample_of_the_randomized_fault_run(tmp_path: Path) -> None:
    """Five imports with random faults (seed 5): no corrupted project, every transient
    network fault recovered, the rates at or above the targets."""
    r = run_rates(5, seed=5, work=tmp_path)
    _check(r, 5)


@pytest.mark.slow
def test_randomized_fault_run_meets_the_success_criteria(tmp_path: Path) -> None:
    """Sixty imports with random faults (seed 1): the brief's criteria, except the time
    (reported by the benchmark, not asserted)."""
    r = run_rates(60, seed=1, work=tmp_path)
    _check(r, 60)
    assert r.validation is not None
