"""The chat text rule (common/text.py): control characters, blank text, the limits and bidi
neutralisation, shared by TCP ``MSG`` and HTTP ``/api/send``."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common.limits import MAX_LINE_BYTES, MAX_TEXT_CHARS
from common.text import (
    FSI,
    LRE,
    LRI,
    LRO,
    PDF,
    PDI,
    RLE,
    RLI,
    RLO,
    TextProblem,
    clean_text,
    is_blank,
    neutralize_bidi,
)

pytestmark = pytest.mark.timeout(60)

ROOM = "lobby"
OPENERS = (LRE, RLE, LRO, RLO, LRI, RLI, FSI)
BIDI = OPENERS + (PDF, PDI)


# --- control characters, blank text, limits ----------------------------------------------


@pytest.mark.parametrize("text", ["a\x00", "\x1b[31m", "a\nb", "a\rb", "\x7f", "a\x85", "\x9f"])
def test_control_characters_are_refused(text: str) -> None:
    assert clean_text(text, ROOM) is TextProblem.CONTROL


BLANK = [
    "",
    " ",
    "   ",
    "\t",
    " \t ",
    "\u00a0",  # NO-BREAK SPACE
    "\u1680",  # OGHAM SPACE MARK
    "\u2003",  # EM SPACE
    "\u2028",  # LINE SEPARATOR
    "\u202f",  # NARROW NO-BREAK SPACE
    "\u205f",
    "\u3000",  # IDEOGRAPHIC SPACE
    "\u200b",  # ZERO WIDTH SPACE
    "\u200d\u200c",
    "\ufeff",
    "\u3164",  # HANGUL FILLER
    "\uffa0",
    "\u115f\u1160",
    "\u2800",  # BRAILLE PATTERN BLANK
    "\u180e",
    "\u2060",
    "\U000e0041",  # a tag character
    "\ufe0f",
    RLO,  # only bidi controls
    LRI + PDI,
    " \u200b \u3000 \u3164 ",
]


@pytest.mark.parametrize("text", BLANK, ids=repr)
def test_blank_text_is_refused(text: str) -> None:
    assert is_blank(text)
    assert clean_text(text, ROOM) is TextProblem.BLANK


@pytest.mark.parametrize("text", ["a", ".", " a ", "\u3000a", "😀", "\u200bx", "日本", "\u0640"])
def test_text_with_something_to_see_is_not_blank(text: str) -> None:
    assert not is_blank(text)
    assert clean_text(text, ROOM) == text


def test_text_is_kept_as_sent() -> None:
    for text in [" leading", "trailing ", "in  side", "tab\there", "zoe\u0308", "ａ", "a\u200db"]:
        assert clean_text(text, ROOM) == text


def test_text_length_limit() -> None:
    assert clean_text("é" * MAX_TEXT_CHARS, ROOM) == "é" * MAX_TEXT_CHARS
    assert clean_text("é" * (MAX_TEXT_CHARS + 1), ROOM) is TextProblem.TOO_LONG


def test_line_byte_limit() -> None:
    # "MSG <room> <text>" must fit one MAX_LINE_BYTES line: 4-byte characters reach it first.
    room = "r" * 64
    fits = MAX_LINE_BYTES - len(f"MSG {room} ")
    text = "\U0001f600" * (fits // 4) + "x" * (fits % 4)
    assert clean_text(text, room) == text
    assert clean_text(text + "x", room) is TextProblem.TOO_LONG


# --- bidi --------------------------------------------------------------------------------

NEUTRALISED = [
    ("override left open", RLO + "abc", RLO + "abc" + PDF),
    ("isolate left open", RLI + "abc", RLI + "abc" + PDI),
    ("first strong isolate", FSI + "abc", FSI + "abc" + PDI),
    ("every embedding", LRE + RLE + LRO + RLO + "x", LRE + RLE + LRO + RLO + "x" + PDF * 4),
    ("every isolate", LRI + RLI + FSI + "x", LRI + RLI + FSI + "x" + PDI * 3),
    ("stray PDF", "a" + PDF + "b", "ab"),
    ("stray PDI", "a" + PDI + "b", "ab"),
    ("closed override", RLO + "x" + PDF + "y", RLO + "x" + PDF + "y"),
    ("closed isolate", RLI + "x" + PDI + "y", RLI + "x" + PDI + "y"),
    ("PDF cannot close outside an isolate", RLE + "x" + LRI + "y" + PDF + "z",
     RLE + "x" + LRI + "yz" + PDI + PDF),
    ("PDF inside an isolate with nothing to close", LRI + "x" + PDF + PDI, LRI + "x" + PDI),
    ("PDI closes the embeddings inside it", LRI + RLO + "x" + PDI + "y",
     LRI + RLO + "x" + PDI + "y"),
    ("PDI closes the innermost isolate", RLO + LRI + "x" + PDI, RLO + LRI + "x" + PDI + PDF),
    ("closers after everything closed", RLO + "x" + PDF + PDF + PDI, RLO + "x" + PDF),
    ("closers before openers", PDF + PDI + RLO + "x", RLO + "x" + PDF),
    ("marks are not controls", "\u200f" + "x" + "\u200e", "\u200fx\u200e"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in NEUTRALISED], ids=[n for n, _, _ in NEUTRALISED]
)
def test_bidi_controls_are_neutralised(text: str, expected: str) -> None:
    assert clean_text(text, ROOM) == expected
    assert clean_text(expected, ROOM) == expected  # already neutral


@pytest.mark.parametrize("opener", OPENERS, ids=lambda c: f"U+{ord(c):04X}")
def test_when_closing_does_not_fit_the_openers_go(opener: str) -> None:
    closer = PDI if opener in (LRI, RLI, FSI) else PDF
    # Room for the closer: closed.
    text = opener + "a" * (MAX_TEXT_CHARS - 2)
    assert clean_text(text, ROOM) == text + closer
    # At the character limit: the opener is removed instead.
    text = opener + "a" * (MAX_TEXT_CHARS - 1)
    assert clean_text(text, ROOM) == "a" * (MAX_TEXT_CHARS - 1)
    # At the line's byte limit: the same.
    room = "r" * 64
    fits = MAX_LINE_BYTES - len(f"MSG {room} ") - len(opener.encode())
    text = opener + "\U0001f600" * (fits // 4) + "x" * (fits % 4)
    assert clean_text(text, room) == text[1:]


def test_only_unclosed_openers_go_when_closing_does_not_fit() -> None:
    closed = RLI + "x" + PDI
    text = closed + RLO + "a" * (MAX_TEXT_CHARS - len(closed) - 1)
    assert clean_text(text, ROOM) == closed + "a" * (MAX_TEXT_CHARS - len(closed) - 1)


def reference_is_balanced(text: str) -> bool:
    """True if every bidi closer in *text* closes something and nothing is open at the end,
    pairing as the Unicode bidi algorithm does (written plainly, without the counter)."""
    stack: List[str] = []
    for char in text:
        if char in OPENERS:
            stack.append(char)
        elif char == PDF:
            if not stack or stack[-1] in (LRI, RLI, FSI):
                return False
            stack.pop()
        elif char == PDI:
            if not any(entry in (LRI, RLI, FSI) for entry in stack):
                return False
            while stack.pop() not in (LRI, RLI, FSI):
                pass
    return not stack


def without_bidi(text: str) -> str:
    return "".join(char for char in text if char not in BIDI)


bidi_texts = st.text(st.sampled_from(BIDI + ("a", "א", " ")), max_size=60)


@settings(max_examples=500, deadline=None)
@given(text=bidi_texts)
@example(text=LRI + RLE + PDI + PDF)
@example(text=RLE + LRI + PDF + PDI)
def test_neutralised_text_is_balanced_and_idempotent(text: str) -> None:
    result = neutralize_bidi(text, ROOM)
    assert reference_is_balanced(result)
    assert neutralize_bidi(result, ROOM) == result
    assert without_bidi(result) == without_bidi(text)  # nothing else changes


@settings(max_examples=200, deadline=None)
@given(text=bidi_texts, pad=st.integers(MAX_TEXT_CHARS - 70, MAX_TEXT_CHARS))
def test_neutralised_text_stays_within_the_limits(text: str, pad: int) -> None:
    text = (text + "b" * pad)[:pad]
    result = clean_text(text, ROOM)
    if result is TextProblem.BLANK:
        return
    assert isinstance(result, str)
    assert len(result) <= MAX_TEXT_CHARS
    assert reference_is_balanced(result)
    assert without_bidi(result) == without_bidi(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=80))
def test_text_without_bidi_controls_is_unchanged(text: str) -> None:
    text = without_bidi(text)
    result = clean_text(text, ROOM)
    assert result == text or result is TextProblem.BLANK
    assert (result is TextProblem.BLANK) == is_blank(text)


def test_deep_nesting_is_closed_in_order() -> None:
    text = LRI * 300 + RLE * 300 + "x"
    assert clean_text(text, ROOM) == text + PDF * 300 + PDI * 300
    closed = RLE * 600 + "x" + PDF * 600
    assert clean_text(closed, ROOM) == closed
    # 3 bytes each: closing 700 openers would pass the 4096-byte line.
    assert clean_text(RLO * 700 + "x", ROOM) == "x"
