"""Subject token validation at a fixed clock, with keys in hand."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from devkit.provider import DevOpenIDProvider
from exchange.config import TrustedIssuer
from exchange.errors import InvalidRequest
from exchange.validate import Unverified, peek, verify
from tests.conftest import NOW

ISSUER = "https://op.example"
OP = DevOpenIDProvider(issuer=ISSUER)
TRUSTED = TrustedIssuer(ISSUER, audiences=("frontend",))


def check(token: str, trusted: TrustedIssuer = TRUSTED, now: float = NOW) -> dict[str, Any]:
    unverified = peek(token, what="subject_token", max_size=16384)
    key = jwt.PyJWK(OP.keys[unverified.kid or OP.default_kid].public_jwk)
    return verify(unverified, token, key, issuer=trusted, now=now, leeway=30)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token_verifies(alg: str) -> None:
    """A well-formed token from the trusted issuer yields its claims."""
    assert check(OP.mint(alg=alg, now=NOW))["sub"] == "alice"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": NOW - 31}, "expired"),
        ({"nbf": NOW + 31}, "nbf"),
        ({"iat": NOW + 31}, "future"),
        ({"iss": "https://evil"}, "iss"),
        ({"aud": "x"}, "aud"),
        ({"aud": None}, "aud"),
        ({"exp": "soon"}, "number"),
        ({"exp": None}, "exp"),
    ],
)
def test_unacceptable_claims_are_invalid_request(claims: dict[str, Any], reason: str) -> None:
    """A subject token we refuse is invalid_request (RFC 8693 §2.2.2) saying why."""
    with pytest.raises(InvalidRequest, match=reason):
        check(OP.mint(claims, now=NOW))


@pytest.mark.parametrize("offset", [-29, 29])
def test_leeway_tolerates_small_skew(offset: int) -> None:
    """exp and nbf within the 30 s leeway still pass."""
    check(OP.mint({"exp": int(NOW) + offset, "nbf": int(NOW) + offset}, now=NOW))


def test_algorithm_outside_issuer_allow_list_is_refused() -> None:
    """An issuer configured for ES256 only refuses an RS256 token."""
    es_only = TrustedIssuer(ISSUER, algorithms=("ES256",))
    with pytest.raises(InvalidRequest, match="not allowed"):
        check(OP.mint(alg="RS256", now=NOW), trusted=es_only)


def test_alg_that_does_not_fit_the_key_is_refused() -> None:
    """A token whose header says ES256 but whose kid names an RSA key is refused."""
    token = OP.mint(alg="RS256", now=NOW)
    unverified = peek(token, what="subject_token", max_size=16384)
    es_key = jwt.PyJWK(OP.keys[OP.kid_for("ES256")].public_jwk)
    with pytest.raises(InvalidRequest):
        verify(unverified, token, es_key, issuer=TRUSTED, now=NOW, leeway=30)


def test_size_limit() -> None:
    """A token larger than max_token_size is refused before any parsing."""
    with pytest.raises(InvalidRequest, match="larger"):
        peek("a.b." + "c" * 20000, what="subject_token", max_size=16384)


# -- one parse: peek() reads the token, verify() checks the signature over the bytes it read ------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict[str, Any], payload: bytes, alg: str = "ES256") -> str:
    """A compact JWS signed by the OP's ``alg`` key over exactly these header and payload."""
    key = OP.keys[OP.kid_for(alg)]
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}"
    signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key.private_key)
    return f"{signing_input}.{_b64(signature)}"


def _claims(remainder: int | None = None) -> bytes:
    """JSON claims, followed by spaces up to a length of ``remainder`` modulo 3 if given."""
    claims = json.dumps(
        {"iss": ISSUER, "sub": "alice", "aud": "frontend", "iat": NOW, "exp": NOW + 300}
    ).encode()
    while remainder is not None and len(claims) % 3 != remainder:
        claims += b" "
    return claims


def _part(token: str, index: int, change: Callable[[str], str]) -> str:
    parts = token.split(".")
    parts[index] = change(parts[index])
    return ".".join(parts)


def _last_bits(segment: str) -> str:
    """The same bytes, spelled with stray low bits in the last character (not canonical)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) | 1]


def _padded(segment: str) -> str:
    return segment + "=" * (-len(segment) % 4)


ES = OP.mint(alg="ES256", now=NOW)
RS = OP.mint(alg="RS256", now=NOW)
ES_KID = OP.kid_for("ES256")
SPELLINGS: list[tuple[str, str, bool]] = [  # (name, token, verify() reads it without PyJWS)
    ("ES256 as minted", ES, True),
    ("RS256 as minted", RS, True),
    ("no kid", _signed({"alg": "ES256"}, _claims()), True),
    ("b64 true", _signed({"alg": "ES256", "kid": ES_KID, "b64": True}, _claims()), False),
    ("b64 false", _signed({"alg": "ES256", "kid": ES_KID, "b64": False}, _claims()), False),
    ("kid a number", _signed({"alg": "ES256", "kid": 7}, _claims()), False),
    ("kid null", _signed({"alg": "ES256", "kid": None}, _claims()), False),
    ("alg none", _signed({"alg": "none", "kid": ES_KID}, _claims()), True),
    ("alg HS256", _signed({"alg": "HS256", "kid": ES_KID}, _claims()), True),
    ("empty signature", _part(ES, 2, lambda s: ""), True),
    ("short signature", _part(ES, 2, lambda s: s[:40]), True),
    ("other signature", _part(ES, 2, lambda s: RS.split(".")[2]), True),
    ("flipped signature", _part(ES, 2, lambda s: ("A" if s[0] != "A" else "B") + s[1:]), True),
    ("signature of 4n+1", _part(ES, 2, lambda s: s + "A" * ((1 - len(s)) % 4)), False),
    ("longer header", _signed({"alg": "ES256", "kid": ES_KID, "x": "ab"}, _claims()), True),
    ("payload of 3n+1 bytes", _signed({"alg": "ES256", "kid": ES_KID}, _claims(1)), True),
    ("stray bits in payload", _part(_signed({"alg": "ES256"}, _claims(1)), 1, _last_bits), False),
    ("padded header", _part(ES, 0, _padded), False),
    ("padded payload", _part(ES, 1, _padded), False),
    ("padded signature", _part(ES, 2, _padded), False),
    ("over-padded signature", _part(ES, 2, lambda s: s + "==="), False),
    ("stray bits in signature", _part(ES, 2, _last_bits), False),
    ("plus in signature", _part(ES, 2, lambda s: "+" + s[1:]), False),
    ("slash in payload", _part(ES, 1, lambda s: s[:8] + "/" + s[9:]), False),
    ("newline in payload", _part(ES, 1, lambda s: s[:10] + "\n" + s[10:]), False),
    ("junk in signature", _part(ES, 2, lambda s: s[:10] + "!!!!" + s[10:]), False),
    ("space in header", _part(ES, 0, lambda s: s[:4] + " " + s[4:]), False),
]


def _outcome(unverified: Unverified, token: str, alg: str) -> tuple[str, Any]:
    key = jwt.PyJWK(OP.keys[OP.kid_for(alg)].public_jwk)
    trusted = TrustedIssuer(ISSUER, audiences=("frontend",), algorithms=(alg, "none", "HS256"))
    try:
        return "claims", verify(unverified, token, key, issuer=trusted, now=NOW, leeway=30)
    except InvalidRequest as e:
        return "refused", e.description


@pytest.mark.parametrize(
    ("token", "direct"), [case[1:] for case in SPELLINGS], ids=[case[0] for case in SPELLINGS]
)
@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_one_parse_answers_as_pyjws_reading_the_token(token: str, direct: bool, alg: str) -> None:
    """verify() checks the signature over the bytes peek() read only when PyJWS would read the
    token to the same bytes (canonical base64url, no b64/crit header, a string kid); for every
    other spelling PyJWS reads the token itself. Either way the answer (claims, or the refusal
    and its words) is the one PyJWS's own reading gives."""
    try:
        unverified = peek(token, what="subject_token", max_size=16384)
    except InvalidRequest as e:  # malformed before any signature: no verify() at all
        assert "well-formed" in e.description, e.description
        return
    assert (unverified.signed is not None) == direct
    through_pyjws = dataclasses.replace(unverified, signed=None)
    assert _outcome(unverified, token, alg) == _outcome(through_pyjws, token, alg)


def test_one_parse_still_verifies() -> None:
    """The direct path is no shortcut: a valid token passes, a changed payload does not."""
    assert check(ES)["sub"] == "alice"
    forged = _part(ES, 1, lambda s: _b64(_claims()))
    assert peek(forged, what="subject_token", max_size=16384).signed is not None
    with pytest.raises(InvalidRequest, match="signature does not verify"):
        check(forged)
