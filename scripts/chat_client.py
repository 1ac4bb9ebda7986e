#!/usr/bin/env python3
"""Terminal client for shardchat's line protocol (docs/PROTOCOL.md, user guide docs/CLIENT.md).

Usage::

    python scripts/chat_client.py [--host HOST] [--port PORT] [--user NAME] [--room ROOM]
                                  [--no-reconnect]
    printf 'hello\\n/quit\\n' | python scripts/chat_client.py --user bob --room lobby

Standard library only; runs as a plain file or as the ``shardchat-client`` console script
(``main``). The pure parts, which the unit tests use without sockets, are
``format_server_line`` (server line -> display text), ``user_line_to_command`` (typed line ->
protocol lines, local notices and the next ``ClientState``), ``apply_server_line`` (server
line -> next ``ClientState``), ``reply_to_server_line`` (``PING`` -> ``PONG``),
``greeting_problem`` (is the first line shardchat's welcome?), ``reconnect_delay`` (the
back-off) and ``RoomTracker`` / ``catch_up_report`` (the last event seen per room, and what
to show of a room's history after coming back).

Threads: the main thread reads the user's input (``input()`` blocks, and only the main
thread gets ``KeyboardInterrupt`` and readline's terminal clean-up); one reader thread owns
reading from the socket and printing, and, when the server goes away from a terminal user,
reconnecting. That works on Windows too, where stdin cannot be ``select``-ed.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import logging
import os
import random
import select
import signal
import socket
import ssl
import sys
import textwrap
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone, tzinfo
from typing import TextIO

log = logging.getLogger(__name__)

PROG = "chat_client"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_ROOM = "lobby"

#: How long /quit or the end of input waits for ``INFO bye`` or the close: long enough for
#: the echoes of lines already sent to arrive, short enough that a mute server cannot hang us.
QUIT_TIMEOUT_SECONDS = 2.0
#: How long to wait for the replies to commands already sent: before the first prompt (so
#: the greeting is not printed over the prompt being drawn), before QUIT (replies for other
#: rooms may come after it), and with piped input before each next line (one command at a
#: time keeps the output in order and stays within the server's rate limit, 10/s, instead
#: of being delayed past the end-of-input wait or cut off for "excess flood").
REPLY_TIMEOUT_SECONDS = 2.0
#: Bound on connecting, so that an unreachable host fails in seconds rather than minutes.
CONNECT_TIMEOUT_SECONDS = 10.0
#: How long the first line may take after connecting. shardchat greets at once; a server
#: that says nothing (an HTTP server waits for a request, and only answers ``408`` after
#: 10 s) is not shardchat, and the user should hear so before any prompt.
WELCOME_TIMEOUT_SECONDS = 3.0
#: The first line of every shardchat connection starts with this (PROTOCOL.md).
WELCOME_PREFIX = "INFO welcome to shardchat"
#: What is shown for the server's welcome instead of its list of protocol commands, which
#: the user of this client never types.
WELCOME_SHOWN = "* welcome to shardchat; type to talk in the current room, /help for the commands"
#: Reconnecting: the first wait, doubled after each failed attempt up to the cap, each
#: wait a random 50-100% of that (so that clients that lost a restarting server together
#: do not all come back in the same instant). The cap keeps a user who waits for a
#: server's return within ~10 s of it.
RECONNECT_FIRST_DELAY_SECONDS = 0.5
RECONNECT_MAX_DELAY_SECONDS = 10.0
#: The server keeps this many events per room and sends at most this many for one HISTORY
#: (PROTOCOL.md, LIMITS.md ``MAX_HISTORY_REPLY``); /history is checked against it here so
#: that the user reads the client's words, not the server's usage line.
MAX_HISTORY_EVENTS = 500
#: Catching up after a reconnect: how far the server's clock may be ahead of the moment
#: this client noticed the loss (network delay, the server noticing later) before an event
#: in the new history cannot be one the client saw before it lost the connection.
CATCH_UP_CLOCK_SLACK_SECONDS = 2.0
#: Longest server line read in one piece. A MSG line is at most ~8.3 KB (2000 characters of
#: up to 4 UTF-8 bytes, plus names); a longer line is shown in pieces rather than buffered.
MAX_SERVER_LINE_BYTES = 16384
#: Name rules mirror PROTOCOL.md "Names". The server stays authoritative; checking here only
#: catches typos before a round trip and keeps the client's list of joined rooms honest.
MAX_USERNAME_CHARS = 32
MAX_ROOM_CHARS = 64
NAME_PUNCTUATION = "_-."
USERNAME_RULE = "invalid username: 1-32 letters, digits, _ - ."
ROOM_RULE = "invalid room name: 1-64 letters, digits, _ - ."

#: Terminal sequence: carriage return, then erase to the end of the line.
CLEAR_LINE = "\r\x1b[K"
#: Signal the reader thread sends the main thread to interrupt a blocking input() when the
#: server goes away (POSIX only; see ``ChatSession._wake_main``).
WAKE_SIGNAL = getattr(signal, "SIGUSR1", None)
#: Interval between repeated wake-up signals: one that lands while readline is busy rather
#: than blocked is used up without interrupting anything, so the reader thread repeats it.
WAKE_RETRY_SECONDS = 0.05
#: Exit statuses: 2 for bad usage (as argparse), 130 for Ctrl-C (as shells report SIGINT).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

HELP_LINES = (
    "* commands:",
    "*   /join <room>     join a room and talk there",
    "*   /leave [room]    leave a room (default: the current one)",
    "*   /switch <room>   talk in another room you have joined",
    "*   /rooms           list the rooms that have members",
    "*   /names [room]    list a room's members (default: the current room)",
    "*   /history [n]     show the last n events of the current room (n up to 500)",
    "*   /dm <name> <msg> send a private message to a member of the current room",
    "*   /quit            leave every room and exit",
    "*   /help            show this help",
    "*   //text           send a message that starts with /",
)


# --------------------------------------------------------------------------- pure parts


def normalize_name(name: str) -> str:
    """Return ``name`` in NFKC form, as the server stores it (``zoe`` + U+0308 -> ``zoë``,
    fullwidth ``ｌｏｂｂｙ`` -> ``lobby``)."""
    return unicodedata.normalize("NFKC", name)


def is_valid_name(name: str, max_chars: int) -> bool:
    """Return True if ``name`` is 1..max_chars letters, digits, combining marks, ``_``,
    ``-`` or ``.``.

    More lenient than the server (any ``str.isalnum`` character or mark; no script, mark or
    look-alike checks), never stricter: the server's error line says what is wrong.
    """
    return 0 < len(name) <= max_chars and all(
        ch.isalnum() or ch in NAME_PUNCTUATION or unicodedata.category(ch) in ("Mn", "Mc")
        for ch in name
    )


@dataclass(frozen=True)
class ClientState:
    """What the client believes about its session.

    ``joined`` is in join order; ``current`` is the room plain lines go to (None when the
    client is in no room). Updated optimistically from the user's commands and corrected
    from the server's replies (``apply_server_line``).
    """

    username: str
    current: str | None = None
    joined: tuple[str, ...] = ()

    def entering(self, room: str) -> ClientState:
        """Return the state after joining (or switching to) ``room``: it becomes current."""
        return replace(self, current=room, joined=self._plus(room))

    def confirming(self, room: str) -> ClientState:
        """Return the state once the server confirms ``room``; current only if none was."""
        return replace(self, current=self.current or room, joined=self._plus(room))

    def leaving(self, room: str) -> ClientState:
        """Return the state without ``room``; if it was current, the last joined one is."""
        joined = tuple(name for name in self.joined if name != room)
        current = self.current
        if current == room:
            current = joined[-1] if joined else None
        return replace(self, current=current, joined=joined)

    def _plus(self, room: str) -> tuple[str, ...]:
        return self.joined if room in self.joined else self.joined + (room,)


@dataclass(frozen=True)
class UserAction:
    """What to do about one typed line.

    ``send``: protocol lines (without line ending) for the server, in order.
    ``notices``: lines to show locally. ``state``: the client state afterwards.
    ``quit``: the user asked to leave (the QUIT line is in ``send``).
    """

    state: ClientState
    send: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    quit: bool = False


def user_line_to_command(line: str, state: ClientState) -> UserAction:
    """Turn one line typed by the user into protocol lines, notices and the next state.

    Plain lines become ``MSG <current room> <line>`` (kept as typed); ``//text`` sends
    ``/text``; ``/command ...`` is one of HELP_LINES; anything else starting with ``/`` gets
    a local hint. Blank lines do nothing. Never raises for any input.
    """
    line = line.rstrip("\r\n")
    if not line.strip():
        return UserAction(state)
    if line.startswith("//"):
        return _message(line[1:], state)
    if not line.startswith("/"):
        return _message(line, state)
    name, _, rest = line[1:].partition(" ")
    with_text = _TEXT_COMMANDS.get(name.lower())
    if with_text is not None:
        return with_text(rest, state)
    command = _SLASH_COMMANDS.get(name.lower())
    if command is None:
        return _notice(state, f"! unknown command /{name}; type /help for the commands")
    return command([normalize_name(arg) for arg in rest.split()], state)


def _notice(state: ClientState, *lines: str) -> UserAction:
    return UserAction(state, notices=lines)


def _usage(state: ClientState, usage: str) -> UserAction:
    return _notice(state, f"! usage: {usage}")


def _not_in_a_room(state: ClientState) -> UserAction:
    return _notice(state, "! you are not in a room; /join <room> first")


def _message(text: str, state: ClientState) -> UserAction:
    if state.current is None:
        return _not_in_a_room(state)
    return UserAction(state, send=(f"MSG {state.current} {text}",))


def _direct_message(rest: str, state: ClientState) -> UserAction:
    name, _, text = rest.lstrip(" ").partition(" ")
    if not name or not text.strip():
        return _usage(state, "/dm <name> <msg>")
    if state.current is None:
        return _not_in_a_room(state)
    name = normalize_name(name)
    if not is_valid_name(name, MAX_USERNAME_CHARS):
        return _notice(state, f"! {USERNAME_RULE}")
    return UserAction(state, send=(f"PRIVMSG {state.current} {name} {text}",))


def _join(args: list[str], state: ClientState) -> UserAction:
    if len(args) != 1:
        return _usage(state, "/join <room>")
    room = args[0]
    if not is_valid_name(room, MAX_ROOM_CHARS):
        return _notice(state, f"! {ROOM_RULE}")
    if room in state.joined:
        return _notice(state.entering(room), f"* talking in {room}")
    return UserAction(state.entering(room), send=(f"JOIN {room} {state.username}",))


def _leave(args: list[str], state: ClientState) -> UserAction:
    if len(args) > 1:
        return _usage(state, "/leave [room]")
    room = args[0] if args else state.current
    if room is None:
        return _not_in_a_room(state)
    return UserAction(state.leaving(room), send=(f"LEAVE {room}",))


def _switch(args: list[str], state: ClientState) -> UserAction:
    if len(args) != 1:
        return _usage(state, "/switch <room>")
    room = args[0]
    if room not in state.joined:
        return _notice(state, f"! you are not in {room}; /join {room} first")
    return _notice(state.entering(room), f"* talking in {room}")


def _quit(args: list[str], state: ClientState) -> UserAction:
    if args:
        return _usage(state, "/quit")
    return UserAction(state, send=("QUIT",), quit=True)


def _rooms(args: list[str], state: ClientState) -> UserAction:
    if args:
        return _usage(state, "/rooms")
    return UserAction(state, send=("ROOMS",))


def _names(args: list[str], state: ClientState) -> UserAction:
    if len(args) > 1:
        return _usage(state, "/names [room]")
    room = args[0] if args else state.current
    if room is None:
        return _not_in_a_room(state)
    return UserAction(state, send=(f"NAMES {room}",))


def _history(args: list[str], state: ClientState) -> UserAction:
    if len(args) > 1 or (args and not _is_count(args[0])):
        return _usage(state, f"/history [n]   (n: a whole number from 1 to {MAX_HISTORY_EVENTS})")
    if args and _count_too_big(args[0]):
        return _notice(
            state,
            f"! /history shows at most {MAX_HISTORY_EVENTS} events (the server keeps the "
            f"last {MAX_HISTORY_EVENTS} of each room); try /history {MAX_HISTORY_EVENTS}",
        )
    if state.current is None:
        return _not_in_a_room(state)
    return UserAction(state, send=(" ".join(["HISTORY", state.current, *args]),))


def _is_count(text: str) -> bool:
    """True for ASCII digits that are not all zeros (``0`` is no count; ``007`` is 7)."""
    return text.isascii() and text.isdigit() and text.strip("0") != ""


def _count_too_big(text: str) -> bool:
    # By length first: int() refuses more than 4300 digits on Python 3.11+.
    digits = text.lstrip("0")
    return len(digits) > len(str(MAX_HISTORY_EVENTS)) or int(digits) > MAX_HISTORY_EVENTS


def _help(args: list[str], state: ClientState) -> UserAction:
    return _notice(state, *HELP_LINES)


_SLASH_COMMANDS: dict[str, Callable[[list[str], ClientState], UserAction]] = {
    "join": _join,
    "leave": _leave,
    "switch": _switch,
    "quit": _quit,
    "rooms": _rooms,
    "names": _names,
    "history": _history,
    "help": _help,
}

#: Commands whose last argument is text, handed the rest of the line as typed (its spaces
#: kept, like a message's) instead of split into names.
_TEXT_COMMANDS: dict[str, Callable[[str, ClientState], UserAction]] = {
    "dm": _direct_message,
}


def apply_server_line(state: ClientState, line: str) -> ClientState:
    """Return the client state after the server sent ``line``.

    Confirmations and refusals about the connection's own rooms correct the optimistic
    state: ``INFO joined room R`` / ``ERROR already in room R`` add R; ``INFO left room R``,
    ``ERROR not in room R`` and ``ERROR name taken in R`` remove it. Other lines (including
    other users' ``INFO alice joined R``) leave the state as it is.
    """
    words = line.rstrip("\r\n").split(" ")
    verb, rest = words[0].upper(), words[1:]
    if verb == "INFO" and len(rest) == 3 and rest[1] == "room":
        if rest[0] == "joined":
            return state.confirming(rest[2])
        if rest[0] == "left":
            return state.leaving(rest[2])
    if verb == "ERROR" and len(rest) == 4:
        if rest[:3] == ["already", "in", "room"]:
            return state.confirming(rest[3])
        if rest[:3] in (["not", "in", "room"], ["name", "taken", "in"]):
            return state.leaving(rest[3])
    return state


def expects_reply(command: str) -> bool:
    """Return True if the protocol line ``command`` gets a reply ``reply_matches`` knows."""
    verb = command.split(" ", 1)[0].upper()
    return verb in ("JOIN", "MSG", "PRIVMSG", "LEAVE", "NAMES", "ROOMS", "HISTORY")


def reply_matches(command: str, line: str, username: str) -> bool:
    """Return True if server ``line`` completes the reply to ``command``, sent as ``username``.

    JOIN -> ``INFO joined room R``; MSG -> its echo ``MSG R username ...``; PRIVMSG -> its
    echo ``PRIVMSG R username <to> ...``; LEAVE -> ``INFO
    left room R``; NAMES -> ``NAMES R ...``; ROOMS -> ``END ROOMS k``; HISTORY -> ``END
    HISTORY R k``. ERROR lines are not matched here: they answer the oldest command waiting.
    """
    verb, _, rest = command.partition(" ")
    room = rest.split(" ", 1)[0]
    verb = verb.upper()
    if verb == "JOIN":
        return line == f"INFO joined room {room}"
    if verb == "LEAVE":
        return line == f"INFO left room {room}"
    if verb == "MSG":
        return line.startswith(f"MSG {room} {username} ")
    if verb == "PRIVMSG":
        return line.startswith(f"PRIVMSG {room} {username} ")
    if verb == "NAMES":
        return line == f"NAMES {room}" or line.startswith(f"NAMES {room} ")
    if verb == "HISTORY":
        return line.startswith(f"END HISTORY {room} ")
    return verb == "ROOMS" and line.startswith("END ROOMS ")


def reply_to_server_line(line: str) -> str | None:
    """Return the line to answer ``line`` with automatically (``PONG`` for ``PING``), or None."""
    verb, _, token = line.rstrip("\r\n").partition(" ")
    if verb.upper() != "PING":
        return None
    return f"PONG {token}" if token else "PONG"


def format_server_line(line: str, tz: tzinfo | None = None) -> str | None:
    """Return how to show one server line to the user, or None to show nothing.

    ``MSG room user text`` -> ``[room] user: text``; ``PRIVMSG room from to text`` ->
    ``[room] (private) from -> to: text``; ``INFO`` -> ``* ...`` (the server's
    welcome, which lists protocol commands, -> ``WELCOME_SHOWN``); ``ERROR`` -> ``! ...``;
    ``NAMES``, ``ROOM``, ``END ROOMS`` -> ``* ...``; ``HISTORY`` and ``END HISTORY`` ->
    ``~ [room] HH:MM ...`` with the time converted to ``tz`` (None: the local
    time zone). ``PING`` and blank lines -> None. Unknown or malformed lines are shown as
    they came. Control characters are shown escaped (``\\x1b``) so that no server line can
    drive the terminal. Never raises.
    """
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    verb, _, rest = line.partition(" ")
    verb = verb.upper()
    if verb == "PING":
        return None
    if verb == "HISTORY":
        shown = _format_history(rest, tz)
    else:
        formatter = _FORMATTERS.get(verb)
        shown = formatter(rest) if formatter else None
    return _printable(line if shown is None else shown)


def _format_msg(rest: str) -> str | None:
    parts = rest.split(" ", 2)
    if len(parts) < 3:
        return None
    room, user, text = parts
    return f"[{room}] {user}: {text}"


def _format_privmsg(rest: str) -> str | None:
    parts = rest.split(" ", 3)
    if len(parts) < 4:
        return None
    room, sender, to, text = parts
    return f"[{room}] (private) {sender} -> {to}: {text}"


def _format_names(rest: str) -> str | None:
    room, _, members = rest.partition(" ")
    if not room:
        return None
    names = members.split()
    if not names:
        return f"* nobody in {room}"
    return f"* in {room} ({len(names)}): {', '.join(names)}"


def _format_room(rest: str) -> str | None:
    parts = rest.split(" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    room, count = parts
    return f"* room {room}: {_plural(int(count), 'member')}"


def _format_end(rest: str) -> str | None:
    parts = rest.split(" ")
    if len(parts) == 2 and parts[0] == "ROOMS" and parts[1].isdigit():
        count = int(parts[1])
        return f"* {_plural(count, 'room')}" if count else "* no rooms"
    if len(parts) == 3 and parts[0] == "HISTORY" and parts[2].isdigit():
        return f"~ [{parts[1]}] end of history, {_plural(int(parts[2]), 'event')}"
    return None


def _format_history(rest: str, tz: tzinfo | None) -> str | None:
    parts = rest.split(" ", 4)
    if len(parts) < 4:
        return None
    room, _seq, stamp, user = parts[:4]
    text = parts[4] if len(parts) == 5 else ""
    said = f"* {text}" if user == "*" else f"{user}: {text}"
    return f"~ [{room}] {_clock(stamp, tz)} {said}"


def _format_pong(rest: str) -> str:
    return f"* pong {rest}" if rest else "* pong"


def _format_info(rest: str) -> str:
    return WELCOME_SHOWN if f"INFO {rest}".startswith(WELCOME_PREFIX) else f"* {rest}"


_FORMATTERS: dict[str, Callable[[str], str | None]] = {
    "MSG": _format_msg,
    "PRIVMSG": _format_privmsg,
    "INFO": _format_info,
    "ERROR": lambda rest: f"! {rest}",
    "NAMES": _format_names,
    "ROOM": _format_room,
    "END": _format_end,
    "PONG": _format_pong,
}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _clock(stamp: str, tz: tzinfo | None) -> str:
    """Return ``HH:MM`` in ``tz`` for a PROTOCOL.md UTC timestamp, or ``stamp`` if unparseable."""
    moment = _moment(stamp)
    if moment is None:
        return stamp
    try:
        return moment.astimezone(tz).strftime("%H:%M")
    except (OverflowError, OSError):  # a date the platform cannot convert (Windows, pre-1970)
        return stamp


def _printable(text: str) -> str:
    """Escape control characters other than TAB, e.g. ESC -> ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(
        f"\\x{ord(ch):02x}" if ch != "\t" and unicodedata.category(ch) == "Cc" else ch
        for ch in text
    )


def greeting_problem(line: str | None, *, closed: bool = False) -> str | None:
    """Return what is wrong with a server whose first line is ``line``, or None if it is
    shardchat's welcome.

    ``line`` None: nothing came within ``WELCOME_TIMEOUT_SECONDS`` (or, with ``closed``,
    the server closed the connection first). An ``ERROR`` line is shardchat refusing the
    connection (``server full``). Anything else is another kind of server, e.g. an HTTP
    server answering ``HTTP/1.1 400 Bad Request``.
    """
    if line is not None and line.startswith(WELCOME_PREFIX):
        return None
    if line is not None and line.startswith("ERROR "):
        return f"the server refused the connection: {_printable(line[6:])}"
    if line is None:
        said = (
            "it closed the connection without a word"
            if closed
            else f"it said nothing within {WELCOME_TIMEOUT_SECONDS:g} s"
        )
    else:
        shown = _printable(line if len(line) <= 60 else line[:60] + "...")
        said = f"it answered '{shown}'"
    return (
        f"this is not a shardchat server ({said}): is the port right? "
        f"the line protocol is on {DEFAULT_PORT} by default"
    )


def reconnect_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Return the seconds to wait before reconnect attempt ``attempt`` (0 for the first).

    ``RECONNECT_FIRST_DELAY_SECONDS`` doubling per attempt, capped at
    ``RECONNECT_MAX_DELAY_SECONDS``, times a random 0.5-1.0 from ``rand`` (0 <= rand() < 1).
    """
    doubled = RECONNECT_FIRST_DELAY_SECONDS * 2 ** min(max(attempt, 0), 32)
    return min(RECONNECT_MAX_DELAY_SECONDS, doubled) * (0.5 + 0.5 * rand())


@dataclass(frozen=True)
class RoomEvent:
    """One event of a room as its history keeps it: ``user`` is ``*`` for joins and leaves,
    whose ``text`` is ``alice joined lobby``. ``seq`` and ``stamp`` (the server's UTC time,
    PROTOCOL.md) are None when it came as a live line, which carries neither."""

    user: str
    text: str
    seq: int | None = None
    stamp: str | None = None


def parse_history_line(line: str) -> tuple[str, RoomEvent] | None:
    """``HISTORY <room> <seq> <time> <username> <text>`` -> (room, event), or None."""
    parts = line.rstrip("\r\n").split(" ", 5)
    if len(parts) < 5 or parts[0] != "HISTORY" or not parts[2].isdigit():
        return None
    text = parts[5] if len(parts) == 6 else ""
    return parts[1], RoomEvent(parts[4], text, int(parts[2]), parts[3])


def live_event(line: str, username: str) -> tuple[str, RoomEvent] | None:
    """Return (room, event) if the live server ``line`` is one of a room's history entries.

    The server numbers every message, join and leave of a room (one ``seq`` each) and
    sends each to every member: ``MSG R user text``, ``INFO joined room R`` (our own join),
    ``INFO alice joined R``, ``INFO left room R``, ``INFO alice left R``. Other lines
    (replies, errors, ``INFO room R restarted, history lost``) are not entries: None.
    """
    verb, _, rest = line.rstrip("\r\n").partition(" ")
    if verb == "MSG":
        parts = rest.split(" ", 2)
        if len(parts) == 3:
            return parts[0], RoomEvent(parts[1], parts[2])
        return None
    words = rest.split(" ")
    if verb != "INFO" or len(words) != 3:
        return None
    who, what, room = words
    if who in ("joined", "left") and what == "room":  # our own: INFO joined room R
        who, what = username, who
    if what not in ("joined", "left"):
        return None
    return room, RoomEvent("*", f"{who} {what} {room}")


class HistoryKind(enum.Enum):
    """Why a HISTORY command was sent, which decides what its reply does."""

    SHOWN = "shown"  # the user's /history: shown as it comes
    PROBE = "probe"  # HISTORY R 1 after a join: not shown, tells the room's last seq
    CATCH_UP = "catch-up"  # HISTORY R after rejoining: shown as catch_up_report says


@dataclass
class RoomTrack:
    """What the client knows of one room's numbering (owned by ``RoomTracker``)."""

    seen: RoomEvent | None = None  # the last event seen, with its seq (None: not known)
    pending: deque[HistoryKind] = field(default_factory=deque)  # HISTORYs sent, oldest first
    reply: list[RoomEvent] = field(default_factory=list)  # the reply coming in
    away_seconds: float | None = None  # set while rejoining after a reconnect
    before: RoomEvent | None = None  # the last event seen before the connection was lost


@dataclass(frozen=True)
class TrackOutcome:
    """What the session does about one server line: ``hide`` it, ``show`` these lines
    (after it, or instead of it), ``send`` these HISTORY commands (with their kinds)."""

    hide: bool = False
    show: tuple[str, ...] = ()
    send: tuple[tuple[str, HistoryKind], ...] = ()


class RoomTracker:
    """The last event seen per room, to show what was missed after a reconnect.

    The seq of the last event is learnt from HISTORY lines (a silent ``HISTORY R 1`` after
    each join, the catch-up after a rejoin, the user's /history) and then counted up by one
    for every live event of the room, which the server numbers consecutively. Replies to
    one room's commands come after the events the shard had sent before answering them
    (PROTOCOL.md: one room's replies stay in order), which is what makes the count exact.

    Not thread-safe: the session calls it under its state lock. Pure: no I/O.
    """

    def __init__(self, username: str, tz: tzinfo | None = None) -> None:
        self.username = username
        self._tz = tz
        self._rooms: dict[str, RoomTrack] = {}

    def last_seen(self, room: str) -> RoomEvent | None:
        """The last event of ``room`` seen, with its seq, or None if not known."""
        track = self._rooms.get(room)
        return track.seen if track else None

    def sent(self, room: str, kind: HistoryKind) -> None:
        """Note that ``HISTORY room ...`` was sent for ``kind`` (in the order sent)."""
        self._rooms.setdefault(room, RoomTrack()).pending.append(kind)

    def answered_by_error(self, room: str) -> None:
        """The oldest HISTORY sent for ``room`` got an ERROR instead of its reply."""
        track = self._rooms.get(room)
        if track and track.pending:
            track.pending.popleft()
            track.reply = []

    def connection_lost(self, away_since: Sequence[str]) -> None:
        """The connection is gone: no reply will come. Remember, for each room in
        ``away_since``, the last event seen, for the catch-up after rejoining."""
        self._rooms = {
            room: RoomTrack(before=self._rooms[room].seen if room in self._rooms else None)
            for room in away_since
        }

    def rejoining(self, room: str, away_seconds: float) -> None:
        """A JOIN of ``room`` is being sent again, ``away_seconds`` after the loss."""
        self._rooms.setdefault(room, RoomTrack()).away_seconds = away_seconds

    def on_line(self, line: str) -> TrackOutcome:
        """Update from one server line; return what to do about it."""
        if line.startswith("HISTORY "):
            return self._on_history_line(line)
        if line.startswith("END HISTORY "):
            return self._on_history_end(line)
        restarted = _restarted_room(line)
        if restarted is not None:
            self._rooms[restarted] = RoomTrack()
            return TrackOutcome(send=((f"HISTORY {restarted} 1", HistoryKind.PROBE),))
        event = live_event(line, self.username)
        if event is None:
            return TrackOutcome()
        room, happened = event
        if happened.user == "*" and happened.text == f"{self.username} left {room}":
            self._rooms.pop(room, None)
            return TrackOutcome()
        if happened.user == "*" and happened.text == f"{self.username} joined {room}":
            return self._on_own_join(room)
        track = self._rooms.get(room)
        if track and track.seen is not None and track.seen.seq is not None:
            track.seen = replace(happened, seq=track.seen.seq + 1)
        return TrackOutcome()

    def forget(self, room: str) -> None:
        """The client is not in ``room`` (a refused JOIN, ``ERROR not in room``)."""
        self._rooms.pop(room, None)

    def _on_own_join(self, room: str) -> TrackOutcome:
        track = self._rooms.setdefault(room, RoomTrack())
        track.seen = None  # our join has a seq the reply below tells
        kind = HistoryKind.CATCH_UP if track.away_seconds is not None else HistoryKind.PROBE
        command = f"HISTORY {room}" if kind is HistoryKind.CATCH_UP else f"HISTORY {room} 1"
        return TrackOutcome(send=((command, kind),))

    def _on_history_line(self, line: str) -> TrackOutcome:
        parsed = parse_history_line(line)
        track = self._rooms.get(parsed[0]) if parsed else None
        if parsed is None or track is None or not track.pending:
            return TrackOutcome()
        track.reply.append(parsed[1])
        return TrackOutcome(hide=track.pending[0] is not HistoryKind.SHOWN)

    def _on_history_end(self, line: str) -> TrackOutcome:
        words = line.split(" ")
        track = self._rooms.get(words[2]) if len(words) == 4 else None
        if track is None or not track.pending:
            return TrackOutcome()
        room, kind, reply = words[2], track.pending.popleft(), track.reply
        track.reply = []
        if reply:
            track.seen = reply[-1]
        if kind is HistoryKind.SHOWN:
            return TrackOutcome()
        if kind is HistoryKind.PROBE:
            return TrackOutcome(hide=True)
        away, before = track.away_seconds or 0.0, track.before
        track.away_seconds = track.before = None
        report = catch_up_report(room, self.username, before, reply, away, self._tz)
        return TrackOutcome(hide=True, show=tuple(report))


def _restarted_room(line: str) -> str | None:
    """The room of ``INFO room <room> restarted, history lost``, else None."""
    words = line.split(" ")
    if len(words) == 6 and words[:2] == ["INFO", "room"] and words[3:] == _RESTARTED:
        return words[2]
    return None


_RESTARTED = ["restarted,", "history", "lost"]


def catch_up_report(
    room: str,
    username: str,
    before: RoomEvent | None,
    reply: Sequence[RoomEvent],
    away_seconds: float,
    tz: tzinfo | None = None,
) -> list[str]:
    """Return the lines that show what ``room`` said while the client was away.

    ``reply`` is the room's history (``HISTORY <room>``, oldest first) fetched after the
    client joined again as ``username``, ``away_seconds`` after it noticed the loss;
    ``before`` the last event it had seen (with its seq), or None if it did not know it.
    Shown: the events after ``before`` and before the rejoin. Said so, when the events after
    ``before`` are not all there any more (more than the server keeps), or when the room's
    numbering started over (the server or the room's shard restarted: the event numbered
    ``before.seq`` is missing, is another one, or happened after the loss).
    """
    rejoined = _last_index(reply, RoomEvent("*", f"{username} joined {room}"))
    earlier = list(reply[:rejoined])
    if before is None or before.seq is None:
        return _missed_lines(room, earlier, "the room's recent events", tz)
    seen = before.seq
    numbers = [event.seq or 0 for event in reply]
    same = [event for event in earlier if event.seq == seen]
    if same:
        continued = _is_the_one_seen(same[0], before, reply[rejoined:], away_seconds)
    else:  # consecutive numbers: the one seen has just dropped out, or the gap is too big
        continued = bool(numbers) and min(numbers) > seen and max(numbers) > seen
    if not continued:
        lost = (
            f"! [{room}] the room's history started over while you were away (the server "
            "restarted): what was said meanwhile is lost"
        )
        return [lost, *_missed_lines(room, earlier, "since it started over", tz)]
    missed = [event for event in earlier if (event.seq or 0) > seen]
    if not missed:
        return [f"~ [{room}] nothing was missed while you were away"]
    lines = _missed_lines(room, missed, "missed while you were away", tz)
    lost = min(numbers) - seen - 1
    if lost > 0:
        lines.insert(
            0,
            f"! [{room}] {_plural(lost, 'event')} from while you were away are lost: the "
            f"server keeps only the last {MAX_HISTORY_EVENTS} of a room",
        )
    return lines


def _last_index(events: Sequence[RoomEvent], wanted: RoomEvent) -> int:
    """Index of the last event saying what ``wanted`` says; ``len(events)`` if none does."""
    for index in range(len(events) - 1, -1, -1):
        if (events[index].user, events[index].text) == (wanted.user, wanted.text):
            return index
    return len(events)


def _is_the_one_seen(
    candidate: RoomEvent, before: RoomEvent, rejoin: Sequence[RoomEvent], away_seconds: float
) -> bool:
    """True if ``candidate`` (same seq as ``before``) can be the event the client saw."""
    if (candidate.user, candidate.text) != (before.user, before.text):
        return False
    if before.stamp is not None:
        return candidate.stamp == before.stamp
    # A live event carries no time. The one seen came before the loss, which on the
    # server's clock was about away_seconds before the rejoin.
    happened, rejoined = _moment(candidate.stamp), _moment(rejoin[0].stamp if rejoin else None)
    if happened is None or rejoined is None:
        return True
    gap = (rejoined - happened).total_seconds()
    return gap >= away_seconds - CATCH_UP_CLOCK_SLACK_SECONDS


def _missed_lines(
    room: str, events: Sequence[RoomEvent], what: str, tz: tzinfo | None
) -> list[str]:
    if not events:
        return []
    lines = [f"~ [{room}] {what}: {_plural(len(events), 'event')}"]
    for event in events:
        said = f"* {event.text}" if event.user == "*" else f"{event.user}: {event.text}"
        lines.append(_printable(f"~ [{room}] {_clock(event.stamp or '', tz)} {said}"))
    return lines


def _moment(stamp: str | None) -> datetime | None:
    """A PROTOCOL.md UTC timestamp as an aware datetime, or None."""
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(stamp or "", layout).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    return None


# --------------------------------------------------------------------------- I/O shell


class ServerClosed(Exception):
    """The server closed the connection (or it broke) while the user was still chatting."""


class ConnectFailed(Exception):
    """Connecting to the server failed; ``str(error)`` says why, in the user's words."""


class LineConnection:
    """The TCP connection to the server, as lines of text.

    Owns the socket: ``shutdown`` ends the conversation (waking the reader), ``close``
    releases it. ``send_line`` may be called from any thread; ``lines`` must be iterated by
    one thread only.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._send_lock = threading.Lock()

    def send_line(self, line: str) -> None:
        """Send ``line`` plus LF, UTF-8 encoded. Raises OSError if the connection is gone."""
        data = (line + "\n").encode("utf-8", errors="replace")
        with self._send_lock:
            self._sock.sendall(data)

    def lines(self) -> Iterator[str]:
        """Yield the server's lines without line endings until it closes.

        Bytes that are not UTF-8 are shown as U+FFFD. Raises OSError if the connection breaks.
        """
        while True:
            raw = self._reader.readline(MAX_SERVER_LINE_BYTES)
            if not raw:
                return
            yield raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")

    def first_line(self, timeout: float) -> str | None:
        """Return the server's first line, or None if none came within ``timeout`` seconds.

        Raises EOFError if the server closed the connection first, OSError if it broke.
        After None the connection is of no further use: close it.
        """
        self._sock.settimeout(timeout)
        try:
            raw = self._reader.readline(MAX_SERVER_LINE_BYTES)
        except socket.timeout:  # TimeoutError on 3.10+, of which socket.timeout is an alias
            return None
        if not raw:
            raise EOFError
        self._sock.settimeout(None)
        return raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")

    def shutdown(self) -> None:
        """Stop both directions, which wakes a thread blocked in ``lines``."""
        # Already disconnected (ENOTCONN) is fine: shutting down is all we want.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Release the socket; call after the reading thread has stopped."""
        self._reader.close()
        self._sock.close()


#: Seconds a TLS send may wait for the server to take a line before it counts as lost.
SEND_TIMEOUT_SECONDS = 30.0


class TlsLineConnection(LineConnection):
    """The connection over TLS. An SSL connection must not be read and written by two
    threads at once (OpenSSL's rule), so every read and write holds one lock; the reader
    waits for data *outside* it (``select`` on the socket), then reads what is there without
    blocking."""

    def __init__(self, sock: ssl.SSLSocket) -> None:  # noqa: D107 - LineConnection's
        self._sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()
        self._closed = False

    def send_line(self, line: str) -> None:
        """Write without blocking under the lock, waiting for room outside it: a server
        that stops reading us until we read it must not find the reader locked out."""
        view = memoryview((line + "\n").encode("utf-8", errors="replace"))
        deadline = time.monotonic() + SEND_TIMEOUT_SECONDS
        while view:
            with self._send_lock:
                if self._closed:
                    raise OSError("connection closed")
                self._sock.setblocking(False)
                try:
                    sent = self._sock.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    sent = 0
                finally:
                    self._sock.setblocking(True)
            view = view[sent:]
            if view:
                if time.monotonic() > deadline:
                    raise socket.timeout("the server takes nothing")
                select.select([], [self._sock], [], 0.5)

    def _fill(self, timeout: float | None) -> bool:
        """Read what arrives within *timeout* (None: however long) into the buffer; False
        at end of input. Raises ``socket.timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._send_lock:
                if self._closed:
                    return False
                self._sock.setblocking(False)
                try:
                    chunk = self._sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    chunk = None
                except ssl.SSLZeroReturnError:
                    return False
                finally:
                    self._sock.setblocking(True)
            if chunk is not None:
                if not chunk:
                    return False
                self._buffer += chunk
                return True
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                raise socket.timeout("timed out")
            select.select([self._sock], [], [], wait)

    def _next_line(self, timeout: float | None) -> bytes | None:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_SERVER_LINE_BYTES:
                break  # a line too long for us: hand over what there is
            if not self._fill(timeout):
                if not self._buffer:
                    return None
                break
        line, sep, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line + sep

    def lines(self) -> Iterator[str]:
        while True:
            raw = self._next_line(None)
            if raw is None:
                return
            yield raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")

    def first_line(self, timeout: float) -> str | None:
        try:
            raw = self._next_line(timeout)
        except socket.timeout:
            return None
        if raw is None:
            raise EOFError
        return raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")

    def shutdown(self) -> None:
        with self._send_lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True)
class Tls:
    """How to speak TLS to the server (``--tls``): trust *ca* (a PEM file; None: the
    system's), or nothing at all with *insecure* (self-signed test servers)."""

    ca: str | None = None
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class Display:
    """Writes lines for the user.

    In a terminal (``redraw``), a line arriving while the user is typing clears the input
    line, prints, and redraws the prompt and what was typed so far (``typed`` returns it;
    readline's ``get_line_buffer``, or nothing without readline). Otherwise plain lines.
    Safe to call from any thread.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        interactive: bool,
        redraw: bool,
        typed: Callable[[], str] | None = None,
    ) -> None:
        self.interactive = interactive
        self._out = out
        self._redraw = redraw
        self._typed = typed
        self._lock = threading.Lock()
        self._prompt: str | None = None
        self._dangling = False  # an input line was abandoned with the cursor still on it

    def begin_input(self, prompt: str) -> None:
        """Note that ``prompt`` is on screen and the user is typing after it."""
        self._prompt = prompt

    def end_input(self, entered: bool) -> None:
        """Note that input stopped: ``entered`` (Enter moved the cursor to a fresh line),
        or not (end of input, Ctrl-C, server gone: the cursor is still after the prompt).
        """
        with self._lock:
            self._prompt = None
            self._dangling = self.interactive and not entered

    def close_line(self) -> None:
        """Move past an abandoned input line, so that what follows starts on its own line."""
        with self._lock:
            if self._dangling:
                self._out.write("\n")
                self._out.flush()
            self._dangling = False

    def show(self, text: str) -> None:
        """Print ``text`` as one line, keeping an input line being typed intact."""
        with self._lock:
            prompt = self._prompt
            if self._redraw and prompt is not None:
                typed = self._typed() if self._typed else ""
                self._out.write(f"{CLEAR_LINE}{text}\n{prompt}{typed}")
            else:
                self._out.write(text + "\n")
            self._out.flush()


class Link(enum.Enum):
    """The state of the session's connection to the server."""

    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost; the reader thread is trying to connect again
    CLOSED = "closed"  # ended for good (the user left, or the server went without reconnect)


#: Opens a new connection to the server and reads its welcome; raises ConnectFailed.
Connector = Callable[[], "tuple[LineConnection, str]"]


class ChatSession:
    """One chat session: the main thread's input loop plus a socket reader thread.

    Owns the connection (closes it when ``run`` returns; with ``reconnect``, replaces it
    with a new one from ``reconnect`` when the server goes away), the ``ClientState`` and
    the ``RoomTracker``, which both threads update under ``_state_lock``. ``where`` names the
    server in messages (``127.0.0.1:5000``).
    """

    def __init__(
        self,
        connection: LineConnection,
        display: Display,
        state: ClientState,
        tz: tzinfo | None = None,
        *,
        reconnect: Connector | None = None,
        where: str = "the server",
    ) -> None:
        self._connection = connection
        self._display = display
        self._state = state
        self._tz = tz
        self._reconnect = reconnect
        self._where = where
        # Only a session that reconnects needs to know what it saw (one HISTORY R 1 per join).
        self._tracker = RoomTracker(state.username, tz) if reconnect else None
        self._state_lock = threading.Lock()
        # Sends one line and notes what it asks for, so the notes keep the order sent.
        self._wire_lock = threading.Lock()
        self._link = Link.CONNECTED  # guarded by _wire_lock
        self._closed = threading.Event()  # the connection ended for good
        self._replies = threading.Condition()  # guards _unanswered
        self._unanswered: list[str] = []  # commands sent whose reply has not come, oldest first
        self._done = threading.Event()  # ``INFO bye`` arrived or the connection ended
        # Set once the main thread leaves on purpose; from then on a close is expected.
        # Guarded by _stop_lock so that no wake-up signal is sent after it is set.
        self._stopping = False
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()  # the same, for the reconnect waits to watch
        # True while the main thread is in (or about to enter) input(); only then may the
        # wake-up signal's handler raise ServerClosed, so it never lands in clean-up code.
        self._awaiting_input = False
        self._wake: Callable[[], None] = self._exit_now
        self._reader = threading.Thread(target=self._read_loop, name="chat-reader", daemon=True)

    def run(self, room: str) -> int:
        """Join ``room``, chat until /quit, end of input or the server leaves; return status.

        Must be called from the main thread to interrupt input() when the server goes away;
        elsewhere (or on Windows) that case ends the process with ``os._exit(1)``.
        """
        with self._wake_main_on_close():
            try:
                self._reader.start()
                self._handle_user_line(f"/join {room}")
                self._await_replies()
                return self._input_loop()
            except ServerClosed:
                self._stop()
                self._report_server_closed()
                return EXIT_FAILURE
            except KeyboardInterrupt:
                self._stop()
                self._display.close_line()
                self._send_quietly("QUIT")
                self._finish()
                return EXIT_INTERRUPTED
            finally:
                self._stop()
                with self._wire_lock:
                    connection = self._connection
                connection.shutdown()
                self._reader.join(QUIT_TIMEOUT_SECONDS)
                if not self._reader.is_alive():
                    connection.close()

    def _input_loop(self) -> int:
        while True:
            try:
                line = self._read_user_line()
            except EOFError:
                self._stop()
                self._display.close_line()
                self._await_replies()
                self._send_quietly("QUIT")
                return self._finish()
            if self._handle_user_line(line):
                return self._finish()

    def _read_user_line(self) -> str:
        """Return the next typed line. Raises EOFError at the end of input, ServerClosed if
        the server has gone (also from inside the blocking input(), see _wake_main_on_close).
        """
        prompt = ""
        if self._display.interactive:
            with self._state_lock:
                current = self._state.current
            prompt = f"{current}> " if current else "> "
        self._awaiting_input = True
        entered = False
        try:
            if self._closed.is_set():
                raise ServerClosed
            self._display.begin_input(prompt)
            line = input(prompt)
            entered = True
            return line
        finally:
            self._awaiting_input = False
            self._display.end_input(entered)

    def _handle_user_line(self, line: str) -> bool:
        """Act on one typed line; return True if the user asked to quit."""
        if not self._display.interactive:
            self._await_replies()  # one command at a time: see REPLY_TIMEOUT_SECONDS
        connected = self._is_connected()  # not under _state_lock: _send takes them the other way
        with self._state_lock:
            action = user_line_to_command(line, self._state)
            offline = bool(action.send) and not action.quit and not connected
            if not offline:
                self._state = action.state
        if offline:  # nothing can be sent, and the rooms stay as they were
            self._display.show(f"! not connected: reconnecting to {self._where}; not sent")
            return False
        for notice in action.notices:
            self._display.show(notice)
        if action.quit:
            self._stop()
            self._await_replies()
        for command in action.send:
            self._send(command)
        return action.quit

    def _is_connected(self) -> bool:
        with self._wire_lock:
            return self._link is Link.CONNECTED

    def _send(self, line: str, kind: HistoryKind = HistoryKind.SHOWN) -> None:
        """Send ``line``, noting the reply it waits for (and, for HISTORY, its ``kind``)."""
        with self._wire_lock:
            if expects_reply(line):
                with self._replies:  # noted before sending, so the reply cannot come first
                    self._unanswered.append(line)
            if self._tracker is not None and line.startswith("HISTORY "):
                with self._state_lock:
                    self._tracker.sent(line.split(" ")[1], kind)
            connection = self._connection
            try:
                connection.send_line(line)
            except OSError as exc:
                if not self._stopping and self._reconnect is None:
                    raise ServerClosed from exc
                # The reader thread sees the same broken connection (and reconnects).
                log.debug("send of %r after the server left", line, exc_info=True)

    def _send_quietly(self, line: str) -> None:
        with self._wire_lock:
            connection = self._connection
        try:
            connection.send_line(line)
        except OSError:
            # The reader thread sees the same broken connection and reports it.
            log.debug("send of %r failed", line, exc_info=True)

    def _await_replies(self) -> None:
        """Wait (bounded) until every command sent has its reply (see ``expects_reply``)."""
        with self._replies:
            self._replies.wait_for(
                lambda: not self._unanswered or self._closed.is_set(),
                REPLY_TIMEOUT_SECONDS,
            )

    def _finish(self) -> int:
        """After QUIT: wait (bounded) for ``INFO bye`` or the close, so echoes get printed."""
        if self._is_connected():
            self._done.wait(QUIT_TIMEOUT_SECONDS)
        return EXIT_OK

    def _stop(self) -> None:
        with self._stop_lock:
            self._stopping = True
        self._stopped.set()

    def _report_server_closed(self) -> None:
        self._display.close_line()
        _error("server closed the connection")

    # -- reader thread

    def _read_loop(self) -> None:
        try:
            while True:
                self._read_connection()
                if not self._come_back():
                    return
        finally:
            with self._wire_lock:
                self._link = Link.CLOSED
            self._closed.set()
            self._done.set()
            with self._replies:
                self._replies.notify_all()
            self._wake_until_main_stops()

    def _read_connection(self) -> None:
        """Handle the current connection's lines until it ends."""
        with self._wire_lock:
            connection = self._connection
        try:
            for line in connection.lines():
                self._on_server_line(line)
        except OSError:
            log.debug("connection lost", exc_info=True)

    def _come_back(self) -> bool:
        """After the connection ended: reconnect and rejoin (True), or give up (False).

        Gives up at once without ``reconnect`` or once the user is leaving; otherwise
        retries, waiting ``reconnect_delay`` before each attempt, until it connects or the
        user stops. Says so in one line when it starts, and in one when it is back.
        """
        if self._reconnect is None or self._stopped.is_set():
            return False
        lost_at = time.monotonic()
        with self._wire_lock:
            self._link = Link.RECONNECTING
            self._connection.close()
        with self._state_lock:
            rooms = self._state.joined
            if self._tracker is not None:
                self._tracker.connection_lost(rooms)
        with self._replies:  # no reply is coming for what was sent
            self._unanswered.clear()
            self._replies.notify_all()
        self._display.show(
            f"! lost the connection to {self._where}; reconnecting (type /quit to stop)"
        )
        if not self._connect_again():
            return False
        self._display.show(f"* reconnected to {self._where}")
        self._rejoin(rooms, time.monotonic() - lost_at)
        return True

    def _connect_again(self) -> bool:
        """Try until connected (True; the new connection is current) or stopped (False)."""
        assert self._reconnect is not None
        attempt = 0
        while not self._stopped.wait(reconnect_delay(attempt)):
            attempt += 1
            try:
                connection, _welcome = self._reconnect()
            except ConnectFailed as failure:
                log.debug("reconnect attempt %d: %s", attempt, failure)
                continue
            with self._wire_lock:
                if self._stopped.is_set():
                    connection.close()
                    return False
                self._connection = connection
                self._link = Link.CONNECTED
            return True
        return False

    def _rejoin(self, rooms: Sequence[str], away_seconds: float) -> None:
        """JOIN ``rooms`` again under the same name; each confirmed JOIN fetches its catch-up."""
        username = self._state.username
        for room in rooms:
            if self._tracker is not None:
                with self._state_lock:
                    self._tracker.rejoining(room, away_seconds)
            self._send(f"JOIN {room} {username}")

    def _wake_until_main_stops(self) -> None:
        while True:
            with self._stop_lock:
                if self._stopping:
                    return
                self._wake()
            time.sleep(WAKE_RETRY_SECONDS)

    def _on_server_line(self, line: str) -> None:
        reply = reply_to_server_line(line)
        if reply is not None:
            self._send_quietly(reply)
            return
        outcome = TrackOutcome()
        with self._state_lock:
            before = self._state
            self._state = apply_server_line(before, line)
            if self._tracker is not None:
                for room in set(before.joined) - set(self._state.joined):
                    self._tracker.forget(room)  # refused or left: nothing to track
                outcome = self._tracker.on_line(line)
        shown = None if outcome.hide else format_server_line(line, self._tz)
        if shown is not None:
            self._display.show(shown)
        for text in outcome.show:
            self._display.show(text)
        self._note_reply(line)
        for command, kind in outcome.send:
            self._send(command, kind)

    def _note_reply(self, line: str) -> None:
        with self._replies:
            if line.split(" ", 1)[0].upper() == "ERROR":
                if self._unanswered:
                    self._error_answers(self._unanswered.pop(0))
            else:
                username = self._state.username
                for index, command in enumerate(self._unanswered):
                    if reply_matches(command, line, username):
                        del self._unanswered[index]
                        break
            self._replies.notify_all()
        if line == "INFO bye":
            self._done.set()

    def _error_answers(self, command: str) -> None:
        """An ERROR line answered ``command``: a HISTORY's reply will not come."""
        if self._tracker is not None and command.startswith("HISTORY "):
            with self._state_lock:
                self._tracker.answered_by_error(command.split(" ")[1])

    # -- waking the main thread out of input()

    @contextlib.contextmanager
    def _wake_main_on_close(self) -> Iterator[None]:
        """While active, a server close interrupts the main thread's input() (POSIX).

        input() cannot be interrupted portably. On POSIX the reader thread sends WAKE_SIGNAL
        to the main thread (every WAKE_RETRY_SECONDS until run() stops); while the main
        thread awaits input, the handler raises ServerClosed there, which also lets readline
        restore the terminal. Elsewhere the reader thread reports and ends the process.
        A session that reconnects only gets here once the user is leaving anyway.
        """
        usable = (
            WAKE_SIGNAL is not None
            and hasattr(signal, "pthread_kill")
            and threading.current_thread() is threading.main_thread()
        )
        if not usable:
            yield
            return
        main_ident = threading.get_ident()

        def on_wake(signum: int, frame: object) -> None:
            if self._awaiting_input and self._closed.is_set() and not self._stopping:
                raise ServerClosed

        previous = signal.signal(WAKE_SIGNAL, on_wake)
        self._wake = lambda: signal.pthread_kill(main_ident, WAKE_SIGNAL)
        try:
            yield
        finally:
            # run() has set _stopping, so the reader thread sends no more signals.
            signal.signal(WAKE_SIGNAL, previous)

    def _exit_now(self) -> None:
        """Fallback wake-up: report and end the process (input() cannot be interrupted)."""
        self._report_server_closed()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)


# --------------------------------------------------------------------------- main


class _BadName(Exception):
    """A username or room given on the command line or at a prompt breaks the name rules."""


def _error(message: str) -> None:
    """Print ``chat_client: message`` on stderr."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def port_number(text: str) -> int:
    """argparse type for ``--port``: a whole number from 1 to 65535."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(
            f"the port must be a whole number from 1 to 65535, not {text!r} "
            f"(the line protocol is on {DEFAULT_PORT} by default)"
        )
    return int(text)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    commands = "\n".join(line[2:] for line in HELP_LINES)
    coming_back = textwrap.fill(
        "In a terminal, when the server goes away the client says so, reconnects (waiting "
        f"longer after each failed attempt, at most {RECONNECT_MAX_DELAY_SECONDS:g} s), "
        "joins its rooms again under the same name and shows what was said meanwhile. "
        "With piped input it exits with status 1 instead. More in docs/CLIENT.md.",
        width=79,
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "Chat on a shardchat server over its line protocol. Every line you type is "
            "said in the current room (shown in the prompt); lines starting with / are "
            "commands.",
            width=79,
        ),
        epilog=f"{commands}\n\n{coming_back}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="server host (%(default)s)")
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help="the server's line-protocol (TCP) port (%(default)s; the browser's HTTP port "
        "is another one)",
    )
    parser.add_argument("--user", help="username (asked for if not given)")
    parser.add_argument("--room", help=f"room to join first (asked for; default {DEFAULT_ROOM})")
    parser.add_argument(
        "--tls", action="store_true", help="speak TLS to the server (one started with --tls-cert)"
    )
    parser.add_argument(
        "--ca", metavar="FILE", help="with --tls: trust the certificates in this PEM file"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="with --tls: accept any certificate (self-signed test servers only)",
    )
    parser.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit (status 1) when the server goes away instead of reconnecting",
    )
    return parser.parse_args(argv)


def _ask(question: str, interactive: bool) -> str:
    """Read one answer from stdin. Raises EOFError at the end of input.

    The question goes to stdout in a terminal, to stderr if only stdin is a terminal (so
    piped output stays clean), and nowhere if stdin is not a terminal.
    """
    if interactive:
        return input(question)
    if sys.stdin.isatty():
        sys.stderr.write(question)
        sys.stderr.flush()
    return input()


def _pick_name(
    given: str | None, *, question: str, default: str, max_chars: int, rule: str, interactive: bool
) -> str:
    """Return ``given`` or an answer to ``question``, checked against the name rules.

    A terminal user is asked again after a bad answer. Raises _BadName otherwise, EOFError
    at the end of input.
    """
    while True:
        answer = given if given is not None else _ask(question, interactive).strip() or default
        name = normalize_name(answer)
        if is_valid_name(name, max_chars):
            return name
        _error(f"{rule} (got {name!r})")
        if given is not None or not interactive:
            raise _BadName(name)


def _line_editor(interactive: bool) -> Callable[[], str] | None:
    """Import readline for a terminal user; return its ``get_line_buffer``, or None.

    Importing it is what makes input() editable and sends input()'s prompt to stdout
    (without it, CPython writes the prompt to stderr). Absent on Windows.
    """
    if not interactive:
        return None
    try:
        import readline  # noqa: PLC0415 - optional, and only wanted in a terminal
    except ImportError:
        return None
    return readline.get_line_buffer


def _make_display(interactive: bool, typed: Callable[[], str] | None) -> Display:
    redraw = interactive and _terminal_has_escapes()
    return Display(sys.stdout, interactive=interactive, redraw=redraw, typed=typed)


def _terminal_has_escapes() -> bool:
    """Return True if stdout understands ``ESC [ K``; on Windows, try to switch that on."""
    if os.name != "nt":
        return True
    import ctypes  # noqa: PLC0415 - Windows only

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.GetStdHandle(-11)  # STD_OUTPUT_HANDLE
    mode = ctypes.c_uint32()
    if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
        return False
    enable_virtual_terminal_processing = 0x0004
    return bool(kernel32.SetConsoleMode(handle, mode.value | enable_virtual_terminal_processing))


def _tolerate_unencodable_output() -> None:
    """Show '?' for characters the console encoding lacks, instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def open_connection(host: str, port: int, tls: Tls | None = None) -> tuple[LineConnection, str]:
    """Connect to ``host:port`` and read shardchat's welcome; return the connection and it.

    Raises ConnectFailed, saying why in the user's words: the connection was refused or
    timed out, the name does not resolve, or the server is not shardchat (see
    ``greeting_problem``). The caller owns the connection returned.
    """
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    connection: LineConnection
    if tls is None:
        connection = LineConnection(sock)
    else:
        try:
            secured = tls.context().wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise ConnectFailed(
                f"{host}:{port}: the server's certificate is not trusted "
                f"({exc.verify_message}); pass --ca FILE, or --insecure for a test server"
            ) from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            sock.close()  # closed or reset before the handshake finished: not a plaintext answer
            raise ConnectFailed(
                f"{host}:{port} closed the connection during the TLS handshake: the server "
                "may be full or refuse your address (try again later)"
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ConnectFailed(
                f"{host}:{port} does not speak TLS ({getattr(exc, 'reason', None) or exc}); "
                "leave out --tls for a plaintext server"
            ) from exc
        connection = TlsLineConnection(secured)
    try:
        line, closed = connection.first_line(WELCOME_TIMEOUT_SECONDS), False
    except EOFError:
        line, closed = None, True
    except OSError as exc:  # reset while greeting
        line, closed = None, True
        log.debug("connection broke before the welcome", exc_info=exc)
    problem = greeting_problem(line, closed=closed)
    if problem is not None or line is None:
        connection.close()
        raise ConnectFailed(problem or "no welcome")
    return connection, line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chat client with command-line ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 after /quit or end of input, 1 if the server cannot be
    reached, is not shardchat, or goes away (with piped input or ``--no-reconnect``), 2 for
    a bad flag, username or room, 130 after Ctrl-C.
    """
    args = _parse_args(argv)
    if (args.ca or args.insecure) and not args.tls:
        print(f"{PROG}: --ca and --insecure go with --tls", file=sys.stderr)
        return 2
    tls = Tls(args.ca, args.insecure) if args.tls else None
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    # Someone is typing: worth waiting for the server to come back. A script is not.
    reconnect = sys.stdin.isatty() and not args.no_reconnect
    _tolerate_unencodable_output()
    typed = _line_editor(interactive)
    try:
        user = _pick_name(
            args.user,
            question="username: ",
            default="",
            max_chars=MAX_USERNAME_CHARS,
            rule=USERNAME_RULE,
            interactive=interactive,
        )
        room = _pick_name(
            args.room,
            question=f"room [{DEFAULT_ROOM}]: ",
            default=DEFAULT_ROOM,
            max_chars=MAX_ROOM_CHARS,
            rule=ROOM_RULE,
            interactive=interactive,
        )
    except _BadName:
        return EXIT_USAGE
    except EOFError:
        _error("end of input before a username and room were given")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_INTERRUPTED
    try:
        connection, welcome = open_connection(args.host, args.port, tls)
    except ConnectFailed as failure:
        _error(str(failure))
        return EXIT_FAILURE
    display = _make_display(interactive, typed)
    shown = format_server_line(welcome)
    if shown is not None:
        display.show(shown)
    session = ChatSession(
        connection,
        display,
        ClientState(user),
        reconnect=(lambda: open_connection(args.host, args.port, tls)) if reconnect else None,
        where=f"{args.host}:{args.port}",
    )
    try:
        return session.run(room)
    except KeyboardInterrupt:  # a second Ctrl-C while waiting for the server's goodbye
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
