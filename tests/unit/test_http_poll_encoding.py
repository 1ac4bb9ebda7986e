"""Poll answers are built from pre-encoded message JSON; the result must be exactly the
JSON the payload describes."""

from __future__ import annotations

import json

import pytest

from common import messages as m
from router.http_poll import encode_poll_payload, message_json, message_text

ENTRIES = [
    (1, 1764116599.1234, m.KIND_JOIN, "alice", "alice joined lobby"),
    (2, 1764116600.5, m.KIND_CHAT, "alice", 'quotes " and \\ and <img src=x onerror=alert(1)>'),
    (3, 1764116601.0, m.KIND_CHAT, "zoë", "日本語 ✓"),
]


@pytest.mark.parametrize("count", [0, 1, 3], ids=["none", "one", "three"])
def test_body_is_the_payload_as_json(count: int) -> None:
    entries = ENTRIES[:count]
    payload = {
        "messages": [message_text("lobby", entry) for entry in entries],
        "rooms": {"lobby": {"after": count, "epoch": 7, "missed": False}},
        "missed": False,
        "cursors": f"lobby:{count}:7",
    }
    decoded = json.loads(encode_poll_payload(payload))
    assert decoded["messages"] == [message_json("lobby", entry) for entry in entries]
    assert {k: v for k, v in decoded.items() if k != "messages"} == {
        k: v for k, v in payload.items() if k != "messages"
    }


def test_error_and_bare_payloads() -> None:
    assert json.loads(encode_poll_payload({"error": {"code": "x", "message": "y"}})) == {
        "error": {"code": "x", "message": "y"}
    }
    assert json.loads(encode_poll_payload({"messages": []})) == {"messages": []}


def test_message_text_is_shared_between_sessions() -> None:
    # The same event delivered to many sessions is encoded once (memoised).
    assert message_text("lobby", ENTRIES[1]) is message_text("lobby", ENTRIES[1])
