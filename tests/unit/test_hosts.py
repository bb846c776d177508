"""HostBook: the per-host circuit breaker and health record, with a fake clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs._hosts import HostBook, HostHealth

THRESHOLD = 3
COOLDOWN = 10.0


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def book(clock: FakeClock) -> Iterator[HostBook]:
    b = HostBook(None, threshold=THRESHOLD, cooldown=COOLDOWN, clock=clock)
    yield b
    b.close()


def trip(book: HostBook, host: str) -> None:
    for _ in range(THRESHOLD):
        book.failure(host)
    assert book.state(host) == "open"


# ---- the breaker ----------------------------------------------------------------------------


def test_unknown_host_is_closed_and_allowed(book: HostBook) -> None:
    assert book.state("a") == "closed"
    assert book.allows("a")
    assert book.health("a") == HostHealth("a")


def test_breaker_opens_after_threshold_failures_in_a_row(book: HostBook) -> None:
    for _ in range(THRESHOLD - 1):
        assert book.failure("a") is False
        assert book.state("a") == "closed"
        assert book.allows("a")
    assert book.failure("a") is True  # this one opened it
    assert book.state("a") == "open"
    assert not book.allows("a")
    assert book.allows("b"), "one host's breaker must not affect another"


def test_a_success_between_failures_resets_the_count(book: HostBook) -> None:
    for _ in range(5):
        for _ in range(THRESHOLD - 1):
            book.failure("a")
        book.success("a")
    assert book.state("a") == "closed"
    assert book.health("a").failures == 0


def test_more_failures_while_open_do_not_restart_the_cooldown(
    book: HostBook, clock: FakeClock
) -> None:
    trip(book, "a")
    opened = book.health("a").opened
    clock.advance(COOLDOWN / 2)
    assert book.failure("a") is False
    assert book.health("a").opened == opened
    clock.advance(COOLDOWN / 2)
    assert book.state("a") == "half-open"


def test_half_open_after_cooldown_admits_exactly_one_probe(
    book: HostBook, clock: FakeClock
) -> None:
    trip(book, "a")
    clock.advance(COOLDOWN - 0.01)
    assert book.state("a") == "open"
    assert not book.allows("a")
    clock.advance(0.01)
    assert book.state("a") == "half-open"
    assert book.allows("a"), "the probe"
    assert not book.allows("a"), "a second request while the probe is out"
    assert not book.allows("a")


def test_success_of_the_probe_closes_the_breaker(book: HostBook, clock: FakeClock) -> None:
    trip(book, "a")
    clock.advance(COOLDOWN)
    assert book.allows("a")
    book.success("a")
    assert book.state("a") == "closed"
    assert book.health("a").failures == 0
    assert book.health("a").opened is None
    assert all(book.allows("a") for _ in range(3))


def test_failure_of_the_probe_reopens_the_breaker(book: HostBook, clock: FakeClock) -> None:
    trip(book, "a")
    clock.advance(COOLDOWN)
    assert book.allows("a")
    assert book.failure("a") is True
    assert book.state("a") == "open"
    assert book.health("a").opened == clock.now, "a fresh cooldown starts at the failed probe"
    assert not book.allows("a")
    clock.advance(COOLDOWN)
    assert book.state("a") == "half-open"
    assert book.allows("a"), "the failed probe must not block the next one"


# ---- ordering -------------------------------------------------------------------------------


def test_order_is_stable_for_healthy_hosts(book: HostBook) -> None:
    assert book.order(["c", "a", "b"]) == ["c", "a", "b"]


def test_order_puts_open_breakers_after_closed_ones(book: HostBook) -> None:
    trip(book, "a")
    assert book.order(["a", "b", "c"]) == ["b", "c", "a"]


def test_order_prefers_fewer_recent_failures(book: HostBook) -> None:
    book.failure("a")
    book.failure("a")
    book.failure("b")
    assert book.order(["a", "b", "c"]) == ["c", "b", "a"]


def test_demote_sorts_a_host_last_even_behind_an_open_breaker(book: HostBook) -> None:
    trip(book, "b")
    book.demote("a")
    assert book.health("a").corrupt == 1
    assert book.order(["a", "b", "c"]) == ["c", "b", "a"]
    book.success("a")  # serving well again later does not make its bad bytes forgotten
    assert book.order(["a", "b", "c"])[-1] == "a"


# ---- persistence ----------------------------------------------------------------------------


def test_state_survives_a_new_instance(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "state" / "hosts.db"  # the parent does not exist yet
    first = HostBook(db, threshold=THRESHOLD, cooldown=COOLDOWN, clock=clock)
    trip(first, "dead:80")
    first.demote("liar:80")
    first.success("good:80")
    first.close()
    assert db.is_file()

    second = HostBook(db, threshold=THRESHOLD, cooldown=COOLDOWN, clock=clock)
    try:
        assert second.state("dead:80") == "open"
        assert not second.allows("dead:80")
        assert second.health("dead:80").failures == THRESHOLD
        assert second.health("liar:80").corrupt == 1
        assert second.health("good:80").successes == 1
        assert second.order(["liar:80", "dead:80", "good:80"]) == ["good:80", "dead:80", "liar:80"]
        clock.advance(COOLDOWN)
        assert second.allows("dead:80")
        second.success("dead:80")
    finally:
        second.close()

    with sqlite3.connect(db) as raw:
        rows = dict(raw.execute("SELECT host, failures FROM hosts").fetchall())
    raw.close()
    assert rows == {"dead:80": 0, "liar:80": 0, "good:80": 0}


def _parent_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_bytes(b"x")
    return tmp_path / "afile" / "hosts.db"


def _path_is_a_directory(tmp_path: Path) -> Path:
    (tmp_path / "hosts.db").mkdir()
    return tmp_path / "hosts.db"


def _not_a_database(tmp_path: Path) -> Path:
    p = tmp_path / "hosts.db"
    p.write_bytes(b"this is not an SQLite database, just junk " * 100)
    return p


@pytest.mark.parametrize(
    "broken",
    [
        _parent_is_a_file,
        _path_is_a_directory,
        _not_a_database,
    ],
    ids=["parent-is-a-file", "path-is-a-directory", "not-a-database"],
)
def test_a_broken_database_degrades_to_memory(
    tmp_path: Path, clock: FakeClock, broken: object
) -> None:
    path = broken(tmp_path)  # type: ignore[operator]
    book = HostBook(path, threshold=THRESHOLD, cooldown=COOLDOWN, clock=clock)
    try:
        trip(book, "a")  # still works, in memory
        assert not book.allows("a")
        book.demote("b")
        assert book.order(["b", "a", "c"]) == ["c", "a", "b"]
    finally:
        book.close()
