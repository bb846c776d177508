"""Retry timing: exponential backoff with full jitter, ``Retry-After``, and a progress-aware budget.

Full jitter (a uniform draw in ``[0, min(cap, base * 2**n)]``) spreads the retries of many clients
that failed together, so a server that just came back is not hit by all of them at once. The
budget counts failures *since the last progress*: a long download over a flaky link may fail a
hundred times and still finish, as long as each failure is followed by verified bytes.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 0.5  # the first retry waits at most this long (the issue asks for < 2 s)
    cap: float = 30.0  # no backoff delay is longer
    retry_after_max: float = 120.0  # a server's Retry-After is honoured up to this
    attempts: int = 10  # failures in a row, with no progress between them, before giving up

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``failures`` (1 = the first retry)."""
        if failures < 1:
            return 0.0
        ceiling = min(self.cap, self.base * (2 ** min(failures - 1, 32)))
        return float(ceiling * rand())

    def wait_for(self, failures: int, retry_after: float | None) -> float:
        """The delay to use: the server's wish when it gave one (capped), else backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max)
        return self.delay(failures)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date. None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,12}", value):  # ASCII digits only: '²'.isdigit() is True
        return float(int(value))
    try:
        import email.utils  # on first use: it pulls in socket, calendar and more

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a zone-less one is read as such
        import datetime

        when = when.replace(tzinfo=datetime.timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class RetryBudget:
    """Failures in a row without progress. :meth:`progress` resets the count."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0  # since the last progress
        self.total = 0  # over the whole run, for reporting

    def fail(self) -> int:
        self.failures += 1
        self.total += 1
        return self.failures

    def progress(self) -> None:
        self.failures = 0

    @property
    def exhausted(self) -> bool:
        return self.failures >= self.policy.attempts
