"""One helper module for starting a real cluster and talking to it (tests and tools).

:class:`Cluster` runs ``scripts/start_cluster.py`` as a real subprocess on free ports
(``--tcp-port 0 --http-port 0``), reads the ports it logs, and stops it. :class:`LineClient`
is a small blocking line-protocol client with timeouts, for tests. The process helpers at
the end (:func:`pid_alive`, :func:`child_pids`, :func:`wait_gone`, :meth:`Cluster.marked_pids`)
read ``/proc`` and so work on Linux only; tests that need them skip elsewhere.
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
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
START_CLUSTER = ROOT / "scripts" / "start_cluster.py"
_LISTENING = re.compile(r"listening (tcp|http) (\S+):(\d+)")
#: Environment variable set (to a value unique per :class:`Cluster`) in the cluster's
#: environment; every process it starts inherits it, so :meth:`Cluster.marked_pids` finds
#: them all, even after the router died and they were re-parented.
MARKER_ENV = "SHARDCHAT_TEST_CLUSTER"
PROC = Path("/proc")


class Cluster:
    """A cluster subprocess. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    Its stderr is collected in :attr:`log_lines` (read by a thread, so the pipe never
    fills up). With *new_session* the router leads its own process group, so a test can
    signal the whole group the way a terminal's Ctrl+C does (:meth:`signal_group`). With
    *fd_limit* (POSIX) the cluster runs under ``RLIMIT_NOFILE`` = *fd_limit* for both the
    soft and the hard limit (so the router cannot raise it), like ``ulimit -n``.
    """

    def __init__(
        self,
        shards: int = 2,
        start_method: str = "spawn",
        extra_args: Optional[List[str]] = None,
        tcp_port: int = 0,
        http_port: int = 0,
        new_session: bool = False,
        fd_limit: Optional[int] = None,
        data_dir: Optional[Path] = None,
        file_size_limit: Optional[int] = None,
        redis: Optional[str] = None,
    ) -> None:
        # History in *data_dir* (real files), or shared through *redis* (a URL), else in
        # memory: a test never writes into the checkout's shardchat-data.
        if redis is not None:
            history = ["--redis", redis]
        elif data_dir is not None:
            history = ["--data-dir", str(data_dir)]
        else:
            history = ["--in-memory"]
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
            *history,
            *(extra_args or []),
        ]
        self.proc: Optional[subprocess.Popen[str]] = None
        self.log_lines: List[str] = []
        self.ports: Dict[str, int] = {}
        self.host = "127.0.0.1"
        self.marker = uuid.uuid4().hex
        self.new_session = new_session
        self.fd_limit = fd_limit
        self.file_size_limit = file_size_limit
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

    @property
    def env(self) -> Dict[str, str]:
        """The environment the cluster runs with (this one plus :data:`MARKER_ENV`)."""
        return dict(os.environ, PYTHONUNBUFFERED="1", **{MARKER_ENV: self.marker})

    def start(self, timeout: float = 20.0) -> Cluster:
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=str(ROOT),
            start_new_session=self.new_session,
            preexec_fn=_limits(self.fd_limit, self.file_size_limit),
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

    def marked_pids(self) -> List[int]:
        """Live processes started by this cluster (router, shards, helpers such as the
        ``multiprocessing`` resource tracker), found by :data:`MARKER_ENV`. Linux only."""
        needle = f"{MARKER_ENV}={self.marker}".encode()
        found = []
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue  # gone, or not ours to read
            if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def signal_group(self, sig: int) -> None:
        """Send *sig* to the cluster's whole process group (needs ``new_session=True``)."""
        assert self.proc is not None and self.new_session
        os.killpg(self.proc.pid, sig)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until a log line matches *pattern* (regex); return it. With *since* (a
        :meth:`log_mark`), only lines logged after that mark count."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.log_lines)[since:]:
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r} in {timeout}s:\n{self.log}")

    def log_mark(self) -> int:
        """Where the log is now: pass it as ``since`` to wait for a line logged later."""
        return len(self.log_lines)

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


def limit_open_files(limit: int) -> Callable[[], None]:
    """A ``preexec_fn`` that sets the child's open-file limit (soft and hard) to *limit*."""

    def preexec() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return preexec


def _limits(
    fd_limit: Optional[int], file_size_limit: Optional[int]
) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` for the limits asked for (None if none): the open-file limit as
    :func:`limit_open_files`, and the soft limit on the size of a file the cluster writes
    (``RLIMIT_FSIZE``; the hard limit stays, so a test can raise it again with
    ``resource.prlimit``). Writing past it fails with ``EFBIG`` (Python ignores
    ``SIGXFSZ``)."""
    if fd_limit is None and file_size_limit is None:
        return None

    def preexec() -> None:
        import resource

        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
        if file_size_limit is not None:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, hard))

    return preexec


def open_fd_count(pid: int) -> int:
    """How many descriptors process *pid* has open (Linux: from /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


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

    def half_close(self) -> None:
        """Send end-of-file (``shutdown(SHUT_WR)``) but keep reading, as ``nc -N`` does."""
        self.sock.shutdown(socket.SHUT_WR)

    def read_lines(self, count: int, timeout: Optional[float] = None) -> List[str]:
        """The next *count* lines."""
        return [self.readline(timeout) for _ in range(count)]

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
        except (socket.timeout, TimeoutError, BlockingIOError):  # BlockingIOError: wait=0
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


# --- processes (Linux /proc) -------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if process *pid* exists and is not a zombie (an exited child nobody reaped)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def child_pids(pid: int) -> List[int]:
    """Live direct children of process *pid*."""
    children = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return children


def wait_gone(pids: Iterable[int], timeout: float) -> List[int]:
    """Wait up to *timeout* seconds for every process in *pids* to end; return those still
    alive (an empty list when all are gone)."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def router_rss_kb(cluster: Cluster) -> int:
    """The router process's resident memory in KiB (Linux: from /proc)."""
    assert cluster.proc is not None
    with open(f"/proc/{cluster.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")
