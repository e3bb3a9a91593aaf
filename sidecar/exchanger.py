"""Exchangers: how the sidecar turns a subject token into a zone token.

``EmbeddedExchanger`` calls ``exchange.core.ExchangeCore`` in-process. ``RemoteExchanger`` is an
RFC 8693 client of a token endpoint (given, or discovered through RFC 8414 / OIDC metadata),
authenticating with one of ``exchange.clientauth``'s client credentials.

Every failure leaves here as an ``ExchangeError`` (the proxy maps it to HTTP in one place):
an error answer is rebuilt from its code; 5xx, connect errors and timeouts become
``TemporarilyUnavailable`` (after bounded, jittered retries on connect errors and 5xx only);
an answer the sidecar cannot use is a plain ``ExchangeError`` (server_error).

A ``POST /token`` that fails on a pooled (kept-alive) connection before any byte of the answer
arrived (the server closed it: a restart, a drain, its idle timeout) is sent again at once on
a fresh connection, outside the retry budget: a token exchange has no side effect to
duplicate, and each attempt authenticates anew (a ``private_key_jwt`` assertion is signed
again, with a new ``jti``).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from pathlib import Path
from typing import Protocol

import aiohttp

from exchange.clientauth import (
    ClientCredential,
    ClientSecretBasic,
    PrivateKeyJwt,
    ServiceAccountToken,
    TlsClientAuth,
)
from exchange.core import ExchangeCore
from exchange.errors import EndpointUnavailable, ExchangeError, TemporarilyUnavailable
from exchange.metadata import metadata_urls
from exchange.server.wiring import build_core
from exchange.tokens import (
    TokenExchangeRequest,
    TokenResponse,
    encode_token_request,
    read_token_response,
)
from runtime.filewatch import FileWatch
from runtime.httpjson import DocumentError, get_json
from runtime.retry import Backoff, retrying
from runtime.tls import ClientTls
from sidecar.config import EmbeddedExchange, RemoteExchange

log = logging.getLogger("zonegate.sidecar.exchanger")

MAX_ANSWER_BYTES = 1 << 20
RETRY_BACKOFF = Backoff(base=0.125, cap=2.0, jitter=0.6)  # 0.05-0.2 s, then doubling


class Exchanger(Protocol):
    """Something that exchanges subject tokens; ``identity`` distinguishes cache entries."""

    identity: str
    mode: str

    async def start(self) -> None:
        """Reach the exchange once (readiness); raise while it cannot be reached."""

    async def exchange(self, request: TokenExchangeRequest) -> TokenResponse:
        """Exchange, or raise ExchangeError."""

    async def close(self) -> None:
        """Release connections."""


class EmbeddedExchanger:
    """The exchange core, in-process, acting for one configured client."""

    mode = "embedded"

    def __init__(self, settings: EmbeddedExchange, *, core: ExchangeCore | None = None) -> None:
        self.identity = settings.identity
        self.client_id = settings.client_id
        self.core = core or build_core(settings.core, keys=settings.keys)

    async def start(self) -> None:
        failed = await self.core.warm()
        if failed:
            log.warning(
                "trusted issuers unreachable at start (keys fetched on first use)",
                extra={"issuers": failed},
            )

    async def exchange(self, request: TokenExchangeRequest) -> TokenResponse:
        return await self.core.exchange(request, client=self.client_id)

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
        self._fresh: aiohttp.ClientSession | None = None
        self._tls: ClientTls | None = None
        if settings.ca_file or settings.tls_client_cert_file:
            self._tls = ClientTls(
                settings.ca_file, settings.tls_client_cert_file, settings.tls_client_key_file
            )

    @property
    def _ssl(self) -> ssl.SSLContext | bool:
        """The TLS context of the next connection, its client certificate re-read if the
        files changed (a new connection presents the new one)."""
        return self._tls.current() if self._tls is not None else True

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client: connections are kept alive between exchanges."""
        if self._session is None or self._session.closed:
            self._session = self._new_session(aiohttp.TCPConnector(limit=32))
        return self._session

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        """A client whose every request opens a new connection (none is reused)."""
        if self._fresh is None or self._fresh.closed:
            connector = aiohttp.TCPConnector(limit=8, force_close=True)
            self._fresh = self._new_session(connector)
        return self._fresh

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=self.settings.timeout * 3,
            sock_connect=self.settings.timeout,
            sock_read=self.settings.timeout,
        )
        return aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def start(self) -> None:
        """Discover the token endpoint (when only ``issuer`` is given), or check it answers."""
        if self.token_endpoint is None:
            self.token_endpoint = await self._discover()
            return
        try:
            async with self.session.get(self.token_endpoint, allow_redirects=False, ssl=self._ssl):
                pass  # any HTTP answer (405 is typical) means it is reachable
        except aiohttp.ClientConnectorCertificateError as e:
            raise untrusted(e) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporarilyUnavailable(f"token endpoint unreachable: {type(e).__name__}") from e

    async def _discover(self) -> str:
        """The token endpoint of the configured issuer's metadata. RFC 8414 §3.3: a document
        whose ``issuer`` is not identical to the configured one MUST NOT be used, so no client
        credential or subject token is ever posted to an endpoint it names."""
        issuer = self.settings.issuer
        assert issuer is not None
        mismatch = ""
        for url in metadata_urls(issuer):
            try:
                document, _ = await get_json(self.session, url, ssl=self._ssl)
            except DocumentError:
                continue
            named = document.get("issuer")
            if named != issuer:
                shown = repr(named[:200]) if isinstance(named, str) else "no issuer"
                mismatch = f"; metadata at {url} names {shown}, not {issuer!r} (RFC 8414 §3.3)"
                log.warning(
                    "discovery document ignored: its issuer is not the configured one",
                    extra={"url": url, "expected_issuer": issuer, "document_issuer": shown},
                )
                continue
            endpoint = document.get("token_endpoint")
            if isinstance(endpoint, str) and endpoint.startswith(("http://", "https://")):
                log.info("token endpoint discovered", extra={"token_endpoint": endpoint})
                return endpoint
        raise TemporarilyUnavailable(f"no token_endpoint discovered for {issuer}{mismatch}")

    async def exchange(self, request: TokenExchangeRequest) -> TokenResponse:
        if self.token_endpoint is None:
            await self.start()
        endpoint = self.token_endpoint
        assert endpoint is not None
        return await retrying(
            lambda: self._post(endpoint, request),
            retry_on=EndpointUnavailable,
            backoff=RETRY_BACKOFF,
            attempts=self.settings.retries + 1,
            rng=self._rng,
        )

    async def _post(self, endpoint: str, request: TokenExchangeRequest) -> TokenResponse:
        """One attempt; when the pooled connection it used was gone before any answer came,
        one more at once on a fresh connection."""
        try:
            return await self._attempt(self.session, endpoint, request)
        except _NoAnswer as e:
            log.info(
                "token endpoint closed a pooled connection (%s); sent again on a new one",
                e.cause,
                extra={"exchange": self.identity},
            )
        try:
            return await self._attempt(self.fresh_session, endpoint, request)
        except _NoAnswer as e:
            raise EndpointUnavailable(f"token endpoint unreachable: {e.cause}") from e

    async def _attempt(
        self, session: aiohttp.ClientSession, endpoint: str, request: TokenExchangeRequest
    ) -> TokenResponse:
        fields, headers = self._credential.authenticate(endpoint, time.time())  # anew each time
        data = encode_token_request(request) + fields
        try:
            response = await session.post(
                endpoint, data=data, headers=headers, allow_redirects=False, ssl=self._ssl
            )
        except aiohttp.ClientConnectorCertificateError as e:
            raise untrusted(e) from e  # retrying cannot help
        except aiohttp.ClientConnectorError as e:
            raise EndpointUnavailable(f"token endpoint unreachable: {type(e).__name__}") from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise _NoAnswer(type(e).__name__) from e  # no byte of an answer had arrived
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporarilyUnavailable(f"token endpoint failed: {type(e).__name__}") from e
        try:
            async with response:
                body = await _read_bounded(response)
        except aiohttp.ServerDisconnectedError as e:
            raise EndpointUnavailable(f"token endpoint unreachable: {type(e).__name__}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TemporarilyUnavailable(f"token endpoint failed: {type(e).__name__}") from e
        return read_token_response(
            response.status,
            body,
            retry_after=response.headers.get("Retry-After"),
            now=time.time(),
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()


class _NoAnswer(Exception):
    """The connection was gone before any byte of the answer arrived."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def untrusted(e: aiohttp.ClientConnectorCertificateError) -> TemporarilyUnavailable:
    """The token endpoint's certificate did not verify: say why, and against what."""
    reason = getattr(e.certificate_error, "verify_message", None) or "verification failed"
    return TemporarilyUnavailable(
        f"token endpoint's TLS certificate not trusted: {reason} (check ca_file)"
    )


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The whole answer body, refusing one larger than MAX_ANSWER_BYTES."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ExchangeError(f"token endpoint answer larger than {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


class ServiceAccountTokenReader:
    """The current token in a file; the last good one while the file cannot be read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._watch = FileWatch(self.path)
        self._token = ""

    def __call__(self) -> str:
        try:
            token = self._watch.reload(lambda: self.path.read_text().strip())
        except OSError as e:
            if not self._token:
                raise ExchangeError(f"cannot read service account token: {e.strerror}") from e
            return self._token
        if token is not None:
            self._token = token
        return self._token


def client_credential(settings: RemoteExchange) -> ClientCredential:
    """The credential a remote exchange config names (keys were loaded with the config)."""
    if settings.client_key is not None:
        return PrivateKeyJwt(settings.client_id, settings.client_key)
    if settings.service_account_token_file is not None:
        reader = ServiceAccountTokenReader(settings.service_account_token_file)
        return ServiceAccountToken(settings.client_id, reader)
    if settings.client_secret is None and settings.tls_client_cert_file is not None:
        return TlsClientAuth(settings.client_id)  # the certificate alone (RFC 8705 §2.1)
    return ClientSecretBasic(settings.client_id, settings.client_secret or "")


def build_exchanger(settings: EmbeddedExchange | RemoteExchange) -> Exchanger:
    """The exchanger for one exchange config."""
    if isinstance(settings, EmbeddedExchange):
        return EmbeddedExchanger(settings)
    return RemoteExchanger(settings)
