"""The exchange core end to end against a real OpenID Provider on 127.0.0.1."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt

from devkit.provider import DevOpenIDProvider
from exchange.core import ExchangeCore
from exchange.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from exchange.server.wiring import build_core
from exchange.tokens import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TokenExchangeRequest
from tests.conftest import exchange_config


def request(subject: str, **fields: Any) -> TokenExchangeRequest:
    fields.setdefault("audience", ("billing",))
    return TokenExchangeRequest(subject_token=subject, **fields)


def jwcrypto_verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Verify with an independent JOSE library, as a resource server would."""
    keyset = jwc_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwc_jwt.JWT(jwt=token, key=keyset, expected_type="JWS")
    claims: dict[str, Any] = json.loads(verified.claims)
    return claims


async def test_exchange_mints_rfc9068_token_verified_by_jwcrypto(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """A red token carries RFC 9068 claims and verifies against red's JWKS with jwcrypto."""
    subject = op.mint({"email": "alice@example.com", "groups": ["x"]}, alg="RS256")
    response = await core.exchange(request(subject), client="shop-frontend")
    header = jwt.get_unverified_header(response.access_token)
    assert header["typ"] == "at+jwt"
    assert header["kid"] == core.keys["red"].current.kid
    claims = jwcrypto_verify(response.access_token, core.zone_jwks("red"))
    assert claims["iss"] == "http://127.0.0.1:8081/zones/red"
    assert claims["sub"] == "alice"
    assert claims["aud"] == "billing"
    assert claims["client_id"] == "shop-frontend"
    assert claims["scope"] == "billing:read"
    assert claims["email"] == "alice@example.com"
    assert "groups" not in claims  # not in the copy list: dropped
    assert {"exp", "iat", "nbf", "jti"} <= claims.keys()
    assert response.expires_in == 300
    assert response.issued_token_type == TOKEN_TYPE_ACCESS_TOKEN
    assert response.to_dict()["token_type"] == "Bearer"


async def test_red_token_fails_against_green_jwks(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """Each zone signs with its own keys: a red token does not verify with green's JWKS."""
    response = await core.exchange(request(op.mint()), client="shop-frontend")
    with pytest.raises(Exception, match=r"(?i)key|signature|verif"):
        jwcrypto_verify(response.access_token, core.zone_jwks("green"))


async def test_es256_subject_and_requested_jwt_type(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """ES256 subjects work, and a requested jwt type is echoed as issued_token_type."""
    response = await core.exchange(
        request(op.mint(alg="ES256"), requested_token_type=TOKEN_TYPE_JWT, audience=("orders",)),
        client="shop-frontend",
    )
    assert response.issued_token_type == TOKEN_TYPE_JWT
    assert response.expires_in == 120
    assert jwcrypto_verify(response.access_token, core.zone_jwks("green"))["aud"] == "orders"


async def test_lifetime_never_outlives_subject(
    core: ExchangeCore, op: DevOpenIDProvider, now: float
) -> None:
    """A subject with 40 s left yields a token with at most 40 s, not the zone's 300 s."""
    response = await core.exchange(request(op.mint({"exp": int(now) + 40})), client="shop-frontend")
    assert 38 <= response.expires_in <= 40
    assert response.claims["exp"] <= int(now) + 40


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"audience": ("billing", "orders")}, InvalidTarget),
        ({"audience": ("nobody",)}, InvalidTarget),
        ({"audience": ()}, InvalidTarget),
        ({"scope": ("billing:write",)}, InvalidScope),
        ({"scope": ("admin",)}, InvalidScope),
        ({"resource": ("billing",)}, InvalidRequest),
        ({"resource": ("http://billing.red.internal#frag",)}, InvalidRequest),
    ],
)
async def test_policy_refusals(
    core: ExchangeCore, op: DevOpenIDProvider, fields: dict[str, Any], error: type[Exception]
) -> None:
    """Targets that disagree or map nowhere, and scopes beyond the grant, are refused."""
    with pytest.raises(error):
        await core.exchange(request(op.mint(), **fields), client="shop-frontend")


async def test_client_without_zone_is_unauthorized(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """A client not allowed red gets unauthorized_client for a red audience."""
    with pytest.raises(UnauthorizedClient):
        await core.exchange(request(op.mint()), client="reports")


async def test_default_zone_and_unknown_client(core: ExchangeCore, op: DevOpenIDProvider) -> None:
    """No audience uses the client's default_zone; an unknown client is invalid_client."""
    response = await core.exchange(request(op.mint(), audience=()), client="reports")
    assert response.claims["aud"] == "orders"
    with pytest.raises(InvalidClient):
        await core.exchange(request(op.mint()), client="ghost")


async def test_resource_and_audience_of_one_zone(core: ExchangeCore, op: DevOpenIDProvider) -> None:
    """Audience and resource naming the same zone are all carried in aud."""
    response = await core.exchange(
        request(op.mint(), resource=("http://billing.red.internal",)), client="shop-frontend"
    )
    assert response.claims["aud"] == ["billing", "http://billing.red.internal"]


async def test_delegation_nests_the_subjects_prior_actors_and_enforces_may_act(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """act names the actor token's subject outermost and nests the subject token's own act
    (RFC 8693 §4.1: prior actors inside); may_act must admit the actor."""
    actor = op.mint({"sub": "gateway"})
    subject = op.mint({"may_act": {"sub": "gateway"}, "act": {"sub": "edge"}})
    response = await core.exchange(
        request(subject, actor_token=actor, actor_token_type=TOKEN_TYPE_ACCESS_TOKEN),
        client="shop-frontend",
    )
    assert response.claims["act"] == {"sub": "gateway", "iss": op.issuer, "act": {"sub": "edge"}}
    stranger = op.mint({"sub": "stranger"})
    with pytest.raises(InvalidRequest, match="may_act"):
        await core.exchange(
            request(subject, actor_token=stranger, actor_token_type=TOKEN_TYPE_ACCESS_TOKEN),
            client="shop-frontend",
        )


async def test_subject_act_chain_is_kept_without_an_actor_token(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """A subject token that records a delegation keeps recording it in the zone token."""
    subject = op.mint({"act": {"sub": "svc-0"}})
    response = await core.exchange(request(subject), client="shop-frontend")
    assert response.claims["act"] == {"sub": "svc-0"}


def _chain(depth: int) -> dict[str, Any]:
    chain: dict[str, Any] = {"sub": "a0"}
    for i in range(1, depth):
        chain = {"sub": f"a{i}", "act": chain}
    return chain


@pytest.mark.parametrize(("depth", "with_actor"), [(5, True), (6, False)])
async def test_actor_chain_deeper_than_five_is_refused(
    core: ExchangeCore, op: DevOpenIDProvider, depth: int, with_actor: bool
) -> None:
    """A delegation chain of more than 5 actors, counting the new actor, is invalid_request."""
    extra: dict[str, Any] = {}
    if with_actor:
        extra = {"actor_token": op.mint({"sub": "gw"}), "actor_token_type": TOKEN_TYPE_ACCESS_TOKEN}
    with pytest.raises(InvalidRequest, match="chain"):
        await core.exchange(
            request(op.mint({"act": _chain(depth)}), **extra), client="shop-frontend"
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: Any, signature: bytes = b"sig") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


HOSTILE: list[tuple[str, Any]] = [
    ("not a JWT", lambda op, now: "hello"),
    ("bad base64", lambda op, now: "e30.!!!.e30"),
    (
        "payload not an object",
        lambda op, now: _forge({"alg": "RS256", "kid": op.default_kid}, [1, 2]),
    ),
    (
        "alg none",
        lambda op, now: _forge(
            {"alg": "none"}, {"iss": op.issuer, "sub": "x", "exp": now + 60}, b""
        ),
    ),
    ("HS256 with the public key", lambda op, now: _hs256_confusion(op, now)),
    ("unknown kid", lambda op, now: op.mint(headers={"kid": "nope"})),
    ("kid with path characters", lambda op, now: op.mint(headers={"kid": "../../etc/passwd"})),
    ("wrong iss", lambda op, now: op.mint({"iss": "https://evil.example"})),
    ("expired", lambda op, now: op.mint({"exp": int(now) - 120})),
    ("nbf in the future", lambda op, now: op.mint({"nbf": int(now) + 3600})),
    ("wrong aud", lambda op, now: op.mint({"aud": "someone-else"})),
    ("no exp", lambda op, now: op.mint({"exp": None})),
    ("crit header", lambda op, now: op.mint(headers={"crit": ["exp"], "exp": 1})),
    ("1 MiB token", lambda op, now: op.mint({"pad": "x" * (1 << 20)})),
    ("tampered signature", lambda op, now: op.mint()[:-6] + "AAAAAA"),
]


def _hs256_confusion(op: DevOpenIDProvider, now: float) -> str:
    from cryptography.hazmat.primitives import serialization

    key = op.keys[op.kid_for("RS256")].private_key.public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = {"iss": op.issuer, "sub": "alice", "aud": "frontend", "exp": int(now) + 60}
    header = {"alg": "HS256", "kid": op.kid_for("RS256"), "typ": "JWT"}
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    import hashlib
    import hmac

    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


@pytest.mark.parametrize(("case", "make"), HOSTILE, ids=[c for c, _ in HOSTILE])
async def test_hostile_subject_tokens_are_invalid_request(
    core: ExchangeCore, op: DevOpenIDProvider, now: float, case: str, make: Any
) -> None:
    """Every hostile subject token is a clear invalid_request, never a crash or a token."""
    token = make(op, now)
    with pytest.raises(InvalidRequest) as raised:
        await core.exchange(request(token), client="shop-frontend")
    assert token[:40] not in raised.value.description
    assert raised.value.description


async def test_issuer_rotation_is_picked_up_without_restart(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """A new kid at the issuer triggers one JWKS refetch and then verifies."""
    await core.exchange(request(op.mint()), client="shop-frontend")
    fetches = op.jwks_fetches
    op.rotate("ES256")
    await core.exchange(request(op.mint()), client="shop-frontend")
    assert op.jwks_fetches == fetches + 1


async def test_issuer_down_keeps_cached_keys_and_fails_fast_on_unknown_kid(
    core: ExchangeCore, op: DevOpenIDProvider
) -> None:
    """While the issuer is down, held keys verify; an unknown kid fails at once as 503."""
    await core.exchange(request(op.mint()), client="shop-frontend")
    op.available = False
    await core.exchange(request(op.mint()), client="shop-frontend")
    new_kid = op.rotate("ES256")
    with pytest.raises(TemporarilyUnavailable, match=r"refetching its keys failed") as raised:
        await core.exchange(request(op.mint(kid=new_kid)), client="shop-frontend")
    assert raised.value.retry_after is not None  # not the user's fault: 503, not 400


async def test_issuer_unreachable_with_nothing_cached_is_temporarily_unavailable(
    op: DevOpenIDProvider,
) -> None:
    """No keys could ever be fetched: 503 temporarily_unavailable, not the user's fault."""
    op.available = False
    core = build_core(exchange_config(op))
    try:
        with pytest.raises(TemporarilyUnavailable) as raised:
            await core.exchange(request(op.mint()), client="shop-frontend")
        assert raised.value.retry_after is not None
    finally:
        await core.close()


async def test_random_kid_flood_is_rate_limited(op: DevOpenIDProvider) -> None:
    """100 tokens with random unknown kids cause at most one JWKS refetch per min_refresh."""
    config = exchange_config(op, jwks_min_refresh=60)
    core = build_core(config)
    try:
        await core.exchange(request(op.mint()), client="shop-frontend")
        before = op.jwks_fetches
        for i in range(100):
            with pytest.raises(InvalidRequest):
                await core.exchange(
                    request(op.mint(headers={"kid": f"random-{i}"})), client="shop-frontend"
                )
        assert op.jwks_fetches - before <= 1
    finally:
        await core.close()
