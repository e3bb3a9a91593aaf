"""The proxy's header rules, pure: a header mapping and plain facts in, headers out."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.headers import (
    BadAuthorization,
    Hop,
    bearer_token,
    drop_copies,
    is_spoofable_identity,
    upstream_headers,
    websocket_protocols,
    with_authorization,
)

HOP = Hop(remote="10.1.2.3", scheme="http", version="1.1", original_host="billing.red.internal")
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"


def up(*pairs: tuple[str, str], hop: Hop = HOP) -> CIMultiDict[str]:
    return upstream_headers(CIMultiDict(pairs), hop)


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("Connection", False),
        ("Keep-Alive", False),
        ("Proxy-Authorization", False),
        ("TE", False),
        ("Transfer-Encoding", False),
        ("Upgrade", False),
        ("Authorization", False),
        ("Expect", False),
        ("Host", False),
        ("Accept", True),
        ("Content-Type", True),
        ("X-Request-Id", True),
    ],
)
def test_hop_by_hop_and_replaced_headers_are_not_forwarded(name: str, kept: bool) -> None:
    """RFC 9110 §7.6.1 hop-by-hop headers, Authorization, Expect and Host stay here."""
    assert (name in up((name, "v"))) is kept


def test_headers_named_in_connection_are_hop_by_hop() -> None:
    """A header listed in Connection is dropped with it, case-insensitively."""
    headers = up(("Connection", "close, X-Secret-Hop"), ("x-secret-hop", "1"), ("Accept", "*/*"))
    assert "x-secret-hop" not in headers and headers["Accept"] == "*/*"


@pytest.mark.parametrize(
    ("name", "spoofable"),
    [
        ("X-Forwarded-User", True),
        ("x_forwarded_user", True),
        ("X-Remote-Anything", True),
        ("X-Auth-Request-Email", True),
        ("X-Goog-Authenticated-User-Email", True),
        ("Cf-Access-Jwt-Assertion", True),
        ("X-Forwarded-For", False),
        ("X-Request-Id", False),
        ("User-Agent", False),
    ],
)
def test_spoofable_identity_headers_are_recognised(name: str, spoofable: bool) -> None:
    """Identity headers an auth proxy would set are dropped, '_' read as '-'."""
    assert is_spoofable_identity(name) is spoofable
    assert (name in up((name, "mallory"))) is not spoofable


def test_forwarded_headers_are_appended_not_replaced() -> None:
    """X-Forwarded-* and Via extend what the app sent; the peer address is the real one."""
    headers = up(("X-Forwarded-For", "192.0.2.7"), ("Via", "1.1 app"))
    assert headers["X-Forwarded-For"] == "192.0.2.7, 10.1.2.3"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "billing.red.internal"
    assert headers["Via"] == "1.1 app, 1.1 zonegate"


def test_unknown_peer_is_said_so() -> None:
    """Without a peer address X-Forwarded-For says unknown rather than inventing one."""
    assert up(hop=Hop(None, "https", "1.1", None))["X-Forwarded-For"] == "unknown"


def test_every_header_holding_the_subject_token_is_dropped() -> None:
    """Copies of the token in any header (cookie, custom) never leave."""
    headers = CIMultiDict([("Cookie", f"session=1; at={TOKEN}"), ("X-Copy", TOKEN), ("A", "b")])
    drop_copies(headers, TOKEN)
    assert list(headers.keys()) == ["A"]


@pytest.mark.parametrize(
    ("values", "token"),
    [
        ([f"Bearer {TOKEN}"], TOKEN),
        ([f"bearer   {TOKEN}  "], TOKEN),
        (["BEARER abc+/~_-.=="], "abc+/~_-.=="),
        ([], None),
    ],
)
def test_bearer_token_reads_one_rfc6750_credential(values: list[str], token: str | None) -> None:
    """RFC 6750 §2.1 syntax, exactly one Authorization header; none at all is no token."""
    assert bearer_token(CIMultiDict(("Authorization", v) for v in values)) == token


@pytest.mark.parametrize(
    "values",
    [
        [f"Basic {TOKEN}"],
        [f"Token {TOKEN}"],
        [f"bearer\t{TOKEN}"],
        [f"Bearer {TOKEN}", f"Bearer {TOKEN}"],
        [f"Bearer {TOKEN}", "Basic eDp5"],
        ["Bearer a b"],
        ["Bearer"],
        ["Bearer "],
        [""],
        [f"Bearer {TOKEN}=x"],
    ],
)
def test_a_malformed_or_repeated_authorization_is_refused(values: list[str]) -> None:
    """Anything but one Bearer credential is BadAuthorization (400), never 'no token': on a
    missing_token: forward route it would otherwise go on without the copy filter."""
    with pytest.raises(BadAuthorization) as caught:
        bearer_token(CIMultiDict(("Authorization", v) for v in values))
    assert TOKEN not in str(caught.value)


def test_zone_token_is_set_last_on_a_copy() -> None:
    """with_authorization leaves the shared headers untouched and puts the zone token last."""
    headers = CIMultiDict([("Accept", "*/*")])
    out = with_authorization(headers, "zone")
    assert list(out.items())[-1] == ("Authorization", "Bearer zone")
    assert "Authorization" not in headers
    assert "Authorization" not in with_authorization(headers, None)


@pytest.mark.parametrize(
    ("values", "offered"),
    [
        (["chat, superchat"], ["chat", "superchat"]),
        ([f"chat, access_token.{TOKEN}"], ["chat"]),
        (["chat", f"base64url.bearer.{TOKEN}, v2"], ["chat", "v2"]),
        ([f"access_token.{TOKEN}"], []),
        ([" , "], []),
        ([], []),
    ],
)
def test_websocket_subprotocols_holding_the_token_are_not_offered(
    values: list[str], offered: list[str]
) -> None:
    """The upstream handshake offers the app's subprotocols, never one holding the token."""
    headers = CIMultiDict(("Sec-WebSocket-Protocol", v) for v in values)
    assert websocket_protocols(headers, TOKEN) == offered
