from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapfs


def pytest_configure(config: pytest.Config) -> None:
    # When a Hypothesis test fails, its pytest plugin imports libcst to print the failing example
    # as a patch, and libcst trips a DeprecationWarning in mypy_extensions. filterwarnings=error
    # would turn that into an INTERNALERROR that hides the real failure.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No SNAPFS_* setting from the caller's shell leaks into a test; no thread outlives one.

    A restore's trash is emptied at once (``SNAPFS_PURGE=now``), not after the command
    returns, so what a test inspects is settled; tests/integration/test_trash.py covers the
    background ways."""
    for key in list(os.environ):
        if key.startswith("SNAPFS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SNAPFS_PURGE", "now")
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"threads leaked by the test: {leaked}"


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    d.mkdir()
    return d


@pytest.fixture
def project(project_dir: Path) -> Iterator[snapfs.Project]:
    with snapfs.init(project_dir) as p:
        yield p


def _xfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "reflink tests need root to loop-mount an XFS image"
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is not installed (apt-get install xfsprogs)"
    return None


@pytest.fixture(scope="session")
def xfs_mount() -> Iterator[Path]:
    """An XFS filesystem with reflink=1 on a loop device, for real FICLONE tests."""
    reason = _xfs_unavailable()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="snapfs-xfs-"))
    img, mnt = work / "xfs.img", work / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(reason=f"cannot loop-mount XFS here: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tiny real filesystem (tmpfs, 8 MiB) for disk-full tests."""
    if os.geteuid() != 0:
        pytest.skip(reason="disk-full tests need root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(reason=f"cannot mount tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
