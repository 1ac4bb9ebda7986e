"""The HTTP edges against a real cluster, over raw sockets: malformed targets, the Host
allow-list and the Origin rule (DNS rebinding), ``Expect: 100-continue``, and JSON fields
of the wrong type. Each refusal is a clean 4xx, never a 500, and never a traceback in the
router's log."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

from tests.cluster import START_CLUSTER, Cluster

pytestmark = pytest.mark.timeout(60)


class Answer(NamedTuple):
    status: int
    headers: Dict[str, str]  # lower-case names; the last of repeated fields
    body: bytes

    @property
    def code(self) -> str:
        return json.loads(self.body)["error"]["code"]


class Raw:
    """One HTTP connection written byte for byte; reads answers by ``Content-Length``."""

    def __init__(self, port: int, host: Optional[str] = None, timeout: float = 5.0) -> None:
        self.port = port
        self.host = host if host is not None else f"127.0.0.1:{port}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.cookie: Optional[str] = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(
        self,
        method: str,
        target: str,
        fields: Optional[List[Tuple[str, str]]] = None,
        length: Optional[int] = None,
        version: str = "HTTP/1.1",
    ) -> bytes:
        """A request head with ``Host`` (unless given in *fields* or None) and the cookie."""
        lines = [f"{method} {target} {version}"]
        names = {name.lower() for name, _ in fields or []}
        if "host" not in names and self.host:
            lines.append(f"Host: {self.host}")
        if self.cookie and "cookie" not in names:
            lines.append(f"Cookie: sc_session={self.cookie}")
        lines.extend(f"{name}: {value}" for name, value in fields or [] if value is not None)
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def request(
        self, method: str, target: str, fields: Optional[List[Tuple[str, str]]] = None
    ) -> Answer:
        self.send(self.head(method, target, fields))
        return self.answer(head_only=method == "HEAD")

    def post(
        self, target: str, body: Any, fields: Optional[List[Tuple[str, str]]] = None
    ) -> Answer:
        data = json.dumps(body).encode()
        all_fields = [("Content-Type", "application/json"), *(fields or [])]
        self.send(self.head("POST", target, all_fields, len(data)) + data)
        return self.answer()

    def read_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def answer(self, head_only: bool = False) -> Answer:
        lines = self.read_head().decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b"" if head_only else self.read_exactly(int(headers.get("content-length", "0")))
        cookie = headers.get("set-cookie")
        if cookie:
            self.cookie = cookie.split(";")[0].split("=", 1)[1] or None
        return Answer(status, headers, body)

    def closed(self) -> bool:
        """True once the server closed its side (after what was already read)."""
        try:
            return not self.buffer and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def nothing_arrives(self, wait: float = 0.5) -> bool:
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return True
        finally:
            self.sock.settimeout(5.0)
        self.buffer += chunk
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(shards=2, extra_args=["--rate-limit", "0"]) as running:
        yield running


@pytest.fixture
def raw(cluster: Cluster) -> Iterator[Raw]:
    connection = Raw(cluster.http_port)
    yield connection
    connection.close()


def assert_clean_log(cluster: Cluster) -> None:
    assert "Traceback" not in cluster.log and "error handling" not in cluster.log, cluster.log


# --- request targets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, target",
    [
        ("GET", "http://[::1/"),
        ("GET", "http://[::1]x/healthz"),
        ("GET", "http://[fe80::1%25eth0]/healthz"),
        ("GET", "http://h:99999/healthz"),
        ("GET", "http://user@127.0.0.1/healthz"),
        ("GET", "ftp://127.0.0.1/healthz"),
        ("GET", "127.0.0.1:8000"),
        ("CONNECT", "127.0.0.1:8000"),
        ("GET", "*"),
        ("GET", "healthz"),
        ("GET", "/healthz%"),
        ("GET", "/api/rooms/%ZZ/members"),
        ("GET", "/api/poll?room=%G1"),
        ("GET", "/healthz#top"),
    ],
    ids=[
        "ipv6-unclosed",
        "ipv6-junk",
        "ipv6-zone",
        "port-too-big",
        "userinfo",
        "other-scheme",
        "authority-form",
        "connect",
        "asterisk-get",
        "relative",
        "percent-at-end",
        "bad-percent-in-room",
        "bad-percent-in-query",
        "fragment",
    ],
)
def test_malformed_target_is_400_and_closes(
    cluster: Cluster, raw: Raw, method: str, target: str
) -> None:
    answer = raw.request(method, target)
    assert (answer.status, answer.code) == (400, "bad_request")
    assert answer.headers["connection"] == "close" and raw.closed()
    assert_clean_log(cluster)


@pytest.mark.parametrize(
    "segment", ["%C3", "%FF%FE", "%00", "a%2Fb", "a%20b", "%C3%A9" * 65], ids=str
)
def test_bad_room_in_a_members_path_is_invalid_room(
    cluster: Cluster, raw: Raw, segment: str
) -> None:
    answer = raw.request("GET", f"/api/rooms/{segment}/members")
    assert (answer.status, answer.code) == (400, "invalid_room")
    assert raw.request("GET", "/api/rooms/zo%C3%AB/members").status == 200  # still open
    assert_clean_log(cluster)


def test_options_asterisk_is_405_with_allow(raw: Raw) -> None:
    answer = raw.request("OPTIONS", "*")
    assert (answer.status, answer.code) == (405, "method_not_allowed")
    assert answer.headers["allow"] == "GET, HEAD, POST"


def test_absolute_form_names_the_host_instead_of_the_host_field(cluster: Cluster) -> None:
    port = cluster.http_port
    proxy_like = Raw(port, host="evil.example")
    try:
        answer = proxy_like.request("GET", f"http://127.0.0.1:{port}/healthz")
        assert answer.status == 200 and json.loads(answer.body)["ok"] is True
        assert proxy_like.request("GET", f"HTTP://LOCALHOST:{port}/api/rooms?x").status == 200
    finally:
        proxy_like.close()
    direct = Raw(port)
    try:
        answer = direct.request("GET", "http://evil.example/healthz")
        assert (answer.status, answer.code) == (421, "misdirected_request")
    finally:
        direct.close()


# --- the Host allow-list and the Origin rule --------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/app.js", "/healthz", "/api/session", "/api/rooms"])
def test_a_foreign_host_is_refused_everywhere(cluster: Cluster, path: str) -> None:
    rebound = Raw(cluster.http_port, host=f"evil.example:{cluster.http_port}")
    try:
        answer = rebound.request("GET", path)
        assert (answer.status, answer.code) == (421, "misdirected_request")
        assert "--allowed-hosts" in json.loads(answer.body)["error"]["message"]
        assert rebound.request("HEAD", path).status == 421  # and the connection stays
    finally:
        rebound.close()


def test_dns_rebinding_with_a_matching_origin_is_refused(cluster: Cluster) -> None:
    """Host and Origin agree (the page really is on evil.example), but evil.example is not
    one of this server's names."""
    host = f"evil.example:{cluster.http_port}"
    rebound = Raw(cluster.http_port, host=host)
    try:
        body = {"room": "rebound", "username": "mallory"}
        answer = rebound.post("/api/join", body, [("Origin", f"http://{host}")])
        assert (answer.status, answer.code) == (421, "misdirected_request")
        assert rebound.cookie is None
    finally:
        rebound.close()


@pytest.mark.parametrize(
    "host, origin",
    [
        ("127.0.0.1:{port}", "http://evil.example"),
        ("127.0.0.1:{port}", "http://evil.example:{port}"),
        ("127.0.0.1:{port}", "http://127.0.0.1:1"),
        ("127.0.0.1:{port}", "http://localhost:{port}"),
        ("127.0.0.1:{port}", "http://127.0.0.1"),
        ("127.0.0.1:{port}", "null"),
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}/"),
        ("localhost:{port}", "http://127.0.0.1:{port}"),
        ("[::1]:{port}", "http://[::2]:{port}"),
    ],
    ids=[
        "foreign",
        "foreign-same-port",
        "other-port",
        "other-allowed-name",
        "no-port",
        "null",
        "path",
        "other-allowed-name-reversed",
        "other-ipv6",
    ],
)
def test_an_allowed_host_with_a_foreign_origin_is_403(
    cluster: Cluster, host: str, origin: str
) -> None:
    port = cluster.http_port
    connection = Raw(port, host=host.format(port=port))
    try:
        body = {"room": "origins", "username": "mallory"}
        answer = connection.post("/api/join", body, [("Origin", origin.format(port=port))])
        assert (answer.status, answer.code) == (403, "bad_origin")
    finally:
        connection.close()


@pytest.mark.parametrize(
    "host, origin",
    [
        ("127.0.0.1:{port}", "http://127.0.0.1:{port}"),
        ("LOCALHOST:{port}", "http://localhost:{port}"),
        ("[::1]:{port}", "http://[::1]:{port}"),
        ("127.0.0.1:{port}", None),
    ],
    ids=["ipv4", "localhost-case", "ipv6", "no-origin"],
)
def test_same_origin_posts_pass(cluster: Cluster, host: str, origin: Optional[str]) -> None:
    port = cluster.http_port
    connection = Raw(port, host=host.format(port=port))
    try:
        fields = [("Origin", origin.format(port=port))] if origin else []
        answer = connection.post("/api/join", {"room": "same", "username": "u"}, fields)
        assert answer.status == 200 and connection.cookie
        assert connection.post("/api/leave", {}, fields).status == 200
    finally:
        connection.close()


def test_http10_without_host_is_served(cluster: Cluster) -> None:
    connection = Raw(cluster.http_port, host="")
    try:
        connection.send(connection.head("GET", "/healthz", version="HTTP/1.0"))
        assert connection.answer().status == 200
    finally:
        connection.close()


def test_allowed_hosts_flag_lets_named_hosts_through_and_replaces_the_default() -> None:
    args = ["--allowed-hosts", "chat.example,127.0.0.1"]
    with Cluster(shards=1, extra_args=args) as named:
        port = named.http_port
        named.wait_for_log(r"http answers requests for hosts: 127\.0\.0\.1, chat\.example")
        host = f"Chat.Example:{port}"
        chat = Raw(port, host=host)
        try:
            assert chat.request("GET", "/").status == 200
            body = {"room": "named", "username": "alice"}
            answer = chat.post("/api/join", body, [("Origin", f"http://chat.example:{port}")])
            assert answer.status == 200
        finally:
            chat.close()
        local = Raw(port, host=f"localhost:{port}")
        try:
            assert local.request("GET", "/").status == 421
        finally:
            local.close()
        assert_clean_log(named)


def test_allowed_hosts_flag_refuses_a_port() -> None:
    result = subprocess.run(
        [sys.executable, str(START_CLUSTER), "--allowed-hosts", "chat.example:8000"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "not a host name" in result.stderr


# --- Expect: 100-continue ------------------------------------------------------------------

_joins = itertools.count(1)


def join_body() -> bytes:
    """A join of room ``continued`` under a name nobody has taken yet."""
    return json.dumps({"room": "continued", "username": f"user{next(_joins)}"}).encode()


JSON = ("Content-Type", "application/json")


def test_100_continue_exchange(raw: Raw) -> None:
    body = join_body()
    expect = ("Expect", "100-continue")
    raw.send(raw.head("POST", "/api/join", [JSON, expect], len(body)))
    assert raw.read_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    raw.send(body)
    answer = raw.answer()
    assert answer.status == 200 and json.loads(answer.body)["room"] == "continued"
    # Once per request, and the connection goes on.
    raw.send(raw.head("POST", "/api/leave", [JSON, ("Expect", "100-Continue")], 2))
    assert raw.read_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    raw.send(b"{}")
    assert raw.answer().status == 200
    assert raw.request("GET", "/healthz").status == 200


def test_no_100_continue_when_the_body_came_with_the_head(raw: Raw) -> None:
    body = join_body()
    expect = ("Expect", "100-continue")
    raw.send(raw.head("POST", "/api/join", [JSON, expect], len(body)) + body)
    assert raw.answer().status == 200


def test_no_100_continue_for_http10(raw: Raw) -> None:
    body = join_body()
    expect = ("Expect", "100-continue")
    raw.send(raw.head("POST", "/api/join", [JSON, expect], len(body), "HTTP/1.0"))
    assert raw.nothing_arrives()
    raw.send(body)
    assert raw.answer().status == 200


@pytest.mark.parametrize(
    "fields, length, status, code",
    [
        ([JSON], 1_000_000, 413, "body_too_large"),
        ([JSON, ("Transfer-Encoding", "chunked")], None, 411, "length_required"),
        ([JSON, ("Host", "evil.example")], 10, 421, "misdirected_request"),
        ([JSON, ("Origin", "http://evil.example")], 10, 403, "bad_origin"),
        ([("Content-Type", "text/plain")], 10, 415, "unsupported_media_type"),
    ],
    ids=["413", "411", "bad-host", "bad-origin", "not-json"],
)
def test_no_100_continue_when_the_head_is_refused(
    cluster: Cluster, fields: List[Tuple[str, str]], length: Optional[int], status: int, code: str
) -> None:
    connection = Raw(cluster.http_port)
    try:
        expect = ("Expect", "100-continue")
        connection.send(connection.head("POST", "/api/join", [*fields, expect], length))
        answer = connection.answer()  # the final answer, with no 100 before it
        assert (answer.status, answer.code) == (status, code)
        assert answer.headers["connection"] == "close" and connection.closed()
    finally:
        connection.close()


@pytest.mark.parametrize("expect", ["200-ok", "100-continue, foo", "x"], ids=str)
def test_other_expectations_are_417(raw: Raw, expect: str) -> None:
    body = join_body()
    raw.send(raw.head("POST", "/api/join", [JSON, ("Expect", expect)], len(body)))
    answer = raw.answer()
    assert (answer.status, answer.code) == (417, "expectation_failed")
    assert answer.headers["connection"] == "close"


# --- JSON fields of the wrong type --------------------------------------------------------


@pytest.fixture
def member(cluster: Cluster) -> Iterator[Raw]:
    """A new session in room ``typed``; it ends afterwards (unless the test ended it)."""
    connection = Raw(cluster.http_port)
    assert connection.post("/api/join", {"room": "typed", "username": "tina"}).status == 200
    yield connection
    connection.post("/api/leave", {})
    connection.close()


@pytest.mark.parametrize(
    "room", [None, 5, 1.5, True, [], ["typed"], {}, "", "bad room", "x" * 65], ids=repr
)
def test_leave_with_a_bad_room_is_400_and_the_session_stays(member: Raw, room: Any) -> None:
    answer = member.post("/api/leave", {"room": room})
    assert (answer.status, answer.code) == (400, "invalid_room")
    # The session still works: it is in its room and can talk there.
    sent = member.post("/api/send", {"room": "typed", "text": "still here"})
    assert sent.status == 200, sent
    info = member.request("GET", "/api/session")
    assert json.loads(info.body)["rooms"] == ["typed"]


def test_leave_without_room_still_ends_the_session(member: Raw) -> None:
    answer = member.post("/api/leave", {"other": 1})
    assert answer.status == 200 and json.loads(answer.body) == {"ok": True, "ended": True}
    assert member.post("/api/send", {"room": "typed", "text": "x"}).code == "no_session"


@pytest.mark.parametrize("username", [None, 5, [], {}, "", "a b", "\ud800"], ids=repr)
def test_send_with_a_bad_username_is_400(member: Raw, username: Any) -> None:
    answer = member.post("/api/send", {"room": "typed", "text": "x", "username": username})
    assert (answer.status, answer.code) == (400, "invalid_username")


@pytest.mark.parametrize(
    "body, code",
    [
        ({"room": None, "text": "x"}, "invalid_room"),
        ({"room": ["typed"], "text": "x"}, "invalid_room"),
        ({"room": "typed", "text": None}, "invalid_text"),
        ({"room": "typed", "text": ["x"]}, "invalid_text"),
    ],
    ids=["room-null", "room-list", "text-null", "text-list"],
)
def test_send_with_a_field_of_the_wrong_type_is_400(
    member: Raw, body: Dict[str, Any], code: str
) -> None:
    answer = member.post("/api/send", body)
    assert (answer.status, answer.code) == (400, code)


@pytest.mark.parametrize(
    "body, code",
    [
        ({"room": None, "username": "tina"}, "invalid_room"),
        ({"room": {"a": 1}, "username": "tina"}, "invalid_room"),
        ({"room": "typed2", "username": None}, "invalid_username"),
        ({"room": "typed2", "username": 7}, "invalid_username"),
    ],
    ids=["room-null", "room-object", "username-null", "username-number"],
)
def test_join_with_a_field_of_the_wrong_type_is_400(
    member: Raw, body: Dict[str, Any], code: str
) -> None:
    answer = member.post("/api/join", body)
    assert (answer.status, answer.code) == (400, code)


@pytest.mark.parametrize(
    "query",
    [
        "room=typed&room=typed",
        "room=typed&after=0&after=1",
        "room=typed&epoch=1&epoch=2",
        "cursors=typed:0&cursors=typed:1",
        "cursors=typed:0&after=3",
        "cursors=typed:0&epoch=3",
    ],
    ids=[
        "room-twice",
        "after-twice",
        "epoch-twice",
        "cursors-twice",
        "cursors-and-after",
        "cursors-and-epoch",
    ],
)
def test_poll_parameters_given_twice_are_400(member: Raw, query: str) -> None:
    answer = member.request("GET", "/api/poll?" + query)
    assert (answer.status, answer.code) == (400, "invalid_cursor")


def test_no_traceback_in_the_log(cluster: Cluster) -> None:
    assert_clean_log(cluster)
