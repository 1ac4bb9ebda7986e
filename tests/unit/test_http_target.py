"""Request targets, authorities and origins (router/http_target.py): pure string tables."""

from __future__ import annotations

from typing import Optional

import pytest

from router.http_target import (
    Authority,
    Origin,
    Target,
    parse_authority,
    parse_host_name,
    parse_origin,
    split_target,
)

# --- targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, target, expected",
    [
        ("GET", "/", Target("/", "")),
        ("GET", "/api/poll?room=a&after=1", Target("/api/poll", "room=a&after=1")),
        ("GET", "/a?", Target("/a", "")),
        ("GET", "/a?b?c", Target("/a", "b?c")),
        ("GET", "/api/rooms/zo%C3%ab/members", Target("/api/rooms/zo%C3%ab/members", "")),
        ("GET", "//evil.example/x", Target("//evil.example/x", "")),  # a path, not a host
        ("GET", "/a[b]|^{}", Target("/a[b]|^{}", "")),  # raw as browsers send them
        (
            "GET",
            "http://127.0.0.1:8000/healthz",
            Target("/healthz", "", Authority("127.0.0.1", 8000)),
        ),
        ("GET", "HTTP://LocalHost/a?b", Target("/a", "b", Authority("localhost", 80))),
        ("GET", "https://h", Target("/", "", Authority("h", 443))),
        ("GET", "http://h?x=1", Target("/", "x=1", Authority("h", 80))),
        ("GET", "http://[::1]:8000/", Target("/", "", Authority("[::1]", 8000))),
        ("GET", "http://[0:0::1]/", Target("/", "", Authority("[::1]", 80))),
        ("GET", "http://h:/", Target("/", "", Authority("h", 80))),
        ("OPTIONS", "*", Target("*", "")),
    ],
    ids=[
        "root",
        "query",
        "empty-query",
        "question-mark-in-query",
        "percent-encoded",
        "double-slash",
        "raw-brackets",
        "absolute",
        "absolute-case",
        "absolute-https-no-path",
        "absolute-query-no-path",
        "absolute-ipv6",
        "absolute-ipv6-long-form",
        "absolute-empty-port",
        "asterisk-options",
    ],
)
def test_good_targets(method: str, target: str, expected: Target) -> None:
    assert split_target(method, target) == expected


@pytest.mark.parametrize(
    "method, target",
    [
        ("GET", "http://[::1/"),
        ("GET", "http://[::1]x/"),
        ("GET", "http://[v1.x]/"),
        ("GET", "http://[fe80::1%25eth0]/"),
        ("GET", "http://[::1]:99999/"),
        ("GET", "http://h:65536/"),
        ("GET", "http://h:8o/"),
        ("GET", "http:///x"),
        ("GET", "http://:80/"),
        ("GET", "http://user:pw@h/"),
        ("GET", "ftp://h/"),
        ("GET", "http:/x"),
        ("GET", "h:80"),
        ("CONNECT", "127.0.0.1:8000"),
        ("GET", "*"),
        ("OPTIONS", "*?x"),
        ("GET", "api/join"),
        ("GET", "/a%"),
        ("GET", "/a%4"),
        ("GET", "/a%zz"),
        ("GET", "/a?b=%G0"),
        ("GET", "/a#frag"),
        ("GET", "http://h/a%2"),
        ("GET", "http://h/#x"),
        ("GET", 'http://h"/'),
    ],
    ids=[
        "ipv6-unclosed",
        "ipv6-junk-after",
        "ipvfuture",
        "ipv6-zone",
        "ipv6-port-too-big",
        "port-too-big",
        "port-not-digits",
        "no-host",
        "no-host-with-port",
        "userinfo",
        "other-scheme",
        "one-slash",
        "authority-form",
        "connect",
        "asterisk-get",
        "asterisk-query",
        "relative",
        "percent-at-end",
        "percent-one-digit",
        "percent-not-hex",
        "percent-in-query",
        "fragment",
        "absolute-bad-percent",
        "absolute-fragment",
        "absolute-bad-host-char",
    ],
)
def test_bad_targets(method: str, target: str) -> None:
    why = split_target(method, target)
    assert isinstance(why, str) and why


# --- authorities (Host, absolute-form) -----------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("localhost", Authority("localhost", None)),
        ("LocalHost:8000", Authority("localhost", 8000)),
        ("localhost.:8000", Authority("localhost", 8000)),
        ("127.0.0.1:0", Authority("127.0.0.1", 0)),
        ("h:", Authority("h", None)),
        ("h:08000", Authority("h", 8000)),
        ("[::1]", Authority("[::1]", None)),
        ("[::1]:8000", Authority("[::1]", 8000)),
        ("[0:0:0:0:0:0:0:1]:1", Authority("[::1]", 1)),
        ("::1", None),
        ("[::1", None),
        ("[::1]8000", None),
        ("[fe80::1%eth0]", None),
        (":8000", None),
        ("", None),
        ("a b", None),
        ("a/b", None),
        ("a@b", None),
        ("h:65536", None),
        ("h:123456", None),
        ("h:-1", None),
        ("h:1:2", None),
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else None,
)
def test_parse_authority(text: str, expected: Optional[Authority]) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Example.ORG", "example.org"),
        ("::1", "[::1]"),
        ("[::1]", "[::1]"),
        ("0:0::1", "[::1]"),
        ("192.0.2.10", "192.0.2.10"),
        ("host:8000", None),
        ("host:", None),
        ("[::1]:8000", None),
        ("http://host", None),
        ("", None),
        ("fe80::1%eth0", None),
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else None,
)
def test_parse_host_name(text: str, expected: Optional[str]) -> None:
    assert parse_host_name(text) == expected


# --- origins --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://127.0.0.1:8000", Origin("http", Authority("127.0.0.1", 8000))),
        ("http://localhost", Origin("http", Authority("localhost", 80))),
        ("https://Example.org", Origin("https", Authority("example.org", 443))),
        ("HTTP://h:80", Origin("http", Authority("h", 80))),
        ("http://[::1]:8000", Origin("http", Authority("[::1]", 8000))),
        ("null", None),
        ("", None),
        ("http://h/", None),
        ("http://h/path", None),
        ("http://h?x", None),
        ("http://u@h", None),
        ("ws://h", None),
        ("file://", None),
        ("http://", None),
        ("http://h:99999", None),
        ("h", None),
    ],
    ids=lambda value: repr(value) if isinstance(value, str) else None,
)
def test_parse_origin(text: str, expected: Optional[Origin]) -> None:
    assert parse_origin(text) == expected
