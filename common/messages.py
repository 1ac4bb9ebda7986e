"""The messages between the router and the shards, all in one place.

The router sends each shard a *batch*: a list of command tuples, pickled as one pipe
message per event-loop turn. The shard answers with a list of event tuples, one pipe
message per batch it applied. Every tuple starts with an int opcode; the rest is plain
ints, floats and strs (and one ``bytes``), so pickling stays cheap and nothing needs a class
on the other side. The field layouts are documented next to each opcode and in
``docs/ARCHITECTURE.md``.

Identifiers:

``cid``
    The router's id of a client: one TCP connection or one browser session. Unique for
    the life of the router process. Shards key membership by ``cid``.
``req``
    A request number chosen by the router when it wants an answer (``DONE``/``FAIL``
    with the same ``req``); ``0`` means "no answer wanted unless it fails".
``entry``
    One history entry, the unit of a room's event stream:
    ``(seq, ts, kind, username, text)`` with ``seq`` the room's sequence number (1, 2, ...),
    ``ts`` seconds since the epoch, ``kind`` one of :data:`KIND_CHAT`, :data:`KIND_JOIN`,
    :data:`KIND_LEAVE`, ``username`` the sender / joiner / leaver, and ``text`` the chat text
    or, for joins and leaves, ``"<username> joined <room>"`` / ``"<username> left <room>"``.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

# --- router -> shard commands ------------------------------------------------------------
#: ``(JOIN, req, cid, room, username)``: add the client to the room (creating it);
#: with a ``req``, ``DONE`` (result: the join's seq) follows the ``JOINED``.
JOIN = 1
#: ``(MSG, req, cid, room, text)``: a chat message from a member.
MSG = 2
#: ``(LEAVE, req, cid, room)``: the client leaves the room.
LEAVE = 3
#: ``(DROP, req, cid)``: the client is gone; leave every room it is in on this shard.
#: Always answered with ``DONE`` (result ``None``) after the ``LEFT`` events.
DROP = 4
#: ``(NAMES, req, cid, room)``: member names; ``DONE`` result: sorted list of usernames.
NAMES = 5
#: ``(ROOMS, req, cid)``: ``DONE`` result: list of ``(room, member_count)`` of rooms with
#: members on this shard.
ROOMS = 6
#: ``(HISTORY, req, cid, room, n)``: the last ``n`` entries of a room the client is in;
#: ``DONE`` result: list of entries, oldest first.
HISTORY = 7
#: ``(SINCE, req, cid, room, after, max_bytes)``: entries with ``seq > after`` of a room the
#: client is in, oldest first, as many as fit in *max_bytes* by :func:`entry_size` (at least
#: one); ``DONE`` result: ``(entries, first_seq, last_seq)`` where ``first_seq`` is the
#: oldest seq still held (entries before it are gone) and ``last_seq`` the newest (so
#: ``entries[-1][0] < last_seq`` says more are waiting).
SINCE = 8
#: ``(REJOIN, req, cid, room, username)``: put a member back after the shard restarted
#: (from the router's mirror). Silent: no entry, no event unless ``req`` (then ``DONE``).
REJOIN = 9

# --- shard -> router events --------------------------------------------------------------
#: ``(JOINED, room, cid, entry)``: the client joined; tell it and the other members.
JOINED = 1
#: ``(CHAT, room, entry, wire)``: a chat message; ``wire`` is the encoded ``MSG`` line for
#: line-protocol members (encoded once, in the shard).
CHAT = 2
#: ``(LEFT, room, cid, entry, explicit)``: the client left; ``explicit`` is True for a
#: ``LEAVE`` (the leaver is told) and False for a ``DROP``.
LEFT = 3
#: ``(DONE, req, cid, result)``: the answer to a request.
DONE = 4
#: ``(FAIL, req, cid, op, code, room)``: command ``op`` was refused; ``code`` is one of the
#: ``ERR_*`` strings below.
FAIL = 5

# --- failure codes (stable: HTTP clients match them) -------------------------------------
# From a shard:
ERR_NOT_IN_ROOM = "not_in_room"
ERR_NAME_TAKEN = "name_taken"
ERR_ALREADY_IN_ROOM = "already_in_room"
# From the router itself:
ERR_WRONG_USERNAME = "wrong_username"
ERR_TOO_MANY_ROOMS = "too_many_rooms"
ERR_TOO_MANY_ROOMS_FOR_ADDRESS = "too_many_rooms_for_address"
ERR_TIMEOUT = "shard_timeout"
ERR_UNAVAILABLE = "room_unavailable"

KIND_CHAT = "chat"
KIND_JOIN = "join"
KIND_LEAVE = "leave"

Entry = Tuple[int, float, str, str, str]


#: What :func:`entry_size` adds to the text and username for the rest of an entry as the
#: HTTP API shows it (``{"id":..,"room":..,"type":..,"kind":..,"ts":..}``).
ENTRY_OVERHEAD = 100


def entry_size(entry: Entry) -> int:
    """About how many bytes *entry* takes in a poll answer (characters, not UTF-8 bytes:
    a bound for budgets, not an exact length)."""
    return len(entry[4]) + len(entry[3]) + ENTRY_OVERHEAD


def take_within(entries: Iterable[Entry], max_bytes: int) -> Tuple[List[Entry], bool]:
    """The longest prefix of *entries* whose :func:`entry_size` sum fits in *max_bytes*,
    but at least one entry; and whether any were left out."""
    taken: List[Entry] = []
    used = 0
    for entry in entries:
        used += len(entry[4]) + len(entry[3]) + ENTRY_OVERHEAD  # entry_size, inlined
        if taken and used > max_bytes:
            return taken, True
        taken.append(entry)
    return taken, False


def size_of(entries: Iterable[Entry]) -> int:
    """The sum of :func:`entry_size` over *entries*."""
    return sum(len(entry[4]) + len(entry[3]) + ENTRY_OVERHEAD for entry in entries)
