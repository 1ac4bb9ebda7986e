"""Name rules shared by both protocols: which usernames and room names are valid, and when
two usernames are "the same".

A name is normalised with **NFKC** first, and the NFKC form is what is stored and shown:
``ｚｏë`` (fullwidth), ``𝐳𝐨ë`` (mathematical bold) and ``zoe`` + U+0308 are all ``zoë``. Then
:func:`check_name` refuses, each with its own :class:`NameProblem`:

- the wrong length, or anything but letters, digits, combining marks and ``_ - .``
  (``RULE``, the line both protocols have always sent);
- invisible, filler and format characters anywhere (``INVISIBLE``): the Unicode
  Default_Ignorable_Code_Point set, the Hangul fillers, U+2800 BRAILLE PATTERN BLANK and
  every other format (``Cf``) character;
- a combining mark that does not follow a letter of its script, or more than
  ``MAX_COMBINING_MARKS`` in a row (``MARKS``);
- digits of more than one number system (``MIXED_DIGITS``);
- letters of scripts a reader cannot tell apart (``MIXED_SCRIPTS``), following Unicode
  TR39's "highly restrictive" level: one script, or Latin with Han and Hiragana/Katakana,
  with Han and Bopomofo, or with Han and Hangul;
- for room names only, a name that is nothing but look-alikes of an ASCII name, such as
  all-Cyrillic ``сое`` (``LOOKALIKE``): rooms are looked up by their exact name, so it
  would be a second room that looks like ``coe``.

Usernames compare by :func:`name_keys`: NFKC, case folding and a small *confusable
skeleton* of our own (Cyrillic, Greek, Armenian and Cherokee letters that look like Latin
ones, and Latin look-alikes such as dotless ``ı`` and small capitals), so Cyrillic ``аре``
and Latin ``ape`` cannot both be in one room. Room names are case-sensitive.

The standard library has no Script property, so :func:`script_of` derives a character's
script from its Unicode name.
"""

from __future__ import annotations

import bisect
import enum
import functools
import re
import unicodedata
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

from common.limits import (
    MAX_COMBINING_MARKS,
    MAX_ROOM_CHARS,
    MAX_USERNAME_CHARS,
    NAME_CACHE_SIZE,
)

# --- invisible and filler characters -----------------------------------------------------

#: Code points that draw nothing (or only blank space) but are not white space: the
#: Unicode Default_Ignorable_Code_Point set (DerivedCoreProperties.txt), which includes the
#: Hangul fillers, plus blank-looking characters we found. Inclusive ranges, sorted.
INVISIBLE_RANGES: Tuple[Tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # SOFT HYPHEN
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),  # ARABIC LETTER MARK
    (0x115F, 0x1160),  # HANGUL CHOSEONG FILLER, HANGUL JUNGSEONG FILLER (category Lo)
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ, AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS, VOWEL SEPARATOR
    (0x200B, 0x200F),  # ZERO WIDTH SPACE, ZWNJ, ZWJ, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings, PDF, overrides
    (0x2060, 0x206F),  # WORD JOINER, invisible operators, bidi isolates, deprecated controls
    (0x2800, 0x2800),  # BRAILLE PATTERN BLANK (category So: blank, not space)
    (0x3164, 0x3164),  # HANGUL FILLER (category Lo)
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1..16
    (0xFEFF, 0xFEFF),  # ZERO WIDTH NO-BREAK SPACE (byte order mark)
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER (category Lo)
    (0xFFF0, 0xFFF8),  # unassigned, reserved as default ignorable
    (0x16FE4, 0x16FE4),  # KHITAN SMALL SCRIPT FILLER
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT LETTER OVERLAP .. UP STEP
    (0x1D159, 0x1D159),  # MUSICAL SYMBOL NULL NOTEHEAD (draws nothing)
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM .. END PHRASE
    (0xE0000, 0xE0FFF),  # tags, VARIATION SELECTOR-17..256, reserved
)
_INVISIBLE_STARTS = [start for start, _ in INVISIBLE_RANGES]

#: Letters that only stretch the letters around them (kashida): in a name they make a
#: second spelling that looks like the first. Refused in names, harmless in text.
_NAME_FILLERS = frozenset(
    "\u0640"  # ARABIC TATWEEL
    "\u07fa"  # NKO LAJANYALAN
)


def _invisible_pattern() -> str:
    """A regex character class of every code point :func:`is_invisible` accepts: the
    table, and the format characters of this Python's Unicode database (planes 0, 1 and
    14 hold them all; ~10 ms at import)."""
    codes = set()
    for start, end in INVISIBLE_RANGES:
        codes.update(range(start, end + 1))
    for plane_start, plane_end in ((0, 0x20000), (0xE0000, 0xE1000)):
        codes.update(
            c for c in range(plane_start, plane_end) if unicodedata.category(chr(c)) == "Cf"
        )
    ranges: List[Tuple[int, int]] = []
    for code in sorted(codes):
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\U{start:08x}-\\U{end:08x}" for start, end in ranges)


#: Matches a text made only of white space (any Unicode white space) and invisibles.
BLANK_TEXT = re.compile(f"[\\s{_invisible_pattern()}]*\\Z")


def is_invisible(char: str) -> bool:
    """True if *char* (one character) draws nothing: in :data:`INVISIBLE_RANGES`, or a
    format character (category ``Cf``, e.g. U+0600 ARABIC NUMBER SIGN, U+FFF9)."""
    code = ord(char)
    index = bisect.bisect_right(_INVISIBLE_STARTS, code) - 1
    if index >= 0 and code <= INVISIBLE_RANGES[index][1]:
        return True
    return unicodedata.category(char) == "Cf"


# --- scripts -----------------------------------------------------------------------------

COMMON = "Common"
INHERITED = "Inherited"
LATIN = "Latin"
HAN = "Han"
HIRAGANA = "Hiragana"
KATAKANA = "Katakana"
BOPOMOFO = "Bopomofo"
HANGUL = "Hangul"
#: The script given to a letter without a Unicode name in this Python's database.
UNKNOWN = "Unknown"

#: Name prefixes whose script is not simply the first word, longest first. A first word
#: shared by several scripts (OLD, TAI, LINEAR...) takes the next word too.
_PREFIX_SCRIPTS: Dict[str, str] = {
    "NEW TAI LUE": "New Tai Lue",
    "CANADIAN SYLLABICS": "Canadian Syllabics",
    "EXTENDED ARABIC-INDIC": "Arabic",
    "MODIFIER LETTER CAPITAL": LATIN,
    "MODIFIER LETTER SMALL": LATIN,
    "MODIFIER LETTER CYRILLIC": "Cyrillic",
    "MODIFIER LETTER GREEK": "Greek",
    "MODIFIER LETTER": COMMON,  # PRIME, APOSTROPHE, LOW MACRON...: punctuation look-alikes
    "VERTICAL KANA": KATAKANA,  # VERTICAL KANA REPEAT MARK (Hiragana and Katakana)
    "VERTICAL IDEOGRAPHIC": HAN,
    "OLD CHINESE": HAN,
}
_PREFIX_HEADS = frozenset(prefix.split(" ")[0] for prefix in _PREFIX_SCRIPTS)
#: First words that are not a script's name, or name it differently.
_WORD_SCRIPTS: Dict[str, str] = {
    "CJK": HAN,
    "IDEOGRAPHIC": HAN,  # ITERATION MARK, CLOSING MARK, the tone marks
    "VIETNAMESE": HAN,  # ALTERNATE READING MARKs
    "HENTAIGANA": HIRAGANA,
    "KATAKANA-HIRAGANA": KATAKANA,  # PROLONGED SOUND MARK, both kana
    "MASU": HIRAGANA,  # MASU MARK
    "ARABIC-INDIC": "Arabic",
    "TURNED": LATIN,  # TURNED CAPITAL F, TURNED SMALL F
    "ROMAN": LATIN,  # ROMAN NUMERAL REVERSED ONE HUNDRED (a letter)
    "DIGIT": COMMON,
    "CARON": COMMON,
    "VERTICAL": COMMON,  # VERTICAL TILDE
}
#: First words heading several scripts: the script is the first two words.
_TWO_WORD_SCRIPTS = frozenset({"OLD", "TAI", "LINEAR", "MEROITIC", "INSCRIPTIONAL"})
#: Script words that follow COMBINING in the names of marks that belong to one script
#: (COMBINING CYRILLIC TITLO, COMBINING GREEK PERISPOMENI, COMBINING OLD PERMIC LETTER AN).
_COMBINING_SCRIPT_WORDS = frozenset(
    {"CYRILLIC", "GREEK", "LATIN", "DEVANAGARI", "GLAGOLITIC", "GRANTHA", "OLD"}
)
#: Scripts whose letters may be mixed in one name (TR39 "highly restrictive").
_SCRIPT_SETS: Tuple[FrozenSet[str], ...] = (
    frozenset({LATIN, HAN, HIRAGANA, KATAKANA}),
    frozenset({LATIN, HAN, BOPOMOFO}),
    frozenset({LATIN, HAN, HANGUL}),
)


def script_of(char: str) -> str:
    """The script of *char* as a title-cased name (``"Latin"``, ``"Cyrillic"``, ``"Han"``,
    ``"New Tai Lue"``), derived from its Unicode name; :data:`COMMON` for ASCII digits and
    ``_ - .``, :data:`INHERITED` for the ``COMBINING ...`` marks that take the script of
    their letter, :data:`UNKNOWN` for a character this Python has no name for."""
    if char < "\x80":
        return LATIN if char.isalpha() else COMMON
    name = unicodedata.name(char, "")
    if not name:
        return UNKNOWN
    words = name.split(" ", 4)  # no prefix is longer than three words
    if words[0] in ("HALFWIDTH", "FULLWIDTH") and len(words) > 1:
        words = words[1:]  # HALFWIDTH KATAKANA LETTER A is Katakana
    if words[0] == "COMBINING":
        # COMBINING CYRILLIC TITLO is Cyrillic; COMBINING ACUTE ACCENT is inherited.
        if len(words) > 2 and words[1] in _COMBINING_SCRIPT_WORDS:
            return _script_from_words(words[1:])
        return INHERITED
    return _script_from_words(words)


def _script_from_words(words: List[str]) -> str:
    first = words[0]
    if first in _PREFIX_HEADS:
        for size in (3, 2):
            script = _PREFIX_SCRIPTS.get(" ".join(words[:size]))
            if script is not None:
                return script
    script = _WORD_SCRIPTS.get(first)
    if script is not None:
        return script
    if first in _TWO_WORD_SCRIPTS and len(words) > 1:
        return f"{first} {words[1]}".title()
    return first.title()


def _allowed_scripts(scripts: List[str]) -> bool:
    distinct = set(scripts)
    return len(distinct) <= 1 or any(distinct <= allowed for allowed in _SCRIPT_SETS)


# --- look-alikes (the confusable skeleton) -----------------------------------------------

#: Letters that look like a Latin letter or a digit *in the case written*, as
#: ``code:latin`` pairs per script. Our own short list of the look-alikes that matter in
#: names (not Unicode's confusables.txt). Small capitals map to capitals: ``ᴀʟɪᴄᴇ`` looks
#: like ``ALICE``.
_LOOKALIKE_DATA = """
Cyrillic  0410:A 0430:a 0412:B 0415:E 0435:e 0405:S 0455:s 0406:I 0456:i 0408:J 0458:j
          041A:K 041C:M 041D:H 041E:O 043E:o 0420:P 0440:p 0421:C 0441:c 0422:T 0425:X
          0445:x 0423:Y 0443:y 04AE:Y 04AF:y 04C0:I 04CF:l 0501:d 050C:G 051A:Q 051B:q
          051C:W 051D:w 04BA:H 04BB:h 042C:b 044C:b 0417:3 0437:3 0431:6 0474:V 0475:v
          0433:r 043F:n 0461:w
Greek     0391:A 0392:B 0395:E 0396:Z 0397:H 0399:I 039A:K 039C:M 039D:N 039F:O 03A1:P
          03A4:T 03A5:Y 03A7:X 03B1:a 03B3:y 03B9:i 03BA:k 03BD:v 03BF:o 03C1:p 03C5:u
          03C7:x 03BC:u 03F3:j 037F:J 03DC:F
Armenian  0555:O 0585:o 054D:U 057D:u 054F:S 053C:L 056C:l 0578:n 0570:h 0566:q 0581:g
          0575:j
Cherokee  13A0:D 13A1:R 13A2:T 13A5:i 13A9:Y 13AA:A 13AB:J 13AC:E 13B3:W 13B7:M 13BB:H
          13C0:G 13C2:h 13C3:Z 13CF:b 13D2:R 13D9:V 13DA:S 13DE:L 13DF:C 13E2:P 13E6:K
          13E7:d 13EE:6 13F4:B
Latin     0131:i 0237:j 0251:a 0261:g 0269:i 01C0:l 0138:k 0192:f 027E:r
          1D00:A 0299:B 1D04:C 1D05:D 1D07:E A730:F 0262:G 029C:H 026A:I 1D0A:J 1D0B:K
          029F:L 1D0D:M 0274:N 1D0F:O 1D18:P 0280:R A731:S 1D1B:T 1D1C:U 1D20:V 1D21:W
          028F:Y 1D22:Z
Arabic    0627:l 0661:1 06F1:1 0660:. 06F0:. 0665:o 0647:o
Hebrew    05D5:l 05DF:l 05E1:o
Devanagari 0966:o
Han       4E00:- 4E28:l
Katakana  30FC:-
"""


def _parse_lookalikes(data: str) -> Dict[str, Dict[str, str]]:
    """``{script: {look-alike: latin}}`` from :data:`_LOOKALIKE_DATA`."""
    tables: Dict[str, Dict[str, str]] = {}
    script = ""
    for line in data.strip().splitlines():
        fields = line.split()
        if not line.startswith(" "):
            script, fields = fields[0], fields[1:]
        for pair in fields:
            code, latin = pair.split(":")
            tables.setdefault(script, {})[chr(int(code, 16))] = latin
    return tables


#: The look-alike tables by script, for tests and docs.
LOOKALIKES_BY_SCRIPT = _parse_lookalikes(_LOOKALIKE_DATA)
#: Look-alike -> Latin, in the case written (used for room names and a username's
#: second key).
_EXACT: Dict[str, str] = {k: v for table in LOOKALIKES_BY_SCRIPT.values() for k, v in table.items()}


def _folded_table(exact: Dict[str, str]) -> Dict[str, str]:
    """The table for case-folded text: each look-alike's folded form -> the folded Latin.
    A folded letter whose cases look like different Latin letters (Greek ``Ν``/``ν`` look
    like N and v) is left out: the second key of :func:`name_keys` covers it."""
    folded: Dict[str, str] = {}
    ambiguous = set()
    for char, latin in exact.items():
        source, target = char.casefold(), latin.casefold()
        if len(source) != 1 or folded.get(source, target) != target:
            ambiguous.add(source)
        folded[source] = target
    return {k: v for k, v in folded.items() if k not in ambiguous}


_FOLDED = _folded_table(_EXACT)


def _skeleton(text: str, table: Dict[str, str]) -> str:
    """*text* with every look-alike replaced by its Latin letter, accents kept (so
    Cyrillic ``ё`` becomes Latin ``ë``)."""
    decomposed = unicodedata.normalize("NFD", text)
    mapped = "".join([table.get(char, char) for char in decomposed])
    return unicodedata.normalize("NFC", mapped)


def _fold(text: str) -> str:
    """Case-folded and back in NFKC (folding may decompose: ``ǰ`` -> ``j`` + U+030C)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def name_keys(username: str) -> Tuple[str, ...]:
    """The keys that make two usernames "the same" in a room: one or two strings, and two
    names collide when they share any. The first is :func:`name_key`; the second, only
    when it differs, reads each look-alike in the case written (``ΝΙΚΕ`` -> ``nike``,
    ``νικε`` -> ``vike``). ASCII names take a fast path (one key, lower-cased)."""
    if username.isascii():
        return (username.lower(),)
    first = _skeleton(_fold(username), _FOLDED)
    second = _skeleton(_fold(_skeleton(unicodedata.normalize("NFKC", username), _EXACT)), _FOLDED)
    return (first,) if second == first else (first, second)


def name_key(username: str) -> str:
    """The primary key of a username: NFKC, case-folded, look-alikes read as Latin. Names
    are sorted by it; :func:`name_keys` decides collisions."""
    if username.isascii():
        return username.lower()
    return _skeleton(_fold(username), _FOLDED)


# --- the rule ----------------------------------------------------------------------------


class NameKind(enum.Enum):
    """Which kind of name is checked; the value is how error lines call it."""

    USERNAME = "username"
    ROOM = "room name"

    @property
    def max_chars(self) -> int:
        return MAX_USERNAME_CHARS if self is NameKind.USERNAME else MAX_ROOM_CHARS

    @property
    def rule(self) -> str:
        """What a valid name is, in the words both protocols have always used."""
        return f"1-{self.max_chars} letters, digits, _ - ."


class NameProblem(enum.Enum):
    """Why a name was refused. Both protocols render the same text from it."""

    RULE = "rule"
    INVISIBLE = "invisible"
    MARKS = "marks"
    MIXED_DIGITS = "mixed_digits"
    MIXED_SCRIPTS = "mixed_scripts"
    LOOKALIKE = "lookalike"


class NameRefusal(NamedTuple):
    """A refused name: its kind, the problem and, for ``MIXED_SCRIPTS``, the scripts in
    the order they appear."""

    kind: NameKind
    problem: NameProblem
    scripts: Tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The text after ``invalid <kind>: ``."""
        if self.problem is NameProblem.MIXED_SCRIPTS:
            *head, last = self.scripts
            return f"mixes {', '.join(head)} and {last} scripts"
        if self.problem is NameProblem.RULE:
            return self.kind.rule
        return _REASONS[self.problem]

    @property
    def message(self) -> str:
        """The whole message: ``invalid username: ...`` (TCP sends ``ERROR`` + it, HTTP
        puts it in ``error.message``)."""
        return f"invalid {self.kind.value}: {self.reason}"


_REASONS = {
    NameProblem.INVISIBLE: "invisible or filler characters are not allowed",
    NameProblem.MARKS: (
        f"accents and other marks go on a letter, at most {MAX_COMBINING_MARKS} in a row"
    ),
    NameProblem.MIXED_DIGITS: "mixes digits of different number systems",
    NameProblem.LOOKALIKE: "uses look-alikes of Latin letters",
}

_ASCII_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_PUNCTUATION = frozenset("_-.")
_LETTERS = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo"})
_MARKS = frozenset({"Mn", "Mc"})


def normalize(name: str) -> str:
    """*name* in NFKC form, the form every name is checked, stored, shown and compared in."""
    if name.isascii():
        return name
    return unicodedata.normalize("NFKC", name)


def check_name(raw: str, kind: NameKind) -> Union[str, NameRefusal]:
    """Normalise *raw* (as received) and apply the name rule for *kind*.

    Returns the normalised name, or the :class:`NameRefusal` saying why it is refused.
    Never raises.
    """
    if raw.isascii():
        if len(raw) <= kind.max_chars and _ASCII_NAME.match(raw):
            return raw  # ASCII is NFKC, one script, and looks like itself
        return NameRefusal(kind, NameProblem.RULE)
    if len(raw) <= 4 * kind.max_chars:  # bounds what the cache holds
        return _check_remembered(raw, kind)
    return _check_unicode(raw, kind)


@functools.lru_cache(maxsize=NAME_CACHE_SIZE)
def _check_remembered(raw: str, kind: NameKind) -> Union[str, NameRefusal]:
    return _check_unicode(raw, kind)


def _check_unicode(raw: str, kind: NameKind) -> Union[str, NameRefusal]:
    """:func:`check_name` for a name that is not ASCII."""
    name = unicodedata.normalize("NFKC", raw)
    if not 0 < len(name) <= kind.max_chars:
        return NameRefusal(kind, NameProblem.RULE)
    problem, scripts = _scan(name)
    if problem is not None:
        return NameRefusal(kind, problem)
    if not _allowed_scripts(scripts):
        return NameRefusal(kind, NameProblem.MIXED_SCRIPTS, tuple(scripts))
    if kind is NameKind.ROOM and _looks_like_ascii(name):
        return NameRefusal(kind, NameProblem.LOOKALIKE)
    return name


def check_username(raw: str) -> Union[str, NameRefusal]:
    """:func:`check_name` for a username."""
    if raw.isascii() and len(raw) <= MAX_USERNAME_CHARS and _ASCII_NAME.match(raw):
        return raw  # the usual case, without touching the enum (slow to hash and look up)
    return check_name(raw, NameKind.USERNAME)


def check_room(raw: str) -> Union[str, NameRefusal]:
    """:func:`check_name` for a room name."""
    if raw.isascii() and len(raw) <= MAX_ROOM_CHARS and _ASCII_NAME.match(raw):
        return raw  # every MSG names its room: keep this path short
    return check_name(raw, NameKind.ROOM)


def is_valid_username(name: str) -> bool:
    """True if *name* is a valid username exactly as given (already normalised)."""
    return check_username(name) == name


def is_valid_room(name: str) -> bool:
    """True if *name* is a valid room name exactly as given (already normalised)."""
    return check_room(name) == name


def _scan(name: str) -> Tuple[Optional[NameProblem], List[str]]:
    """One pass over *name* (NFKC, read decomposed, so the marks inside precomposed letters
    count): the problem if any, and the scripts of its letters, marks and digits in the
    order they appear, without the common and inherited ones.

    Problems rank INVISIBLE (anywhere), RULE (a symbol, space, punctuation or
    punctuation-like letter), MARKS (a mark not on a letter of its own script, or more
    than MAX_COMBINING_MARKS on one), then MIXED_DIGITS (digits of two number systems,
    told apart by the code point of their zero)."""
    rule = marks = False
    zeros: Set[int] = set()  # the code points of the digits' zeros
    scripts: Dict[str, None] = {}  # an ordered set
    base: Optional[str] = None  # the script of the letter marks may go on, if any
    run = 0  # marks on it so far
    for char in unicodedata.normalize("NFD", name):
        if char < "\x80":
            run, base = 0, None
            if char.isalpha():
                base = LATIN
                scripts[LATIN] = None
            elif char.isdigit():
                zeros.add(0x30)
            elif char not in _PUNCTUATION:
                rule = True
            continue
        if is_invisible(char) or char in _NAME_FILLERS:
            return NameProblem.INVISIBLE, []
        category = unicodedata.category(char)
        if category in _MARKS:
            run += 1
            if (
                base is None
                or run > MAX_COMBINING_MARKS
                or script_of(char) not in (INHERITED, base)
            ):
                marks = True
            continue
        run, base = 0, None
        if category == "Nd":
            zeros.add(ord(char) - unicodedata.decimal(char))
            script = script_of(char)
        elif category in _LETTERS:
            script = script_of(char)
            base = script
        else:
            rule = True
            continue
        if script == COMMON and category != "Nd":
            rule = True  # MODIFIER LETTER PRIME and friends: punctuation, not letters
        elif script not in (COMMON, INHERITED):
            scripts[script] = None
    if rule:
        return NameProblem.RULE, []
    if marks:
        return NameProblem.MARKS, []
    if len(zeros) > 1:
        return NameProblem.MIXED_DIGITS, []
    return None, list(scripts)


def _looks_like_ascii(name: str) -> bool:
    """True if reading every look-alike as Latin turns *name* into another, ASCII name."""
    skeleton = _skeleton(name, _EXACT)
    return skeleton != name and skeleton.isascii()
