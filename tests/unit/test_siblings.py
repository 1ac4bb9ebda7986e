"""router/siblings.py: tokens, and the sibling port refusing what does not show the secret."""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct

import pytest

from router import siblings
from router.siblings import Siblings, owner_of, serve_siblings, token_prefix


@pytest.mark.parametrize(
    ("token", "owner"),
    [("r0.abc", 0), ("r12.x-y_z", 12), ("abc", None), ("r.x", None), ("rx.y", None), ("", None),
     (None, None), ("r12345.x", None)],
)  # fmt: skip
def test_owner_of(token: object, owner: object) -> None:
    assert owner_of(token) == owner  # type: ignore[arg-type]


def test_foreign_owner_is_another_router_of_the_tier() -> None:
    tier = Siblings(1, [1000, 1001, 1002], b"s")
    assert tier.foreign_owner(token_prefix(1) + "x") is None  # ours
    assert tier.foreign_owner(token_prefix(2) + "x") == 2
    assert tier.foreign_owner(token_prefix(3) + "x") is None  # no such router


def run(coroutine):  # noqa: ANN001, ANN201
    return asyncio.run(coroutine)


def test_a_hop_without_the_secret_is_closed_and_nothing_is_handled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(siblings, "FIRST_FRAME_TIMEOUT", 0.5)
    handled = []

    async def scenario() -> bytes:
        sock = socket.create_server(("127.0.0.1", 0))
        server = await serve_siblings(sock, b"S" * 32, lambda *args: handled.append(args))
        port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A frame announcing 8 MiB, no secret: refused on its first 32 bytes.
        writer.write(struct.pack("!I", 8 << 20) + b"x" * 28)
        closed = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return closed

    assert run(scenario()) == b""
    assert handled == []


def test_a_forwarded_request_is_answered_and_the_hop_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = b"K" * 32

    def handle(request, address, https, respond):  # noqa: ANN001, ANN202
        respond(("answer", request, address, https))
        return lambda: None

    async def scenario() -> tuple:
        sock = socket.create_server(("127.0.0.1", 0))
        server = await serve_siblings(sock, secret, handle)
        tier = Siblings(0, [0, sock.getsockname()[1]], secret)
        first = await tier.forward(1, "req1", "10.0.0.1", True)
        second = await tier.forward(1, "req2", "10.0.0.2", False)
        kept = len(tier._idle[1])
        tier.close()
        server.close()
        await asyncio.sleep(0.05)  # the hop's end reaches the server
        return first, second, kept

    first, second, kept = run(scenario())
    assert first == ("answer", "req1", "10.0.0.1", True)
    assert second == ("answer", "req2", "10.0.0.2", False)
    assert kept == 1  # one hop, reused


def test_an_owner_that_does_not_answer_in_time_gives_no_answer() -> None:
    async def scenario() -> object:
        sock = socket.create_server(("127.0.0.1", 0))  # listening, never accepting
        tier = Siblings(0, [0, sock.getsockname()[1]], b"K" * 32, answer_timeout=0.3)
        answer = await tier.forward(1, "req", "10.0.0.1", False)
        sock.close()
        return answer

    assert run(scenario()) is siblings.NO_ANSWER  # not "gone": it may have applied it


def test_an_owner_that_is_gone_gives_none() -> None:
    async def scenario() -> object:
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens: refused
        tier = Siblings(0, [0, port], b"K" * 32)
        return await tier.forward(1, "req", "10.0.0.1", False)

    assert run(scenario()) is None


def test_a_router_given_up_on_is_no_longer_forwarded_to() -> None:
    tier = Siblings(0, [1000, 1001, 1002], b"s")
    assert tier.foreign_owner(token_prefix(2) + "x") == 2
    tier.lost(2)
    assert tier.foreign_owner(token_prefix(2) + "x") is None  # answered here: unknown
    assert tier.foreign_owner(token_prefix(1) + "x") == 1


def test_a_request_the_owner_took_and_did_not_answer_in_time_is_not_sent_again() -> None:
    secret = b"K" * 32
    handled = []

    def handle(request, address, https, respond):  # noqa: ANN001, ANN202
        handled.append(request)
        if request == "first":
            respond("ok")  # the hop is kept for reuse; "second" is taken and never answered
        return lambda: None

    async def scenario() -> tuple:
        sock = socket.create_server(("127.0.0.1", 0))
        server = await serve_siblings(sock, secret, handle)
        tier = Siblings(0, [0, sock.getsockname()[1]], secret, answer_timeout=0.3)
        first = await tier.forward(1, "first", "10.0.0.1", False)
        second = await tier.forward(1, "second", "10.0.0.1", False)
        await asyncio.sleep(0.2)  # a second attempt, if any, would reach the handler
        tier.close()
        server.close()
        return first, second

    first, second = run(scenario())
    assert (first, second) == ("ok", siblings.NO_ANSWER)
    assert handled == ["first", "second"]  # once each: a timeout is not a closed hop


def test_a_reused_hop_found_closed_sends_the_request_on_a_new_one() -> None:
    secret = b"K" * 32
    received = []

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request per hop, then drops the hop (as a restarted owner's are).
        assert await reader.readexactly(len(secret)) == secret
        request = pickle.loads(await siblings.read_frame(reader))[0]
        received.append(request)
        writer.write(siblings.frame(pickle.dumps(("answer", request))))
        await writer.drain()
        writer.close()

    async def scenario() -> tuple:
        server = await asyncio.start_server(owner, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tier = Siblings(0, [0, port], secret)
        first = await tier.forward(1, "first", "10.0.0.1", False)
        await asyncio.sleep(0.05)  # the owner's close reaches the idle hop
        second = await tier.forward(1, "second", "10.0.0.1", False)
        tier.close()
        server.close()
        return first, second

    first, second = run(scenario())
    assert (first, second) == (("answer", "first"), ("answer", "second"))
    assert received == ["first", "second"]


def echo_handler(handled: list):  # noqa: ANN201
    def handle(request, address, https, respond):  # noqa: ANN001, ANN202
        handled.append(request)
        respond(("answer", request))
        return lambda: None

    return handle


@pytest.mark.parametrize(("bound", "count"), [(None, 300), (32, 300)], ids=["real", "small"])
def test_a_burst_of_forwarded_requests_is_all_answered(
    monkeypatch: pytest.MonkeyPatch, bound: object, count: int
) -> None:
    """All at once, no idle hop yet: a new hop each, more than asyncio accepts in one go,
    and (with the small bound) past the pending bound: refused hops are tried again."""
    if bound is not None:
        monkeypatch.setattr(siblings, "MAX_PENDING_HOPS", bound)
    secret = b"K" * 32
    handled: list = []

    async def scenario() -> list:
        sock = socket.create_server(("127.0.0.1", 0), backlog=count)
        server = await serve_siblings(sock, secret, echo_handler(handled))
        tier = Siblings(0, [0, sock.getsockname()[1]], secret)
        answers = await asyncio.gather(
            *(tier.forward(1, f"req{i}", "10.0.0.1", False) for i in range(count))
        )
        tier.close()
        server.close()
        return list(answers)

    answers = run(scenario())
    assert answers == [("answer", f"req{i}") for i in range(count)]
    assert sorted(handled) == sorted(f"req{i}" for i in range(count))  # each once


def test_silent_connections_cannot_keep_a_router_from_forwarding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(siblings, "PENDING_HOP_GRACE", 0.1)
    secret = b"K" * 32
    handled: list = []

    async def scenario() -> object:
        sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        port = sock.getsockname()[1]
        server = await serve_siblings(sock, secret, echo_handler(handled))
        silent = [
            await asyncio.open_connection("127.0.0.1", port)
            for _ in range(siblings.MAX_PENDING_HOPS)
        ]
        await asyncio.sleep(0.3)  # all of them pending, past the grace
        tier = Siblings(0, [0, port], secret)
        answer = await tier.forward(1, "real", "10.0.0.1", False)
        tier.close()
        for _, writer in silent:
            writer.close()
        server.close()
        return answer

    assert run(scenario()) == ("answer", "real")
    assert handled == ["real"]
