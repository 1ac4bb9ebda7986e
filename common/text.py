"""The rule for chat text, shared by both protocols (TCP ``MSG`` and HTTP ``/api/send``).

:func:`clean_text` refuses control characters (C0 and C1 but TAB, DEL), blank text (empty,
only white space of any kind, or only invisible characters) and text over
``MAX_TEXT_CHARS`` or over one ``MSG <room> <text>`` line of ``MAX_LINE_BYTES``. It returns
the text with its bidi controls *neutralised*, so that a message cannot reorder what the
reader sees after it (the next message, the next username): embeddings and overrides
(LRE, RLE, LRO, RLO, closed by PDF) and isolates (LRI, RLI, FSI, closed by PDI) are paired
as the Unicode bidi algorithm pairs them, closers that close nothing are removed, and what
is still open at the end is closed, or, if the closers would not fit, the openers are
removed instead. Nothing else in the text is changed.
"""

from __future__ import annotations

import enum
import re
from typing import List, Tuple, Union

from common.limits import MAX_LINE_BYTES, MAX_TEXT_CHARS
from common.names import BLANK_TEXT

#: C0 controls but TAB, DEL and C1 controls: everything in Unicode category Cc except TAB.
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

LRE, RLE, PDF, LRO, RLO = "\u202a", "\u202b", "\u202c", "\u202d", "\u202e"
LRI, RLI, FSI, PDI = "\u2066", "\u2067", "\u2068", "\u2069"
_ISOLATES = frozenset((LRI, RLI, FSI))
_BIDI_CONTROL = re.compile("[\u202a-\u202e\u2066-\u2069]")
_BIDI_SPLIT = re.compile("([\u202a-\u202e\u2066-\u2069])")


class TextProblem(enum.Enum):
    """Why a text was refused."""

    CONTROL = "control"
    BLANK = "blank"
    TOO_LONG = "too_long"


def clean_text(text: str, room: str, controls_checked: bool = False) -> Union[str, TextProblem]:
    """Check chat *text* for *room* (the room as stored, for the line length) and return
    it with its bidi controls neutralised, or the :class:`TextProblem`. With
    *controls_checked* the caller has already refused control characters (the line
    parser checks the whole line). Never raises."""
    if not controls_checked and CONTROL.search(text):
        return TextProblem.CONTROL
    if text.isascii():  # the usual case: no bidi controls, one byte per character
        if not text.strip():
            return TextProblem.BLANK
        if len(text) > MAX_TEXT_CHARS:
            return TextProblem.TOO_LONG
        room_bytes = len(room) if room.isascii() else len(room.encode())
        if len(text) + room_bytes + 5 > MAX_LINE_BYTES:  # "MSG " and " "
            return TextProblem.TOO_LONG
        return text
    if is_blank(text):
        return TextProblem.BLANK
    if not _fits(text, room):
        return TextProblem.TOO_LONG
    if not _BIDI_CONTROL.search(text):
        return text  # the usual case
    return neutralize_bidi(text, room)


def is_blank(text: str) -> bool:
    """True if *text* shows nothing: empty, or only white space (any Unicode white space,
    not only space and TAB) and invisible characters."""
    if text.isascii():
        return not text.strip()
    return BLANK_TEXT.match(text) is not None


def neutralize_bidi(text: str, room: str) -> str:
    """*text* with unmatched bidi closers removed and every opener closed at the end, or,
    if those closers would push ``MSG <room> <text>`` over the limits, with the unclosed
    openers removed instead. The result has only matched pairs, so applying this again
    changes nothing."""
    pieces, still_open = _pair_bidi(text)
    closers = "".join(PDI if isolate else PDF for isolate, _ in reversed(still_open))
    closed = "".join(pieces) + closers
    if not closers or _fits(closed, room):
        return closed
    for _, index in still_open:
        pieces[index] = ""
    return "".join(pieces)


def _pair_bidi(text: str) -> Tuple[List[str], List[Tuple[bool, int]]]:
    """Pair openers and closers the way the bidi algorithm does (rules X2-X7): a PDI
    closes the innermost open isolate and every embedding opened inside it, and does
    nothing with no isolate open; a PDF closes the innermost embedding, and does nothing if
    an isolate was opened after it (or nothing is open).

    Returns *text* in pieces, with the closers that close nothing emptied, and the stack
    of openers still open at the end, as ``(is_isolate, index in the pieces)``."""
    pieces = _BIDI_SPLIT.split(text)  # text, control, text, control, ..., text
    stack: List[Tuple[bool, int]] = []
    open_isolates = 0  # counted, so a PDI needs no scan of the stack
    for index in range(1, len(pieces), 2):
        char = pieces[index]
        if char == PDF:
            if stack and not stack[-1][0]:
                stack.pop()
            else:
                pieces[index] = ""  # closes nothing
        elif char == PDI:
            if open_isolates:
                while not stack.pop()[0]:
                    pass  # embeddings inside the isolate close with it
                open_isolates -= 1
            else:
                pieces[index] = ""  # closes nothing
        else:
            isolate = char in _ISOLATES
            if isolate:
                open_isolates += 1
            stack.append((isolate, index))
    return pieces, stack


def _fits(text: str, room: str) -> bool:
    """Within MAX_TEXT_CHARS, and ``MSG <room> <text>`` within one line: line-protocol
    members receive it as one line."""
    if len(text) > MAX_TEXT_CHARS:
        return False
    return len(room.encode()) + len(text.encode()) + 5 <= MAX_LINE_BYTES  # "MSG " and " "
