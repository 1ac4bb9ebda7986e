"""The line protocol, sans-IO: bytes in -> commands out, replies -> bytes.

Nothing here touches a socket, a loop or a thread. A transport feeds whatever bytes it read
to :meth:`CommandParser.receive_data` and gets back a list of events: a command tuple (one of
:class:`Join`, :class:`Msg`, ...) or a :class:`PeerError` carrying the exact ``ERROR`` line to
send back and whether the connection must be closed after it. Server lines are built by the
``*_line`` functions below; each returns the encoded bytes, ready to write, so a line sent to
many recipients is encoded once.

See ``docs/PROTOCOL.md`` for the contract these functions implement.
"""

from __future__ import annotations

import functools
import re
import time
from typing import NamedTuple, Optional, Tuple, Union

from common.limits import (
    MAX_HISTORY_REPLY,
    MAX_LINE_BYTES,
    MAX_PING_TOKEN_CHARS,
)
from common.names import NameKind, NameRefusal, check_room, check_username
from common.text import CONTROL, TextProblem, clean_text

# --- commands (client -> server) ---------------------------------------------------------


class Join(NamedTuple):
    room: str
    username: str


class Msg(NamedTuple):
    room: str
    text: str


class Leave(NamedTuple):
    room: str


class Quit(NamedTuple):
    pass


class Privmsg(NamedTuple):
    room: str
    to: str
    text: str


class Names(NamedTuple):
    room: str


class Rooms(NamedTuple):
    pass


class History(NamedTuple):
    room: str
    n: int


class Ping(NamedTuple):
    token: str


class Pong(NamedTuple):
    token: str


class PeerError(NamedTuple):
    """The peer sent something we refuse. ``reply`` is the ERROR line to send back; if
    ``fatal`` the connection is closed after it."""

    reply: bytes
    fatal: bool = False


Command = Union[Join, Msg, Leave, Quit, Privmsg, Names, Rooms, History, Ping, Pong]
Event = Union[Command, PeerError]

#: The verbs the unknown-command line lists: the line is the contract's, byte for byte
#: (docs/PROTOCOL.md), so verbs added since (PRIVMSG, PONG) are documented, not listed.
VERBS = ("JOIN", "MSG", "LEAVE", "QUIT", "NAMES", "ROOMS", "HISTORY", "PING")

# --- server lines ------------------------------------------------------------------------


def error_line(description: str) -> bytes:
    return f"ERROR {description}\n".encode()


def info_line(text: str) -> bytes:
    return f"INFO {text}\n".encode()


WELCOME = info_line(
    "welcome to shardchat; commands: JOIN <room> <username>, MSG <room> <text>, "
    "LEAVE <room>, NAMES <room>, ROOMS, HISTORY <room> [n], PING [token], QUIT"
)
BYE = info_line("bye")
SHUTTING_DOWN = info_line("server shutting down")


def joined_line(room: str) -> bytes:
    """To the joiner."""
    return f"INFO joined room {room}\n".encode()


def user_joined_line(username: str, room: str) -> bytes:
    """To the other members."""
    return f"INFO {username} joined {room}\n".encode()


def left_line(room: str) -> bytes:
    """To the leaver."""
    return f"INFO left room {room}\n".encode()


def user_left_line(username: str, room: str) -> bytes:
    """To the other members."""
    return f"INFO {username} left {room}\n".encode()


def msg_line(room: str, username: str, text: str) -> bytes:
    return f"MSG {room} {username} {text}\n".encode()


def privmsg_line(room: str, sender: str, to: str, text: str) -> bytes:
    """A direct message, to its recipient and (the echo) its sender."""
    return f"PRIVMSG {room} {sender} {to} {text}\n".encode()


def names_line(room: str, usernames: list[str]) -> bytes:
    return " ".join(["NAMES", room, *usernames]).encode() + b"\n"


def room_line(room: str, count: int) -> bytes:
    return f"ROOM {room} {count}\n".encode()


def rooms_end_line(count: int) -> bytes:
    return f"END ROOMS {count}\n".encode()


def format_time(ts: float) -> str:
    """Seconds since the epoch -> ``2026-11-26T00:23:19.123Z``."""
    whole, millis = divmod(int(round(ts * 1000)), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def history_line(room: str, seq: int, ts: float, username: str, text: str) -> bytes:
    return f"HISTORY {room} {seq} {format_time(ts)} {username} {text}\n".encode()


def history_end_line(room: str, count: int) -> bytes:
    return f"END HISTORY {room} {count}\n".encode()


def pong_line(token: str) -> bytes:
    return f"PONG {token}\n".encode() if token else b"PONG\n"


def ping_line(token: str) -> bytes:
    return f"PING {token}\n".encode()


# --- errors ------------------------------------------------------------------------------

ERR_LINE_TOO_LONG = PeerError(error_line("line too long"), fatal=True)
ERR_BAD_UTF8 = PeerError(error_line("invalid UTF-8"))
ERR_CONTROL = PeerError(error_line("control characters are not allowed"))
ERR_BAD_ROOM = PeerError(error_line(f"invalid room name: {NameKind.ROOM.rule}"))
ERR_BAD_USERNAME = PeerError(error_line(f"invalid username: {NameKind.USERNAME.rule}"))
ERR_TEXT_TOO_LONG = PeerError(error_line("message too long"))
USAGE = {
    "JOIN": PeerError(error_line("usage: JOIN <room> <username>")),
    "MSG": PeerError(error_line("usage: MSG <room> <text>")),
    "LEAVE": PeerError(error_line("usage: LEAVE <room>")),
    "PRIVMSG": PeerError(error_line("usage: PRIVMSG <room> <username> <text>")),
    "QUIT": PeerError(error_line("usage: QUIT")),
    "NAMES": PeerError(error_line("usage: NAMES <room>")),
    "ROOMS": PeerError(error_line("usage: ROOMS")),
    "HISTORY": PeerError(error_line("usage: HISTORY <room> [n]")),
    "PING": PeerError(error_line(f"usage: PING [token] (token up to {MAX_PING_TOKEN_CHARS})")),
    "PONG": PeerError(error_line("usage: PONG [token]")),
}
#: ``HISTORY <room> n`` with a whole number ``n`` outside 1..MAX_HISTORY_REPLY: the usage
#: line plus the range, so that ``HISTORY lobby 9999`` says what the maximum is.
ERR_HISTORY_RANGE = PeerError(error_line(f"usage: HISTORY <room> [n] (n is 1-{MAX_HISTORY_REPLY})"))


def not_in_room_error(room: str) -> bytes:
    return error_line(f"not in room {room}")


def name_taken_error(room: str) -> bytes:
    return error_line(f"name taken in {room}")


def already_in_room_error(room: str) -> bytes:
    return error_line(f"already in room {room}")


def wrong_username_error(username: str) -> bytes:
    return error_line(f"username is {username} on this connection")


def name_error(refusal: NameRefusal) -> PeerError:
    """The ``ERROR invalid username: ...`` / ``ERROR invalid room name: ...`` line for a
    refused name (the same text HTTP puts in its error message)."""
    return PeerError(error_line(refusal.message))


def unknown_verb_error(verb: str) -> PeerError:
    shown = verb if len(verb) <= 32 else verb[:32] + "..."
    return _unknown_verb(shown)


@functools.lru_cache(maxsize=256)
def _unknown_verb(shown: str) -> PeerError:
    # Shared: a line of garbage repeated a thousand times is one object, not a thousand.
    return PeerError(error_line(f"unknown command {shown}; commands: {' '.join(VERBS)}"))


# --- parsing -----------------------------------------------------------------------------

_WORD = re.compile("([^ \t]*)[ \t]?")


class CommandParser:
    """Turns a byte stream into protocol events (sans-IO).

    Feed it every chunk read from the peer with :meth:`receive_data`; feed ``b""`` at end
    of stream (an unterminated last line is then parsed as a line). After a fatal
    :class:`PeerError` (line too long) it ignores all further input; the caller closes.
    The parser never holds more than ``MAX_LINE_BYTES + 1`` bytes of an unfinished line.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._dead = False

    def receive_data(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        if not data:
            self._dead = True
            last, self._partial = self._partial, b""
            return self._parse_lines([last]) if last else []
        buffer = self._partial + data if self._partial else data
        lines = buffer.split(b"\n")
        self._partial = lines.pop()
        events = self._parse_lines(lines)
        if not self._dead and len(self._partial) > MAX_LINE_BYTES:
            # One byte of slack: the line may be exactly at the limit with its CR
            # received and its LF still on the way.
            if len(self._partial) > MAX_LINE_BYTES + 1 or not self._partial.endswith(b"\r"):
                events.append(self._die())
        return events

    def _die(self) -> PeerError:
        self._dead = True
        self._partial = b""
        return ERR_LINE_TOO_LONG

    def _parse_lines(self, lines: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for raw in lines:
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > MAX_LINE_BYTES:
                events.append(self._die())
                break
            if raw:
                event = parse_line(raw)
                if event is not None:
                    events.append(event)
        return events


def parse_line(raw: bytes) -> Optional[Event]:
    """Parse one line (without its line ending). Returns ``None`` for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ERR_BAD_UTF8
    if CONTROL.search(line):
        return ERR_CONTROL
    line = line.lstrip(" \t")
    if not line.strip(" \t"):
        return None
    verb, rest = _split_word(line)
    verb = verb.upper()
    parse = _PARSERS.get(verb)
    if parse is None:
        return unknown_verb_error(verb)
    return parse(rest)


def _split_word(text: str) -> Tuple[str, str]:
    """``"word rest"`` -> ``("word", "rest")``: split at the first space or TAB (one
    separator is consumed; the rest is kept as sent)."""
    if "\t" not in text:  # the usual case, without the regex
        word, _, rest = text.partition(" ")
        return word, rest
    match = _WORD.match(text)
    return match.group(1), text[match.end() :]


def _room_arg(text: str) -> Union[str, PeerError]:
    room = check_room(text)
    return room if isinstance(room, str) else name_error(room)


def _parse_join(rest: str) -> Event:
    args = rest.split()
    if len(args) != 2:
        return USAGE["JOIN"]
    room = _room_arg(args[0])
    if isinstance(room, PeerError):
        return room
    username = check_username(args[1])
    if isinstance(username, NameRefusal):
        return name_error(username)
    return Join(room, username)


def _parse_msg(rest: str) -> Event:
    word, text = _split_word(rest)
    if not word:
        return USAGE["MSG"]
    room = _room_arg(word)
    # The same text rule as HTTP's. Blank text is a usage error, and is reported before a
    # bad room name, as it always was.
    cleaned = clean_text(text, word if isinstance(room, PeerError) else room, True)
    if type(cleaned) is str and type(room) is str:
        return Msg(room, cleaned)  # the usual case first: enum members are slow to reach
    if cleaned is TextProblem.BLANK:
        return USAGE["MSG"]
    if isinstance(room, PeerError):
        return room
    if cleaned is TextProblem.TOO_LONG:
        return ERR_TEXT_TOO_LONG
    if cleaned is TextProblem.CONTROL:  # not reached: parse_line refused the whole line
        return ERR_CONTROL
    return Msg(room, cleaned)


def _parse_privmsg(rest: str) -> Event:
    room_word, rest = _split_word(rest)
    to_word, text = _split_word(rest)
    if not room_word or not to_word:
        return USAGE["PRIVMSG"]
    cleaned = clean_text(text, room_word, True)
    if cleaned is TextProblem.BLANK:
        return USAGE["PRIVMSG"]  # as MSG: blank text is a usage error, reported first
    room = _room_arg(room_word)
    if isinstance(room, PeerError):
        return room
    to = check_username(to_word)
    if isinstance(to, NameRefusal):
        return name_error(to)
    if cleaned is TextProblem.TOO_LONG:
        return ERR_TEXT_TOO_LONG
    if not isinstance(cleaned, str):  # CONTROL: parse_line refused the whole line already
        return ERR_CONTROL
    return Privmsg(room, to, cleaned)


def _one_room(verb: str, rest: str) -> Union[str, PeerError]:
    args = rest.split()
    if len(args) != 1:
        return USAGE[verb]
    return _room_arg(args[0])


def _parse_leave(rest: str) -> Event:
    room = _one_room("LEAVE", rest)
    return room if isinstance(room, PeerError) else Leave(room)


def _parse_names(rest: str) -> Event:
    room = _one_room("NAMES", rest)
    return room if isinstance(room, PeerError) else Names(room)


_WHOLE_NUMBER = re.compile("-?[0-9]+")


def _parse_history(rest: str) -> Event:
    args = rest.split()
    if not 1 <= len(args) <= 2:
        return USAGE["HISTORY"]
    n = MAX_HISTORY_REPLY
    if len(args) == 2:
        n = _history_count(args[1])
        if isinstance(n, PeerError):
            return n
    room = _room_arg(args[0])
    return room if isinstance(room, PeerError) else History(room, n)


def _history_count(text: str) -> Union[int, PeerError]:
    """``n`` of ``HISTORY <room> n``: ASCII digits within 1..MAX_HISTORY_REPLY.

    Any other whole number (``0``, ``501``, ``-3``, a thousand digits) gets the line that
    says the range; anything that is not a whole number (``abc``, ``1.5``, ``+5``, ``²``)
    the plain usage line.
    """
    if not _WHOLE_NUMBER.fullmatch(text):
        return USAGE["HISTORY"]
    digits = text.lstrip("-").lstrip("0")
    # Compared as text first: int() of thousands of digits is slow work for no answer.
    if text.startswith("-") or len(digits) > len(str(MAX_HISTORY_REPLY)):
        return ERR_HISTORY_RANGE
    n = int(digits or "0")
    return n if 1 <= n <= MAX_HISTORY_REPLY else ERR_HISTORY_RANGE


def _parse_token(verb: str, rest: str) -> Union[str, PeerError]:
    token = rest.strip(" \t")
    if len(token) > MAX_PING_TOKEN_CHARS:
        return USAGE[verb]
    return token


def _parse_ping(rest: str) -> Event:
    token = _parse_token("PING", rest)
    return token if isinstance(token, PeerError) else Ping(token)


def _parse_pong(rest: str) -> Event:
    token = _parse_token("PONG", rest)
    return token if isinstance(token, PeerError) else Pong(token)


def _no_args(verb: str, command: Command):
    def parse(rest: str) -> Event:
        return USAGE[verb] if rest.strip(" \t") else command

    return parse


_PARSERS = {
    "JOIN": _parse_join,
    "MSG": _parse_msg,
    "LEAVE": _parse_leave,
    "QUIT": _no_args("QUIT", Quit()),
    "PRIVMSG": _parse_privmsg,
    "NAMES": _parse_names,
    "ROOMS": _no_args("ROOMS", Rooms()),
    "HISTORY": _parse_history,
    "PING": _parse_ping,
    "PONG": _parse_pong,
}
