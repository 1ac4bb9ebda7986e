"""The messages between the router and the shards, all in one place.

The router sends each shard a *batch*: a list of commands, pickled as one pipe message per
event-loop turn. The shard answers with a list of events, one pipe message per group of
batches it applied. Both are plain tuples whose first field is an opcode: pickling a
tuple of ints, floats and strs costs a tenth of a named tuple's or a class's
(docs/PERFORMANCE.md measures it on the fan-out), and the hot path carries one command and
one event per chat message. In exchange every message has **one constructor and one
layout, here**: build them only with the functions below, read them only with the
``*_FIELDS`` positions documented with each, and no opcode is used twice (commands are
1-19, events 101-119).

Identifiers:

``cid``
    The router's id of a client: one TCP connection or one browser session. Unique for
    the life of the router process. Shards key membership by ``cid``.
``req``
    The router's number for one command, unique for the life of the router process. Every
    command gets exactly one *completion*: the event that answers it, carrying its
    ``req`` (see below). Because a shard applies commands in order and answers in order,
    the router matches completions to commands in first-in first-out order.
``deadline``
    ``time.monotonic()`` seconds (one clock for every process of a machine) after which
    the shard must not apply the command: it completes it with :func:`fail` and
    ``shard_timeout`` instead. ``0.0`` means none. A ``DROP`` and a ``REJOIN`` are always
    applied: theirs is only when the router stops waiting for them. So when the router tells
    a client "busy, try again" after the deadline, the command was not applied and never
    will be.
``entry``
    One history entry, the unit of a room's event stream:
    ``(seq, ts, kind, username, text)`` with ``seq`` the room's sequence number (1, 2, ...),
    ``ts`` seconds since the epoch, ``kind`` one of :data:`KIND_CHAT`, :data:`KIND_JOIN`,
    :data:`KIND_LEAVE`, ``username`` the sender / joiner / leaver, and ``text`` the chat text
    or, for joins and leaves, ``"<username> joined <room>"`` / ``"<username> left <room>"``.
``epoch``
    An integer naming one unbroken history of a room: seqs mean something only together
    with it. It changes when a room's history was lost (an in-memory shard restarted).

Completions: ``JOIN`` -> ``JOINED`` or ``FAIL``; ``MSG`` -> ``CHAT`` or ``FAIL``; ``LEAVE``
-> ``LEFT`` (with the ``req``) or ``FAIL``; ``DROP`` -> ``LEFT`` events without a ``req``,
then ``DONE``; ``NAMES``, ``ROOMS``, ``HISTORY``, ``SINCE``, ``REJOIN`` -> ``DONE`` or
``FAIL``; ``PRIVMSG`` -> ``PRIVATE`` or ``FAIL``. Events with ``req == 0`` complete nothing.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

Entry = Tuple[int, float, str, str, str]
Command = Tuple[Any, ...]
Event = Tuple[Any, ...]

KIND_CHAT = "chat"
KIND_JOIN = "join"
KIND_LEAVE = "leave"

# --- router -> shard commands --------------------------------------------------------------
# Every command starts (op, req, deadline, cid, ...).
OP, REQ, DEADLINE, CID, ROOM = 0, 1, 2, 3, 4

#: ``(JOIN, req, deadline, cid, room, username)``: add the client to the room (creating
#: it). Completion: ``JOINED`` or ``FAIL`` (``name_taken``, ``already_in_room``).
JOIN = 1
#: ``(MSG, req, deadline, cid, room, text)``: a chat message from a member. Completion:
#: ``CHAT`` or ``FAIL not_in_room``.
MSG = 2
#: ``(LEAVE, req, deadline, cid, room)``. Completion: ``LEFT`` or ``FAIL not_in_room``.
LEAVE = 3
#: ``(DROP, req, deadline, cid)``: the client is gone; leave every room it is in on this
#: shard (whatever the deadline: it says when the router stops waiting).
#: ``LEFT`` events (``req`` 0), then the completion ``DONE`` (result ``None``).
DROP = 4
#: ``(NAMES, req, deadline, cid, room)``: ``DONE`` with the member names, sorted.
NAMES = 5
#: ``(ROOMS, req, deadline, cid)``: ``DONE`` with ``[(room, members)]`` of this shard's
#: rooms with members (the busiest ``MAX_ROOMS_LISTED``).
ROOMS = 6
#: ``(HISTORY, req, deadline, cid, room, n)``: ``DONE`` with the last ``n`` entries of a
#: room the client is in, oldest first; or ``FAIL not_in_room``.
HISTORY = 7
#: ``(SINCE, req, deadline, cid, room, after, max_bytes)``: entries with ``seq > after`` of
#: a room the client is in, oldest first, as many as fit in *max_bytes* by
#: :func:`entry_size` (at least one); ``DONE`` with ``(entries, first_seq, last_seq,
#: epoch)``: ``first_seq`` is the oldest seq still held, ``last_seq`` the newest (so
#: ``entries[-1][0] < last_seq`` says more are waiting).
SINCE = 8
#: ``(REJOIN, req, deadline, cid, room, username)``: put a member back after the shard
#: restarted (from the router's membership). No entry, no event but the completion:
#: ``DONE`` with the room's epoch (unchanged if its history survived), or ``FAIL
#: name_taken`` if someone else has the name by now (a router tier: another router's JOIN
#: came first); the member is then not in the room.
REJOIN = 9

#: ``(PRIVMSG, req, deadline, cid, room, to, text)``: a direct message from a member of
#: the room to the member named *to* (any spelling that collides with the name). Not
#: recorded: no seq, no history. Completion: ``PRIVATE`` or ``FAIL`` (``not_in_room``:
#: the sender is not a member; ``no_such_member``: nobody there has that name).
PRIVMSG = 10

COMMANDS = frozenset({JOIN, MSG, LEAVE, DROP, NAMES, ROOMS, HISTORY, SINCE, REJOIN, PRIVMSG})
#: Applied whatever their deadline: a client that is gone must leave its rooms, a member
#: must be put back.
ALWAYS_APPLIED = frozenset({DROP, REJOIN})

# --- shard -> router events ----------------------------------------------------------------
# Every event starts (op, req, ...); req is 0 when it completes no command.
EVENT_REQ = 1

#: ``(JOINED, req, room, cid, entry, epoch)``: the client joined (the completion of its
#: JOIN); tell it and the other members. ``epoch`` is the room's.
JOINED = 101
#: ``(CHAT, req, room, entry, wire)``: a chat message (the completion of its MSG);
#: ``wire`` is the encoded ``MSG`` line for line-protocol members (encoded once, here).
CHAT = 102
#: ``(LEFT, req, room, cid, entry)``: the client left: the completion of its LEAVE, or
#: (``req`` 0) one of the rooms of a DROP.
LEFT = 103
#: ``(DONE, req, result)``: the completion of a request that asked for a result.
DONE = 104
#: ``(FAIL, req, code)``: the command was refused, not applied; ``code`` is one of the
#: codes of :mod:`common.errors`. The router knows the rest from the command itself.
FAIL = 105

#: ``(STORAGE, 0, room, problem, lost)``: the room's history stopped being stored
#: (*problem*, one line) or, with *problem* None, is stored again (*lost*: some entries of
#: the meantime were given up). Sent when that changes, after the events of the batch
#: whose commit found it; it completes no command.
STORAGE = 106

#: ``(PRIVATE, req, room, to_cid, sender, to, ts, after, text, wire)``: a direct message
#: (the completion of its PRIVMSG): for the sender (the command's cid) and for *to_cid*,
#: whose name in the room is *to*; *after* is the room's seq when it was sent (its place
#: in the room's stream: after that entry, before the next); *wire* is the
#: ``PRIVMSG <room> <sender> <to> <text>`` line.
PRIVATE = 107

#: ``(NOTICE, 0, room, code, epoch)``: something the room's members are to be told, from a
#: shard whose rooms are shared through Redis (``--redis``): ``shared_lost`` (Redis is
#: unreachable: the room's commands are refused until it is back), ``shared_back``,
#: ``missed`` (entries of the room were lost between Redis and this node), and
#: ``restarted`` (Redis lost the room: its history starts anew under *epoch*, as after an
#: in-memory shard's restart). Completes nothing.
NOTICE = 108

EVENTS = frozenset({JOINED, CHAT, LEFT, DONE, FAIL, STORAGE, PRIVATE, NOTICE})
assert not COMMANDS & EVENTS, "an opcode is used twice"


# --- constructors: the only places that lay a message out --------------------------------


def join(req: int, deadline: float, cid: int, room: str, username: str) -> Command:
    return (JOIN, req, deadline, cid, room, username)


def msg(req: int, deadline: float, cid: int, room: str, text: str) -> Command:
    return (MSG, req, deadline, cid, room, text)


def leave(req: int, deadline: float, cid: int, room: str) -> Command:
    return (LEAVE, req, deadline, cid, room)


def drop(req: int, deadline: float, cid: int) -> Command:
    return (DROP, req, deadline, cid)


def names(req: int, deadline: float, cid: int, room: str) -> Command:
    return (NAMES, req, deadline, cid, room)


def rooms(req: int, deadline: float, cid: int) -> Command:
    return (ROOMS, req, deadline, cid)


def history(req: int, deadline: float, cid: int, room: str, n: int) -> Command:
    return (HISTORY, req, deadline, cid, room, n)


def since(req: int, deadline: float, cid: int, room: str, after: int, max_bytes: int) -> Command:
    return (SINCE, req, deadline, cid, room, after, max_bytes)


def rejoin(req: int, deadline: float, cid: int, room: str, username: str) -> Command:
    return (REJOIN, req, deadline, cid, room, username)


def privmsg(req: int, deadline: float, cid: int, room: str, to: str, text: str) -> Command:
    return (PRIVMSG, req, deadline, cid, room, to, text)


def joined(req: int, room: str, cid: int, entry: Entry, epoch: int) -> Event:
    return (JOINED, req, room, cid, entry, epoch)


def chat(req: int, room: str, entry: Entry, wire: bytes) -> Event:
    return (CHAT, req, room, entry, wire)


def left(req: int, room: str, cid: int, entry: Entry) -> Event:
    return (LEFT, req, room, cid, entry)


def done(req: int, result: Any) -> Event:
    return (DONE, req, result)


def fail(req: int, code: str) -> Event:
    return (FAIL, req, code)


def private(
    req: int,
    room: str,
    to_cid: int,
    sender: str,
    to: str,
    ts: float,
    after: int,
    text: str,
    wire: bytes,
) -> Event:
    return (PRIVATE, req, room, to_cid, sender, to, ts, after, text, wire)


def storage(room: str, problem: Optional[str], lost: bool = False) -> Event:
    return (STORAGE, 0, room, problem, lost)


def notice(room: str, code: str, epoch: int = 0) -> Event:
    return (NOTICE, 0, room, code, epoch)


def command_room(command: Command) -> str:
    """The room a command is about (``""`` for ``DROP`` and ``ROOMS``)."""
    return command[ROOM] if len(command) > ROOM else ""


# --- entry sizes (poll budgets) ------------------------------------------------------------

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
