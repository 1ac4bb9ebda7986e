"""Browser sessions: one :class:`HttpSession` per cookie, a hub :class:`~router.hub.Client`.

A session is what the hub sees of a browser user: it joins rooms, gets every event of those
rooms (``deliver``), and keeps them per room in a bounded :class:`RoomFeed` until a poll
takes them. Polls (see :mod:`router.http_poll`) wait on the session and are woken when one
of their rooms has news. The :class:`SessionStore` owns the sessions: it creates them
(random tokens), finds them by cookie, and expires the ones that stopped polling.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from common import errors
from common import messages as m
from common.errors import Refusal
from common.limits import (
    MAX_POLLS_PER_SESSION,
    MAX_PRIVATE_KEPT,
    MAX_PRIVATE_KEPT_CHARS,
    MAX_ROOM_NOTICES,
    MAX_SESSION_BACKLOG,
)
from router.hub import Client, ClientRecord, Hub, OnDone, OnFail

log = logging.getLogger(__name__)

#: The cookie holding the session token.
COOKIE_NAME = "sc_session"


class RoomFeed:
    """The events of one room this session was sent and no poll has acknowledged yet.

    Invariant: every event of the room with ``seq > covered_after`` and ``seq <=
    last_seq`` is in ``entries`` (oldest first). When the feed is full the oldest entry
    goes and ``covered_after`` moves up: a poll from before it reads the shard instead.
    ``epoch`` is the owning shard's epoch the feed belongs to.
    """

    __slots__ = ("entries", "covered_after", "last_seq", "epoch", "size", "notices")

    def __init__(self, epoch: int, covered_after: int) -> None:
        self.entries: Deque[m.Entry] = deque()
        self.covered_after = covered_after
        self.last_seq = covered_after
        self.epoch = epoch
        #: The ``entry_size`` sum of ``entries``, kept as they come and go, so a poll
        #: whose answer fits needs no sizing.
        self.size = 0
        #: Lines for the members of the room (history not saved...), for the next answer.
        self.notices: List[str] = []

    def push(self, entry: m.Entry) -> None:
        entries = self.entries
        if len(entries) >= MAX_SESSION_BACKLOG:
            self.covered_after = self._drop_oldest()
        entries.append(entry)
        self.size += len(entry[4]) + len(entry[3]) + m.ENTRY_OVERHEAD
        self.last_seq = entry[0]

    def covers(self, after: int) -> bool:
        """True if every event after *after* that this session has seen is held here."""
        return self.covered_after <= after <= self.last_seq

    def take_after(self, after: int, max_bytes: int) -> Tuple[List[m.Entry], bool, int]:
        """The entries with ``seq > after``, oldest first, about *max_bytes* of them (at
        least one, unless *max_bytes* is 0), whether more are waiting, and their size.
        Those up to *after* are acknowledged and go."""
        entries = self.entries
        while entries and entries[0][0] <= after:
            entry = entries.popleft()  # _drop_oldest, inlined: once per delivered entry
            self.size -= len(entry[4]) + len(entry[3]) + m.ENTRY_OVERHEAD
        self.covered_after = max(self.covered_after, after)
        if max_bytes <= 0:
            return [], bool(entries), 0
        if self.size <= max_bytes:
            return list(entries), False, self.size
        taken, more = m.take_within(entries, max_bytes)
        return taken, more, m.size_of(taken)

    def _drop_oldest(self) -> int:
        """Drop the oldest entry; return its seq."""
        entry = self.entries.popleft()
        self.size -= len(entry[4]) + len(entry[3]) + m.ENTRY_OVERHEAD
        return entry[0]


class Waiter:
    """What a session needs of a waiting poll (implemented by ``router.http_poll.Poll``)."""

    rooms: Dict[str, Any]
    #: The poll's direct-message cursor (``private=``), or None if it asked for none.
    private: Optional[int]

    def wake(self) -> None:
        """One of ``rooms`` has news (or the session's membership changed)."""
        raise NotImplementedError

    def evict(self) -> None:
        """Answer now with what there is (too many polls are waiting)."""
        raise NotImplementedError

    def end(self, status: int, code: str, message: str) -> None:
        """Answer now with an error (the session ended or the server is stopping)."""
        raise NotImplementedError


class HttpSession(Client):
    """One browser user (one cookie). Owned by the :class:`SessionStore`; its rooms and
    username are the hub's (:attr:`record`)."""

    def __init__(self, hub: Hub, token: str, username: str, address: str = "") -> None:
        self.hub = hub
        self.token = token
        #: The per-address key it was created from (it counts against that address).
        self.address = address
        self.username = username
        #: The hub's record of this session: its username, fixed now, and its rooms.
        self.record: ClientRecord = hub.add(self, address, username)
        self.feeds: Dict[str, RoomFeed] = {}
        self.polls: List[Waiter] = []
        #: The newest direct messages from or to this session, oldest first, as the API
        #: shows them, each with its ``id`` (1, 2, ... for the session): polls read them
        #: with a cursor (``private=``), as they read rooms, so several tabs each get them
        #: all and an answer that was lost is read again. Bounded: MAX_PRIVATE_KEPT(_CHARS).
        self.private: Deque[Dict[str, Any]] = deque()
        self._private_chars = 0
        self.last_seen = time.monotonic()
        self.ended = False

    @property
    def cid(self) -> int:
        return self.record.cid

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def in_room(self, room: str) -> bool:
        """True if the shard has this session in *room*."""
        return self.record.is_member(room)

    # --- commands --------------------------------------------------------------------

    def join(self, room: str, on_done: OnDone, on_fail: OnFail) -> Optional[Refusal]:
        """Join *room*: ``on_done(entry)`` (the session's join entry) or ``on_fail``, once.
        Returns a :class:`Refusal` instead if it is refused at once (a room the session is
        in or joining: one join per room in flight, so that its outcome reaches the
        request that asked for it)."""
        return self.hub.join(self.record, room, self.username, on_done, on_fail, True)

    # --- polls -----------------------------------------------------------------------

    def add_poll(self, poll: Waiter) -> None:
        """Register a waiting poll; past ``MAX_POLLS_PER_SESSION`` the oldest answers at
        once with what it has (usually nothing)."""
        if poll in self.polls:
            return
        self.polls.append(poll)
        if len(self.polls) > MAX_POLLS_PER_SESSION:
            self.polls[0].evict()

    def remove_poll(self, poll: Waiter) -> None:
        if poll in self.polls:
            self.polls.remove(poll)
        self.touch()

    def _notify(self, room: str) -> None:
        for poll in list(self.polls):
            if room in poll.rooms:
                poll.wake()

    @property
    def private_last(self) -> int:
        """The id of the newest direct message (0: none yet). The bounds drop only the
        oldest, and never the last one, so it is always the deque's last."""
        return self.private[-1]["id"] if self.private else 0

    def private_after(self, after: int) -> Tuple[List[Dict[str, Any]], int, bool]:
        """For a poll whose direct-message cursor is *after*: the messages after it, the
        new cursor, and whether some it had not read are gone (dropped as the oldest). A
        cursor from the future (not this session's) reads from the start."""
        if after > self.private_last:
            after = 0
        messages = [message for message in self.private if message["id"] > after]
        first = self.private[0]["id"] if self.private else self.private_last + 1
        return messages, self.private_last, after < first - 1

    def end_polls(self, status: int, code: str, message: str) -> None:
        for poll in list(self.polls):
            poll.end(status, code, message)

    # --- hub callbacks ---------------------------------------------------------------

    def deliver(self, room: str, entry: m.Entry, wire: bytes) -> None:
        feed = self.feeds.get(room)
        if feed is not None:
            feed.push(entry)
            self._notify(room)

    def deliver_private(self, room: str, event: m.Event) -> None:
        _, _, _, _, sender, to, ts, after, text, _ = event
        message = {"id": self.private_last + 1, "room": room, "type": "private", "from": sender,
                   "to": to, "text": text, "ts": round(ts, 3), "after": after}  # fmt: skip
        self.private.append(message)
        self._private_chars += len(text)
        while len(self.private) > MAX_PRIVATE_KEPT or (
            self._private_chars > MAX_PRIVATE_KEPT_CHARS and len(self.private) > 1
        ):
            self._private_chars -= len(self.private.popleft()["text"])
        for poll in list(self.polls):
            if poll.private is not None:
                poll.wake()

    def on_joined(self, room: str, entry: m.Entry) -> None:
        feed = self.feeds[room] = RoomFeed(self.hub.epoch_of(room), entry[0] - 1)
        feed.push(entry)
        self._notify(room)

    def on_left(self, room: str) -> None:
        self.feeds.pop(room, None)
        self._notify(room)

    def on_refused(self, op: int, refusal: Refusal) -> None:
        log.debug("session %d: %s refused: %s", self.cid, op, refusal.code)

    def on_room_lost(self, room: str) -> None:
        # The room is gone from under us (its shard was given up on).
        self.feeds.pop(room, None)
        self._notify(room)

    def on_room_notice(self, room: str, text: str) -> None:
        feed = self.feeds.get(room)
        if feed is not None:
            if len(feed.notices) >= MAX_ROOM_NOTICES:
                del feed.notices[0]  # the newest ones count
            feed.notices.append(text)
            self._notify(room)

    def on_room_restarted(self, room: str) -> None:
        # The shard restarted and put us back silently; its history (and seq) starts over.
        self.feeds[room] = RoomFeed(self.hub.epoch_of(room), 0)
        self._notify(room)

    def on_shutdown(self) -> None:
        self.end_polls(503, errors.SHUTTING_DOWN, "the server is shutting down")


class SessionStore:
    """Every browser session of this router, by token; expires idle ones.

    A session is idle when no poll of it is waiting and it has made no request for *ttl*
    seconds; it then leaves every room (``hub.drop``), so the other members hear it left.
    The sweeper runs only while there are sessions.
    """

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop, ttl: float) -> None:
        self.hub = hub
        self.loop = loop
        self.ttl = ttl
        self.sessions: Dict[str, HttpSession] = {}
        #: What tokens start with: ``r<index>.`` in a router tier (router/siblings.py).
        self.token_prefix = ""
        self._sweeper: Optional[asyncio.TimerHandle] = None

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, token: Optional[str]) -> Optional[HttpSession]:
        """The live session with *token* (marked as seen), or None."""
        session = self.sessions.get(token) if token else None
        if session is not None:
            session.touch()
        return session

    def create(self, username: str, address: str = "") -> HttpSession:
        """A new session for *username*, registered with the hub. The caller has checked
        the caps (``MAX_HTTP_SESSIONS``, and counted it for *address* with
        ``hub.addresses.session_refusal``); :meth:`end` gives the address's slot back."""
        token = self.token_prefix + secrets.token_urlsafe(32)
        session = HttpSession(self.hub, token, username, address)
        self.sessions[token] = session
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._interval(), self._sweep)
        return session

    def end(self, session: HttpSession, status: int = 401, code: str = "no_session") -> None:
        """Remove *session*: it leaves every room; its waiting polls answer *status*."""
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.token, None)
        self.hub.addresses.session_ended(session.address)
        session.end_polls(status, code, "the session has ended")
        self.hub.drop(session.record)

    def _interval(self) -> float:
        return min(1.0, max(0.05, self.ttl / 4))

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.ttl
        expired = [s for s in self.sessions.values() if not s.polls and s.last_seen < deadline]
        for session in expired:
            log.info("session of %s expired (no poll for %.0fs)", session.username, self.ttl)
            self.end(session)
        if self.sessions:
            self._sweeper = self.loop.call_later(self._interval(), self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
