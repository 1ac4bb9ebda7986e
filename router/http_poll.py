"""Long polls: cursors in, room events out, with an explicit flag for every gap.

A poll names one or more rooms, each with a *cursor*: ``after`` (the last ``id`` the client
has, i.e. the room's ``seq``) and optionally the ``epoch`` it was read in (the owning
shard's restart count). For each room the poll answers from the session's
:class:`~router.http_session.RoomFeed` when the feed covers the cursor, and otherwise asks
the shard (``SINCE``). When a room's answer cannot continue the client's stream without a
hole (the cursor is older than the shard's history, or from another epoch, or from the
future) the room is marked ``missed`` and the answer is everything still available. With
nothing new, the poll waits (woken by the session) up to the poll timeout.

An answer holds about ``max_bytes`` of messages at most (``MAX_POLL_ANSWER_BYTES``, rooms
in the order polled); a room with more waiting says ``"more": true`` and its cursor stops at
the last message sent, so the next poll goes on from there. Shard fetches ask for their
share of the same budget, so one poll never makes the router hold more than about that.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from common import errors
from common import messages as m
from common.errors import Refusal
from common.limits import MAX_POLL_ANSWER_BYTES, MAX_ROOMS_PER_CLIENT, POLL_LINGER
from common.names import NameRefusal, check_room
from router.http_session import HttpSession, RoomFeed, Waiter
from router.hub import Hub

log = logging.getLogger(__name__)

#: ``respond(status, payload, headers)``: the poll's answer (a JSON object, or an error
#: object) with any extra headers (``Retry-After``).
Respond = Callable[[int, Dict[str, Any], Tuple[Tuple[str, str], ...]], None]
#: ``charge()``: take one token of the session's flood control for a poll that must ask
#: the shards at once; None to go on, or the seconds to wait (the poll answers ``429``).
Charge = Callable[[], Optional[float]]


class Cursor(NamedTuple):
    room: str
    after: int
    epoch: Optional[int]


class RoomResult(NamedTuple):
    entries: List[m.Entry]
    after: int
    epoch: int
    missed: bool = False
    first: Optional[int] = None
    left: bool = False
    more: bool = False  # entries after these are waiting (the answer was full)
    notices: Tuple[str, ...] = ()  # lines for the room's members (see RoomFeed.notices)


def _take(feed: RoomFeed) -> Tuple[str, ...]:
    """The notices *feed* holds (for this answer), leaving none."""
    if not feed.notices:
        return ()
    notices, feed.notices = tuple(feed.notices), []
    return notices


def _number(text: str) -> Optional[int]:
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def _cursor(room: str, after: str, epoch: Optional[str]) -> Union[Cursor, str]:
    checked = check_room(room)
    if isinstance(checked, NameRefusal):
        return f"{checked.message} (in cursor {room!r})"
    room = checked
    seq = _number(after) if after else 0
    if seq is None:
        return f"after must be a whole number, got {after!r}"
    number = None
    if epoch:
        number = _number(epoch)
        if number is None:
            return f"epoch must be a whole number, got {epoch!r}"
    return Cursor(room, seq, number)


#: The query parameters of a poll.
_POLL_PARAMETERS = ("room", "after", "epoch", "cursors", "private")


def parse_private(query: Dict[str, List[str]]) -> Union[Optional[int], str]:
    """The poll's direct-message cursor (``private=N``: the last direct message id the
    client has; 0 for none yet), None if it asks for no direct messages, or a message
    saying what is wrong."""
    values = query.get("private")
    if values is None:
        return None
    number = _number(values[0]) if len(values) == 1 else None
    if number is None:
        return f"private must be a whole number, once, got {values!r}"
    return number


def parse_cursors(query: Dict[str, List[str]]) -> Union[List[Cursor], str]:
    """The cursors of a poll's query string (already split with ``parse_qs``): either
    ``room=R&after=N[&epoch=E]`` or ``cursors=R1:N1[:E1],R2:N2[:E2]``, each parameter at
    most once (other parameters, e.g. a cache buster, are ignored). Returns the list, or a
    message saying what is wrong."""
    for name in _POLL_PARAMETERS:
        if len(query.get(name, ())) > 1:
            return f"{name}= may be given once"
    single = query.get("room")
    several = query.get("cursors")
    if (single is None) == (several is None):
        return "give either room= (with after=) or cursors="
    if single is not None:
        epoch = query.get("epoch", [None])
        return _single(single[0], query.get("after", [""])[0], epoch[0])
    assert several is not None
    if "after" in query or "epoch" in query:
        return "after= and epoch= go with room=; cursors= carries its own"
    return _several(several[0])


def _single(room: str, after: str, epoch: Optional[str]) -> Union[List[Cursor], str]:
    cursor = _cursor(room, after, epoch)
    return cursor if isinstance(cursor, str) else [cursor]


def _several(text: str) -> Union[List[Cursor], str]:
    items = [item for item in text.split(",") if item]
    if not items:
        return "cursors= names no room"
    if len(items) > MAX_ROOMS_PER_CLIENT:
        return f"at most {MAX_ROOMS_PER_CLIENT} cursors"
    cursors: List[Cursor] = []
    for item in items:
        parts = item.split(":")
        if not 1 <= len(parts) <= 3:
            return f"a cursor is room:after[:epoch], got {item!r}"
        cursor = _cursor(parts[0], parts[1] if len(parts) > 1 else "", (parts + [None])[2])
        if isinstance(cursor, str):
            return cursor
        cursors.append(cursor)
    if len({cursor.room for cursor in cursors}) != len(cursors):
        return "a room appears twice in cursors="
    return cursors


def message_json(room: str, entry: m.Entry) -> Dict[str, Any]:
    """One room event as the API shows it."""
    seq, ts, kind, username, text = entry
    return {
        "id": seq,
        "room": room,
        "username": username,
        "text": text,
        "type": "chat" if kind == m.KIND_CHAT else "info",
        "kind": kind,
        "ts": round(ts, 3),
    }


@functools.lru_cache(maxsize=8192)
def _message_text(room: str, seq: int, ts: float, kind: str, username: str, text: str) -> str:
    # One room event goes to every session in the room: encode it once, not per poller.
    return json.dumps(
        message_json(room, (seq, ts, kind, username, text)),
        ensure_ascii=False,
        separators=(",", ":"),
    )


def message_text(room: str, entry: m.Entry) -> str:
    """:func:`message_json` as JSON text (memoised across sessions)."""
    return _message_text(room, *entry)


def poll_payload(cursors: List[Cursor], results: Dict[str, RoomResult]) -> Dict[str, Any]:
    """The answer of a poll: messages (room by room, oldest first), per-room state, and the
    cursors string to send back. The messages are already JSON text (see
    :func:`message_text`); :func:`encode_poll_payload` makes the body."""
    messages: List[str] = []
    rooms: Dict[str, Dict[str, Any]] = {}
    tokens: List[str] = []
    for cursor in cursors:
        result = results[cursor.room]
        messages.extend(message_text(cursor.room, entry) for entry in result.entries)
        state: Dict[str, Any] = {
            "after": result.after,
            "epoch": result.epoch,
            "missed": result.missed,
        }
        if result.first is not None:
            state["first"] = result.first
        if result.more:
            state["more"] = True
        if result.notices:
            state["notices"] = list(result.notices)
        if result.left:
            state["left"] = True
        else:
            tokens.append(f"{cursor.room}:{result.after}:{result.epoch}")
        rooms[cursor.room] = state
    payload: Dict[str, Any] = {
        "messages": messages,
        "rooms": rooms,
        "missed": any(state["missed"] for state in rooms.values()),
        "more": any(state.get("more", False) for state in rooms.values()),
        "cursors": ",".join(tokens),
    }
    if len(cursors) == 1:
        payload["epoch"] = rooms[cursors[0].room]["epoch"]
    return payload


def encode_poll_payload(payload: Dict[str, Any]) -> bytes:
    """The JSON body of a poll answer (or of an error: a payload without messages)."""
    if "messages" not in payload:
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    rest = {key: value for key, value in payload.items() if key != "messages"}
    tail = json.dumps(rest, ensure_ascii=False, separators=(",", ":"))[1:]
    head = '{"messages":[' + ",".join(payload["messages"]) + "]"
    return (head + ("," + tail if tail != "}" else tail)).encode()


class Poll(Waiter):
    """One ``GET /api/poll`` of a session: answers at once if there is anything to say,
    otherwise waits on the session until news, the timeout, or cancellation."""

    def __init__(
        self,
        hub: Hub,
        session: HttpSession,
        cursors: List[Cursor],
        timeout: float,
        respond: Respond,
        max_bytes: int = MAX_POLL_ANSWER_BYTES,
        charge: Optional[Charge] = None,
        private: Optional[int] = None,
    ) -> None:
        self.hub = hub
        #: The direct-message cursor (None: this poll asked for none).
        self.private = private
        self.session = session
        # A poll answered from the shards at once (a cursor its feed does not cover: after=0,
        # an old or foreign one) costs the router a fetch and an answer however often it is
        # asked, unlike one that waits for news; so such a poll takes a flood-control token.
        self._charge = charge
        self.cursors = cursors
        self.rooms: Dict[str, Cursor] = {cursor.room: cursor for cursor in cursors}
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._respond = respond
        self._timer: Optional[asyncio.TimerHandle] = None
        self._wake_scheduled = False
        self._fetching = False
        self._budget_left = max_bytes  # what the feeds left of max_bytes (see _collect)
        self.finished = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._run()

    def wake(self) -> None:
        if not (self.finished or self._wake_scheduled or self._fetching):
            self._wake_scheduled = True
            # Not at once: everything that arrives meanwhile goes in the same answer.
            self.hub.loop.call_later(POLL_LINGER, self._run)

    def cancel(self) -> None:
        """The client went away: stop waiting, answer nothing."""
        if not self.finished:
            self._stop()

    def end(
        self, status: int, code: str, message: str, headers: Tuple[Tuple[str, str], ...] = ()
    ) -> None:
        if not self.finished:
            self._stop()
            self._respond(status, {"error": {"code": code, "message": message}}, headers)

    def _stop(self) -> None:
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.session.remove_poll(self)

    def _finish(self, results: Dict[str, RoomResult]) -> None:
        self._stop()
        # The notices go with the answer that is sent, not with one that was only built
        # (a 429, a failed fetch): taken here, as it goes.
        feeds = self.session.feeds
        for room, result in results.items():
            feed = feeds.get(room)
            if feed is not None and feed.notices and not result.left:
                results[room] = result._replace(notices=_take(feed))
        payload = poll_payload(self.cursors, results)
        if self.private is not None:
            messages, after, missed = self.session.private_after(self.private)
            payload["private"] = messages
            payload["private_after"] = after
            payload["private_missed"] = missed
        self._respond(200, payload, ())

    def _notices_waiting(self) -> bool:
        """True if notices of the polled rooms, or direct messages after the poll's cursor,
        wait for an answer."""
        feeds = self.session.feeds
        return any(
            feed is not None and feed.notices
            for feed in (feeds.get(cursor.room) for cursor in self.cursors)
        ) or (self.private is not None and self.private != self.session.private_last)

    def evict(self) -> None:
        self._answer_now()

    def _on_timeout(self) -> None:
        self._timer = None
        self._answer_now()

    def _answer_now(self) -> None:
        """Answer with what there is, even nothing (timeout, eviction)."""
        if self.finished or self._fetching:
            return
        results, fetches = self._collect()
        if fetches:
            self._fetch(results, fetches)
        else:
            self._finish(results)

    # --- evaluation ------------------------------------------------------------------

    def _run(self) -> None:
        self._wake_scheduled = False
        if self.finished:
            return
        results, fetches = self._collect()
        charge, self._charge = self._charge, None  # only the first look at the cursors
        if fetches and charge is not None:
            wait = charge()
            if wait is not None:
                retry = str(max(1, int(wait + 0.999)))
                self.hub.metrics.throttled("http")
                self.end(429, "rate_limited", "too many requests", (("Retry-After", retry),))
                return
        if fetches:
            self._fetch(results, fetches)
        elif any(r.entries or r.missed or r.left or r.more for r in results.values()):
            self._finish(results)
        elif self._notices_waiting():
            self._finish(results)
        else:
            self.session.add_poll(self)
            if self._timer is None:
                self._timer = self.hub.loop.call_later(self.timeout, self._on_timeout)

    def _collect(self) -> Tuple[Dict[str, RoomResult], List[Tuple[Cursor, int, bool]]]:
        """What the session's feeds can answer (within the byte budget, which then goes
        down by what they used), and the ``(cursor, after, forced_missed)`` rooms that need
        the shard."""
        session = self.session
        results: Dict[str, RoomResult] = {}
        fetches: List[Tuple[Cursor, int, bool]] = []
        budget = self.max_bytes
        for cursor in self.cursors:
            room = cursor.room
            epoch = self.hub.epoch_of(room)
            feed = session.feeds.get(room)
            if feed is None or not session.in_room(room):
                results[room] = RoomResult([], cursor.after, epoch, left=True)
            elif cursor.epoch not in (None, epoch) or feed.epoch != epoch:
                fetches.append((cursor, 0, True))  # another epoch: its seqs mean nothing now
            elif cursor.after > feed.last_seq:
                fetches.append((cursor, 0, True))  # from the future: from before a restart
            elif not feed.covers(cursor.after):
                fetches.append((cursor, cursor.after, False))
            else:
                entries, more, used = feed.take_after(cursor.after, budget)
                budget -= used
                after = entries[-1][0] if entries else cursor.after
                results[room] = RoomResult(entries, after, epoch, more=more)
        self._budget_left = budget
        return results, fetches

    def _fetch(
        self, results: Dict[str, RoomResult], fetches: List[Tuple[Cursor, int, bool]]
    ) -> None:
        self._fetching = True
        remaining = len(fetches)
        failures: List[Refusal] = []
        # Each fetch gets its share of what the feeds left (the shard sends at least one).
        share = max(1, self._budget_left // len(fetches))

        def fetched(cursor: Cursor, after: int, forced: bool, result: Any) -> None:
            try:
                one_fetched(cursor, after, forced, result)
            except Exception:  # runs inside the hub's event handling: never let it escape
                log.error("error answering a poll", exc_info=True)
                self.end(500, "internal_error", "internal error")

        def one_fetched(cursor: Cursor, after: int, forced: bool, result: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if isinstance(result, Refusal):
                if result.code == errors.NOT_IN_ROOM:
                    epoch = self.hub.epoch_of(cursor.room)
                    results[cursor.room] = RoomResult([], cursor.after, epoch, left=True)
                else:
                    failures.append(result)
            else:
                results[cursor.room] = self._since_result(cursor, after, forced, result, share)
            if remaining == 0:
                self._fetching = False
                self._fetched(results, failures)

        for cursor, after, forced in fetches:
            # One handler for both outcomes: each fetch must count once towards the answer.
            handler = functools.partial(fetched, cursor, after, forced)
            self.hub.since(self.session.record, cursor.room, after, share, handler, handler)

    def _fetched(self, results: Dict[str, RoomResult], failures: List[Refusal]) -> None:
        if self.finished:
            return
        if failures:
            code = failures[0].code
            self.end(503, code, f"a shard did not answer ({code}); try again")
        else:
            self._finish(results)

    def _since_result(
        self,
        cursor: Cursor,
        after: int,
        forced: bool,
        result: Tuple[Any, int, int, int],
        max_bytes: int,
    ) -> RoomResult:
        entries, first, last, _epoch = result
        entries = list(entries)
        more = bool(entries) and entries[-1][0] < last  # the shard kept to its share
        feed = self.session.feeds.get(cursor.room)
        if feed is not None and not more:
            # Events that reached the session after the shard answered are not in `entries`.
            newer = [entry for entry in feed.entries if entry[0] > last]
            if newer:
                left = max_bytes - m.size_of(entries)
                extra, more = m.take_within(newer, left) if left > 0 else ([], True)
                entries.extend(extra)
        missed = forced or after < first - 1
        new_after = entries[-1][0] if entries else (after if not forced else last)
        epoch = self.hub.epoch_of(cursor.room)
        return RoomResult(entries, new_after, epoch, missed=missed, first=first, more=more)
