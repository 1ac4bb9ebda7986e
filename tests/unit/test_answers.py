"""router.shards.Answers: the count of a shard's unanswered commands that decides whether a
router's next batch waits (Nagle's rule for the shard pipes)."""

from __future__ import annotations

from common import messages as m
from router.shards import Answers


def test_commands_are_unanswered_until_their_completions_come() -> None:
    answers = Answers()
    answers.sent([m.msg(1, 0.0, 7, "r", "a"), m.names(2, 0.0, 7, "r"), m.drop(0, 0.0, 8)])
    assert answers.unanswered == 2  # (req 0 completes nothing: nothing to wait for)
    chat = m.chat(0, "r", (1, 0.0, "chat", "ann", "x"), "MSG r ann x\n")
    assert not answers.answered([chat])  # an event for the room, no completion
    assert not answers.answered([m.done(1, None), chat])
    assert answers.unanswered == 1
    assert answers.answered([m.done(2, ["ann"])])
    assert answers.unanswered == 0


def test_completions_of_another_router_or_of_a_dead_shard_never_go_below_zero() -> None:
    answers = Answers()
    assert answers.answered([m.done(5, None), m.fail(-1, "x")])  # (-1: the shard's own)
    assert answers.unanswered == 0
    answers.sent([m.msg(3, 0.0, 1, "r", "a")])
    answers.reset()  # a new incarnation: the old one's commands were answered otherwise
    assert answers.unanswered == 0
