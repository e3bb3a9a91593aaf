"""The proxy's header rules, pure: a header mapping and plain facts in, headers out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.headers import (
    SPOOFABLE_IDENTITY,
    BadAuthorization,
    Hop,
    answer_fields,
    bearer_token,
    is_spoofable_identity,
    removed_for_safety,
    upstream_fields,
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


# Every entry of SPOOFABLE_IDENTITY by an example header; names not to drop stay below.
SPOOFED_BY_SOURCE = [
    ("X-Forwarded-User", "oauth2-proxy"),
    ("X-Forwarded-Email", "oauth2-proxy"),
    ("X-Forwarded-Preferred-Username", "oauth2-proxy"),
    ("X-Forwarded-Groups", "oauth2-proxy"),
    ("X-Forwarded-Access-Token", "oauth2-proxy"),
    ("X-Auth-Request-Email", "oauth2-proxy"),
    ("X-Forwarded-Client-Cert", "Envoy"),
    ("X-Remote-User", "Kubernetes"),
    ("X-Remote-Extra-Scopes", "Kubernetes"),
    ("Remote-User", "Authelia"),
    ("Remote-Groups", "Authelia"),
    ("X-Consumer-Username", "Kong"),
    ("X-Authenticated-Userid", "Kong"),
    ("X-Authenticated-Scope", "Kong"),
    ("X-Authenticated-Groups", "Kong"),
    ("X-Credential-Identifier", "Kong"),
    ("X-Credential-Username", "Kong"),
    ("X-Anonymous-Consumer", "Kong"),
    ("X-Userinfo", "kong-oidc"),
    ("X-Id-Token", "kong-oidc"),
    ("X-Access-Token", "kong-oidc"),
    ("X-Jwt-Assertion", "WSO2"),
    ("X-Endpoint-Api-Userinfo", "Cloud Endpoints"),
    ("X-Goog-Authenticated-User-Email", "IAP"),
    ("X-Goog-Authenticated-User-Id", "IAP"),
    ("X-Goog-Iap-Jwt-Assertion", "IAP"),
    ("X-Webauth-User", "Grafana"),
    ("Cf-Access-Jwt-Assertion", "Cloudflare"),
    ("Cf-Access-Authenticated-User-Email", "Cloudflare"),
    ("X-MS-CLIENT-PRINCIPAL", "Azure"),
    ("X-MS-CLIENT-PRINCIPAL-NAME", "Azure"),
    ("X-MS-TOKEN-AAD-ACCESS-TOKEN", "Azure"),
    ("X-MS-TOKEN-AAD-ID-TOKEN", "Azure"),
    ("X-ARR-ClientCert", "Azure"),
    ("X-Amzn-Oidc-Data", "AWS"),
    ("X-Amzn-Mtls-Clientcert", "AWS"),
    ("X-Amzn-Mtls-Clientcert-Leaf", "AWS"),
    ("X-Pomerium-Jwt-Assertion", "Pomerium"),
    ("Client-Cert", "RFC 9440"),
    ("Client-Cert-Chain", "RFC 9440"),
    ("X-Client-Cert", "client certificate"),
    ("X-Client-Cert-Chain-Verified", "client certificate"),
    ("X-SSL-Cert", "client certificate"),
    ("X-SSL-Client-S-DN", "client certificate"),
    ("SSL-Client-Cert", "mod_ssl"),
    ("OIDC_CLAIM_email", "mod_auth_openidc"),
    ("OIDC-Access-Token", "mod_auth_openidc"),
    ("OIDC_id_token", "mod_auth_openidc"),
    ("Tailscale-User-Login", "Tailscale"),
    ("Tailscale-User-Name", "Tailscale"),
    ("X-Vouch-User", "Vouch"),
    ("X-Vouch-Idp-Claims-Groups", "Vouch"),
    ("X-Auth-User", "forward-auth"),
    ("X-User", "gateway"),
    ("X-User-Id", "gateway"),
    ("X-Original-URL", "path override"),
    ("X-Rewrite-URL", "path override"),
]
NOT_SPOOFABLE = [
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "X-Request-Id",
    "User-Agent", "Accept", "Cookie", "X-Users-Count", "Remote", "X-Auth", "Oidc",
    "X-Client-Id", "Tailscale-Other", "X-Ms-Request-Id", "Client-Certain",
]  # fmt: skip


def spellings(name: str) -> list[str]:
    """The name, lower-cased, upper-cased and with every '-' as '_' (and the reverse)."""
    return [name, name.lower(), name.upper(), name.replace("-", "_"), name.replace("_", "-")]


@pytest.mark.parametrize(("name", "source"), SPOOFED_BY_SOURCE)
def test_spoofable_identity_headers_are_dropped_in_every_spelling(name: str, source: str) -> None:
    """An identity, client-certificate or path-override header that some auth proxy sets is
    dropped, in any case and with '_' read as '-'; the table names who sets it."""
    for spelling in spellings(name):
        assert is_spoofable_identity(spelling), spelling
        assert spelling not in up((spelling, "mallory"), ("Accept", "*/*"))
    assert any(source.lower() in who.lower() for _, who in matching_entries(name)), name


@pytest.mark.parametrize("name", NOT_SPOOFABLE)
def test_other_headers_are_not_taken_for_identity_headers(name: str) -> None:
    """Names outside the table pass (Forwarded and X-Forwarded-* are appended to, not dropped)."""
    assert not is_spoofable_identity(name)


def matching_entries(name: str) -> list[tuple[str, str]]:
    folded = name.lower().replace("_", "-")
    return [
        (entry, who)
        for entry, who in SPOOFABLE_IDENTITY
        if folded == entry or (entry.endswith("*") and folded.startswith(entry[:-1]))
    ]


def test_every_table_entry_is_a_lower_case_name_or_prefix_with_a_source() -> None:
    """The table is data: lower-case '-' spelling, '*' only at the end, a source each, no
    entry shadowed by a prefix (a dead row would say more than the code does)."""
    names = [entry for entry, _ in SPOOFABLE_IDENTITY]
    assert len(names) == len(set(names))
    for entry, who in SPOOFABLE_IDENTITY:
        assert entry == entry.lower() and "_" not in entry and "*" not in entry[:-1]
        assert who.strip()
        others = [e[:-1] for e in names if e.endswith("*") and e != entry]
        assert not entry.rstrip("*").startswith(tuple(others)), f"{entry} is shadowed"
    covered = {n.lower() for n, _ in SPOOFED_BY_SOURCE}
    for entry in names:  # every row has an example above
        assert any(
            c == entry or (entry.endswith("*") and c.startswith(entry[:-1])) for c in covered
        ), entry


def test_docs_print_the_table_as_the_code_holds_it() -> None:
    """docs/sidecar.md lists exactly the entries and sources of SPOOFABLE_IDENTITY."""
    text = (Path(__file__).parents[1] / "docs" / "sidecar.md").read_text()
    table = text.split("| header | set by |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\s*\| `([^`]+)` \| (.+?) \|$", table, re.MULTILINE)
    assert tuple(rows) == SPOOFABLE_IDENTITY


def test_forwarded_headers_are_appended_not_replaced() -> None:
    """X-Forwarded-*, Forwarded (RFC 7239) and Via extend what the app sent: the last element
    of each is the sidecar's own view, the peer address the real one."""
    headers = up(
        ("X-Forwarded-For", "192.0.2.7"), ("Via", "1.1 app"),
        ("Forwarded", 'for=192.0.2.7;host="admin.internal"'),
    )  # fmt: skip
    assert headers["X-Forwarded-For"] == "192.0.2.7, 10.1.2.3"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == "billing.red.internal"
    assert headers["Via"] == "1.1 app, 1.1 zonegate"
    assert headers["Forwarded"] == (
        'for=192.0.2.7;host="admin.internal", for=10.1.2.3;proto=http;host=billing.red.internal'
    )


@pytest.mark.parametrize(
    ("hop", "element"),
    [
        (Hop("10.1.2.3", "http", "1.1", None), "for=10.1.2.3;proto=http"),
        (
            Hop("::1", "https", "1.1", "127.0.0.1:4480"),
            'for="[::1]";proto=https;host="127.0.0.1:4480"',
        ),
        (Hop(None, "http", "1.1", 'a"b'), 'for=unknown;proto=http;host="a\\"b"'),
    ],
)
def test_the_forwarded_element_quotes_what_is_not_a_token(hop: Hop, element: str) -> None:
    """RFC 7239 §4/§6: IPv6 in brackets and quoted, a host with a port quoted."""
    assert up(hop=hop)["Forwarded"] == element


def test_unknown_peer_is_said_so() -> None:
    """Without a peer address X-Forwarded-For says unknown rather than inventing one."""
    assert up(hop=Hop(None, "https", "1.1", None))["X-Forwarded-For"] == "unknown"


def test_every_header_holding_the_subject_token_is_dropped() -> None:
    """Copies of the token in any header (cookie, custom) never leave."""
    headers = CIMultiDict([("Cookie", f"session=1; at={TOKEN}"), ("X-Copy", TOKEN), ("A", "b")])
    unsafe = removed_for_safety(headers, TOKEN)
    assert unsafe == ("cookie", "x-copy")
    assert "A" in upstream_headers(headers, HOP, unsafe=unsafe)
    assert not {"Cookie", "X-Copy"} & set(upstream_headers(headers, HOP, unsafe=unsafe))


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


RFC6750_CREDENTIAL = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet="Bb earR=+/-._~aZ09\t\n%\x00é", max_size=24)
    | st.builds(lambda t, tail: f"Bearer {t}{tail}", st.text("aZ09-._~+/=", min_size=1), st.text(" =x\t", max_size=3))
)  # fmt: skip
def test_bearer_token_is_exactly_rfc6750_credential_syntax(value: str) -> None:
    """The fast path for the usual spelling answers what the RFC 6750 §2.1 grammar does."""
    m = RFC6750_CREDENTIAL.match(value)
    try:
        token = bearer_token(CIMultiDict([("Authorization", value)]))
    except BadAuthorization:
        assert m is None
    else:
        assert m is not None and token == m.group(1)


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


def test_headers_named_for_removal_never_include_authorization() -> None:
    """The authz listener names spoofable identity headers (``_`` or ``-``), Proxy-Authorization
    and copies of the token for Envoy to remove, never Authorization itself."""
    headers = CIMultiDict(
        [
            ("Authorization", f"Bearer {TOKEN}"),
            ("X_Forwarded_User", "admin"),
            ("Remote-User", "admin"),
            ("Proxy-Authorization", "Basic YTpi"),
            ("X-Trace", f"t={TOKEN}"),
            ("Accept", "*/*"),
        ]
    )
    assert removed_for_safety(headers, TOKEN) == (
        "proxy-authorization",
        "remote-user",
        "x-trace",
        "x_forwarded_user",
    )
    assert removed_for_safety(CIMultiDict([("Accept", "*/*")]), None) == ()


def test_answer_fields_drop_hop_by_hop_and_connection_listed_headers() -> None:
    """The app never gets the upstream's hop-by-hop headers, nor those its Connection names."""
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Utf8", "é".encode()),
    ]
    assert answer_fields(raw) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Utf8", "é"),
    ]


def test_upstream_fields_append_this_hop_and_put_the_zone_token_last() -> None:
    """The list the client writes: app headers, the hop's forwarding headers, then the token."""
    headers = CIMultiDict(
        [("X-Forwarded-For", "10.0.0.1"), ("Content-Length", "3"), ("A", "1"), ("Via", "1.0 a")]
    )
    fields = upstream_fields(headers, HOP, token="zone")
    assert fields[0] == ("A", "1")
    assert ("X-Forwarded-For", f"10.0.0.1, {HOP.remote}") in fields
    assert ("Via", "1.0 a, 1.1 zonegate") in fields
    assert "Content-Length" not in dict(fields)  # the client frames the body itself
    assert fields[-1] == ("Authorization", "Bearer zone")
    assert list(upstream_headers(headers, HOP).items()) == fields[:-1]
