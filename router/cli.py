"""Command line of the cluster: ``start_cluster.py`` / ``shardchat-server``."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
from typing import List, Optional

from common.limits import MAX_SHARDS
from router.app import Config, default_shard_count, run


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
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        tcp_port=args.tcp_port,
        http_port=args.http_port,
        shards=args.shards,
        log_level=args.log_level,
        start_method=args.start_method,
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
