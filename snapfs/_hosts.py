"""What snapfs remembers about download hosts: a circuit breaker and a health record per host.

A host's breaker opens after ``threshold`` failures in a row; while open, the host is used only
when no other source is available. After ``cooldown`` seconds it is half-open: one request may
probe it, and a success closes it again. The record lives in SQLite (``hosts.db`` in the user's
state directory), so a mirror that was dead in the last run is not hammered first in the next.

A host that served bytes which turned out to be corrupt is *demoted*: it sorts after every
source that never did, for good (until it is forgotten with its database).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ._errors import SnapfsError
from ._state import connect

HOSTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    host TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,   -- in a row
    opened REAL,                           -- when the breaker opened; NULL = closed
    corrupt INTEGER NOT NULL DEFAULT 0,    -- times it served bytes that failed verification
    successes INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True)
class HostHealth:
    host: str
    failures: int = 0
    opened: float | None = None
    corrupt: int = 0
    successes: int = 0

    def state(self, now: float, cooldown: float) -> str:
        if self.opened is None:
            return "closed"
        return "half-open" if now - self.opened >= cooldown else "open"


class HostBook:
    """Thread-safe breaker and health bookkeeping, written through to SQLite."""

    def __init__(
        self,
        path: Path | None,
        *,
        threshold: int = 5,
        cooldown: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._mutex = threading.Lock()
        self._hosts: dict[str, HostHealth] = {}
        self._probing: set[str] = set()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = connect(path, HOSTS_SCHEMA)
                for row in self._db.execute(
                    "SELECT host, failures, opened, corrupt, successes FROM hosts"
                ):
                    self._hosts[row[0]] = HostHealth(*row)
            except (OSError, sqlite3.Error, SnapfsError):
                # Host health is advice, not data: without its database, start fresh in memory.
                self._db = None

    def close(self) -> None:
        with self._mutex:
            if self._db is not None:
                self._db.close()
                self._db = None

    def health(self, host: str) -> HostHealth:
        with self._mutex:
            return self._hosts.get(host, HostHealth(host))

    def state(self, host: str) -> str:
        return self.health(host).state(self.clock(), self.cooldown)

    def allows(self, host: str) -> bool:
        """May a request go to ``host`` now? A half-open host admits one probe at a time."""
        with self._mutex:
            h = self._hosts.get(host, HostHealth(host))
            state = h.state(self.clock(), self.cooldown)
            if state == "closed":
                return True
            if state == "half-open" and host not in self._probing:
                self._probing.add(host)
                return True
            return False

    def order(self, hosts: Iterable[str]) -> list[str]:
        """Healthiest first: closed breakers, never-corrupt, fewest recent failures; stable."""
        now = self.clock()
        rank = {"closed": 0, "half-open": 1, "open": 2}
        with self._mutex:
            health = {h: self._hosts.get(h, HostHealth(h)) for h in hosts}
        return sorted(
            health,
            key=lambda h: (
                health[h].corrupt > 0,
                rank[health[h].state(now, self.cooldown)],
                health[h].failures,
            ),
        )

    def settle(self, host: str) -> None:
        """A request ended without saying anything about the host's health."""
        with self._mutex:
            self._probing.discard(host)

    def success(self, host: str) -> None:
        with self._mutex:
            self._probing.discard(host)
            h = self._hosts.get(host, HostHealth(host))
            if h.failures == 0 and h.opened is None and h.successes > 0:
                return  # nothing new worth a write
            self._put(HostHealth(host, 0, None, h.corrupt, h.successes + 1))

    def failure(self, host: str) -> bool:
        """Record a failure. Returns True if this opened (or re-opened) the breaker."""
        with self._mutex:
            self._probing.discard(host)
            h = self._hosts.get(host, HostHealth(host))
            failures = h.failures + 1
            opened = h.opened
            tripped = failures >= self.threshold and (
                opened is None or h.state(self.clock(), self.cooldown) == "half-open"
            )
            if tripped:
                opened = self.clock()
            self._put(HostHealth(host, failures, opened, h.corrupt, h.successes))
            return tripped

    def forget(self, host: str) -> None:
        """Close ``host``'s breaker and forget its failures in a row: a user says "try it
        again now". A corrupt record (demotion) stays: that is about its bytes, not its health."""
        with self._mutex:
            self._probing.discard(host)
            h = self._hosts.get(host)
            if h is None or (h.failures == 0 and h.opened is None):
                return
            self._put(HostHealth(host, 0, None, h.corrupt, h.successes))

    def demote(self, host: str) -> None:
        """``host`` served corrupt bytes: prefer every other source from now on."""
        with self._mutex:
            h = self._hosts.get(host, HostHealth(host))
            self._put(HostHealth(host, h.failures, h.opened, h.corrupt + 1, h.successes))

    def _put(self, h: HostHealth) -> None:
        self._hosts[h.host] = h
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?)",
                    (h.host, h.failures, h.opened, h.corrupt, h.successes, self.clock()),
                )
        except sqlite3.Error:
            pass  # advice only (see __init__); the in-memory record still steers this run
