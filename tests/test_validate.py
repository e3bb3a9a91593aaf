"""Subject token validation at a fixed clock, with keys in hand."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from devkit.provider import DevOpenIDProvider
from exchange.config import TrustedIssuer
from exchange.errors import InvalidRequest
from exchange.validate import peek, verify
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
