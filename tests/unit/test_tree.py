"""Tree objects: encode/decode round trips and refusal of damaged data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs import StateCorrupt
from snapfs._tree import MAGIC, Entry, Kind, decode, decode_record, encode, records, tree_oid

OID_A = bytes(range(16))
OID_B = bytes(range(16, 32))

ODD_NAMES = [
    b"plain.txt",
    b"bad\xff\xfename",  # not UTF-8
    b"\xed\xb3\xbf",  # UTF-8 of a lone surrogate
    "日本語.txt".encode(),
    b"new\nline",
    b"tab\there",
    b" leading and trailing ",
    b"-dash",
    b"...",
    b".hidden",
    b"x" * 255,
    b"\x01\x7f",
]


def _sample() -> list[Entry]:
    return [
        Entry(b"z-file", Kind.FILE, 0o644, 12, OID_A),
        Entry(b"a-dir", Kind.DIR, 0o755, 0, OID_B),
        Entry(b"m-link", Kind.LINK, 0o777, 0, b"", b"../target/\xff"),
        Entry(b"exe", Kind.FILE, 0o4755, 2**64 - 1, OID_B),
    ]


def _boundaries(entries: list[Entry]) -> set[int]:
    """Byte offsets at which an encoded tree may end and still be a whole tree."""
    out = {len(MAGIC)}
    for n in range(1, len(entries) + 1):
        out.add(len(encode(sorted(entries, key=lambda e: e.name)[:n])))
    return out


# ---- round trips ---------------------------------------------------------------------------


def test_round_trip_sorted_by_name_bytes() -> None:
    entries = _sample()
    got = decode(encode(entries))
    assert got == sorted(entries, key=lambda e: e.name)


def test_empty_tree() -> None:
    assert encode([]) == MAGIC
    assert decode(MAGIC) == []


def test_odd_names_and_link_targets_round_trip() -> None:
    entries = [Entry(n, Kind.FILE, 0o600, i, bytes([i]) * 16) for i, n in enumerate(ODD_NAMES)]
    entries.append(Entry(b"link\xff", Kind.LINK, 0o777, 0, b"", b"/abs/\xff\n" + b"t" * 5000))
    entries.append(Entry(b"empty-target", Kind.LINK, 0o777, 0, b"", b""))
    got = decode(encode(entries))
    assert got == sorted(entries, key=lambda e: e.name)


def test_encoding_is_order_independent_and_content_addressed() -> None:
    entries = _sample()
    assert encode(entries) == encode(list(reversed(entries)))
    base = tree_oid(encode(entries))
    assert len(base) == 16
    variants = [
        Entry(b"z-file", Kind.FILE, 0o600, 12, OID_A),  # mode
        Entry(b"z-file", Kind.FILE, 0o644, 13, OID_A),  # size
        Entry(b"z-file", Kind.FILE, 0o644, 12, OID_B),  # content
        Entry(b"z-filf", Kind.FILE, 0o644, 12, OID_A),  # name
        Entry(b"z-file", Kind.DIR, 0o644, 12, OID_A),  # kind
    ]
    seen = {base}
    for v in variants:
        oid = tree_oid(encode([v, *entries[1:]]))
        assert oid not in seen
        seen.add(oid)


names = st.binary(min_size=1, max_size=40).filter(
    lambda n: b"/" not in n and n not in (b".", b"..")
)


@st.composite
def entry_lists(draw: st.DrawFn) -> list[Entry]:
    chosen = draw(st.lists(names, unique=True, max_size=12))
    out = []
    for name in chosen:
        kind = draw(st.sampled_from(list(Kind)))
        mode = draw(st.integers(0, 0o7777))
        if kind == Kind.LINK:
            out.append(Entry(name, kind, mode, 0, b"", draw(st.binary(max_size=200))))
        else:
            size = draw(st.integers(0, 2**64 - 1))
            out.append(Entry(name, kind, mode, size, draw(st.binary(min_size=16, max_size=16))))
    return out


@settings(max_examples=200, deadline=None)
@given(entry_lists())
def test_round_trip_property(entries: list[Entry]) -> None:
    assert decode(encode(entries)) == sorted(entries, key=lambda e: e.name)


# ---- damaged data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"", b"SNT", b"SNT2", b"XXXX" + encode(_sample())[4:], b"\0" * 64]
)
def test_bad_header_is_state_corrupt(data: bytes) -> None:
    with pytest.raises(StateCorrupt):
        decode(data)


def test_every_truncation_inside_an_entry_is_state_corrupt() -> None:
    entries = _sample()
    data = encode(entries)
    bounds = _boundaries(entries)
    for cut in range(len(data)):
        if cut in bounds:
            # A cut between entries leaves a well-formed, shorter tree; only the tree's digest
            # (checked by verify and on load) can tell. It must still decode cleanly.
            assert len(decode(data[:cut])) < len(entries)
            continue
        with pytest.raises(StateCorrupt):
            decode(data[:cut])


def test_trailing_garbage_is_state_corrupt() -> None:
    data = encode(_sample())
    for extra in (b"\x01", b"\x01\x00\x00", b"\x02" + b"\0" * 12):
        with pytest.raises(StateCorrupt):
            decode(data + extra)


def test_every_bit_flip_is_refused_or_changes_the_digest() -> None:
    entries = _sample()
    data = encode(entries)
    oid = tree_oid(data)
    for byte in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            damaged = bytes(flipped)
            assert tree_oid(damaged) != oid
            try:
                got = decode(damaged)
            except StateCorrupt:
                continue
            # If it still parses, it must be a different, well-formed tree.
            assert got != sorted(entries, key=lambda e: e.name)
            for e in got:
                assert isinstance(e, Entry) and e.name and b"/" not in e.name
    for bit in range(8):  # a flip in the magic is always caught
        flipped = bytearray(data)
        flipped[0] ^= 1 << bit
        with pytest.raises(StateCorrupt):
            decode(bytes(flipped))


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/"])
def test_names_that_could_leave_the_directory_are_refused(name: bytes) -> None:
    data = encode([Entry(name, Kind.FILE, 0o644, 1, OID_A)])
    with pytest.raises(StateCorrupt):
        decode(data)


def test_unknown_kind_is_refused() -> None:
    data = MAGIC + struct.pack(">BHQH", 9, 0o644, 1, 1) + b"a" + OID_A
    with pytest.raises(StateCorrupt):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_state_corrupt(tail: bytes) -> None:
    try:
        got = decode(MAGIC + tail)
    except StateCorrupt:
        return
    for e in got:
        assert e.name not in (b"", b".", b"..") and b"/" not in e.name
        assert e.kind in (Kind.FILE, Kind.DIR, Kind.LINK)
        assert len(e.oid) == (0 if e.kind == Kind.LINK else 16)


@settings(max_examples=200, deadline=None)
@given(entry_lists())
def test_records_decode_to_the_same_entries(entries: list[Entry]) -> None:
    raw = records(encode(entries))
    assert list(raw) == sorted(e.name for e in entries)
    assert {name: decode_record(r) for name, r in raw.items()} == {e.name: e for e in entries}
    # A record is exactly that entry's bytes: re-encoding the entry alone gives it back.
    for e in entries:
        assert MAGIC + raw[e.name] == encode([e])


def test_every_truncation_inside_an_entry_is_state_corrupt_for_records_too() -> None:
    entries = _sample()
    data = encode(entries)
    bounds = _boundaries(entries)
    for cut in range(len(data)):
        if cut in bounds:
            assert len(records(data[:cut])) < len(entries)
            continue
        with pytest.raises(StateCorrupt):
            records(data[:cut])
    with pytest.raises(StateCorrupt):
        records(b"SNT0" + data[4:])


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/"])
def test_a_record_whose_name_could_leave_the_directory_is_refused(name: bytes) -> None:
    (record,) = records(encode([Entry(name, Kind.FILE, 0o644, 1, OID_A)])).values()
    with pytest.raises(StateCorrupt):
        decode_record(record)


def test_a_record_of_an_unknown_kind_is_refused() -> None:
    record = struct.pack(">BHQH", 9, 0o644, 1, 1) + b"a" + OID_A
    assert records(MAGIC + record) == {b"a": record}
    with pytest.raises(StateCorrupt):
        decode_record(record)
