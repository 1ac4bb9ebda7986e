"""The terminal client against the real cluster (not a fake server): piped stdin and a
pseudo-terminal, each chatting with a line-protocol user in a room on a real shard."""

from __future__ import annotations

import sys
from typing import Iterator

import pytest

from tests.cluster import Cluster
from tests.integration.test_client import PtyClient, client_args, free_port, run_piped

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


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals (pty) are POSIX only")
def test_terminal_client_comes_back_after_a_server_restart_on_the_same_port() -> None:
    port = free_port()
    first = Cluster(shards=1, tcp_port=port).start()
    second = Cluster(shards=1, tcp_port=port)
    client = PtyClient(client_args(port, "--user", "carol", "--room", "lobby"))
    bob = None
    try:
        client.expect("* joined room lobby")
        bob = first.connect()
        bob.join("lobby", "bob")
        bob.send("MSG lobby before the restart")
        client.expect("[lobby] bob: before the restart")
        bob.close()
        first.stop()
        client.expect("* server shutting down")
        client.expect(
            f"! lost the connection to 127.0.0.1:{port}; reconnecting (type /quit to stop)"
        )
        second.start()
        client.expect(f"* reconnected to 127.0.0.1:{port}", timeout=30)
        client.expect("* joined room lobby")
        client.expect(
            "! [lobby] the room's history started over while you were away (the server "
            "restarted): what was said meanwhile is lost"
        )
        bob = second.connect()
        bob.join("lobby", "bob")
        client.expect("* bob joined lobby")
        bob.send("NAMES lobby")
        bob.expect("NAMES lobby bob carol")  # back under the same name
        client.type("back again\r")
        bob.expect("MSG lobby carol back again")
        client.type("/quit\r")
        status = client.wait()
        assert status == 0, (client.output, client.proc.stderr.read().decode(errors="replace"))
        bob.expect("INFO carol left lobby")
    finally:
        client.close()
        if bob is not None:
            bob.close()
        second.stop()
        first.stop()
    assert "before the restart" not in client.output[client.output.index("reconnected") :]


def test_client_pointed_at_the_http_port_says_it_is_not_shardchat(cluster: Cluster) -> None:
    result = run_piped(cluster.http_port, "hello\n", "--user", "bob", "--room", "lobby")

    assert result.returncode == 1
    assert result.stdout == ""  # no welcome, no prompt, no raw HTTP/1.1 408
    assert result.stderr == (
        "chat_client: this is not a shardchat server (it said nothing within 3 s): is the "
        "port right? the line protocol is on 5000 by default\n"
    )


def test_history_past_the_maximum_names_the_range_and_the_client_checks_it_first(
    cluster: Cluster,
) -> None:
    tcp = cluster.connect()
    tcp.join("ranges", "rita")
    for count in ("9999", "501", "0"):
        tcp.send(f"HISTORY ranges {count}")
        tcp.expect("ERROR usage: HISTORY <room> [n] (n is 1-500)")
    tcp.send("HISTORY ranges lots")
    tcp.expect("ERROR usage: HISTORY <room> [n]")
    tcp.send("HISTORY ranges 500")
    lines = tcp.read_until(lambda line: line.startswith("END HISTORY"))
    assert lines[-1] == "END HISTORY ranges 1" and "* rita joined ranges" in lines[0]
    tcp.close()

    result = run_piped(cluster.tcp_port, "/history 9999\n", "--user", "rita", "--room", "ranges")
    assert result.returncode == 0, result.stderr
    assert "! /history shows at most 500 events" in result.stdout
    assert "HISTORY <room>" not in result.stdout + result.stderr
