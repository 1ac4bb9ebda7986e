"""The Host allow-list and the Origin rule (router/http_hosts.py), as pure functions.

The attack they stop: DNS rebinding, where ``Host`` and ``Origin`` agree with each other
(``evil.example`` both) and only the allow-list tells them apart.
"""

from __future__ import annotations

import socket
from typing import List, Optional

import pytest

from router.http_hosts import AllowedHosts, host_allowed, origin_allowed
from router.http_target import Authority, parse_authority

DEFAULT = AllowedHosts.default_for("127.0.0.1")
NAMED = AllowedHosts.parse("chat.example.org, ::1")
ANY = AllowedHosts.parse("*")


def authority(host_field: Optional[str]) -> Optional[Authority]:
    if host_field is None:
        return None
    parsed = parse_authority(host_field)
    assert parsed is not None, host_field
    return parsed


# --- the allow-list itself ------------------------------------------------------------------


def test_default_list_for_loopback() -> None:
    assert DEFAULT.names == {"127.0.0.1", "localhost", "[::1]"} and not DEFAULT.any_host


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("127.0.0.1", {"127.0.0.1", "localhost", "[::1]"}),
        ("::1", {"127.0.0.1", "localhost", "[::1]"}),
        ("192.0.2.7", {"192.0.2.7", "127.0.0.1", "localhost", "[::1]"}),
        ("Chat.Example.org", {"chat.example.org", "127.0.0.1", "localhost", "[::1]"}),
        ("0.0.0.0", {"myhost", "127.0.0.1", "localhost", "[::1]"}),
        ("::", {"myhost", "127.0.0.1", "localhost", "[::1]"}),
        ("", {"myhost", "127.0.0.1", "localhost", "[::1]"}),
    ],
    ids=["loopback", "ipv6-loopback", "address", "name", "ipv4-any", "ipv6-any", "empty"],
)
def test_default_list(listen: str, expected: set) -> None:
    assert AllowedHosts.default_for(listen, hostname="MyHost").names == expected


def test_default_list_for_any_address_uses_the_real_hostname() -> None:
    names = AllowedHosts.default_for("0.0.0.0").names
    assert socket.gethostname().lower().rstrip(".") in names


def test_a_hostname_no_url_can_carry_is_left_out() -> None:
    assert AllowedHosts.default_for("0.0.0.0", hostname="my host").names == DEFAULT.names


@pytest.mark.parametrize(
    "text, names",
    [
        ("a.example", {"a.example"}),
        ("A.example, b.example ,::1,[::2]", {"a.example", "b.example", "[::1]", "[::2]"}),
        ("localhost.", {"localhost"}),
    ],
    ids=["one", "several-case-spaces-ipv6", "trailing-dot"],
)
def test_parse(text: str, names: set) -> None:
    assert AllowedHosts.parse(text) == AllowedHosts(frozenset(names))


def test_as_flag_round_trips() -> None:
    assert DEFAULT.as_flag() == "127.0.0.1,::1,localhost"
    assert AllowedHosts.parse(DEFAULT.as_flag()) == DEFAULT
    assert ANY.as_flag() == "*"


def test_parse_star() -> None:
    assert ANY.any_host and ANY.allows("anything.example")
    assert AllowedHosts.parse("a.example,*").any_host


@pytest.mark.parametrize(
    "text",
    ["", "a.example,", "a.example:8000", "http://a.example", "a/b", "[::1]:80", "a b"],
    ids=["empty", "empty-entry", "port", "scheme", "path", "ipv6-port", "space"],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        AllowedHosts.parse(text)


# --- Host --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allowed, host, ok",
    [
        (DEFAULT, "127.0.0.1:8000", True),
        (DEFAULT, "127.0.0.1", True),
        (DEFAULT, "LOCALHOST:1234", True),
        (DEFAULT, "localhost.:8000", True),
        (DEFAULT, "[::1]:8000", True),
        (DEFAULT, "[0:0::1]:8000", True),
        (DEFAULT, "evil.example", False),
        (DEFAULT, "evil.example:8000", False),
        (DEFAULT, "127.0.0.2:8000", False),
        (DEFAULT, "127.1:8000", False),
        (DEFAULT, "localhost.evil.example", False),
        (DEFAULT, "[::2]:8000", False),
        (DEFAULT, None, True),
        (NAMED, "chat.example.org:443", True),
        (NAMED, "CHAT.example.org", True),
        (NAMED, "[::1]", True),
        (NAMED, "localhost:8000", False),
        (ANY, "evil.example:8000", True),
    ],
    ids=[
        "loopback-with-port",
        "loopback-no-port",
        "localhost-case",
        "trailing-dot",
        "ipv6",
        "ipv6-long-form",
        "foreign",
        "foreign-with-port",
        "other-loopback-address",
        "short-ipv4",
        "suffix-trick",
        "other-ipv6",
        "http10-no-host",
        "named",
        "named-case",
        "named-ipv6",
        "replaced-default",
        "star",
    ],
)
def test_host_allowed(allowed: AllowedHosts, host: Optional[str], ok: bool) -> None:
    assert host_allowed(allowed, authority(host)) is ok


def test_empty_host_is_allowed_only_by_star() -> None:
    empty = Authority("", None)
    assert not host_allowed(DEFAULT, empty) and host_allowed(ANY, empty)


# --- Origin ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allowed, origins, host, ok",
    [
        (DEFAULT, [], "127.0.0.1:8000", True),
        (DEFAULT, ["http://127.0.0.1:8000"], "127.0.0.1:8000", True),
        (DEFAULT, ["HTTP://LocalHost:8000"], "localhost:8000", True),
        (DEFAULT, ["http://[::1]:8000"], "[::1]:8000", True),
        (DEFAULT, ["http://localhost"], "localhost", True),
        (DEFAULT, ["http://localhost:80"], "localhost", True),
        (DEFAULT, ["http://localhost"], "localhost:80", True),
        (DEFAULT, ["https://localhost"], "localhost", True),
        (DEFAULT, ["https://localhost"], "localhost:443", True),
        (DEFAULT, ["http://evil.example:8000"], "evil.example:8000", False),
        (DEFAULT, ["http://evil.example:8000"], "127.0.0.1:8000", False),
        (DEFAULT, ["http://localhost:9000"], "localhost:8000", False),
        (DEFAULT, ["http://localhost"], "localhost:8000", False),
        (DEFAULT, ["http://localhost:8000"], "localhost", False),
        (DEFAULT, ["https://localhost"], "localhost:80", False),
        (DEFAULT, ["http://localhost:8000"], "127.0.0.1:8000", False),
        (DEFAULT, ["null"], "127.0.0.1:8000", False),
        (DEFAULT, ["http://127.0.0.1:8000/"], "127.0.0.1:8000", False),
        (DEFAULT, ["ws://127.0.0.1:8000"], "127.0.0.1:8000", False),
        (DEFAULT, ["http://127.0.0.1:8000", "http://127.0.0.1:8000"], "127.0.0.1:8000", False),
        (DEFAULT, ["http://127.0.0.1:8000"], None, False),
        (DEFAULT, [], None, True),
        (NAMED, ["https://chat.example.org"], "chat.example.org", True),
        (NAMED, ["http://localhost:8000"], "localhost:8000", False),
        (ANY, ["http://evil.example:8000"], "evil.example:8000", True),
        (ANY, ["http://evil.example:8000"], "127.0.0.1:8000", False),
        (ANY, ["null"], "evil.example:8000", False),
    ],
    ids=[
        "no-origin",
        "same",
        "same-case",
        "same-ipv6",
        "default-port-both",
        "explicit-default-port-in-origin",
        "explicit-default-port-in-host",
        "https-behind-a-proxy",
        "https-explicit-port",
        "rebinding",
        "foreign-origin",
        "other-port",
        "origin-default-host-explicit",
        "origin-explicit-host-default",
        "https-to-port-80",
        "other-allowed-host",
        "null",
        "trailing-slash",
        "other-scheme",
        "two-origins",
        "http10-no-host",
        "http10-no-origin",
        "named",
        "replaced-default",
        "star-same-origin",
        "star-still-same-origin-only",
        "star-null",
    ],
)
def test_origin_allowed(
    allowed: AllowedHosts, origins: List[str], host: Optional[str], ok: bool
) -> None:
    assert origin_allowed(allowed, origins, authority(host)) is ok
