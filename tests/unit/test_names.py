"""Name rules (common/names.py): which usernames and room names are valid, why the others
are refused, and when two usernames are the same."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common import names
from common.limits import (
    MAX_COMBINING_MARKS,
    MAX_ROOM_CHARS,
    MAX_USERNAME_CHARS,
    NAME_CACHE_SIZE,
)
from common.names import (
    INVISIBLE_RANGES,
    LOOKALIKES_BY_SCRIPT,
    NameKind,
    NameProblem,
    NameRefusal,
    check_name,
    check_room,
    check_username,
    is_invisible,
    is_valid_room,
    is_valid_username,
    name_key,
    name_keys,
    normalize,
    script_of,
)

pytestmark = pytest.mark.timeout(60)

KINDS = [NameKind.USERNAME, NameKind.ROOM]


def problem(name: str, kind: NameKind = NameKind.USERNAME) -> NameProblem:
    """The problem *name* is refused for (fails the test if it is accepted)."""
    checked = check_name(name, kind)
    assert isinstance(checked, NameRefusal), f"{name!r} was accepted as {checked!r}"
    return checked.problem


def collide(a: str, b: str) -> bool:
    return bool(set(name_keys(a)) & set(name_keys(b)))


# --- valid names -------------------------------------------------------------------------

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
    "Zoë",
    "日本",
    "Ελλάδα",
    "Ἀθῆναι",  # polytonic Greek, precomposed
    "Москва",
    "Дмитрий",
    "李雷",
    "محمد",
    "مُحَمَّد",  # Arabic with vowel marks
    "שלום",
    "שָׁלוֹם",  # Hebrew with points: two marks on one letter
    "山田たろう",  # Han + Hiragana
    "ラーメン",  # Katakana with the prolonged sound mark
    "漢字かな交じり",
    "김철수",
    "नमस्ते",  # Devanagari: virama and vowel sign (Mn) after letters
    "राम१",  # Devanagari letters and digit
    "สวัสดี",  # Thai marks
    "தமிழ்",  # Tamil: Mc and Mn
    "Հայաստան",
    "საქართველო",
    "አበበ",
    "ᏣᎳᎩ",  # Cherokee
    "ᐊᐃᓄᒃᑎᑐᑦ",  # Canadian syllabics
    "Nguyễn",  # two marks inside one precomposed letter
    "Łódź",
    "Ærøskøbing",
    "Işık",
    "straße",
    "q\u0301",  # no precomposed q-acute: a combining mark on a letter
    "q\u0301\u0302",  # MAX_COMBINING_MARKS of them
    "Tokyo東京",  # Latin + Han
    "台北ㄅㄆ",  # Han + Bopomofo
    "서울Seoul",  # Hangul + Latin
    "Kimchi김치",
    "٣٤",  # Arabic-Indic digits
    "محمد٣",
    "Ⅎ",  # TURNED CAPITAL F: a Latin letter
]


@pytest.mark.parametrize("name", VALID, ids=repr)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_valid(name: str, kind: NameKind) -> None:
    assert check_name(name, kind) == name
    assert is_valid_username(name) if kind is NameKind.USERNAME else is_valid_room(name)


# --- NFKC --------------------------------------------------------------------------------

FOLDS_TO_ALICE = [
    "ａｌｉｃｅ",  # fullwidth
    "𝐚𝐥𝐢𝐜𝐞",  # mathematical bold
    "𝒶𝓁𝒾𝒸ℯ",  # mathematical script
    "𝔞𝔩𝔦𝔠𝔢",  # fraktur
    "𝕒𝕝𝕚𝕔𝕖",  # double-struck
    "𝚊𝚕𝚒𝚌𝚎",  # monospace
    "ⓐⓛⓘⓒⓔ",  # circled
    "ᵃˡⁱᶜᵉ",  # modifier / superscript letters
]


@pytest.mark.parametrize("name", FOLDS_TO_ALICE, ids=repr)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_compatibility_forms_are_the_ascii_name(name: str, kind: NameKind) -> None:
    assert check_name(name, kind) == "alice"
    assert name_key(name) == name_key("alice") == "alice"
    assert not is_valid_username(name)  # valid only in its normal form


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("zoe\u0308", "zoë"),
        ("e\u0301" * 3, "ééé"),
        ("\u212b", "\u00c5"),  # ANGSTROM SIGN -> LATIN CAPITAL A WITH RING
        ("ＬＯＢＢＹ", "LOBBY"),  # fullwidth keeps its case
        ("ǅemal", "Džemal"),  # titlecase digraph (Lt) -> two letters
        ("ʰa", "ha"),  # modifier letter (Lm)
        ("ﬁx", "fix"),  # ligature
        ("ⅷ", "viii"),  # SMALL ROMAN NUMERAL EIGHT
        ("𝟏𝟐", "12"),  # mathematical digits
        ("Ⓐlice", "Alice"),
        ("\uff71", "\u30a2"),  # HALFWIDTH KATAKANA LETTER A
        ("plain", "plain"),
        ("zoë", "zoë"),
    ],
    ids=repr,
)
def test_normalize_is_nfkc(raw: str, normal: str) -> None:
    assert normalize(raw) == normal
    assert check_username(raw) == normal
    assert check_room(raw) == normal


def test_length_is_counted_after_nfkc() -> None:
    # U+337F SQUARE CORPORATION is one character and four once normalised.
    assert check_username("\u337f" * 8) == "株式会社" * 8
    assert problem("\u337f" * 9) is NameProblem.RULE
    assert check_username("e\u0301" * MAX_USERNAME_CHARS) == "é" * MAX_USERNAME_CHARS


# --- the old rule: length and characters -------------------------------------------------

RULE_BREAKERS = [
    "",
    " ",
    "a b",
    "a\tb",
    "a\u00a0b",  # NO-BREAK SPACE: NFKC makes it a space
    "a\u3000b",  # IDEOGRAPHIC SPACE
    "*",
    "a*",
    "a:b",
    "a/b",
    "a@b",
    "a,b",
    "#room",
    "😀",
    "a😀",
    "ↁ",  # ROMAN NUMERAL FIVE THOUSAND (Nl), not a letter, no NFKC form
    "½",  # NFKC: 1 FRACTION SLASH 2
    "a\u20dd",  # enclosing mark (Me)
    "\u02b9a",  # MODIFIER LETTER PRIME: a letter that is punctuation
    "a\u02cdb",  # MODIFIER LETTER LOW MACRON looks like _
    "a\u02bcb",  # MODIFIER LETTER APOSTROPHE
    "a\x00",
]


@pytest.mark.parametrize("name", RULE_BREAKERS, ids=repr)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_rule_breakers_get_the_old_line(name: str, kind: NameKind) -> None:
    refusal = check_name(name, kind)
    assert refusal == NameRefusal(kind, NameProblem.RULE)
    expected = {
        NameKind.USERNAME: "invalid username: 1-32 letters, digits, _ - .",
        NameKind.ROOM: "invalid room name: 1-64 letters, digits, _ - .",
    }[kind]
    assert refusal.message == expected


@pytest.mark.parametrize("char", ["a", "é", "日"], ids=["ascii", "latin1", "cjk"])
def test_username_length(char: str) -> None:
    assert is_valid_username(char * MAX_USERNAME_CHARS)
    assert problem(char * (MAX_USERNAME_CHARS + 1)) is NameProblem.RULE


@pytest.mark.parametrize("char", ["a", "é", "日"], ids=["ascii", "latin1", "cjk"])
def test_room_length(char: str) -> None:
    assert is_valid_room(char * MAX_ROOM_CHARS)
    assert problem(char * (MAX_ROOM_CHARS + 1), NameKind.ROOM) is NameProblem.RULE


def test_limits_are_the_documented_ones() -> None:
    assert (MAX_USERNAME_CHARS, MAX_ROOM_CHARS, MAX_COMBINING_MARKS) == (32, 64, 2)


# --- invisible and filler characters -----------------------------------------------------

INVISIBLES = [
    "\u00ad",  # SOFT HYPHEN
    "\u034f",  # COMBINING GRAPHEME JOINER
    "\u061c",  # ARABIC LETTER MARK
    "\u115f",  # HANGUL CHOSEONG FILLER (Lo)
    "\u1160",  # HANGUL JUNGSEONG FILLER (Lo)
    "\u17b4",  # KHMER VOWEL INHERENT AQ
    "\u17b5",
    "\u180b",  # MONGOLIAN FREE VARIATION SELECTOR ONE
    "\u180e",  # MONGOLIAN VOWEL SEPARATOR
    "\u180f",
    "\u200b",  # ZERO WIDTH SPACE
    "\u200c",  # ZWNJ
    "\u200d",  # ZWJ
    "\u200e",  # LRM
    "\u200f",  # RLM
    "\u202a",  # LRE
    "\u202c",  # PDF
    "\u202e",  # RLO
    "\u2060",  # WORD JOINER
    "\u2062",  # INVISIBLE TIMES
    "\u2064",  # INVISIBLE PLUS
    "\u2066",  # LRI
    "\u2069",  # PDI
    "\u206f",  # NOMINAL DIGIT SHAPES
    "\u2800",  # BRAILLE PATTERN BLANK (So)
    "\u3164",  # HANGUL FILLER (Lo)
    "\ufe00",  # VARIATION SELECTOR-1
    "\ufe0f",  # VARIATION SELECTOR-16
    "\ufeff",  # ZERO WIDTH NO-BREAK SPACE
    "\uffa0",  # HALFWIDTH HANGUL FILLER (Lo)
    "\ufff0",  # reserved default ignorable
    "\ufff8",
    "\U00016fe4",  # KHITAN SMALL SCRIPT FILLER
    "\U0001bca0",  # SHORTHAND FORMAT LETTER OVERLAP
    "\U0001bca3",
    "\U0001d159",  # MUSICAL SYMBOL NULL NOTEHEAD
    "\U0001d173",  # MUSICAL SYMBOL BEGIN BEAM
    "\U0001d17a",
    "\U000e0001",  # LANGUAGE TAG
    "\U000e0041",  # TAG LATIN CAPITAL LETTER A
    "\U000e0100",  # VARIATION SELECTOR-17
    "\U000e01ef",  # VARIATION SELECTOR-256
    "\U000e0fff",
    "\u0600",  # ARABIC NUMBER SIGN: any other format character (Cf)
    "\U000110bd",  # KAITHI NUMBER SIGN (Cf)
    "\u0640",  # ARABIC TATWEEL: a filler in names
    "\u07fa",  # NKO LAJANYALAN
]
PLACES = {
    "start": "{}alice",
    "middle": "al{}ice",
    "end": "alice{}",
    "alone": "{}",
    "twice": "{}{}",
}


@pytest.mark.parametrize("char", INVISIBLES, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_invisible_and_filler_characters_are_refused(char: str, place: str, kind: NameKind) -> None:
    name = PLACES[place].format(char, char)
    refusal = check_name(name, kind)
    assert refusal == NameRefusal(kind, NameProblem.INVISIBLE)
    assert (
        refusal.message == f"invalid {kind.value}: invisible or filler characters are not allowed"
    )


@pytest.mark.parametrize("char", INVISIBLES[:-2], ids=lambda c: f"U+{ord(c):04X}")
def test_is_invisible(char: str) -> None:
    assert is_invisible(char)


@pytest.mark.parametrize("char", ["a", " ", "\u3000", "\u0301", "_", "日", "\u2801", "\u0640"])
def test_is_not_invisible(char: str) -> None:
    assert not is_invisible(char)


def test_the_default_ignorable_set_is_covered() -> None:
    """Every range of Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt,
    copied by hand) and each Hangul filler is in the table, which is sorted and disjoint."""
    default_ignorable = [
        (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
        (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
        (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
        (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
        (0xE0000, 0xE0FFF),
    ]  # fmt: skip
    for start, end in default_ignorable:
        for code in {start, (start + end) // 2, end}:
            assert is_invisible(chr(code)), f"U+{code:04X}"
    assert list(INVISIBLE_RANGES) == sorted(INVISIBLE_RANGES)
    for (_, end), (start, _) in zip(INVISIBLE_RANGES, INVISIBLE_RANGES[1:]):
        assert end < start


# --- scripts -----------------------------------------------------------------------------

SCRIPTS = [
    ("a", "Latin"),
    ("Z", "Latin"),
    ("é", "Latin"),
    ("ß", "Latin"),
    ("ı", "Latin"),
    ("ᴀ", "Latin"),  # LATIN LETTER SMALL CAPITAL A
    ("Ⅎ", "Latin"),  # TURNED CAPITAL F
    ("а", "Cyrillic"),
    ("Ж", "Cyrillic"),
    ("\u0483", "Cyrillic"),  # COMBINING CYRILLIC TITLO
    ("α", "Greek"),
    ("Ω", "Greek"),
    ("ἀ", "Greek"),
    ("ա", "Armenian"),
    ("Ա", "Armenian"),
    ("ა", "Georgian"),
    ("Ⴀ", "Georgian"),
    ("李", "Han"),
    ("々", "Han"),  # IDEOGRAPHIC ITERATION MARK
    ("〆", "Han"),  # IDEOGRAPHIC CLOSING MARK
    ("\U00020000", "Han"),  # CJK Extension B
    ("あ", "Hiragana"),
    ("ゝ", "Hiragana"),
    ("ア", "Katakana"),
    ("ー", "Katakana"),  # KATAKANA-HIRAGANA PROLONGED SOUND MARK
    ("\uff71", "Katakana"),  # HALFWIDTH KATAKANA LETTER A
    ("ㄅ", "Bopomofo"),
    ("한", "Hangul"),
    ("ㄱ", "Hangul"),  # compatibility jamo
    ("ᄀ", "Hangul"),  # conjoining jamo
    ("ب", "Arabic"),
    ("\u064e", "Arabic"),  # ARABIC FATHA
    ("٣", "Arabic"),  # ARABIC-INDIC DIGIT THREE
    ("۳", "Arabic"),  # EXTENDED ARABIC-INDIC DIGIT THREE
    ("א", "Hebrew"),
    ("\u05b8", "Hebrew"),  # HEBREW POINT QAMATS
    ("क", "Devanagari"),
    ("\u093e", "Devanagari"),  # DEVANAGARI VOWEL SIGN AA
    ("१", "Devanagari"),
    ("ก", "Thai"),
    ("த", "Tamil"),
    ("ሀ", "Ethiopic"),
    ("Ꭰ", "Cherokee"),
    ("ꭰ", "Cherokee"),  # small letter
    ("ᐁ", "Canadian Syllabics"),
    ("ᦀ", "New Tai Lue"),
    ("ᥐ", "Tai Le"),
    ("𐌀", "Old Italic"),
    ("𐎠", "Old Persian"),
    ("\u0301", "Inherited"),  # COMBINING ACUTE ACCENT
    ("0", "Common"),
    ("9", "Common"),
    ("_", "Common"),
    ("-", "Common"),
    (".", "Common"),
    ("\u02b9", "Common"),  # MODIFIER LETTER PRIME
]


@pytest.mark.parametrize(
    ("char", "script"), SCRIPTS, ids=[f"{s}-U+{ord(c):04X}" for c, s in SCRIPTS]
)
def test_script_of(char: str, script: str) -> None:
    assert script_of(char) == script


MIXED = [
    ("аlice", ("Cyrillic", "Latin")),  # Cyrillic а
    ("alicе", ("Latin", "Cyrillic")),  # Cyrillic е
    ("lоbby", ("Latin", "Cyrillic")),  # Cyrillic о
    ("pаypal", ("Latin", "Cyrillic")),
    ("Αlice", ("Greek", "Latin")),  # Greek capital alpha
    ("lοbby", ("Latin", "Greek")),  # Greek omicron
    ("օlga", ("Armenian", "Latin")),
    ("ᎪBC", ("Cherokee", "Latin")),
    ("Дmitry", ("Cyrillic", "Latin")),
    ("Москваα", ("Cyrillic", "Greek")),
    ("aא", ("Latin", "Hebrew")),
    ("aب", ("Latin", "Arabic")),
    ("a١", ("Latin", "Arabic")),  # an Arabic-Indic digit is Arabic
    ("ひ김", ("Hiragana", "Hangul")),
    ("ア한", ("Katakana", "Hangul")),
    ("ㄅ김", ("Bopomofo", "Hangul")),
    ("ㄅあ", ("Bopomofo", "Hiragana")),
    ("aбγ", ("Latin", "Cyrillic", "Greek")),
    ("日本Ж", ("Han", "Cyrillic")),
]


@pytest.mark.parametrize(("name", "scripts"), MIXED, ids=[n for n, _ in MIXED])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_mixed_scripts_are_refused(name: str, scripts: tuple, kind: NameKind) -> None:
    refusal = check_name(name, kind)
    assert refusal == NameRefusal(kind, NameProblem.MIXED_SCRIPTS, scripts)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("аlice", "invalid username: mixes Cyrillic and Latin scripts"),
        ("aбγ", "invalid username: mixes Latin, Cyrillic and Greek scripts"),
    ],
)
def test_mixed_scripts_message(name: str, message: str) -> None:
    refusal = check_username(name)
    assert isinstance(refusal, NameRefusal)
    assert refusal.message == message


@pytest.mark.parametrize(
    "name",
    [
        "Tokyo東京",
        "山田たろう",
        "カタカナ漢字",
        "Abcあア漢",
        "台北ㄅㄆ",
        "Latinㄅ",
        "서울Seoul",
        "漢한",
    ],
)
def test_highly_restrictive_combinations_are_allowed(name: str) -> None:
    assert check_username(name) == name


# --- digits and marks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["0١", "١0", "١۱", "१1", "a1२", "٣4", "๑1", "১২1"],
    ids=repr,
)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_digit_systems_do_not_mix(name: str, kind: NameKind) -> None:
    refusal = check_name(name, kind)
    assert refusal == NameRefusal(kind, NameProblem.MIXED_DIGITS)
    assert refusal.message == f"invalid {kind.value}: mixes digits of different number systems"


@pytest.mark.parametrize("name", ["007", "٣٤", "۱۲", "राम१२", "๑๒"])
def test_one_digit_system_is_fine(name: str) -> None:
    assert check_username(name) == name


BAD_MARKS = [
    "\u0301a",  # at the start
    "1\u0301",  # on a digit
    "_\u0301",  # on punctuation
    "q\u0301\u0302\u0303",  # three on one letter
    "\u00e1\u0302\u0303",  # á already holds one: three in all
    "a\u093e",  # a Devanagari vowel sign on a Latin letter
    "a\u05b8",  # a Hebrew point on a Latin letter
    "\u0915\u094d\u094d\u094d",  # three viramas
]


@pytest.mark.parametrize("name", BAD_MARKS, ids=repr)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_misplaced_or_stacked_marks_are_refused(name: str, kind: NameKind) -> None:
    refusal = check_name(name, kind)
    assert refusal == NameRefusal(kind, NameProblem.MARKS)
    assert refusal.message == (
        f"invalid {kind.value}: accents and other marks go on a letter, at most 2 in a row"
    )


def test_marks_limit_is_crossed_at_three() -> None:
    assert check_username("q" + "\u0301" * MAX_COMBINING_MARKS) == "q" + "\u0301" * 2
    assert problem("q" + "\u0301" * (MAX_COMBINING_MARKS + 1)) is NameProblem.MARKS
    assert check_username("\u0915\u0301") == "\u0915\u0301"  # an inherited mark on any letter


# --- the uniqueness key ------------------------------------------------------------------


def test_name_key_ignores_case() -> None:
    assert name_key("Alice") == name_key("alice") == name_key("ALICE")
    assert name_key("ZOË") == name_key("zoë")
    assert name_key("STRASSE") == name_key("straße")  # case folding, not lower()
    assert name_key("ΔΗΜΗΤΡΗΣ") == name_key("δημητρης")  # final sigma folds too
    assert name_key("ДМИТРИЙ") == name_key("дмитрий")
    assert name_key("alice") != name_key("alicia")


SAME_NAMES = [
    ("аре", "ape"),  # all Cyrillic
    ("ѕсоре", "scope"),
    ("КОТ", "KOT"),
    ("КОТ", "kot"),
    ("аре", "APE"),
    ("сё", "cë"),  # accents survive the skeleton
    ("ΚΟΤ", "kot"),  # all Greek capitals
    ("ΝΙΚΕ", "nike"),  # Greek capital nu looks like N...
    ("νοχ", "vox"),  # ... and small nu like v
    ("ΤΟΜ", "tom"),
    ("ουτ", "out"),
    ("ΑΡΕ", "аре"),  # Greek and Cyrillic look-alikes of one Latin name
    ("օս", "ou"),  # Armenian
    ("ՏՕՍ", "SOU"),
    ("ᎠᎪ", "da"),  # Cherokee
    ("\uab70\uab7a", "DA"),  # Cherokee small letters fold to the capitals
    ("alıce", "alice"),  # dotless i
    ("ɑlice", "alice"),  # Latin alpha
    ("ᴀʟɪᴄᴇ", "alice"),  # small capitals
    ("ɡood", "good"),  # script g
    ("ａｌｉｃｅ", "alice"),
    ("𝐀𝐋𝐈𝐂𝐄", "alice"),
    ("ラ一メン", "ラーメン"),  # the Han "one" and the prolonged sound mark both look like -
]


@pytest.mark.parametrize(("a", "b"), SAME_NAMES, ids=[f"{a}={b}" for a, b in SAME_NAMES])
def test_look_alike_usernames_share_a_key(a: str, b: str) -> None:
    a, b = normalize(a), normalize(b)
    assert collide(a, b) and collide(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [("alice", "alicia"), ("Дмитрий", "Dmitry"), ("zoë", "zoe"), ("日本", "日木"), ("ΑΒΓ", "abc")],
)
def test_different_usernames_do_not_collide(a: str, b: str) -> None:
    assert not collide(a, b)


@pytest.mark.parametrize(("script", "table"), sorted(LOOKALIKES_BY_SCRIPT.items()))
def test_the_look_alike_table_is_what_it_says(script: str, table: dict) -> None:
    for char, latin in table.items():
        assert script_of(char) == script, f"U+{ord(char):04X} {unicodedata.name(char)}"
        assert latin.isascii() and len(latin) == 1 and not char.isascii()
        assert check_username(char) == char  # a valid name on its own


def test_ascii_names_take_the_fast_path() -> None:
    assert name_keys("Alice_9") == ("alice_9",)
    assert name_key("Alice_9") == "alice_9"


# --- room names that look like other room names ------------------------------------------

LOOKALIKE_ROOMS = [
    "сое",  # all Cyrillic: looks like coe
    "аре",
    "КОТ",
    "ΚΟΤ",  # all Greek capitals
    "ΑΒΕ",
    "օօ",  # Armenian
    "Ꭰ",  # Cherokee A looks like D
    "ᴀʟɪᴄᴇ",  # Latin small capitals
    "ʟobby",
    "ıı",
    "сое-1",  # digits and punctuation do not help
    "ー",
]


@pytest.mark.parametrize("room", LOOKALIKE_ROOMS)
def test_rooms_made_of_look_alikes_are_refused(room: str) -> None:
    refusal = check_room(room)
    assert refusal == NameRefusal(NameKind.ROOM, NameProblem.LOOKALIKE)
    assert refusal.message == "invalid room name: uses look-alikes of Latin letters"
    assert check_username(room) == room  # a username may: its key guards it


@pytest.mark.parametrize("room", ["Москва", "Ελλάδα", "Дмитрий", "日本", "Işık", "ΑΒΓ", "lobby"])
def test_rooms_with_letters_of_their_own_are_fine(room: str) -> None:
    assert check_room(room) == room


def test_room_names_stay_case_sensitive() -> None:
    assert check_room("Lobby") == "Lobby" and check_room("lobby") == "lobby"
    assert check_room("ＬＯＢＢＹ") == "LOBBY"


# --- properties --------------------------------------------------------------------------

#: Letters from several scripts, digits of two systems, marks, punctuation, invisibles and
#: look-alikes: random names mostly valid in one script, often broken in one way.
_ALPHABET = (
    "abcxyzABC019_-.éßı"
    "абвгдеАБВ"
    "αβγΑΒΓ"
    "日本あアー한ㄅ"
    "ابت٣"
    "कमस\u094d\u093e१"
    "\u0301\u0302\u0308"
    "\u200b\u3164\u2800"
    "ａ𝐚ᴀ"
)
random_names = st.text(st.sampled_from(_ALPHABET), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(random_names, st.text(max_size=10)))
@example(name="ΝΙΚΕ")
@example(name="ǰ")  # case folding decomposes it
@example(name="ﬃ")
def test_name_key_is_idempotent(name: str) -> None:
    key = name_key(name)
    assert name_key(key) == key
    assert name_keys(name)[0] == key


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(random_names, st.text(max_size=10)))
def test_valid_names_survive_normalisation_unchanged(raw: str) -> None:
    for kind in KINDS:
        checked = check_name(raw, kind)
        if isinstance(checked, NameRefusal):
            assert check_name(normalize(raw), kind) == checked  # refused either way
            continue
        assert normalize(checked) == checked
        assert check_name(checked, kind) == checked
        assert set(name_keys(checked)) & set(name_keys(raw))


@settings(max_examples=200, deadline=None)
@given(name=random_names)
def test_a_name_collides_with_its_other_cases(name: str) -> None:
    for other in (name.lower(), name.upper(), name.swapcase()):
        if other.casefold() == name.casefold():
            assert collide(name, other)


def test_the_check_cache_is_bounded() -> None:
    remembered = names._check_remembered
    remembered.cache_clear()
    for number in range(NAME_CACHE_SIZE + 50):
        assert check_username(f"zoë{number}") == f"zoë{number}"
    assert remembered.cache_info().currsize == NAME_CACHE_SIZE
    # Too long to be valid, and too long to be kept: checked, never remembered.
    remembered.cache_clear()
    assert problem("é" * (4 * MAX_USERNAME_CHARS + 1)) is NameProblem.RULE
    assert remembered.cache_info().currsize == 0
    assert problem("é" * (4 * MAX_USERNAME_CHARS)) is NameProblem.RULE
    assert remembered.cache_info().currsize == 1
