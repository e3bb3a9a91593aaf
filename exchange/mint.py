"""Minting JWT access tokens (RFC 9068) for a zone."""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.utils import base64url_encode

from exchange.keys import SigningKey, low_s
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


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class _Signer:
    header: bytes  # the encoded JOSE header and the dot after it
    algorithm: Algorithm


@functools.lru_cache(maxsize=32)
def _signer(key: SigningKey) -> _Signer:
    """What ``jwt.encode`` rebuilt for every token: the header segment and the algorithm."""
    algorithm = get_default_algorithms()[key.alg]
    header = {"alg": key.alg, "kid": key.kid, "typ": ACCESS_TOKEN_TYP}
    segment = base64url_encode(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    return _Signer(segment + b".", algorithm)


def sign(claims: dict[str, Any], key: SigningKey) -> str:
    """A compact JWS with ``typ: at+jwt`` and the key's ``kid``: the bytes ``jwt.encode`` makes,
    with the header encoded once per key (PyJWT's own algorithm signs)."""
    signer = _signer(key)
    signing_input = signer.header + base64url_encode(_COMPACT_JSON(claims).encode())
    signature = signer.algorithm.sign(signing_input, key.private_key)
    if key.alg.startswith("ES"):  # one spelling per token: the low-S form of the signature
        signature = low_s(signature)
    return (signing_input + b"." + base64url_encode(signature)).decode()
