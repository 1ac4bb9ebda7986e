"""Every refusal shardchat can answer, in one catalogue: a stable code, the line-protocol
text, the HTTP status and the HTTP message.

Clients match codes, never texts. Both protocols (and the terminal client) take their
wording from here: a TCP client reads ``ERROR <line>``, an HTTP client gets
``{"error": {"code": <code>, "message": <message>}}`` with the status. Texts may name the
room (``{room}``), the connection's username (``{username}``) or a limit; a refusal fills
them in (:class:`Refusal`).

The split follows h11: a :class:`Refusal` is "the peer asked for something we do not do"
(its command is not applied, and the refusal says so); a bug of ours is an exception of
another type, logged, and answered ``internal_error``.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

from common.limits import MAX_HISTORY_REPLY, MAX_ROOMS_PER_CLIENT


class ErrorSpec(NamedTuple):
    """How one code is said: ``line`` after ``ERROR `` on TCP, ``status`` and ``message``
    over HTTP (the message defaults to the line)."""

    line: str
    status: int
    message: str = ""


# --- codes (stable: clients match them) ------------------------------------------------------

# A command the shards refused, or the router for them.
NOT_IN_ROOM = "not_in_room"
NAME_TAKEN = "name_taken"
ALREADY_IN_ROOM = "already_in_room"
WRONG_USERNAME = "wrong_username"
TOO_MANY_ROOMS = "too_many_rooms"
TOO_MANY_ROOMS_FOR_ADDRESS = "too_many_rooms_for_address"
SHARD_TIMEOUT = "shard_timeout"
ROOM_UNAVAILABLE = "room_unavailable"
NOT_DELIVERED = "not_delivered"
NO_SUCH_MEMBER = "no_such_member"
# Flood control and caps.
RATE_LIMITED = "rate_limited"
TOO_MANY_SESSIONS = "too_many_sessions"
TOO_MANY_SESSIONS_FOR_ADDRESS = "too_many_sessions_for_address"
SERVER_FULL = "server_full"
# The request itself.
BAD_REQUEST = "bad_request"
INVALID_JSON = "invalid_json"
INVALID_ROOM = "invalid_room"
INVALID_USERNAME = "invalid_username"
INVALID_TEXT = "invalid_text"
INVALID_CURSOR = "invalid_cursor"
TEXT_TOO_LONG = "text_too_long"
NO_SESSION = "no_session"
BAD_ORIGIN = "bad_origin"
MISDIRECTED_REQUEST = "misdirected_request"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
SHUTTING_DOWN = "shutting_down"
ROUTER_TIMEOUT = "router_timeout"
INTERNAL_ERROR = "internal_error"

CATALOGUE: Dict[str, ErrorSpec] = {
    NOT_IN_ROOM: ErrorSpec("not in room {room}", 403),
    NAME_TAKEN: ErrorSpec("name taken in {room}", 409, "someone in {room} already has that name"),
    ALREADY_IN_ROOM: ErrorSpec("already in room {room}", 409),
    WRONG_USERNAME: ErrorSpec(
        "username is {username} on this connection", 403, "this session has another username"
    ),
    TOO_MANY_ROOMS: ErrorSpec(
        f"too many rooms (at most {MAX_ROOMS_PER_CLIENT})",
        400,
        f"too many rooms for one session (at most {MAX_ROOMS_PER_CLIENT})",
    ),
    TOO_MANY_ROOMS_FOR_ADDRESS: ErrorSpec("too many rooms for one address", 429),
    # Not applied, and never will be: the shard refuses it after its deadline.
    SHARD_TIMEOUT: ErrorSpec("room busy, try again", 503),
    ROOM_UNAVAILABLE: ErrorSpec("room unavailable", 503, "room {room} unavailable"),
    # A MSG that was on its way when the room's shard died: it is not in the room.
    NOT_DELIVERED: ErrorSpec(
        "message not delivered: room {room} restarted, send it again",
        503,
        "message not delivered: room {room} restarted, send it again",
    ),
    # A PRIVMSG to a name nobody in the room has (names are unique per room, not globally).
    NO_SUCH_MEMBER: ErrorSpec("no member {username} in {room}", 404),
    RATE_LIMITED: ErrorSpec("too many requests", 429),
    TOO_MANY_SESSIONS: ErrorSpec("too many sessions, try again later", 503),
    TOO_MANY_SESSIONS_FOR_ADDRESS: ErrorSpec(
        "too many sessions from your address (at most {limit})", 429
    ),
    SERVER_FULL: ErrorSpec("server full", 503, "too many connections"),
    BAD_REQUEST: ErrorSpec("bad request", 400),
    INVALID_JSON: ErrorSpec("the body is not valid JSON", 400),
    INVALID_ROOM: ErrorSpec("invalid room name", 400),
    INVALID_USERNAME: ErrorSpec("invalid username", 400),
    INVALID_TEXT: ErrorSpec("invalid text", 400),
    INVALID_CURSOR: ErrorSpec("invalid cursor", 400),
    TEXT_TOO_LONG: ErrorSpec("message too long", 413),
    NO_SESSION: ErrorSpec("no session: join a room first", 401),
    BAD_ORIGIN: ErrorSpec("cross-origin requests are not accepted", 403),
    MISDIRECTED_REQUEST: ErrorSpec("this server does not answer for that host", 421),
    NOT_FOUND: ErrorSpec("not found", 404),
    METHOD_NOT_ALLOWED: ErrorSpec("method not allowed", 405),
    UNSUPPORTED_MEDIA_TYPE: ErrorSpec("send Content-Type: application/json", 415),
    SHUTTING_DOWN: ErrorSpec("server shutting down", 503, "the server is shutting down"),
    # A router tier: the router holding the session did not answer a forwarded request.
    ROUTER_TIMEOUT: ErrorSpec(
        "no answer in time", 504, "the router holding this session did not answer in time"
    ),
    INTERNAL_ERROR: ErrorSpec("internal error", 500),
}

#: The largest ``n`` of HISTORY, for texts that name it.
HISTORY_LIMIT = MAX_HISTORY_REPLY


class Refusal(Exception):
    """A command or request refused with a catalogue *code*; not applied, now or later.

    *room* and *username* fill the texts' placeholders; *detail*, when given, replaces
    the catalogue's text with a more precise one (``invalid room name: 1-64 letters...``)
    in both protocols. Raised where a refusal ends the handling of a request, and passed
    to ``on_fail`` callbacks where an answer comes later.
    """

    def __init__(
        self,
        code: str,
        room: str = "",
        *,
        username: str = "",
        detail: Optional[str] = None,
        limit: int = 0,
    ) -> None:
        spec = CATALOGUE[code]  # KeyError here is our bug: every code is in the catalogue
        values = {"room": room, "username": username, "limit": limit}
        self.code = code
        self.room = room
        self.status = spec.status
        self.line = detail if detail is not None else spec.line.format(**values)
        message = detail if detail is not None else (spec.message or spec.line)
        self.message = message.format(**values) if detail is None else message
        super().__init__(self.message)

    def error_line(self) -> bytes:
        """The line-protocol answer: ``ERROR <line>\\n``."""
        return f"ERROR {self.line}\n".encode()

    def __repr__(self) -> str:
        return f"Refusal({self.code!r}, room={self.room!r})"


def error_line(code: str, room: str = "", **values: str) -> bytes:
    """``ERROR <line>\\n`` for *code* (see :class:`Refusal`)."""
    return Refusal(code, room, **values).error_line()  # type: ignore[arg-type]
