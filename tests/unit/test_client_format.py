"""Unit tests for the chat client's pure parts: no sockets, no threads, no terminal."""

from __future__ import annotations

import sys
from datetime import timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from the checkout
    sys.path.insert(0, str(ROOT))

from common.names import check_username, normalize  # noqa: E402
from scripts.chat_client import (  # noqa: E402
    HELP_LINES,
    WELCOME_SHOWN,
    ClientState,
    apply_server_line,
    expects_reply,
    format_server_line,
    is_valid_name,
    normalize_name,
    reply_matches,
    reply_to_server_line,
    user_line_to_command,
)

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc
STAMP = "2026-11-26T00:23:19.123Z"
HISTORY_USAGE = "! usage: /history [n]   (n: a whole number from 1 to 500)"
HISTORY_TOO_MANY = (
    "! /history shows at most 500 events (the server keeps the last 500 of each room); "
    "try /history 500"
)


# --------------------------------------------------------------------------- server lines


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("MSG lobby alice hello", "[lobby] alice: hello"),
        ("PRIVMSG lobby alice bob psst  there", "[lobby] (private) alice -> bob: psst  there"),
        ("MSG lobby alice  two  spaces ", "[lobby] alice:  two  spaces "),
        ("MSG lobby alice /not a command", "[lobby] alice: /not a command"),
        ("MSG 日本 zoë ça va", "[日本] zoë: ça va"),
        ("MSG lobby alice hello\r\n", "[lobby] alice: hello"),
        ("INFO welcome to shardchat; commands: JOIN <room> <username>, ...", WELCOME_SHOWN),
        ("INFO welcome to shardchat", WELCOME_SHOWN),
        ("INFO joined room lobby", "* joined room lobby"),
        ("INFO alice joined lobby", "* alice joined lobby"),
        ("INFO bye", "* bye"),
        ("ERROR not in room dev", "! not in room dev"),
        ("ERROR name taken in lobby", "! name taken in lobby"),
        ("NAMES lobby alice bob carol", "* in lobby (3): alice, bob, carol"),
        ("NAMES lobby bob", "* in lobby (1): bob"),
        ("NAMES empty", "* nobody in empty"),
        ("ROOM lobby 3", "* room lobby: 3 members"),
        ("ROOM dev 1", "* room dev: 1 member"),
        ("END ROOMS 2", "* 2 rooms"),
        ("END ROOMS 1", "* 1 room"),
        ("END ROOMS 0", "* no rooms"),
        (f"HISTORY lobby 7 {STAMP} alice hi there", "~ [lobby] 00:23 alice: hi there"),
        (f"HISTORY lobby 1 {STAMP} * alice joined lobby", "~ [lobby] 00:23 * alice joined lobby"),
        ("HISTORY lobby 2 2026-11-26T13:05:00Z bob x", "~ [lobby] 13:05 bob: x"),
        ("HISTORY lobby 2 yesterday bob x", "~ [lobby] yesterday bob: x"),
        ("END HISTORY lobby 2", "~ [lobby] end of history, 2 events"),
        ("END HISTORY lobby 1", "~ [lobby] end of history, 1 event"),
        ("PONG abc", "* pong abc"),
        ("PONG", "* pong"),
        ("msg lobby alice lower-case verb", "[lobby] alice: lower-case verb"),
    ],
    ids=lambda value: value if len(value) < 40 else value[:40],
)
def test_format_server_line(line: str, shown: str) -> None:
    assert format_server_line(line, UTC) == shown


@pytest.mark.parametrize(
    "line",
    ["PING", "PING token-1", "", "   ", "\n", "\r\n"],
    ids=["ping", "ping-token", "empty", "spaces", "lf", "crlf"],
)
def test_format_hides_pings_and_blank_lines(line: str) -> None:
    assert format_server_line(line, UTC) is None


@pytest.mark.parametrize(
    "line",
    ["MSG lobby", "MSG lobby alice", "ROOM lobby many", "END ROOMS", "END WORLD 3", "HISTORY x 1"],
    ids=["msg-no-user", "msg-no-text", "room-count", "end-rooms", "end-unknown", "history-short"],
)
def test_format_shows_malformed_known_lines_as_they_came(line: str) -> None:
    assert format_server_line(line, UTC) == line


def test_format_shows_unknown_lines_as_they_came() -> None:
    assert format_server_line("WHATEVER this is", UTC) == "WHATEVER this is"


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("MSG lobby eve \x1b[2Jgotcha", "[lobby] eve: \\x1b[2Jgotcha"),
        ("INFO bell\x07 and nul\x00", "* bell\\x07 and nul\\x00"),
        ("MSG lobby eve a\rb", "[lobby] eve: a\\x0db"),
        ("MSG lobby eve tab\tkept", "[lobby] eve: tab\tkept"),
    ],
    ids=["escape", "bell-nul", "carriage-return", "tab"],
)
def test_format_escapes_control_characters(line: str, shown: str) -> None:
    assert format_server_line(line, UTC) == shown


def test_format_history_time_uses_the_given_zone() -> None:
    plus_two = timezone(timedelta(hours=2))
    shown = format_server_line(f"HISTORY lobby 7 {STAMP} alice hi", plus_two)
    assert shown == "~ [lobby] 02:23 alice: hi"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("PING", "PONG"),
        ("PING abc123", "PONG abc123"),
        ("ping x", "PONG x"),
        ("PING abc\r\n", "PONG abc"),
        ("PONG abc", None),
        ("MSG lobby alice PING", None),
        ("INFO PING", None),
    ],
    ids=["bare", "token", "lower-case", "crlf", "pong", "msg", "info"],
)
def test_reply_to_server_line(line: str, reply: str | None) -> None:
    assert reply_to_server_line(line) == reply


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("JOIN lobby bob", True),
        ("MSG lobby hi", True),
        ("PRIVMSG lobby alice hi", True),
        ("LEAVE lobby", True),
        ("NAMES lobby", True),
        ("ROOMS", True),
        ("HISTORY lobby 5", True),
        ("QUIT", False),
        ("PONG tok", False),
    ],
    ids=["join", "msg", "privmsg", "leave", "names", "rooms", "history", "quit", "pong"],
)
def test_expects_reply(command: str, expected: bool) -> None:
    assert expects_reply(command) is expected


@pytest.mark.parametrize(
    ("command", "line", "expected"),
    [
        ("JOIN lobby bob", "INFO joined room lobby", True),
        ("JOIN lobby bob", "INFO joined room lobby2", False),
        ("JOIN lobby bob", "INFO alice joined lobby", False),
        ("MSG lobby hi there", "MSG lobby bob hi there", True),
        ("MSG lobby hi", "MSG lobby alice hi", False),
        ("MSG lobby hi", "MSG dev bob hi", False),
        ("PRIVMSG lobby alice hi", "PRIVMSG lobby bob alice hi", True),
        ("PRIVMSG lobby bob hi", "PRIVMSG lobby alice bob hi", False),
        ("LEAVE lobby", "INFO left room lobby", True),
        ("LEAVE lobby", "INFO bob left lobby", False),
        ("NAMES lobby", "NAMES lobby alice bob", True),
        ("NAMES lobby", "NAMES lobby", True),
        ("NAMES lobby", "NAMES lobby2 bob", False),
        ("ROOMS", "ROOM lobby 2", False),
        ("ROOMS", "END ROOMS 1", True),
        ("HISTORY lobby 5", f"HISTORY lobby 1 {STAMP} bob hi", False),
        ("HISTORY lobby 5", "END HISTORY lobby 1", True),
        ("HISTORY lobby", "END HISTORY dev 1", False),
        ("QUIT", "INFO bye", False),
        ("MSG lobby hi", "ERROR not in room lobby", False),
    ],
    ids=[
        "join",
        "join-other-room",
        "join-other-user",
        "msg-echo",
        "msg-other-user",
        "msg-other-room",
        "privmsg-echo",
        "privmsg-received-is-no-echo",
        "leave",
        "leave-other-user",
        "names",
        "names-empty",
        "names-other-room",
        "rooms-line",
        "rooms-end",
        "history-line",
        "history-end",
        "history-other-room",
        "quit-not-counted",
        "error-left-to-session",
    ],
)
def test_reply_matches(command: str, line: str, expected: bool) -> None:
    assert reply_matches(command, line, "bob") is expected


# --------------------------------------------------------------------------- user lines

BOB = ClientState("bob", current="lobby", joined=("lobby",))
BOB_TWO_ROOMS = ClientState("bob", current="dev", joined=("lobby", "dev"))
NOWHERE = ClientState("bob")


@pytest.mark.parametrize(
    ("line", "state", "send"),
    [
        ("hello", BOB, ["MSG lobby hello"]),
        ("  indented  and trailing  ", BOB, ["MSG lobby   indented  and trailing  "]),
        ("hello\r", BOB, ["MSG lobby hello"]),
        ("hello", BOB_TWO_ROOMS, ["MSG dev hello"]),
        ("//slash", BOB, ["MSG lobby /slash"]),
        ("// spaced", BOB, ["MSG lobby / spaced"]),
        ("/join dev", BOB, ["JOIN dev bob"]),
        ("/JOIN dev", BOB, ["JOIN dev bob"]),
        ("/join zoe\u0308", BOB, ["JOIN zo\u00eb bob"]),
        ("/leave", BOB, ["LEAVE lobby"]),
        ("/leave lobby", BOB_TWO_ROOMS, ["LEAVE lobby"]),
        ("/leave elsewhere", BOB, ["LEAVE elsewhere"]),
        ("/quit", BOB, ["QUIT"]),
        ("/rooms", NOWHERE, ["ROOMS"]),
        ("/names", BOB, ["NAMES lobby"]),
        ("/names dev", NOWHERE, ["NAMES dev"]),
        ("/history", BOB, ["HISTORY lobby"]),
        ("/history 20", BOB_TWO_ROOMS, ["HISTORY dev 20"]),
        ("/history 1", BOB, ["HISTORY lobby 1"]),
        ("/history 500", BOB, ["HISTORY lobby 500"]),
        ("/history 0500", BOB, ["HISTORY lobby 0500"]),
        ("/dm alice  hi  there ", BOB, ["PRIVMSG lobby alice  hi  there "]),
        ("/DM alice hi", BOB_TWO_ROOMS, ["PRIVMSG dev alice hi"]),
        ("/dm zoe\u0308 hi", BOB, ["PRIVMSG lobby zo\u00eb hi"]),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_user_line_sends(line: str, state: ClientState, send: list[str]) -> None:
    action = user_line_to_command(line, state)
    assert list(action.send) == send
    assert action.notices == ()


@pytest.mark.parametrize(
    ("line", "state", "notice"),
    [
        ("hello", NOWHERE, "! you are not in a room; /join <room> first"),
        ("//slash", NOWHERE, "! you are not in a room; /join <room> first"),
        ("/frobnicate x", BOB, "! unknown command /frobnicate; type /help for the commands"),
        ("/", BOB, "! unknown command /; type /help for the commands"),
        ("/join", BOB, "! usage: /join <room>"),
        ("/join a b", BOB, "! usage: /join <room>"),
        ("/join bad!room", BOB, "! invalid room name: 1-64 letters, digits, _ - ."),
        ("/join " + "r" * 65, BOB, "! invalid room name: 1-64 letters, digits, _ - ."),
        ("/join lobby", BOB_TWO_ROOMS, "* talking in lobby"),
        ("/leave", NOWHERE, "! you are not in a room; /join <room> first"),
        ("/leave a b", BOB, "! usage: /leave [room]"),
        ("/switch", BOB, "! usage: /switch <room>"),
        ("/switch dev", BOB, "! you are not in dev; /join dev first"),
        ("/switch lobby", BOB_TWO_ROOMS, "* talking in lobby"),
        ("/quit now", BOB, "! usage: /quit"),
        ("/rooms all", BOB, "! usage: /rooms"),
        ("/names", NOWHERE, "! you are not in a room; /join <room> first"),
        ("/names a b", BOB, "! usage: /names [room]"),
        ("/history", NOWHERE, "! you are not in a room; /join <room> first"),
        ("/dm", BOB, "! usage: /dm <name> <msg>"),
        ("/dm alice", BOB, "! usage: /dm <name> <msg>"),
        ("/dm alice   ", BOB, "! usage: /dm <name> <msg>"),
        ("/dm alice hi", NOWHERE, "! you are not in a room; /join <room> first"),
        ("/dm al!ce hi", BOB, "! invalid username: 1-32 letters, digits, _ - ."),
        ("/history lots", BOB, HISTORY_USAGE),
        ("/history 0", BOB, HISTORY_USAGE),
        ("/history 000", BOB, HISTORY_USAGE),
        ("/history -3", BOB, HISTORY_USAGE),
        ("/history 1.5", BOB, HISTORY_USAGE),
        ("/history 1 2", BOB, HISTORY_USAGE),
        ("/history 501", BOB, HISTORY_TOO_MANY),
        ("/history 600", BOB, HISTORY_TOO_MANY),
        ("/history 0600", BOB, HISTORY_TOO_MANY),
        ("/history " + "9" * 5000, BOB, HISTORY_TOO_MANY),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 30 else None,
)
def test_user_line_is_answered_locally(line: str, state: ClientState, notice: str) -> None:
    action = user_line_to_command(line, state)
    assert action.send == ()
    assert action.notices == (notice,)
    assert not action.quit


@pytest.mark.parametrize("line", ["", "   ", "\t", "\r\n"], ids=["empty", "spaces", "tab", "crlf"])
def test_blank_user_lines_do_nothing(line: str) -> None:
    assert user_line_to_command(line, BOB) == user_line_to_command("", BOB)
    assert user_line_to_command(line, BOB).send == ()
    assert user_line_to_command(line, BOB).notices == ()


def test_help_lists_every_command_and_sends_nothing() -> None:
    action = user_line_to_command("/help", BOB)
    assert action.send == ()
    assert action.notices == HELP_LINES
    text = "\n".join(action.notices)
    for command in ("/join", "/leave", "/switch", "/rooms", "/names", "/history", "/quit", "//"):
        assert command in text


def test_quit_asks_to_quit() -> None:
    assert user_line_to_command("/quit", BOB).quit
    assert not user_line_to_command("hello", BOB).quit


def test_join_makes_the_new_room_current() -> None:
    state = user_line_to_command("/join dev", BOB).state
    assert state.current == "dev"
    assert state.joined == ("lobby", "dev")
    assert user_line_to_command("hi", state).send == ("MSG dev hi",)


def test_switch_changes_the_current_room_without_traffic() -> None:
    action = user_line_to_command("/switch lobby", BOB_TWO_ROOMS)
    assert action.state.current == "lobby"
    assert action.state.joined == BOB_TWO_ROOMS.joined
    assert user_line_to_command("hi", action.state).send == ("MSG lobby hi",)


@pytest.mark.parametrize(
    ("line", "state", "current", "joined"),
    [
        ("/leave", BOB_TWO_ROOMS, "lobby", ("lobby",)),
        ("/leave lobby", BOB_TWO_ROOMS, "dev", ("dev",)),
        ("/leave", BOB, None, ()),
    ],
    ids=["current-falls-back", "other-room", "last-room"],
)
def test_leave_updates_rooms(
    line: str, state: ClientState, current: str | None, joined: tuple[str, ...]
) -> None:
    after = user_line_to_command(line, state).state
    assert (after.current, after.joined) == (current, joined)


def test_leave_falls_back_to_the_most_recently_joined_room() -> None:
    state = ClientState("bob", current="b", joined=("a", "b", "c"))
    assert user_line_to_command("/leave", state).state.current == "c"


# --------------------------------------------------------------------------- state from server


@pytest.mark.parametrize(
    ("line", "state", "current", "joined"),
    [
        ("INFO joined room lobby", NOWHERE, "lobby", ("lobby",)),
        ("INFO joined room dev", BOB, "lobby", ("lobby", "dev")),
        ("INFO left room dev", BOB_TWO_ROOMS, "lobby", ("lobby",)),
        ("ERROR name taken in dev", BOB_TWO_ROOMS, "lobby", ("lobby",)),
        ("ERROR not in room dev", BOB_TWO_ROOMS, "lobby", ("lobby",)),
        ("ERROR already in room dev", BOB, "lobby", ("lobby", "dev")),
        ("INFO alice joined dev", BOB, "lobby", ("lobby",)),
        ("INFO alice left lobby", BOB, "lobby", ("lobby",)),
        ("INFO joined joined room", BOB, "lobby", ("lobby",)),
        ("MSG lobby alice INFO joined room x", BOB, "lobby", ("lobby",)),
        ("ERROR invalid room name: 1-64 letters, digits, _ - .", BOB, "lobby", ("lobby",)),
    ],
    ids=[
        "joined-first",
        "joined-second-keeps-current",
        "left",
        "name-taken",
        "not-in-room",
        "already-in-room",
        "other-user-joined",
        "other-user-left",
        "user-called-joined",
        "msg",
        "other-error",
    ],
)
def test_apply_server_line(
    line: str, state: ClientState, current: str | None, joined: tuple[str, ...]
) -> None:
    after = apply_server_line(state, line)
    assert (after.current, after.joined) == (current, joined)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("bob", True),
        ("zoë", True),
        ("日本", True),
        ("a_b-c.d", True),
        ("x" * 32, True),
        ("", False),
        ("a b", False),
        ("bob!", False),
        ("x" * 33, False),
        ("नमस्ते", True),
    ],
    ids=[
        "ascii",
        "accent",
        "cjk",
        "punctuation",
        "longest",
        "empty",
        "space",
        "bang",
        "long",
        "marks",
    ],
)
def test_is_valid_name(name: str, valid: bool) -> None:
    assert is_valid_name(name, 32) is valid


def test_the_client_never_refuses_a_name_the_server_takes() -> None:
    for name in ["नमस्ते", "q\u0301", "ᏣᎳᎩ", "Ἀθῆναι", "山田たろう", "محمد٣"]:
        assert check_username(name) == name
        assert is_valid_name(name, 32)


@pytest.mark.parametrize(("raw", "normal"), [("zoe\u0308", "zoë"), ("ｌｏｂｂｙ", "lobby")])
def test_normalize_name_is_the_servers(raw: str, normal: str) -> None:
    assert normalize_name(raw) == normalize(raw) == normal
