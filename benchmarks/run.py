"""snapfs benchmark: snapfs vs git / restic / borg / rsync --link-dest / cp -al (/ cp --reflink),
and snapfs transactions (entry, rollback, wrapping overhead) vs git and the walk floor.

Run from the repository root::

    python -m benchmarks.run --scale 0.05 --repeat 1 --txn-repeat 2 --txn-rollbacks 1  # smoke
    python -m benchmarks.run --fs all --out results.json  # full run, both suites
    python -m benchmarks.run --suite txn                  # only the transaction suite

See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import genproject, report, treecheck, txn
from benchmarks.tools import (
    ALL_TOOLS,
    CmdError,
    Snapfs,
    Tool,
    Unsupported,
    direct_io,
    fs_used_bytes,
    loop_mode,
    run,
)

FS_KINDS = ["main", "ext4-loop", "xfs-loop"]
SUITES = ["core", "txn"]
DEFAULT_PEERS = ["snapfs-watch", "git", "restic", "borg", "rsync", "cp-al", "cp-reflink"]
PEER_ALIASES = {"cp": "cp-al", "reflink": "cp-reflink"}
FLOORS_SCRIPT = Path(__file__).resolve().parent / "floors.py"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# filesystems


@contextmanager
def filesystem(
    kind: str, workdir: Path, scale: float, size: int | None = None, *, direct: bool = True
) -> Iterator[Path]:
    """Yield a fresh directory on the requested filesystem; unmount/remove it afterwards.

    A loop image is sized for the core benchmark at ``scale``, or ``size`` bytes if given. Its
    device is switched to direct I/O (see ``tools.direct_io``) unless ``direct`` is False.
    """
    if kind == "main":
        base = workdir / "main"
        base.mkdir()
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return
    img, mnt = workdir / f"{kind}.img", workdir / f"mnt-{kind}"
    # Room for pristine + work copy + change + the largest store + a restore dir.
    size = size or int((1.5 + 12 * scale) * (1 << 30))
    # ext4: no lazy inode-table init, or a kernel thread would zero tables during the timings.
    mkfs = (
        ["mkfs.xfs", "-q", "-m", "reflink=1"]
        if kind == "xfs-loop"
        else ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    )
    mounted = False
    mnt.mkdir()
    try:
        with open(img, "wb") as f:
            f.truncate(size)
        run([*mkfs, str(img)])
        run(["mount", "-o", "loop", str(img), str(mnt)])
        mounted = True
        if not direct_io(mnt, enable=direct) and direct:
            log(f"{mnt}: the loop device stays buffered (direct I/O refused): fsyncs are lumpy")
        yield mnt
    finally:
        if mounted:
            _unmount(mnt)
        img.unlink(missing_ok=True)
        if not os.path.ismount(mnt):
            mnt.rmdir()


def _unmount(mnt: Path) -> None:
    for _ in range(5):
        if subprocess.run(["umount", str(mnt)], check=False).returncode == 0:
            return
        time.sleep(1)  # e.g. a straggling child still has a file open
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---------------------------------------------------------------------------
# helpers


def warm_read(root: Path) -> None:
    """Untimed read of every file so each tool starts with the same (warm) page cache."""
    buf = bytearray(1 << 20)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    os.sync()  # don't bill this step for writeback of the previous step's dirty pages
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_floors(root: Path, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("walk", "hash"):
        samples = [
            json.loads(run([sys.executable, str(FLOORS_SCRIPT), mode, str(root)]))
            for _ in range(repeat)
        ]
        out[mode] = {
            **samples[0],
            "seconds": statistics.median(s["seconds"] for s in samples),
            "raw": [s["seconds"] for s in samples],
        }
    out["snapfs_startup"] = snapfs_startup(repeat)
    return out


def snapfs_startup(repeat: int) -> float | None:
    """Wall time of `python -m snapfs --version`: the fixed cost inside every snapfs timing."""
    if Snapfs.unavailable_reason():
        return None
    cmd = [sys.executable, "-m", "snapfs", "--version"]
    return statistics.median(timed(lambda: run(cmd, env=Snapfs.ENV))[0] for _ in range(repeat))


def _paths(entries: Any) -> set[str]:
    """Status entries may be plain paths or objects with a "path" key."""
    out: set[str] = set()
    for e in entries or []:
        out.add(str(e.get("path")) if isinstance(e, dict) else str(e))
    return out


def status_check(status: Any, expected: dict[str, list[str]]) -> str:
    """Compare snapfs's status JSON with the files we know were added/modified/deleted.

    Entries ending in "/" are directories; only files are compared, dirs are just counted.
    """
    if not isinstance(status, dict):
        return f"MISMATCH: not a JSON object: {str(status)[:80]}"
    problems: list[str] = []
    n_dirs = 0
    for kind, want in expected.items():
        got = _paths(status.get(kind))
        dirs = {p for p in got if p.endswith("/")}
        n_dirs += len(dirs)
        extra, missing = sorted(got - dirs - set(want)), sorted(set(want) - got)
        if extra or missing:
            example = (extra or missing)[0]
            problems.append(f"{kind}: {len(extra)} extra, {len(missing)} missing (e.g. {example})")
    if problems:
        return "MISMATCH " + "; ".join(problems)
    return f"ok (+{n_dirs} dir entries)" if n_dirs else "ok"


# ---------------------------------------------------------------------------
# one tool, one repeat


def run_tool_once(
    tool: Tool, pristine: Path, expected: treecheck.Manifest, scale: float, fs_delta: bool
) -> dict[str, Any]:
    """Copy the pristine project, then walk the tool through the whole scenario."""
    res: dict[str, Any] = {
        "times": {},
        "store_bytes": None,
        "store_bytes_fs": None,
        "exact": None,
        "leaked": None,
        "untouched": None,
        "status_check": None,
        "error": None,
        "extra": {},
    }
    times = res["times"]
    run(["cp", "-a", str(pristine), str(tool.project)])
    warm_read(tool.project)
    # Used-blocks accounting sees reflink sharing, which du cannot; only on a dedicated fs.
    used0 = fs_used_bytes(tool.area) if fs_delta else 0
    proj0 = tool.project_bytes()

    def step(key: str, fn: Callable[[], Any]) -> Any:
        try:
            times[key], out = timed(fn)
        except Unsupported:
            times[key] = None
            return None
        log(f"  {tool.name:<10} {key:<18} {times[key]:8.3f}s")
        return out

    try:
        step("init", tool.init)
        step("snapshot_first", lambda: tool.snapshot("first"))
        # A snapshot must not change the project it reads (modes included).
        touched = treecheck.diff(expected, treecheck.manifest(tool.project))
        res["untouched"], res["touched_sample"] = treecheck.verdict(touched), touched[:20]
        step("snapshot_nochange", lambda: tool.snapshot("nochange"))
        clean = step("status_clean", tool.status)
        change = genproject.apply_change(tool.project, scale)
        dirty = step("status_dirty", tool.status)
        if isinstance(tool, Snapfs):  # (also with the watcher: its journal must see the change)
            none: dict[str, list[str]] = {"added": [], "modified": [], "deleted": []}
            expect = {"added": change.added, "modified": change.modified, "deleted": change.deleted}
            res["status_check"] = (
                f"clean: {status_check(clean, none)}; dirty: {status_check(dirty, expect)}"
            )
        step("snapshot_change", lambda: tool.snapshot("change"))
        res["store_bytes"] = _optional(tool.store_bytes)
        if fs_delta:
            grown = fs_used_bytes(tool.area) - used0
            res["store_bytes_fs"] = grown - (tool.project_bytes() - proj0)
        first_dir = tool.first_snapshot_dir()
        if first_dir is not None:
            leaks = treecheck.diff(expected, treecheck.manifest(first_dir))
            res["leaked"] = "none" if not leaks else f"not exact: {len(leaks)} files leaked"
        restored = step("restore", tool.restore_first)
        if restored is not None:
            diffs = treecheck.diff(expected, treecheck.manifest(restored))
            res["exact"], res["diffs_sample"] = treecheck.verdict(diffs), diffs[:20]
    except CmdError as e:
        res["error"] = str(e)
        log(f"  {tool.name}: ERROR {e}")
    except Exception as e:  # noqa: BLE001 - e.g. unparsable output: one broken tool must not stop the suite
        res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        log(f"  {tool.name}: ERROR {res['error']}")
    res["extra"] = tool.extra()  # also after an error: partial reports help debugging
    return res


def _optional(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Unsupported:
        return None


# ---------------------------------------------------------------------------
# one filesystem


def select_tools(peers: list[str], fs: str) -> list[type[Tool]]:
    chosen: list[type[Tool]] = []
    for name in ["snapfs", *peers]:
        cls = ALL_TOOLS[name]
        if name == "cp-reflink" and fs != "xfs-loop":
            continue  # reflink copies need XFS (or btrfs) here
        reason = cls.unavailable_reason()
        if reason:
            log(f"SKIP {name}: {reason}")
            continue
        chosen.append(cls)
    return chosen


def make_pristine(fs: str, base: Path, scale: float) -> Path:
    """Generate the project once per filesystem; every suite copies it."""
    pristine = base / "pristine"
    log(f"[{fs}] generating project (scale {scale}) in {pristine}")
    genproject.generate(pristine, scale)
    warm_read(pristine)
    return pristine


def bench_fs(fs: str, base: Path, pristine: Path, args: argparse.Namespace) -> dict[str, Any]:
    expected = treecheck.manifest(pristine)
    floors = run_floors(pristine, args.repeat)
    info = {
        "scale": args.scale,
        "repeat": args.repeat,
        "entries": floors["walk"]["entries"],
        "bytes": floors["walk"]["bytes"],
        "loop": loop_mode(base),
    }
    tools = select_tools(args.peers, fs)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tools}
    # Repeats outer, tools inner: slow drift (thermal, writeback) spreads over all tools evenly.
    for r in range(args.repeat):
        for cls in tools:
            area = base / f"area-{cls.name}"
            area.mkdir()
            log(f"[{fs}] repeat {r + 1}/{args.repeat}: {cls.name}")
            tool = cls(area)
            try:
                one = run_tool_once(tool, pristine, expected, args.scale, fs != "main")
                runs[cls.name].append(one)
            finally:
                tool.close()
                shutil.rmtree(area, ignore_errors=True)
    agg = {name: report.aggregate(rs) for name, rs in runs.items()}
    print("\n" + report.fs_report(fs, info, agg, floors) + "\n", flush=True)
    return {"info": info, "floors": floors, "runs": runs, "medians": agg}


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scale", type=float, default=1.0, help="project size factor (0.05 = smoke test)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="repeats per tool; medians are reported")
    ap.add_argument("--fs", choices=[*FS_KINDS, "all"], default="main")
    ap.add_argument(
        "--suite",
        default=",".join(SUITES),
        help="comma list: core (snapshot/status/restore vs peers), txn (transactions)",
    )
    ap.add_argument(
        "--txn-repeat", type=int, default=5, help="txn suite: samples per timing (median shown)"
    )
    ap.add_argument(
        "--txn-rollbacks", type=int, default=3, help="txn suite: rollback repetitions (median)"
    )
    ap.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma list from {DEFAULT_PEERS} (aliases: cp, reflink); 'none' for snapfs only",
    )
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument(
        "--buffered-loop",
        action="store_true",
        help="leave loop devices buffered, as `mount -o loop` makes them (default: direct I/O, "
        "so that data written back early reaches the disk as it would on a real one)",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="big temp data goes into a fresh subdirectory of this",
    )
    args = ap.parse_args(argv)
    names = (
        []
        if args.peers == "none"
        else [PEER_ALIASES.get(p.strip(), p.strip()) for p in args.peers.split(",")]
    )
    unknown = [p for p in names if p not in ALL_TOOLS or p == "snapfs"]
    if unknown:
        ap.error(f"unknown peers {unknown}; choose from {DEFAULT_PEERS}")
    args.peers = names
    args.suite = [s.strip() for s in args.suite.split(",") if s.strip()]
    if not args.suite or set(args.suite) - set(SUITES):
        ap.error(f"--suite: choose from {SUITES}")
    if min(args.repeat, args.txn_repeat, args.txn_rollbacks) < 1:
        ap.error("--repeat, --txn-repeat and --txn-rollbacks must be at least 1")
    if (args.fs != "main") and os.geteuid() != 0:
        ap.error("loop mounts need root")
    return args


def tool_versions() -> dict[str, str]:
    """First line of each tool's version output, so results can be compared across machines."""
    cmds = {
        "snapfs": [sys.executable, "-m", "snapfs", "--version"],
        "git": ["git", "--version"],
        "restic": ["restic", "version"],
        "borg": ["borg", "--version"],
        "rsync": ["rsync", "--version"],
        "python": [sys.executable, "--version"],
    }
    out: dict[str, str] = {}
    for name, cmd in cmds.items():
        try:
            out[name] = run(cmd, env=Snapfs.ENV).strip().splitlines()[0]
        except (CmdError, OSError, IndexError):
            out[name] = "unavailable"
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM -> SystemExit so the finally blocks unmount and clean up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=args.workdir))
    results: dict[str, Any] = {
        "argv": sys.argv,
        "started": time.time(),
        "versions": tool_versions(),
        "filesystems": {},
    }
    try:
        for fs in FS_KINDS if args.fs == "all" else [args.fs]:
            with filesystem(fs, workdir, args.scale, direct=not args.buffered_loop) as base:
                pristine = make_pristine(fs, base, args.scale)
                done: dict[str, Any] = {}
                results["filesystems"][fs] = done
                if "core" in args.suite:
                    done.update(bench_fs(fs, base, pristine, args))
                    args.out.write_text(json.dumps(results, indent=1))
                if "txn" in args.suite:
                    done["txn"] = txn.bench_txn(fs, base, pristine, args)
            args.out.write_text(json.dumps(results, indent=1))  # keep partial results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"raw results written to {args.out}")


if __name__ == "__main__":
    main()
