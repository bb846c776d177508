"""Download benchmark: `snapfs download` vs curl, wget and aria2c, against local fault-injecting
HTTP servers (tests/faultserver.py), on a clean link and under a fault schedule, in one run.

Run from the repository root::

    python -m benchmarks.download --size 64MiB --repeat 1   # smoke, < 1 min
    python -m benchmarks.download                           # 1 GiB, 3 repeats

See benchmarks/README.md ("Download benchmark") for the scenarios and the exact commands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

if __package__ in (None, ""):  # `python benchmarks/download.py`: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import genproject, report
from benchmarks.run import FS_KINDS, filesystem, log
from benchmarks.tools import Snapfs, _which_reason, loop_mode
from tests.faultserver import Corrupt, FaultServer, ResetEvery, Stall, Status, Throttle

PATH = "/model.safetensors"
MAX_RUNS = 30  # curl/wget: invocations per download before giving up
SCENARIOS = ("clean", "link", "faults", "corrupt-only")
TOOL_NAMES = ("snapfs", "curl", "curl+sync", "wget", "aria2c")
MIB = 1 << 20


# ---- the setup -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Where the faults of the "faults" scenario sit (file offsets, bytes, seconds), and the
    "link" scenario's rate."""

    reset_every: int  # good server: reset every N body bytes served (all requests together)
    stall_at: int  # good server: one stall, in the first response to reach this file offset
    stall_seconds: float
    status_503_request: int  # good server: the Nth request to the file gets 503, Retry-After: 1
    corrupt: tuple[tuple[int, int], ...]  # bad mirror: every byte of these [start, end) flipped
    link_rate: int = 125_000_000  # "link": bytes/s the good server sends, all connections together

    @classmethod
    def for_size(
        cls, size: int, stall_seconds: float, reset_every: int | None, link_rate: int
    ) -> Schedule:
        # 60%, not 50%, for small files: a boundary on a power-of-two split point would fall
        # exactly where multi-connection tools end a segment, and they would never see it.
        every = reset_every or min(100_000_000, size * 6 // 10)
        # 1 MiB at 10%, 30%, ... 90%: any sizeable part taken from the bad mirror is bad.
        bad = tuple((size * k // 10, min(size, size * k // 10 + MIB)) for k in (1, 3, 5, 7, 9))
        return cls(every, size * 55 // 100, stall_seconds, 2, bad, link_rate)


def arm(good: FaultServer, bad: FaultServer, scenario: str, sched: Schedule) -> None:
    """Reset both servers' stats and arm the scenario's faults (the bad mirror is always bad)."""
    for srv in (good, bad):
        srv.clear_faults()
        srv.reset_stats()
    bad.inject(PATH, Corrupt(ranges=sched.corrupt))
    if scenario == "link":  # one link for every connection, as a real one is
        good.inject(PATH, Throttle(sched.link_rate, shared=True))
    if scenario == "faults":
        good.inject(
            PATH,
            ResetEvery(sched.reset_every),
            Stall(seconds=sched.stall_seconds, at=sched.stall_at),
            Status(503, retry_after=1, skip=sched.status_503_request - 1),
        )


def sources(scenario: str, tool: str) -> tuple[str, ...]:
    """Which servers a tool is given: "good" (with the scenario's faults) and/or "bad"."""
    if scenario in ("clean", "link"):
        return ("good",)
    if scenario == "corrupt-only":
        return ("bad",)
    # Tools that take several sources get the bad mirror too; curl/wget take one URL.
    return ("good", "bad") if tool in ("snapfs", "aria2c") else ("good",)


# ---- the tools -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    rc: int | None  # None: timed out
    runs: int
    tail: str  # last non-empty output line of the last invocation


class DownloadTool:
    name = ""
    rerun = False  # re-run the same command after a failure (it resumes), up to MAX_RUNS
    scenarios: tuple[str, ...] = SCENARIOS  # the scenarios it runs in
    env: ClassVar[dict[str, str]] = {}

    def unavailable_reason(self) -> str | None:
        return _which_reason(self.name)

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        return _first_line([self.name, "--version"])

    def fetch(self, urls: Sequence[str], dest: Path, sha256: str, timeout: float) -> Outcome:
        cmd = self.command(urls, dest, sha256)
        deadline = time.perf_counter() + timeout
        runs = 0
        while True:
            runs += 1
            try:
                p = subprocess.run(
                    cmd,
                    cwd=dest.parent,
                    env={**os.environ, **self.env},
                    capture_output=True,
                    text=True,
                    timeout=max(0.0, deadline - time.perf_counter()),
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return Outcome(None, runs, f"timed out after {timeout:.0f} s")
            if p.returncode == 0 or not self.rerun or runs >= MAX_RUNS:
                return Outcome(p.returncode, runs, _tail(p.stderr) or _tail(p.stdout))


class SnapfsTool(DownloadTool):
    name = "snapfs"
    env: ClassVar[dict[str, str]] = Snapfs.ENV

    def unavailable_reason(self) -> str | None:
        return None  # always run: a missing or broken CLI shows up as "failed (...)" rows

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        mirrors = [arg for url in urls[1:] for arg in ("--mirror", url)]
        return [
            sys.executable, "-m", "snapfs", "download", urls[0], "-o", str(dest),
            "--sha256", sha256, *mirrors,
        ]  # fmt: skip

    def version(self) -> str:
        return _first_line([sys.executable, "-m", "snapfs", "--version"], self.env)


class CurlTool(DownloadTool):
    name = "curl"
    rerun = True

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        (url,) = urls
        return [
            "curl", "-sS", "-f", "-L", "-C", "-", "--retry", "20", "--retry-all-errors",
            "--retry-delay", "1", "-o", str(dest), url,
        ]  # fmt: skip


class DurableCurlTool(CurlTool):
    """curl, then ``sync -d`` on the file: what curl costs with snapfs's guarantee that a
    finished download is on disk before it is reported done (a reference, not a target)."""

    name = "curl+sync"
    scenarios = ("clean", "link")

    def unavailable_reason(self) -> str | None:
        return _which_reason("curl") or _which_reason("sync")

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        curl = " ".join(shlex.quote(a) for a in super().command(urls, dest, sha256))
        return ["sh", "-c", f"{curl} && sync -d {shlex.quote(str(dest))}"]

    def version(self) -> str:
        return "curl, then sync -d"


class WgetTool(DownloadTool):
    name = "wget"
    rerun = True

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        (url,) = urls
        return ["wget", "-nv", "-c", "--tries=20", "-O", str(dest), url]


class Aria2cTool(DownloadTool):
    name = "aria2c"

    def command(self, urls: Sequence[str], dest: Path, sha256: str) -> list[str]:
        return [
            "aria2c", "-c", "-x", "4", "-s", "4", "--max-tries=20", "--retry-wait=1",
            f"--checksum=sha-256={sha256}", "--file-allocation=none", "--allow-overwrite=true",
            "--auto-file-renaming=false", "--console-log-level=error", "--summary-interval=0",
            "--show-console-readout=false", "-d", str(dest.parent), "-o", dest.name, *urls,
        ]  # fmt: skip


ALL_TOOLS: dict[str, DownloadTool] = {
    t.name: t for t in (SnapfsTool(), CurlTool(), DurableCurlTool(), WgetTool(), Aria2cTool())
}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERRORISH = re.compile(r"\berror\b|fail|refus|mismatch|expected", re.IGNORECASE)


def _tail(text: str) -> str:
    """The last error-looking line of a tool's output, else its last line (aria2c ends with
    generic advice after the real error)."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    tagged = [ln for ln in lines if "[ERROR]" in ln]  # aria2c's own error lines
    errorish = [ln for ln in lines if _ERRORISH.search(ln)]
    return (tagged or errorish or lines or [""])[-1][:400]


def _first_line(cmd: list[str], env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(
            cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
        )
    except OSError:
        return "unavailable"
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0] if p.returncode == 0 and out else "unavailable"


# ---- one download --------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 * MIB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def wait_idle(servers: Sequence[FaultServer], timeout: float) -> None:
    """Let responses the last tool abandoned (e.g. in a stall) end before the next run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.finished for srv in servers for r in srv.requests):
            return
        time.sleep(0.05)


def run_one(
    tool: DownloadTool,
    scenario: str,
    servers: dict[str, FaultServer],
    sched: Schedule,
    source: Path,
    sha256: str,
    area: Path,
    timeout: float,
) -> dict[str, Any]:
    size = source.stat().st_size
    srcs = sources(scenario, tool.name)
    urls = [servers[s].url(PATH) for s in srcs]
    area.mkdir(parents=True)
    dest = area / "model.safetensors"
    arm(servers["good"], servers["bad"], scenario, sched)
    os.sync()  # don't bill this run for writeback of the previous one's file
    t0 = time.perf_counter()
    out = tool.fetch(urls, dest, sha256, timeout)
    wall = time.perf_counter() - t0
    sent = sum(srv.bytes_sent for srv in servers.values())
    records = [r for srv in servers.values() for r in srv.requests]
    fired = Counter(f for r in records for f in r.faults)
    if not dest.exists():
        verdict = "no file"
    else:
        verdict = "ok" if sha256_of(dest) == sha256 else "WRONG"
    shutil.rmtree(area, ignore_errors=True)
    wait_idle(list(servers.values()), timeout=sched.stall_seconds + 5)
    return {
        "tool": tool.name,
        "scenario": scenario,
        "sources": list(srcs),
        "wall": wall,
        "rc": out.rc,
        "runs": out.runs,
        "tail": out.tail,
        "bytes_sent": sent,
        "overhead": sent / size,
        "requests": len(records),
        "faults_hit": dict(fired),
        "sha256": verdict,
    }


# ---- report --------------------------------------------------------------------------------


def _result(sample: dict[str, Any]) -> str:
    """Short verdict for the table; `_failure` has the detail."""
    rc, runs = sample["rc"], sample["runs"]
    if rc == 0:
        return "exit 0" + (f", {runs} runs" if runs > 1 else "")
    what = "timed out" if rc is None else f"exit {rc}"
    return f"{'refused' if sample['scenario'] == 'corrupt-only' else 'failed'}: {what}"


def _failure(sample: dict[str, Any]) -> str | None:
    if sample["rc"] == 0:
        return None
    return f"{sample['tool']}: {_result(sample).split(':')[0]} ({sample['tail'] or 'no output'})"


_FAULT_LABELS = {"ResetEvery": "reset", "Stall": "stall", "Status": "503", "Corrupt": "corrupt"}


def _hits(sample: dict[str, Any]) -> str:
    """Which faults the tool actually ran into (a tool that never reaches one isn't hit)."""
    hit = sample["faults_hit"]
    parts = [f"{label} {hit[k]}" for k, label in _FAULT_LABELS.items() if hit.get(k)]
    return ", ".join(parts) or "none"


def summarize(samples: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """One row per (scenario, tool): medians over repeats; times only of runs that exited 0."""
    rows: list[dict[str, Any]] = []
    for scenario in SCENARIOS:
        for tool in TOOL_NAMES:
            mine = [s for s in samples if s["scenario"] == scenario and s["tool"] == tool]
            if not mine:
                continue
            wall = report._median([s["wall"] for s in mine if s["rc"] == 0])
            rows.append(
                {
                    "scenario": scenario,
                    "tool": tool,
                    "sources": "+".join(mine[0]["sources"]),
                    "wall": wall,
                    "mbps": size / wall / report.MB if wall else None,
                    "overhead": report._median([s["overhead"] for s in mine]),
                    "sha256": report._joined([s["sha256"] for s in mine]),
                    "faults_hit": report._joined([_hits(s) for s in mine]),
                    "result": report._joined([_result(s) for s in mine]),
                    "failures": list(dict.fromkeys(f for s in mine if (f := _failure(s)))),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    curl = {r["scenario"]: r["wall"] for r in rows if r["tool"] == "curl"}
    head = ["tool", "source(s)", "median s", "MB/s", "time / curl", "sent / size", "sha256"]
    head += ["faults hit"]
    lines = [report._row("scenario", [*head, "result"]), "|" + "---|" * (len(head) + 2)]
    for r in rows:
        cells = [
            r["tool"],
            r["sources"],
            report._fmt_s(r["wall"]),
            "n/a" if r["mbps"] is None else f"{r['mbps']:.0f}",
            report._fmt_ratio(r["wall"], curl.get(r["scenario"])),
            "n/a" if r["overhead"] is None else f"{r['overhead']:.2f}",
            r["sha256"],
            r["faults_hit"],
            r["result"],
        ]
        lines.append(report._row(r["scenario"], cells))
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from "1GiB", "64MiB", "64M" (binary), "500MB", "1GB" (decimal) or a number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?)(b?)\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    number, unit, binary, b = m.groups()
    factor = _UNITS[unit.lower()]
    if unit and b and not binary:  # KB, MB, GB: decimal
        factor = 1000 ** " kmg".index(unit.lower())
    return int(float(number) * factor)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats; tables show medians")
    ap.add_argument("--out", type=Path, default=Path("download-results.json"))
    ap.add_argument("--tools", default=",".join(TOOL_NAMES), help="comma list of tools")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of scenarios")
    ap.add_argument("--stall", type=float, default=5.0, help="seconds of the one stall")
    ap.add_argument(
        "--link-rate",
        type=parse_size,
        default=125_000_000,
        help="the link scenario's rate per second, all connections together "
        "(default 125MB: gigabit)",
    )
    ap.add_argument(
        "--reset-every",
        type=parse_size,
        default=None,
        help="reset a connection every N bytes served (default 100MB, or half the file if smaller)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per download, re-runs included (default 120 + 1 s per MB)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument(
        "--buffered-loop",
        action="store_true",
        help="leave loop devices buffered, as `mount -o loop` makes them (default: direct I/O, "
        "so that data written back early reaches the disk as it would on a real one)",
    )
    ap.add_argument(
        "--fs",
        choices=FS_KINDS,
        default="main",
        help="where the file and the downloads go: the main disk, or a fresh loop-mounted "
        "image (steadier: the main disk's write-back speed swings 5x between runs)",
    )
    args = ap.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if set(args.tools) - set(TOOL_NAMES) or not args.tools:
        ap.error(f"--tools: choose from {TOOL_NAMES}")
    if set(args.scenarios) - set(SCENARIOS) or not args.scenarios:
        ap.error(f"--scenarios: choose from {SCENARIOS}")
    if args.size < 4 * MIB or args.repeat < 1:
        ap.error("--size must be at least 4MiB and --repeat at least 1")
    if args.link_rate < MIB:
        ap.error("--link-rate must be at least 1MiB (per second)")
    if args.timeout is None:
        args.timeout = 120 + args.size / 1e6
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    tools, skipped = [], {}
    for name in args.tools:
        reason = ALL_TOOLS[name].unavailable_reason()
        if reason:
            skipped[name] = reason
            log(f"skipping {name}: {reason}")
        else:
            tools.append(ALL_TOOLS[name])
    sched = Schedule.for_size(args.size, args.stall, args.reset_every, args.link_rate)
    results: dict[str, Any] = {
        "argv": sys.argv,
        "started": time.time(),
        "size": args.size,
        "schedule": asdict(sched),
        "versions": {t.name: t.version() for t in tools},
        "skipped": skipped,
        "samples": [],
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="snapfs-dl-bench-", dir=args.workdir))
    try:
        # Room for the source, one download and the partial it replaces, and a margin.
        size = 3 * args.size + (512 << 20)
        with filesystem(args.fs, top, 0, size, direct=not args.buffered_loop) as workdir:
            results["loop"] = loop_mode(workdir)
            errors = _measure(args, tools, sched, results, workdir)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    results["server_errors"] = errors
    rows = summarize(results["samples"], args.size)
    results["summary"] = rows
    args.out.write_text(json.dumps(results, indent=1))
    print(header(args, sched, results))
    print()
    print(table(rows))
    failures = [f"- {r['scenario']}, {f}" for r in rows for f in r["failures"]]
    if failures:
        print("\n" + "\n".join(failures))
    if skipped:
        print()
        print("\n".join(f"- {name} skipped: {why}" for name, why in skipped.items()))
    if errors:
        print(f"\n{len(errors)} server-side errors (see {args.out})")
    log(f"raw results written to {args.out}")


def _measure(
    args: argparse.Namespace,
    tools: list[DownloadTool],
    sched: Schedule,
    results: dict[str, Any],
    workdir: Path,
) -> list[Any]:
    """Every sample, into ``results["samples"]``; returns the servers' errors."""
    source = workdir / "model.safetensors"
    log(f"generating {args.size / report.MB:.0f} MB of incompressible data in {workdir}")
    genproject._write_model(source, args.size, seed="download-bench")
    sha256 = sha256_of(source)  # also leaves the file in the page cache for the servers
    with FaultServer() as good, FaultServer() as bad:
        good.add(PATH, source)
        bad.add(PATH, source)
        servers = {"good": good, "bad": bad}
        # Repeats outside, tools inside, so slow drift spreads across all tools.
        for rep in range(args.repeat):
            for scenario in args.scenarios:
                for tool in tools:
                    if scenario not in tool.scenarios:
                        continue
                    area = workdir / f"{tool.name}-{scenario}-{rep}"
                    sample = run_one(
                        tool, scenario, servers, sched, source, sha256, area, args.timeout
                    )
                    sample["repeat"] = rep
                    results["samples"].append(sample)
                    log(
                        f"rep {rep + 1}/{args.repeat} {scenario:12} {tool.name:7} "
                        f"{sample['wall']:7.2f} s  sha256 {sample['sha256']:7}  "
                        f"{_result(sample)}  [{_hits(sample)}]"
                    )
                    args.out.write_text(json.dumps(results, indent=1))
        return [*good.errors, *bad.errors]


def header(args: argparse.Namespace, sched: Schedule, results: dict[str, Any]) -> str:
    versions = "; ".join(f"{k}: {v}" for k, v in results["versions"].items())
    return (
        f"## download, {args.size / report.MB:.0f} MB, repeat {args.repeat}, on {args.fs}"
        f"{f' (loop device: {loop})' if (loop := results.get('loop')) else ''}\n\n"
        f"faults scenario: a reset every {sched.reset_every / report.MB:.0f} MB served, "
        f"a {sched.stall_seconds:g} s stall at offset {sched.stall_at}, a 503 (Retry-After: 1) "
        f"on request #{sched.status_503_request}; the bad mirror flips "
        f"{len(sched.corrupt)} x 1 MiB at 10%, 30%, ... 90% of the file. link scenario: clean, "
        f"the good server sending {sched.link_rate / report.MB:.0f} MB/s over all connections "
        "together. Times only of runs that exited 0; "
        f"`time / curl` against curl in the same scenario.\n\n{versions}"
    )


if __name__ == "__main__":
    main()
