"""Trusted proxies without sockets: who the client is behind them, and PROXY v1 lines."""

from __future__ import annotations

import ipaddress

import pytest

from router.proxies import (
    PROXY_V1_MAX_BYTES,
    PROXY_V2_MAX_BYTES,
    PROXY_V2_SIGNATURE,
    BadProxyHeader,
    ProxyHeader,
    TrustedProxies,
    parse_proxy_v1,
    read_proxy_header,
)

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


# --- read_proxy_header: v1 and v2 at the front of a trusted peer's input -------------------


def v2_header(
    family: int, addresses: bytes, command: int = 1, version: int = 2, tlvs: bytes = b""
) -> bytes:
    body = addresses + tlvs
    return (
        PROXY_V2_SIGNATURE
        + bytes([version << 4 | command, family])
        + len(body).to_bytes(2, "big")
        + body
    )


def v4_addresses(source: str, destination: str = "127.0.0.1") -> bytes:
    return (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
        + (40000).to_bytes(2, "big")
        + (5000).to_bytes(2, "big")
    )


def v6_addresses(source: str, destination: str = "::1") -> bytes:
    return (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + (40000).to_bytes(2, "big")
        + (5000).to_bytes(2, "big")
    )


TLV = bytes([0x01, 0x00, 0x02]) + b"h2"  # PP2_TYPE_ALPN "h2"

GOOD_HEADERS = [
    (b"PROXY TCP4 198.51.100.22 127.0.0.1 1 2\r\n", "198.51.100.22"),
    (b"PROXY UNKNOWN\r\n", ""),
    (v2_header(0x11, v4_addresses("198.51.100.22")), "198.51.100.22"),
    (v2_header(0x11, v4_addresses("198.51.100.22"), tlvs=TLV), "198.51.100.22"),
    (v2_header(0x21, v6_addresses("2001:db8::7")), "2001:db8::7"),
    (v2_header(0x21, v6_addresses("::ffff:198.51.100.9")), "198.51.100.9"),
    (v2_header(0x11, v4_addresses("198.51.100.22"), command=0), ""),  # LOCAL: a health check
    (v2_header(0x00, b""), ""),  # UNSPEC
]


@pytest.mark.parametrize(("header", "client"), GOOD_HEADERS, ids=range(len(GOOD_HEADERS)))
def test_a_proxy_header_names_the_client_and_leaves_what_follows(header: bytes, client) -> None:  # noqa: ANN001
    found = read_proxy_header(header + b"JOIN lobby alice\n")
    assert found == ProxyHeader(client, len(header))


@pytest.mark.parametrize(("header", "client"), GOOD_HEADERS, ids=range(len(GOOD_HEADERS)))
def test_a_proxy_header_split_anywhere_waits_for_the_rest(header: bytes, client) -> None:  # noqa: ANN001
    for cut in range(1, len(header)):
        assert read_proxy_header(header[:cut]) is None, cut
    assert read_proxy_header(header) == ProxyHeader(client, len(header))


@pytest.mark.parametrize(
    "data", [b"JOIN lobby alice\n", b"P", b"\r\n", b"PROXY"], ids=["join", "p", "crlf", "proxy"]
)
def test_input_without_a_header_is_the_clients_own(data: bytes) -> None:
    found = read_proxy_header(data + b"X")
    assert found == ProxyHeader("", 0)


BAD_HEADERS = [
    v2_header(0x11, v4_addresses("198.51.100.22"), version=1),
    v2_header(0x11, v4_addresses("198.51.100.22"), command=2),
    v2_header(0x12, v4_addresses("198.51.100.22")),  # UDP over IPv4
    v2_header(0x11, v4_addresses("198.51.100.22")[:8]),  # too short for its addresses
    v2_header(0x21, v4_addresses("198.51.100.22")),  # IPv6 family, IPv4-sized addresses
    v2_header(0x11, v4_addresses("198.51.100.22"), tlvs=b"\x00" * PROXY_V2_MAX_BYTES),
    b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n",
    b"PROXY " + b"x" * PROXY_V1_MAX_BYTES,  # no CRLF where one must be
]


@pytest.mark.parametrize("data", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
def test_a_bad_proxy_header_is_refused(data: bytes) -> None:
    with pytest.raises(BadProxyHeader):
        read_proxy_header(data)


def test_a_v2_header_over_the_limit_is_refused_before_it_is_all_read() -> None:
    header = v2_header(0x11, v4_addresses("198.51.100.22"), tlvs=b"\x00" * PROXY_V2_MAX_BYTES)
    with pytest.raises(BadProxyHeader):
        read_proxy_header(header[:16])
