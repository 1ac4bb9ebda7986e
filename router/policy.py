"""What the router allows clients: the tunable limits (:class:`Settings`), flood control
(:class:`TokenBucket`), connection caps (:class:`ConnectionLimiter`) and the descriptor
budget they live in (:class:`FdBudget`).

The defaults come from :mod:`common.limits`, where each one's reason is written down; every
field can be changed with a ``start_cluster.py`` flag (see ``docs/LIMITS.md``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any, Callable, Dict, Optional

from common import limits as L
from router.descriptors import count_open_descriptors
from router.settings import Settings

log = logging.getLogger(__name__)


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
    every command (join of another room, send, leave) and by a poll that the shards must
    answer at once (``"fetch"``); polls that wait for news are free (they are how a session
    waits). Call it as the HTTP API's admission hook: returns None to go on, or the
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


def address_key(ip: str) -> str:
    """The key the per-address limits count *ip* under: an IPv4 address as it is, an
    IPv6 address as its ``IPV6_PREFIX_BITS`` prefix (``2001:db8:1:2::/64``), an
    IPv4-mapped IPv6 address as the IPv4 address. Anything unparseable (a Unix socket's
    empty name) is its own key."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if address.version == 4:
        return ip
    mapped = address.ipv4_mapped  # type: ignore[union-attr]
    if mapped is not None:
        return str(mapped)
    network = ipaddress.ip_network(f"{address}/{L.IPV6_PREFIX_BITS}", strict=False)
    return str(network)


class _AddressState:
    """What the per-address limits remember about one address."""

    __slots__ = ("sessions", "session_bucket", "join_bucket")

    def __init__(self) -> None:
        self.sessions = 0
        self.session_bucket: Optional[TokenBucket] = None
        self.join_bucket: Optional[TokenBucket] = None


class AddressLimits:
    """Per-address caps and token buckets for what is expensive to create: browser
    sessions (a cap on live ones and a bucket on creating them) and joins (a bucket shared
    by an address's TCP connections and sessions). Keys come from :func:`address_key`.

    Memory is bounded: an address is remembered only while it has live sessions or a
    bucket that is not full again; :meth:`prune` (called from a periodic sweep) forgets
    the rest. Times are the caller's clock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._states: Dict[str, _AddressState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def sessions_of(self, key: str) -> int:
        state = self._states.get(key)
        return state.sessions if state is not None else 0

    def session_refusal(self, key: str, now: float) -> Optional[float]:
        """None if *key* may create a session now (and the creation is counted), else the
        seconds to wait: ``inf`` when it holds ``max_sessions_per_address`` already."""
        settings = self.settings
        state = self._state(key)
        if state.sessions >= settings.max_sessions_per_address:
            return float("inf")
        if settings.session_rate > 0:
            if state.session_bucket is None:
                state.session_bucket = TokenBucket(
                    settings.session_rate, settings.session_burst, now
                )
            wait = state.session_bucket.take(now)
            if wait > 0.0:
                return wait
        state.sessions += 1
        return None

    def session_ended(self, key: str) -> None:
        """One session created under *key* (after :meth:`session_refusal` said None) ended."""
        state = self._states.get(key)
        if state is not None and state.sessions > 0:
            state.sessions -= 1

    def join_wait(self, key: str, now: float) -> float:
        """Take a join token for *key*: 0.0 if taken, else the seconds until one is free."""
        settings = self.settings
        if settings.join_rate <= 0:
            return 0.0
        state = self._state(key)
        if state.join_bucket is None:
            state.join_bucket = TokenBucket(settings.join_rate, settings.join_burst, now)
        return state.join_bucket.take(now)

    def prune(self, now: float) -> None:
        """Forget addresses with no live session whose buckets have filled up again."""
        idle = [
            key
            for key, state in self._states.items()
            if state.sessions == 0
            and _full(state.session_bucket, now)
            and _full(state.join_bucket, now)
        ]
        for key in idle:
            del self._states[key]

    def _state(self, key: str) -> _AddressState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _AddressState()
        return state


def _full(bucket: Optional[TokenBucket], now: float) -> bool:
    if bucket is None:
        return True
    return bucket.tokens + (now - bucket.stamp) * bucket.rate >= bucket.burst


class FdBudget:
    """The router's open descriptors against its open-file limit: one per router process.

    What is in use has three parts:

    - **client sockets**, accepted or being refused, from ``connection_made`` to
      ``connection_lost`` (:meth:`socket_opened` / :meth:`socket_closed`);
    - **shard descriptors** (``SHARD_FDS`` per running shard, kept up to date by the shard
      pool in :attr:`shard_fds`); what all shards hold when they all run
      (:attr:`shard_fds_set_aside`) stays set aside even while one is dead, so that its
      restart finds its descriptors free;
    - **the rest** (stdio, the loop's selector and wake-up pipe, the listeners, the
      resource tracker...), measured by :meth:`reconcile` from the real descriptor table
      (run in the periodic sweep, not per accept).

    A new connection is admitted only while, with it, ``reserve`` descriptors stay free
    (:meth:`has_room`): the reserve covers sockets asyncio accepted but the router has not
    refused yet, one shard start and some spare (``FD_RESERVE`` in common/limits.py).
    Without a limit (Windows, ``RLIM_INFINITY``) everything fits; ``--max-connections``
    is then the only cap.
    """

    def __init__(
        self,
        limit: Optional[int],
        reserve: int = L.FD_RESERVE,
        counter: Callable[[], Optional[int]] = count_open_descriptors,
    ) -> None:
        self.limit = limit
        self.reserve = reserve
        self._counter = counter
        self.sockets = 0
        self.shard_fds = 0
        self.shard_fds_set_aside = 0
        self.other = 0
        self._next_recount = 0.0

    @property
    def in_use(self) -> int:
        """Descriptors open now (as of the last recount, plus the sockets since)."""
        return self.sockets + self.shard_fds + self.other

    @property
    def committed(self) -> int:
        """In use, with every shard's descriptors counted whether it runs or not."""
        return self.sockets + max(self.shard_fds, self.shard_fds_set_aside) + self.other

    def has_room(self) -> bool:
        """True if the sockets open now (the newest included) leave the reserve free."""
        return self.limit is None or self.committed + self.reserve <= self.limit

    def capacity(self) -> Optional[int]:
        """How many client sockets fit at once beside everything else; None: no limit."""
        if self.limit is None:
            return None
        fixed = max(self.shard_fds, self.shard_fds_set_aside) + self.other
        return max(0, self.limit - self.reserve - fixed)

    def socket_opened(self) -> None:
        self.sockets += 1

    def socket_closed(self) -> None:
        self.sockets -= 1

    def sweep(self, now: float) -> None:
        """Called about once a second (*now*: the loop's clock): :meth:`reconcile` when
        due. A recount reads the whole table on the loop (about 1 ms per 1000 descriptors
        on Linux), so it runs every call only near the limit (less than twice the reserve
        to spare), otherwise every ``FD_RECOUNT_INTERVAL`` seconds."""
        if self.limit is None:
            return
        near = self.limit - self.committed < 2 * self.reserve
        if near or now >= self._next_recount:
            self.reconcile()
            self._next_recount = now + L.FD_RECOUNT_INTERVAL

    def reconcile(self) -> None:
        """Recount the real descriptor table: whatever is not a client socket or a shard's
        becomes :attr:`other`. A no-op where the table cannot be read."""
        real = self._counter()
        if real is not None:
            self.other = max(0, real - self.sockets - self.shard_fds)


class ConnectionLimiter:
    """Counts open client connections (TCP and HTTP together), in total and per IP, inside
    the descriptor budget :attr:`fds`.

    The transports call :meth:`open` for every socket they are handed and :meth:`close`
    when it is gone, refused or not: a refused socket holds a descriptor too."""

    def __init__(self, max_total: int, max_per_ip: int, fds: Optional[FdBudget] = None) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.fds = fds if fds is not None else FdBudget(None)
        self.total = 0
        self.refused = 0  # since start, for /healthz
        self._per_ip: Dict[str, int] = {}
        #: Addresses the per-IP cap does not apply to (trusted proxies: they carry many
        #: clients, each counted by its own address where it matters).
        self.uncapped: Callable[[str], bool] = lambda ip: False

    def open(self, ip: str) -> bool:
        """A socket from *ip* was accepted: count its descriptor, and return True if it may
        be served, False if it must be refused (over a cap, or no descriptors to spare)."""
        self.fds.socket_opened()
        if self.acquire(ip):
            return True
        self.refused += 1
        return False

    def close(self, ip: str, admitted: bool) -> None:
        """The socket of one :meth:`open` is closed; *admitted* is what :meth:`open` said."""
        self.fds.socket_closed()
        if admitted:
            self.release(ip)

    def acquire(self, ip: str) -> bool:
        """Count a new connection from *ip*; False (and nothing counted) if over a cap."""
        count = self._per_ip.get(ip, 0)
        if self.total >= self.max_total or (count >= self.max_per_ip and not self.uncapped(ip)):
            # (ip is the per-address limits' key: uncapped() must judge keys, not addresses)
            return False
        if not self.fds.has_room():
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


def close_refused(transport: asyncio.Transport, reply: bytes) -> None:
    """Refuse a connection at once: write *reply* without waiting, end it with a FIN, drop
    what the peer has already sent, and close, all in this call: no timer, no lingering;
    the descriptor is released in the next loop turn. Closing over unread input resets the
    connection, which can destroy the reply before the peer reads it: the FIN goes first
    (a reset after it no longer hides the reply) and the waiting input is read away. A peer
    that is already gone is a debug line, not an error."""
    transport.write(reply)  # a fresh socket's send buffer takes it whole; never blocks
    if not transport.can_write_eof():  # TLS: no half-close, and the socket is TLS's
        transport.close()  # the reply goes out, then close_notify
        return
    try:
        transport.write_eof()
    except OSError as error:  # ENOTCONN: the peer is gone already
        log.debug("refused connection: %s", error)
    _discard_received(transport)
    transport.abort()  # like close() once the reply is out; drops it if the peer stalls


def _discard_received(transport: asyncio.BaseTransport) -> None:
    """Read and drop (non-blocking) what is waiting in *transport*'s socket."""
    wrapped = transport.get_extra_info("socket")
    if wrapped is None:
        return
    # asyncio's socket wrapper has no recv(): a socket object on the same descriptor reads
    # it, and is detached afterwards so that it never closes the descriptor.
    raw: Optional[socket.socket] = None
    try:
        raw = socket.socket(fileno=wrapped.fileno())
        raw.setblocking(False)
        for _ in range(4):  # bounded: a peer cannot keep this loop turn busy
            if not raw.recv(65536):
                break
    except BlockingIOError:
        pass  # nothing (more) waiting
    except OSError as error:  # the peer is gone already (ECONNRESET, ENOTCONN...)
        log.debug("refused connection: %s", error)
    finally:
        if raw is not None:
            raw.detach()


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
