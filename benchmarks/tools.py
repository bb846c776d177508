"""Adapters that drive snapfs and its peers through one benchmark scenario, all as subprocesses.

Every tool gets its own area directory::

    AREA/project      the tool's private copy of the pristine project (tools may keep metadata inside)
    AREA/...          repos, snapshot dirs, restore targets, caches

A method raises `Unsupported` for a step a tool has no equivalent for (reported as "n/a"), and
`CmdError` when a command fails (reported with its stderr, and the run of that tool stops).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent


class Unsupported(Exception):
    """The tool has no equivalent for this step."""


class CmdError(RuntimeError):
    def __init__(self, cmd: list[str], rc: int, stderr: str) -> None:
        self.cmd, self.rc, self.stderr = cmd, rc, stderr
        super().__init__(f"`{' '.join(cmd)}` exited {rc}: {stderr.strip()[-2000:]}")


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, return stdout; raise CmdError on failure."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise CmdError(cmd, p.returncode, p.stderr or p.stdout)
    return p.stdout


def du_bytes(paths: list[Path], exclude: str | None = None) -> int:
    """Real disk usage of `paths` together (one du call, so hardlinks count once)."""
    cmd = ["du", "-s", "-c", "--block-size=1"]
    if exclude:
        cmd.append(f"--exclude={exclude}")
    out = run(cmd + [str(p) for p in paths])
    return int(out.strip().splitlines()[-1].split()[0])


def fs_used_bytes(path: Path) -> int:
    """Used bytes of the filesystem holding `path` (sees reflink sharing, unlike du)."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def direct_io(mnt: Path, enable: bool = True) -> bool:
    """Switch the loop device under ``mnt`` to direct I/O, so that it behaves like a disk
    (``enable=False``: leave it buffered, and only record that it is).

    A buffered loop device writes into its image file's page cache: data written back early
    (``sync_file_range``) never reaches the disk, and the first fsync or flush then writes
    everything at once. A tool that spreads its write-out over a download would pay for the
    whole file at its final fdatasync, as if it had not. With direct I/O a write-out goes to the
    disk as it is issued. Where the kernel refuses (an image on a filesystem without O_DIRECT),
    the device stays buffered and this returns False; ``loop_mode`` says which it was.
    """
    try:  # (util-linux: findmnt and losetup; either missing leaves the device as it is)
        dev = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True, text=True, check=False
        ).stdout.strip()
        if not dev.startswith("/dev/loop"):
            return False  # not a loop mount: nothing to switch, nothing to report
        if enable:
            subprocess.run(["losetup", "--direct-io=on", dev], capture_output=True, check=False)
        on = (Path("/sys/block") / Path(dev).name / "loop" / "dio").read_text().strip() == "1"
    except OSError:
        on = False
    LOOP_MODES[str(mnt)] = "direct I/O" if on else "buffered"
    return on


LOOP_MODES: dict[str, str] = {}  # mount point -> "direct I/O" or "buffered"


def loop_mode(path: Path) -> str | None:
    """How the loop device holding ``path`` writes: "direct I/O", "buffered", or None."""
    for mnt, mode in LOOP_MODES.items():
        if path == Path(mnt) or Path(mnt) in path.parents:
            return mode
    return None


def loop_note(info: dict[str, Any]) -> str:
    """A report header's note on a loop mount's device (``info["loop"]``); "" elsewhere."""
    mode = info.get("loop")
    return f", loop device: {mode}" if mode else ""


class Tool(ABC):
    name: str = ""
    # Metadata dir the tool keeps inside the project (excluded when sizing the project itself).
    inner_store: str | None = None

    def __init__(self, area: Path) -> None:
        self.area = area
        self.project = area / "project"

    @staticmethod
    def unavailable_reason() -> str | None:
        """None if the tool can run on this machine, else why not."""
        return None

    def init(self) -> None:
        """Create an empty repository/store (timed separately); n/a for tools that need none."""
        raise Unsupported

    @abstractmethod
    def snapshot(self, label: str) -> None: ...

    def status(self) -> Any:
        raise Unsupported

    def close(self) -> None:
        """Stop whatever the tool left running (after each run, also after an error)."""
        return  # most tools leave nothing running

    def restore_first(self) -> Path:
        """Bring back the state of the first snapshot; return the tree to verify."""
        raise Unsupported

    def store_bytes(self) -> int:
        raise Unsupported

    def project_bytes(self) -> int:
        """du of the project without the tool's own metadata dir."""
        return du_bytes([self.project], exclude=self.inner_store)

    def first_snapshot_dir(self) -> Path | None:
        """For tools whose snapshots are plain trees: the first one (checked for leaked edits)."""
        return None

    def extra(self) -> dict[str, Any]:
        """Tool-specific details worth keeping in the JSON results."""
        return {}


def _which_reason(binary: str) -> str | None:
    return None if shutil.which(binary) else f"{binary} not installed"


# ---------------------------------------------------------------------------


class Snapfs(Tool):
    name = "snapfs"
    inner_store = ".snapfs"
    # The working tree importable as `snapfs` even if not pip-installed.
    ENV: ClassVar[dict[str, str]] = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        # An installed package ships compiled bytecode (pip compiles it at install time). With
        # PYTHONDONTWRITEBYTECODE set (as some shells here do), every command would recompile
        # snapfs from source (~50 ms) and the benchmark would measure that instead.
        "PYTHONDONTWRITEBYTECODE": "",
    }

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.first_id: Any = None
        self.snapshot_reports: list[Any] = []

    def _cli(self, *args: str) -> str:
        return snapfs_cli(self.project, *args)

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            run([sys.executable, "-m", "snapfs", "--help"], cwd=REPO_ROOT, env=Snapfs.ENV)
        except CmdError as e:
            return f"`python -m snapfs --help` fails: {e.stderr.strip().splitlines()[-1:] or e.rc}"
        return None

    def init(self) -> None:
        self._cli("init")

    def snapshot(self, label: str) -> None:
        out = json.loads(self._cli("snapshot", "-m", label, "--json"))
        self.snapshot_reports.append(out)
        if self.first_id is None:
            self.first_id = out["id"]

    def status(self) -> Any:
        return json.loads(self._cli("status", "--json"))

    def restore_first(self) -> Path:
        self._cli("restore", str(self.first_id), "--yes")
        return self.project

    def extra(self) -> dict[str, Any]:
        return {"snapshot_json": self.snapshot_reports}

    def store_bytes(self) -> int:
        # Large files may be hardlinked between project and store: count only the store's extra.
        return du_bytes([self.project]) - du_bytes([self.project], exclude=".snapfs")


def snapfs_cli(project: Path, *args: str) -> str:
    """Run the snapfs CLI of this checkout on ``project``; its stdout."""
    return run([sys.executable, "-m", "snapfs", "-C", str(project), *args], env=Snapfs.ENV)


WATCH_READY_TIMEOUT = 600.0  # adding an inotify watch per directory of a big tree takes a while
WATCH_SETTLE = 2.0


@contextmanager
def watching(project: Path, log_file: Path, *, settle: bool = True) -> Iterator[dict[str, Any]]:
    """Run `snapfs watch` on `project` for the duration of the block; always stop it after.
    ``settle``: once it is ready, wait a little and run one ordinary command with it."""
    cmd = [sys.executable, "-m", "snapfs", "-C", str(project), "watch"]
    info: dict[str, Any] = {"cmd": cmd}
    with open(log_file, "w") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **Snapfs.ENV},
        )
    try:
        t0 = time.perf_counter()
        while "Watching" not in log_file.read_text():
            if proc.poll() is not None:
                raise CmdError(cmd, proc.returncode, log_file.read_text())
            if time.perf_counter() - t0 > WATCH_READY_TIMEOUT:
                raise CmdError(cmd, -1, f"no 'Watching' line after {WATCH_READY_TIMEOUT:.0f} s")
            time.sleep(0.05)
        info["ready_seconds"] = time.perf_counter() - t0
        if settle:
            time.sleep(WATCH_SETTLE)
            snapfs_cli(project, "status")  # one ordinary command with the watcher in place
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # snapfs turns it into a clean stop
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                info["killed"] = True
        info["returncode"] = proc.returncode
        info["stderr"] = log_file.read_text()[-2000:]


class SnapfsWatch(Snapfs):
    """snapfs with `snapfs watch` running from just after init: snapshots, status and the
    pre-restore snapshot read the watcher's journal instead of walking the tree (the first
    snapshot still reads everything). Its `init` time includes starting the watcher."""

    name = "snapfs-watch"

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.watcher = ExitStack()

    def init(self) -> None:
        super().init()
        self.watcher.enter_context(watching(self.project, self.area / "watch.log", settle=False))

    def close(self) -> None:
        self.watcher.close()


class Git(Tool):
    name = "git"
    inner_store = ".git"
    # gc.auto=0: a background `gc --auto` after the 20k-object commit would pollute later timings.
    ENV: ClassVar[dict[str, str]] = {
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_COUNT": "4",
        "GIT_CONFIG_KEY_0": "gc.auto",
        "GIT_CONFIG_VALUE_0": "0",
        "GIT_CONFIG_KEY_1": "user.name",
        "GIT_CONFIG_VALUE_1": "bench",
        "GIT_CONFIG_KEY_2": "user.email",
        "GIT_CONFIG_VALUE_2": "bench@localhost",
        "GIT_CONFIG_KEY_3": "init.defaultBranch",
        "GIT_CONFIG_VALUE_3": "main",
    }

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.first_commit = ""

    def _git(self, *args: str) -> str:
        return run(["git", *args], cwd=self.project, env=self.ENV)

    @staticmethod
    def unavailable_reason() -> str | None:
        return _which_reason("git")

    def init(self) -> None:
        self._git("init", "-q")

    def snapshot(self, label: str) -> None:
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", label)
        if not self.first_commit:
            self.first_commit = self._git("rev-parse", "HEAD").strip()

    def status(self) -> str:
        return self._git("status", "--porcelain")

    def restore_first(self) -> Path:
        self._git("reset", "--hard", "-q", self.first_commit)
        self._git("clean", "-fdq")
        return self.project

    def store_bytes(self) -> int:
        return du_bytes([self.project]) - du_bytes([self.project], exclude=".git")


class Restic(Tool):
    name = "restic"

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.env = {
            "RESTIC_PASSWORD": "bench",
            "RESTIC_REPOSITORY": str(area / "restic-repo"),
            "RESTIC_CACHE_DIR": str(area / "restic-cache"),
        }
        self.first_id = ""

    @staticmethod
    def unavailable_reason() -> str | None:
        return _which_reason("restic")

    def init(self) -> None:
        run(["restic", "init", "-q", "--repository-version", "2"], env=self.env)

    def snapshot(self, label: str) -> None:
        # Back up "." from inside the project so snapshot paths are project-relative.
        out = run(
            [
                "restic",
                "backup",
                "-q",
                "--json",
                "--compression",
                "off",
                "--host",
                "bench",
                "--tag",
                label,
                ".",
            ],
            cwd=self.project,
            env=self.env,
        )
        summary = json.loads(out.strip().splitlines()[-1])
        if not self.first_id:
            self.first_id = summary["snapshot_id"]

    def restore_first(self) -> Path:
        target = self.area / "restore"
        run(["restic", "restore", "-q", self.first_id, "--target", str(target)], env=self.env)
        return target

    def store_bytes(self) -> int:
        return du_bytes([self.area / "restic-repo"])


class Borg(Tool):
    name = "borg"

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.repo = area / "borg-repo"
        self.env = {
            "BORG_BASE_DIR": str(area / "borg-base"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }
        self.n = 0

    @staticmethod
    def unavailable_reason() -> str | None:
        return _which_reason("borg")

    def init(self) -> None:
        run(["borg", "init", "-e", "none", str(self.repo)], env=self.env)

    def snapshot(self, label: str) -> None:
        self.n += 1
        run(
            ["borg", "create", "--compression", "none", f"{self.repo}::s{self.n}", "."],
            cwd=self.project,
            env=self.env,
        )

    def restore_first(self) -> Path:
        target = self.area / "restore"
        target.mkdir()
        run(["borg", "extract", f"{self.repo}::s1"], cwd=target, env=self.env)
        return target

    def store_bytes(self) -> int:
        return du_bytes([self.repo])


class _TreeSnapshots(Tool):
    """Snapshots that are plain directory trees next to the project (rsync, cp -al)."""

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.snaps: list[Path] = []

    def _next_dir(self) -> Path:
        d = self.area / f"snap{len(self.snaps) + 1}"
        self.snaps.append(d)
        return d

    def status(self) -> str:
        # Dry-run rsync against the latest snapshot is the closest thing to "status" these have.
        return run(
            ["rsync", "-a", "-n", "-i", "--delete", f"{self.project}/", f"{self.snaps[-1]}/"]
        )

    def restore_first(self) -> Path:
        run(["rsync", "-a", "--delete", f"{self.snaps[0]}/", f"{self.project}/"])
        return self.project

    def store_bytes(self) -> int:
        return du_bytes([self.project, *self.snaps]) - du_bytes([self.project])

    def first_snapshot_dir(self) -> Path | None:
        return self.snaps[0] if self.snaps else None


class Rsync(_TreeSnapshots):
    name = "rsync"

    @staticmethod
    def unavailable_reason() -> str | None:
        return _which_reason("rsync")

    def snapshot(self, label: str) -> None:
        prev = self.snaps[-1] if self.snaps else None
        dest = self._next_dir()
        link = [f"--link-dest={prev}"] if prev else []
        run(["rsync", "-a", *link, f"{self.project}/", f"{dest}/"])


class CpAl(_TreeSnapshots):
    name = "cp-al"

    @staticmethod
    def unavailable_reason() -> str | None:
        return _which_reason("rsync")  # restore uses rsync

    def snapshot(self, label: str) -> None:
        run(["cp", "-al", str(self.project), str(self._next_dir())])


class Reflink(Tool):
    """`cp -a --reflink=always`: only the first snapshot is measured (XFS only).

    No du-based size: du cannot see shared extents (the runner's filesystem delta can).
    """

    name = "cp-reflink"

    def __init__(self, area: Path) -> None:
        super().__init__(area)
        self.copies = 0

    def snapshot(self, label: str) -> None:
        if self.copies:
            raise Unsupported
        run(["cp", "-a", "--reflink=always", str(self.project), str(self.area / "snap1")])
        self.copies += 1


ALL_TOOLS: dict[str, type[Tool]] = {
    t.name: t for t in (Snapfs, SnapfsWatch, Git, Restic, Borg, Rsync, CpAl, Reflink)
}
