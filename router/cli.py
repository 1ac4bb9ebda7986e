"""Command line of the cluster: ``start_cluster.py`` / ``shardchat-server``."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from typing import Any, Callable, List, Optional

from common.limits import MAX_ROUTERS, MAX_SHARDS, MAX_TIER_CHILDREN_WINDOWS, PRESENCE_SECONDS
from common.proctitle import set_process_name
from common.redis_spec import make_spec
from router.app import run
from router.http_hosts import AllowedHosts
from router.proxies import PROXY_HEADERS, TrustedProxies
from router.settings import Settings, default_shard_count
from router.tier import LISTENER_MODES, default_listener_mode, run_supervisor

#: Where history is kept unless ``--data-dir`` or ``--in-memory`` says otherwise (relative
#: to the working directory).
DEFAULT_DATA_DIR = "shardchat-data"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _shards(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"shards must be 1-{MAX_SHARDS}, got {count}")
    return count


def _routers(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_ROUTERS:
        raise argparse.ArgumentTypeError(f"routers must be 1-{MAX_ROUTERS}, got {count}")
    return count


def tier_problem(routers: int, shards: int, platform: str = sys.platform) -> Optional[str]:
    """Why a tier of *routers* routers and *shards* shards cannot run on *platform*, or
    None: on Windows its supervisor waits on two handles per child in one call."""
    if platform == "win32" and routers > 1 and routers + shards > MAX_TIER_CHILDREN_WINDOWS:
        return (
            f"on Windows --routers plus --shards must be at most {MAX_TIER_CHILDREN_WINDOWS}"
            f" with several routers, got {routers} + {shards}"
        )
    return None


def _allowed_hosts(text: str) -> AllowedHosts:
    try:
        return AllowedHosts.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _trusted_proxies(text: str) -> TrustedProxies:
    try:
        return TrustedProxies.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        # the name it was started by: start_cluster.py, or the shardchat-server script
        prog=os.path.basename(sys.argv[0]) or "start_cluster.py",
        description="Start a shardchat cluster: one router process and N shard processes.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; use --host 0.0.0.0 to accept "
        "connections from other machines)",
    )
    parser.add_argument(
        "--tcp-port", type=_port, default=5000, help="line-protocol port (default 5000; 0: any)"
    )
    parser.add_argument(
        "--http-port",
        type=_port,
        default=8000,
        help="HTTP port for the browser UI and JSON API (default 8000; 0: any)",
    )
    parser.add_argument(
        "--shards",
        type=_shards,
        default=default_shard_count(),
        help=f"number of shard processes (default: CPU count, at least 2; now "
        f"{default_shard_count()})",
    )
    parser.add_argument(
        "--routers",
        type=_routers,
        default=1,
        help=f"number of router processes accepting on the same ports (default 1; at most "
        f"{MAX_ROUTERS}); more than one: a supervisor starts them, see docs/ARCHITECTURE.md",
    )
    parser.add_argument(
        "--listener",
        choices=LISTENER_MODES,
        default=default_listener_mode(),
        help="how several routers share a port: reuseport (each binds it with SO_REUSEPORT "
        "and the kernel balances; the default on Linux) or shared (one socket they all "
        f"accept on; the default elsewhere; now {default_listener_mode()})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (default INFO)",
    )
    parser.add_argument(
        "--start-method",
        default="spawn",
        choices=multiprocessing.get_all_start_methods(),
        help="how shard processes are started (default spawn, which works everywhere)",
    )
    tls = parser.add_argument_group("TLS (both listeners; see docs/DEPLOY.md)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate chain: the line-protocol and HTTP ports speak TLS only "
        "(TLS 1.2+); SIGHUP reloads it",
    )
    tls.add_argument(
        "--tls-key", metavar="FILE", help="PEM private key of --tls-cert (default: in it)"
    )
    parser.add_argument(
        "--trusted-proxy",
        type=_trusted_proxies,
        default=TrustedProxies(),
        metavar="CIDR[,CIDR...]",
        help="reverse proxies whose word on the client is believed: from them HTTP takes the "
        "client from Forwarded / X-Forwarded-For (and https from X-Forwarded-Proto) and the "
        "line protocol takes a PROXY protocol header (v1 or v2; on TLS ports, before TLS, on both "
        "listeners); every per-address limit then counts "
        "the real client (default: none)",
    )
    parser.add_argument(
        "--proxy-header",
        choices=PROXY_HEADERS,
        default=PROXY_HEADERS[0],
        help="the one header a --trusted-proxy names HTTP clients in (default "
        "x-forwarded-for, with X-Forwarded-Proto; or forwarded, RFC 7239): the other is "
        "the client's to fake",
    )
    history = parser.add_mutually_exclusive_group()
    history.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"where room history is kept, in SQLite files (default {DEFAULT_DATA_DIR} in "
        "the working directory; created if missing)",
    )
    history.add_argument(
        "--in-memory",
        action="store_true",
        help="keep history in memory only: it is lost when a shard or the cluster stops",
    )
    history.add_argument(
        "--redis",
        metavar="URL",
        help="share rooms (members, history, messages) with every node on this Redis: "
        "redis://HOST:PORT/DB or rediss:// (TLS); a password in the URL or from "
        'SHARDCHAT_REDIS_PASSWORD. Needs pip install "shardchat[redis]" (docs/DEPLOY.md)',
    )
    parser.add_argument(
        "--redis-wait",
        type=_number(float, 0, "--redis-wait"),
        default=0.0,
        metavar="SECONDS",
        help="with --redis: wait this long for Redis to answer at start (default 0)",
    )
    parser.add_argument(
        "--redis-presence",
        type=_number(float, 1, "--redis-presence"),
        default=PRESENCE_SECONDS,
        metavar="SECONDS",
        help="with --redis: a node that stops has its members removed this long after "
        f"(default {PRESENCE_SECONDS:g}; docs/LIMITS.md)",
    )
    _add_limit_flags(parser)
    return parser


def _number(kind: type, low: float, what: str) -> Callable[[str], Any]:
    """An argparse type: *kind* (int or float) of at least *low*, refused in the user's
    words otherwise (``--rate-burst 0``: "must be at least 1, got 0")."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):  # nan, inf
            raise argparse.ArgumentTypeError(f"{what} must be a finite number, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be at least {low:g}, got {text}")
        return value

    return parse


RATE = _number(float, 0, "a rate")  # 0 turns that bucket off
COUNT = _number(int, 1, "a count")
BYTES = _number(int, 1, "a size in bytes")
SECONDS = _number(float, 0.01, "a duration in seconds")

#: The limit flags: (flag, Settings field, type, metavar, help). Defaults and reasons live
#: in common/limits.py; the help shows the default.
LIMIT_FLAGS = [
    ("--rate-limit", "rate_limit", RATE, "N",
     "commands per second per client; 0 turns flood control off, e.g. for benchmarks"),
    ("--rate-burst", "rate_burst", COUNT, "N", "commands a client may send at once"),
    ("--max-connections", "max_connections", COUNT, "N", "open connections in total"),
    ("--max-connections-per-ip", "max_connections_per_ip", COUNT, "N",
     "open connections per address (IPv4 address or IPv6 /64)"),
    ("--output-hard-limit", "out_hard", BYTES, "BYTES",
     "unread bytes that cut a slow client off at once"),
    ("--output-soft-limit", "out_soft", BYTES, "BYTES",
     "unread bytes a client may hold for --output-soft-seconds"),
    ("--output-soft-seconds", "out_soft_seconds", SECONDS, "S",
     "seconds a client may stay over --output-soft-limit"),
    ("--output-pause-bytes", "output_pause", BYTES, "BYTES",
     "unread bytes past which a client's next command waits until it reads"),
    ("--output-budget", "output_budget_total", BYTES, "BYTES",
     "unread bytes of all clients together; past it the biggest are cut off"),
    ("--output-budget-per-address", "output_budget_per_address", BYTES, "BYTES",
     "unread bytes of one address's clients together; past it its biggest are cut off"),
    ("--max-sessions", "max_sessions", COUNT, "N", "browser sessions in total"),
    ("--max-sessions-per-address", "max_sessions_per_address", COUNT, "N",
     "live browser sessions created from one address"),
    ("--max-rooms-per-address", "max_rooms_per_address", COUNT, "N",
     "rooms the clients of one address may be in together"),
    ("--session-rate", "session_rate", RATE, "N",
     "browser sessions one address may create per second; 0: no limit"),
    ("--session-burst", "session_burst", COUNT, "N",
     "browser sessions one address may create at once"),
    ("--join-rate", "join_rate", RATE, "N",
     "joins per second per address (TCP and HTTP together); 0: no limit"),
    ("--join-burst", "join_burst", COUNT, "N", "joins one address may make at once"),
    ("--poll-max-bytes", "poll_max_bytes", BYTES, "BYTES",
     "about how many bytes of messages one poll answer carries at most"),
    ("--idle-ping", "idle_ping", SECONDS, "S",
     "seconds of silence before the server PINGs a TCP client"),
    ("--ping-timeout", "ping_timeout", SECONDS, "S",
     "seconds after a PING before a silent client is closed"),
    ("--join-timeout", "join_timeout", SECONDS, "S",
     "seconds a TCP client may stay without joining a room"),
    ("--tls-handshake-timeout", "tls_handshake_timeout", SECONDS, "S",
     "seconds a client has to finish its TLS handshake"),
]  # fmt: skip


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the per-client limits (defaults and reasons: common/limits.py)."""
    defaults = Settings()
    group = parser.add_argument_group("limits (see docs/LIMITS.md)")
    for flag, field, kind, metavar, text in LIMIT_FLAGS:
        default = getattr(defaults, field)
        group.add_argument(
            flag,
            dest=field,
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{text} (default {default})",
        )
    http = parser.add_argument_group("HTTP sessions")
    http.add_argument(
        "--poll-timeout",
        type=SECONDS,
        default=defaults.poll_timeout,
        metavar="S",
        help=f"seconds a long poll waits for news (default {defaults.poll_timeout:g})",
    )
    http.add_argument(
        "--session-ttl",
        type=SECONDS,
        default=defaults.session_ttl,
        metavar="S",
        help=f"seconds a browser session lives without a request (default "
        f"{defaults.session_ttl:g})",
    )
    http.add_argument(
        "--allowed-hosts",
        type=_allowed_hosts,
        default=None,
        metavar="HOST[,HOST...]",
        help="host names HTTP requests may name in Host (ports do not matter); others get "
        "421. Default: the --host address, localhost, 127.0.0.1 and ::1, and for --host "
        "0.0.0.0 or :: also this machine's hostname. '*' accepts any host and so turns off "
        "the protection against DNS rebinding",
    )
    parser.add_argument(
        "--pipe-io",
        choices=["selector", "threads"],
        default="",
        help="how the router talks to shard pipes: the loop's selector (POSIX default) or "
        "a reader and a writer thread per shard (Windows default)",
    )
    # Fault injection for the supervision tests: this shard exits as soon as it starts.
    parser.add_argument("--fault-crash-shard", type=int, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The one :class:`Settings` of a command line."""
    limits = {field: getattr(args, field) for _, field, *_ in LIMIT_FLAGS}
    return Settings(
        host=args.host,
        tcp_port=args.tcp_port,
        http_port=args.http_port,
        shards=args.shards,
        routers=args.routers,
        log_level=args.log_level,
        start_method=args.start_method,
        crash_shard=args.fault_crash_shard,
        pipe_io=args.pipe_io,
        poll_timeout=args.poll_timeout,
        session_ttl=args.session_ttl,
        allowed_hosts=args.allowed_hosts,
        data_dir=None if args.in_memory or args.redis else os.path.abspath(args.data_dir),
        redis=make_spec(args.redis, args.redis_presence) if args.redis else None,
        redis_wait=args.redis_wait,
        tls_cert=args.tls_cert,
        trusted_proxies=args.trusted_proxy.with_header(args.proxy_header),
        tls_key=args.tls_key,
        **limits,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Parse *argv*, run the cluster until SIGINT/SIGTERM; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    set_process_name("shardchat")  # the router, in `ps -e` and top (Linux)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s router %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # The lifecycle lines (listening on..., shards started/restarted, stopped) are printed
    # whatever the level: people and tools read the real ports from them.
    for name in ("router.app", "router.shards", "router.tier"):
        logger = logging.getLogger(name)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    try:
        settings = settings_from_args(args)
    except ValueError as error:  # a --redis URL that is not one
        parser.error(str(error))
    problem = tier_problem(settings.routers, settings.shard_count())
    if problem:
        parser.error(problem)
    if settings.routers > 1:
        return run_supervisor(settings, args.listener)
    return run(settings)
