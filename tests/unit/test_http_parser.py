"""The sans-IO HTTP request parser and response formatter (router/http_parser.py)."""

from __future__ import annotations

from typing import List, Optional

import pytest

from common.limits import (
    MAX_HTTP_BODY_BYTES,
    MAX_HTTP_HEADER_BYTES,
    MAX_HTTP_HEADERS,
    MAX_HTTP_REQUEST_LINE_BYTES,
)
from router.http_parser import (
    CLOSED,
    CONTINUE_RESPONSE,
    NEED_DATA,
    Continue,
    HttpRequestParser,
    ProtocolError,
    Request,
    format_response,
)
from router.http_target import Authority

BODY = b'{"room": "lobby", "text": "h\xc3\xa9llo"}'
SAMPLE = (
    b"POST /api/send?x=1 HTTP/1.1\r\n"
    b"Host: localhost:8000\r\n"
    b"Content-Type: application/json\r\n"
    b"Cookie: sc_session=abc\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
GET = b"GET /api/poll?room=lobby&after=3 HTTP/1.1\r\nHost: h\r\n\r\n"


EOF: Optional[bytes] = None  # in feed(): the peer closed its side (receive_data(b""))


def feed(*chunks: Optional[bytes]) -> List[object]:
    """Every event the parser produces for *chunks* (until it needs more or closes). Empty
    chunks are skipped (a split at offset 0); :data:`EOF` ends the stream."""
    parser = HttpRequestParser()
    events: List[object] = []
    for chunk in chunks:
        if chunk is EOF:
            parser.receive_data(b"")
        elif chunk:
            parser.receive_data(chunk)
        events.extend(drain(parser))
    return events


def drain(parser: HttpRequestParser) -> List[object]:
    events: List[object] = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED or isinstance(event, ProtocolError):
            return events


def only_request(events: List[object]) -> Request:
    assert len(events) == 1 and isinstance(events[0], Request), events
    return events[0]


def error_of(*chunks: Optional[bytes]) -> ProtocolError:
    events = feed(*chunks)
    assert events and isinstance(events[-1], ProtocolError), events
    return events[-1]


def check_sample(request: Request) -> None:
    assert request.method == "POST"
    assert request.target == "/api/send?x=1"
    assert request.version == "HTTP/1.1"
    assert request.header("content-type") == "application/json"
    assert request.header("cookie") == "sc_session=abc"
    assert request.body == BODY
    assert request.keep_alive


# --- splitting at every offset -----------------------------------------------------------


@pytest.mark.parametrize("offset", range(len(SAMPLE) + 1))
def test_sample_split_at_every_offset(offset: int) -> None:
    check_sample(only_request(feed(SAMPLE[:offset], SAMPLE[offset:])))


def test_sample_one_byte_at_a_time() -> None:
    chunks = [SAMPLE[i : i + 1] for i in range(len(SAMPLE))]
    check_sample(only_request(feed(*chunks)))


@pytest.mark.parametrize("offset", range(0, len(SAMPLE + GET) + 1, 7))
def test_pipelined_requests_split_anywhere(offset: int) -> None:
    stream = SAMPLE + GET
    events = feed(stream[:offset], stream[offset:])
    assert len(events) == 2, events
    check_sample(events[0])  # type: ignore[arg-type]
    assert isinstance(events[1], Request) and events[1].target.startswith("/api/poll")


def test_bare_lf_line_endings_are_accepted() -> None:
    request = only_request(feed(b"GET / HTTP/1.1\nHost: h\n\n"))
    assert request.target == "/" and request.header("host") == "h"


def test_empty_lines_before_the_request_line_are_ignored() -> None:
    assert only_request(feed(b"\r\n\r\n" + GET)).method == "GET"


# --- framing and keep-alive ---------------------------------------------------------------


@pytest.mark.parametrize(
    "head, keep_alive",
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, Close\r\n", False),
        (b"GET / HTTP/1.0\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n", True),
    ],
    ids=["1.1-default", "1.1-close", "1.1-close-in-list", "1.0-default", "1.0-keep-alive"],
)
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert only_request(feed(head + b"\r\n")).keep_alive is keep_alive


def test_header_names_are_lowercased_and_values_stripped() -> None:
    request = only_request(feed(b"GET / HTTP/1.1\r\nHOST:  h \t\r\nX-Thing:\r\n\r\n"))
    assert request.headers == [("host", "h"), ("x-thing", "")]


def test_repeated_equal_content_lengths_are_accepted() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n"
    assert only_request(feed(head + b"ok")).body == b"ok"


def test_in_progress_and_buffered() -> None:
    parser = HttpRequestParser()
    assert not parser.in_progress
    parser.receive_data(b"\r\n")
    assert not parser.in_progress
    parser.receive_data(b"GE")
    assert parser.in_progress and parser.next_event() is NEED_DATA
    parser.receive_data(b"T / HTTP/1.1\r\nHost: h\r\n\r\nGET")
    assert isinstance(parser.next_event(), Request)
    assert parser.in_progress and parser.buffered == 3


def test_end_of_stream_between_requests_is_closed() -> None:
    assert feed(GET, EOF) == [only_request(feed(GET)), CLOSED]


@pytest.mark.parametrize(
    "partial",
    [b"GET / HT", GET[:-2], SAMPLE[:-3]],
    ids=["request-line", "headers", "body"],
)
def test_end_of_stream_mid_request_is_an_error(partial: bytes) -> None:
    error = error_of(partial, EOF)
    assert (error.status, error.code) == (400, "bad_request")


def test_nothing_after_an_error() -> None:
    parser = HttpRequestParser()
    parser.receive_data(b"BAD\r\n\r\n")
    assert isinstance(parser.next_event(), ProtocolError)
    parser.receive_data(GET)
    assert parser.next_event() is CLOSED


# --- refusals -------------------------------------------------------------------------------

LONG_TARGET = b"/" + b"a" * MAX_HTTP_REQUEST_LINE_BYTES


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"GET " + LONG_TARGET, 414, "uri_too_long"),
        (b"GET " + LONG_TARGET + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * MAX_HTTP_HEADERS + b"\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * MAX_HTTP_HEADER_BYTES,
            431,
            "headers_too_large",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (MAX_HTTP_BODY_BYTES + 1),
            413,
            "body_too_large",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            411,
            "length_required",
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h\x00\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET / HTTX/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"GET http://[::1/ HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"GET /a%zz HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h:99999\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.0\r\nHost: h/x\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\n\r\n", 417, "expectation_failed"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue, x\r\nContent-Length: 1\r\n\r\n",
            417,
            "expectation_failed",
        ),
    ],
    ids=[
        "request-line-unfinished",
        "request-line-complete",
        "too-many-headers",
        "header-section-unfinished",
        "body-too-large-before-body",
        "content-length-and-transfer-encoding",
        "transfer-encoding-alone",
        "negative-length",
        "non-numeric-length",
        "conflicting-lengths",
        "no-host",
        "two-hosts",
        "obs-fold",
        "space-before-colon",
        "no-colon",
        "nul-in-value",
        "http-2",
        "bad-version",
        "raw-utf8-target",
        "double-space",
        "bad-method",
        "ipv6-target-unclosed",
        "bad-percent-in-target",
        "authority-form",
        "asterisk-not-options",
        "host-ipv6-unclosed",
        "host-space",
        "host-port-too-big",
        "http10-host-path",
        "http10-two-hosts",
        "unknown-expectation",
        "unknown-expectation-in-list",
    ],
)
def test_refusals(data: bytes, status: int, code: str) -> None:
    error = error_of(data)
    assert (error.status, error.code) == (status, code), error.message


def test_request_line_exactly_at_the_limit_is_accepted() -> None:
    target = b"/" + b"a" * (MAX_HTTP_REQUEST_LINE_BYTES - len(b"GET  HTTP/1.1") - 1)
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == MAX_HTTP_REQUEST_LINE_BYTES
    assert only_request(feed(line + b"\r\nHost: h\r\n\r\n")).target == target.decode()


def test_exactly_the_maximum_number_of_headers_is_accepted() -> None:
    fields = b"Host: h\r\n" + b"X: y\r\n" * (MAX_HTTP_HEADERS - 1)
    assert len(only_request(feed(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")).headers) == 100


def test_body_of_exactly_the_maximum_size_is_accepted() -> None:
    body = b"x" * MAX_HTTP_BODY_BYTES
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert only_request(feed(head, body)).body == body


def test_413_is_decided_before_the_body_arrives() -> None:
    parser = HttpRequestParser()
    parser.receive_data(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999\r\n\r\n")
    error = parser.next_event()
    assert isinstance(error, ProtocolError) and error.status == 413


# --- targets and authorities -----------------------------------------------------------------


@pytest.mark.parametrize(
    "head, path, query, authority",
    [
        (b"GET /a?b=1 HTTP/1.1\r\nHost: Local:80\r\n", "/a", "b=1", Authority("local", 80)),
        (b"GET //x/y HTTP/1.1\r\nHost: h\r\n", "//x/y", "", Authority("h", None)),
        (b"GET http://[::1]:8/p?q HTTP/1.1\r\nHost: h\r\n", "/p", "q", Authority("[::1]", 8)),
        (b"GET http://a.example HTTP/1.0\r\n", "/", "", Authority("a.example", 80)),
        (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n", "*", "", Authority("h", None)),
        (b"GET / HTTP/1.1\r\nHost:\r\n", "/", "", Authority("", None)),
        (b"GET / HTTP/1.0\r\n", "/", "", None),
    ],
    ids=[
        "origin-form",
        "double-slash-is-a-path",
        "absolute-form-beats-host",
        "absolute-form-http10",
        "asterisk-options",
        "empty-host",
        "http10-no-host",
    ],
)
def test_split_target_and_authority(
    head: bytes, path: str, query: str, authority: Optional[Authority]
) -> None:
    request = only_request(feed(head + b"\r\n"))
    assert (request.path, request.query, request.authority) == (path, query, authority)


# --- Expect: 100-continue -------------------------------------------------------------------

CONTINUE_BODY = b'{"room":"lobby"}'
CONTINUE_HEAD = (
    b"POST /api/leave HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\n"
    b"Content-Length: %d\r\n\r\n" % len(CONTINUE_BODY)
)


@pytest.mark.parametrize("offset", range(len(CONTINUE_HEAD + CONTINUE_BODY) + 1))
def test_continue_split_at_every_offset(offset: int) -> None:
    """``Continue`` comes once, only when the first chunk holds the whole head but not the
    whole body; then the request."""
    stream = CONTINUE_HEAD + CONTINUE_BODY
    events = feed(stream[:offset], stream[offset:])
    asks = len(CONTINUE_HEAD) <= offset < len(stream)
    assert len(events) == (2 if asks else 1), events
    request = events[-1]
    assert isinstance(request, Request) and request.body == CONTINUE_BODY
    if asks:
        head = events[0]
        assert isinstance(head, Continue)
        assert head.request.path == "/api/leave" and head.request.body == b""


def test_continue_one_byte_at_a_time_comes_once() -> None:
    stream = CONTINUE_HEAD + CONTINUE_BODY
    events = feed(*[stream[i : i + 1] for i in range(len(stream))])
    assert [type(event) for event in events] == [Continue, Request]


def test_continue_for_each_pipelined_request() -> None:
    parser = HttpRequestParser()
    parser.receive_data(CONTINUE_HEAD)
    assert isinstance(parser.next_event(), Continue)
    assert parser.next_event() is NEED_DATA
    parser.receive_data(CONTINUE_BODY + CONTINUE_HEAD)
    assert isinstance(parser.next_event(), Request)
    assert isinstance(parser.next_event(), Continue)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.0\r\nExpect: something-else\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nExpect:\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["http10", "http10-other-expectation", "no-expect", "empty-expect"],
)
def test_no_continue(head: bytes) -> None:
    assert feed(head) == []
    assert only_request(feed(head, b"12345")).body == b"12345"


def test_no_continue_without_a_body() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
    assert only_request(feed(head + b"\r\n")).body == b""
    assert only_request(feed(head + b"Content-Length: 0\r\n\r\n")).body == b""


@pytest.mark.parametrize(
    "head, status",
    [
        (b"Content-Length: %d\r\n" % (MAX_HTTP_BODY_BYTES + 1), 413),
        (b"Transfer-Encoding: chunked\r\n", 411),
        (b"Content-Length: x\r\n", 400),
    ],
    ids=["413", "411", "bad-length"],
)
def test_no_continue_when_the_head_is_refused(head: bytes, status: int) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n" + head + b"\r\n"
    events = feed(data)
    assert len(events) == 1 and isinstance(events[0], ProtocolError), events
    assert events[0].status == status


def test_end_of_stream_after_continue_is_truncated() -> None:
    events = feed(CONTINUE_HEAD, CONTINUE_BODY[:3], EOF)
    assert isinstance(events[0], Continue) and isinstance(events[1], ProtocolError)


def test_continue_response_bytes() -> None:
    assert CONTINUE_RESPONSE == b"HTTP/1.1 100 Continue\r\n\r\n"


# --- responses ----------------------------------------------------------------------------


def test_format_response() -> None:
    data = format_response(200, [("Content-Type", "text/plain")], b"hi", keep_alive=True)
    assert data == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"


def test_format_response_closing_and_head() -> None:
    data = format_response(404, [], b"gone", keep_alive=False, head_only=True)
    assert data == b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"


def test_not_modified_has_no_body_or_length() -> None:
    data = format_response(304, [("ETag", '"x"')], b"ignored", keep_alive=True)
    assert data == b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'
