"""The terminal client against the real cluster (not a fake server): piped stdin and a
pseudo-terminal, each chatting with a line-protocol user in a room on a real shard."""

from __future__ import annotations

import sys
from typing import Iterator

import pytest

from tests.cluster import Cluster
from tests.integration.test_client import PtyClient, client_args, run_piped

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(shards=2) as running:
        yield running


def test_piped_client_chats_with_a_tcp_user(cluster: Cluster) -> None:
    alice = cluster.connect()
    alice.join("lobby", "alice")
    script = "hello from the pipe\n/names\n/join dev\nin dev now\n/quit\n"
    result = run_piped(cluster.tcp_port, script, "--user", "bob", "--room", "lobby")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[lobby] bob: hello from the pipe" in out
    assert "alice" in out and "bob" in out  # the NAMES reply
    assert "[dev] bob: in dev now" in out
    # The TCP user saw the client join, speak and leave; nothing from room dev leaked.
    lines = alice.read_until(lambda line: line == "INFO bob left lobby")
    assert lines == [
        "INFO bob joined lobby",
        "MSG lobby bob hello from the pipe",
        "INFO bob left lobby",
    ]
    alice.close()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals (pty) are POSIX only")
def test_terminal_client_chats_with_a_tcp_user(cluster: Cluster) -> None:
    alice = cluster.connect()
    alice.join("pty-room", "alice")
    client = PtyClient(client_args(cluster.tcp_port, "--user", "carol", "--room", "pty-room"))
    try:
        client.expect("joined room pty-room")
        alice.expect("INFO carol joined pty-room")
        client.type("hi from a terminal\r")
        alice.expect("MSG pty-room carol hi from a terminal")
        alice.send("MSG pty-room welcome, carol")
        alice.expect("MSG pty-room alice welcome, carol")
        client.expect("alice: welcome, carol")
        client.type("/quit\r")
        assert client.wait() == 0
        alice.expect("INFO carol left pty-room")
    finally:
        client.close()
        alice.close()
