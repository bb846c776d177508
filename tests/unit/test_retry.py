"""Retry timing: full-jitter backoff, Retry-After, and the progress-aware budget."""

from __future__ import annotations

import email.utils
import random

import pytest

from snapfs import Config
from snapfs._retry import RetryBudget, RetryPolicy, parse_retry_after

NOW = 1_700_000_000.0  # a fixed "now" for HTTP-date arithmetic


# ---- RetryPolicy.delay ----------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2, 3, 4, 5])
def test_delay_is_full_jitter_between_zero_and_the_exponential_ceiling(failures: int) -> None:
    p = RetryPolicy(base=0.5, cap=30.0)
    ceiling = 0.5 * 2 ** (failures - 1)
    assert p.delay(failures, rand=lambda: 0.0) == 0.0
    assert p.delay(failures, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert p.delay(failures, rand=lambda: 0.25) == pytest.approx(ceiling * 0.25)


def test_delay_with_the_real_random_source_stays_inside_the_bounds() -> None:
    p = RetryPolicy(base=0.5, cap=4.0)
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(4.0, 0.5 * 2 ** (failures - 1))
        draws = [p.delay(failures, rand=rng.random) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws), (failures, max(draws))
        # Full jitter, not "equal jitter": short waits occur too, not only the upper half.
        assert min(draws) < ceiling / 4


def test_first_retry_waits_at_most_base_and_base_is_under_two_seconds() -> None:
    """The issue asks for the first retry to start within 2 s, with the shipped defaults."""
    defaults = RetryPolicy()
    assert defaults.base <= 2.0
    assert Config().retry_base <= 2.0
    assert defaults.delay(1, rand=lambda: 1.0) <= defaults.base
    # 0.999...: random.random() never returns 1.0, the largest draw it can make
    assert defaults.delay(1, rand=lambda: 0.9999999) < 2.0


@pytest.mark.parametrize("failures", [6, 7, 10, 33, 34, 1000, 10**9])
def test_delay_is_capped_and_does_not_overflow(failures: int) -> None:
    p = RetryPolicy(base=0.5, cap=3.0)
    assert p.delay(failures, rand=lambda: 1.0) == pytest.approx(3.0)
    assert 0.0 <= p.delay(failures) <= 3.0


@pytest.mark.parametrize("failures", [0, -1])
def test_no_failure_no_delay(failures: int) -> None:
    assert RetryPolicy().delay(failures, rand=lambda: 1.0) == 0.0


# ---- RetryPolicy.wait_for -------------------------------------------------------------------


def test_wait_for_honours_retry_after_over_backoff() -> None:
    p = RetryPolicy(base=0.5, cap=1.0, retry_after_max=120.0)
    # Retry-After wins even when it is longer than the backoff cap...
    assert p.wait_for(1, 7.0) == 7.0
    assert p.wait_for(9, 7.0) == 7.0
    # ...and when it is shorter than the backoff would be.
    assert p.wait_for(9, 0.0) == 0.0


def test_wait_for_caps_retry_after_at_retry_after_max() -> None:
    p = RetryPolicy(retry_after_max=120.0)
    assert p.wait_for(1, 3600.0) == 120.0
    assert p.wait_for(1, 120.0) == 120.0
    assert p.wait_for(1, -5.0) == 0.0  # a date in the past (or a negative value) means now


def test_wait_for_without_retry_after_is_the_backoff() -> None:
    p = RetryPolicy(base=0.5, cap=2.0)
    for failures in (1, 2, 3, 8):
        ceiling = min(2.0, 0.5 * 2 ** (failures - 1))
        waits = [p.wait_for(failures, None) for _ in range(100)]
        assert all(0.0 <= w <= ceiling for w in waits)


# ---- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("5", 5.0), (" 120 ", 120.0)])
def test_parse_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_parse_retry_after_http_date_in_the_future() -> None:
    value = email.utils.formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after(value, now=NOW) == pytest.approx(30.0)


def test_parse_retry_after_http_date_in_the_past_is_zero() -> None:
    value = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(value, now=NOW) == 0.0


def test_parse_retry_after_zoneless_date_is_read_as_gmt() -> None:
    # "-0000" makes email.utils return a naive datetime; HTTP-dates are always GMT.
    value = email.utils.formatdate(NOW + 60, usegmt=True).replace("GMT", "-0000")
    assert parse_retry_after(value, now=NOW) == pytest.approx(60.0)


def test_parse_retry_after_uses_the_wall_clock_by_default() -> None:
    import time

    value = email.utils.formatdate(time.time() + 3600, usegmt=True)
    got = parse_retry_after(value)
    assert got is not None and 3500 < got <= 3600


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "5s",
        "Wed, 99 Foo 2015 07:28:00 GMT",
        "0x10",
        # Latin-1 superscript digits: str.isdigit() says yes, int() says no. http.client
        # decodes header values as Latin-1, so a server can send these bytes.
        "\u00b2",
        "1\u00b3",
        "\u0661\u0662",  # Arabic-Indic digits: int() takes them, HTTP does not
    ],
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


# ---- RetryBudget ----------------------------------------------------------------------------


def test_budget_exhausts_after_attempts_failures_in_a_row() -> None:
    b = RetryBudget(RetryPolicy(attempts=3))
    assert not b.exhausted
    assert b.fail() == 1
    assert b.fail() == 2
    assert not b.exhausted
    assert b.fail() == 3
    assert b.exhausted


def test_budget_progress_resets_the_run_but_total_keeps_counting() -> None:
    b = RetryBudget(RetryPolicy(attempts=3))
    for _ in range(10):  # a flaky link: two failures, then progress, over and over
        b.fail()
        b.fail()
        assert not b.exhausted
        b.progress()
        assert b.failures == 0
    assert b.total == 20
    assert not b.exhausted
    b.fail()
    b.fail()
    b.fail()
    assert b.exhausted
    assert b.total == 23
    b.progress()
    assert not b.exhausted and b.total == 23
