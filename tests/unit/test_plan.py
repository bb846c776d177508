"""Import plan validation: strict, whole, before anything changes.

Every rejected value gives a :class:`PlanError` (a UsageError, exit 2) whose ``where`` is the JSON
path of the offending value (``steps[3].sha256``), and a rejected plan leaves the project exactly
as it was: same tree, no snapshot, no operation recorded.

Validation reads the disk only to refuse symlinks on the way to a destination (``os.lstat``), and
the "nothing changed" tests need a real project (SQLite), so these run on real temp dirs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs._errors import PlanError
from snapfs._import import load_plan, start_import, validate_plan
from tests.helpers import run_cli, tree_state, write

SHA = "ab" * 32


def good_plan() -> dict[str, Any]:
    """A valid plan with one step of each type (validation never touches the network)."""
    return {
        "snapfs_import": 1,
        "name": "portrait workflow",
        "venv": "venv",
        "steps": [
            {
                "type": "git",
                "repo": "https://example.invalid/org/ComfyUI-Foo",
                "commit": "3f2a9c1",
                "dest": "custom_nodes/ComfyUI-Foo",
                "requirements": "requirements.txt",
            },
            {"type": "venv", "path": "venv"},
            {
                "type": "pip",
                "requirements": "custom_nodes/ComfyUI-Foo/requirements.txt",
                "find_links": ["/srv/wheels"],
                "protect": ["torch"],
            },
            {
                "type": "download",
                "sources": ["https://a.invalid/m.safetensors", "https://b.invalid/m.safetensors"],
                "sha256": SHA,
                "size": 10,
                "dest": "models/checkpoints/m.safetensors",
            },
            {"type": "write", "dest": "user/workflows/portrait.json", "json": {"nodes": []}},
        ],
    }


_DELETE = object()
_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


def mutated(path: str, value: Any) -> dict[str, Any]:
    """good_plan() with the value at a dotted JSON path (``steps[3].sha256``) set or deleted."""
    plan = good_plan()
    keys: list[str | int] = []
    for part in path.split("."):
        m = _STEP.match(part)
        assert m, part
        keys.append(m.group(1))
        if m.group(2) is not None:
            keys.append(int(m.group(2)))
    obj: Any = plan
    for k in keys[:-1]:
        obj = obj[k]
    if value is _DELETE:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = copy.deepcopy(value)
    return plan


def rejected(plan: Any, root: Path) -> PlanError:
    with pytest.raises(PlanError) as info:
        validate_plan(plan, root)
    err = info.value
    assert isinstance(err, snapfs.UsageError) and err.exit_code == 2
    # The message leads with the path, so a user sees where to look.
    if err.where:
        assert str(err).startswith(f"{err.where}: "), str(err)
    return err


def test_the_good_plan_is_valid_and_normalised(tmp_path: Path) -> None:
    plan = good_plan()
    plan["steps"][3]["sha256"] = SHA.upper()
    plan["steps"][3]["dest"] = "./models/checkpoints/m.safetensors"
    plan["steps"][3]["sources"].append(plan["steps"][3]["sources"][0])  # a duplicate mirror
    out = validate_plan(plan, tmp_path)
    assert [s["type"] for s in out["steps"]] == ["git", "venv", "pip", "download", "write"]
    git, venv, pip, dl, wr = out["steps"]
    assert git["requirements"] == "custom_nodes/ComfyUI-Foo/requirements.txt"
    assert git["venv"] == "venv" and pip["venv"] == "venv"  # the plan's default venv
    assert dl["sha256"] == SHA and dl["dest"] == "models/checkpoints/m.safetensors"
    assert dl["sources"] == ["https://a.invalid/m.safetensors", "https://b.invalid/m.safetensors"]
    assert json.loads(wr["text"]) == {"nodes": []}
    assert [s["name"] for s in out["steps"]] == [
        "clone ComfyUI-Foo into custom_nodes/ComfyUI-Foo",
        "create the venv venv",
        "pip install custom_nodes/ComfyUI-Foo/requirements.txt",
        "download models/checkpoints/m.safetensors",
        "write user/workflows/portrait.json",
    ]
    assert os.listdir(tmp_path) == []  # validating wrote nothing


# (JSON path, value, expected where, a fragment of the message)
CASES: list[tuple[str, Any, str, str]] = [
    # the top level
    ("snapfs_import", _DELETE, "snapfs_import", "is required"),
    ("snapfs_import", 2, "snapfs_import", "version 2 is not supported"),
    ("snapfs_import", "1", "snapfs_import", "must be an integer"),
    ("snapfs_import", True, "snapfs_import", "not true/false"),
    ("bogus", 1, "plan", "unknown key 'bogus'"),
    ("name", 5, "name", "must be a string"),
    ("name", "  ", "name", "must not be empty"),
    ("venv", "/opt/venv", "venv", "inside the project"),
    ("venv", "../venv", "venv", "inside the project"),
    ("shared_models", "models/shared", "shared_models", "must be an absolute path"),
    ("steps", _DELETE, "steps", "is required"),
    ("steps", [], "steps", "at least one step"),
    ("steps", {"0": {}}, "steps", "must be a list"),
    ("steps[1]", "venv", "steps[1]", "must be an object"),
    ("steps[1].type", _DELETE, "steps[1].type", "is required"),
    ("steps[1].type", "docker", "steps[1].type", "unknown step type 'docker'"),
    ("steps[1].type", ["venv"], "steps[1].type", "must be a string"),
    # git
    ("steps[0].branch", "main", "steps[0]", "unknown key 'branch'"),
    ("steps[0].repo", "not a url", "steps[0].repo", "is not a git URL"),
    ("steps[0].repo", "-uhttps://x.invalid/r", "steps[0].repo", "is not a git URL"),
    ("steps[0].repo", "ext::sh -c touch% /tmp/pwned", "steps[0].repo", "is not a git URL"),
    ("steps[0].repo", _DELETE, "steps[0].repo", "is required"),
    ("steps[0].commit", "--upload-pack=touch /tmp/pwned", "steps[0].commit", "not a commit"),
    ("steps[0].commit", "-b", "steps[0].commit", "not a commit"),
    ("steps[0].commit", "main; rm -rf /", "steps[0].commit", "not a commit"),
    ("steps[0].commit", 1234567, "steps[0].commit", "must be a string"),
    ("steps[0].dest", "/abs/custom_nodes/Foo", "steps[0].dest", "inside the project"),
    ("steps[0].dest", "../outside", "steps[0].dest", "inside the project"),
    ("steps[0].dest", "custom_nodes/../../outside", "steps[0].dest", "inside the project"),
    ("steps[0].dest", "custom_nodes//Foo", "steps[0].dest", "inside the project"),
    ("steps[0].dest", ".snapfs/x", "steps[0].dest", "inside .snapfs"),
    ("steps[0].dest", "./.snapfs/objects", "steps[0].dest", "inside .snapfs"),
    ("steps[0].dest", ".snapfs", "steps[0].dest", "inside .snapfs"),
    ("steps[0].dest", "", "steps[0].dest", "must not be empty"),
    ("steps[0].dest", "a\0b", "steps[0].dest", "must not be empty"),
    ("steps[0].requirements", "../../../etc/passwd", "steps[0].requirements", "inside the project"),
    ("steps[0].requirements", "/etc/passwd", "steps[0].requirements", "inside the project"),
    ("steps[0].venv", "/usr", "steps[0].venv", "inside the project"),
    # venv
    ("steps[1].path", ".snapfs/venv", "steps[1].path", "inside .snapfs"),
    ("steps[1].path", "/tmp/venv", "steps[1].path", "inside the project"),
    ("steps[1].python", 3, "steps[1].python", "must be a string"),
    # pip
    ("steps[2].venv", "/usr", "steps[2].venv", "inside the project"),
    ("steps[2].venv", "other-venv", "steps[2].venv", "neither created by a venv step nor present"),
    ("steps[2].packages", ["numpy"], "steps[2]", 'exactly one of "requirements" and "packages"'),
    ("steps[2].requirements", "../requirements.txt", "steps[2].requirements", "inside the project"),
    ("steps[2].find_links", "/srv/wheels", "steps[2].find_links", "must be a list"),
    ("steps[2].find_links", ["/srv/wheels", 7], "steps[2].find_links[1]", "non-empty string"),
    ("steps[2].index_url", "ftp://pypi.invalid/simple", "steps[2].index_url", "not an http(s) URL"),
    (
        "steps[2].extra_index_urls",
        ["https://ok.invalid/simple", "file:///srv/simple"],
        "steps[2].extra_index_urls[1]",
        "not an http(s) URL",
    ),
    ("steps[2].no_index", "yes", "steps[2].no_index", "must be true or false"),
    ("steps[2].protect", ["torch", "bad name!"], "steps[2].protect[1]", "not a package name"),
    ("steps[2].protect", ["-rfoo"], "steps[2].protect[0]", "not a package name"),
    ("steps[2].constraints", "/etc/constraints.txt", "steps[2].constraints", "inside the project"),
    ("steps[2].pre", True, "steps[2]", "unknown key 'pre'"),
    # download
    ("steps[3].sha256", "abc", "steps[3].sha256", "must be 64 hex digits"),
    ("steps[3].sha256", "g" * 64, "steps[3].sha256", "must be 64 hex digits"),
    ("steps[3].sha256", SHA + "00", "steps[3].sha256", "must be 64 hex digits"),
    ("steps[3].sha256", 12345, "steps[3].sha256", "must be a string"),
    ("steps[3].sources", [], "steps[3]", 'needs "url" or "sources"'),
    (
        "steps[3].sources",
        ["https://a.invalid/m", "ftp://b.invalid/m"],
        "steps[3].sources[1]",
        "not an http(s) URL",
    ),
    ("steps[3].sources", ["https://a.invalid/m", ""], "steps[3].sources[1]", "non-empty string"),
    ("steps[3].sources", "https://a.invalid/m", "steps[3].sources", "must be a list"),
    ("steps[3].size", -1, "steps[3].size", "must not be negative"),
    ("steps[3].size", "10", "steps[3].size", "must be an integer"),
    ("steps[3].size", 1.5, "steps[3].size", "must be an integer"),
    ("steps[3].size", True, "steps[3].size", "not true/false"),
    ("steps[3].shared", True, "steps[3].shared", '"shared_models"'),
    ("steps[3].shared", "yes", "steps[3].shared", "must be true or false"),
    ("steps[3].dest", "/models/m.safetensors", "steps[3].dest", "inside the project"),
    ("steps[3].dest", ".snapfs/downloads/m", "steps[3].dest", "inside .snapfs"),
    ("steps[3].dest", _DELETE, "steps[3].dest", "is required"),
    ("steps[3].mirror", "https://c.invalid/m", "steps[3]", "unknown key 'mirror'"),
    # write
    ("steps[4].text", "{}", "steps[4]", 'exactly one of "json" and "text"'),
    ("steps[4].json", _DELETE, "steps[4]", 'exactly one of "json" and "text"'),
    ("steps[4].dest", "../../etc/cron.d/x", "steps[4].dest", "inside the project"),
    ("steps[4].name", "   ", "steps[4].name", "must not be empty"),
    ("steps[4].name", 4, "steps[4].name", "must be a string"),
]


@pytest.mark.parametrize(
    ("path", "value", "where", "fragment"),
    CASES,
    ids=[f"{c[0]}={c[1]!r:.40}" if c[1] is not _DELETE else f"{c[0]}-missing" for c in CASES],
)
def test_each_bad_value_is_refused_with_its_json_path(
    tmp_path: Path, path: str, value: Any, where: str, fragment: str
) -> None:
    err = rejected(mutated(path, value), tmp_path)
    assert err.where == where, str(err)
    assert fragment in err.message, err.message
    assert os.listdir(tmp_path) == []


def test_a_plan_that_is_not_an_object(tmp_path: Path) -> None:
    for bad in ([], "steps", 1, None):
        err = rejected(bad, tmp_path)
        assert err.where == "" and "must be an object" in err.message


def test_text_of_a_write_step_must_be_a_string(tmp_path: Path) -> None:
    plan = mutated("steps[4].json", _DELETE)
    plan["steps"][4]["text"] = 5
    err = rejected(plan, tmp_path)
    assert err.where == "steps[4].text" and "must be a string" in err.message


def test_packages_must_look_like_requirements(tmp_path: Path) -> None:
    for bad in ("-e git+https://x.invalid/r", "--index-url=http://evil.invalid", "a b c"):
        plan = mutated("steps[2].requirements", _DELETE)
        plan["steps"][2]["packages"] = ["numpy>=1.26", "torch[cuda]==2.1.0", bad]
        err = rejected(plan, tmp_path)
        assert err.where == "steps[2].packages[2]", (bad, str(err))
        assert "is not a package requirement" in err.message
    plan = mutated("steps[2].requirements", _DELETE)
    plan["steps"][2]["packages"] = ["numpy>=1.26", "torch[cuda]==2.1.0"]
    assert validate_plan(plan, tmp_path)["steps"][2]["packages"] == plan["steps"][2]["packages"]
    plan = mutated("steps[2].requirements", _DELETE)
    plan["steps"][2]["packages"] = ["numpy", 5]
    err = rejected(plan, tmp_path)
    assert err.where == "steps[2].packages[1]" and "non-empty string" in err.message


def test_a_pip_step_needs_a_venv(tmp_path: Path) -> None:
    plan = good_plan()
    del plan["venv"]
    err = rejected(plan, tmp_path)  # the git step's requirements are met first
    assert err.where == "steps[0].requirements" and "need a venv" in err.message
    del plan["steps"][0]["requirements"]
    err = rejected(plan, tmp_path)
    assert err.where == "steps[2]" and "needs a venv" in err.message


def test_a_venv_already_in_the_project_may_be_used(tmp_path: Path) -> None:
    plan = mutated("steps[2].venv", "env2")
    with pytest.raises(PlanError):
        validate_plan(plan, tmp_path)
    (tmp_path / "env2").mkdir()
    assert validate_plan(plan, tmp_path)["steps"][2]["venv"] == "env2"


def test_a_bad_url_is_reported_at_url(tmp_path: Path) -> None:
    plan = good_plan()
    plan["steps"][3]["url"] = "ftp://a.invalid/m"
    err = rejected(plan, tmp_path)
    assert err.where == "steps[3].url", str(err)


def test_a_bad_source_next_to_a_url_is_reported_at_its_own_index(tmp_path: Path) -> None:
    plan = good_plan()
    plan["steps"][3]["url"] = "https://a.invalid/m"
    plan["steps"][3]["sources"] = ["ftp://b.invalid/m"]
    err = rejected(plan, tmp_path)
    assert err.where == "steps[3].sources[0]", str(err)


def test_url_alone_and_url_with_sources(tmp_path: Path) -> None:
    plan = good_plan()
    del plan["steps"][3]["sources"]
    plan["steps"][3]["url"] = "https://a.invalid/m"
    assert validate_plan(plan, tmp_path)["steps"][3]["sources"] == ["https://a.invalid/m"]
    plan["steps"][3]["sources"] = ["https://b.invalid/m", "https://a.invalid/m"]
    assert validate_plan(plan, tmp_path)["steps"][3]["sources"] == [
        "https://a.invalid/m",
        "https://b.invalid/m",
    ]


# ---- symlinks on the way --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target", "path", "value", "where"),
    [
        # a folder on the way that leads outside the project
        ("models", "OUTSIDE", "steps[3].dest", "models/checkpoints/m.safetensors", "steps[3].dest"),
        # deeper down
        ("models/checkpoints", "OUTSIDE", "steps[3].dest", "models/checkpoints/m.safetensors",
         "steps[3].dest"),
        # the destination itself is a symlink (writing would go through it)
        ("user/workflows/portrait.json", "OUTSIDE/passwd", "steps[4].dest",
         "user/workflows/portrait.json", "steps[4].dest"),
        # even one that points inside the project: the plan refuses every symlink on the way
        ("custom_nodes", "INSIDE", "steps[0].dest", "custom_nodes/ComfyUI-Foo", "steps[0].dest"),
        # a dangling one
        ("models", "OUTSIDE/missing", "steps[3].dest", "models/checkpoints/m.safetensors",
         "steps[3].dest"),
        ("venv", "OUTSIDE", "venv", "venv", "venv"),
        ("env2", "OUTSIDE", "steps[1].path", "env2", "steps[1].path"),
    ],
)  # fmt: skip
def test_a_symlink_on_the_way_is_refused(
    tmp_path: Path, link: str, target: str, path: str, value: str, where: str
) -> None:
    root = tmp_path / "proj"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "real").mkdir(parents=True)
    dest = target.replace("OUTSIDE", str(outside)).replace("INSIDE", str(root / "real"))
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(dest, root / link)
    before = tree_state(tmp_path)
    err = rejected(mutated(path, value), root)
    assert err.where == where, str(err)
    assert "symlink" in err.message, err.message
    assert tree_state(tmp_path) == before
    assert os.listdir(outside) == []


def test_real_folders_on_the_way_are_fine(tmp_path: Path) -> None:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "custom_nodes").mkdir()
    out = validate_plan(good_plan(), tmp_path)
    assert out["steps"][3]["dest"] == "models/checkpoints/m.safetensors"


# ---- reading the file -----------------------------------------------------------------------


def test_load_plan_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"snapfs_import": 1,\n "steps": [}\n')
    with pytest.raises(PlanError, match=r"is not valid JSON: .*\(line 2\)"):
        load_plan(bad, tmp_path)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="can't be read"):
        load_plan(binary, tmp_path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(good_plan()))
    assert load_plan(good, tmp_path)["name"] == "portrait workflow"


# ---- a rejected plan changes nothing --------------------------------------------------------


def _populate(root: Path) -> None:
    write(root, "main.py", "print('comfy')\n")
    write(root, "models/checkpoints/old.safetensors", os.urandom(4096))
    write(root, "custom_nodes/Existing/__init__.py", "x = 1\n")
    os.symlink("main.py", root / "link")


def _db_counts(root: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{root / '.snapfs' / 'project.db'}?mode=ro", uri=True)
    try:
        return {
            t: int(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in ("snapshots", "operations", "op_steps", "errors", "transactions", "trees")
        }
    finally:
        con.close()


def _bad_last_step_plan(tmp_path: Path) -> Path:
    """Valid steps first, one bad destination last: nothing may run before it is found."""
    plan = good_plan()
    del plan["steps"][0]["requirements"]
    plan["steps"] = [
        plan["steps"][0],
        {"type": "write", "dest": "user/a.json", "json": {}},
        {"type": "write", "dest": "/etc/snapfs-test-should-not-exist", "text": "x"},
    ]
    del plan["venv"]
    path = tmp_path / "bad-plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_a_rejected_plan_changes_nothing_in_the_project(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    _populate(root)
    with snapfs.init(root) as project:
        before = tree_state(root)
        counts = _db_counts(root)
        assert counts["snapshots"] == counts["operations"] == 0
        with pytest.raises(PlanError) as info:
            start_import(project, _bad_last_step_plan(tmp_path))
        assert info.value.where == "steps[2].dest"
        assert tree_state(root) == before
        assert project.snapshots() == []
        assert _db_counts(root) == counts
        tmp = root / ".snapfs" / "tmp"
        assert not tmp.exists() or os.listdir(tmp) == []
    assert not Path("/etc/snapfs-test-should-not-exist").exists()


def test_cli_import_of_a_bad_plan_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    _populate(root)
    r = run_cli("-C", str(root), "init", input="")
    assert r.returncode == 0, r.stderr
    before = tree_state(root)
    counts = _db_counts(root)
    plan = _bad_last_step_plan(tmp_path)
    for args in (["import", str(plan)], ["import", "--dry-run", str(plan)]):
        r = run_cli("-C", str(root), *args, input="")
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "steps[2].dest" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert tree_state(root) == before
        assert _db_counts(root) == counts
    r = run_cli("-C", str(root), "ops", input="")
    assert r.returncode == 0 and "No operations yet" in r.stdout, r.stdout + r.stderr


def test_cli_dry_run_of_a_good_plan_lists_steps_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    _populate(root)
    assert run_cli("-C", str(root), "init", input="").returncode == 0
    before = tree_state(root)
    counts = _db_counts(root)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good_plan()))
    r = run_cli("-C", str(root), "import", "--dry-run", str(path), input="")
    assert r.returncode == 0, r.stderr
    assert "Plan 'portrait workflow' is valid: 5 step(s)." in r.stdout
    assert "  4. download models/checkpoints/m.safetensors" in r.stdout
    assert tree_state(root) == before
    assert _db_counts(root) == counts
