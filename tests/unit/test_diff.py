"""walk_diff compares raw tree records and decodes only those that differ: it must yield
exactly what a walk over fully decoded trees yields."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs import _diff
from snapfs._diff import walk_diff
from snapfs._hashing import Oid
from snapfs._tree import Entry, Kind, decode, encode, tree_oid

Tree = dict[bytes, object]  # name -> ("file", mode, content) | ("link", target) | Tree

names = st.sampled_from([b"a", b"b", b"c", b"d\xff", b"e e"])
leaves = st.one_of(
    st.tuples(st.just("file"), st.sampled_from([0o644, 0o755]), st.sampled_from([b"x", b"yy"])),
    st.tuples(st.just("link"), st.sampled_from([b"x", b"../y"])),
)
trees = st.recursive(
    st.dictionaries(names, leaves, max_size=4),
    lambda sub: st.dictionaries(names, st.one_of(leaves, sub), max_size=4),
    max_leaves=20,
)


def _store(tree: Tree, objects: dict[Oid, bytes], mode: int = 0o755) -> Oid:
    entries = []
    for name, v in tree.items():
        if isinstance(v, dict):
            entries.append(Entry(name, Kind.DIR, mode, 0, _store(v, objects, mode)))
        elif v[0] == "file":
            content = v[2]
            entries.append(Entry(name, Kind.FILE, v[1], len(content), content.ljust(16, b".")))
        else:
            entries.append(Entry(name, Kind.LINK, 0o777, 0, b"", v[1]))
    data = encode(entries)
    objects[tree_oid(data)] = data
    return tree_oid(data)


def _reference(
    objects: dict[Oid, bytes], old: Oid | None, new: Oid | None
) -> Iterator[tuple[bytes, Entry | None, Entry | None]]:
    """walk_diff as it was before it compared records: over fully decoded trees."""
    stack: list[tuple[bytes, Oid | None, Oid | None]] = [(b"", old, new)]
    while stack:
        rel, a_oid, b_oid = stack.pop()
        if a_oid == b_oid:
            continue
        a = {e.name: e for e in decode(objects[a_oid])} if a_oid else {}
        b = {e.name: e for e in decode(objects[b_oid])} if b_oid else {}
        subdirs = []
        for name in sorted(a.keys() | b.keys()):
            ea, eb = a.get(name), b.get(name)
            path = rel + b"/" + name if rel else name
            if ea is not None and eb is not None and ea.kind == eb.kind == Kind.DIR:
                if ea.mode != eb.mode:
                    yield path, ea, eb
                if ea.oid != eb.oid:
                    subdirs.append((path, ea.oid, eb.oid))
                continue
            if ea is not None and eb is not None and ea.same_content(eb) and ea.mode == eb.mode:
                continue
            yield path, ea, eb
        stack.extend(reversed(subdirs))


@settings(max_examples=300, deadline=None)
@given(old=trees, new=trees, dir_mode=st.sampled_from([0o755, 0o700]))
def test_walk_diff_equals_a_walk_over_decoded_trees(old: Tree, new: Tree, dir_mode: int) -> None:
    objects: dict[Oid, bytes] = {}
    a, b = _store(old, objects), _store(new, objects, dir_mode)
    _diff._RECORDS.clear()
    want = list(_reference(objects, a, b))
    assert list(walk_diff(objects.get, a, b)) == want
    assert list(walk_diff(objects.get, a, b)) == want  # from the record cache
    assert list(walk_diff(objects.get, b, a)) == list(_reference(objects, b, a))


def test_entries_that_differ_only_in_size_compare_by_content() -> None:
    # Records differ (the size field), the entries don't: nothing to report, as before.
    objects: dict[Oid, bytes] = {}
    one = encode([Entry(b"f", Kind.FILE, 0o644, 1, b"o" * 16)])
    two = encode([Entry(b"f", Kind.FILE, 0o644, 2, b"o" * 16)])
    for data in (one, two):
        objects[tree_oid(data)] = data
    assert list(walk_diff(objects.get, tree_oid(one), tree_oid(two))) == []


def test_change_lists_are_read_only_values_that_pickle_and_copy() -> None:
    import copy
    import pickle

    import pytest

    from snapfs._diff import Changes, ChangeSet

    cs = ChangeSet(["a"], ["m"], None, [("x", "y")])
    assert cs == ChangeSet(["a"], ["m"], [], [("x", "y")]) and cs != Changes(["a"], ["m"])
    assert pickle.loads(pickle.dumps(cs)) == cs == copy.deepcopy(cs)
    assert repr(Changes(["a"])) == "Changes(added=['a'], modified=[], deleted=[])"
    assert not Changes() and Changes(deleted=["d"])
    with pytest.raises(AttributeError):
        cs.added = []  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(cs)
