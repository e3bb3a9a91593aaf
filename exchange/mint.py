"""Minting JWT access tokens (RFC 9068) for a zone."""

from __future__ import annotations

import secrets
from typing import Any

import jwt

from exchange.keys import SigningKey
from exchange.policy import Decision

ACCESS_TOKEN_TYP = "at+jwt"  # RFC 9068 §2.1


def claims_for(
    decision: Decision, *, issuer: str, client_id: str, now: float, jti: str | None = None
) -> dict[str, Any]:
    """The claims of the token (RFC 9068 §2.2), without signing."""
    iat = int(now)
    claims: dict[str, Any] = dict(decision.claims)
    claims.update(
        {
            "iss": issuer,
            "aud": decision.audience[0] if len(decision.audience) == 1 else list(decision.audience),
            "exp": iat + decision.lifetime,
            "iat": iat,
            "nbf": iat,
            "jti": jti or secrets.token_urlsafe(16),
            "client_id": client_id,
        }
    )
    if decision.scope:
        claims["scope"] = " ".join(decision.scope)
    if decision.act is not None:
        claims["act"] = dict(decision.act)
    return claims


def sign(claims: dict[str, Any], key: SigningKey) -> str:
    """A compact JWS with ``typ: at+jwt`` and the key's ``kid``."""
    return jwt.encode(
        claims,
        key.private_key,
        algorithm=key.alg,
        headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYP},
    )
