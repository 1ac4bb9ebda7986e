"""Trusted proxies without sockets: who the client is behind them, and PROXY v1 lines."""

from __future__ import annotations

import pytest

from router.proxies import TrustedProxies, parse_proxy_v1

PROXIES = TrustedProxies.parse("10.0.0.0/8, 127.0.0.1, fd00::/8")


@pytest.mark.parametrize(
    ("peer", "headers", "client", "proto"),
    [
        ("203.0.113.9", [("x-forwarded-for", "1.2.3.4")], "203.0.113.9", ""),  # untrusted peer
        ("127.0.0.1", [], "127.0.0.1", ""),
        ("127.0.0.1", [("x-forwarded-for", "198.51.100.7")], "198.51.100.7", ""),
        # a client's own (faked) entries are left of what our proxy appended
        ("127.0.0.1", [("x-forwarded-for", "6.6.6.6, 198.51.100.7")], "198.51.100.7", ""),
        # a chain of our own proxies is walked past
        ("10.1.1.1", [("x-forwarded-for", "198.51.100.7, 10.2.2.2")], "198.51.100.7", ""),
        ("127.0.0.1", [("x-forwarded-for", "198.51.100.7:4711")], "198.51.100.7", ""),
        ("127.0.0.1", [("x-forwarded-for", "a, b"), ("x-forwarded-for", "198.51.100.8")],
         "198.51.100.8", ""),
        ("127.0.0.1", [("x-forwarded-for", "garbage")], "127.0.0.1", ""),
        ("127.0.0.1", [("x-forwarded-for", "198.51.100.7"), ("x-forwarded-proto", "https")],
         "198.51.100.7", "https"),
        ("127.0.0.1", [("x-forwarded-proto", "gopher")], "127.0.0.1", ""),
        # the client's own Forwarded means nothing when the proxy speaks X-Forwarded-For
        ("127.0.0.1", [("forwarded", "for=6.6.6.6"), ("x-forwarded-for", "192.0.2.2")],
         "192.0.2.2", ""),
        ("127.0.0.1", [("forwarded", "for=6.6.6.6")], "127.0.0.1", ""),
        ("::ffff:127.0.0.1", [("x-forwarded-for", "192.0.2.3")], "192.0.2.3", ""),
        ("fd00::1", [("x-forwarded-for", "2001:db8::5")], "2001:db8::5", ""),
    ],
)  # fmt: skip
def test_the_client_behind_a_trusted_proxy(peer, headers, client, proto) -> None:  # noqa: ANN001
    assert PROXIES.client_of(peer, headers) == (client, proto)


FORWARDED = PROXIES.with_header("forwarded")


@pytest.mark.parametrize(
    ("value", "client", "proto"),
    [
        ("for=192.0.2.60;proto=https;by=203.0.113.43", "192.0.2.60", "https"),
        ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17", ""),
        ("for=unknown", "127.0.0.1", ""),
        ("for=6.6.6.6, for=192.0.2.9", "192.0.2.9", ""),  # the client's own entry is left
        # quoted commas and semicolons separate nothing; the first for= of an element counts
        ('for=203.0.113.7;host="a,for=6.6.6.6"', "203.0.113.7", ""),
        ('for=203.0.113.7;host="a;for=6.6.6.6"', "203.0.113.7", ""),
        ("for=203.0.113.7;for=6.6.6.6", "203.0.113.7", ""),
        # the scheme is the nearest element's only
        ("for=6.6.6.6;proto=https, for=192.0.2.9", "192.0.2.9", ""),
    ],
)
def test_forwarded_when_the_proxy_speaks_it(value: str, client: str, proto: str) -> None:
    assert FORWARDED.client_of("127.0.0.1", [("forwarded", value)]) == (client, proto)
    # ... and X-Forwarded-For is then the client's to fake
    assert FORWARDED.client_of("127.0.0.1", [("x-forwarded-for", "1.2.3.4")])[0] == "127.0.0.1"


@pytest.mark.parametrize(
    ("networks", "key", "trusted"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("::1", "::/64", False),  # ::1 is trusted, the rest of its /64 is not
        ("::/64", "::/64", True),
        ("2001:db8::/120", "2001:db8::/64", False),
        ("2001:db8::/48", "2001:db8::/64", True),
        ("10.0.0.0/8", "::ffff:10.0.0.1", True),
        ("10.0.0.0/8", "", False),
    ],
)
def test_the_per_ip_cap_exemption_judges_the_whole_key(networks, key, trusted) -> None:  # noqa: ANN001
    assert TrustedProxies.parse(networks).trusts_key(key) is trusted


def test_no_trusted_proxy_believes_nobody() -> None:
    none = TrustedProxies()
    assert not none and none.client_of("127.0.0.1", [("x-forwarded-for", "1.2.3.4")]) == (
        "127.0.0.1",
        "",
    )


@pytest.mark.parametrize("text", ["", "10.0.0.0/33", "example.org", "10.0.0.0/8,nope"])
def test_bad_networks_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        TrustedProxies.parse(text)


@pytest.mark.parametrize(
    ("line", "client"),
    [
        (b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80", "198.51.100.22"),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 5000", "2001:db8::1"),
        (b"PROXY UNKNOWN", ""),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2", ""),
        (b"PROXY TCP4 2001:db8::1 203.0.113.7 1 2", None),  # family mismatch
        (b"PROXY TCP4 198.51.100.22 203.0.113.7 99999 80", None),
        (b"PROXY TCP4 198.51.100.22 203.0.113.7 1", None),
        (b"PROXY UDP4 198.51.100.22 203.0.113.7 1 2", None),
        (b"JOIN lobby alice", None),
    ],
)
def test_proxy_v1_lines(line: bytes, client) -> None:  # noqa: ANN001
    assert parse_proxy_v1(line) == client
