"""Flood control, connection caps and the descriptor budget (router/policy.py), driven by
a hand-held clock and a hand-held descriptor count.

:class:`TokenBucket` takes the caller's clock and :class:`FdBudget` the caller's counter, so
every test here says exactly what time it is and how many descriptors are open; nothing
sleeps.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import limits as L
from router.descriptors import count_open_descriptors, open_descriptors
from router.policy import ConnectionLimiter, FdBudget, TokenBucket
from router.settings import Settings

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


# --- FdBudget ----------------------------------------------------------------------------


class FakeTable:
    """A descriptor table the test sets by hand; counts how often it was read."""

    def __init__(self, count: Optional[int]) -> None:
        self.count = count
        self.reads = 0

    def __call__(self) -> Optional[int]:
        self.reads += 1
        return self.count


def budget(limit: Optional[int], other: int = 10, reserve: int = 20, shards: int = 0) -> FdBudget:
    """A budget whose table holds *other* descriptors besides *shards* shard descriptors."""
    fds = FdBudget(limit, reserve=reserve, counter=FakeTable(other + shards))
    fds.shard_fds = fds.shard_fds_set_aside = shards
    fds.reconcile()
    assert fds.other == other
    return fds


def open_until_refused(limiter: ConnectionLimiter, ip: str = "10.0.0.1") -> int:
    """Open sockets until one is refused (closing the refused one); how many were admitted."""
    admitted = 0
    while limiter.open(ip):
        admitted += 1
        assert admitted < 100_000
    limiter.close(ip, admitted=False)
    return admitted


@pytest.mark.parametrize(
    "limit, other, reserve, shards, expected",
    [
        (256, 10, 128, 8, 256 - 10 - 128 - 8),
        (256, 10, 20, 0, 226),
        (1024, 40, 128, 16, 840),
        (150, 10, 128, 8, 4),
        (140, 10, 128, 8, 0),
        (100, 10, 128, 8, 0),
    ],
    ids=["default-256", "small-reserve", "1024", "nearly-none", "exactly-none", "below-fixed"],
)
def test_budget_admits_exactly_what_fits_beside_the_reserve(
    limit: int, other: int, reserve: int, shards: int, expected: int
) -> None:
    fds = budget(limit, other, reserve, shards)
    assert fds.capacity() == expected
    limiter = ConnectionLimiter(max_total=100_000, max_per_ip=100_000, fds=fds)
    assert open_until_refused(limiter) == expected
    assert limiter.total == expected and fds.sockets == expected
    assert fds.committed + fds.reserve == max(limit, other + shards + reserve + expected)
    assert limiter.refused == 1


def test_refused_sockets_hold_descriptors_until_closed() -> None:
    """A refused socket is open until the transport closes it: while refusals are in flight
    nothing else is admitted, and closing them gives the room back."""
    fds = budget(limit=40, other=10, reserve=20)  # room for 10 sockets
    limiter = ConnectionLimiter(max_total=5, max_per_ip=100, fds=fds)
    assert [limiter.open("a") for _ in range(8)] == [True] * 5 + [False] * 3
    assert fds.sockets == 8 and limiter.total == 5 and limiter.refused == 3
    # 2 more descriptors fit; the third would touch the reserve, whatever the caps say.
    limiter.max_total = 1000
    assert [limiter.open("b") for _ in range(3)] == [True, True, False]
    assert fds.sockets == 11 and not fds.has_room()
    for _ in range(4):  # the refused ones close
        limiter.close("a", admitted=False)
    assert fds.sockets == 7 and limiter.total == 7
    assert [limiter.open("c") for _ in range(4)] == [True, True, True, False]


def test_a_dead_shards_descriptors_stay_set_aside_for_its_restart() -> None:
    fds = budget(limit=100, other=10, reserve=20, shards=8)  # two shards running
    limiter = ConnectionLimiter(1000, 1000, fds)
    assert open_until_refused(limiter) == 62
    fds.shard_fds = 4  # one died: its 4 descriptors are free now...
    assert not limiter.open("x")  # ...but not for clients
    limiter.close("x", admitted=False)
    assert fds.capacity() == 62
    fds.shard_fds = 8  # it is back
    assert fds.in_use == 10 + 8 + 62 and fds.committed == fds.in_use


def test_reconcile_counts_the_rest_from_the_real_table() -> None:
    table = FakeTable(30)
    fds = FdBudget(200, reserve=20, counter=table)
    fds.shard_fds = 8
    for _ in range(5):
        fds.socket_opened()
    fds.reconcile()
    assert fds.other == 30 - 5 - 8 and fds.in_use == 30
    table.count = 25  # something untracked closed
    fds.reconcile()
    assert fds.other == 12 and fds.in_use == 25
    table.count = 3  # fewer than counted (sockets accepted after the listing): never < 0
    fds.reconcile()
    assert fds.other == 0
    table.count = None  # the table cannot be read: keep the last figure
    fds.other = 7
    fds.reconcile()
    assert fds.other == 7


def test_recount_runs_every_sweep_near_the_limit_and_seldom_far_from_it() -> None:
    table = FakeTable(10)
    fds = FdBudget(1000, reserve=100, counter=table)
    now = 1000.0
    for _ in range(10):
        fds.sweep(now)
        now += 1.0
    assert table.reads == 1  # far from the limit: once per FD_RECOUNT_INTERVAL
    fds.sweep(1000.0 + L.FD_RECOUNT_INTERVAL)
    assert table.reads == 2
    for _ in range(1000 - 2 * 100 - 10 + 1):
        fds.socket_opened()  # now less than twice the reserve is left
    table.count = 10 + fds.sockets
    for i in range(5):
        fds.sweep(now + i)
    assert table.reads == 7


def test_no_limit_means_only_the_connection_caps_count() -> None:
    table = FakeTable(None)
    fds = FdBudget(None, counter=table)
    limiter = ConnectionLimiter(max_total=3, max_per_ip=3, fds=fds)
    assert [limiter.open("a") for _ in range(4)] == [True, True, True, False]
    assert fds.capacity() is None and fds.has_room()
    fds.sweep(0.0)
    assert table.reads == 0


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(0, 50),
    reserve=st.integers(0, 20),
    steps=st.lists(
        st.sampled_from(["open", "open", "open", "close", "die", "restart", "recount"]),
        max_size=150,
    ),
)
def test_admitted_sockets_never_touch_the_reserve(
    limit: int, reserve: int, steps: List[str]
) -> None:
    """Random opens, closes, shard deaths/restarts and recounts against a model of the real
    table: whenever a socket is admitted, the descriptors in use (every shard counted as
    running) leave the reserve free."""
    other, shard_fds = 5, 4
    table = FakeTable(other + shard_fds)
    fds = FdBudget(limit, reserve=reserve, counter=table)
    fds.shard_fds_set_aside = fds.shard_fds = shard_fds
    fds.reconcile()
    limiter = ConnectionLimiter(1000, 1000, fds)
    sockets: List[bool] = []
    for step in steps:
        if step == "open":
            admitted = limiter.open("ip")
            sockets.append(admitted)
            if admitted:
                assert len(sockets) + other + shard_fds + reserve <= limit
        elif step == "close" and sockets:
            limiter.close("ip", sockets.pop(0))
        elif step == "die":
            fds.shard_fds = 0
        elif step == "restart":
            fds.shard_fds = shard_fds
        table.count = other + len(sockets) + fds.shard_fds
        if step == "recount":
            fds.reconcile()
        assert fds.sockets == len(sockets) and limiter.total == sum(sockets)
        assert fds.in_use == table.count


@pytest.mark.skipif(
    not sys.platform.startswith(("linux", "darwin")), reason="no descriptor table to read"
)
def test_the_real_descriptor_table_is_read_without_the_listing_itself() -> None:
    before_count, before = count_open_descriptors(), open_descriptors()
    assert before_count is not None and before is not None and len(before) == before_count
    read_end, write_end = os.pipe()
    try:
        assert count_open_descriptors() == before_count + 2
        assert open_descriptors() == before | {read_end, write_end}
    finally:
        os.close(read_end)
        os.close(write_end)
    assert open_descriptors() == before
    fds = FdBudget(10_000)
    fds.reconcile()
    assert fds.in_use == fds.other == before_count
