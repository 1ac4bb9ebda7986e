"""One helper module for starting a real cluster and talking to it (tests and tools).

:class:`Cluster` runs ``scripts/start_cluster.py`` as a real subprocess on free ports
(``--tcp-port 0 --http-port 0``), reads the ports it logs, and stops it. :class:`LineClient`
is a small blocking line-protocol client with timeouts, for tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
START_CLUSTER = ROOT / "scripts" / "start_cluster.py"
_LISTENING = re.compile(r"listening (tcp|http) (\S+):(\d+)")


class Cluster:
    """A cluster subprocess. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    Its stderr is collected in :attr:`log_lines` (read by a thread, so the pipe never
    fills up).
    """

    def __init__(
        self,
        shards: int = 2,
        start_method: str = "spawn",
        extra_args: Optional[List[str]] = None,
        tcp_port: int = 0,
        http_port: int = 0,
    ) -> None:
        self.args = [
            sys.executable,
            str(START_CLUSTER),
            "--tcp-port",
            str(tcp_port),
            "--http-port",
            str(http_port),
            "--shards",
            str(shards),
            "--start-method",
            start_method,
            "--log-level",
            "INFO",
            *(extra_args or []),
        ]
        self.proc: Optional[subprocess.Popen[str]] = None
        self.log_lines: List[str] = []
        self.ports: Dict[str, int] = {}
        self.host = "127.0.0.1"
        self._ready = threading.Event()
        self._reader: Optional[threading.Thread] = None

    @property
    def tcp_port(self) -> int:
        return self.ports["tcp"]

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def start(self, timeout: float = 20.0) -> Cluster:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"cluster did not start in {timeout}s:\n{self.log}")
        if "tcp" not in self.ports:
            self.stop()
            raise RuntimeError(f"cluster exited before listening:\n{self.log}")
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log_lines.append(line)
            match = _LISTENING.search(line)
            if match:
                self.ports[match.group(1)] = int(match.group(3))
                if "tcp" in self.ports and "http" in self.ports:
                    self._ready.set()
        self._ready.set()  # exited: unblock start()

    def shard_pids(self) -> List[int]:
        """PIDs of the shard processes, from the router's startup log line."""
        for line in self.log_lines:
            match = re.search(r"started \d+ shard processes \(pids \[([\d, ]+)\]\)", line)
            if match:
                return [int(pid) for pid in match.group(1).split(",")]
        return []

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches *pattern* (regex); return it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in {timeout}s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
        """Send *sig* and wait; kill if needed. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def connect(self, timeout: float = 5.0) -> LineClient:
        return LineClient(self.host, self.tcp_port, timeout=timeout)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LineClient:
    """A blocking line-protocol client for tests. Reads the welcome line on connect."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, welcome: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buffer = b""
        if welcome:
            line = self.readline()
            assert line.startswith("INFO "), line

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self, timeout: Optional[float] = None) -> str:
        """The next line without its LF. Raises ``socket.timeout`` or ``EOFError``."""
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def expect(self, expected: str, timeout: Optional[float] = None) -> str:
        """Read one line and assert it equals *expected*."""
        line = self.readline(timeout)
        assert line == expected, f"expected {expected!r}, got {line!r}"
        return line

    def read_until(self, predicate, timeout: Optional[float] = None) -> List[str]:  # noqa: ANN001
        """Read lines until one satisfies *predicate*; return all of them."""
        lines = []
        while True:
            line = self.readline(timeout)
            lines.append(line)
            if predicate(line):
                return lines

    def no_line(self, wait: float = 0.3) -> None:
        """Assert nothing arrives within *wait* seconds."""
        try:
            line = self.readline(wait)
        except (socket.timeout, TimeoutError):
            return
        raise AssertionError(f"unexpected line {line!r}")

    def join(self, room: str, username: str) -> None:
        self.send(f"JOIN {room} {username}")
        self.expect(f"INFO joined room {room}")

    def read_all_until_closed(self, timeout: float = 5.0) -> List[str]:
        """Every line until the server closes the connection."""
        lines = []
        while True:
            try:
                lines.append(self.readline(timeout))
            except EOFError:
                return lines

    def close(self) -> None:
        self.sock.close()
