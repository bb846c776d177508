"""Project-relative paths: nothing a plan or a tree names may lead outside the project root.

``split_relpath`` is pure. ``open_parent`` and ``remove_entry`` work on directory file descriptors
(which pyfakefs can't fake), so they run on real temp dirs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfs import UnsafePath
from snapfs._fsops import DIR_FLAGS, open_parent, remove_entry, remove_tree, split_relpath


@pytest.mark.parametrize(
    ("relpath", "parts"),
    [
        (b"a", [b"a"]),
        (b"a/b/c.txt", [b"a", b"b", b"c.txt"]),
        (b"bad\xff/x", [b"bad\xff", b"x"]),
        (b"...", [b"..."]),
        (b"..a/b..", [b"..a", b"b.."]),
        (b".hidden/.x", [b".hidden", b".x"]),
        (b"with space/new\nline", [b"with space", b"new\nline"]),
    ],
)
def test_split_relpath_accepts_project_relative_paths(relpath: bytes, parts: list[bytes]) -> None:
    assert split_relpath(relpath) == parts


@pytest.mark.parametrize(
    "relpath",
    [
        b"",
        b"/",
        b"/etc/passwd",
        b"..",
        b"../x",
        b"a/..",
        b"a/../../b",
        b".",
        b"./a",
        b"a/./b",
        b"a//b",
        b"a/",
        b"a\0b",
        b"a/\0",
        b"\0",
    ],
)
def test_split_relpath_refuses_paths_that_could_leave_the_root(relpath: bytes) -> None:
    with pytest.raises(UnsafePath):
        split_relpath(relpath)


component = st.binary(min_size=1, max_size=20).filter(
    lambda c: b"/" not in c and b"\0" not in c and c not in (b".", b"..")
)


@given(st.lists(component, min_size=1, max_size=8))
def test_split_relpath_inverts_join(parts: list[bytes]) -> None:
    assert split_relpath(b"/".join(parts)) == parts


@given(
    st.lists(component, max_size=4),
    st.lists(component, max_size=4),
    st.sampled_from([b"..", b".", b""]),
)
def test_split_relpath_refuses_any_bad_component(
    head: list[bytes], tail: list[bytes], bad: bytes
) -> None:
    with pytest.raises(UnsafePath):
        split_relpath(b"/".join([*head, bad, *tail]))


# ---- open_parent / remove_entry on a real directory ---------------------------------------------


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "proj").mkdir()
    fd = os.open(tmp_path / "proj", DIR_FLAGS)
    yield fd
    os.close(fd)


def test_open_parent_creates_missing_parents(tmp_path: Path, root_fd: int) -> None:
    with open_parent(root_fd, b"a/b/c.txt", create=True) as (pfd, name):
        assert name == b"c.txt"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=pfd)
        os.close(fd)
    assert (tmp_path / "proj/a/b/c.txt").is_file()


def test_open_parent_without_create_fails_on_missing_parent(root_fd: int) -> None:
    with pytest.raises(FileNotFoundError):
        with open_parent(root_fd, b"missing/x"):
            pass


def test_open_parent_never_follows_a_symlinked_directory(tmp_path: Path, root_fd: int) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "proj/evil")
    for create in (False, True):
        with pytest.raises(UnsafePath):
            with open_parent(root_fd, b"evil/x", create=create):
                pass
    with pytest.raises(UnsafePath):
        with open_parent(root_fd, b"../outside/x", create=True):
            pass
    assert list(outside.iterdir()) == []


def test_remove_entry_removes_a_symlink_not_its_target(tmp_path: Path, root_fd: int) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub/precious").write_text("keep me")
    os.symlink(outside, tmp_path / "proj/evil")
    assert remove_entry(root_fd, b"evil")
    assert not os.path.lexists(tmp_path / "proj/evil")
    assert (outside / "sub/precious").read_text() == "keep me"


def test_remove_entry_clears_read_only_trees_and_spares_kept_paths(
    tmp_path: Path, root_fd: int
) -> None:
    proj = tmp_path / "proj"
    (proj / "d/keep").mkdir(parents=True)
    (proj / "d/keep/cache.pyc").write_text("c")
    (proj / "d/gone.txt").write_text("g")
    (proj / "ro/inner").mkdir(parents=True)
    (proj / "ro/inner/f").write_text("f")
    os.chmod(proj / "ro/inner", 0o555)
    os.chmod(proj / "ro", 0o555)

    assert remove_entry(root_fd, b"ro")
    assert not os.path.lexists(proj / "ro")

    keep = lambda rel: rel == b"d/keep/"  # noqa: E731
    assert not remove_entry(root_fd, b"d", keep, b"d")
    assert (proj / "d/keep/cache.pyc").exists()
    assert not (proj / "d/gone.txt").exists()


def test_remove_tree_removes_what_is_there_and_ignores_what_is_not(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")  # nothing there: no error
    (tmp_path / "empty").mkdir()
    remove_tree(tmp_path / "empty")
    assert not os.path.lexists(tmp_path / "empty")
    (tmp_path / "full/sub").mkdir(parents=True)
    (tmp_path / "full/sub/f").write_bytes(b"x")
    os.symlink("/nonexistent", tmp_path / "full/dangling")
    remove_tree(os.fsencode(tmp_path / "full"))  # bytes paths too, as the restore passes
    assert not os.path.lexists(tmp_path / "full")


def test_remove_tree_never_follows_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub/precious").write_text("keep me")
    (outside / "empty").mkdir()
    os.symlink(outside, tmp_path / "link")
    os.symlink(outside / "empty", tmp_path / "link-to-empty")
    remove_tree(tmp_path / "link")
    remove_tree(tmp_path / "link-to-empty")
    assert (outside / "sub/precious").read_text() == "keep me"
    assert (outside / "empty").is_dir()
