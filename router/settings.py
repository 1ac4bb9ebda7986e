"""Everything a router can be told, in one immutable object: where it listens, how many
processes it runs, every tunable limit and timeout.

Built once from the command line (:mod:`router.cli`) and handed down: the router gives it
to the hub, and every transport reads it from the hub. Nothing reads a tunable from a
module constant, so a test builds the :class:`Settings` it needs
(``Settings(http_request_timeout=0.3)``) instead of patching modules. The defaults come
from :mod:`common.limits`, where each one's reason is written down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from common import limits as L
from common.redis_spec import RedisSpec
from router.http_hosts import AllowedHosts
from router.proxies import TrustedProxies


def default_shard_count() -> int:
    """The CPU count, but at least ``MIN_DEFAULT_SHARDS``."""
    return max(L.MIN_DEFAULT_SHARDS, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    """One router's settings. A rate of 0 turns that token bucket off; ports may be 0 (any
    free port); ``http_port`` None means no HTTP listener."""

    # --- where and how ---------------------------------------------------------------
    host: str = "127.0.0.1"
    tcp_port: int = 5000
    http_port: Optional[int] = 8000
    shards: int = 0  # 0: default_shard_count()
    routers: int = 1  # router processes (--routers); more than 1: a tier (router/tier.py)
    log_level: str = "INFO"
    start_method: str = "spawn"
    pipe_io: str = ""  # "selector" or "threads"; "": the platform's default (router.pipes)
    #: Hosts HTTP requests may name (``--allowed-hosts``); None: the default for ``host``.
    allowed_hosts: Optional[AllowedHosts] = None
    crash_shard: Optional[int] = None  # fault injection for tests: this shard dies at start
    #: Where the shards keep room history (``--data-dir``); None: in memory only
    #: (``--in-memory``). The command line's default is ``shardchat-data``; a Settings built
    #: in code keeps nothing unless told.
    data_dir: Optional[str] = None
    #: ``--redis``: the Redis this node shares its rooms through (then no data_dir).
    redis: Optional[RedisSpec] = None
    redis_wait: float = 0.0  # --redis-wait: seconds to wait for Redis at start
    #: ``--tls-cert`` / ``--tls-key``: both listeners speak TLS only (router/tls.py).
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    #: ``--trusted-proxy``: peers believed about the client behind them (router/proxies.py).
    trusted_proxies: TrustedProxies = TrustedProxies()

    # --- per client: flood, output, timers, caps -----------------------------------------
    rate_limit: float = L.RATE_LIMIT
    rate_burst: int = L.RATE_BURST
    flood_penalty: float = L.FLOOD_PENALTY_SECONDS
    out_hard: int = L.OUTPUT_HARD_LIMIT
    out_soft: int = L.OUTPUT_SOFT_LIMIT
    out_soft_seconds: float = L.OUTPUT_SOFT_SECONDS
    output_pause: int = L.OUTPUT_PAUSE_BYTES
    slow_consumer_close_grace: float = L.SLOW_CONSUMER_CLOSE_GRACE
    idle_ping: float = L.IDLE_PING_SECONDS
    ping_timeout: float = L.PING_TIMEOUT_SECONDS
    join_timeout: float = L.JOIN_TIMEOUT_SECONDS
    tls_handshake_timeout: float = L.TLS_HANDSHAKE_TIMEOUT
    max_connections: int = L.MAX_CONNECTIONS
    max_connections_per_ip: int = L.MAX_CONNECTIONS_PER_IP

    # --- everyone together, and per address ------------------------------------------
    output_budget_total: int = L.OUTPUT_BUDGET_TOTAL
    output_budget_per_address: int = L.OUTPUT_BUDGET_PER_ADDRESS
    max_sessions: int = L.MAX_HTTP_SESSIONS
    max_sessions_per_address: int = L.MAX_SESSIONS_PER_ADDRESS
    session_rate: float = L.SESSION_RATE
    session_burst: int = L.SESSION_BURST
    join_rate: float = L.JOIN_RATE
    join_burst: int = L.JOIN_BURST
    max_rooms_per_address: int = L.MAX_ROOMS_PER_ADDRESS

    # --- requests to shards --------------------------------------------------------------
    request_timeout: float = L.REQUEST_TIMEOUT
    deadline_grace: float = L.DEADLINE_GRACE
    drop_timeout: float = L.DROP_TIMEOUT

    # --- HTTP ----------------------------------------------------------------------------
    http_request_timeout: float = L.HTTP_REQUEST_TIMEOUT
    http_keepalive_idle: float = L.HTTP_KEEPALIVE_IDLE
    http_linger: float = L.HTTP_LINGER
    poll_timeout: float = L.POLL_TIMEOUT
    poll_max_bytes: int = L.MAX_POLL_ANSWER_BYTES
    session_ttl: float = L.SESSION_TTL

    def shard_count(self) -> int:
        return self.shards or default_shard_count()

    def http_hosts(self) -> AllowedHosts:
        """The allowed hosts in force: ``--allowed-hosts``, else the default for ``host``
        (see :meth:`AllowedHosts.default_for`)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return AllowedHosts.default_for(self.host)
