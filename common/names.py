"""Name rules shared by both protocols: which usernames and room names are valid.

Names are NFC-normalised first, so ``zoë`` typed with a combining diaeresis and ``zoë`` typed
precomposed are one name. Usernames compare ignoring case (:func:`name_key`); room names are
case-sensitive.
"""

from __future__ import annotations

import re
import unicodedata

from common.limits import MAX_ROOM_CHARS, MAX_USERNAME_CHARS

_ASCII_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_EXTRA_CHARS = frozenset("_-.")
# Unicode letters (Lu Ll Lt Lm Lo) and decimal digits (Nd).
_NAME_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nd"})


#: What a valid name is, as the error messages of both protocols say it.
ROOM_RULE = f"1-{MAX_ROOM_CHARS} letters, digits, _ - ."
USERNAME_RULE = f"1-{MAX_USERNAME_CHARS} letters, digits, _ - ."


def _has_name_chars(name: str) -> bool:
    if _ASCII_NAME.match(name):
        return True
    return all(ch in _EXTRA_CHARS or unicodedata.category(ch) in _NAME_CATEGORIES for ch in name)


def normalize(name: str) -> str:
    """Return *name* in NFC form (the form every name is stored and compared in)."""
    if name.isascii():
        return name
    return unicodedata.normalize("NFC", name)


def is_valid_username(name: str) -> bool:
    """True if *name* (already normalised) is 1-32 letters, digits, ``_ - .``."""
    return 0 < len(name) <= MAX_USERNAME_CHARS and _has_name_chars(name)


def is_valid_room(name: str) -> bool:
    """True if *name* (already normalised) is 1-64 letters, digits, ``_ - .``."""
    return 0 < len(name) <= MAX_ROOM_CHARS and _has_name_chars(name)


def name_key(username: str) -> str:
    """The key that makes two usernames "the same" within a room: case-folded."""
    return username.casefold()
