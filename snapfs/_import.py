"""``snapfs import PLAN.json``: a workflow import as a recoverable operation.

The plan format (version 1) is documented in ``docs/import.md``. It is validated strictly, as a
whole, before anything changes: unknown keys, wrong types, bad digests, and destinations that
could leave the project (absolute paths, ``..``, ``.snapfs``, a symlink on the way) are refused
with the JSON path of the offending value.

Each step is idempotent and knows how to tell that its work is already done (``verify``), so a
resumed import skips finished steps after checking them, and a step whose work is found in place
is not run at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from ._errors import CommandFailed, PlanError, UnsafePath
from ._fsops import DIR_FLAGS, open_parent, split_relpath
from ._ops import (
    OpEvent,
    OpResult,
    Step,
    StepContext,
    create_operation,
    register_kind,
    run_operation,
)

if TYPE_CHECKING:
    from ._classify import Diagnosis
    from ._project import Project

PLAN_VERSION = 1
OUTPUT_TAIL = 4000  # characters of a failed tool's output kept for the diagnosis
TOOL_TIMEOUT = 3600.0  # seconds; a clone or an install that takes longer is stuck
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_GIT_URL = re.compile(r"^(https?|file|ssh|git)://\S+$|^[\w.-]+@[\w.-]+:\S+$")
_HTTP_URL = re.compile(r"^https?://\S+$")
_PKG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*([<>=!~]=?.*)?$")


# ---- validation -----------------------------------------------------------------------------
class _Check:
    """Strict reading of one JSON object: every key known, every value of the right type."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise PlanError("must be an object", where=where)
        self.obj = obj
        self.where = where
        self.seen: set[str] = set()

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.obj:
            if required:
                raise PlanError("is required", where=self._at(key))
            return None
        value = self.obj[key]
        if (
            isinstance(value, bool)
            and kind is not bool
            and bool not in (kind if isinstance(kind, tuple) else (kind,))
        ):
            raise PlanError(f"must be {_kind_name(kind)}, not true/false", where=self._at(key))
        if not isinstance(value, kind):
            raise PlanError(f"must be {_kind_name(kind)}", where=self._at(key))
        return value

    def text(self, key: str, *, required: bool = False) -> str | None:
        v = self.get(key, str, required=required)
        if v is not None and (not v.strip() or "\0" in v):
            raise PlanError("must not be empty", where=self._at(key))
        return str(v) if v is not None else None

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        v = self.get(key, list, required=required)
        if v is None:
            return []
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip() or "\0" in item:
                raise PlanError("must be a non-empty string", where=f"{self._at(key)}[{i}]")
        if required and not v:
            raise PlanError("must list at least one", where=self._at(key))
        return list(v)

    def done(self) -> None:
        extra = sorted(set(self.obj) - self.seen)
        if extra:
            raise PlanError(f"unknown key {extra[0]!r}", where=self.where or "plan")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        list: "a list",
        dict: "an object",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _relpath(root: Path, value: str, where: str, *, shared: Path | None = None) -> str:
    """A project-relative destination that stays inside the project, checked on disk too."""
    raw = os.fsencode(value)
    raw = raw[2:] if raw.startswith(b"./") else raw
    try:
        parts = split_relpath(raw.rstrip(b"/"))
    except UnsafePath as exc:
        raise PlanError(
            f"{value!r} must be a path inside the project (no absolute paths, no '..')",
            where=where,
        ) from exc
    if parts[0] == b".snapfs":
        raise PlanError(f"{value!r} is inside .snapfs, which belongs to snapfs", where=where)
    _no_symlinks(root, parts, value, where)
    return os.fsdecode(b"/".join(parts))


def _no_symlinks(root: Path, parts: list[bytes], value: str, where: str) -> None:
    cur = os.fsencode(root)
    for part in parts:
        cur = cur + b"/" + part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PlanError(
                f"{value!r} goes through the symlink {os.fsdecode(cur)!r}; refusing, it could"
                " lead outside the project",
                where=where,
            )


def validate_plan(plan: Any, root: Path) -> dict[str, Any]:
    """Check a whole plan; return it normalised (paths cleaned, defaults filled)."""
    top = _Check(plan, "")
    version = top.get("snapfs_import", int, required=True)
    if version != PLAN_VERSION:
        raise PlanError(
            f"version {version} is not supported (this snapfs reads version {PLAN_VERSION})",
            where="snapfs_import",
        )
    out: dict[str, Any] = {"snapfs_import": PLAN_VERSION}
    out["name"] = top.text("name") or "import"
    venv = top.text("venv")
    out["venv"] = _relpath(root, venv, "venv") if venv else None
    shared = top.text("shared_models")
    if shared is not None:
        sp = Path(os.path.expanduser(shared))
        if not sp.is_absolute():
            raise PlanError("must be an absolute path", where="shared_models")
        out["shared_models"] = str(sp)
    else:
        out["shared_models"] = None
    steps = top.get("steps", list, required=True)
    if not steps:
        raise PlanError("must list at least one step", where="steps")
    top.done()
    out["steps"] = [_validate_step(s, f"steps[{i}]", root, out) for i, s in enumerate(steps)]
    venvs = {s["path"] for s in out["steps"] if s["type"] == "venv"}
    for i, s in enumerate(out["steps"]):
        if s["type"] in ("pip", "git") and s.get("venv") is None and s["type"] == "pip":
            raise PlanError('needs a venv (here or as the plan\'s "venv")', where=f"steps[{i}]")
        if s.get("venv") and not (s["venv"] in venvs or (root / s["venv"]).is_dir()):
            raise PlanError(
                f"venv {s['venv']!r} is neither created by a venv step nor present",
                where=f"steps[{i}].venv",
            )
    return out


def _validate_step(obj: Any, where: str, root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    c = _Check(obj, where)
    kind = c.text("type", required=True)
    step: dict[str, Any] = {"type": kind}
    if kind == "git":
        repo = c.text("repo", required=True)
        assert repo is not None
        if not _GIT_URL.match(repo) or repo.startswith("-"):
            raise PlanError(f"{repo!r} is not a git URL", where=f"{where}.repo")
        commit = c.text("commit", required=True)
        assert commit is not None
        if commit.startswith("-") or not re.match(r"^[\w./-]{1,200}$", commit):
            raise PlanError(f"{commit!r} is not a commit or tag", where=f"{where}.commit")
        step.update(repo=repo, commit=commit)
        step["dest"] = _relpath(root, c.text("dest", required=True) or "", f"{where}.dest")
        req = c.text("requirements")
        step["requirements"] = (
            _relpath(root, f"{step['dest']}/{req}", f"{where}.requirements") if req else None
        )
        venv = c.text("venv")
        step["venv"] = _relpath(root, venv, f"{where}.venv") if venv else plan["venv"]
        if step["requirements"] and not step["venv"]:
            raise PlanError("requirements need a venv", where=f"{where}.requirements")
    elif kind == "venv":
        step["path"] = _relpath(root, c.text("path", required=True) or "", f"{where}.path")
        step["python"] = c.text("python") or sys.executable
    elif kind == "pip":
        venv = c.text("venv")
        step["venv"] = _relpath(root, venv, f"{where}.venv") if venv else plan["venv"]
        req = c.text("requirements")
        pkgs = c.strings("packages")
        if bool(req) == bool(pkgs):
            raise PlanError('needs exactly one of "requirements" and "packages"', where=where)
        for i, p in enumerate(pkgs):
            if p.startswith("-") or not _PKG.match(p):
                raise PlanError(
                    f"{p!r} is not a package requirement", where=f"{where}.packages[{i}]"
                )
        step["requirements"] = _relpath(root, req, f"{where}.requirements") if req else None
        step["packages"] = pkgs
        step["find_links"] = c.strings("find_links")
        index = c.text("index_url")
        if index is not None and not _HTTP_URL.match(index):
            raise PlanError(f"{index!r} is not an http(s) URL", where=f"{where}.index_url")
        step["index_url"] = index
        extra = c.strings("extra_index_urls")
        for i, u in enumerate(extra):
            if not _HTTP_URL.match(u):
                raise PlanError(
                    f"{u!r} is not an http(s) URL", where=f"{where}.extra_index_urls[{i}]"
                )
        step["extra_index_urls"] = extra
        step["no_index"] = bool(c.get("no_index", bool))
        cons = c.text("constraints")
        step["constraints"] = _relpath(root, cons, f"{where}.constraints") if cons else None
        protect = c.strings("protect")
        for i, p in enumerate(protect):
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", p):
                raise PlanError(f"{p!r} is not a package name", where=f"{where}.protect[{i}]")
        step["protect"] = protect
    elif kind == "download":
        url = c.text("url")
        if url is not None and not _HTTP_URL.match(url):
            raise PlanError(f"{url!r} is not an http(s) URL", where=f"{where}.url")
        listed = c.strings("sources")
        for i, u in enumerate(listed):
            if not _HTTP_URL.match(u):
                raise PlanError(f"{u!r} is not an http(s) URL", where=f"{where}.sources[{i}]")
        sources = [url, *listed] if url else listed
        if not sources:
            raise PlanError('needs "url" or "sources"', where=where)
        step["sources"] = list(dict.fromkeys(sources))
        sha = c.text("sha256")
        if sha is not None and (len(sha) != 64 or not _HEX.match(sha)):
            raise PlanError("must be 64 hex digits", where=f"{where}.sha256")
        step["sha256"] = sha.lower() if sha else None
        size = c.get("size", int)
        if size is not None and size < 0:
            raise PlanError("must not be negative", where=f"{where}.size")
        step["size"] = size
        step["dest"] = _relpath(root, c.text("dest", required=True) or "", f"{where}.dest")
        shared = c.get("shared", bool)
        if shared and not plan["shared_models"]:
            raise PlanError('needs the plan\'s "shared_models" folder', where=f"{where}.shared")
        step["shared"] = bool(shared)
    elif kind == "write":
        step["dest"] = _relpath(root, c.text("dest", required=True) or "", f"{where}.dest")
        has_json, has_text = "json" in c.obj, "text" in c.obj
        if has_json == has_text:
            raise PlanError('needs exactly one of "json" and "text"', where=where)
        if has_json:
            c.seen.add("json")
            step["text"] = json.dumps(c.obj["json"], indent=2, ensure_ascii=False) + "\n"
        else:
            step["text"] = c.get("text", str)
    else:
        raise PlanError(
            f"unknown step type {kind!r} (use git, venv, pip, download or write)",
            where=f"{where}.type",
        )
    name = c.text("name")
    c.done()
    step["name"] = name or _default_name(step)
    return step


def _default_name(s: dict[str, Any]) -> str:
    t = s["type"]
    if t == "git":
        return f"clone {s['repo'].rstrip('/').rsplit('/', 1)[-1]} into {s['dest']}"
    if t == "venv":
        return f"create the venv {s['path']}"
    if t == "pip":
        what = s["requirements"] or ", ".join(s["packages"][:3])
        return f"pip install {what}"
    if t == "download":
        return f"download {s['dest']}"
    return f"write {s['dest']}"


def load_plan(path: str | os.PathLike[str], root: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} can't be read: {exc}.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}).") from exc
    return validate_plan(data, root)


# ---- running tools --------------------------------------------------------------------------
def _tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password: a prompt nobody answers is a hang, not an error.
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/false",
        SSH_ASKPASS="/bin/false",
        GCM_INTERACTIVE="never",
        GIT_SSH_COMMAND="ssh -oBatchMode=yes",
        PIP_NO_INPUT="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    if extra:
        env.update(extra)
    return env


def run_tool(
    tool: str,
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> str:
    """Run an external tool with no terminal input; raise CommandFailed with its output."""
    try:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env or _tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no controlling terminal to prompt on; killable as a group
        )
    except FileNotFoundError as exc:
        raise CommandFailed(
            f"{tool} is not installed.",
            tool=tool,
            argv=tuple(argv),
            returncode=None,
            output=str(exc),
            hint=f"Install {tool} and run 'snapfs resume'.",
        ) from exc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout, Ctrl-C: never leave the tool running behind us
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise CommandFailed(
                f"{tool} did not finish within {timeout:.0f} s.",
                tool=tool,
                argv=tuple(argv),
                returncode=None,
                output="timed out",
            ) from exc
        raise
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise CommandFailed(
            f"{tool} failed (exit {proc.returncode}): {last[0].strip()[:200]}",
            tool=tool,
            argv=tuple(argv),
            returncode=proc.returncode,
            output=text[-OUTPUT_TAIL:],
        )
    return text


def _venv_python(root: Path, venv: str) -> Path:
    return root / venv / "bin" / "python"


_SATISFIED = r"""
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in sys.stdin.read().splitlines():
    line = line.split('#', 1)[0].strip()
    if not line or line.startswith('-'):
        if line:
            sys.exit(2)  # options (-e, --hash...): can't tell cheaply
        continue
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        have = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        sys.exit(1)
"""


_DIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_JUDGED_ELSEWHERE = re.compile(r"[;@/\\:]")  # markers, URLs, paths: the venv's Python decides


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_names(venv: Path) -> set[str] | None:
    """The normalized names of every distribution the venv's Python could find, read from its
    site-packages; None when it may find others (PYTHONPATH, the system site-packages, a path
    in a .pth file), so only asking it can tell."""
    if os.environ.get("PYTHONPATH"):
        return None
    try:
        cfg = (venv / "pyvenv.cfg").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if re.search(r"(?im)^\s*include-system-site-packages\s*=\s*true", cfg):
        return None
    sites = sorted((venv / "lib").glob("python*/site-packages"))
    if not sites:
        return None
    names: set[str] = set()
    for site in sites:
        try:
            entries = [e.name for e in os.scandir(site)]
        except OSError:
            return None
        for n in entries:
            if n.endswith(".pth"):
                try:
                    text = (site / n).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    return None
                for line in text.splitlines():
                    line = line.strip()
                    if line and not line.startswith(("#", "import ", "import\t")):
                        return None  # a directory on sys.path: it may hold distributions
            elif n.endswith((".dist-info", ".egg-info", ".egg-link")):
                names.add(_norm_dist(n.rsplit(".", 1)[0].split("-", 1)[0]))
    return names


def _certainly_unmet(venv: Path, lines: Sequence[str]) -> bool:
    """Does a plain requirement name a distribution the venv doesn't have at all? Then its
    Python need not be asked: starting it costs about 0.1 s, which a fresh import would pay
    for every pip step. Lines this can't judge (options, markers, URLs, paths) are left to
    the venv's Python, as is everything when other distributions may be visible."""
    names = None
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or _JUDGED_ELSEWHERE.search(line):
            continue
        m = _DIST_NAME.match(line)
        if m is None:
            continue
        if names is None:
            names = _installed_names(venv)
            if names is None:
                return False
        if _norm_dist(m.group()) not in names:
            return True
    return False


def _requirements_met(python: Path, lines: Sequence[str]) -> bool:
    """Are these requirement lines all satisfied in the venv? Asks the venv's own Python,
    unless a requirement is certainly missing."""
    if not python.exists() or _certainly_unmet(python.parent.parent, lines):
        return False
    try:
        r = subprocess.run(
            [str(python), "-c", _SATISFIED],
            input="\n".join(lines),
            text=True,
            capture_output=True,
            timeout=120,
            env=_tool_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _installed(python: Path, names: Sequence[str]) -> dict[str, str | None]:
    code = (
        "import json,sys\nfrom importlib import metadata\nout={}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n]=metadata.version(n)\n"
        "    except metadata.PackageNotFoundError: out[n]=None\n"
        "print(json.dumps(out))"
    )
    text = run_tool("python", [str(python), "-c", code, *names], env=_tool_env())
    return dict(json.loads(text.strip().splitlines()[-1]))


def _staging(project: Project, what: str) -> Path:
    # "<pid>-..." like the store's own temp names: what a dead process leaves here is swept.
    d = project.state_dir / "tmp" / f"{os.getpid()}-{what}-{os.urandom(4).hex()}"
    d.parent.mkdir(exist_ok=True)
    return d


# ---- steps ----------------------------------------------------------------------------------
class GitStep(Step):
    kind = "git"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.spec = spec

    def _head(self, repo: Path) -> str | None:
        try:
            return run_tool(
                "git", ["git", "-C", str(repo), "rev-parse", "--verify", "HEAD^{commit}"]
            ).strip()
        except CommandFailed:
            return None

    def _wanted(self, repo: Path) -> str | None:
        try:
            return run_tool(
                "git",
                [
                    "git",
                    "-C",
                    str(repo),
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    self.spec["commit"] + "^{commit}",
                ],
            ).strip()
        except CommandFailed:
            return None

    def verify(self, ctx: StepContext) -> bool:
        dest = ctx.project.root / self.spec["dest"]
        if not (dest / ".git").exists():
            return False
        head = self._head(dest)
        if head is None or head != self._wanted(dest):
            return False
        try:  # tracked files as committed (untracked ones, like caches, don't matter)
            run_tool("git", ["git", "-C", str(dest), "diff", "--quiet", "HEAD"])
        except CommandFailed:
            return False
        return self._requirements_done(ctx)

    def _requirements_done(self, ctx: StepContext) -> bool:
        req = self.spec["requirements"]
        if not req:
            return True
        path = ctx.project.root / req
        if not path.exists():
            return True  # nothing to install (checked when run)
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return _requirements_met(_venv_python(ctx.project.root, self.spec["venv"]), lines)

    def run(self, ctx: StepContext) -> None:
        p, s = ctx.project, self.spec
        dest = p.root / s["dest"]
        git = ["git", "-c", "credential.helper=", "-c", "core.askPass=/bin/false"]
        if (dest / ".git").exists() and self._head(dest) is not None:
            ctx.say(f"Updating {s['dest']} to {s['commit']}")
            self._checkout(git, dest, s)
        else:
            if dest.exists() and any(dest.iterdir()):
                raise PlanError(
                    f"{s['dest']} already exists and is not a git checkout; move it away first."
                )
            stage = _staging(p, "clone")
            try:
                ctx.say(f"Cloning {s['repo']}")
                run_tool(
                    "git", [*git, "clone", "--no-checkout", "--quiet", "--", s["repo"], str(stage)]
                )
                self._checkout(git, stage, s)
                self._move_into_place(p, stage, s["dest"])
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        if s["requirements"] and (p.root / s["requirements"]).exists():
            ctx.say(f"Installing {s['requirements']}")
            python = _venv_python(p.root, s["venv"])
            run_tool(
                "pip",
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--no-input",
                    "--disable-pip-version-check",
                    "-r",
                    str(p.root / s["requirements"]),
                ],
            )

    @staticmethod
    def _checkout(git: list[str], repo: Path, s: dict[str, Any]) -> None:
        def detach(ref: str) -> None:
            # --force: a redo puts edited or deleted tracked files back
            run_tool(
                "git",
                [*git, "-C", str(repo), "checkout", "--quiet", "--force", "--detach", ref, "--"],
            )

        try:
            detach(s["commit"])
        except CommandFailed:
            # Not in the clone (a commit only reachable by its id): ask the remote for it.
            run_tool("git", [*git, "-C", str(repo), "fetch", "--quiet", "origin", s["commit"]])
            detach("FETCH_HEAD")

    @staticmethod
    def _move_into_place(p: Project, stage: Path, dest: str) -> None:
        """Rename the finished clone into the project through O_NOFOLLOW directory fds."""
        root_fd = os.open(p.root, DIR_FLAGS)
        try:
            with open_parent(root_fd, os.fsencode(dest), create=True) as (dfd, name):
                try:
                    os.rmdir(name, dir_fd=dfd)  # an empty placeholder directory may go
                except FileNotFoundError:
                    pass
                os.rename(stage, name, dst_dir_fd=dfd)
        finally:
            os.close(root_fd)


class VenvStep(Step):
    kind = "venv"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.spec = spec

    def verify(self, ctx: StepContext) -> bool:
        python = _venv_python(ctx.project.root, self.spec["path"])
        if not python.exists():
            return False
        try:
            run_tool("python", [str(python), "-c", "import pip"], timeout=60)
        except CommandFailed:
            return False
        return True

    def run(self, ctx: StepContext) -> None:
        path = ctx.project.root / self.spec["path"]
        _no_symlinks(
            ctx.project.root,
            split_relpath(os.fsencode(self.spec["path"])),
            self.spec["path"],
            "venv",
        )
        ctx.say(f"Creating {self.spec['path']}")
        run_tool("python", [self.spec["python"], "-m", "venv", str(path)])


class PipStep(Step):
    kind = "pip"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.spec = spec

    def _lines(self, root: Path) -> list[str]:
        if self.spec["requirements"]:
            req = root / str(self.spec["requirements"])
            if not req.exists():
                return ["-missing-"]
            return req.read_text(encoding="utf-8", errors="replace").splitlines()
        return [str(x) for x in self.spec["packages"]]

    def verify(self, ctx: StepContext) -> bool:
        root = ctx.project.root
        return _requirements_met(_venv_python(root, self.spec["venv"]), self._lines(root))

    def run(self, ctx: StepContext) -> None:
        p, s = ctx.project, self.spec
        python = _venv_python(p.root, s["venv"])
        if not python.exists():
            raise CommandFailed(
                f"The venv {s['venv']} does not exist.",
                tool="pip",
                returncode=None,
                output=f"{python}: No such file or directory",
            )
        args = [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
        ]
        if s["no_index"]:
            args.append("--no-index")
        for fl in s["find_links"]:
            args += ["--find-links", fl]
        if s["index_url"]:
            args += ["--index-url", s["index_url"]]
        for u in s["extra_index_urls"]:
            args += ["--extra-index-url", u]
        if s["constraints"]:
            args += ["-c", str(p.root / s["constraints"])]
        before: dict[str, str | None] = {}
        pins: Path | None = None
        if s["protect"]:
            before = _installed(python, s["protect"])
            held = {k: v for k, v in before.items() if v is not None}
            if held:
                pins = _staging(p, "protect").with_suffix(".txt")
                pins.write_text("".join(f"{k}=={v}\n" for k, v in held.items()))
                args += ["-c", str(pins)]
        if s["requirements"]:
            args += ["-r", str(p.root / s["requirements"])]
        else:
            args += ["--", *s["packages"]]
        try:
            ctx.say(f"pip install ({s['requirements'] or ', '.join(s['packages'])})")
            run_tool("pip", args)
        finally:
            if pins is not None:
                pins.unlink(missing_ok=True)
        if before:
            after = _installed(python, s["protect"])
            moved = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
            if moved:
                name, (old, new) = next(iter(moved.items()))
                raise CommandFailed(
                    f"pip changed the protected package {name} ({old} -> {new}).",
                    tool="pip",
                    argv=tuple(args),
                    returncode=0,
                    output=f"protected package changed: {name} {old} -> {new}",
                )


class DownloadStep(Step):
    kind = "download"

    def __init__(self, spec: dict[str, Any], shared_models: str | None) -> None:
        super().__init__(spec["name"])
        self.spec = spec
        self.shared_models = shared_models

    def verify(self, ctx: StepContext) -> bool:
        s, p = self.spec, ctx.project
        relpath = os.fsencode(s["dest"])
        try:
            st = os.lstat(p.root / s["dest"])
        except OSError:
            return False
        if s["shared"]:
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                return False
            st = os.stat(p.root / s["dest"])
        elif not stat.S_ISREG(st.st_mode):
            return False
        if s["size"] is not None and st.st_size != s["size"]:
            return False
        if not s["sha256"]:
            return True
        # The stat cache and the store's digest index answer without reading 4 GB again.
        entry = p.state.file_records().get(relpath)
        if (
            entry is not None
            and (entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns)
            == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            and p.store.digest_of(entry.oid, "sha256") == s["sha256"]
        ):
            return True
        from ._download import _hash_file

        return bool(_hash_file(p.root / s["dest"])[0] == s["sha256"])

    def run(self, ctx: StepContext) -> None:
        from ._download import DownloadProgress, download

        s, p = self.spec, ctx.project
        last = [0.0]

        def progress(ev: DownloadProgress) -> None:
            now = time.monotonic()
            if ev.message or now - last[0] >= 1.0 or ev.phase == "done":
                last[0] = now
                ctx.say(
                    ev.message or f"{s['dest']}: {ev.phase}",
                    done=ev.done,
                    total=ev.total,
                    rate=ev.rate,
                    source=ev.source,
                    retries=ev.retries,
                )

        kwargs: dict[str, Any] = dict(
            mirrors=s["sources"][1:], sha256=s["sha256"], size=s["size"], progress=progress
        )
        if not s["shared"]:
            moved = self._find_elsewhere(p)
            if moved is not None:
                ctx.say(f"Found the file at {moved}; moved it to {s['dest']} (no download).")
                return
            download(s["sources"][0], s["dest"], project=p, **kwargs)
            return
        assert self.shared_models is not None
        shared_root = Path(self.shared_models)
        shared_root.mkdir(parents=True, exist_ok=True)
        target = shared_root / Path(s["dest"]).name
        download(s["sources"][0], target, **kwargs)
        self._link(p, target, s["dest"])

    def _find_elsewhere(self, p: Project) -> str | None:
        """The model already in the project under another path (put in the wrong folder)?

        Looks for regular files with the same name (and size, when given), outside .snapfs
        and venvs, hashes at most a few, and moves one whose SHA-256 matches into place.
        """
        s = self.spec
        if not s["sha256"]:
            return None
        name = Path(s["dest"]).name
        dest_b = os.fsencode(s["dest"])
        candidates: list[bytes] = []
        root_b = os.fsencode(p.root)
        for dirpath, dirnames, filenames in os.walk(root_b):
            rel_dir = os.path.relpath(dirpath, root_b)
            dirnames[:] = [
                d
                for d in dirnames
                if d != b".snapfs" and not os.path.exists(os.path.join(dirpath, d, b"pyvenv.cfg"))
            ]
            for f in filenames:
                if os.fsdecode(f) != name:
                    continue
                rel = os.path.normpath(os.path.join(rel_dir, f))
                if rel == dest_b:
                    continue
                full = os.path.join(dirpath, f)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (s["size"] is None or st.st_size == s["size"]):
                    candidates.append(rel)
            if len(candidates) >= 3:
                break
        from ._download import _hash_file

        for rel in candidates[:3]:
            if _hash_file(p.root / os.fsdecode(rel))[0] != s["sha256"]:
                continue
            self._move(p, rel, dest_b)
            return os.fsdecode(rel)
        return None

    @staticmethod
    def _move(p: Project, src: bytes, dest: bytes) -> None:
        """Rename within the project through O_NOFOLLOW directory fds at both ends."""
        root_fd = os.open(p.root, DIR_FLAGS)
        try:
            with open_parent(root_fd, src) as (sfd, sname):
                with open_parent(root_fd, dest, create=True) as (dfd, dname):
                    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        finally:
            os.close(root_fd)

    @staticmethod
    def _link(p: Project, target: Path, dest: str) -> None:
        """Link the shared file into the project: a hardlink, else a symlink to it."""
        root_fd = os.open(p.root, DIR_FLAGS)
        try:
            with open_parent(root_fd, os.fsencode(dest), create=True) as (dfd, name):
                tmp = b".snapfs-link-" + os.urandom(4).hex().encode()
                try:
                    os.link(target, tmp, dst_dir_fd=dfd)
                except OSError:
                    os.symlink(target, tmp, dir_fd=dfd)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(root_fd)

    def fix(self, ctx: StepContext, diagnosis: Diagnosis) -> str | None:
        if diagnosis.code not in ("hash.mismatch", "size.mismatch"):
            return None
        # The partial may hold bad bytes from an earlier run: start clean, from every source.
        downloads = ctx.project.state_dir / "downloads"
        key = xxhash.xxh3_64_hexdigest(os.fsencode(self.spec["dest"]))
        dropped = False
        for f in downloads.glob(f"{key}.snapfs-part*"):
            f.unlink(missing_ok=True)
            dropped = True
        return (
            "Discarded the partial download; fetching it again from every source."
            if dropped
            else None
        )


class WriteStep(Step):
    kind = "write"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["name"])
        self.spec = spec
        self.data = spec["text"].encode("utf-8")

    def verify(self, ctx: StepContext) -> bool:
        path = ctx.project.root / self.spec["dest"]
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            return bool(path.read_bytes() == self.data)
        except OSError:
            return False

    def run(self, ctx: StepContext) -> None:
        p = ctx.project
        tmp = _staging(p, "write")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, self.data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            p.place(os.fsencode(self.spec["dest"]), xxhash.xxh3_128_digest(self.data), src=tmp)
        finally:
            tmp.unlink(missing_ok=True)


def build_steps(plan: dict[str, Any]) -> list[Step]:
    steps: list[Step] = []
    for s in plan["steps"]:
        t = s["type"]
        if t == "git":
            steps.append(GitStep(s))
        elif t == "venv":
            steps.append(VenvStep(s))
        elif t == "pip":
            steps.append(PipStep(s))
        elif t == "download":
            steps.append(DownloadStep(s, plan.get("shared_models")))
        else:
            steps.append(WriteStep(s))
    return steps


register_kind("import", build_steps)


def start_import(project: Project, plan_path: str | os.PathLike[str]) -> int:
    """Validate the plan (nothing changes if it is bad) and record the import operation."""
    plan = load_plan(plan_path, project.root)
    return create_operation(project, "import", plan["name"], plan)


def import_workflow(
    project: Project,
    plan_path: str | os.PathLike[str],
    *,
    report: Callable[[OpEvent], None] | None = None,
) -> OpResult:
    """Validate and run an import plan as an operation (see docs/import.md).

    Raises :class:`PlanError` before anything changes if the plan is bad, and
    :class:`OperationFailed` (with a diagnosis and the state the project is in) if a step
    can't be completed; ``snapfs.resume`` continues it later.
    """
    op = start_import(project, plan_path)
    return run_operation(project, op, report=report or (lambda _ev: None))
