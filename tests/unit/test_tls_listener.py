"""Which TLS listener each kind of event loop gets (router/tls.py): the acceptor that counts
handshakes against the caps where a transport can be aborted without shutting the
connection down (selector loops), asyncio's own ``ssl=`` listener on a proactor loop."""

from __future__ import annotations

import asyncio
from asyncio.proactor_events import BaseProactorEventLoop

from router.policy import ConnectionLimiter
from router.tls import listener_options, protocol_factory


def factory() -> asyncio.Protocol:
    return asyncio.Protocol()


def proactor_like() -> BaseProactorEventLoop:
    loop = BaseProactorEventLoop.__new__(BaseProactorEventLoop)
    loop._closed = True  # type: ignore[attr-defined]  # never run; keeps __del__ quiet
    return loop


def test_a_selector_loop_counts_handshakes_with_the_acceptor() -> None:
    loop = asyncio.SelectorEventLoop()
    try:
        accept = protocol_factory(loop, "context", 5.0, ConnectionLimiter(10, 10), factory)  # type: ignore[arg-type]
        assert accept is not factory and type(accept()).__name__ == "_Gate"
        assert listener_options(loop, "context", 5.0) == {}  # type: ignore[arg-type]
    finally:
        loop.close()


def test_a_proactor_loop_keeps_asyncios_tls_listener() -> None:
    loop = proactor_like()
    accept = protocol_factory(loop, "context", 5.0, ConnectionLimiter(10, 10), factory)  # type: ignore[arg-type]
    assert accept is factory
    assert listener_options(loop, "context", 5.0) == {  # type: ignore[arg-type]
        "ssl": "context",
        "ssl_handshake_timeout": 5.0,
    }


def test_plaintext_is_plaintext_everywhere() -> None:
    for loop in (asyncio.SelectorEventLoop(), proactor_like()):
        assert protocol_factory(loop, None, 5.0, ConnectionLimiter(1, 1), factory) is factory
        assert listener_options(loop, None, 5.0) == {}
        if isinstance(loop, asyncio.SelectorEventLoop):
            loop.close()
