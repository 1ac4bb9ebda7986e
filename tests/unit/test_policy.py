"""Flood control and connection caps (router/policy.py), driven by a hand-held clock.

:class:`TokenBucket` takes the caller's clock, so every test here says exactly what time it
is; nothing sleeps.
"""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import limits as L
from router.policy import ConnectionLimiter, Settings, TokenBucket, connection_cap

# --- TokenBucket -------------------------------------------------------------------------


def take_all(bucket: TokenBucket, now: float, attempts: int) -> List[float]:
    return [bucket.take(now) for _ in range(attempts)]


@pytest.mark.parametrize(
    "rate, burst",
    [(10.0, 20), (5.0, 5), (0.5, 1), (100.0, 3)],
    ids=["default-10-20", "5-5", "half-1", "100-3"],
)
def test_a_new_bucket_holds_exactly_burst_tokens(rate: float, burst: int) -> None:
    bucket = TokenBucket(rate, burst, now=100.0)
    assert take_all(bucket, 100.0, burst) == [0.0] * burst
    assert bucket.take(100.0) == pytest.approx(1.0 / rate)


def test_refused_take_takes_nothing_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(4.0, 2, now=0.0)
    take_all(bucket, 0.0, 2)
    # Asking again and again at the same moment gives the same answer: nothing was taken.
    assert take_all(bucket, 0.0, 5) == [pytest.approx(0.25)] * 5
    assert bucket.take(0.1) == pytest.approx(0.15)
    assert bucket.take(0.25) == 0.0


def test_wait_is_exact_a_take_at_now_plus_wait_succeeds() -> None:
    bucket = TokenBucket(3.0, 1, now=10.0)
    assert bucket.take(10.0) == 0.0
    wait = bucket.take(10.0)
    assert wait == pytest.approx(1 / 3)
    assert bucket.take(10.0 + wait - 1e-6) > 0.0
    assert bucket.take(10.0 + wait + 1e-9) == 0.0


def test_refill_is_proportional_to_elapsed_time() -> None:
    bucket = TokenBucket(10.0, 20, now=0.0)
    take_all(bucket, 0.0, 20)
    # 0.55 s at 10/s: 5.5 tokens, so 5 takes succeed and the 6th waits 0.05 s.
    results = take_all(bucket, 0.55, 6)
    assert results[:5] == [0.0] * 5
    assert results[5] == pytest.approx(0.05)


def test_a_long_idle_time_refills_only_up_to_burst() -> None:
    bucket = TokenBucket(10.0, 20, now=0.0)
    take_all(bucket, 0.0, 20)
    results = take_all(bucket, 3600.0, 21)
    assert results[:20] == [0.0] * 20
    assert results[20] == pytest.approx(0.1)


def test_steady_sender_at_the_rate_is_never_refused() -> None:
    # 1/8 s is exact in binary floating point, so the test is about the bucket, not rounding.
    bucket = TokenBucket(8.0, 1, now=0.0)
    assert all(bucket.take(i * 0.125) == 0.0 for i in range(1000))


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 5.0, 10.0, 250.0]),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=300),
)
def test_bucket_never_allows_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: List[float]
) -> None:
    """Over any sequence of takes (a non-decreasing clock), the takes granted in any window
    [t0, t1] are at most ``burst + rate * (t1 - t0)``; and a refused take's wait is positive
    and never longer than one token's worth."""
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    granted: List[float] = []
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            granted.append(now)
        else:
            assert 0.0 < wait <= 1.0 / rate + 1e-9
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            allowed = burst + rate * (granted[j] - start)
            assert j - i + 1 <= allowed + 1e-6, (i, j, granted)


@settings(max_examples=100, deadline=None)
@given(rate=st.floats(0.5, 100.0), burst=st.integers(1, 30), attempts=st.integers(1, 100))
def test_takes_spaced_by_the_returned_wait_all_succeed(
    rate: float, burst: int, attempts: int
) -> None:
    """Doing what the connection does (wait as told, then take) never gets refused twice."""
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    for _ in range(burst + attempts):
        wait = bucket.take(now)
        if wait > 0.0:
            now += wait + 1e-9
            assert bucket.take(now) == 0.0


# --- ConnectionLimiter -------------------------------------------------------------------


def test_per_ip_cap() -> None:
    limiter = ConnectionLimiter(max_total=100, max_per_ip=3)
    assert [limiter.acquire("10.0.0.1") for _ in range(5)] == [True] * 3 + [False] * 2
    assert limiter.total == 3
    assert limiter.acquire("10.0.0.2")  # another address has its own count
    assert limiter.total == 4


def test_total_cap_across_addresses() -> None:
    limiter = ConnectionLimiter(max_total=4, max_per_ip=3)
    got = [limiter.acquire(ip) for ip in ["a", "a", "b", "b", "c", "c"]]
    assert got == [True, True, True, True, False, False]
    assert limiter.total == 4


def test_release_makes_room_again() -> None:
    limiter = ConnectionLimiter(max_total=2, max_per_ip=2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    limiter.release("a")
    assert limiter.total == 1
    assert limiter.acquire("a")
    assert not limiter.acquire("b")  # the total is full again


def test_refused_acquire_counts_nothing() -> None:
    limiter = ConnectionLimiter(max_total=1, max_per_ip=1)
    assert limiter.acquire("a")
    for ip in ["a", "b", "a"]:
        assert not limiter.acquire(ip)
    assert limiter.total == 1
    limiter.release("a")
    assert limiter.total == 0
    # Nothing was counted for "b" by the refusals: it gets the slot.
    assert limiter.acquire("b")


@settings(max_examples=200, deadline=None)
@given(
    max_total=st.integers(0, 8),
    max_per_ip=st.integers(0, 5),
    steps=st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", "::1"])), max_size=120),
)
def test_limiter_matches_a_counting_model(
    max_total: int, max_per_ip: int, steps: List[tuple]
) -> None:
    """Random acquires and releases (releases only of held connections, as the transports
    do) against a plain dict of counts."""
    limiter = ConnectionLimiter(max_total, max_per_ip)
    held = {}
    for is_acquire, ip in steps:
        if is_acquire:
            expected = sum(held.values()) < max_total and held.get(ip, 0) < max_per_ip
            assert limiter.acquire(ip) == expected
            if expected:
                held[ip] = held.get(ip, 0) + 1
        elif held.get(ip):
            limiter.release(ip)
            held[ip] -= 1
        assert limiter.total == sum(held.values())
        assert 0 <= limiter.total <= max_total


# --- Settings and the connection cap -----------------------------------------------------


def test_settings_defaults_are_the_documented_limits() -> None:
    s = Settings()
    assert (s.rate_limit, s.rate_burst, s.flood_penalty) == (
        L.RATE_LIMIT,
        L.RATE_BURST,
        L.FLOOD_PENALTY_SECONDS,
    )
    assert (s.out_hard, s.out_soft, s.out_soft_seconds) == (
        L.OUTPUT_HARD_LIMIT,
        L.OUTPUT_SOFT_LIMIT,
        L.OUTPUT_SOFT_SECONDS,
    )
    assert (s.idle_ping, s.ping_timeout, s.join_timeout) == (
        L.IDLE_PING_SECONDS,
        L.PING_TIMEOUT_SECONDS,
        L.JOIN_TIMEOUT_SECONDS,
    )
    assert (s.max_connections, s.max_connections_per_ip) == (
        L.MAX_CONNECTIONS,
        L.MAX_CONNECTIONS_PER_IP,
    )
    assert s.out_soft < s.out_hard


@pytest.mark.parametrize(
    "configured, fd_limit, expected",
    [
        (10_000, None, 10_000),
        (10_000, 1_048_576, 10_000),
        (10_000, 1024, 1024 - L.FD_RESERVE),
        (50, 1024, 50),
        (10_000, L.FD_RESERVE, 1),
        (10_000, 10, 1),
    ],
    ids=["no-limit", "high-limit", "lowered", "small-config", "at-reserve", "tiny-limit"],
)
def test_connection_cap_stays_below_the_fd_limit(
    configured: int, fd_limit: object, expected: int
) -> None:
    assert connection_cap(configured, fd_limit) == expected  # type: ignore[arg-type]
