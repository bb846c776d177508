"""The stat cache's file records: lazy lookups, edits spliced into the raw section, and a
round trip through the index file, each checked against a plain dict doing the same."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs._index import RECORD, CacheEntry, FileRecords, load_index, save_index


def _entry(n: int, racy: bool = False) -> CacheEntry:
    return CacheEntry(1, n, n * 10, n * 100, n * 1000, 0o644, n.to_bytes(16, "little"), racy)


def _loaded(files: dict[bytes, CacheEntry], tmp_path: Path) -> FileRecords:
    """As a command finds it: read back from an index file, nothing decoded yet."""
    path = tmp_path / "index"
    save_index(path, FileRecords(0).merged(files.items()))
    return load_index(path).files


paths = st.binary(min_size=1, max_size=6).filter(lambda b: b"\0" not in b)
entries = st.builds(_entry, st.integers(0, 1 << 40), st.booleans())


@settings(max_examples=150, deadline=None)
@given(
    start=st.dictionaries(paths, entries, max_size=40),
    deletes=st.lists(paths, max_size=15),
    updates=st.lists(st.tuples(paths, entries), max_size=15),
    data=st.data(),
)
def test_merged_matches_a_dict(start, deletes, updates, data, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    # Deletes and updates also hit existing paths, not only random new ones. Padding makes
    # the edits few next to the records, so they are found by binary search, not a map.
    pad = data.draw(st.sampled_from([0, 400]))
    start = {**start, **{b"pad%04d" % i: _entry(i, False) for i in range(pad)}}
    if start:
        deletes += data.draw(st.lists(st.sampled_from(sorted(start)), max_size=10))
        more = st.tuples(st.sampled_from(sorted(start)), entries)
        updates += data.draw(st.lists(more, max_size=10))
    want = dict(start)
    for p in deletes:
        want.pop(p, None)
    want.update(updates)

    records = _loaded(start, tmp_path_factory.mktemp("ix"))
    got = records.merged(updates, deletes)
    assert got.data() == want
    assert list(got) == sorted(want) and len(got) == len(want)
    # Still sorted and whole on disk: a fresh reader agrees, path by path.
    again = _loaded(got.data(), tmp_path_factory.mktemp("ix"))
    reread = tmp_path_factory.mktemp("ix") / "index"
    save_index(reread, got)
    assert load_index(reread).files.section() == again.section()
    for p, e in want.items():
        assert load_index(reread).files.get(p) == e


def test_merged_drops_a_run_of_paths_and_inserts_beside_it(tmp_path: Path) -> None:
    """A removed folder's files are a run of neighbouring positions."""
    start = {b"a/%03d" % i: _entry(i) for i in range(50)}
    start.update({b"b/%03d" % i: _entry(100 + i) for i in range(50)})
    start[b"c"] = _entry(999)
    run = [b"b/%03d" % i for i in range(50)]
    updates = [(b"b/new", _entry(7)), (b"a/010", _entry(8)), (b"0", _entry(9))]
    got = _loaded(start, tmp_path).merged(updates, run + [b"a/049"])
    want = {k: v for k, v in start.items() if k not in run and k != b"a/049"}
    want.update(updates)
    assert got.data() == want and list(got) == sorted(want)
    save_index(tmp_path / "again", got)
    assert load_index(tmp_path / "again").files.data() == want


def test_lookups_unpack_one_record_until_most_are_asked_for(tmp_path: Path) -> None:
    files = {f"d/f{i:03}".encode(): _entry(i) for i in range(100)}
    records = _loaded(files, tmp_path)
    assert len(records) == 100 and records.view() is records  # nothing decoded to answer len
    for i in range(50):
        assert records[f"d/f{i:03}".encode()] == files[f"d/f{i:03}".encode()]
    assert records._data is None  # 50 of 100: still one record at a time
    assert records.get(b"d/f050") == files[b"d/f050"]
    assert records.view() == files  # the 51st decoded them all, and lookups use the dict now
    assert records.get(b"missing") is None and b"missing" not in records
    assert b"d/f000" in records


def test_a_damaged_section_reads_as_empty(tmp_path: Path) -> None:
    # One record, but a section whose paths don't add up (a torn or foreign writer).
    raw = RECORD.pack(*_entry(1)) + b"a\0b\0"
    records = FileRecords(1, raw)
    assert list(records) == [] and len(records) == 0
    assert records.get(b"a") is None and records.data() == {}
    assert records.merged([(b"c", _entry(3))]).data() == {b"c": _entry(3)}


def test_a_merge_without_changes_is_the_same_records(tmp_path: Path) -> None:
    records = _loaded({b"a": _entry(1)}, tmp_path)
    assert records.merged([], [b"not-there"]) is records


@settings(max_examples=150, deadline=None)
@given(
    files=st.dictionaries(st.binary(min_size=1, max_size=8).filter(lambda b: b"\0" not in b), entries, max_size=40),
    asked=st.lists(st.binary(min_size=1, max_size=4).filter(lambda b: b"\0" not in b), max_size=6),
    data=st.data(),
)
def test_under_finds_each_path_and_everything_below_it(files, asked, data, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    if files:  # ask for some recorded paths and their parents too
        asked += data.draw(st.lists(st.sampled_from(sorted(files)), max_size=4))
        asked += [p.rpartition(b"/")[0] for p in asked if b"/" in p]
    records = _loaded(files, tmp_path_factory.mktemp("under"))
    want = {p for p in files if any(p == d or p.startswith(d + b"/") for d in asked)}
    assert records.under(asked) == want


def test_under_does_not_take_a_sibling_that_shares_a_prefix(tmp_path: Path) -> None:
    names = [b"venv", b"venv-old", b"venv.bak/x", b"venv/a", b"venv/a/b", b"venv0", b"venw/x"]
    records = _loaded({p: _entry(i) for i, p in enumerate(names)}, tmp_path)
    assert records.under([b"venv"]) == {b"venv", b"venv/a", b"venv/a/b"}
    assert records.under([b"venv/a"]) == {b"venv/a", b"venv/a/b"}
    assert records.under([b"nothing"]) == set()
