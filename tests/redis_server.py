"""A real ``redis-server`` for the tests: started on a free loopback port, stopped after.

Locally a missing ``redis-server`` binary (Debian's ``redis-server`` package) or a missing
redis-py (``pip install -e ".[test]"`` installs it) skips the tests that need it, saying
why; under ``CI=true`` it fails them, so a CI machine without Redis cannot pass by running
nothing (``.ci/run`` installs the package).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BINARY = shutil.which("redis-server")


def _missing() -> Optional[str]:
    if BINARY is None:
        return "no redis-server on PATH (apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return 'redis-py is not installed (python -m pip install -e ".[test]")'
    return None


MISSING = _missing()


def need_redis() -> None:
    """Skip (locally) or fail (in CI) the calling test when Redis cannot be run here."""
    if MISSING is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run the Redis tests: {MISSING}")
    pytest.skip(f"Redis tests need redis-server and redis-py: {MISSING}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, no persistence, in its own directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="shardchat-redis-"))
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self._log = open(self.dir / "redis.log", "wb")  # noqa: SIM115 (closed in close())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int = 0) -> None:
        """Start on *port* (a free one when 0); wait until it answers."""
        assert BINARY is not None
        for _attempt in range(5):
            self.port = port or _free_port()
            self.process = subprocess.Popen(
                [
                    BINARY,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=self._log,
            )
            if self._answers():
                return
            self.stop()
            if port:
                break
        raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}")

    def _answers(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_server() -> Iterator[RedisServer]:
    """The body of a fixture: a started server, closed afterwards."""
    need_redis()
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
