"""Hypothesis: no input reaches a ``500``, and nothing raises, anywhere in the HTTP stack.

Arbitrary request lines, targets, headers and bodies (biased towards the API's paths and
JSON fields, hosts and origins, broken percent-escapes, IPv6 literals, expectations) go
through the sans-IO parser and then :meth:`HttpApi.handle` (or, for a ``Continue``,
:meth:`HttpApi.refusal`), on a real :class:`~router.hub.Hub` whose shards are in-memory
:class:`~shard.core.ShardCore` objects answering on the next loop turn. Properties:

- the parser, the target splitter and the authority/origin parsers never raise;
- no answer is a ``500``, no error is logged, no loop callback raises;
- every request that does not wait (only polls do) is answered, once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Dict, List, Optional

from hypothesis import example, given, settings
from hypothesis import strategies as st

from router.http_api import Exchange, HttpApi, Response
from router.http_parser import (
    CLOSED,
    NEED_DATA,
    Continue,
    HttpRequestParser,
    ProtocolError,
    Request,
)
from router.http_static import StaticFiles
from router.http_target import parse_authority, parse_host_name, parse_origin, split_target
from router.hub import Hub
from router.settings import Settings
from tests.memory_shards import MemoryPool
from web import WEB_ROOT

FUZZ = settings(max_examples=200, deadline=None)
SHARDS = 2


class Errors(logging.Handler):
    """Collects the ERROR records the router logs (a 500 is always logged)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --- strategies ---------------------------------------------------------------------------

NAMES = ["lobby", "dev", "alice", "Alice", "bob", "zoë", "a b", "", "x" * 65, "\ud800"]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(NAMES),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["room", "username", "text", "x"]
json_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4)
good_objects = st.fixed_dictionaries(
    {"room": st.sampled_from(["lobby", "dev"]), "username": st.sampled_from(["alice", "bob"])},
    optional={"text": st.sampled_from(["hi", ""])},
)
json_bodies = st.one_of(
    *[(good_objects | json_objects).map(lambda body: json.dumps(body).encode())] * 4,
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=30),
)

PATHS = [
    "/",
    "/index.html",
    "/app.js",
    "/healthz",
    "/api/session",
    "/api/join",
    "/api/send",
    "/api/leave",
    "/api/poll",
    "/api/rooms",
    "/api/rooms/lobby/members",
    "/api/rooms/zo%C3%AB/members",
    "/api/rooms/%C3/members",
    "/api/rooms/%ZZ/members",
    "/api/rooms/a/b/members",
    "/api/rooms//members",
    "/api/nope",
    "//x/y",
    "*",
]
QUERIES = [
    "",
    "?room=lobby&after=0",
    "?room=lobby&after=1&epoch=1800000000001",
    "?room=lobby&room=dev",
    "?room=lobby&after=0&after=1",
    "?room=lobby&epoch=1&epoch=2",
    "?cursors=lobby:0,dev:0",
    "?cursors=lobby:0&cursors=dev:0",
    "?cursors=lobby:0&after=3",
    "?room=%FF&after=0",
    "?room=lobby&after=99999999999999999999",
    "?cursors=:::",
    "?%",
    "?a=%zz",
]
AUTHORITIES = ["127.0.0.1:8000", "localhost", "[::1]:8000", "evil.example", "[::1", "h:99999", ""]
target_texts = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)
api_targets = st.builds(
    lambda path, query: path + query, st.sampled_from(PATHS), st.sampled_from(QUERIES)
)
targets = st.one_of(
    api_targets,
    api_targets,
    api_targets,
    st.builds(
        lambda scheme, authority, path: f"{scheme}://{authority}{path}",
        st.sampled_from(["http", "HTTPS", "ftp"]),
        st.sampled_from(AUTHORITIES) | target_texts,
        st.sampled_from(PATHS) | target_texts,
    ),
    target_texts,
    st.sampled_from(["http://[::1/", "localhost:8000", "/a%", "/a#b", "*"]),
)


def mostly(common: List[Any], rare: List[Any], text: Optional[Any] = None) -> Any:
    """One of *common* most of the time, sometimes one of *rare*, seldom *text*."""
    choices = st.sampled_from(common * (3 * len(rare) or 1) + rare)
    return choices if text is None else st.one_of(choices, choices, choices, text)


methods = mostly(["GET", "POST", "POST", "HEAD"], ["OPTIONS", "PUT", "G(T"])
versions = mostly(["HTTP/1.1"], ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x"])
any_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
hosts = mostly(["127.0.0.1:8000", "localhost", "[::1]:8000"], ["evil.example", None], any_value)
origins = mostly([None, "http://127.0.0.1:8000"], ["http://evil.example", "null"], any_value)
content_types = mostly(["application/json"], [None, "text/plain"])
expects = mostly([None], ["100-continue", "100-CONTINUE, 100-continue", "x"])
cookies = mostly(["current"], [None, "sc_session=forged"])


#: The API's endpoints with their method, for well-formed requests.
ENDPOINTS = [
    ("POST", "/api/join"),
    ("POST", "/api/join"),
    ("POST", "/api/send"),
    ("POST", "/api/send"),
    ("POST", "/api/leave"),
    ("GET", "/api/poll"),
    ("GET", "/api/poll"),
    ("GET", "/api/session"),
    ("GET", "/api/rooms"),
    ("GET", "/api/rooms/{room}/members"),
    ("GET", "/api/rooms/{room}/members"),
]
#: Room segments of a members path: good, percent-encoded, broken UTF-8, control, slash.
ROOM_SEGMENTS = ["lobby", "zo%C3%AB", "%C3", "%FF%FE", "%00", "a%2Fb", "a/b", "", "%20"]


@st.composite
def api_requests(draw: st.DrawFn) -> Dict[str, Any]:
    """A well-formed request to an endpoint, the body and query being the fuzzed part."""
    method, path = draw(st.sampled_from(ENDPOINTS))
    path = path.format(room=draw(st.sampled_from(ROOM_SEGMENTS) | target_texts))
    body = draw(json_bodies) if method == "POST" else b""
    return {
        "line": f"{method} {path}{draw(st.sampled_from(QUERIES))} HTTP/1.1",
        "host": "127.0.0.1:8000",
        "origin": draw(st.sampled_from([None, "http://127.0.0.1:8000"])),
        "content_type": "application/json" if method == "POST" else None,
        "expect": None,
        "cookie": "current",
        "length": len(body) if body else None,
        "body": body,
        "extra": [],
        "split": draw(st.integers(0, 400)),
    }


def join_first(templates: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """*templates* after a join that succeeds, so that later requests have a session."""
    body = b'{"room": "lobby", "username": "alice"}'
    join = {
        "line": "POST /api/join HTTP/1.1",
        "host": "127.0.0.1:8000",
        "origin": None,
        "content_type": "application/json",
        "expect": None,
        "cookie": "current",
        "length": len(body),
        "body": body,
        "extra": [],
        "split": 0,
    }
    return [join, *templates]


@st.composite
def wild_requests(draw: st.DrawFn) -> Dict[str, Any]:
    """A request template; the cookie is filled in when it is sent (the session so far)."""
    body = draw(json_bodies)
    return {
        "line": f"{draw(methods)} {draw(targets)} {draw(versions)}",
        "host": draw(hosts),
        "origin": draw(origins),
        "content_type": draw(content_types),
        "expect": draw(expects),
        "cookie": draw(cookies),
        "length": draw(mostly([len(body)], [None, len(body) + 1])),
        "body": body,
        "extra": draw(
            st.one_of(st.just([]), st.just([]), st.lists(st.tuples(target_texts, hosts)))
        ),
        "split": draw(st.integers(0, 400)),
    }


sessions = st.lists(api_requests() | wild_requests(), min_size=1, max_size=8)


def render(template: Dict[str, Any], cookie: Optional[str]) -> bytes:
    lines = [template["line"]]
    for name, key in (("Host", "host"), ("Origin", "origin"), ("Content-Type", "content_type")):
        if template[key] is not None:
            lines.append(f"{name}: {template[key]}")
    if template["expect"] is not None:
        lines.append(f"Expect: {template['expect']}")
    if template["cookie"] == "current" and cookie:
        lines.append(f"Cookie: sc_session={cookie}")
    elif template["cookie"] not in (None, "current"):
        lines.append(f"Cookie: {template['cookie']}")
    if template["length"] is not None:
        lines.append(f"Content-Length: {template['length']}")
    lines.extend(f"{name}: {value}" for name, value in template["extra"] if value)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + template["body"]


# --- the property ---------------------------------------------------------------------------


class Client:
    """Feeds requests through one parser (a new one after a refusal, as after a close) into
    the API, keeping the session cookie like a browser."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.parser = HttpRequestParser()
        self.cookie: Optional[str] = None
        self.answers: List[Response] = []
        self.exchanges: List[Exchange] = []

    def send(self, data: bytes, split: int) -> None:
        for chunk in (data[:split], data[split:]):
            if chunk:
                self.parser.receive_data(chunk)
            self._drain()

    def _drain(self) -> None:
        while True:
            event = self.parser.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED or isinstance(event, ProtocolError):
                self.parser = HttpRequestParser()
                return
            if isinstance(event, Continue):
                refusal = self.api.refusal(event.request)
                if refusal is not None:
                    self.answers.append(refusal)
                    self.parser = HttpRequestParser()
                    return
                continue
            assert isinstance(event, Request), event
            self._handle(event)

    def _handle(self, request: Request) -> None:
        def answered(response: Response) -> None:
            self.answers.append(response)
            for name, value in response.headers:
                if name == "Set-Cookie":
                    self.cookie = value.split(";")[0].split("=", 1)[1] or None

        exchange = Exchange(answered)
        self.exchanges.append(exchange)
        self.api.handle(request, exchange)


async def run_requests(templates: List[Dict[str, Any]]) -> Client:
    loop = asyncio.get_running_loop()
    hub = Hub(loop, Settings(poll_timeout=60.0))
    hub.attach(MemoryPool(hub, SHARDS))  # type: ignore[arg-type]
    api = HttpApi(hub, StaticFiles(WEB_ROOT))
    client = Client(api)
    try:
        for template in templates:
            data = render(template, client.cookie)
            client.send(data, template["split"] % (len(data) + 1))
            for _ in range(6):  # shard answers, then the callbacks that answer the request
                await asyncio.sleep(0)
        return client
    finally:
        for exchange in client.exchanges:
            exchange.cancel()
        api.close()
        hub.close()


@FUZZ
@given(sessions | sessions.map(join_first))
@example(
    [
        {
            "line": "GET http://[::1/ HTTP/1.1",
            "host": "127.0.0.1:8000",
            "origin": None,
            "content_type": None,
            "expect": None,
            "cookie": None,
            "length": None,
            "body": b"",
            "extra": [],
            "split": 0,
        }
    ]
)
def test_no_input_reaches_a_500(templates: List[Dict[str, Any]]) -> None:
    errors = Errors()
    logger = logging.getLogger("router")
    logger.addHandler(errors)
    loop = asyncio.new_event_loop()
    raised: List[Dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: raised.append(context))
    try:
        client = loop.run_until_complete(run_requests(templates))
    finally:
        loop.close()
        logger.removeHandler(errors)
    assert not raised, raised
    assert not errors.records, [record.getMessage() for record in errors.records]
    assert all(answer.status != 500 for answer in client.answers), client.answers
    for exchange in client.exchanges:
        assert exchange.finished or exchange.abandon_on_eof  # only a poll may still wait


# --- the pure parts never raise -------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 300))
def test_parser_never_raises(data: bytes, split: int) -> None:
    parser = HttpRequestParser()
    for chunk in (data[:split], data[split:], b""):
        parser.receive_data(chunk)
        for _ in range(10):
            event = parser.next_event()
            assert (
                event is NEED_DATA
                or event is CLOSED
                or isinstance(event, (Request, Continue, ProtocolError))
            )
            if event is NEED_DATA or event is CLOSED:
                break


@FUZZ
@given(st.sampled_from(["GET", "OPTIONS"]), targets | st.text(max_size=30))
def test_target_and_authority_parsers_never_raise(method: str, text: str) -> None:
    result = split_target(method, text)
    assert isinstance(result, (str, tuple))
    for parse in (parse_authority, parse_host_name, parse_origin):
        parse(text)
