"""The sans-IO line protocol: parser events and reply bytes (docs/PROTOCOL.md).

The chunk-boundary tests follow h11's ``test_chunk_boundaries``: whatever way a byte stream
is cut into reads, the parser must produce the same events.
"""

from __future__ import annotations

from typing import Iterable, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import protocol as p
from common.limits import (
    MAX_HISTORY_REPLY,
    MAX_LINE_BYTES,
    MAX_PING_TOKEN_CHARS,
    MAX_ROOM_CHARS,
    MAX_TEXT_CHARS,
    MAX_USERNAME_CHARS,
)

pytestmark = pytest.mark.timeout(60)

LINE_TOO_LONG = p.PeerError(b"ERROR line too long\n", fatal=True)
BAD_UTF8 = p.PeerError(b"ERROR invalid UTF-8\n")
CONTROL = p.PeerError(b"ERROR control characters are not allowed\n")
BAD_ROOM = p.PeerError(b"ERROR invalid room name: 1-64 letters, digits, _ - .\n")
BAD_USERNAME = p.PeerError(b"ERROR invalid username: 1-32 letters, digits, _ - .\n")
TEXT_TOO_LONG = p.PeerError(b"ERROR message too long\n")
UNKNOWN_TAIL = b"; commands: JOIN MSG LEAVE QUIT NAMES ROOMS HISTORY PING\n"


def usage(text: str) -> p.PeerError:
    return p.PeerError(f"ERROR usage: {text}\n".encode())


def feed(chunks: Iterable[bytes], eof: bool = True) -> List[p.Event]:
    """Feed *chunks* to a fresh parser (then end of stream); return every event. Empty
    chunks are skipped: ``b""`` means end of stream to the parser."""
    parser = p.CommandParser()
    events: List[p.Event] = []
    for chunk in chunks:
        if chunk:
            events.extend(parser.receive_data(chunk))
    if eof:
        events.extend(parser.receive_data(b""))
    return events


def parse(line: str) -> List[p.Event]:
    return feed([line.encode() + b"\n"])


def bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- chunk boundaries --------------------------------------------------------------------

SAMPLE = (
    "JOIN lobby zoë\r\n"  # CRLF; 2-byte character
    "\n"  # blank line
    "  \t \r\n"  # spaces and tabs only
    "MSG lobby  héllo 日本  😀 \n"  # text kept as sent; 2-, 3- and 4-byte characters
    "msg lobby x\r\n"
    "NAMES 日本\n"
    "HISTORY lobby 5\r\n"
    "PING tok\n"
).encode() + (
    b"MSG lobby \xff\n"  # invalid UTF-8: not fatal
    b"MSG lobby a\x1bb\n"  # control character: not fatal
    b"FOO\n"
    b"JOIN a\n"
    b"\r\n"
    b"quit\r\n"
    b"PING last"  # unterminated: parsed at end of stream
)

SAMPLE_EVENTS = [
    p.Join("lobby", "zoë"),
    p.Msg("lobby", " héllo 日本  😀 "),
    p.Msg("lobby", "x"),
    p.Names("日本"),
    p.History("lobby", 5),
    p.Ping("tok"),
    BAD_UTF8,
    CONTROL,
    p.PeerError(b"ERROR unknown command FOO" + UNKNOWN_TAIL),
    usage("JOIN <room> <username>"),
    p.Quit(),
    p.Ping("last"),
]


def test_sample_in_one_chunk() -> None:
    assert feed([SAMPLE]) == SAMPLE_EVENTS


def test_sample_byte_by_byte() -> None:
    assert feed(bytewise(SAMPLE)) == SAMPLE_EVENTS


@pytest.mark.parametrize("offset", range(len(SAMPLE) + 1))
def test_sample_split_at_every_offset(offset: int) -> None:
    assert feed([SAMPLE[:offset], SAMPLE[offset:]]) == SAMPLE_EVENTS


@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=12))
def test_sample_split_anywhere(cuts: List[int]) -> None:
    bounds = [0, *sorted(cuts), len(SAMPLE)]
    chunks = [SAMPLE[a:b] for a, b in zip(bounds, bounds[1:])]
    assert feed(chunks) == SAMPLE_EVENTS


def test_events_come_as_soon_as_the_line_ends() -> None:
    parser = p.CommandParser()
    assert parser.receive_data(b"PING a\nPI") == [p.Ping("a")]
    assert parser.receive_data(b"NG b") == []
    assert parser.receive_data(b"\r") == []
    assert parser.receive_data(b"\n") == [p.Ping("b")]


# --- commands ----------------------------------------------------------------------------

COMMANDS = [
    ("JOIN lobby alice", p.Join("lobby", "alice")),
    ("join lobby alice", p.Join("lobby", "alice")),
    ("jOiN lobby alice", p.Join("lobby", "alice")),
    ("JOIN Lobby Alice", p.Join("Lobby", "Alice")),
    ("  JOIN lobby alice", p.Join("lobby", "alice")),
    ("MSG lobby hi", p.Msg("lobby", "hi")),
    ("Msg lobby hi", p.Msg("lobby", "hi")),
    ("MSG lobby  inner   spaces kept  ", p.Msg("lobby", " inner   spaces kept  ")),
    ("MSG lobby tab\there", p.Msg("lobby", "tab\there")),
    ("MSG lobby JOIN x y", p.Msg("lobby", "JOIN x y")),
    ("LEAVE lobby", p.Leave("lobby")),
    ("leave lobby", p.Leave("lobby")),
    ("PRIVMSG lobby bob hi", p.Privmsg("lobby", "bob", "hi")),
    ("privmsg lobby Bob  inner   spaces kept ", p.Privmsg("lobby", "Bob", " inner   spaces kept ")),
    ("PRIVMSG lobby\tbob\tMSG x y", p.Privmsg("lobby", "bob", "MSG x y")),
    ("PRIVMSG lobby ｂｏｂ hi", p.Privmsg("lobby", "bob", "hi")),
    ("QUIT", p.Quit()),
    ("quit", p.Quit()),
    ("QUIT ", p.Quit()),
    ("NAMES lobby", p.Names("lobby")),
    ("names lobby", p.Names("lobby")),
    ("ROOMS", p.Rooms()),
    ("rooms", p.Rooms()),
    ("HISTORY lobby", p.History("lobby", MAX_HISTORY_REPLY)),
    ("history lobby 1", p.History("lobby", 1)),
    ("HISTORY lobby 500", p.History("lobby", 500)),
    ("HISTORY lobby 007", p.History("lobby", 7)),
    ("PING", p.Ping("")),
    ("ping", p.Ping("")),
    ("PING abc", p.Ping("abc")),
    ("PING " + "t" * MAX_PING_TOKEN_CHARS, p.Ping("t" * MAX_PING_TOKEN_CHARS)),
    ("PONG", p.Pong("")),
    ("pong xyz", p.Pong("xyz")),
]


@pytest.mark.parametrize(
    ("line", "event"), COMMANDS, ids=[repr(line)[1:-1][:40] for line, _ in COMMANDS]
)
def test_command(line: str, event: p.Event) -> None:
    assert parse(line) == [event]


USAGE_ERRORS = [
    ("JOIN", "JOIN <room> <username>"),
    ("JOIN lobby", "JOIN <room> <username>"),
    ("JOIN lobby alice bob", "JOIN <room> <username>"),
    ("MSG", "MSG <room> <text>"),
    ("MSG lobby", "MSG <room> <text>"),
    ("MSG lobby ", "MSG <room> <text>"),
    ("MSG lobby  \t ", "MSG <room> <text>"),
    ("LEAVE", "LEAVE <room>"),
    ("LEAVE a b", "LEAVE <room>"),
    ("PRIVMSG", "PRIVMSG <room> <username> <text>"),
    ("PRIVMSG lobby", "PRIVMSG <room> <username> <text>"),
    ("PRIVMSG lobby bob", "PRIVMSG <room> <username> <text>"),
    ("PRIVMSG lobby bob ", "PRIVMSG <room> <username> <text>"),
    ("PRIVMSG lobby bob  \t ", "PRIVMSG <room> <username> <text>"),
    ("PRIVMSG lobby b@d ", "PRIVMSG <room> <username> <text>"),
    ("NAMES", "NAMES <room>"),
    ("NAMES a b", "NAMES <room>"),
    ("ROOMS x", "ROOMS"),
    ("QUIT now", "QUIT"),
]


@pytest.mark.parametrize(("line", "expected"), USAGE_ERRORS, ids=[u[0] for u in USAGE_ERRORS])
def test_usage_error(line: str, expected: str) -> None:
    assert parse(line) == [usage(expected)]


PRIVMSG_REFUSALS = [
    ("PRIVMSG lobby b@d hi", b"ERROR invalid username: 1-32 letters, digits, _ - .\n"),
    ("PRIVMSG lobby " + "b" * 33 + " hi", b"ERROR invalid username: 1-32 letters, digits, _ - .\n"),
    ("PRIVMSG lo#by bob hi", b"ERROR invalid room name: 1-64 letters, digits, _ - .\n"),
    ("PRIVMSG lobby bob " + "x" * (MAX_TEXT_CHARS + 1), b"ERROR message too long\n"),
]


@pytest.mark.parametrize(
    ("line", "reply"), PRIVMSG_REFUSALS, ids=["name", "long-name", "room", "text"]
)
def test_privmsg_refusals_say_what_is_wrong(line: str, reply: bytes) -> None:
    (event,) = parse(line)
    assert isinstance(event, p.PeerError) and event.reply == reply and not event.fatal


def test_privmsg_line_names_room_sender_and_recipient() -> None:
    assert (
        p.privmsg_line("lobby", "alice", "bob", "hi  there")
        == b"PRIVMSG lobby alice bob hi  there\n"
    )


HISTORY_USAGE = ["HISTORY", "HISTORY a 1 2", "HISTORY a 0", "HISTORY a 501", "HISTORY a -1"]
HISTORY_USAGE += ["HISTORY a abc", "HISTORY a 1.5", "HISTORY a +5", "HISTORY a ²"]


@pytest.mark.parametrize("line", HISTORY_USAGE)
def test_history_usage_error_is_refused_and_not_fatal(line: str) -> None:
    (event,) = parse(line)
    assert isinstance(event, p.PeerError) and not event.fatal
    assert event.reply.startswith(b"ERROR usage: HISTORY <room> [n]")


def test_history_usage_line_is_the_documented_one() -> None:
    assert parse("HISTORY") == [usage("HISTORY <room> [n]")]


HISTORY_RANGE = b"ERROR usage: HISTORY <room> [n] (n is 1-500)\n"
HISTORY_COUNTS = [
    ("0", HISTORY_RANGE),
    ("000", HISTORY_RANGE),
    ("501", HISTORY_RANGE),
    ("9999", HISTORY_RANGE),
    ("-1", HISTORY_RANGE),
    ("-0", HISTORY_RANGE),
    ("1" + "0" * 4000, HISTORY_RANGE),
    ("abc", usage("HISTORY <room> [n]").reply),
    ("1.5", usage("HISTORY <room> [n]").reply),
    ("+5", usage("HISTORY <room> [n]").reply),
    ("\u00b2", usage("HISTORY <room> [n]").reply),
    ("\u0663", usage("HISTORY <room> [n]").reply),  # ARABIC-INDIC DIGIT THREE
    ("-", usage("HISTORY <room> [n]").reply),
]


@pytest.mark.parametrize(("count", "reply"), HISTORY_COUNTS, ids=[c[:8] for c, _ in HISTORY_COUNTS])
def test_history_count_out_of_range_says_the_range(count: str, reply: bytes) -> None:
    (event,) = parse(f"HISTORY lobby {count}")
    assert event == p.PeerError(reply)


@pytest.mark.parametrize("count", ["1", "500", "0500", "007"])
def test_history_counts_at_the_edges_of_the_range_are_accepted(count: str) -> None:
    assert parse(f"HISTORY lobby {count}") == [p.History("lobby", int(count))]


def test_history_range_is_checked_before_the_room_name() -> None:
    # As for the plain usage line: a bad count is reported whatever the room.
    assert parse("HISTORY no/room 501") == [p.ERR_HISTORY_RANGE]


def test_ping_token_too_long() -> None:
    (event,) = parse("PING " + "t" * (MAX_PING_TOKEN_CHARS + 1))
    assert isinstance(event, p.PeerError) and not event.fatal
    assert event.reply.startswith(b"ERROR usage: PING [token]")


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("FOO", b"FOO"),
        ("foo bar baz", b"FOO"),
        ("Hello", b"HELLO"),
        ("V" * 32, b"V" * 32),
        ("V" * 33, b"V" * 32 + b"..."),
    ],
    ids=["bare", "lowercase-with-args", "mixed-case", "32-chars", "33-chars-truncated"],
)
def test_unknown_verb(line: str, shown: bytes) -> None:
    assert parse(line) == [p.PeerError(b"ERROR unknown command " + shown + UNKNOWN_TAIL)]


# --- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"\n", b"\r\n", b"   \n", b"\t\t\n", b" \t \r\n", b"\n\n\n", b"   "],
    ids=["LF", "CRLF", "spaces", "tabs", "mixed", "several", "unterminated-at-eof"],
)
def test_blank_lines_are_ignored(data: bytes) -> None:
    assert feed([data]) == []


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80abc"],
    ids=["ff", "truncated", "overlong", "surrogate", "above-max", "lone-continuation"],
)
def test_invalid_utf8_is_refused_and_not_fatal(data: bytes) -> None:
    assert feed([b"MSG lobby " + data + b"\nPING after\n"]) == [BAD_UTF8, p.Ping("after")]


@pytest.mark.parametrize(
    "char",
    ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9b", "\r", "\x0b", "\x0c"],
    ids=["NUL", "SOH", "ESC", "DEL", "C1-NEL", "C1-CSI", "inner-CR", "VT", "FF"],
)
def test_control_characters_are_refused_and_not_fatal(char: str) -> None:
    data = f"MSG lobby a{char}b\nPING after\n".encode()
    assert feed([data]) == [CONTROL, p.Ping("after")]


@pytest.mark.parametrize(
    "last", [b"\x0b", b"\x0c", b" \x0c\t", b"\r\r"], ids=["VT", "FF", "FF-spaces", "CR-CR"]
)
def test_control_characters_in_an_unterminated_last_line(last: bytes) -> None:
    # Only spaces and tabs make a line blank; bytes.strip() would also drop VT/FF/CR.
    assert feed([b"PING a\n" + last]) == [p.Ping("a"), CONTROL]


def test_tab_is_not_a_control_character() -> None:
    assert parse("MSG lobby a\tb\t") == [p.Msg("lobby", "a\tb\t")]


def test_crlf_drops_only_the_cr() -> None:
    assert feed([b"MSG lobby hi \r\n"]) == [p.Msg("lobby", "hi ")]


def test_unterminated_last_line_is_parsed_at_eof() -> None:
    parser = p.CommandParser()
    assert parser.receive_data(b"PING a\nMSG lobby bye") == [p.Ping("a")]
    assert parser.receive_data(b"") == [p.Msg("lobby", "bye")]
    assert parser.receive_data(b"") == []
    assert parser.receive_data(b"PING late\n") == []


def test_unterminated_last_line_with_cr_is_parsed_at_eof() -> None:
    assert feed([b"PING x\r"]) == [p.Ping("x")]


# --- line length -------------------------------------------------------------------------

# A MSG line of exactly MAX_LINE_BYTES bytes whose text stays under MAX_TEXT_CHARS: 3-byte
# characters, with a one-byte tail to land on the exact size.
_PREFIX = b"MSG r "
_WIDE = "日"
_COUNT, _TAIL = divmod(MAX_LINE_BYTES - len(_PREFIX), len(_WIDE.encode()))
LIMIT_TEXT = _WIDE * _COUNT + "a" * _TAIL
LIMIT_LINE = _PREFIX + LIMIT_TEXT.encode()
OVER_LINE = LIMIT_LINE + b"a"


def test_limit_line_fixture_sizes() -> None:
    assert len(LIMIT_LINE) == MAX_LINE_BYTES
    assert len(LIMIT_TEXT) <= MAX_TEXT_CHARS


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_line_at_the_limit_is_accepted(ending: bytes, chunking: str) -> None:
    data = LIMIT_LINE + ending + b"PING after\n"
    chunks = [data] if chunking == "whole" else bytewise(data)
    assert feed(chunks) == [p.Msg("r", LIMIT_TEXT), p.Ping("after")]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_line_over_the_limit_is_fatal(ending: bytes, chunking: str) -> None:
    data = b"PING before\n" + OVER_LINE + ending + b"PING after\n"
    chunks = [data] if chunking == "whole" else bytewise(data)
    assert feed(chunks) == [p.Ping("before"), LINE_TOO_LONG]


@pytest.mark.parametrize("line", [LIMIT_LINE, OVER_LINE], ids=["at-limit", "over-limit"])
def test_multibyte_character_split_across_chunks_at_the_limit(line: bytes) -> None:
    # Cut inside the last 3-byte character before the ASCII tail.
    cut = len(_PREFIX) + len(_WIDE.encode()) * _COUNT - 1
    assert line[cut - 2 : cut + 1] == _WIDE.encode()
    events = feed([line[:cut], line[cut:], b"\n"])
    if line is LIMIT_LINE:
        assert events == [p.Msg("r", LIMIT_TEXT)]
    else:
        assert events == [LINE_TOO_LONG]


def test_at_the_limit_without_line_ending_parses_at_eof() -> None:
    assert feed([LIMIT_LINE]) == [p.Msg("r", LIMIT_TEXT)]
    assert feed([LIMIT_LINE + b"\r"]) == [p.Msg("r", LIMIT_TEXT)]


def test_unfinished_line_fails_at_the_first_byte_past_the_limit() -> None:
    """The parser never holds more than MAX_LINE_BYTES + 1 bytes: the error comes as soon
    as an unfinished line is one byte too long (the +1 is a CR that may precede the LF)."""
    parser = p.CommandParser()
    for i in range(MAX_LINE_BYTES):
        assert parser.receive_data(b"x") == [], i
    assert parser.receive_data(b"x") == [LINE_TOO_LONG]
    # Dead: everything after is ignored, including a well-formed line and end of stream.
    assert parser.receive_data(b"\nPING\n") == []
    assert parser.receive_data(b"") == []


def test_cr_at_the_limit_is_held_until_the_next_byte() -> None:
    parser = p.CommandParser()
    assert parser.receive_data(b"x" * MAX_LINE_BYTES) == []
    assert parser.receive_data(b"\r") == []
    assert parser.receive_data(b"y") == [LINE_TOO_LONG]


def test_huge_chunk_without_newline_is_fatal_at_once() -> None:
    parser = p.CommandParser()
    assert parser.receive_data(b"PING a\n" + b"x" * 100_000) == [p.Ping("a"), LINE_TOO_LONG]
    assert parser.receive_data(b"\n") == []


def test_parser_holds_at_most_max_line_bytes_plus_one() -> None:
    # The buffer is private; this pins the documented bound from the outside view too.
    parser = p.CommandParser()
    parser.receive_data(b"PING a\n" + b"x" * MAX_LINE_BYTES + b"\r")
    assert len(parser._partial) == MAX_LINE_BYTES + 1
    parser.receive_data(b"\n" + b"y" * (MAX_LINE_BYTES + 1))
    assert len(parser._partial) == 0  # dead and emptied


# --- MSG text and names ------------------------------------------------------------------


def test_msg_text_at_the_cap() -> None:
    text = "é" * MAX_TEXT_CHARS  # characters, not bytes: 4000 bytes
    assert parse("MSG lobby " + text) == [p.Msg("lobby", text)]


def test_msg_text_over_the_cap() -> None:
    assert parse("MSG lobby " + "é" * (MAX_TEXT_CHARS + 1)) == [TEXT_TOO_LONG]


def test_msg_text_counts_the_leading_space_kept_as_sent() -> None:
    assert parse("MSG lobby  " + "a" * (MAX_TEXT_CHARS - 1)) == [
        p.Msg("lobby", " " + "a" * (MAX_TEXT_CHARS - 1))
    ]
    assert parse("MSG lobby  " + "a" * MAX_TEXT_CHARS) == [TEXT_TOO_LONG]


ROOM_NAMES = [
    ("lobby", True),
    ("a", True),
    ("r" * MAX_ROOM_CHARS, True),
    ("r" * (MAX_ROOM_CHARS + 1), False),
    ("Lob_by-1.2", True),
    ("zoë", True),
    ("日本", True),
    ("Ελλάδα", True),
    ("a*b", False),
    ("a:b", False),
    ("😀", False),
    ("a/b", False),
    ("#lobby", False),
]


@pytest.mark.parametrize(("room", "ok"), ROOM_NAMES, ids=[r[:20] for r, _ in ROOM_NAMES])
@pytest.mark.parametrize("verb", ["JOIN", "MSG", "LEAVE", "NAMES", "HISTORY"])
def test_room_names_in_every_command(verb: str, room: str, ok: bool) -> None:
    line = {"JOIN": f"JOIN {room} alice", "MSG": f"MSG {room} hi"}.get(verb, f"{verb} {room}")
    (event,) = parse(line)
    if ok:
        assert not isinstance(event, p.PeerError)
        assert event.room == room
    else:
        assert event == BAD_ROOM


USERNAMES = [
    ("alice", True),
    ("u" * MAX_USERNAME_CHARS, True),
    ("u" * (MAX_USERNAME_CHARS + 1), False),
    ("a_b-c.d9", True),
    ("zoë", True),
    ("日本", True),
    ("*", False),
    ("a:b", False),
    ("😀", False),
]


@pytest.mark.parametrize(("name", "ok"), USERNAMES, ids=[n[:20] for n, _ in USERNAMES])
def test_usernames_in_join(name: str, ok: bool) -> None:
    expected = p.Join("lobby", name) if ok else BAD_USERNAME
    assert parse(f"JOIN lobby {name}") == [expected]


def test_join_checks_the_room_before_the_username() -> None:
    assert parse("JOIN bad* bad*") == [BAD_ROOM]


def test_names_are_nfkc_normalised() -> None:
    decomposed = "zoe\u0308"  # e + combining diaeresis
    assert parse(f"JOIN {decomposed} {decomposed}") == [p.Join("zoë", "zoë")]
    assert parse(f"MSG {decomposed} hi") == [p.Msg("zoë", "hi")]
    # Compatibility forms are the plain name: fullwidth, mathematical alphanumerics.
    assert parse("JOIN ｌｏｂｂｙ 𝐚𝐥𝐢𝐜𝐞") == [p.Join("lobby", "alice")]
    for verb in ("LEAVE", "NAMES"):
        (event,) = parse(f"{verb} ｌｏｂｂｙ")
        assert event.room == "lobby"


def name_error(text: str) -> p.PeerError:
    return p.PeerError(f"ERROR {text}\n".encode())


INVISIBLE_USERNAME = name_error("invalid username: invisible or filler characters are not allowed")
INVISIBLE_ROOM = name_error("invalid room name: invisible or filler characters are not allowed")

NAME_LINES = [
    ("JOIN lobby \u0430lice", name_error("invalid username: mixes Cyrillic and Latin scripts")),
    ("JOIN lobby alice\u3164", INVISIBLE_USERNAME),
    ("JOIN lobby \u3164", INVISIBLE_USERNAME),
    ("JOIN lobby al\u200bice", INVISIBLE_USERNAME),
    ("JOIN lobby \u2800", INVISIBLE_USERNAME),
    (
        "JOIN lobby 0\u0661",
        name_error("invalid username: mixes digits of different number systems"),
    ),
    (
        "JOIN lobby q\u0301\u0301\u0301",
        name_error("invalid username: accents and other marks go on a letter, at most 2 in a row"),
    ),
    ("JOIN l\u043ebby alice", name_error("invalid room name: mixes Latin and Cyrillic scripts")),
    (
        "JOIN \u0441\u043e\u0435 alice",
        name_error("invalid room name: uses look-alikes of Latin letters"),
    ),
    ("JOIN lobby\ufeff alice", INVISIBLE_ROOM),
    ("MSG l\u03bfbby hi", name_error("invalid room name: mixes Latin and Greek scripts")),
    ("LEAVE \u3164", INVISIBLE_ROOM),
    ("NAMES lobby\u200d", INVISIBLE_ROOM),
    (
        "HISTORY \u1d00\u029f\u026a 5",
        name_error("invalid room name: uses look-alikes of Latin letters"),
    ),
]


@pytest.mark.parametrize(("line", "error"), NAME_LINES, ids=[line for line, _ in NAME_LINES])
def test_refused_names_get_their_reason(line: str, error: p.PeerError) -> None:
    assert parse(line) == [error]


def test_usernames_in_one_non_latin_script_join() -> None:
    for name in ("Дмитрий", "李雷", "محمد", "नमस्ते", "山田たろう"):
        assert parse(f"JOIN lobby {name}") == [p.Join("lobby", name)]


@pytest.mark.parametrize(
    "text", [" ", "\u3000", "\u00a0", "\u200b", "\u3164", "\u2800 \u200b", "\u202e"], ids=repr
)
def test_blank_msg_text_is_a_usage_error(text: str) -> None:
    assert parse(f"MSG lobby {text}") == [usage("MSG <room> <text>")]
    assert parse(f"MSG bad* {text}") == [usage("MSG <room> <text>")]  # before the room


def test_msg_text_bidi_controls_are_neutralised() -> None:
    assert parse("MSG lobby \u202eevil") == [p.Msg("lobby", "\u202eevil\u202c")]
    assert parse("MSG lobby \u2067x") == [p.Msg("lobby", "\u2067x\u2069")]
    assert parse("MSG lobby a\u202cb\u2069c") == [p.Msg("lobby", "abc")]
    assert parse("MSG lobby \u2066ok\u2069") == [p.Msg("lobby", "\u2066ok\u2069")]


def test_msg_text_bidi_opener_is_dropped_at_the_line_limit() -> None:
    # A line of exactly MAX_LINE_BYTES: no room to close the override, so it goes.
    head = "MSG lobby \u202e"
    room_left = MAX_LINE_BYTES - len(head.encode())
    text = "€" * (room_left // 3) + "x" * (room_left % 3)
    assert len((head + text).encode()) == MAX_LINE_BYTES
    assert parse(head + text) == [p.Msg("lobby", text)]
    assert parse(head + text[1:]) == [p.Msg("lobby", "\u202e" + text[1:] + "\u202c")]


def test_length_is_counted_after_normalisation() -> None:
    # 32 decomposed "é" are 64 code points but 32 characters once normalised.
    name = "e\u0301" * MAX_USERNAME_CHARS
    assert parse(f"JOIN lobby {name}") == [p.Join("lobby", "é" * MAX_USERNAME_CHARS)]


def test_msg_text_is_not_normalised() -> None:
    assert parse("MSG lobby zoe\u0308") == [p.Msg("lobby", "zoe\u0308")]


# --- reply builders ----------------------------------------------------------------------

BUILDERS = [
    (p.error_line("x y"), b"ERROR x y\n"),
    (p.info_line("x y"), b"INFO x y\n"),
    (p.BYE, b"INFO bye\n"),
    (p.SHUTTING_DOWN, b"INFO server shutting down\n"),
    (p.joined_line("lobby"), b"INFO joined room lobby\n"),
    (p.user_joined_line("alice", "lobby"), b"INFO alice joined lobby\n"),
    (p.left_line("lobby"), b"INFO left room lobby\n"),
    (p.user_left_line("alice", "lobby"), b"INFO alice left lobby\n"),
    (p.msg_line("lobby", "alice", " hi  there "), b"MSG lobby alice  hi  there \n"),
    (p.msg_line("日本", "zoë", "héllo"), "MSG 日本 zoë héllo\n".encode()),
    (p.names_line("lobby", ["Alice", "bob"]), b"NAMES lobby Alice bob\n"),
    (p.names_line("lobby", []), b"NAMES lobby\n"),
    (p.room_line("lobby", 3), b"ROOM lobby 3\n"),
    (p.rooms_end_line(0), b"END ROOMS 0\n"),
    (p.rooms_end_line(2), b"END ROOMS 2\n"),
    (
        p.history_line("lobby", 7, 1764116599.5, "*", "alice joined lobby"),
        b"HISTORY lobby 7 2025-11-26T00:23:19.500Z * alice joined lobby\n",
    ),
    (
        p.history_line("lobby", 8, 0.0, "alice", " hi "),
        b"HISTORY lobby 8 1970-01-01T00:00:00.000Z alice  hi \n",
    ),
    (p.history_end_line("lobby", 2), b"END HISTORY lobby 2\n"),
    (p.pong_line(""), b"PONG\n"),
    (p.pong_line("tok"), b"PONG tok\n"),
    (p.ping_line("tok"), b"PING tok\n"),
    (p.not_in_room_error("lobby"), b"ERROR not in room lobby\n"),
    (p.name_taken_error("lobby"), b"ERROR name taken in lobby\n"),
    (p.already_in_room_error("lobby"), b"ERROR already in room lobby\n"),
    (p.wrong_username_error("alice"), b"ERROR username is alice on this connection\n"),
    (p.ERR_LINE_TOO_LONG, LINE_TOO_LONG),
    (p.ERR_BAD_UTF8, BAD_UTF8),
    (p.ERR_CONTROL, CONTROL),
    (p.ERR_BAD_ROOM, BAD_ROOM),
    (p.ERR_BAD_USERNAME, BAD_USERNAME),
    (p.ERR_TEXT_TOO_LONG, TEXT_TOO_LONG),
    (p.USAGE["JOIN"], usage("JOIN <room> <username>")),
    (p.USAGE["MSG"], usage("MSG <room> <text>")),
    (p.USAGE["LEAVE"], usage("LEAVE <room>")),
    (p.USAGE["NAMES"], usage("NAMES <room>")),
    (p.USAGE["ROOMS"], usage("ROOMS")),
    (p.USAGE["QUIT"], usage("QUIT")),
    (p.USAGE["HISTORY"], usage("HISTORY <room> [n]")),
    (p.ERR_HISTORY_RANGE, p.PeerError(b"ERROR usage: HISTORY <room> [n] (n is 1-500)\n")),
]


@pytest.mark.parametrize(("built", "expected"), BUILDERS, ids=[str(b[1])[:40] for b in BUILDERS])
def test_reply_builder(built: object, expected: object) -> None:
    assert built == expected


def test_welcome_line() -> None:
    assert p.WELCOME.startswith(b"INFO welcome to shardchat; ")
    assert p.WELCOME.endswith(b"\n") and p.WELCOME.count(b"\n") == 1


def test_only_line_too_long_is_fatal() -> None:
    errors = [p.ERR_BAD_UTF8, p.ERR_CONTROL, p.ERR_BAD_ROOM, p.ERR_BAD_USERNAME]
    errors += [p.ERR_TEXT_TOO_LONG, *p.USAGE.values(), p.unknown_verb_error("X")]
    errors.append(p.ERR_HISTORY_RANGE)
    assert not any(error.fatal for error in errors)
    assert p.ERR_LINE_TOO_LONG.fatal


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1764116599.5, "2025-11-26T00:23:19.500Z"),
        (1764116599.999, "2025-11-26T00:23:19.999Z"),
    ],
    ids=["epoch", "half", "999ms"],
)
def test_format_time(ts: float, expected: str) -> None:
    assert p.format_time(ts) == expected


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1764116599.1, "2025-11-26T00:23:19.100Z"),
        (1764116599.123, "2025-11-26T00:23:19.123Z"),
        (1.001, "1970-01-01T00:00:01.001Z"),
    ],
    ids=["100ms", "123ms", "1ms"],
)
def test_format_time_millis_are_exact(ts: float, expected: str) -> None:
    assert p.format_time(ts) == expected
