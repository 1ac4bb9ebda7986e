"""Command line of the cluster: ``start_cluster.py`` / ``shardchat-server``."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from typing import List, Optional

from common.limits import MAX_SHARDS, POLL_TIMEOUT, SESSION_TTL
from router.app import Config, default_shard_count, run
from router.policy import Settings


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="start_cluster.py",
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
    _add_limit_flags(parser)
    return parser


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the per-client limits (defaults and reasons: common/limits.py)."""
    d = Settings()
    group = parser.add_argument_group("limits (see docs/LIMITS.md)")
    group.add_argument(
        "--rate-limit",
        type=float,
        default=d.rate_limit,
        metavar="N",
        help=f"commands per second per client (default {d.rate_limit:g}; 0 turns flood "
        "control off, e.g. for benchmarks)",
    )
    group.add_argument(
        "--rate-burst",
        type=int,
        default=d.rate_burst,
        metavar="N",
        help=f"commands a client may send at once (default {d.rate_burst})",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        metavar="N",
        help=f"open connections in total (default {d.max_connections})",
    )
    group.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=d.max_connections_per_ip,
        metavar="N",
        help=f"open connections per IP address (default {d.max_connections_per_ip})",
    )
    group.add_argument(
        "--output-hard-limit",
        type=int,
        default=d.out_hard,
        metavar="BYTES",
        help=f"unread bytes that cut a slow client off at once (default {d.out_hard})",
    )
    group.add_argument(
        "--output-soft-limit",
        type=int,
        default=d.out_soft,
        metavar="BYTES",
        help=f"unread bytes a client may hold for --output-soft-seconds (default {d.out_soft})",
    )
    group.add_argument(
        "--output-soft-seconds",
        type=float,
        default=d.out_soft_seconds,
        metavar="S",
        help=f"(default {d.out_soft_seconds:g})",
    )
    group.add_argument(
        "--idle-ping",
        type=float,
        default=d.idle_ping,
        metavar="S",
        help=f"seconds of silence before the server PINGs a TCP client (default {d.idle_ping:g})",
    )
    group.add_argument(
        "--ping-timeout",
        type=float,
        default=d.ping_timeout,
        metavar="S",
        help=f"seconds after a PING before a silent client is closed (default {d.ping_timeout:g})",
    )
    group.add_argument(
        "--join-timeout",
        type=float,
        default=d.join_timeout,
        metavar="S",
        help=f"seconds a TCP client may stay without joining a room (default {d.join_timeout:g})",
    )
    http = parser.add_argument_group("HTTP sessions")
    http.add_argument(
        "--poll-timeout",
        type=float,
        default=POLL_TIMEOUT,
        metavar="S",
        help=f"seconds a long poll waits for news (default {POLL_TIMEOUT:g})",
    )
    http.add_argument(
        "--session-ttl",
        type=float,
        default=SESSION_TTL,
        metavar="S",
        help=f"seconds a browser session lives without a request (default {SESSION_TTL:g})",
    )
    # Fault injection for the supervision tests: this shard exits as soon as it starts.
    parser.add_argument("--fault-crash-shard", type=int, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        out_hard=args.output_hard_limit,
        out_soft=args.output_soft_limit,
        out_soft_seconds=args.output_soft_seconds,
        idle_ping=args.idle_ping,
        ping_timeout=args.ping_timeout,
        join_timeout=args.join_timeout,
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        tcp_port=args.tcp_port,
        http_port=args.http_port,
        shards=args.shards,
        log_level=args.log_level,
        start_method=args.start_method,
        crash_shard=args.fault_crash_shard,
        settings=settings_from_args(args),
        poll_timeout=args.poll_timeout,
        session_ttl=args.session_ttl,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Parse *argv*, run the cluster until SIGINT/SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s router %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return run(config_from_args(args))
