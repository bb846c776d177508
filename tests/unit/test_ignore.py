"""Ignore rules: gitignore syntax from ``.snapfsignore``; ``.snapfs/`` is always ignored.

The matcher takes project-relative byte paths; directories are passed with a trailing slash
(that is how the scanner asks). Loading the file goes through pyfakefs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

from snapfs import UsageError
from snapfs._ignore import Ignore

ROOT = Path("/proj")


def _load(fs: FakeFilesystem, contents: bytes | None) -> Ignore:
    fs.create_dir(ROOT)
    if contents is not None:
        fs.create_file(ROOT / ".snapfsignore", contents=contents)
    return Ignore.load(ROOT)


# ---- the state dir -------------------------------------------------------------------------


@pytest.mark.parametrize("rules", [[], ["*.tmp"], ["!.snapfs", "!.snapfs/", "!.snapfs/**"]])
def test_state_dir_is_always_ignored(rules: list[str]) -> None:
    ign = Ignore(rules)
    for p in (b".snapfs", b".snapfs/", b".snapfs/project.db", b".snapfs/objects/ab/cd"):
        assert ign(p), p


def test_only_the_state_dir_itself_is_special() -> None:
    ign = Ignore([])
    for p in (b".snapfsignore", b".snapfs-old/", b".snapfs2", b"sub/.snapfsx", b"x.snapfs"):
        assert not ign(p), p


def test_no_rules_ignores_nothing_else() -> None:
    ign = Ignore([])
    assert not ign
    assert not ign(b"a.log") and not ign(b"build/") and not ign(b"deep/er/file")


# ---- gitignore semantics -----------------------------------------------------------------------


def test_glob_matches_at_any_depth() -> None:
    ign = Ignore(["*.log"])
    assert ign
    assert ign(b"a.log") and ign(b"sub/dir/b.log")
    assert not ign(b"a.log.txt") and not ign(b"log")


def test_negation_re_includes() -> None:
    ign = Ignore(["*.log", "!important.log"])
    assert ign(b"debug.log")
    assert not ign(b"important.log")
    assert not ign(b"sub/important.log")


def test_later_rule_wins() -> None:
    ign = Ignore(["!keep.log", "*.log"])
    assert ign(b"keep.log")  # the negation came first, so the later glob wins


def test_dir_only_pattern_matches_directories_and_their_contents() -> None:
    ign = Ignore(["cache/"])
    assert ign(b"cache/")
    assert ign(b"sub/cache/")
    assert ign(b"cache/blob")
    assert not ign(b"cache")  # a file named cache is not a directory
    assert not ign(b"cachefile")


def test_anchored_pattern_matches_only_at_the_root() -> None:
    ign = Ignore(["/top.txt", "/build/"])
    assert ign(b"top.txt") and ign(b"build/")
    assert not ign(b"sub/top.txt") and not ign(b"sub/build/")


def test_double_star() -> None:
    ign = Ignore(["docs/**/*.tmp", "**/node_modules/"])
    assert ign(b"docs/a/b/c.tmp") and ign(b"docs/c.tmp")
    assert ign(b"node_modules/") and ign(b"x/y/node_modules/")
    assert not ign(b"other/c.tmp")


def test_comments_and_blank_lines() -> None:
    ign = Ignore(["# a comment", "", "   ", "*.o"])
    assert ign(b"main.o")
    assert not ign(b"# a comment")
    only_comments = Ignore(["# nothing", ""])
    assert not only_comments
    assert not only_comments(b"anything")


def test_non_utf8_names_match() -> None:
    ign = Ignore(["bad\udcff*"])  # the pattern as loaded from a file with byte 0xFF in it
    assert ign(b"bad\xffname")
    assert not ign(b"bad\xfename")


# ---- loading .snapfsignore ---------------------------------------------------------------------


def test_load_without_a_file_ignores_only_the_state_dir(fs: FakeFilesystem) -> None:
    ign = _load(fs, None)
    assert not ign
    assert ign(b".snapfs/") and not ign(b"a.log")


def test_load_reads_gitignore_rules(fs: FakeFilesystem) -> None:
    ign = _load(fs, b"# build output\n*.log\r\n!keep.log\nbuild/\n\n/root-only\n")
    assert ign(b"x.log") and not ign(b"keep.log")
    assert ign(b"build/") and ign(b"a/build/") and not ign(b"build")
    assert ign(b"root-only") and not ign(b"a/root-only")


def test_load_keeps_non_utf8_patterns(fs: FakeFilesystem) -> None:
    ign = _load(fs, b"bad\xff*\n")
    assert ign(b"bad\xff.bin")
    assert not ign(b"bad.bin")


def test_load_a_directory_named_snapfsignore_is_a_usage_error(fs: FakeFilesystem) -> None:
    fs.create_dir(ROOT / ".snapfsignore")
    with pytest.raises(UsageError):
        Ignore.load(ROOT)
