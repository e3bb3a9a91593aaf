"""Client authentication at a fixed clock: credential parsing, secrets, private_key_jwt, replay."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest

from exchange.clientauth import (
    CLIENT_ASSERTION,
    CLIENT_SECRET_BASIC,
    CLIENT_SECRET_POST,
    NONE,
    NOTHING,
    ClientAuthenticator,
    Presented,
    ReplayCache,
    presented_credentials,
)
from exchange.config import ExchangeConfig, RateLimit, parse_exchange_config
from exchange.errors import InvalidClient, InvalidRequest, SlowDown, TemporarilyUnavailable
from exchange.issuers import FetchFailed
from exchange.keys import generate_private_key, signing_key
from exchange.ratelimit import RateLimiter, TokenBucket
from exchange.tokens import CLIENT_ASSERTION_TYPE_JWT_BEARER
from runtime.configload import ConfigError
from tests.conftest import NOW

ISSUER = "https://tx.example"
TOKEN_ENDPOINT = f"{ISSUER}/token"
WEIRD_SECRET = "p:a+ss%20 w/rd"
SIGNER = signing_key(generate_private_key("ES256"))


def config(**client_overrides: Any) -> ExchangeConfig:
    """Clients of every secret/JWT method; zones and issuers only as the model requires."""
    document = {
        "issuer": ISSUER,
        "trusted_issuers": [{"issuer": "https://op.example"}],
        "zones": {"red": {"audiences": ["billing"]}},
        "clients": [
            {"client_id": "basic", "client_secret": "s3cret", "zones": ["red"]},
            {"client_id": "weird+id", "client_secret": WEIRD_SECRET, "zones": ["red"]},
            {"client_id": "poster", "auth": "client_secret_post", "client_secret": "p0st"},
            {
                "client_id": "hashed",
                "client_secret_sha256": "a" * 64,
                **client_overrides,
            },
            {
                "client_id": "signer",
                "auth": "private_key_jwt",
                "jwks": {"keys": [SIGNER.public_jwk]},
            },
            {"client_id": "public", "auth": "none"},
        ],
    }
    return parse_exchange_config(document, Path.cwd())


class NoFetch:
    """A fetcher for tests whose clients all carry inline keys: any fetch is a test failure."""

    async def __call__(self, url: str) -> tuple[dict[str, Any], str | None]:
        raise FetchFailed(f"this test fetches nothing, yet asked for {url}")

    async def close(self) -> None:
        pass


def authenticator(document_config: ExchangeConfig) -> ClientAuthenticator:
    return ClientAuthenticator(document_config, fetch=NoFetch(), clock=lambda: NOW)


@pytest.fixture
def auth() -> ClientAuthenticator:
    return authenticator(config())


def basic(client_id: str, secret: str, *, form_encoded: bool) -> str:
    if form_encoded:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def assertion(**overrides: Any) -> str:
    claims: dict[str, Any] = {
        "iss": "signer",
        "sub": "signer",
        "aud": TOKEN_ENDPOINT,
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": secrets.token_urlsafe(8),
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, SIGNER.private_key, algorithm="ES256", headers={"kid": SIGNER.kid})


def assertion_form(token: str) -> dict[str, list[str]]:
    return {
        "client_assertion": [token],
        "client_assertion_type": [CLIENT_ASSERTION_TYPE_JWT_BEARER],
    }


@pytest.mark.parametrize("form_encoded", [True, False])
async def test_basic_accepts_form_encoded_and_raw(
    auth: ClientAuthenticator, form_encoded: bool
) -> None:
    """Basic credentials work form-urlencoded (RFC 6749 §2.3.1) and raw (google-auth, curl)."""
    presented = presented_credentials(
        basic("weird+id", WEIRD_SECRET, form_encoded=form_encoded), {}
    )
    assert presented.method == CLIENT_SECRET_BASIC
    assert (await auth.authenticate(presented, now=NOW)).client_id == "weird+id"


async def test_basic_wrong_secret_is_invalid_client_with_challenge(
    auth: ClientAuthenticator,
) -> None:
    """A wrong secret is invalid_client and asks for Basic again."""
    presented = presented_credentials(basic("basic", "nope", form_encoded=False), {})
    with pytest.raises(InvalidClient) as e:
        await auth.authenticate(presented, now=NOW)
    assert e.value.basic_tried


@pytest.mark.parametrize(
    "header",
    ["Bearer abc", "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode()],
)
def test_malformed_authorization_is_invalid_client(header: str) -> None:
    """An Authorization header that is not Basic id:secret is invalid_client."""
    with pytest.raises(InvalidClient):
        presented_credentials(header, {})


async def test_post_secret_and_method_must_match_config(auth: ClientAuthenticator) -> None:
    """client_secret_post works for a post client; a Basic client may not use post."""
    good = presented_credentials(None, {"client_id": ["poster"], "client_secret": ["p0st"]})
    assert (await auth.authenticate(good, now=NOW)).client_id == "poster"
    wrong_method = presented_credentials(
        None, {"client_id": ["basic"], "client_secret": ["s3cret"]}
    )
    with pytest.raises(InvalidClient, match="client_secret_basic"):
        await auth.authenticate(wrong_method, now=NOW)


async def test_unknown_client_and_missing_credentials_are_invalid_client(
    auth: ClientAuthenticator,
) -> None:
    """An unknown client id and a request without credentials are both invalid_client."""
    with pytest.raises(InvalidClient):
        await auth.authenticate(Presented(CLIENT_SECRET_POST, ("ghost",), ("x",)), now=NOW)
    with pytest.raises(InvalidClient):
        await auth.authenticate(presented_credentials(None, {}), now=NOW)


async def test_public_client_needs_only_its_id(auth: ClientAuthenticator) -> None:
    """A client configured with auth none is identified by client_id alone; others are not."""
    assert (await auth.authenticate(Presented(NONE, ("public",)), now=NOW)).client_id == "public"
    with pytest.raises(InvalidClient):
        await auth.authenticate(Presented(NONE, ("basic",)), now=NOW)


@pytest.mark.parametrize(
    ("authorization", "form"),
    [
        (basic("basic", "s3cret", form_encoded=False), {"client_secret": ["s3cret"]}),
        (None, {"client_id": ["poster"], "client_secret": ["p0st"], **assertion_form("x.y.z")}),
        (basic("basic", "s3cret", form_encoded=False), assertion_form("x.y.z")),
    ],
)
def test_two_methods_in_one_request_is_invalid_request(
    authorization: str | None, form: dict[str, list[str]]
) -> None:
    """Mixing client authentication methods is invalid_request (RFC 6749 §2.3)."""
    with pytest.raises(InvalidRequest, match="one client authentication method"):
        presented_credentials(authorization, form)


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"client_secret": ["a", "b"], "client_id": ["poster"]}, InvalidRequest),
        ({"client_secret": ["p0st"]}, InvalidRequest),
        ({"client_assertion": ["x.y.z"]}, InvalidRequest),
        ({"client_assertion": ["x.y.z"], "client_assertion_type": ["urn:other"]}, InvalidClient),
    ],
)
def test_malformed_credential_fields(form: dict[str, list[str]], error: type[Exception]) -> None:
    """Repeated or incomplete credential fields are refused before anything is believed."""
    with pytest.raises(error):
        presented_credentials(None, form)


def test_credential_readings() -> None:
    """Each method is recognised; nothing at all is its own case."""
    assert presented_credentials(None, {}).method == NOTHING
    assert presented_credentials(None, assertion_form("a.b.c")).method == CLIENT_ASSERTION
    assert presented_credentials(None, {"client_id": ["public"]}).method == NONE


async def test_hashed_secret_matches() -> None:
    """client_secret_sha256 lets config hold only the secret's hash."""
    import hashlib

    digest = hashlib.sha256(b"from-a-vault").hexdigest()
    auth = authenticator(config(client_secret_sha256=digest))
    good = presented_credentials(basic("hashed", "from-a-vault", form_encoded=True), {})
    assert (await auth.authenticate(good, now=NOW)).client_id == "hashed"


async def test_private_key_jwt_accepted_once(auth: ClientAuthenticator) -> None:
    """A valid RFC 7523 assertion authenticates its client; the same jti again is refused."""
    token = assertion()
    presented = presented_credentials(None, assertion_form(token))
    assert (await auth.authenticate(presented, now=NOW)).client_id == "signer"
    with pytest.raises(InvalidClient, match="replay"):
        await auth.authenticate(presented, now=NOW + 1)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "basic"}, "sub must equal"),
        ({"iss": "basic", "sub": "basic"}, "not a private_key_jwt client"),
        ({"aud": "https://elsewhere"}, "aud"),
        ({"exp": None}, "exp"),
        ({"exp": int(NOW) + 3600}, "more than 300 s"),
        ({"exp": int(NOW) - 600}, "expired"),
        ({"jti": None}, "jti"),
    ],
)
async def test_private_key_jwt_claims_checked(
    auth: ClientAuthenticator, claims: dict[str, Any], reason: str
) -> None:
    """iss = sub = client, aud = token endpoint or issuer, short exp and a jti are required."""
    presented = presented_credentials(None, assertion_form(assertion(**claims)))
    with pytest.raises(InvalidClient, match=reason):
        await auth.authenticate(presented, now=NOW)


@pytest.mark.parametrize("aud", [ISSUER, [TOKEN_ENDPOINT, "other"]])
async def test_private_key_jwt_audience_may_be_issuer(auth: ClientAuthenticator, aud: Any) -> None:
    """aud may name the issuer instead of the token endpoint (RFC 7523 §3)."""
    presented = presented_credentials(None, assertion_form(assertion(aud=aud)))
    assert (await auth.authenticate(presented, now=NOW)).client_id == "signer"


async def test_private_key_jwt_foreign_key_and_mismatched_client_id(
    auth: ClientAuthenticator,
) -> None:
    """An assertion signed by another key, or naming another client_id in the body, is refused."""
    other = signing_key(generate_private_key("ES256"))
    forged = jwt.encode(
        {"iss": "signer", "sub": "signer", "aud": ISSUER, "exp": int(NOW) + 60, "jti": "j"},
        other.private_key,
        algorithm="ES256",
        headers={"kid": SIGNER.kid},
    )
    with pytest.raises(InvalidClient, match="signature"):
        await auth.authenticate(presented_credentials(None, assertion_form(forged)), now=NOW)
    form = {**assertion_form(assertion()), "client_id": ["basic"]}
    with pytest.raises(InvalidClient, match="does not match"):
        await auth.authenticate(presented_credentials(None, form), now=NOW)


def test_inline_jwks_without_usable_key_is_config_error() -> None:
    """A client JWKS holding no usable public key is refused at start, naming the client."""
    private = dict(SIGNER.public_jwk, d="AAAA")
    document_config = config()
    clients = dict(document_config.clients)
    from dataclasses import replace

    clients["signer"] = replace(clients["signer"], jwks={"keys": [private]})
    with pytest.raises(ConfigError, match=r"clients\[signer\]\.jwks"):
        authenticator(replace(document_config, clients=clients))


async def test_replay_cache_forgets_expired_and_refuses_when_full() -> None:
    """jtis are remembered until they expire; a full cache refuses rather than forgets."""
    cache = ReplayCache(max_entries=2)
    await cache.remember(("c", "1"), NOW + 10, NOW)
    await cache.remember(("c", "2"), NOW + 20, NOW)
    with pytest.raises(TemporarilyUnavailable):
        await cache.remember(("c", "3"), NOW + 20, NOW)
    await cache.remember(("c", "3"), NOW + 30, NOW + 11)  # "1" expired and was purged
    assert len(cache) == 2
    await cache.remember(("c", "1"), NOW + 40, NOW + 21)  # an expired jti may come back


def test_token_bucket_refills_at_rate() -> None:
    """A bucket allows a burst, then one request per 1/rate seconds."""
    bucket = TokenBucket(RateLimit(rate=2.0, burst=2), tokens=2.0, updated=NOW)
    assert bucket.take(NOW) == 0 and bucket.take(NOW) == 0
    assert bucket.take(NOW) == pytest.approx(0.5)
    assert bucket.take(NOW + 0.5) == 0


def test_rate_limiter_answers_slow_down_with_retry_after() -> None:
    """Past its burst a client gets slow_down with Retry-After; others are unaffected."""
    clock = [NOW]
    from dataclasses import replace

    base = config()
    limited = replace(base.clients["basic"], rate_limit=RateLimit(rate=0.1, burst=1))
    clients = {**base.clients, "basic": limited}
    limiter = RateLimiter(clients, clock=lambda: clock[0])
    limiter.check("basic")
    with pytest.raises(SlowDown) as e:
        limiter.check("basic")
    assert e.value.retry_after == 10
    limiter.check("poster")
    clock[0] += 10
    limiter.check("basic")
    kept = RateLimiter(clients, previous=limiter, clock=lambda: clock[0])
    with pytest.raises(SlowDown):
        kept.check("basic")  # a reload with the same limit keeps the bucket
