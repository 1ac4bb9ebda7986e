"""The name and text rules on a real cluster, over both protocols: look-alike usernames and
room names are refused with the same words on TCP and HTTP, compatibility forms are the
plain name, bidi overrides arrive closed, blank text is refused, and names in one
non-Latin script chat normally."""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import pytest

from tests.cluster import Cluster, LineClient

pytestmark = pytest.mark.timeout(60)

MIXED_USERNAME = "ERROR invalid username: mixes Cyrillic and Latin scripts"
INVISIBLE_USERNAME = "ERROR invalid username: invisible or filler characters are not allowed"
MIXED_ROOM = "ERROR invalid room name: mixes Latin and Cyrillic scripts"
LOOKALIKE_ROOM = "ERROR invalid room name: uses look-alikes of Latin letters"
MSG_USAGE = "ERROR usage: MSG <room> <text>"


class Browser:
    """The JSON API with one session cookie, as the browser UI uses it."""

    def __init__(self, cluster: Cluster) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=10)
        self.cookie: Optional[str] = None

    def request(self, method: str, path: str, body: Any = None) -> Tuple[int, Dict[str, Any]]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.cookie:
            headers["Cookie"] = f"sc_session={self.cookie}"
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = json.loads(response.read())
        cookie = response.headers.get("Set-Cookie")
        if cookie:
            self.cookie = cookie.split(";")[0].split("=", 1)[1] or None
        return response.status, payload

    def join(self, room: str, username: str) -> Tuple[int, Dict[str, Any]]:
        return self.request("POST", "/api/join", {"room": room, "username": username})

    def send(self, room: str, text: str) -> Tuple[int, Dict[str, Any]]:
        return self.request("POST", "/api/send", {"room": room, "text": text})

    def poll_texts(self, room: str) -> List[str]:
        status, payload = self.request("GET", f"/api/poll?room={quote(room)}&after=0")
        assert status == 200, payload
        return [message["text"] for message in payload["messages"] if message["type"] == "chat"]

    def close(self) -> None:
        self.conn.close()


def error_of(reply: Tuple[int, Dict[str, Any]], status: int, code: str) -> str:
    """The error message of *reply*, after checking its status and code."""
    got, payload = reply
    assert got == status, payload
    assert payload["error"]["code"] == code, payload
    return payload["error"]["message"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(extra_args=["--rate-limit", "0"]) as running:
        yield running


@pytest.fixture
def tcp(cluster: Cluster) -> Iterator[LineClient]:
    client = cluster.connect()
    yield client
    client.close()


@pytest.fixture
def browser(cluster: Cluster) -> Iterator[Browser]:
    client = Browser(cluster)
    yield client
    client.close()


def unique(prefix: str, _counter: List[int] = [0]) -> str:  # noqa: B006
    _counter[0] += 1
    return f"{prefix}{_counter[0]}"


# --- usernames ---------------------------------------------------------------------------

#: Usernames that must not join a room where "alice" is, and the line TCP gets for each.
ALICE_IMPOSTORS = [
    ("\u0430lice", MIXED_USERNAME),  # Cyrillic а
    ("alice\u3164", INVISIBLE_USERNAME),  # HANGUL FILLER
    ("al\u200bice", INVISIBLE_USERNAME),  # ZERO WIDTH SPACE
    ("\uff41\uff4c\uff49\uff43\uff45", "ERROR name taken in {room}"),  # fullwidth: is alice
    ("\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e", "ERROR name taken in {room}"),
    ("\u1d00\u029f\u026a\u1d04\u1d07", "ERROR name taken in {room}"),  # small capitals
    ("ALICE", "ERROR name taken in {room}"),
]


@pytest.mark.parametrize(("name", "line"), ALICE_IMPOSTORS, ids=[n for n, _ in ALICE_IMPOSTORS])
def test_look_alikes_of_alice_cannot_join_over_tcp(
    cluster: Cluster, tcp: LineClient, name: str, line: str
) -> None:
    room = unique("impostor")
    tcp.join(room, "alice")
    impostor = cluster.connect()
    try:
        impostor.send(f"JOIN {room} {name}")
        impostor.expect(line.format(room=room))
        impostor.send(f"NAMES {room}")
        impostor.expect(f"NAMES {room} alice")
    finally:
        impostor.close()


@pytest.mark.parametrize(("name", "line"), ALICE_IMPOSTORS, ids=[n for n, _ in ALICE_IMPOSTORS])
def test_look_alikes_of_alice_cannot_join_over_http(
    tcp: LineClient, browser: Browser, name: str, line: str
) -> None:
    room = unique("impostor")
    tcp.join(room, "alice")
    reply = browser.join(room, name)
    if "name taken" in line:
        error_of(reply, 409, "name_taken")
    else:
        # The same words as the line protocol's, without "ERROR ".
        assert error_of(reply, 400, "invalid_username") == line[len("ERROR ") :]
    assert browser.cookie is None  # a refused first join makes no session


def test_a_whole_script_look_alike_takes_the_name_on_both_protocols(
    cluster: Cluster, tcp: LineClient, browser: Browser
) -> None:
    room = unique("ape")
    tcp.join(room, "ape")
    cyrillic = "\u0430\u0440\u0435"  # all Cyrillic, valid on its own
    error_of(browser.join(room, cyrillic), 409, "name_taken")
    other = cluster.connect()
    try:
        other.send(f"JOIN {room} {cyrillic}")
        other.expect(f"ERROR name taken in {room}")
        other.join(unique("elsewhere"), cyrillic)  # fine in a room without "ape"
    finally:
        other.close()


# --- room names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "line"),
    [
        ("l\u043ebby", MIXED_ROOM),  # Cyrillic о
        ("\u0441\u043e\u0435", LOOKALIKE_ROOM),  # all Cyrillic "сое"
        ("\u039a\u039f\u03a4", LOOKALIKE_ROOM),  # all Greek "ΚΟΤ"
        ("lobby\ufeff", "ERROR invalid room name: invisible or filler characters are not allowed"),
    ],
    ids=["mixed", "cyrillic", "greek", "invisible"],
)
def test_look_alike_rooms_are_refused_on_both_protocols(
    cluster: Cluster, tcp: LineClient, browser: Browser, room: str, line: str
) -> None:
    tcp.send(f"JOIN {room} alice")
    tcp.expect(line)
    tcp.send(f"NAMES {room}")
    tcp.expect(line)
    assert error_of(browser.join(room, "bob"), 400, "invalid_room") == line[len("ERROR ") :]
    members = browser.request("GET", f"/api/rooms/{quote(room)}/members")
    assert error_of(members, 400, "invalid_room") == line[len("ERROR ") :]


def test_a_fullwidth_room_is_the_ascii_room(tcp: LineClient, browser: Browser) -> None:
    room = unique("wide")
    wide = "".join(chr(ord(char) + 0xFEE0) for char in room)  # ＡＳＣＩＩ -> fullwidth
    tcp.join(room, "carol")
    status, payload = browser.join(wide, "bob")
    assert status == 200 and payload["room"] == room, payload
    tcp.expect(f"INFO bob joined {room}")
    status, payload = browser.request("GET", f"/api/rooms/{quote(wide)}/members")
    assert (status, payload) == (200, {"room": room, "members": ["bob", "carol"]})
    # A poll cursor names the room in either form.
    status, payload = browser.request("GET", f"/api/poll?cursors={quote(wide)}:0")
    assert status == 200 and list(payload["rooms"]) == [room], payload


def test_a_poll_cursor_with_a_look_alike_room_is_refused(browser: Browser) -> None:
    room = unique("cursor")
    assert browser.join(room, "dan")[0] == 200
    reply = browser.request("GET", f"/api/poll?cursors={quote('l' + chr(0x43E) + 'bby')}:0")
    assert "mixes Latin and Cyrillic scripts" in error_of(reply, 400, "invalid_cursor")


# --- text --------------------------------------------------------------------------------


def test_a_bidi_override_arrives_closed(tcp: LineClient, browser: Browser) -> None:
    room = unique("bidi")
    tcp.join(room, "carol")
    assert browser.join(room, "bob")[0] == 200
    tcp.expect(f"INFO bob joined {room}")
    tcp.send(f"MSG {room} \u202eevil")
    tcp.expect(f"MSG {room} carol \u202eevil\u202c")
    assert browser.send(room, "\u2067isolate")[0] == 200
    tcp.expect(f"MSG {room} bob \u2067isolate\u2069")
    assert browser.send(room, "stray\u202c closer\u2069")[0] == 200
    tcp.expect(f"MSG {room} bob stray closer")
    assert browser.poll_texts(room) == [
        "\u202eevil\u202c",
        "\u2067isolate\u2069",
        "stray closer",
    ]
    tcp.send(f"HISTORY {room} 3")
    lines = tcp.read_lines(4)
    assert lines[0].endswith("carol \u202eevil\u202c"), lines


@pytest.mark.parametrize(
    "text", [" ", "   ", "\u3000", "\u00a0", "\u200b", "\u3164", "\u2800 \u200b"], ids=repr
)
def test_blank_text_is_refused_on_both_protocols(
    tcp: LineClient, browser: Browser, text: str
) -> None:
    room = unique("blank")
    tcp.join(room, "carol")
    assert browser.join(room, "bob")[0] == 200
    tcp.expect(f"INFO bob joined {room}")
    tcp.send(f"MSG {room} {text}")
    tcp.expect(MSG_USAGE)
    message = error_of(browser.send(room, text), 400, "invalid_text")
    assert "blank" in message
    tcp.send(f"MSG {room} visible")  # nothing else reached the room
    tcp.expect(f"MSG {room} carol visible")
    assert browser.poll_texts(room) == ["visible"]


# --- names in other scripts --------------------------------------------------------------


def test_names_in_one_non_latin_script_join_and_chat(tcp: LineClient, browser: Browser) -> None:
    room = unique("мир")
    tcp.join(room, "Дмитрий")
    status, payload = browser.join(room, "李雷")
    assert status == 200 and payload["username"] == "李雷", payload
    tcp.expect(f"INFO 李雷 joined {room}")
    assert browser.send(room, "你好")[0] == 200
    tcp.expect(f"MSG {room} 李雷 你好")
    tcp.send(f"MSG {room} привет")
    tcp.expect(f"MSG {room} Дмитрий привет")
    assert browser.poll_texts(room) == ["你好", "привет"]
    tcp.send(f"NAMES {room}")
    tcp.expect(f"NAMES {room} Дмитрий 李雷")
