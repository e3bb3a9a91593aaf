"""exchange.tokens.parse_form reads every body as the parse_qsl call it replaced did."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.errors import InvalidRequest
from exchange.tokens import (
    ACTOR_TOKEN_TYPES,
    CLIENT_ASSERTION_TYPE_JWT_BEARER,
    GRANT_TYPE_TOKEN_EXCHANGE,
    REQUESTED_TOKEN_TYPES,
    SUBJECT_TOKEN_TYPES,
    parse_form,
    parse_scope,
)

MAX_FIELDS = 64


def reference(body: bytes) -> dict[str, list[str]] | str:
    """The exchange server's form reading before parse_form (the behaviour to keep): the
    fields, or ``"refused"`` for what became invalid_request."""
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        return "refused"
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def parsed(body: bytes) -> dict[str, list[str]] | str:
    try:
        return parse_form(body, max_fields=MAX_FIELDS)
    except ValueError:
        return "refused"


TOKEN_REQUEST = urllib.parse.urlencode(
    {
        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
        "subject_token": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "billing",
        "scope": "billing:read billing:write",
    }
).encode()

BODIES: list[tuple[str, bytes]] = [
    ("token request", TOKEN_REQUEST),
    (
        "URN with lower-case escapes",
        b"grant_type=urn%3aietf%3aparams%3aoauth%3agrant-type%3atoken-exchange",
    ),
    ("URN unescaped", b"grant_type=" + GRANT_TYPE_TOKEN_EXCHANGE.encode()),
    ("URN as a name", b"urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt=x"),
    ("URN with a plus", b"subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt+"),
    ("URN twice", b"actor_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token" * 2),
    ("empty", b""),
    ("only separators", b"&&&&=&="),
    ("one ampersand", b"&"),
    ("equals only", b"="),
    ("empty name", b"=value"),
    ("empty value", b"grant_type="),
    ("name only", b"grant_type"),
    ("name only twice", b"a&a"),
    ("two equals", b"a=b=c"),
    ("repeated parameter", b"audience=a&audience=b&audience=a"),
    ("repeated single-valued", b"scope=x&scope=y"),
    ("repeated empty", b"scope=&scope="),
    ("plus is a space", b"scope=a+b&a+b=c"),
    ("plus soup", b"++++=++++"),
    ("escaped plus", b"scope=a%2Bb"),
    ("escaped space", b"scope=a%20b"),
    ("escaped ampersand and equals", b"x=a%26b%3Dc"),
    ("lower-case escape", b"x=%3a%2f"),
    ("upper-case escape", b"x=%3A%2F"),
    ("bad escape", b"grant_type=%zz"),
    ("half escape", b"x=%4"),
    ("lone percent", b"grant_type=%"),
    ("percent at the end of a name", b"a%=1"),
    ("escaped percent", b"x=%25zz"),
    ("double escape", b"x=%2541"),
    ("escaped nul", b"subject_token=%00"),
    ("raw nul", b"grant_type=\x00"),
    ("raw control characters", b"x=\x01\x1f\x7f"),
    ("utf-8 escape", b"x=%C3%BC"),
    ("utf-8 escape in a name", b"%C3%BC=1"),
    ("four-byte utf-8 escape", b"x=%F0%9F%98%80"),
    ("overlong utf8 escape", b"grant_type=%c0%af"),
    ("lone continuation byte", b"x=%80"),
    ("truncated utf-8", b"x=%C3"),
    ("escaped surrogate", b"x=%ED%A0%80"),
    ("escaped latin-1", b"x=%FC"),
    ("raw non-ascii", "grant_type=ü".encode()),
    ("raw latin-1 byte", b"x=\xfc"),
    ("raw non-ascii in a later field", b"a=1&b=\xc3\xbc"),
    ("semicolon is no separator", b"a=1;b=2"),
    ("question mark", b"?a=1"),
    ("hash", b"a=1#frag"),
    ("spaces", b" a = 1 "),
    ("crlf", b"a=1\r\nb=2"),
    ("64 fields", b"&".join(b"f%d=1" % i for i in range(64))),
    ("65 fields", b"&".join(b"f%d=1" % i for i in range(65))),
    ("63 separators, all empty", b"&" * 63),
    ("64 separators, all empty", b"&" * 64),
    ("trailing separator at 64", b"&".join(b"f%d=1" % i for i in range(64)) + b"&"),
    ("64 KiB value", b"x=" + b"a" * (64 * 1024 - 2)),
    ("64 KiB + 1 value", b"x=" + b"a" * (64 * 1024 - 1)),
    ("1 MiB of escapes", b"x=" + b"%41" * (1 << 18)),
    ("1 MiB of separators", b"&" * (1 << 20)),
]


@pytest.mark.parametrize("body", [case[1] for case in BODIES], ids=[case[0] for case in BODIES])
def test_parse_form_reads_as_parse_qsl_did(body: bytes) -> None:
    """Hostile and ordinary bodies: the same fields, or the same refusal, as before."""
    assert parsed(body) == reference(body)


def test_token_request_fields() -> None:
    """The fields of an ordinary token request, values unescaped."""
    form = parse_form(TOKEN_REQUEST, max_fields=MAX_FIELDS)
    assert form["grant_type"] == [GRANT_TYPE_TOKEN_EXCHANGE]
    assert form["scope"] == ["billing:read billing:write"]
    assert parse_form(b"a=1&a=&a", max_fields=MAX_FIELDS) == {"a": ["1", "", ""]}


FORM_BYTES = st.lists(
    st.sampled_from(
        [
            b"&",
            b"=",
            b"+",
            b"%",
            b"a",
            b"Z",
            b"0",
            b"9",
            b"f",
            b"F",
            b"%41",
            b"%C3",
            b"%BC",
            b"%80",
            b"%2B",
            b"%26",
            b"%3D",
            b"%zz",
            b"%0",
            b" ",
            b"\x00",
            b"\x7f",
            b"\xc3",
            b"\xbc",
            b"\xff",
        ]
    ),
    max_size=80,
).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(FORM_BYTES)
def test_parse_form_matches_parse_qsl_on_random_bodies(body: bytes) -> None:
    """Random mixes of separators, escapes (good, bad, partial, non-UTF-8) and raw bytes."""
    assert parsed(body) == reference(body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_parse_form_matches_parse_qsl_on_any_bytes(body: bytes) -> None:
    """Any bytes at all."""
    assert parsed(body) == reference(body)


URNS = sorted(
    {GRANT_TYPE_TOKEN_EXCHANGE, CLIENT_ASSERTION_TYPE_JWT_BEARER}
    | SUBJECT_TOKEN_TYPES
    | ACTOR_TOKEN_TYPES
    | REQUESTED_TOKEN_TYPES
)


@pytest.mark.parametrize("urn", URNS)
@pytest.mark.parametrize("safe", ["", ":"])
def test_vocabulary_reads_as_before(urn: str, safe: str) -> None:
    """The RFC 8693 URNs, escaped as encoders write them or not, as names and values."""
    value = urllib.parse.quote(urn, safe=safe).encode()
    for body in (b"x=" + value, value + b"=x", value, b"x=" + value.lower(), b"x=" + value + b"+"):
        assert parsed(body) == reference(body)


def reference_scope_allows(value: str) -> bool:
    """The scope character check before the regular expression (RFC 6749 §3.3)."""
    return all(ch == " " or ("\x21" <= ch <= "\x7e" and ch not in '"\\') for ch in value)


@pytest.mark.parametrize("code", range(0x180))
def test_scope_characters_as_before(code: int) -> None:
    """Every character up to U+017F, alone and between scope tokens, is allowed or refused as
    before."""
    for value in (chr(code), f"a{chr(code)}b", f"read {chr(code)}"):
        try:
            parse_scope(value)
            allowed = True
        except InvalidRequest:
            allowed = False
        assert allowed == reference_scope_allows(value), repr(value)
