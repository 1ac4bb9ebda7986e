"""Hypothesis fuzzing of the sans-IO line parser (common/protocol.py ``CommandParser``).

Properties, for arbitrary bytes (biased towards line endings, broken UTF-8, control
characters, valid commands and lines near the 4096-byte cap) cut into arbitrary chunks:

- ``receive_data`` never raises and never holds more than ``MAX_LINE_BYTES + 1`` bytes;
- the events do not depend on how the stream was chunked;
- they are what a plain reference reading of docs/PROTOCOL.md gives (split at LF, drop one
  CR, a line over the cap is fatal and ends the stream);
- every valid command, formatted as a client would, parses back to itself.

The byte-exact edge cases (each offset of a sample, the cap with CR/LF) are in
``test_protocol.py``; this file is the randomised superset.
"""

from __future__ import annotations

import unicodedata
from typing import List, Optional

import pytest
from hypothesis import assume, example, given, settings
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
from common.names import is_valid_room, is_valid_username
from common.text import is_blank

BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

LINE_TOO_LONG = p.PeerError(b"ERROR line too long\n", fatal=True)
CONTROL = p.PeerError(b"ERROR control characters are not allowed\n")

FUZZ = settings(max_examples=150, deadline=None)

# --- strategies --------------------------------------------------------------------------

#: Letters of one script each (a name may not mix scripts a reader cannot tell apart), with
#: digits and ``_ - .`` from the name rule (common/names.py).
SCRIPT_ALPHABETS = [
    "abcxyzABCXYZéßøı",
    "абвгджщЖЯ",
    "αβγδωΩΣἀ",
    "日本語漢字あいうアイウー",
    "한국어김철수",
    "ابتثمحد",
    "שלוםאב",
    "कमसनत\u094d\u093e\u0947",
]


def names(max_chars: int) -> st.SearchStrategy[str]:
    """Names in one script as the parser stores them (NFKC); NFKC may change the length."""
    return st.sampled_from(SCRIPT_ALPHABETS).flatmap(
        lambda letters: st.text(
            st.sampled_from(letters + "_-.09"), min_size=1, max_size=max_chars
        ).map(lambda s: unicodedata.normalize("NFKC", s))
    )


rooms = names(MAX_ROOM_CHARS).filter(is_valid_room)
usernames = names(MAX_USERNAME_CHARS).filter(is_valid_username)
#: Chat text: anything but control characters (TAB is allowed), lone surrogates and bidi
#: controls (which the parser neutralises: see test_text.py). Long texts are built by
#: repeating a short one: drawing 2000 random characters is slow.
_text_chars = st.one_of(
    st.characters(exclude_categories=("Cc", "Cs"), exclude_characters=BIDI_CONTROLS),
    st.just("\t"),
)
_short_texts = st.text(_text_chars, min_size=1, max_size=40)
texts = st.one_of(
    _short_texts,
    st.tuples(_short_texts, st.integers(1, MAX_TEXT_CHARS)).map(
        lambda pair: (pair[0] * pair[1])[:MAX_TEXT_CHARS]
    ),
).filter(lambda t: not is_blank(t))
tokens = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=MAX_PING_TOKEN_CHARS).map(
    lambda t: t.strip(" \t")
)


def verb_case(verb: str) -> st.SearchStrategy[str]:
    """*verb* in a random mix of upper and lower case (verbs are case-insensitive)."""
    return st.lists(st.booleans(), min_size=len(verb), max_size=len(verb)).map(
        lambda flags: "".join(c.lower() if f else c for c, f in zip(verb, flags))
    )


commands = st.one_of(
    st.builds(p.Join, rooms, usernames),
    st.builds(p.Msg, rooms, texts),
    st.builds(p.Leave, rooms),
    st.just(p.Quit()),
    st.builds(p.Names, rooms),
    st.just(p.Rooms()),
    st.builds(p.History, rooms, st.integers(1, MAX_HISTORY_REPLY)),
    st.builds(p.Ping, tokens),
    st.builds(p.Pong, tokens),
)


def format_command(command: p.Command, verb: Optional[str] = None) -> str:
    """A client's line for *command* (without the line ending)."""
    verb = verb or type(command).__name__.upper()
    args = [str(field) for field in command]
    return " ".join([verb, *args]) if any(args) else verb


def line_of_bytes(n: int) -> bytes:
    """A valid ``MSG`` line of exactly *n* bytes (n >= 12), mixing 1- and 3-byte
    characters so a multi-byte character can sit at the cap."""
    head = b"MSG r "
    room_left = n - len(head)
    euros, ascii_ = divmod(room_left, 3)
    return head + "€".encode() * euros + b"x" * ascii_


#: Pieces a fuzzed stream is made of.
segments = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"\n", b"\r\n", b"\r", b" ", b"\t", b"\x00", b"\x0b", b"\x1b", b"\xff", b"\xc3", b"\xa9"]
    ),
    commands.map(lambda c: format_command(c).encode() + b"\n"),
    st.integers(MAX_LINE_BYTES - 3, MAX_LINE_BYTES + 3).map(line_of_bytes),
    st.integers(MAX_LINE_BYTES - 2, MAX_LINE_BYTES + 2).map(lambda n: b"a" * n),
)
streams = st.lists(segments, max_size=15).map(b"".join)
#: Streams made only of runs near the cap and line endings: where the memory bound and the
#: one byte of slack for a CR at the cap matter.
near_cap_streams = st.lists(
    st.one_of(
        st.integers(MAX_LINE_BYTES - 2, MAX_LINE_BYTES + 2).map(lambda n: b"a" * n),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\r", b"x", "€".encode()]),
    ),
    max_size=8,
).map(b"".join)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> List[bytes]:
    """*data* cut at arbitrary offsets (no empty chunks: ``b""`` means end of stream)."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=40))))
    bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# --- helpers -----------------------------------------------------------------------------


def feed(chunks: List[bytes], eof: bool = True) -> List[p.Event]:
    """Feed *chunks* to a fresh parser, checking the memory bound after every call."""
    parser = p.CommandParser()
    events: List[p.Event] = []
    for chunk in chunks:
        events.extend(parser.receive_data(chunk))
        # The documented bound on what the parser holds for an unfinished line.
        assert len(parser._partial) <= MAX_LINE_BYTES + 1
    if eof:
        events.extend(parser.receive_data(b""))
        assert parser._partial == b""
        assert parser.receive_data(b"more\n") == []  # nothing after end of stream
    return events


def reference(data: bytes, eof: bool = True) -> List[p.Event]:
    """The events docs/PROTOCOL.md describes for the whole stream *data*, read at once."""
    *complete, last = data.split(b"\n")
    events: List[p.Event] = []
    for raw in complete + ([last] if eof else []):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        if len(raw) > MAX_LINE_BYTES:
            return [*events, LINE_TOO_LONG]
        event = p.parse_line(raw) if raw else None
        if event is not None:
            events.append(event)
    if not eof and len(last[:-1] if last.endswith(b"\r") else last) > MAX_LINE_BYTES:
        # Already too long with no LF yet (a CR right after the cap may still be the
        # line's ending).
        events.append(LINE_TOO_LONG)
    return events


# --- properties --------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=9000), cuts=st.data())
def test_arbitrary_bytes_in_arbitrary_chunks_never_raise(data: bytes, cuts: st.DataObject) -> None:
    feed(cuts.draw(chunkings(data)))


@FUZZ
@given(data=streams, cuts=st.data())
@example(data=b"a" * (MAX_LINE_BYTES + 1) + b"\n", cuts=None)
@example(data=b"a" * MAX_LINE_BYTES + b"\r\n", cuts=None)
@example(data=line_of_bytes(MAX_LINE_BYTES) + b"\r\nPING x\n", cuts=None)
def test_events_do_not_depend_on_chunking(data: bytes, cuts: Optional[st.DataObject]) -> None:
    chunks = bytewise(data) if cuts is None else cuts.draw(chunkings(data))
    assert b"".join(chunks) == data
    one_shot = feed([data] if data else [])
    assert feed(chunks) == one_shot
    # ... and without end of stream, the events so far are a prefix of the same list.
    partial = feed(chunks, eof=False)
    assert partial == one_shot[: len(partial)]


def bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@FUZZ
@given(data=streams, eof=st.booleans())
def test_events_are_the_documented_ones(data: bytes, eof: bool) -> None:
    assert feed([data] if data else [], eof=eof) == reference(data, eof=eof)


@FUZZ
@given(data=near_cap_streams, cuts=st.data(), eof=st.booleans())
@example(data=b"a" * (MAX_LINE_BYTES + 1) + b"\r", cuts=None, eof=False)
@example(data=b"a" * MAX_LINE_BYTES + b"\r", cuts=None, eof=False)
def test_near_the_cap_memory_is_bounded_and_chunking_does_not_matter(
    data: bytes, cuts: Optional[st.DataObject], eof: bool
) -> None:
    chunks = [data] if cuts is None else cuts.draw(chunkings(data))
    chunks = [c for c in chunks if c]
    assert feed(chunks, eof=eof) == feed([data] if data else [], eof=eof)
    assert feed(chunks, eof=eof) == reference(data, eof=eof)


@FUZZ
@given(data=streams, cuts=st.data())
def test_nothing_after_a_fatal_error(data: bytes, cuts: st.DataObject) -> None:
    events = feed(cuts.draw(chunkings(data)))
    if LINE_TOO_LONG in events:
        assert events.index(LINE_TOO_LONG) == len(events) - 1
    assert [e for e in events if isinstance(e, p.PeerError) and e.fatal] in ([], [LINE_TOO_LONG])


@FUZZ
@given(
    command=commands,
    verb_cases=st.data(),
    indent=st.sampled_from(["", " ", "\t", " \t "]),
    ending=st.sampled_from([b"\n", b"\r\n"]),
)
def test_valid_commands_round_trip(
    command: p.Command, verb_cases: st.DataObject, indent: str, ending: bytes
) -> None:
    verb = verb_cases.draw(verb_case(type(command).__name__.upper()))
    line = (indent + format_command(command, verb)).encode() + ending
    assume(len(line) - len(ending) <= MAX_LINE_BYTES)
    assert feed([line]) == [command]
    assert feed(bytewise(line)) == [command]


@FUZZ
@given(batch=st.lists(commands, min_size=1, max_size=8), cuts=st.data())
def test_a_batch_of_commands_in_arbitrary_chunks_gives_the_batch(
    batch: List[p.Command], cuts: st.DataObject
) -> None:
    lines = [format_command(c).encode() + b"\n" for c in batch]
    assume(all(len(line) <= MAX_LINE_BYTES + 1 for line in lines))
    data = b"".join(lines)
    assert feed(cuts.draw(chunkings(data))) == batch


@FUZZ
@given(line=commands.map(lambda c: format_command(c).encode()))
def test_an_unterminated_last_command_is_parsed_at_end_of_stream(line: bytes) -> None:
    assume(len(line) <= MAX_LINE_BYTES)
    assert feed([line]) == feed([line + b"\n"])


@pytest.mark.parametrize(
    "last", [b"\x0b", b"\x0c", b" \x0c\t", b"\r\r"], ids=["vt", "ff", "ff-spaces", "cr-cr"]
)
def test_unterminated_control_line_at_eof_is_refused_like_a_terminated_one(last: bytes) -> None:
    assert feed([last + b"\n"]) == [CONTROL]
    assert feed([last]) == [CONTROL]
