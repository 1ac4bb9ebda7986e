"""``--trusted-proxy`` on a real cluster: behind a trusted proxy every per-address limit
counts the client it names (HTTP ``X-Forwarded-For``/``Forwarded``, TCP PROXY v1); from
any other peer those headers change nothing, or are refused."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Dict, Iterator, Optional, Tuple

import pytest

from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(60)

TRUSTED, OTHER = "127.0.0.1", "127.0.0.2"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    flags = ["--trusted-proxy", f"{TRUSTED}/32", "--max-sessions-per-address", "2",
             "--max-connections-per-ip", "3", "--max-rooms-per-address", "2",
             "--rate-limit", "0", "--host", "0.0.0.0", "--allowed-hosts", "localhost"]  # fmt: skip
    with Cluster(extra_args=flags) as running:
        running.host = TRUSTED
        yield running


def join_over_http(
    cluster: Cluster, source: str, headers: Dict[str, str], name: str
) -> Tuple[int, Optional[str], Dict]:
    conn = http.client.HTTPConnection(
        "127.0.0.1", cluster.http_port, timeout=10, source_address=(source, 0)
    )
    body = json.dumps({"room": "proxied", "username": name})
    conn.request("POST", "/api/join", body,
                 {"Content-Type": "application/json", "Host": "localhost", **headers})  # fmt: skip
    reply = conn.getresponse()
    payload = json.loads(reply.read())
    cookie = reply.getheader("Set-Cookie")
    conn.close()
    return reply.status, cookie, payload


def test_sessions_per_address_count_the_forwarded_client(cluster: Cluster) -> None:
    # 6 browsers behind the proxy, 3 addresses of 2 sessions each: all fit
    for n in range(6):
        forwarded = {"X-Forwarded-For": f"198.51.100.{n // 2}"}
        status, _, payload = join_over_http(cluster, TRUSTED, forwarded, f"web{n}")
        assert status == 200, payload
    # a third session of one forwarded address is over its cap
    status, _, payload = join_over_http(
        cluster, TRUSTED, {"X-Forwarded-For": "198.51.100.0"}, "web-extra"
    )
    assert status == 429 and payload["error"]["code"] == "too_many_sessions_for_address"


def test_an_untrusted_peer_cannot_fake_its_address(cluster: Cluster) -> None:
    results = [
        join_over_http(cluster, OTHER, {"X-Forwarded-For": f"203.0.113.{n}"}, f"faker{n}")
        for n in range(3)
    ]
    assert [status for status, _, _ in results] == [200, 200, 429]  # counted as 127.0.0.2


def test_https_at_the_proxy_makes_the_cookie_secure(cluster: Cluster) -> None:
    _, cookie, _ = join_over_http(
        cluster, TRUSTED, {"X-Forwarded-For": "198.51.100.50", "X-Forwarded-Proto": "https"}, "s"
    )
    assert cookie is not None and "; Secure" in cookie
    _, cookie, _ = join_over_http(  # another untrusted address: its own session cap
        cluster,
        "127.0.0.3",
        {"X-Forwarded-For": "198.51.100.51", "X-Forwarded-Proto": "https"},
        "t",
    )
    assert cookie is not None and "Secure" not in cookie


def line_client(cluster: Cluster, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", cluster.tcp_port), timeout=10, source_address=(source, 0)
    )
    return sock


def lines(sock: socket.socket, count: int) -> list:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def proxy_v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 4000 5000\r\n".encode()


def proxy_v2(client: str) -> bytes:
    """A PROXY v2 header (TCP over IPv4) with an ALPN TLV after the addresses, as HAProxy's
    ``send-proxy-v2`` writes it."""
    addresses = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + b"\x9c\x40\x13\x88"
    body = addresses + b"\x01\x00\x02h2"
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_the_proxy_protocol_names_the_tcp_client(cluster: Cluster, header) -> None:  # noqa: ANN001
    # rooms per address is 2: through the proxy, each client has its own 2
    clients = []
    version = header.__name__[-1]
    for n in range(3):
        sock = line_client(cluster, TRUSTED)
        sock.sendall(header(f"192.0.{version}.{n}"))
        assert lines(sock, 1)[0].startswith("INFO welcome")
        sock.sendall(f"JOIN pa{version}{n} u{n}\nJOIN pb{version}{n} u{n}\n".encode())
        got = lines(sock, 2)
        assert got == [f"INFO joined room pa{version}{n}", f"INFO joined room pb{version}{n}"]
        clients.append(sock)
    # and more connections than --max-connections-per-ip 3 from the proxy itself
    extra = line_client(cluster, TRUSTED)
    extra.sendall(header(f"192.0.{version}.9") + f"JOIN pz{version} z\n".encode())
    got = lines(extra, 2)
    assert got[0].startswith("INFO welcome") and got[1] == f"INFO joined room pz{version}"
    # without the proxy, one address has only its 2 rooms
    plain = line_client(cluster, f"127.0.0.{3 + int(version)}")  # an address nothing else used
    plain.sendall(f"JOIN qa{version} q\nJOIN qb{version} q\nJOIN qc{version} q\n".encode())
    got = lines(plain, 4)
    assert got[1:3] == [f"INFO joined room qa{version}", f"INFO joined room qb{version}"]
    assert got[3].startswith("ERROR") and "rooms" in got[3]
    for sock in (*clients, extra, plain):
        sock.close()


def test_a_proxy_header_from_anyone_else_is_refused(cluster: Cluster) -> None:
    sock = line_client(cluster, OTHER)
    assert lines(sock, 1)[0].startswith("INFO welcome")
    sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 5000\r\n")
    assert lines(sock, 1)[0].startswith("ERROR unknown command PROXY")
    sock.close()


def test_a_bad_header_from_the_proxy_closes_the_connection(cluster: Cluster) -> None:
    sock = line_client(cluster, TRUSTED)
    assert lines(sock, 1)[0].startswith("INFO welcome")
    sock.sendall(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n")
    assert lines(sock, 1) == ["ERROR bad PROXY protocol header"]
    assert sock.recv(100) == b""
    sock.close()


def test_a_direct_client_on_the_trusted_address_needs_no_header(cluster: Cluster) -> None:
    sock = line_client(cluster, TRUSTED)
    assert lines(sock, 1)[0].startswith("INFO welcome")
    sock.sendall(b"JOIN direct local\n")
    assert lines(sock, 1) == ["INFO joined room direct"]
    sock.close()


def test_a_health_check_that_connects_and_leaves_is_quiet(cluster: Cluster) -> None:
    for _ in range(3):
        sock = line_client(cluster, TRUSTED)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)
        sock.close()
    sock = line_client(cluster, TRUSTED)
    sock.sendall(b"PROX")  # a header cut short, then gone
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    probe = line_client(cluster, OTHER)
    assert lines(probe, 1)[0].startswith("INFO welcome")
    probe.close()
    assert "Traceback" not in cluster.log and "AssertionError" not in cluster.log
