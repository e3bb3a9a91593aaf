"""Exchangers: how the sidecar turns a subject token into a zone token.

``EmbeddedExchanger`` calls ``exchange.core.ExchangeCore`` in-process. ``RemoteExchanger`` is an
RFC 8693 client of a token endpoint (given, or discovered through RFC 8414 / OIDC metadata),
authenticating with a client secret (HTTP Basic, RFC 6749 §2.3.1), a private-key JWT (RFC 7523
§2.2) or a Kubernetes service-account token presented as a client assertion.

Every failure leaves here as an ``ExchangeError`` (the proxy maps it to HTTP in one place):
an error answer is rebuilt from its code; 5xx, connect errors and timeouts become
``TemporarilyUnavailable`` (after bounded, jittered retries on connect errors and 5xx only);
an answer the sidecar cannot use is a plain ``ExchangeError`` (server_error).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
import jwt
from yarl import URL

from exchange.config import ZONE_NAME
from exchange.core import ExchangeCore
from exchange.errors import ExchangeError, TemporarilyUnavailable, error_from_code
from exchange.keys import SigningKey, load_private_key, signing_key
from exchange.tokens import (
    CLIENT_ASSERTION_TYPE_JWT_BEARER,
    TokenExchangeRequest,
    encode_token_request,
)
from sidecar.config import EmbeddedExchange, RemoteExchange

log = logging.getLogger("zonegate.sidecar.exchanger")

ASSERTION_LIFETIME = 60
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Exchanged:
    """A usable exchange answer: the token, when it expires (absolute) and its zone."""

    access_token: str
    expires_at: float
    zone: str | None

    def __repr__(self) -> str:
        return f"Exchanged(expires_at={self.expires_at}, zone={self.zone!r})"


class Exchanger(Protocol):
    """Something that exchanges subject tokens; ``identity`` distinguishes cache entries."""

    identity: str
    mode: str

    async def start(self) -> None:
        """Reach the exchange once (readiness); raise while it cannot be reached."""

    async def exchange(self, request: TokenExchangeRequest) -> Exchanged:
        """Exchange, or raise ExchangeError."""

    async def close(self) -> None:
        """Release connections."""


def zone_of(issuer: Any) -> str | None:
    """The zone name of a zone issuer URL (``<base>/zones/<zone>``), for a metric label."""
    if isinstance(issuer, str) and "/zones/" in issuer:
        zone = issuer.rsplit("/zones/", 1)[1]
        return zone if ZONE_NAME.match(zone) else None
    return None


class EmbeddedExchanger:
    """The exchange core, in-process, acting for one configured client."""

    mode = "embedded"

    def __init__(self, settings: EmbeddedExchange, *, core: ExchangeCore | None = None) -> None:
        self.identity = settings.identity
        self.client_id = settings.client_id
        self.core = core or ExchangeCore(settings.core)

    async def start(self) -> None:
        failed = await self.core.warm()
        if failed:
            log.warning(
                "trusted issuers unreachable at start (keys fetched on first use)",
                extra={"issuers": failed},
            )

    async def exchange(self, request: TokenExchangeRequest) -> Exchanged:
        response = await self.core.exchange(request, client=self.client_id)
        return Exchanged(
            response.access_token,
            float(response.claims.get("exp", time.time() + response.expires_in)),
            zone_of(response.claims.get("iss")),
        )

    async def close(self) -> None:
        await self.core.close()


class RemoteExchanger:
    """An RFC 8693 client of a remote token endpoint."""

    mode = "remote"

    def __init__(self, settings: RemoteExchange, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.identity = settings.identity
        self.token_endpoint = settings.token_endpoint
        self._credential = client_credential(settings)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(settings.ca_file)) if settings.ca_file else True
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=self.settings.timeout * 3,
                sock_connect=self.settings.timeout,
                sock_read=self.settings.timeout,
            )
            connector = aiohttp.TCPConnector(limit=32, ssl=self._ssl)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._session

    async def start(self) -> None:
        """Discover the token endpoint (when only ``issuer`` is given), or check it answers."""
        if self.token_endpoint is None:
            self.token_endpoint = await self._discover()
            return
        try:
            async with self.session.get(self.token_endpoint, allow_redirects=False):
                pass  # any HTTP answer (405 is typical) means it is reachable
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporarilyUnavailable(f"token endpoint unreachable: {type(e).__name__}") from e

    async def _discover(self) -> str:
        assert self.settings.issuer is not None
        for url in metadata_urls(self.settings.issuer):
            document = await self._get_json(url)
            endpoint = document.get("token_endpoint") if document else None
            if isinstance(endpoint, str) and endpoint.startswith(("http://", "https://")):
                log.info("token endpoint discovered", extra={"token_endpoint": endpoint})
                return endpoint
        raise TemporarilyUnavailable(f"no token_endpoint discovered for {self.settings.issuer}")

    async def _get_json(self, url: str) -> dict[str, Any] | None:
        try:
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    return None
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    async def exchange(self, request: TokenExchangeRequest) -> Exchanged:
        if self.token_endpoint is None:
            await self.start()
        assert self.token_endpoint is not None
        for attempt in range(self.settings.retries + 1):
            last = attempt == self.settings.retries
            try:
                return await self._post(self.token_endpoint, request)
            except _Retryable as e:
                if last:
                    raise e.error from e
                await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        return float(self._rng.uniform(0.05, 0.2) * (2**attempt))

    async def _post(self, endpoint: str, request: TokenExchangeRequest) -> Exchanged:
        fields, headers = self._credential.authenticate(endpoint)
        data = encode_token_request(request) + fields
        try:
            async with self.session.post(
                endpoint, data=data, headers=headers, allow_redirects=False
            ) as response:
                body = await _read_bounded(response)
                return read_answer(response.status, response.headers, body)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            raise _Retryable(
                TemporarilyUnavailable(f"token endpoint unreachable: {type(e).__name__}")
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporarilyUnavailable(f"token endpoint failed: {type(e).__name__}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The whole answer body, refusing one larger than MAX_ANSWER_BYTES."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ExchangeError(f"token endpoint answer larger than {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


class _Retryable(Exception):
    """A failure worth another attempt: connect error or 5xx."""

    def __init__(self, error: ExchangeError) -> None:
        super().__init__(error.description)
        self.error = error


def metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 §3.1 metadata URL (well-known inserted before any path), then OIDC discovery."""
    url = URL(issuer)
    path = url.path.rstrip("/")
    origin = str(url.origin())
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
    ]


def read_answer(status: int, headers: Any, body: bytes) -> Exchanged:
    """Turn a token endpoint answer into an Exchanged token or the error it carries."""
    if status >= 500:
        retry_after = _retry_after(headers.get("Retry-After"))
        raise _Retryable(
            TemporarilyUnavailable(f"token endpoint answered {status}", retry_after=retry_after)
        )
    document = _json_object(body)
    if status != 200:
        code = document.get("error") if document else None
        if not isinstance(code, str):
            raise ExchangeError(f"token endpoint answered {status} without an OAuth error")
        description = document.get("error_description") if document else None
        retry_after = _retry_after(headers.get("Retry-After"))  # e.g. 429 slow_down
        raise error_from_code(code, str(description or code), retry_after)
    return _token_of(document)


def _token_of(document: dict[str, Any] | None) -> Exchanged:
    """RFC 8693 §2.2.1: access_token, token_type Bearer, expires_in (else the JWT's exp)."""
    if document is None:
        raise ExchangeError("token endpoint answer is not a JSON object")
    token = document.get("access_token")
    token_type = document.get("token_type")
    if not isinstance(token, str) or not token:
        raise ExchangeError("token endpoint answer has no access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ExchangeError("token endpoint answer is not a Bearer token")
    claims = unverified_claims(token)
    expires_in = document.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expires_at = time.time() + float(expires_in)
    elif isinstance(claims.get("exp"), int | float):
        expires_at = float(claims["exp"])
    else:
        expires_at = time.time()  # unknown lifetime: use once, never cache
    return Exchanged(token, expires_at, zone_of(claims.get("iss")))


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS, unverified: only for lifetimes and labels, never trust.

    ``{}`` unless header and payload are base64url JSON objects. What ``jwt.decode`` without
    verification returns, at a third of its cost (it also re-validates options and claims).
    """
    segments = token.split(".")
    if len(segments) != 3:
        return {}
    try:
        header, claims = (json.loads(_base64url_decode(s)) for s in segments[:2])
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError included
        return {}
    return claims if isinstance(header, dict) and isinstance(claims, dict) else {}


def _base64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _retry_after(value: str | None) -> int | None:
    """A delta-seconds Retry-After, bounded; None when absent or an HTTP date."""
    if value is not None and value.strip().isdigit():
        return max(1, min(int(value), 300))
    return None


# -- client authentication --------------------------------------------------------------------


class ClientCredential(Protocol):
    """Adds client authentication to a token request: (form fields, headers)."""

    def authenticate(self, endpoint: str) -> tuple[list[tuple[str, str]], dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class ClientSecretBasic:
    """RFC 6749 §2.3.1: id and secret form-urlencoded, then Basic."""

    client_id: str
    client_secret: str

    def authenticate(self, endpoint: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
        return [], {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def __repr__(self) -> str:
        return f"ClientSecretBasic(client_id={self.client_id!r})"


@dataclass(frozen=True, slots=True)
class PrivateKeyJwt:
    """RFC 7523 §2.2: a fresh, short-lived assertion signed with the client's key."""

    client_id: str
    key: SigningKey

    def authenticate(self, endpoint: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": endpoint,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        assertion = jwt.encode(
            claims, self.key.private_key, algorithm=self.key.alg, headers={"kid": self.key.kid}
        )
        return _assertion_fields(self.client_id, assertion), {}


class ServiceAccountToken:
    """A Kubernetes projected service-account token, re-read when the kubelet rotates it."""

    def __init__(self, client_id: str, path: Path) -> None:
        self.client_id = client_id
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def authenticate(self, endpoint: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
        return _assertion_fields(self.client_id, self._current()), {}

    def _current(self) -> str:
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._token = self.path.read_text().strip()
                self._stamp = stamp
        except OSError as e:
            if not self._token:
                raise ExchangeError(f"cannot read service account token: {e.strerror}") from e
        return self._token


def _assertion_fields(client_id: str, assertion: str) -> list[tuple[str, str]]:
    return [
        ("client_id", client_id),
        ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
        ("client_assertion", assertion),
    ]


def client_credential(settings: RemoteExchange) -> ClientCredential:
    """The credential a remote exchange config names."""
    if settings.private_key_file is not None:
        return PrivateKeyJwt(
            settings.client_id, signing_key(load_private_key(settings.private_key_file))
        )
    if settings.service_account_token_file is not None:
        return ServiceAccountToken(settings.client_id, settings.service_account_token_file)
    return ClientSecretBasic(settings.client_id, settings.client_secret or "")


def build_exchanger(settings: EmbeddedExchange | RemoteExchange) -> Exchanger:
    """The exchanger for one exchange config."""
    if isinstance(settings, EmbeddedExchange):
        return EmbeddedExchanger(settings)
    return RemoteExchanger(settings)
