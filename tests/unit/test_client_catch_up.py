"""Unit tests for the chat client's coming back: the greeting check, the back-off, the
last seq seen per room (``RoomTracker``) and what a catch-up shows (``catch_up_report``).
No sockets, no threads."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from the checkout
    sys.path.insert(0, str(ROOT))

from scripts.chat_client import (  # noqa: E402
    RECONNECT_FIRST_DELAY_SECONDS,
    RECONNECT_MAX_DELAY_SECONDS,
    HistoryKind,
    RoomEvent,
    RoomTracker,
    TrackOutcome,
    catch_up_report,
    greeting_problem,
    live_event,
    parse_history_line,
    reconnect_delay,
)

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc
START = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
NOT_SHARDCHAT = "is the port right? the line protocol is on 5000 by default"


def stamp(seconds: float) -> str:
    """The server's timestamp ``seconds`` after START."""
    moment = START + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def event(seq: int, user: str, text: str, at: float) -> RoomEvent:
    return RoomEvent(user, text, seq, stamp(at))


def history(seq: int, user: str, text: str, at: float, room: str = "lobby") -> str:
    return f"HISTORY {room} {seq} {stamp(at)} {user} {text}"


# --------------------------------------------------------------------------- greeting


@pytest.mark.parametrize(
    ("line", "closed", "problem"),
    [
        ("INFO welcome to shardchat; commands: JOIN <room> <username>, ...", False, None),
        ("INFO welcome to shardchat", False, None),
        ("ERROR server full", False, "the server refused the connection: server full"),
        (
            "HTTP/1.1 408 Request Timeout",
            False,
            f"this is not a shardchat server (it answered 'HTTP/1.1 408 Request Timeout'): "
            f"{NOT_SHARDCHAT}",
        ),
        (
            "x" * 100,
            False,
            f"this is not a shardchat server (it answered '{'x' * 60}...'): {NOT_SHARDCHAT}",
        ),
        (
            "\x1b[2Jgotcha",
            False,
            f"this is not a shardchat server (it answered '\\x1b[2Jgotcha'): {NOT_SHARDCHAT}",
        ),
        (
            "INFO hello",
            False,
            f"this is not a shardchat server (it answered 'INFO hello'): {NOT_SHARDCHAT}",
        ),
        (
            None,
            False,
            f"this is not a shardchat server (it said nothing within 3 s): {NOT_SHARDCHAT}",
        ),
        (
            None,
            True,
            "this is not a shardchat server (it closed the connection without a word): "
            + NOT_SHARDCHAT,
        ),
    ],
    ids=[
        "welcome",
        "bare-welcome",
        "full",
        "http",
        "long",
        "escape",
        "other-info",
        "silent",
        "closed",
    ],
)
def test_greeting_problem(line: str | None, closed: bool, problem: str | None) -> None:
    assert greeting_problem(line, closed=closed) == problem


# --------------------------------------------------------------------------- back-off


def test_reconnect_delay_doubles_from_the_first_and_stops_at_the_cap() -> None:
    longest = [reconnect_delay(attempt, rand=lambda: 0.999999) for attempt in range(8)]
    assert longest[0] == pytest.approx(RECONNECT_FIRST_DELAY_SECONDS, rel=1e-3)
    assert longest[1] == pytest.approx(2 * RECONNECT_FIRST_DELAY_SECONDS, rel=1e-3)
    assert longest == sorted(longest)
    assert longest[-1] == pytest.approx(RECONNECT_MAX_DELAY_SECONDS, rel=1e-3)


@pytest.mark.parametrize("attempt", [0, 5, 6, 100, 10**6])
@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999])
def test_reconnect_delay_never_passes_the_cap_and_keeps_half_of_it(
    attempt: int, rand: float
) -> None:
    delay = reconnect_delay(attempt, rand=lambda: rand)
    doubled = RECONNECT_FIRST_DELAY_SECONDS * 2 ** min(attempt, 32)
    wanted = min(RECONNECT_MAX_DELAY_SECONDS, doubled)
    assert wanted / 2 <= delay <= wanted <= RECONNECT_MAX_DELAY_SECONDS


# --------------------------------------------------------------------------- live events


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MSG lobby alice hi  there ", ("lobby", RoomEvent("alice", "hi  there "))),
        ("INFO joined room lobby", ("lobby", RoomEvent("*", "bob joined lobby"))),
        ("INFO left room lobby", ("lobby", RoomEvent("*", "bob left lobby"))),
        ("INFO alice joined lobby", ("lobby", RoomEvent("*", "alice joined lobby"))),
        ("INFO alice left lobby", ("lobby", RoomEvent("*", "alice left lobby"))),
        ("INFO joined joined room", ("room", RoomEvent("*", "joined joined room"))),
        ("INFO room lobby restarted, history lost", None),
        ("INFO server shutting down", None),
        ("INFO bye", None),
        ("INFO welcome to shardchat; commands: JOIN <room> <username>", None),
        ("NAMES lobby alice bob", None),
        ("ERROR name taken in lobby", None),
        ("MSG lobby alice", None),
        (history(3, "alice", "hi", 1), None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_live_event_is_one_of_the_rooms_history_entries(line: str, expected: object) -> None:
    assert live_event(line, "bob") == expected


def test_parse_history_line() -> None:
    assert parse_history_line(history(7, "alice", "hi there", 2)) == (
        "lobby",
        event(7, "alice", "hi there", 2),
    )
    assert parse_history_line(history(1, "*", "bob joined lobby", 0)) == (
        "lobby",
        event(1, "*", "bob joined lobby", 0),
    )
    assert parse_history_line("HISTORY lobby x now alice hi") is None
    assert parse_history_line("HISTORY lobby 3") is None


# --------------------------------------------------------------------------- the tracker


def joined(tracker: RoomTracker, room: str = "lobby", seq: int = 1, at: float = 0) -> None:
    """Feed ``tracker`` bob's confirmed JOIN and the answer to its silent HISTORY R 1."""
    outcome = tracker.on_line(f"INFO joined room {room}")
    assert outcome == TrackOutcome(send=((f"HISTORY {room} 1", HistoryKind.PROBE),))
    tracker.sent(room, HistoryKind.PROBE)
    assert tracker.on_line(history(seq, "*", f"bob joined {room}", at, room)).hide
    assert tracker.on_line(f"END HISTORY {room} 1") == TrackOutcome(hide=True)


def test_the_probe_after_a_join_is_hidden_and_gives_the_seq() -> None:
    tracker = RoomTracker("bob")
    joined(tracker, seq=41, at=3)
    assert tracker.last_seen("lobby") == event(41, "*", "bob joined lobby", 3)


def test_live_events_count_the_seq_up_one_each() -> None:
    tracker = RoomTracker("bob")
    joined(tracker, seq=5)
    for line in ("MSG lobby alice one", "INFO carol joined lobby", "INFO carol left lobby"):
        assert tracker.on_line(line) == TrackOutcome()
    assert tracker.on_line("MSG lobby alice two") == TrackOutcome()
    assert tracker.last_seen("lobby") == RoomEvent("alice", "two", 9)
    assert tracker.on_line("MSG dev alice elsewhere") == TrackOutcome()  # not in dev
    assert tracker.last_seen("dev") is None


def test_events_before_the_probes_answer_are_in_it() -> None:
    tracker = RoomTracker("bob")
    tracker.on_line("INFO joined room lobby")
    tracker.sent("lobby", HistoryKind.PROBE)
    tracker.on_line("MSG lobby alice quick")  # counted by the answer, not here
    tracker.on_line(history(8, "alice", "quick", 1))
    tracker.on_line("END HISTORY lobby 1")
    assert tracker.last_seen("lobby") == event(8, "alice", "quick", 1)


def test_the_users_history_is_shown_and_corrects_the_seq() -> None:
    tracker = RoomTracker("bob")
    joined(tracker, seq=2)
    tracker.on_line("MSG lobby alice x")
    tracker.sent("lobby", HistoryKind.SHOWN)
    assert tracker.on_line(history(2, "*", "bob joined lobby", 0)) == TrackOutcome()
    assert tracker.on_line(history(3, "alice", "x", 1)) == TrackOutcome()
    assert tracker.on_line("END HISTORY lobby 2") == TrackOutcome()
    assert tracker.last_seen("lobby") == event(3, "alice", "x", 1)


def test_history_lines_nobody_asked_for_are_shown() -> None:
    tracker = RoomTracker("bob")
    assert tracker.on_line(history(1, "alice", "x", 0)) == TrackOutcome()
    assert tracker.on_line("END HISTORY lobby 1") == TrackOutcome()


def test_an_error_for_the_probe_leaves_the_seq_unknown_and_the_queue_in_step() -> None:
    tracker = RoomTracker("bob")
    tracker.on_line("INFO joined room lobby")
    tracker.sent("lobby", HistoryKind.PROBE)
    tracker.sent("lobby", HistoryKind.SHOWN)
    tracker.answered_by_error("lobby")  # ERROR room busy, try again
    assert tracker.on_line(history(4, "alice", "x", 0)) == TrackOutcome()  # the SHOWN one
    assert tracker.on_line("END HISTORY lobby 1") == TrackOutcome()
    assert tracker.last_seen("lobby") == event(4, "alice", "x", 0)


def test_a_room_restart_forgets_the_seq_and_asks_again() -> None:
    tracker = RoomTracker("bob")
    joined(tracker, seq=30)
    outcome = tracker.on_line("INFO room lobby restarted, history lost")
    assert outcome.send == (("HISTORY lobby 1", HistoryKind.PROBE),)
    assert not outcome.hide
    assert tracker.last_seen("lobby") is None
    tracker.on_line("MSG lobby alice uncounted")
    assert tracker.last_seen("lobby") is None


def test_leaving_forgets_the_room() -> None:
    tracker = RoomTracker("bob")
    joined(tracker)
    tracker.on_line("INFO left room lobby")
    assert tracker.last_seen("lobby") is None


def test_after_a_loss_the_rejoin_asks_for_the_whole_history_and_reports() -> None:
    tracker = RoomTracker("bob", UTC)
    joined(tracker, seq=1, at=0)
    tracker.on_line("MSG lobby alice seen")  # seq 2
    tracker.connection_lost(["lobby"])
    assert tracker.last_seen("lobby") is None
    tracker.rejoining("lobby", away_seconds=5)
    outcome = tracker.on_line("INFO joined room lobby")
    assert outcome.send == (("HISTORY lobby", HistoryKind.CATCH_UP),)
    tracker.sent("lobby", HistoryKind.CATCH_UP)
    reply = [
        history(1, "*", "bob joined lobby", 0),
        history(2, "alice", "seen", 1),
        history(3, "*", "bob left lobby", 2),
        history(4, "alice", "missed", 4),
        history(5, "*", "bob joined lobby", 8),
    ]
    assert all(tracker.on_line(line).hide for line in reply)
    outcome = tracker.on_line("END HISTORY lobby 5")
    assert outcome.hide
    assert outcome.show == (
        "~ [lobby] missed while you were away: 2 events",
        "~ [lobby] 10:00 * bob left lobby",
        "~ [lobby] 10:00 alice: missed",
    )
    assert tracker.last_seen("lobby") == event(5, "*", "bob joined lobby", 8)
    # The next reconnect is a plain join again: a probe, not a catch-up.
    tracker.on_line("INFO left room lobby")
    assert tracker.on_line("INFO joined room lobby").send[0][1] is HistoryKind.PROBE


# --------------------------------------------------------------------------- catch-up


REJOIN_AT = 100.0  # the rejoin's server time in these examples


def rejoin(seq: int) -> RoomEvent:
    return event(seq, "*", "bob joined lobby", REJOIN_AT)


def report(before: RoomEvent | None, reply: list[RoomEvent], away: float = 10.0) -> list[str]:
    return catch_up_report("lobby", "bob", before, reply, away, UTC)


STARTED_OVER = (
    "! [lobby] the room's history started over while you were away (the server restarted): "
    "what was said meanwhile is lost"
)


def test_catch_up_shows_what_came_after_the_last_seen_and_before_the_rejoin() -> None:
    before = RoomEvent("alice", "seen", 2)  # live: no time
    reply = [
        event(1, "*", "bob joined lobby", 0),
        event(2, "alice", "seen", 80),
        event(3, "carol", "missed", 95),
        rejoin(4),
        event(5, "carol", "after, and shown live", 101),
    ]
    assert report(before, reply) == [
        "~ [lobby] missed while you were away: 1 event",
        "~ [lobby] 10:01 carol: missed",
    ]


def test_catch_up_with_nothing_missed_says_so() -> None:
    before = event(2, "alice", "seen", 80)
    reply = [event(1, "*", "bob joined lobby", 0), event(2, "alice", "seen", 80), rejoin(3)]
    assert report(before, reply) == ["~ [lobby] nothing was missed while you were away"]


def test_catch_up_when_the_one_seen_has_just_dropped_out_of_the_history() -> None:
    before = RoomEvent("alice", "seen", 10)
    reply = [event(seq, "carol", f"n{seq}", 90) for seq in range(11, 14)] + [rejoin(14)]
    lines = report(before, reply)
    assert lines[0] == "~ [lobby] missed while you were away: 3 events"
    assert len(lines) == 4


def test_catch_up_past_the_servers_500_says_how_many_are_lost() -> None:
    before = RoomEvent("alice", "seen", 10)
    reply = [event(seq, "carol", f"n{seq}", 90) for seq in range(112, 611)] + [rejoin(611)]
    lines = report(before, reply)
    assert lines[0] == (
        "! [lobby] 101 events from while you were away are lost: the server keeps only the "
        "last 500 of a room"
    )
    assert lines[1] == "~ [lobby] missed while you were away: 499 events"
    assert lines[2].endswith("carol: n112") and lines[-1].endswith("carol: n610")


def test_catch_up_after_a_restart_with_fewer_events_than_seen() -> None:
    before = RoomEvent("alice", "seen", 7)
    reply = [event(1, "*", "alice joined lobby", 95), rejoin(2)]
    assert report(before, reply) == [
        STARTED_OVER,
        "~ [lobby] since it started over: 1 event",
        "~ [lobby] 10:01 * alice joined lobby",
    ]


def test_catch_up_after_a_restart_whose_event_at_that_seq_is_another() -> None:
    before = RoomEvent("alice", "seen", 2)
    reply = [event(1, "*", "carol joined lobby", 95), event(2, "carol", "hi", 96), rejoin(3)]
    assert report(before, reply)[0] == STARTED_OVER


def test_catch_up_after_a_restart_whose_same_looking_event_came_after_the_loss() -> None:
    # After the restart alice rejoined second again: same seq, same words, but at a time
    # when the client had already lost the connection (away 10 s, alice 1 s before bob).
    before = RoomEvent("*", "alice joined lobby", 2)
    reply = [
        event(1, "*", "carol joined lobby", 98),
        event(2, "*", "alice joined lobby", 99),
        rejoin(3),
    ]
    assert report(before, reply, away=10.0)[0] == STARTED_OVER
    # ...while the same words long before the rejoin can be the one seen.
    reply[1] = event(2, "*", "alice joined lobby", 80)
    assert report(before, reply, away=10.0) == ["~ [lobby] nothing was missed while you were away"]


def test_catch_up_compares_times_when_the_one_seen_came_from_a_history_line() -> None:
    before = event(2, "alice", "same words", 50)
    reply = [event(1, "*", "x joined lobby", 0), event(2, "alice", "same words", 51), rejoin(3)]
    assert report(before, reply)[0] == STARTED_OVER


def test_catch_up_when_the_seq_seen_was_not_known_shows_the_recent_events() -> None:
    reply = [event(1, "alice", "one", 90), rejoin(2)]
    assert report(None, reply) == [
        "~ [lobby] the room's recent events: 1 event",
        "~ [lobby] 10:01 alice: one",
    ]


def test_catch_up_escapes_control_characters() -> None:
    before = RoomEvent("alice", "seen", 1)
    reply = [event(1, "alice", "seen", 10), event(2, "eve", "\x1b[2J", 90), rejoin(3)]
    assert report(before, reply)[-1] == "~ [lobby] 10:01 eve: \\x1b[2J"
