"""Issue 5 (the recovery manager), scenarios 9-11, each with its expected outcome.

Scenarios 1-8 are in ``test_import.py`` (resets, stalls, web pages, checksum mismatches,
truncated files, disk full, SIGKILL, git failures) and ``test_ops.py`` (the engine's rules).
These three need the same real parts, offline:

* git repositories made here and cloned through ``file://``;
* real venvs, with pip installing from a ``--find-links`` folder of wheels (and sdists) the
  test writes, with ``--no-index``;
* downloads from :class:`tests.faultserver.FaultServer` on 127.0.0.1.

"Rolled back" is checked byte for byte: the venv (or the whole tree) against
:func:`tests.helpers.tree_state` taken before the step, not by asking pip.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import snapfs
from snapfs._classify import classify
from snapfs._errors import CommandFailed, PlanError
from snapfs._import import start_import
from snapfs._ops import load_operation
from tests.faultserver import FaultServer, Reset
from tests.helpers import run_cli, tree_state, write
from tests.importkit import (
    Blob,
    KiB,
    MiB,
    cli_env,
    copy_venv,
    download_step,
    error_counts,
    fast,
    git_step,
    installed,
    make_blob,
    make_repo,
    make_venv,
    make_wheel,
    offline_pip_env,
    partials,
    pip_install,
    sha_of,
    step_table,
    write_plan,
    write_step,
)
from tests.integration.test_import import assert_plain_message, fails, run

# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob() -> Blob:
    return make_blob(2 * MiB)


@pytest.fixture
def srv() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s
        assert s.errors == [], s.errors[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "proj"
    r.mkdir()
    write(r, "main.py", "print('comfy')\n")
    write(r, "models/checkpoints/README", "put models here\n")
    return r


_FAILING_BACKEND = '''\
"""A PEP 517 backend whose metadata is fine and whose build raises, like a C extension
that does not compile. It needs nothing installed, so pip's isolated build works offline."""
import os

NAME, VERSION = {name!r}, {version!r}


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = NAME.replace("-", "_") + "-" + VERSION + ".dist-info"
    os.makedirs(os.path.join(metadata_directory, info))
    with open(os.path.join(metadata_directory, info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: %s\\nVersion: %s\\n" % (NAME, VERSION))
    return info


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("error: command 'gcc' exploded while compiling _native.c")


def build_sdist(sdist_directory, config_settings=None):
    raise RuntimeError("not needed")
'''


def make_failing_sdist(folder: Path, name: str, version: str) -> Path:
    """An sdist ``name-version.tar.gz`` in ``folder`` whose build backend raises in
    ``build_wheel`` (pip gets as far as building it, then "Failed to build NAME")."""
    top = f"{name.replace('-', '_')}-{version}"
    files = {
        "pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        ),
        "backend.py": _FAILING_BACKEND.format(name=name, version=version),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    make_wheel(d, "guarded", "1.0")
    make_wheel(d, "guarded", "2.0")
    make_wheel(d, "needs-new-guarded", "1.0", requires=["guarded>=2.0"])
    make_wheel(d, "helper", "1.0")
    # Writes over guarded's metadata through its .data/purelib: pip "upgrades" a protected
    # package although the resolver was given the pin.
    make_wheel(
        d,
        "sneaky",
        "1.0",
        extra_files={
            "sneaky-1.0.data/purelib/guarded-1.0.dist-info/METADATA": (
                b"Metadata-Version: 2.1\nName: guarded\nVersion: 2.0\n"
            )
        },
    )
    make_failing_sdist(d, "native-ext", "1.0")
    return d


@pytest.fixture
def links(tmp_path: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own --find-links folder (a copy: a test may add a fixed wheel to it), and
    the environment for a pip that sees only it (the pip a git step runs takes no options
    from the plan)."""
    d = tmp_path / "links"
    shutil.copytree(wheels, d)
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    for key, value in offline_pip_env(d).items():
        if key.startswith("PIP_"):
            monkeypatch.setenv(key, value)
    return d


@pytest.fixture(scope="module")
def venv_template(tmp_path_factory: pytest.TempPathFactory, wheels: Path) -> Path:
    """A venv with guarded 1.0 installed; tests copy it (it is never changed)."""
    venv = make_venv(tmp_path_factory.mktemp("venvs") / "guarded")
    pip_install(venv, wheels, "guarded==1.0")
    return venv


def pip_step(requirements: str, links: Path, **more: Any) -> dict[str, Any]:
    return {
        "type": "pip",
        "requirements": requirements,
        "find_links": [str(links)],
        "no_index": True,
        **more,
    }


# ---- 9. a requirement that would replace a protected package --------------------------------


def test_9_a_requirement_that_would_replace_a_protected_package_is_named_and_rolled_back(
    root: Path, tmp_path: Path, srv: FaultServer, blob: Blob, links: Path, venv_template: Path
) -> None:
    """Scenario 9: "A requirement that would replace a protected package: detected, the venv
    rolled back, and the offending requirement named."

    The requirements ask for helper and for needs-new-guarded, which depends on guarded>=2.0
    while guarded 1.0 is protected. pip is given the pin, refuses, and the message names both
    the protected package and the requirement that wanted to replace it. Nothing of the step
    remains in the venv; the download done before it is kept."""
    copy_venv(venv_template, root / "venv")
    write(root, "requirements.txt", "helper==1.0\nneeds-new-guarded==1.0\n")
    srv.add("/m.bin", blob.data)
    plan = write_plan(
        tmp_path / "plan.json",
        [
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            pip_step("requirements.txt", links, protect=["guarded"]),
        ],
        venv="venv",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        venv_before = tree_state(root / "venv")
        err, _events, sleep = fails(p, op)
        d = err.diagnosis
        assert (d.code, d.category.value, d.retryable) == ("pip.constraint", "dependency", False)
        assert_plain_message(d.message)
        assert "guarded" in d.message
        assert "needs-new-guarded" in d.message, d.message  # the offending requirement
        assert {"pin-version", "rollback"} <= {a.id for a in d.actions}
        assert (err.step, err.rolled_back) == (1, True)
        assert step_table(p, op) == [("done", 1), ("rolled-back", 1)]
        assert error_counts(p) == {"pip.constraint": 1}
        assert sleep.calls == []  # a conflict is not retried
    assert tree_state(root / "venv") == venv_before
    assert installed(root / "venv", "guarded", "helper", "needs-new-guarded") == {
        "guarded": "1.0",
        "helper": None,
        "needs-new-guarded": None,
    }
    assert sha_of(root / "models/m.bin") == blob.sha256  # the earlier step is kept
    assert os.listdir(root / ".snapfs/tmp") == []  # the pins file is gone


@pytest.mark.parametrize("order", ["requirer-first", "constraint-first"])
def test_9_the_requirement_named_is_the_one_pip_blames(order: str) -> None:
    """Scenario 9's "the offending requirement named", for both orders in which pip lists the
    causes of a conflict with a constraint."""
    lines = [
        "    needs-new-guarded 1.0 depends on guarded>=2.0",
        "    The user requested (constraint) guarded==1.0",
    ]
    if order == "constraint-first":
        lines.reverse()
    output = "ERROR: Cannot install x\n\nThe conflict is caused by:\n" + "\n".join(lines)
    exc = CommandFailed("pip failed (exit 1)", tool="pip", returncode=1, output=output)
    d = classify(exc, "pip install requirements.txt")
    assert d.code == "pip.constraint"
    assert "needs-new-guarded needs a different version of guarded" in d.message, d.message


def test_9_a_protected_package_that_pip_replaced_anyway_is_detected_and_rolled_back(
    root: Path, tmp_path: Path, links: Path, venv_template: Path
) -> None:
    """Scenario 9, the case the resolver cannot see: "A requirement that would replace a
    protected package: detected, the venv rolled back, and the offending requirement named."

    sneaky's wheel writes over guarded's metadata, so pip installs it (and helper) and guarded
    reads 2.0 afterwards. snapfs checks the protected versions after pip, names the package
    that moved, and rolls the whole step back: helper and sneaky are gone again too."""
    copy_venv(venv_template, root / "venv")
    write(root, "requirements.txt", "helper==1.0\nsneaky==1.0\n")
    plan = write_plan(
        tmp_path / "plan.json",
        [pip_step("requirements.txt", links, protect=["guarded"])],
        venv="venv",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        venv_before = tree_state(root / "venv")
        err, _events, sleep = fails(p, op)
        d = err.diagnosis
        assert d.code == "pip.constraint", (d.code, d.detail)
        assert "guarded" in d.message
        assert "protected package guarded (1.0 -> 2.0)" in d.detail
        assert err.rolled_back and step_table(p, op) == [("rolled-back", 1)]
        assert sleep.calls == []
    assert tree_state(root / "venv") == venv_before
    assert installed(root / "venv", "guarded", "helper", "sneaky") == {
        "guarded": "1.0",
        "helper": None,
        "sneaky": None,
    }


# ---- 10. a failing wheel build ---------------------------------------------------------------


def test_10_a_failing_wheel_build_rolls_back_its_step_and_keeps_earlier_downloads(
    root: Path, tmp_path: Path, srv: FaultServer, blob: Blob, links: Path, venv_template: Path
) -> None:
    """Scenario 10: "A failing wheel build (an sdist in the find-links folder whose setup.py/
    build backend raises): that step's pip changes rolled back, downloads already done in
    earlier steps kept."

    Two downloads (one of them through a reset) and a write finish; then pip resolves helper
    and native-ext, whose sdist fails to build. The step is rolled back (the venv byte for
    byte as before), the failure names the package, and the models stay. Once a built wheel
    of native-ext is in the folder, resume verifies the finished steps without fetching a
    byte again and runs the pip step."""
    copy_venv(venv_template, root / "venv")
    write(root, "requirements.txt", "helper==1.0\nnative-ext==1.0\n")
    other = make_blob(1 * MiB)
    srv.add("/m.bin", blob.data)
    srv.add("/vae.bin", other.data)
    srv.inject("/m.bin", Reset(at=blob.size // 2 + 100 * KiB))
    plan = write_plan(
        tmp_path / "plan.json",
        [
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            download_step("models/vae/vae.bin", other, srv.url("/vae.bin")),
            write_step("user/wf.json", '{"nodes": []}'),
            pip_step("requirements.txt", links),
        ],
        venv="venv",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        venv_before = tree_state(root / "venv")
        err, _events, sleep = fails(p, op)
        d = err.diagnosis
        assert (d.code, d.category.value, d.retryable) == ("pip.build-failed", "dependency", False)
        assert_plain_message(d.message)
        assert "building native-ext from its source code failed" in d.message, d.message
        assert "compiler" not in d.message and "exploded" in d.detail  # the build's own words
        assert (err.step, err.rolled_back) == (3, True)
        assert step_table(p, op) == [("done", 1), ("done", 1), ("done", 1), ("rolled-back", 1)]
        assert error_counts(p) == {"pip.build-failed": 1}
        assert sleep.calls == []
        assert tree_state(root / "venv") == venv_before
        assert installed(root / "venv", "helper", "native-ext") == {
            "helper": None,
            "native-ext": None,
        }
        # The downloads done in earlier steps are kept, whole.
        assert sha_of(root / "models/m.bin") == blob.sha256
        assert sha_of(root / "models/vae/vae.bin") == other.sha256
        assert (root / "user/wf.json").read_text() == '{"nodes": []}'
        assert partials(root) == []
        sent = srv.bytes_sent

        # The user adds a built wheel (what "choose a version with a ready-made download"
        # amounts to here) and resumes.
        make_wheel(links, "native-ext", "1.0")
        res, events, _sleep = run(p, op)
        assert (res.status, res.ran, res.skipped) == ("done", 1, 3)
        assert [e.step for e in events if e.kind == "skip"] == [0, 1, 2]
        assert step_table(p, op) == [("done", 1)] * 4  # attempts count per run
    assert srv.bytes_sent == sent  # nothing fetched again
    assert installed(root / "venv", "helper", "native-ext") == {
        "helper": "1.0",
        "native-ext": "1.0",
    }


def test_10_a_failing_wheel_build_in_a_git_steps_requirements_rolls_back_the_clone_too(
    root: Path, tmp_path: Path, srv: FaultServer, blob: Blob, links: Path, venv_template: Path
) -> None:
    """Scenario 10, through a plugin's requirements: "A failing wheel build (an sdist in the
    find-links folder whose setup.py/build backend raises): that step's pip changes rolled
    back, downloads already done in earlier steps kept."

    The git step clones the plugin into place and then installs its requirements.txt, which
    needs native-ext. The build fails, and the step is undone as a whole: no half-installed
    plugin is left in custom_nodes, the venv is as it was, and the model downloaded by the
    step before is kept."""
    copy_venv(venv_template, root / "venv")
    repo = make_repo(
        tmp_path / "repos/nodes",
        [{"nodes.py": "A = 1\n", "requirements.txt": "helper==1.0\nnative-ext==1.0\n"}],
        tags={"v1": 0},
    )
    srv.add("/m.bin", blob.data)
    plan = write_plan(
        tmp_path / "plan.json",
        [
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            git_step(repo, "v1", "custom_nodes/nodes", requirements="requirements.txt"),
        ],
        venv="venv",
    )
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        before = tree_state(root)
        err, _events, sleep = fails(p, op)
        d = err.diagnosis
        assert d.code == "pip.build-failed", (d.code, d.detail)
        assert "native-ext" in d.message
        assert err.rolled_back and step_table(p, op) == [("done", 1), ("rolled-back", 1)]
        assert sleep.calls == []
    after = tree_state(root)
    assert not (root / "custom_nodes").exists()
    assert {k: v for k, v in after.items() if not k.startswith(b"models/m.bin")} == before
    assert sha_of(root / "models/m.bin") == blob.sha256
    assert srv.bytes_sent == blob.size
    assert os.listdir(root / ".snapfs/tmp") == []  # no half clone in the staging area


# ---- 11. an invalid plan ---------------------------------------------------------------------

# name: (JSON path to change, the bad value, the JSON path the error must name). The plan has
# valid steps before the bad value, each of which would change the project if it ran.
INVALID: Mapping[str, tuple[str, Any, str]] = {
    "dotdot-dest": ("steps[2].dest", "../escaped.json", "steps[2].dest"),
    "dotdot-inside-dest": ("steps[2].dest", "user/../../escaped.json", "steps[2].dest"),
    "dotdot-requirements": ("steps[1].requirements", "../../../reqs.txt", "steps[1].requirements"),
    "empty-name": ("name", "", "name"),
    "blank-step-name": ("steps[2].name", "  ", "steps[2].name"),
    "git-url-not-a-url": ("steps[1].repo", "ComfyUI-Foo", "steps[1].repo"),
    "git-url-ftp": ("steps[1].repo", "ftp://example.invalid/nodes.git", "steps[1].repo"),
    "git-url-option": ("steps[1].repo", "--upload-pack=touch /tmp/pwned", "steps[1].repo"),
    "unknown-version": ("snapfs_import", 2, "snapfs_import"),
    "unknown-step-type": ("steps[2].type", "shell", "steps[2].type"),
    "absolute-dest": ("steps[2].dest", "/tmp/snapfs-escaped.json", "steps[2].dest"),
    "absolute-git-dest": ("steps[1].dest", "/tmp/snapfs-escaped-nodes", "steps[1].dest"),
    "dest-in-snapfs": ("steps[2].dest", ".snapfs/config", "steps[2].dest"),
    "symlink-escape": ("steps[2].dest", "models/shared/escaped.json", "steps[2].dest"),
    "symlink-escape-relative": ("steps[0].dest", "models/up/m.bin", "steps[0].dest"),
}


def _invalid_plan(case: str, tmp_path: Path, srv: FaultServer, blob: Blob) -> dict[str, Any]:
    repo_url = (tmp_path / "repos/nodes").as_uri()
    plan: dict[str, Any] = {
        "snapfs_import": 1,
        "name": "invalid plan",
        "steps": [
            download_step("models/m.bin", blob, srv.url("/m.bin")),
            {"type": "git", "repo": repo_url, "commit": "v1", "dest": "custom_nodes/nodes"},
            write_step("user/wf.json", "{}"),
        ],
    }
    where, value, _ = INVALID[case]
    if where == "steps[1].requirements":
        plan["venv"] = "venv"  # requirements need a venv; the venv is there
    keys: list[Any] = []
    for part in where.split("."):
        name, _, idx = part.partition("[")
        keys.append(name)
        if idx:
            keys.append(int(idx.rstrip("]")))
    obj: Any = plan
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value
    return plan


@pytest.mark.parametrize("case", list(INVALID))
def test_11_an_invalid_plan_is_rejected_before_any_change(
    root: Path, tmp_path: Path, srv: FaultServer, blob: Blob, case: str
) -> None:
    """Scenario 11: "An invalid plan (``../`` dest, empty name, non-git URL as a git step,
    unknown version, absolute path, symlink escape): rejected before any change (tree and
    .snapfs state byte-identical before/after)."

    Through the library and through ``snapfs import`` (and ``--dry-run``): a PlanError naming
    the JSON path of the bad value, exit status 2, and the project tree, ``.snapfs`` included
    (its database, store and logs), byte-identical; no request reached the server, nothing
    was written outside the project."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "models/shared")  # an absolute symlink out of the project
    os.symlink("../..", root / "models/up")  # a relative one
    (root / "venv").mkdir()
    make_repo(tmp_path / "repos/nodes", [{"n.py": "x = 1\n"}], tags={"v1": 0})
    srv.add("/m.bin", blob.data)
    _, _, where = INVALID[case]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_invalid_plan(case, tmp_path, srv, blob)))
    env = cli_env(tmp_path)
    assert run_cli("-C", str(root), "init", env=env, input="").returncode == 0
    before = tree_state(root, skip=())
    assert b".snapfs/project.db" in before

    with snapfs.open(root, **fast(tmp_path)) as p:
        with pytest.raises(PlanError) as info:
            start_import(p, plan)
        assert info.value.where == where, str(info.value)
        assert p.snapshots() == []
    assert tree_state(root, skip=()) == before

    for args in (["import", "--dry-run", str(plan)], ["import", str(plan)]):
        r = run_cli("-C", str(root), *args, env=env, input="")
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert where in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert tree_state(root, skip=()) == before
    r = run_cli("-C", str(root), "ops", env=env, input="")
    assert "No operations yet" in r.stdout, r.stdout + r.stderr

    assert srv.requests == []
    assert os.listdir(outside) == []
    for escaped in (
        tmp_path / "escaped.json",
        tmp_path.parent / "escaped.json",
        tmp_path / "m.bin",
    ):
        assert not escaped.exists(), escaped
    assert not Path("/tmp/snapfs-escaped.json").exists()
    assert not Path("/tmp/snapfs-escaped-nodes").exists()
    assert not Path("/tmp/pwned").exists()


def test_11_nothing_of_an_invalid_plan_runs_even_when_its_valid_steps_come_first(
    root: Path, tmp_path: Path, srv: FaultServer, blob: Blob
) -> None:
    """Scenario 11, the other half of "rejected before any change": the same plan with the
    bad value fixed runs all three steps (so the invalid plans above really would have
    changed the project, had any of their steps run)."""
    make_repo(tmp_path / "repos/nodes", [{"n.py": "x = 1\n"}], tags={"v1": 0})
    srv.add("/m.bin", blob.data)
    plan = tmp_path / "plan.json"
    good = _invalid_plan("dotdot-dest", tmp_path, srv, blob)
    good["steps"][2]["dest"] = "user/wf.json"
    plan.write_text(json.dumps(good))
    with snapfs.init(root, **fast(tmp_path)) as p:
        op = start_import(p, plan)
        res, _e, _s = run(p, op)
        assert (res.status, res.ran) == ("done", 3)
        assert [s.status for s in load_operation(p, op).steps] == ["done"] * 3
    assert sha_of(root / "models/m.bin") == blob.sha256
    assert (root / "custom_nodes/nodes/n.py").read_text() == "x = 1\n"
    assert (root / "user/wf.json").read_text() == "{}"
