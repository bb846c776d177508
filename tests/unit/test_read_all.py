"""read_all with the size the caller saw: one read when the file is that size, and never a
short read mistaken for the end."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from snapfs._hashing import read_all


def test_a_file_of_the_expected_size_is_read_whole(tmp_path: Path) -> None:
    p = tmp_path / "f"
    for data in (b"", b"x", b"hello world" * 1000):
        p.write_bytes(data)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert read_all(fd, len(data)) == data
        finally:
            os.close(fd)


def test_a_file_that_grew_or_shrank_since_its_stat_is_read_to_the_end(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"a" * 100)
    for expect in (0, 10, 99, 101, 5000):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert read_all(fd, expect) == b"a" * 100
        finally:
            os.close(fd)


def test_a_short_read_is_not_taken_for_the_end() -> None:
    # A pipe returns what is there so far: exactly the expected size first, then the rest.
    r, w = os.pipe()
    os.write(w, b"12345")

    def rest() -> None:
        os.write(w, b"67890")
        os.close(w)

    t = threading.Timer(0.2, rest)
    t.start()
    try:
        assert read_all(r, 4) == b"1234567890"  # asked for 5, got 5: not the expected 4
    finally:
        t.join()
        os.close(r)
    r, w = os.pipe()
    os.write(w, b"123")
    t = threading.Timer(0.2, rest)
    t.start()
    try:
        assert read_all(r, 10) == b"12367890"  # 3 of 10 expected: read on to the real end
    finally:
        t.join()
        os.close(r)
