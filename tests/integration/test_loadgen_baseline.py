"""The threaded baseline server and the load generator, against each other.

The baseline runs as a subprocess on port 0 (its printed ports are parsed); the load
generator runs as a subprocess for about a second per scenario at tiny sizes. No timing
assertions: speed is judged by experiments, not tests.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
BASELINE = SCRIPTS / "baseline_threaded_server.py"
LOADGEN = SCRIPTS / "loadgen.py"
TINY = ["--rooms", "2", "--members", "3", "--publishers", "1"]
SHORT = ["--warmup", "0.3", "--duration", "1", "--drain", "3", "--log-level", "WARNING"]


class Baseline(NamedTuple):
    """A running baseline server."""

    pid: int
    tcp_port: int
    http_port: int


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baseline]:
    """Start the baseline on free ports; stop it after the module's tests."""
    log = (tmp_path_factory.mktemp("baseline") / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(BASELINE), "--host", "127.0.0.1", "--tcp-port", "0"]
        + ["--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        ports: dict[str, int] = {}
        assert proc.stdout is not None
        while len(ports) < 2:
            line = proc.stdout.readline().decode()
            assert line, "baseline exited before listening"
            kind, address = line.split()[1:3]  # "listening tcp 127.0.0.1:PORT"
            ports[kind] = int(address.rsplit(":", 1)[1])
        yield Baseline(proc.pid, ports["tcp"], ports["http"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- the baseline's line protocol ---------------------------------------------------------


class LineClient:
    """A blocking line-protocol client with a read timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        """Send one line (LF added)."""
        self.sock.sendall(line.encode() + b"\n")

    def line(self) -> str:
        """Return the next line without its LF ("" at EOF)."""
        return self.file.readline().decode().rstrip("\n")

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


@pytest.fixture
def clients(baseline: Baseline) -> Iterator[list[LineClient]]:
    """Two connected clients, welcome lines already read and checked."""
    pair = [LineClient(baseline.tcp_port) for _ in range(2)]
    try:
        for client in pair:
            assert client.line().startswith("INFO welcome to shardchat")
        yield pair
    finally:
        for client in pair:
            client.close()


def test_join_msg_leave_replies(clients: list[LineClient]) -> None:
    alice, bob = clients
    alice.send("JOIN proto1 alice")
    assert alice.line() == "INFO joined room proto1"
    bob.send("join proto1 bob")
    assert bob.line() == "INFO joined room proto1"
    assert alice.line() == "INFO bob joined proto1"
    bob.send("MSG proto1 hi  there ")
    assert bob.line() == "MSG proto1 bob hi  there "
    assert alice.line() == "MSG proto1 bob hi  there "
    bob.send("LEAVE proto1")
    assert bob.line() == "INFO left room proto1"
    assert alice.line() == "INFO bob left proto1"


def test_not_in_room_and_usage_errors(clients: list[LineClient]) -> None:
    alice, bob = clients
    alice.send("MSG nowhere hello")
    assert alice.line() == "ERROR not in room nowhere"
    alice.send("LEAVE nowhere")
    assert alice.line() == "ERROR not in room nowhere"
    alice.send("JOIN proto2")
    assert alice.line() == "ERROR usage: JOIN <room> <username>"
    alice.send("JOIN proto2 alice")
    assert alice.line() == "INFO joined room proto2"
    bob.send("JOIN proto2 ALICE")
    assert bob.line() == "ERROR name taken in proto2"


def test_quit_says_bye_and_tells_the_room(clients: list[LineClient]) -> None:
    alice, bob = clients
    alice.send("JOIN proto3 alice")
    assert alice.line() == "INFO joined room proto3"
    bob.send("JOIN proto3 bob")
    assert bob.line() == "INFO joined room proto3"
    assert alice.line() == "INFO bob joined proto3"
    alice.send("QUIT")
    assert alice.line() == "INFO bye"
    assert alice.line() == ""  # closed by the server
    assert bob.line() == "INFO alice left proto3"


def test_long_poll_api(baseline: Baseline) -> None:
    base = f"http://127.0.0.1:{baseline.http_port}"

    def post(path: str, body: dict[str, str], cookie: str = "") -> Any:
        request = urllib.request.Request(
            base + path, json.dumps(body).encode(), {"Cookie": cookie}, method="POST"
        )
        return urllib.request.urlopen(request, timeout=5)

    joined = post("/api/join", {"room": "web1", "username": "carol"})
    assert json.load(joined) == {"ok": True}
    cookie = joined.headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("sc_session=")
    assert json.load(post("/api/send", {"room": "web1", "text": "hello"}, cookie))["ok"]
    with urllib.request.urlopen(base + "/api/poll?room=web1&after=1", timeout=5) as reply:
        messages = json.load(reply)["messages"]
    assert [(m["id"], m["username"], m["text"], m["type"]) for m in messages] == [
        (2, "carol", "hello", "msg")
    ]
    assert set(messages[0]) == {"id", "room", "username", "text", "type", "ts"}


# --- the load generator -------------------------------------------------------------------


def run_loadgen(*args: str) -> tuple[int, dict[str, Any]]:
    """Run loadgen.py; return its exit status and its one JSON line."""
    done = subprocess.run(
        [sys.executable, str(LOADGEN), *args],
        capture_output=True,
        timeout=45,
        check=False,
    )
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1, done.stderr.decode()[-2000:]
    return done.returncode, json.loads(lines[0])


def target(baseline: Baseline) -> list[str]:
    """Return the loadgen options pointing at ``baseline``."""
    return [
        *("--tcp-port", str(baseline.tcp_port), "--http-port", str(baseline.http_port)),
        *("--pids", str(baseline.pid)),
    ]


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("fanout", TINY),
        ("connections", TINY),
        ("longpoll", TINY),
        ("stuck", ["--rooms", "2", "--members", "4", "--publishers", "1"]),
    ],
    ids=["fanout", "connections", "longpoll", "stuck"],
)
def test_scenario_reports_sane_numbers(baseline: Baseline, scenario: str, extra: list[str]) -> None:
    status, result = run_loadgen(scenario, *extra, *SHORT, *target(baseline))
    assert status == 0, result
    assert result["scenario"] == scenario
    members = int(extra[extra.index("--members") + 1])
    assert result["connections"] >= 2 * members
    assert result["connect_join_s"] > 0
    assert result["deliveries"] > 0 and result["deliveries_per_s"] > 0
    assert result["published"] > 0 and result["published_per_s"] > 0
    latency = result["latency_ms"]
    assert latency["samples"] > 0
    assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"]
    assert result["error_lines"] == 0 and result["send_failures"] == 0
    if scenario == "stuck":
        assert result["stuck"]["members"] == 2
    else:
        assert result["losses"] == 0, result
        assert result["delivered_total"] == result["published_total"] * members
        assert result["probe_gaps"] == 0 and result["disconnected"] == 0
    if sys.platform.startswith("linux"):
        assert str(baseline.pid) in result["resources"]
        assert result["resources"]["loadgen"]["cpu_percent"] > 0


def test_refused_messages_are_send_failures_not_losses(baseline: Baseline) -> None:
    too_long = ["--text-bytes", "2001"]  # over MAX_TEXT_CHARS: every MSG is refused
    status, result = run_loadgen("fanout", *TINY, *SHORT, *too_long, *target(baseline))
    assert status == 0, result
    assert result["published_total"] == 0 and result["delivered_total"] == 0
    assert result["send_failures"] > 0
    assert result["error_lines"] == result["send_failures"]
    assert result["losses"] == 0


def test_unreachable_server_is_an_error_result() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]  # bound, not listening: connect is refused
        status, result = run_loadgen(
            "fanout", *TINY, *SHORT, "--tcp-port", str(free_port), "--connect-timeout", "5"
        )
    assert status == 1
    assert result["scenario"] == "fanout" and "error" in result


# --- load generator internals ---------------------------------------------------------------


@pytest.fixture(scope="module")
def loadgen() -> ModuleType:
    """Import scripts/loadgen.py as a module."""
    spec = importlib.util.spec_from_file_location("loadgen_under_test", LOADGEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STREAM = (
    b"INFO welcome to shardchat\nMSG r a lg:0:0:5:xMSG \nERROR not in room r\n"
    b"MSG r b x\nINFO MSG r\nMSG r c MSG y\nERROR x\n"
)


@pytest.mark.parametrize("as_bytearray", [False, True], ids=["bytes", "bytearray"])
def test_line_counting_at_every_split(loadgen: ModuleType, as_bytearray: bool) -> None:
    for first in range(len(STREAM) + 1):
        for second in range(first, len(STREAM) + 1):
            tail, msgs, errors = b"\n", 0, 0
            for chunk in (STREAM[:first], STREAM[first:second], STREAM[second:]):
                # The shared receive buffer holds stale bytes after the chunk.
                data = bytearray(chunk) + b"\nMSG \nERROR " if as_bytearray else chunk
                counted, refused, tail = loadgen.count_lines(tail, data, len(chunk))
                msgs, errors = msgs + counted, errors + refused
            assert (msgs, errors) == (3, 2), (first, second)


def test_text_round_trip(loadgen: ModuleType) -> None:
    text = loadgen.make_text(7, 42, 123456789, "x" * 64)
    assert len(text) == 64
    assert loadgen.parse_text(text.encode()) == (7, 42, 123456789)
    assert loadgen.parse_text(b"hello there") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["fanout", "--host", "192.0.2.1"],
        ["fanout", "--publishers", "0"],
        ["stuck", "--members", "2", "--publishers", "1"],
    ],
    ids=["not-loopback", "no-publishers", "stuck-too-small"],
)
def test_bad_arguments_are_refused(loadgen: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        loadgen.main(argv)
    assert exit_info.value.code == 2
