"""Aggregation (medians) and markdown tables for the benchmark results."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.tools import loop_note

# (key in a run's "times" dict, row label); order = table order.
TIME_METRICS: list[tuple[str, str]] = [
    ("init", "init (s)"),
    ("snapshot_first", "first snapshot (s)"),
    ("snapshot_nochange", "no-change snapshot (s)"),
    ("status_clean", "status, clean (s)"),
    ("status_dirty", "status after change (s)"),
    ("snapshot_change", "snapshot after change (s)"),
    ("restore", "restore to first (s)"),
]
MB = 1e6


def _median(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def _joined(values: list[Any]) -> str:
    """Identical values collapse to one; differing ones are all shown (flaky results stay visible)."""
    uniq = list(dict.fromkeys(str(v) for v in values if v is not None))
    return " / ".join(uniq) if uniq else "n/a"


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of timings/sizes over repeats, plus the verdicts of every repeat."""
    return {
        "times": {k: _median([r["times"].get(k) for r in runs]) for k, _ in TIME_METRICS},
        "store_bytes": _median([r.get("store_bytes") for r in runs]),
        "store_bytes_fs": _median([r.get("store_bytes_fs") for r in runs]),
        "exact": _joined([r.get("exact") for r in runs]),
        "leaked": _joined([r.get("leaked") for r in runs]),
        "untouched": _joined([r.get("untouched") for r in runs]),
        "status_check": _joined([r.get("status_check") for r in runs]),
        "errors": [r["error"] for r in runs if r.get("error")],
    }


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MB:.1f}"


def _fmt_ratio(peer: float | None, base: float | None) -> str:
    if peer is None or base is None or base <= 0:
        return "n/a"
    return f"{peer / base:.2f}x"


def _row(label: str, cells: list[str]) -> str:
    return "| " + " | ".join([label, *cells]) + " |"


def _header(tools: list[str]) -> list[str]:
    return [_row("metric", tools), "|" + "---|" * (len(tools) + 1)]


def medians_table(agg: dict[str, dict[str, Any]]) -> str:
    tools = list(agg)
    lines = _header(tools)
    for key, label in TIME_METRICS:
        lines.append(_row(label, [_fmt_s(agg[t]["times"][key]) for t in tools]))
    lines.append(_row("store extra, du (MB)", [_fmt_mb(agg[t]["store_bytes"]) for t in tools]))
    lines.append(
        _row("store extra, fs blocks (MB)", [_fmt_mb(agg[t]["store_bytes_fs"]) for t in tools])
    )
    lines.append(_row("project after 1st snapshot", [agg[t]["untouched"] for t in tools]))
    lines.append(_row("restore exact?", [agg[t]["exact"] for t in tools]))
    lines.append(_row("1st snapshot leaked edits", [agg[t]["leaked"] for t in tools]))
    lines.append(_row("status check", [agg[t]["status_check"] for t in tools]))
    lines.append(_row("errors", [str(len(agg[t]["errors"])) for t in tools]))
    return "\n".join(lines)


def ratio_table(agg: dict[str, dict[str, Any]], base: str = "snapfs") -> str:
    """peer / snapfs: > 1 means snapfs is faster (or smaller)."""
    if base not in agg:
        return f"(no ratio table: {base} did not run)"
    peers = [t for t in agg if t != base]
    if not peers:
        return "(no ratio table: no peer ran)"
    lines = _header(peers)
    for key, label in TIME_METRICS:
        b = agg[base]["times"][key]
        lines.append(
            _row(label.replace(" (s)", ""), [_fmt_ratio(agg[p]["times"][key], b) for p in peers])
        )
    for key, label in (("store_bytes", "store extra, du"), ("store_bytes_fs", "store extra, fs")):
        b = agg[base][key]
        lines.append(_row(label, [_fmt_ratio(agg[p][key], b) for p in peers]))
    return "\n".join(lines)


def floors_table(floors: dict[str, Any]) -> str:
    walk, hsh = floors["walk"], floors["hash"]
    gbps = walk["bytes"] / hsh["seconds"] / 1e9 if hsh["seconds"] else 0.0
    return "\n".join(
        [
            "| floor | median s | note |",
            "|---|---|---|",
            f"| scandir+lstat walk | {_fmt_s(walk['seconds'])} | {walk['entries']} entries |",
            f"| read + xxh3_128 all bytes | {_fmt_s(hsh['seconds'])} "
            f"| {walk['bytes'] / MB:.0f} MB, {gbps:.2f} GB/s |",
            f"| `python -m snapfs --version` | {_fmt_s(floors.get('snapfs_startup'))} "
            "| CLI start-up, included in every snapfs time |",
        ]
    )


def errors_list(agg: dict[str, dict[str, Any]]) -> str:
    lines = [f"- {t}: {e.splitlines()[0][:300]}" for t in agg for e in agg[t]["errors"]]
    return "### errors\n\n" + "\n".join(lines) if lines else ""


def fs_report(
    fs: str, info: dict[str, Any], agg: dict[str, dict[str, Any]], floors: dict[str, Any]
) -> str:
    return "\n\n".join(
        [
            (
                f"## {fs}{loop_note(info)}  (scale {info['scale']}, repeat {info['repeat']}, "
                f"{info['entries']} entries, "
                f"{info['bytes'] / MB:.0f} MB; warm page cache: each tool's copy is read once, untimed, "
                "before timing; caches are never dropped)"
            ),
            "### median times",
            medians_table(agg),
            "### ratios peer / snapfs (>1 means snapfs is faster/smaller)",
            ratio_table(agg),
            "### floors",
            floors_table(floors),
            errors_list(agg),
        ]
    ).rstrip()
