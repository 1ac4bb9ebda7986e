#!/usr/bin/env python3
"""How much one hostile address can make the router hold: a benchmark, not a test.

Each scenario starts a fresh cluster (``scripts/start_cluster.py`` of the checkout given
with ``--root``, so an older checkout can be measured side by side), records the router's
resident memory, runs the abuse from loopback for ``--duration`` seconds and reports the
growth (peak RSS minus the RSS before), plus what the scenario checks on the side::

    python scripts/exhaustion_bench.py                       # every scenario, this checkout
    python scripts/exhaustion_bench.py --root /path/to/old --scenarios pipeline,history

Scenarios:

``pipeline``
    One HTTP connection pipelines ``GET /app.js`` without ever reading the answers.
``history``
    A room is filled with 500 messages of 2,000 characters; 40 TCP clients join it, each
    sends ``HISTORY <room>`` six times and never reads.
``poll``
    One browser session in 40 full rooms polls all of them with ``after=0`` from 8
    connections at once, again and again; a TCP client measures its PING round trip.
``sessions``
    One address creates browser sessions as fast as it can; then a client from another
    loopback address (127.0.0.2) joins. Reports sessions created and that join's status.

Linux only (RSS from ``/proc``). Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening (tcp|http) \S+:(\d+)")
TEXT = "x" * 1990


class Server:
    """A cluster subprocess of the checkout at *root*, with its ports and router pid."""

    def __init__(self, root: Path, extra: List[str]) -> None:
        argv = [sys.executable, str(root / "scripts" / "start_cluster.py"), "--tcp-port", "0"]
        argv += ["--http-port", "0", "--shards", "2", "--log-level", "INFO", *extra]
        if "--in-memory" in (root / "router" / "cli.py").read_text(encoding="utf-8"):
            argv.append("--in-memory")  # a checkout with durable history: keep none
        self.proc = subprocess.Popen(
            argv, cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.ports: Dict[str, int] = {}
        self.lines: List[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                match = _LISTENING.search(line)
                if match:
                    self.ports[match.group(1)] = int(match.group(2))
                    if len(self.ports) == 2:
                        ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(30) or len(self.ports) != 2:
            self.stop()
            raise RuntimeError("cluster did not start:\n" + "\n".join(self.lines))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def line_client(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    read_line(sock)  # welcome
    return sock


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError
        data += chunk
    return data.decode().rstrip("\n")


def read_until(sock: socket.socket, prefix: str) -> None:
    while not read_line(sock).startswith(prefix):
        pass


def sample_peak(server: Server, seconds: float, work: Optional[Callable[[], None]] = None) -> float:
    """Peak router RSS (MB) over *seconds*, calling *work* between samples."""
    peak = server.rss_mb()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if work is not None:
            work()
        time.sleep(0.1)
        peak = max(peak, server.rss_mb())
    return peak


def fill_room(port: int, room: str, count: int) -> None:
    talker = line_client(port)
    talker.sendall(f"JOIN {room} filler\n".encode())
    read_until(talker, "INFO joined")
    for start in range(0, count, 50):
        batch = min(50, count - start)
        talker.sendall(b"".join(f"MSG {room} {TEXT}\n".encode() for _ in range(batch)))
        for _ in range(batch):
            read_until(talker, "MSG ")
    talker.close()


# --- scenarios -----------------------------------------------------------------------------


def pipeline(server: Server, duration: float) -> Dict[str, object]:
    sock = socket.create_connection(("127.0.0.1", server.ports["http"]))
    sock.setblocking(False)
    request = b"GET /app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 64
    sent = [0]

    def push() -> None:
        try:
            for _ in range(50):
                sent[0] += sock.send(request)
        except BlockingIOError:
            pass  # the router stopped reading us: that is the point

    before = server.rss_mb()
    peak = sample_peak(server, duration, push)
    sock.close()
    return {"rss_growth_mb": round(peak - before, 1), "request_bytes_sent": sent[0]}


def history(server: Server, duration: float) -> Dict[str, object]:
    port = server.ports["tcp"]
    fill_room(port, "full", 500)
    readers = []
    for index in range(40):
        sock = line_client(port)
        sock.sendall(f"JOIN full reader{index}\n".encode())
        read_until(sock, "INFO joined")
        readers.append(sock)
    before = server.rss_mb()
    for sock in readers:
        sock.sendall(b"HISTORY full\n" * 6)  # and never reads
    peak = sample_peak(server, duration)
    for sock in readers:
        sock.close()
    return {"rss_growth_mb": round(peak - before, 1)}


def poll(server: Server, duration: float) -> Dict[str, object]:
    port, http_port = server.ports["tcp"], server.ports["http"]
    rooms = [f"p{index}" for index in range(40)]
    for room in rooms:
        fill_room(port, room, 500)
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
    cookie = ""
    for room in rooms:
        body = json.dumps({"room": room, "username": "poller"})
        headers = {"Content-Type": "application/json", "Cookie": cookie}
        conn.request("POST", "/api/join", body, headers)
        response = conn.getresponse()
        response.read()
        cookie = (response.getheader("Set-Cookie") or cookie).split(";")[0] or cookie
    query = "/api/poll?cursors=" + ",".join(f"{room}:0" for room in rooms)
    stop = threading.Event()
    answers: List[int] = []

    def poller() -> None:
        client = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        while not stop.is_set():
            try:
                client.request("GET", query, headers={"Cookie": cookie})
                answers.append(len(client.getresponse().read()))
            except (OSError, http.client.HTTPException):
                client = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)

    pinger = line_client(port)
    before = server.rss_mb()
    threads = [threading.Thread(target=poller, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    pings: List[float] = []

    def ping() -> None:
        start = time.monotonic()
        pinger.sendall(b"PING x\n")
        read_until(pinger, "PONG")
        pings.append((time.monotonic() - start) * 1000)

    peak = sample_peak(server, duration, ping)
    stop.set()
    for thread in threads:
        thread.join(35)
    return {
        "rss_growth_mb": round(peak - before, 1),
        "poll_answers": len(answers),
        "largest_answer_kb": round(max(answers, default=0) / 1024, 1),
        "ping_p50_ms": round(statistics.median(pings), 1) if pings else None,
        "ping_max_ms": round(max(pings), 1) if pings else None,
    }


def sessions(server: Server, duration: float) -> Dict[str, object]:
    http_port = server.ports["http"]
    created = refused = 0
    statuses: Dict[int, int] = {}
    end = time.monotonic() + duration
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    before = server.rss_mb()
    index = 0
    while time.monotonic() < end:
        index += 1
        body = json.dumps({"room": f"r{index % 20}", "username": f"u{index}"})
        try:
            conn.request("POST", "/api/join", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            continue
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status == 200:
            created += 1
        else:
            refused += 1
    growth = server.rss_mb() - before
    other = http.client.HTTPConnection(
        "127.0.0.1", http_port, timeout=10, source_address=("127.0.0.2", 0)
    )
    body = json.dumps({"room": "lobby", "username": "legit"})
    other.request("POST", "/api/join", body, {"Content-Type": "application/json"})
    legit = other.getresponse()
    legit.read()
    return {
        "sessions_created": created,
        "refused": refused,
        "statuses": statuses,
        "rss_growth_mb": round(growth, 1),
        "other_address_join": legit.status,
    }


SCENARIOS: Dict[str, Tuple[Callable[[Server, float], Dict[str, object]], List[str]]] = {
    "pipeline": (pipeline, []),
    "history": (history, ["--rate-limit", "0"]),
    "poll": (poll, ["--rate-limit", "0"]),
    "sessions": (sessions, []),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=HERE, help="checkout to run (default: this)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of abuse")
    args = parser.parse_args(argv)
    for name in args.scenarios.split(","):
        run, extra = SCENARIOS[name]
        server = Server(args.root, extra)
        try:
            result = run(server, args.duration)
        finally:
            server.stop()
        print(json.dumps({"scenario": name, "root": str(args.root), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
