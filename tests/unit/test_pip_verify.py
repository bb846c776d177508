"""A pip step's "already done?" check answers "no" without starting the venv's Python when a
plain requirement names a distribution the venv doesn't have; anything it can't be sure of is
left to the venv's Python."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapfs import _import
from snapfs._import import _certainly_unmet, _installed_names, _requirements_met


def _venv(root: Path, *dists: str, cfg: str = "include-system-site-packages = false\n") -> Path:
    site = root / "lib/python3.11/site-packages"
    site.mkdir(parents=True)
    (root / "pyvenv.cfg").write_text(f"home = /usr/bin\n{cfg}")
    (site / "distutils-precedence.pth").write_text("import os; os.environ.get('X')\n")
    for d in dists:
        (site / d).mkdir()
    return root


@pytest.fixture(autouse=True)
def _no_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)


def test_names_come_from_metadata_dirs_normalized(tmp_path: Path) -> None:
    v = _venv(
        tmp_path,
        "pip-23.2.1.dist-info",
        "Zope.Interface-5.0.dist-info",
        "old_pkg-1.0-py3.11.egg-info",
        "devpkg.egg-info",
        "pip",  # a package directory, not a distribution's metadata
    )
    (v / "lib/python3.11/site-packages/linked.egg-link").write_text("/src\n")
    assert _installed_names(v) == {"pip", "zope-interface", "old-pkg", "devpkg", "linked"}


@pytest.mark.parametrize(
    ("lines", "unmet"),
    [
        (["pip"], False),
        (["pip>=23", "zope_interface[extra]==5.0"], False),  # extras, specifiers, spelling
        (["torch>=2"], True),
        (["pip", "# comment only", "", "torch  # the model needs it"], True),
        (["torch; sys_platform == 'win32'"], False),  # a marker may make it not apply
        (["torch @ https://example.invalid/t.whl"], False),  # a URL: pip decides
        (["./local/pkg"], False),
        (["-r other.txt", "-e ."], False),
        (["-missing-"], False),
        ([], False),
    ],
)
def test_only_a_plain_missing_name_is_certainly_unmet(
    tmp_path: Path, lines: list[str], unmet: bool
) -> None:
    v = _venv(tmp_path, "pip-23.2.1.dist-info", "zope.interface-5.0.dist-info")
    assert _certainly_unmet(v, lines) is unmet


@pytest.mark.parametrize(
    "make_visible",
    [
        lambda v, mp: (v / "pyvenv.cfg").write_text("include-system-site-packages = True\n"),
        lambda v, mp: (v / "lib/python3.11/site-packages/extra.pth").write_text("/opt/pkgs\n"),
        lambda v, mp: mp.setenv("PYTHONPATH", "/opt/pkgs"),
        lambda v, mp: (v / "pyvenv.cfg").unlink(),
    ],
    ids=["system-site-packages", "pth-path", "PYTHONPATH", "no-pyvenv.cfg"],
)
def test_other_places_a_distribution_may_be_found_leave_it_to_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_visible: object
) -> None:
    v = _venv(tmp_path, "pip-23.2.1.dist-info")
    make_visible(v, monkeypatch)  # type: ignore[operator]
    assert _certainly_unmet(v, ["torch"]) is False


def test_the_venvs_python_is_not_started_when_the_answer_is_certain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = _venv(tmp_path, "pip-23.2.1.dist-info")
    python = v / "bin/python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\nexit 0\n")  # would answer "met" if it were asked
    python.chmod(0o755)
    started: list[object] = []
    real = subprocess.run

    def spy(*a: object, **k: object) -> object:
        started.append(a)
        return real(*a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(_import.subprocess, "run", spy)
    assert _requirements_met(python, ["torch"]) is False and not started
    assert _requirements_met(python, ["pip"]) is True and len(started) == 1
