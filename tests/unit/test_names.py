"""Name rules (common/names.py): which usernames and room names are valid."""

from __future__ import annotations

import pytest

from common.limits import MAX_ROOM_CHARS, MAX_USERNAME_CHARS
from common.names import is_valid_room, is_valid_username, name_key, normalize

pytestmark = pytest.mark.timeout(60)

VALID = [
    "a",
    "alice",
    "Alice",
    "a_b",
    "a-b",
    "a.b",
    "...",
    "007",
    "zoë",
    "日本",
    "Ελλάδα",
    "Москва",
    "ǅemal",  # titlecase letter (Lt)
    "ʰa",  # modifier letter (Lm)
    "٣٤",  # Arabic-Indic digits (Nd)
]
INVALID = [
    "",
    " ",
    "a b",
    "a\tb",
    "*",
    "a*",
    "a:b",
    "a/b",
    "a@b",
    "a,b",
    "#room",
    "😀",
    "a😀",
    "ⅷ",  # letter-like number (Nl), not a letter
    "²",  # superscript two (No), not a decimal digit
    "a\u200bb",  # zero-width space
    "e\u0301",  # not NFC: a combining mark is not a letter
    "a\x00",
]


@pytest.mark.parametrize("name", VALID, ids=repr)
def test_valid(name: str) -> None:
    assert is_valid_username(name)
    assert is_valid_room(name)


@pytest.mark.parametrize("name", INVALID, ids=repr)
def test_invalid(name: str) -> None:
    assert not is_valid_username(name)
    assert not is_valid_room(name)


@pytest.mark.parametrize("char", ["a", "é", "日"], ids=["ascii", "latin1", "cjk"])
def test_username_length(char: str) -> None:
    assert is_valid_username(char * MAX_USERNAME_CHARS)
    assert not is_valid_username(char * (MAX_USERNAME_CHARS + 1))


@pytest.mark.parametrize("char", ["a", "é", "日"], ids=["ascii", "latin1", "cjk"])
def test_room_length(char: str) -> None:
    assert is_valid_room(char * MAX_ROOM_CHARS)
    assert not is_valid_room(char * (MAX_ROOM_CHARS + 1))


def test_limits_are_the_documented_ones() -> None:
    assert (MAX_USERNAME_CHARS, MAX_ROOM_CHARS) == (32, 64)


@pytest.mark.parametrize(
    ("raw", "nfc"),
    [
        ("zoe\u0308", "zoë"),
        ("e\u0301" * 3, "ééé"),
        ("\u212b", "\u00c5"),  # ANGSTROM SIGN -> LATIN CAPITAL A WITH RING
        ("plain", "plain"),
        ("zoë", "zoë"),
    ],
    ids=["combining-diaeresis", "combining-acute", "angstrom", "ascii", "already-nfc"],
)
def test_normalize_is_nfc(raw: str, nfc: str) -> None:
    assert normalize(raw) == nfc
    assert is_valid_username(normalize(raw))


def test_name_key_ignores_case() -> None:
    assert name_key("Alice") == name_key("alice") == name_key("ALICE")
    assert name_key("ZOË") == name_key("zoë")
    assert name_key("STRASSE") == name_key("straße")  # case folding, not lower()
    assert name_key("alice") != name_key("alicia")
