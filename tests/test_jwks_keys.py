"""Which keys of a trusted issuer's JWKS may verify, and ECDSA signature spellings."""

from __future__ import annotations

import base64
import logging
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.warnings import InsecureKeyLengthWarning

from exchange.clientauth import presented_credentials
from exchange.config import parse_exchange_config
from exchange.core import ExchangeCore
from exchange.errors import InvalidClient, InvalidRequest
from exchange.keys import public_jwk, thumbprint
from exchange.server.wiring import build_core
from exchange.tokens import TokenExchangeRequest
from tests import test_clientauth as clientauth_tests
from tests.conftest import NOW, exchange_document

ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class JwksProvider:
    """An OpenID Provider on 127.0.0.1 whose JWKS document is whatever a test publishes."""

    issuer: str = ""
    published: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks.json", self._jwks)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks.json"})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": self.published})

    def mint(self, key: Any, alg: str, kid: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "alice", "aud": "frontend", "iat": now,
                  "exp": now + 300}  # fmt: skip
        with warnings.catch_warnings():  # PyJWT warns of a weak key: minting one is the point
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)
            return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def jwk_of(key: Any, **members: Any) -> dict[str, Any]:
    jwk = public_jwk(key)
    jwk["kid"] = thumbprint(jwk)
    jwk.update(members)
    return jwk


@pytest.fixture
async def provider(aiohttp_server: ServerFactory) -> JwksProvider:
    p = JwksProvider()
    server = await aiohttp_server(p.app(), host="127.0.0.1")
    p.issuer = str(server.make_url("")).rstrip("/")
    return p


@pytest.fixture
async def core(provider: JwksProvider) -> AsyncIterator[ExchangeCore]:
    document = exchange_document(provider)  # type: ignore[arg-type]
    c = build_core(parse_exchange_config(document, Path.cwd()))
    yield c
    await c.close()


async def exchange(core: ExchangeCore, subject: str) -> str:
    request = TokenExchangeRequest(subject_token=subject, audience=("billing",))
    return (await core.exchange(request, client="shop-frontend")).access_token


P256_ORDER = (
    0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # FIPS 186-4 D.1.2.3
)
GOOD = ec.generate_private_key(ec.SECP256R1())  # published beside every case: a usable key


@pytest.mark.parametrize(
    ("members", "verifies"),
    [
        ({}, True),
        ({"use": "sig"}, True),
        ({"key_ops": ["verify"]}, True),
        ({"use": "sig", "key_ops": ["verify"]}, True),
        ({"key_ops": ["sign"]}, False),
        ({"key_ops": ["encrypt", "wrapKey"]}, False),
        ({"key_ops": "verify"}, False),
        ({"use": "sig", "key_ops": ["verify", "encrypt"]}, False),
        ({"use": "enc", "key_ops": ["verify"]}, False),
        ({"use": "enc"}, False),
    ],
)
async def test_only_keys_meant_to_verify_verify(
    provider: JwksProvider, core: ExchangeCore, members: dict[str, Any], verifies: bool
) -> None:
    """A key whose key_ops exclude verify, or whose use and key_ops disagree, verifies nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwk_of(key, **members)
    provider.published = [jwk, jwk_of(GOOD)]
    subject = provider.mint(key, "ES256", jwk["kid"])
    if verifies:
        assert await exchange(core, subject)
    else:
        with pytest.raises(InvalidRequest, match="does not publish"):
            await exchange(core, subject)


async def test_rsa_keys_under_2048_bits_verify_nothing(
    provider: JwksProvider, core: ExchangeCore
) -> None:
    """A 1024-bit RSA key in the issuer's JWKS is skipped; a 2048-bit one verifies."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    strong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    provider.published = [jwk_of(weak), jwk_of(strong)]
    with pytest.raises(InvalidRequest, match="does not publish"):
        await exchange(core, provider.mint(weak, "RS256", jwk_of(weak)["kid"]))
    assert await exchange(core, provider.mint(strong, "RS256", jwk_of(strong)["kid"]))


async def test_a_duplicated_kid_is_refused_whole(
    provider: JwksProvider, core: ExchangeCore, caplog: pytest.LogCaptureFixture
) -> None:
    """A kid listed twice (a planted key beside the genuine one) verifies neither token, and
    the operator is warned; other keys keep working."""
    genuine = ec.generate_private_key(ec.SECP256R1())
    planted = ec.generate_private_key(ec.SECP256R1())
    kid = jwk_of(genuine)["kid"]
    provider.published = [jwk_of(planted, kid=kid), jwk_of(genuine), jwk_of(GOOD)]
    for key in (planted, genuine):
        with pytest.raises(InvalidRequest, match="does not publish"):
            await exchange(core, provider.mint(key, "ES256", kid))
    assert await exchange(core, provider.mint(GOOD, "ES256", jwk_of(GOOD)["kid"]))
    warnings = [r for r in caplog.records if "more than once" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)


# -- ECDSA: one token, two spellings ------------------------------------------------------------


def b64d(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def s_value(token: str) -> tuple[int, int]:
    """(s, n) of an ES256 token's signature (r || s, 32 bytes each)."""
    signature = b64d(token.rsplit(".", 1)[1])
    assert len(signature) == 64
    return int.from_bytes(signature[32:], "big"), P256_ORDER


def malleate(token: str) -> str:
    """The twin of an ECDSA JWS: (r, n - s) verifies wherever (r, s) does."""
    head, sig = token.rsplit(".", 1)
    signature = b64d(sig)
    size = len(signature) // 2
    s, n = s_value(token)
    twin = signature[:size] + (n - s).to_bytes(size, "big")
    return head + "." + base64.urlsafe_b64encode(twin).rstrip(b"=").decode()


async def test_zone_tokens_are_signed_in_low_s_form(provider: JwksProvider) -> None:
    """Every ES256 zone token carries the low-S signature: one spelling per token, accepted by
    resource servers that refuse high-S signatures."""
    key = ec.generate_private_key(ec.SECP256R1())
    provider.published = [jwk_of(key)]
    document = exchange_document(provider)  # type: ignore[arg-type]
    core = build_core(parse_exchange_config(document, Path.cwd()))  # ephemeral ES256 zone keys
    try:
        subject = provider.mint(key, "ES256", jwk_of(key)["kid"])
        for _ in range(40):  # a signer that ignores S's half picks high-S half the time
            s, n = s_value(await exchange(core, subject))
            assert s <= n // 2
    finally:
        await core.close()


async def test_a_malleated_subject_token_is_the_same_token(
    provider: JwksProvider, core: ExchangeCore
) -> None:
    """The high-S twin of a genuine ES256 subject token is exchanged like the original: same
    subject, same claims (refusing high-S would refuse about half of all ES256 tokens that
    OpenID Providers sign, since RFC 7518 does not ask for low-S)."""
    key = ec.generate_private_key(ec.SECP256R1())
    provider.published = [jwk_of(key)]
    subject = provider.mint(key, "ES256", jwk_of(key)["kid"])
    twin = malleate(subject)
    assert twin != subject
    for token in (subject, twin):
        zone_token = await exchange(core, token)
        assert jwt.decode(zone_token, options={"verify_signature": False})["sub"] == "alice"


async def test_the_twin_of_a_used_client_assertion_is_a_replay() -> None:
    """A private_key_jwt assertion respelled as its high-S twin is refused as a replay: the
    replay check rests on the jti, not on the token's bytes."""
    auth = clientauth_tests.authenticator(clientauth_tests.config())
    token = clientauth_tests.assertion()
    twin = malleate(token)
    first = presented_credentials(None, clientauth_tests.assertion_form(token))
    assert (await auth.authenticate(first, now=NOW)).client_id == "signer"
    again = presented_credentials(None, clientauth_tests.assertion_form(twin))
    with pytest.raises(InvalidClient, match="replay"):
        await auth.authenticate(again, now=NOW + 1)
