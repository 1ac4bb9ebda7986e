"""What the router allows clients: the tunable limits (:class:`Settings`), flood control
(:class:`TokenBucket`) and connection caps (:class:`ConnectionLimiter`).

The defaults come from :mod:`common.limits`, where each one's reason is written down; every
field can be changed with a ``start_cluster.py`` flag (see ``docs/LIMITS.md``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from common import limits as L

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """Per-client limits and timeouts. ``rate_limit == 0`` turns flood control off."""

    rate_limit: float = L.RATE_LIMIT
    rate_burst: int = L.RATE_BURST
    flood_penalty: float = L.FLOOD_PENALTY_SECONDS
    out_hard: int = L.OUTPUT_HARD_LIMIT
    out_soft: int = L.OUTPUT_SOFT_LIMIT
    out_soft_seconds: float = L.OUTPUT_SOFT_SECONDS
    idle_ping: float = L.IDLE_PING_SECONDS
    ping_timeout: float = L.PING_TIMEOUT_SECONDS
    join_timeout: float = L.JOIN_TIMEOUT_SECONDS
    max_connections: int = L.MAX_CONNECTIONS
    max_connections_per_ip: int = L.MAX_CONNECTIONS_PER_IP


class TokenBucket:
    """A token bucket: *burst* tokens, refilled at *rate* per second.

    Times are the caller's clock (``loop.time()``), so tests can drive it by hand.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token: returns 0.0 if one was taken, else the seconds until one will be
        available (and takes nothing)."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class SessionRateLimit:
    """Flood control for browser sessions: one :class:`TokenBucket` per session, taken by
    every command (join of another room, send, leave); polls are free (they are how a
    session waits). Call it as the HTTP API's admission hook: returns None to go on, or the
    seconds to wait (answered ``429`` with ``Retry-After``)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self._clock = clock

    def __call__(self, session: Optional[Any], action: str) -> Optional[float]:
        if session is None or action == "poll" or self.rate <= 0:
            return None
        bucket = getattr(session, "rate_bucket", None)
        now = self._clock()
        if bucket is None:
            bucket = session.rate_bucket = TokenBucket(self.rate, self.burst, now)
        wait = bucket.take(now)
        return wait if wait > 0.0 else None


class ConnectionLimiter:
    """Counts open client connections (TCP and HTTP together), in total and per IP."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: Dict[str, int] = {}

    def acquire(self, ip: str) -> bool:
        """Count a new connection from *ip*; False (and nothing counted) if over a cap."""
        count = self._per_ip.get(ip, 0)
        if self.total >= self.max_total or count >= self.max_per_ip:
            return False
        self.total += 1
        self._per_ip[ip] = count + 1
        return True

    def release(self, ip: str) -> None:
        """Forget one connection from *ip* (one :meth:`acquire` that returned True)."""
        self.total -= 1
        count = self._per_ip.pop(ip) - 1
        if count:
            self._per_ip[ip] = count


def raise_fd_limit() -> Optional[int]:
    """Raise this process's open-file soft limit to its hard limit (POSIX); return the
    soft limit in force, or None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d: %s", soft, error)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, fd_limit: Optional[int]) -> int:
    """*configured*, lowered to stay ``FD_RESERVE`` below the open-file limit."""
    if fd_limit is None:
        return configured
    return max(1, min(configured, fd_limit - L.FD_RESERVE))
