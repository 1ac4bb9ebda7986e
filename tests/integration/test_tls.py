"""TLS on both listeners (``--tls-cert``/``--tls-key``) against a real cluster, with a
self-signed certificate made by ``openssl`` in the test: the line protocol and HTTPS work,
the session cookie is ``Secure``, a plaintext client on a TLS port is refused without a
traceback and without affecting the others, SIGHUP reloads the certificate, and a bad
certificate is one line and exit 1."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import pytest

from tests.cluster import START_CLUSTER, Cluster

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


def make_certificate(directory: Path, name: str = "server") -> Tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cluster(certificate: Tuple[Path, Path]):  # noqa: ANN201
    cert, key = certificate
    with Cluster(extra_args=["--tls-cert", str(cert), "--tls-key", str(key)]) as running:
        yield running


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def tls_line_client(cluster: Cluster, cert: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", cluster.tcp_port), timeout=10)
    sock = client_context(cert).wrap_socket(raw, server_hostname="localhost")
    return sock


def read_line(sock: socket.socket, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(bytes(buffer))
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def test_the_line_protocol_over_tls(cluster: Cluster, certificate: Tuple[Path, Path]) -> None:
    assert "(TLS)" in cluster.log
    alice = tls_line_client(cluster, certificate[0])
    bob = tls_line_client(cluster, certificate[0])
    assert alice.version() in ("TLSv1.2", "TLSv1.3")
    a, b = bytearray(), bytearray()
    assert read_line(alice, a).startswith("INFO welcome to shardchat")
    assert read_line(bob, b).startswith("INFO welcome to shardchat")
    alice.sendall(b"JOIN tls-room alice\n")
    assert read_line(alice, a) == "INFO joined room tls-room"
    bob.sendall(b"JOIN tls-room bob\n")
    assert read_line(bob, b) == "INFO joined room tls-room"
    assert read_line(alice, a) == "INFO bob joined tls-room"
    bob.sendall(b"MSG tls-room hello over TLS\n")
    assert read_line(alice, a) == "MSG tls-room bob hello over TLS"
    alice.close()
    bob.close()


def test_https_and_a_secure_cookie(cluster: Cluster, certificate: Tuple[Path, Path]) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", cluster.http_port, context=client_context(certificate[0]), timeout=10
    )
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and b"shardchat" in page.read()
    body = json.dumps({"room": "tls-web", "username": "carol"})
    conn.request("POST", "/api/join", body, {"Content-Type": "application/json"})
    joined = conn.getresponse()
    joined.read()
    assert joined.status == 200
    cookie = joined.getheader("Set-Cookie") or ""
    assert "; Secure" in cookie and "HttpOnly" in cookie
    conn.close()


@pytest.mark.parametrize("port", ["tcp", "http"])
def test_plaintext_on_a_tls_port_is_refused_and_harms_nobody(
    cluster: Cluster, certificate: Tuple[Path, Path], port: str
) -> None:
    member = tls_line_client(cluster, certificate[0])
    buffer = bytearray()
    read_line(member, buffer)
    member.sendall(b"JOIN plain-check dave\n")
    assert read_line(member, buffer) == "INFO joined room plain-check"
    number = cluster.tcp_port if port == "tcp" else cluster.http_port
    for request in (b"JOIN plain-check mallory\n", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        plain = socket.create_connection(("127.0.0.1", number), timeout=10)
        plain.sendall(request)
        received = b""
        try:
            while True:
                chunk = plain.recv(4096)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        plain.close()
        # nothing of the chat (no welcome, no page) reached the plaintext client
        assert b"INFO" not in received and b"HTTP/1.1 200" not in received
    member.sendall(b"NAMES plain-check\n")
    assert read_line(member, buffer) == "NAMES plain-check dave"
    member.close()
    assert "Traceback" not in cluster.log and "eof_received" not in cluster.log


def test_handshakes_count_against_the_caps_and_a_refusal_costs_none(
    certificate: Tuple[Path, Path],
) -> None:
    """A TLS port counts a connection when it is accepted, as a plaintext port does: sockets
    that never finish (or never start) their handshake hold their address's slots, and one
    over the cap is closed before any TLS work (so it is not told why: telling it would
    cost the handshake the cap is there to save). Other addresses are served meanwhile."""
    cert, key = certificate
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--max-connections-per-ip", "2"]
    with Cluster(extra_args=flags) as capped:
        served = tls_line_client(capped, cert)
        buffer = bytearray()
        assert read_line(served, buffer).startswith("INFO welcome")
        silent = socket.create_connection((capped.host, capped.tcp_port))  # no ClientHello
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises((ConnectionResetError, ssl.SSLError, EOFError, OSError)):
                refused = tls_line_client(capped, cert)  # the handshake itself fails
                read_line(refused, bytearray())
            assert time.monotonic() - started < 5  # refused at once, not timed out
        client = run_client(capped, "--tls", "--ca", str(cert), text="x\n")
        assert client.returncode == 1, client.stdout
        assert "closed the connection during the TLS handshake" in client.stderr
        other = socket.create_connection(
            (capped.host, capped.tcp_port), source_address=("127.0.0.2", 0)
        )
        with client_context(cert).wrap_socket(other, server_hostname="localhost") as elsewhere:
            assert read_line(elsewhere, bytearray()).startswith("INFO welcome")
        silent.close()  # its slot comes back once the server sees it go
        for _ in range(50):
            try:
                again = tls_line_client(capped, cert)
            except (ConnectionResetError, ssl.SSLError, OSError):
                time.sleep(0.1)
                continue
            assert read_line(again, bytearray()).startswith("INFO welcome")
            again.close()
            break
        else:
            pytest.fail("the slot of a closed, never-handshaken socket was not given back")
        served.sendall(b"JOIN still-here alice\n")
        assert read_line(served, buffer) == "INFO joined room still-here"
        served.close()
        assert "Traceback" not in capped.log and "NotImplementedError" not in capped.log


def test_sighup_reloads_the_certificate(tmp_path: Path) -> None:
    first = make_certificate(tmp_path, "first")
    second = make_certificate(tmp_path, "second")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    with Cluster(extra_args=["--tls-cert", str(cert), "--tls-key", str(key)]) as cluster:
        tls_line_client(cluster, first[0]).close()  # trusted as "first"
        shutil.copy(second[0], cert)
        shutil.copy(second[1], key)
        assert cluster.proc is not None
        os.kill(cluster.proc.pid, signal.SIGHUP)
        cluster.wait_for_log("TLS certificate reloaded")
        tls_line_client(cluster, second[0]).close()  # now the server presents "second"
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_line_client(cluster, first[0])
        # a certificate whose key does not match, then a broken file: on reload each keeps
        # the certificate in use, and says so (and handshakes still work)
        shutil.copy(first[0], cert)
        mark = cluster.log_mark()
        os.kill(cluster.proc.pid, signal.SIGHUP)
        cluster.wait_for_log("still using the certificate loaded before", since=mark)
        tls_line_client(cluster, second[0]).close()
        cert.write_text("not a certificate")
        mark = cluster.log_mark()
        os.kill(cluster.proc.pid, signal.SIGHUP)
        cluster.wait_for_log("still using the certificate loaded before", since=mark)
        tls_line_client(cluster, second[0]).close()
        assert "Traceback" not in cluster.log


@pytest.mark.parametrize("problem", ["missing", "garbage", "wrong-key"])
def test_a_bad_certificate_is_one_line_and_exit_1(tmp_path: Path, problem: str) -> None:
    cert, key = make_certificate(tmp_path)
    if problem == "missing":
        cert = tmp_path / "nowhere.pem"
    elif problem == "garbage":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n")
    else:
        key = make_certificate(tmp_path, "other")[1]
    result = subprocess.run(
        [sys.executable, str(START_CLUSTER), "--tcp-port", "0", "--http-port", "0",
         "--in-memory", "--tls-cert", str(cert), "--tls-key", str(key)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "TLS" in lines[0] and "Traceback" not in result.stderr, lines
    assert str(cert) in lines[0] or str(cert.name) in lines[0]


CLIENT = Path(__file__).resolve().parents[2] / "scripts" / "chat_client.py"


def run_client(cluster: Cluster, *flags: str, text: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLIENT), "--host", "localhost", "--port", str(cluster.tcp_port),
         "--user", "zed", "--room", "tls-client", *flags],
        input=text, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_terminal_client_over_tls(cluster: Cluster, certificate: Tuple[Path, Path]) -> None:
    done = run_client(cluster, "--tls", "--ca", str(certificate[0]), text="hello via tls\n")
    assert done.returncode == 0, done.stderr
    assert "[tls-client] zed: hello via tls" in done.stdout
    insecure = run_client(cluster, "--tls", "--insecure", text="again\n")
    assert insecure.returncode == 0 and "zed: again" in insecure.stdout
    untrusted = run_client(cluster, "--tls", text="x\n")
    assert untrusted.returncode == 1 and "certificate is not trusted" in untrusted.stderr
    assert "Traceback" not in untrusted.stderr
    assert run_client(cluster, "--ca", str(certificate[0])).returncode == 2


def proxied_tls(cluster: Cluster, cert: Path, header: bytes, source: str = "127.0.0.1"):  # noqa: ANN201
    """A TLS connection that a proxy at *source* opened with *header* in front (HAProxy's
    ``send-proxy`` with TLS passed through)."""
    raw = socket.create_connection(
        (cluster.host, cluster.tcp_port), timeout=10, source_address=(source, 0)
    )
    raw.sendall(header)
    return client_context(cert).wrap_socket(raw, server_hostname="localhost")


def v1(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 5000\r\n".encode()


def v2(client: str) -> bytes:
    body = socket.inet_aton(client) + socket.inet_aton("127.0.0.1") + b"\x9c\x40\x13\x88"
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(body).to_bytes(2, "big") + body


def test_a_proxy_header_before_tls_names_the_client(certificate: Tuple[Path, Path]) -> None:
    cert, key = certificate
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--trusted-proxy", "127.0.0.1",
             "--max-rooms-per-address", "2", "--max-sessions-per-address", "1"]  # fmt: skip
    with Cluster(extra_args=flags) as proxied:
        opened = []

        def line_client(
            header: bytes, source: str = "127.0.0.1"
        ) -> Tuple[ssl.SSLSocket, bytearray]:
            sock = proxied_tls(proxied, cert, header, source)
            opened.append(sock)
            buffer = bytearray()
            assert read_line(sock, buffer).startswith("INFO welcome")
            return sock, buffer

        try:
            first, one = line_client(v1("192.0.2.60"))
            first.sendall(b"JOIN pt1 a\nJOIN pt2 a\n")
            assert [read_line(first, one) for _ in range(2)] == [
                "INFO joined room pt1",
                "INFO joined room pt2",
            ]
            same, two = line_client(v2("192.0.2.60"))  # v2, the same client: its 2 rooms are used
            same.sendall(b"JOIN pt3 b\n")
            assert read_line(same, two) == "ERROR too many rooms for one address"
            other, three = line_client(v1("192.0.2.61"))
            other.sendall(b"JOIN pt3 c\n")
            assert read_line(other, three) == "INFO joined room pt3"
            direct, four = line_client(b"")  # the proxy's own address may send no header
            direct.sendall(b"JOIN pt4 d\n")
            assert read_line(direct, four) == "INFO joined room pt4"
            for header, source in (
                (b"PROXY TCP4 nonsense\r\n", "127.0.0.1"),
                (v1("192.0.2.62"), "127.0.0.2"),
            ):
                with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                    line_client(header, source)  # bad from the proxy; any from anyone else
            # HTTPS through the proxy: sessions count against the client it names.
            statuses = []
            for client in ("192.0.2.70", "192.0.2.70", "192.0.2.71"):
                https = http.client.HTTPSConnection("localhost", proxied.http_port, timeout=10)
                raw = socket.create_connection((proxied.host, proxied.http_port), timeout=10)
                raw.sendall(v1(client))
                https.sock = client_context(cert).wrap_socket(raw, server_hostname="localhost")
                body = json.dumps(
                    {"room": "ptweb", "username": "w" + client.split(".")[-1] + str(len(statuses))}
                )
                headers = {"Content-Type": "application/json", "Host": "localhost"}
                https.request("POST", "/api/join", body=body, headers=headers)
                statuses.append(https.getresponse().status)
                https.close()
            assert statuses == [200, 429, 200]
            # Without a PROXY header, HTTPS from the trusted proxy still names the client
            # with X-Forwarded-For (a proxy that re-encrypts: nginx proxy_pass https://).
            statuses = []
            for client in ("192.0.2.80", "192.0.2.80", "192.0.2.81"):
                https = http.client.HTTPSConnection(
                    "localhost", proxied.http_port, timeout=10, context=client_context(cert)
                )
                body = json.dumps({"room": "ptxff", "username": f"x{len(statuses)}"})
                headers = {"Content-Type": "application/json", "X-Forwarded-For": client}
                https.request("POST", "/api/join", body=body, headers=headers)
                statuses.append(https.getresponse().status)
                https.close()
            assert statuses == [200, 429, 200]
            # And on the line protocol a PROXY line inside TLS still names the client.
            inside, five = line_client(b"")
            inside.sendall(v1("192.0.2.60") + b"JOIN pt5 e\n")
            assert read_line(inside, five) == "ERROR too many rooms for one address"
        finally:
            for sock in opened:
                sock.close()
        assert "Traceback" not in proxied.log
