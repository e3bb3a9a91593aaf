"""Client authentication (RFC 6749 §2.3, RFC 7523): both sides.

The server side authenticates token requests (``presented_credentials`` reads what a request
presents, ``ClientAuthenticator`` proves it); the client side, below it, is what the sidecar
presents to a remote token endpoint (``ClientSecretBasic``, ``PrivateKeyJwt``,
``ServiceAccountToken``).

Five methods, each named by the client's ``auth`` in config; a client must use its own:

* ``client_secret_basic`` (RFC 6749 §2.3.1): id and secret are form-urlencoded before base64.
  openid-client does that, google-auth and curl do not, so both readings are tried;
* ``client_secret_post`` (RFC 6749 §2.3.1): ``client_id`` and ``client_secret`` in the body;
* ``private_key_jwt`` (RFC 7523 §2.2, §3): a JWT with ``iss`` = ``sub`` = client id, ``aud`` =
  the token endpoint or the issuer, a short ``exp`` and a ``jti`` that is never accepted twice;
* ``kubernetes``: a projected service-account token as ``client_assertion`` (jwt-bearer) from
  the cluster issuer the client is bound to (``cluster_issuer``), its ``sub``
  ``system:serviceaccount:<ns>:<name>`` naming the client; the same name from another cluster
  is another identity, and not this client;
* ``tls_client_auth`` (RFC 8705 §2.1): the TLS client certificate the listener verified against
  its client CA bundle, ``client_id`` in the body naming the client (RFC 8705 §2), the
  certificate matching the client's one configured subject DN, DNS SAN or URI SAN (a SPIFFE
  ID). The adapter hands the certificate in (DER); this module only compares.

Every key set is parsed once, at construction: the hot path parses no config and no keys.
Every refusal is ``InvalidClient`` (401) or, for a malformed request, ``InvalidRequest``.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import hmac
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote_plus, unquote_plus

import jwt
from cryptography import x509

from exchange.config import ClientConfig, ClusterIssuer, ExchangeConfig, TrustedIssuer, parse_dn
from exchange.errors import InvalidClient, InvalidRequest, TemporarilyUnavailable
from exchange.issuers import Clock, Fetcher, FetchFailed, FetchObserver, IssuerKeys, parse_jwks
from exchange.keys import SigningKey
from exchange.tokens import CLIENT_ASSERTION_TYPE_JWT_BEARER, single
from exchange.validate import Unverified, peek, verify
from runtime.configload import ConfigError

CLIENT_SECRET_BASIC = "client_secret_basic"
CLIENT_SECRET_POST = "client_secret_post"
PRIVATE_KEY_JWT = "private_key_jwt"
KUBERNETES = "kubernetes"
TLS_CLIENT_AUTH = "tls_client_auth"
NONE = "none"
CLIENT_ASSERTION = "client_assertion"  # private_key_jwt or kubernetes: the assertion decides
NOTHING = ""

MAX_ASSERTION_LIFETIME = 300  # RFC 7523 §3: exp "SHOULD" be short; we say at most 5 minutes
MAX_JTI_LENGTH = 256
MAX_CREDENTIAL_LENGTH = 4096
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class Presented:
    """The credentials one request presents, before any of them is believed."""

    method: str  # CLIENT_SECRET_BASIC | _POST | CLIENT_ASSERTION | TLS_CLIENT_AUTH | NONE | NOTHING
    client_ids: tuple[str, ...] = ()  # candidate readings, preferred first
    secrets: tuple[str, ...] = field(default=(), repr=False)
    assertion: str | None = field(default=None, repr=False)
    certificate: bytes | None = field(default=None, repr=False)  # the verified peer's, DER

    @property
    def basic_tried(self) -> bool:
        """Whether a 401 should carry a Basic challenge (also when nothing was presented)."""
        return self.method in (CLIENT_SECRET_BASIC, NOTHING)


def presented_credentials(
    authorization: str | None,
    form: Mapping[str, Sequence[str]],
    *,
    certificate: bytes | None = None,
) -> Presented:
    """Read the client credentials of a token request; more than one method is invalid_request.

    ``certificate``: the TLS client certificate (DER) the listener verified, if any. It is a
    credential only for ``client_id`` alone in the body (RFC 8705 §2.1); next to a secret or an
    assertion it is transport, and that credential decides."""
    form_id = single(form, "client_id")
    form_secret = single(form, "client_secret")
    assertion = single(form, "client_assertion")
    assertion_type = single(form, "client_assertion_type")
    used = [
        name
        for name, present in (
            ("Authorization", authorization is not None),
            ("client_secret", form_secret is not None),
            ("client_assertion", assertion is not None or assertion_type is not None),
        )
        if present
    ]
    if len(used) > 1:
        raise InvalidRequest(
            f"use one client authentication method, not several ({', '.join(used)})"
        )
    if authorization is not None:
        return _basic(authorization, form_id)
    if assertion is not None or assertion_type is not None:
        return _assertion(assertion, assertion_type, form_id)
    if form_secret is not None:
        if not form_id:
            raise InvalidRequest("client_secret needs client_id in the body")
        return Presented(CLIENT_SECRET_POST, (form_id,), (form_secret,))
    if form_id:
        if certificate is not None:
            return Presented(TLS_CLIENT_AUTH, (form_id,), certificate=certificate)
        return Presented(NONE, (form_id,))
    return Presented(NOTHING)


def _basic(authorization: str, form_id: str | None) -> Presented:
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise InvalidClient("the Authorization scheme must be Basic", basic_tried=True)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as e:
        raise InvalidClient(
            "Basic credentials are not base64 of id:secret", basic_tried=True
        ) from e
    raw_id, colon, raw_secret = decoded.partition(":")
    if not colon or not raw_id or len(decoded) > MAX_CREDENTIAL_LENGTH:
        raise InvalidClient("Basic credentials must be id:secret", basic_tried=True)
    # RFC 6749 §2.3.1 form-urlencodes both before base64; raw senders are read as sent, too.
    ids = tuple(dict.fromkeys((unquote_plus(raw_id), raw_id)))
    if form_id is not None and form_id not in ids:
        raise InvalidRequest("client_id in the body differs from the Basic credentials")
    return Presented(
        CLIENT_SECRET_BASIC, ids, tuple(dict.fromkeys((unquote_plus(raw_secret), raw_secret)))
    )


def _assertion(assertion: str | None, assertion_type: str | None, form_id: str | None) -> Presented:
    if not assertion or not assertion_type:
        raise InvalidRequest("client_assertion and client_assertion_type must be given together")
    if assertion_type != CLIENT_ASSERTION_TYPE_JWT_BEARER:
        raise InvalidClient(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE_JWT_BEARER}")
    return Presented(CLIENT_ASSERTION, (form_id,) if form_id else (), assertion=assertion)


class ReplayGuard(Protocol):
    """Where the ``jti`` of accepted client assertions are remembered (RFC 7523 §3): this
    process (``ReplayCache``), or a store every replica shares (the server injects one)."""

    async def remember(self, key: tuple[str, str], until: float, now: float) -> None:
        """Record ``key`` (client_id, jti) until ``until``; InvalidClient if seen before, and
        TemporarilyUnavailable when it cannot be checked (a replay is never let through)."""


class ReplayCache:
    """Assertion ids (client, jti) seen until they expire: a jti is accepted once (RFC 7523 §3)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max_entries = max_entries
        self._until: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._until)

    async def remember(self, key: tuple[str, str], until: float, now: float) -> None:
        """Record ``key`` until ``until``; seen before (and not yet expired) is invalid_client."""
        self._purge(now)
        if key in self._until:
            raise InvalidClient("client_assertion jti was already used (replay refused)")
        if len(self._until) >= self._max_entries:
            # Forgetting a live jti would allow a replay: refuse instead, briefly.
            raise TemporarilyUnavailable("too many live client assertions", retry_after=5)
        self._until[key] = until
        heapq.heappush(self._expiry, (until, key))

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, key = heapq.heappop(self._expiry)
            self._until.pop(key, None)


@contextmanager
def _client_error() -> Iterator[None]:
    """A refused assertion is the client's authentication failing, not a bad request."""
    try:
        yield
    except InvalidRequest as e:
        raise InvalidClient(e.description) from e


class ClientAuthenticator:
    """Authenticates token requests against the configured clients and cluster issuers."""

    def __init__(
        self,
        config: ExchangeConfig,
        *,
        fetch: Fetcher,
        clock: Clock,
        observe: FetchObserver | None = None,
        replay: ReplayGuard | None = None,
        issuer_fetchers: Mapping[str, Fetcher] | None = None,
    ) -> None:
        """``issuer_fetchers``: the fetcher of a cluster issuer that has its own (its
        ``ca_file``), by issuer; everything else is fetched with ``fetch``."""
        self._config = config
        self._clients = config.clients
        self._fetch = fetch
        self._clock = clock
        self._observe = observe
        self._replay: ReplayGuard = replay or ReplayCache()
        root = config.issuer.rstrip("/")
        # RFC 7523 §3: aud identifies the authorization server: its token endpoint or issuer.
        self._audiences = (f"{root}/token", root, f"{root}/")
        # (cluster issuer, service account) -> client: a client is bound to one cluster
        self._service_accounts = {
            (c.cluster_issuer, c.service_account): c
            for c in self._clients.values()
            if c.auth == KUBERNETES
        }
        self._inline_keys = _inline_keys(self._clients)
        self._remote_keys = {
            c.client_id: self._issuer_keys(c.jwks_uri, c.jwks_uri)
            for c in self._clients.values()
            if c.auth == PRIVATE_KEY_JWT and c.jwks is None and c.jwks_uri is not None
        }
        fetchers = issuer_fetchers or {}
        self._clusters = {
            c.issuer: (c, self._issuer_keys(c.issuer, c.jwks_uri, fetchers.get(c.issuer)))
            for c in config.cluster_issuers
        }

    def _issuer_keys(
        self, name: str, jwks_uri: str | None, fetch: Fetcher | None = None
    ) -> IssuerKeys:
        return IssuerKeys.for_config(
            name,
            fetch or self._fetch,
            self._config,
            clock=self._clock,
            jwks_uri=jwks_uri,
            observe=self._observe,
        )

    async def authenticate(self, presented: Presented, *, now: float) -> ClientConfig:
        """The client the credentials prove, or InvalidClient."""
        if presented.method == NOTHING:
            raise InvalidClient("client authentication required", basic_tried=True)
        if presented.method == CLIENT_ASSERTION:
            assert presented.assertion is not None
            client = await self._assertion(presented.assertion, now)
            if presented.client_ids and presented.client_ids[0] != client.client_id:
                raise InvalidClient("client_id does not match the client_assertion")
            return client
        client = self._client(presented)
        method = presented.method
        if method == TLS_CLIENT_AUTH and client.auth == NONE:
            method = NONE  # a public client on a listener that asks every client for a certificate
        if client.auth != method:
            raise self._refusal(presented, f"client must authenticate with {client.auth}")
        if method == TLS_CLIENT_AUTH:
            assert presented.certificate is not None
            if not certificate_matches(client, presented.certificate):
                raise self._refusal(
                    presented,
                    "the client certificate does not match the client's configured "
                    f"{_tls_match_key(client).removeprefix('tls_client_auth_')}",
                )
            return client
        if method != NONE and not _any_secret_matches(client, presented.secrets):
            raise self._refusal(presented, "client authentication failed")
        return client

    def _client(self, presented: Presented) -> ClientConfig:
        for client_id in presented.client_ids:
            client = self._clients.get(client_id)
            if client is not None:
                return client
        hmac.compare_digest(b"x" * 32, b"y" * 32)  # unknown and known ids cost about the same
        raise self._refusal(presented, "client authentication failed")

    @staticmethod
    def _refusal(presented: Presented, description: str) -> InvalidClient:
        return InvalidClient(description, basic_tried=presented.basic_tried)

    async def _assertion(self, raw: str, now: float) -> ClientConfig:
        with _client_error():
            token = peek(raw, what="client_assertion", max_size=self._config.max_token_size)
            issuer = token.issuer
            cluster = self._clusters.get(issuer)
            if cluster is not None:
                return await self._service_account(token, raw, *cluster, now)
            return await self._private_key_jwt(token, raw, now)

    async def _private_key_jwt(self, token: Unverified, raw: str, now: float) -> ClientConfig:
        """RFC 7523 §3: iss = sub = client_id, aud = us, short exp, fresh jti, client's key."""
        client = self._clients.get(token.issuer)
        if client is None or client.auth != PRIVATE_KEY_JWT:
            raise InvalidClient("client_assertion iss is not a private_key_jwt client")
        if token.claims.get("sub") != client.client_id:
            raise InvalidClient("client_assertion sub must equal its iss (the client_id)")
        key = await self._client_key(client, token.kid)
        expected = TrustedIssuer(client.client_id, audiences=self._audiences)
        claims = verify(token, raw, key, issuer=expected, now=now, leeway=self._config.leeway)
        exp = float(claims["exp"])
        if exp > now + MAX_ASSERTION_LIFETIME + self._config.leeway:
            raise InvalidClient(
                f"client_assertion exp is more than {MAX_ASSERTION_LIFETIME} s ahead"
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidClient("client_assertion needs a jti of 1 to 256 characters")
        await self._replay.remember((client.client_id, jti), exp + self._config.leeway, now)
        return client

    async def _client_key(self, client: ClientConfig, kid: str | None) -> jwt.PyJWK:
        remote = self._remote_keys.get(client.client_id)
        if remote is not None:
            return await remote.key(kid)
        keys = self._inline_keys[client.client_id]
        key = keys.get(kid) if kid is not None else None
        if key is None and kid is None and len(keys) == 1:
            key = next(iter(keys.values()))
        if key is None:
            raise InvalidClient("client_assertion kid is not one of the client's keys")
        return key

    async def _service_account(
        self, token: Unverified, raw: str, cluster: ClusterIssuer, keys: IssuerKeys, now: float
    ) -> ClientConfig:
        """A projected service-account token: cluster keys, audience, age, mapped subject."""
        key = await keys.key(token.kid)
        expected = TrustedIssuer(cluster.issuer, audiences=cluster.audiences)
        claims = verify(token, raw, key, issuer=expected, now=now, leeway=self._config.leeway)
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise InvalidClient("service account token has no iat claim")
        if now - iat > cluster.max_token_age:
            raise InvalidClient(
                f"service account token is older than max_token_age ({cluster.max_token_age} s)"
            )
        sub = claims.get("sub")
        client = self._service_accounts.get((cluster.issuer, sub)) if isinstance(sub, str) else None
        if client is None:
            shown = (
                sub if isinstance(sub, str) and sub.startswith(SERVICE_ACCOUNT_PREFIX) else "sub"
            )
            raise InvalidClient(
                f"service account {shown[:300]} of cluster {cluster.issuer} is not a "
                "configured client"
            )
        return client


def certificate_matches(client: ClientConfig, der: bytes) -> bool:
    """RFC 8705 §2.1.2: the certificate's subject DN, or one of its DNS or URI SANs, is the
    client's configured value. DNs compare as parsed names, attribute by attribute, values
    case-folded with runs of spaces collapsed (the string forms of one DN vary: order of
    spaces, case, escaping); DNS names compare case-insensitively, URIs exactly."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        if client.tls_client_auth_subject_dn is not None:
            expected = parse_dn(client.tls_client_auth_subject_dn)
            return normalised_dn(certificate.subject) == normalised_dn(expected)
        names = _san(certificate)
    except ValueError:
        return False
    if client.tls_client_auth_san_dns is not None:
        wanted = client.tls_client_auth_san_dns.lower().rstrip(".")
        return any(n.lower().rstrip(".") == wanted for n in names.get_values_for_type(x509.DNSName))
    if client.tls_client_auth_san_uri is not None:
        return client.tls_client_auth_san_uri in names.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    return False


def _san(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def normalised_dn(name: x509.Name) -> tuple[frozenset[tuple[str, str]], ...]:
    """A DN for comparison: its RDNs in order, each a set of (OID, normalised value)."""
    return tuple(
        frozenset((a.oid.dotted_string, " ".join(str(a.value).split()).casefold()) for a in rdn)
        for rdn in name.rdns
    )


def _tls_match_key(client: ClientConfig) -> str:
    for key in ("tls_client_auth_subject_dn", "tls_client_auth_san_dns", "tls_client_auth_san_uri"):
        if getattr(client, key) is not None:
            return key
    return "certificate"


def _any_secret_matches(client: ClientConfig, candidates: tuple[str, ...]) -> bool:
    """Each comparison is constant-time; every candidate is compared (no early exit)."""
    results = [client.secret_matches(candidate) for candidate in candidates]
    return any(results)


def _inline_keys(clients: Mapping[str, ClientConfig]) -> dict[str, dict[str, jwt.PyJWK]]:
    """Parse every inline client JWKS once; a JWKS without a usable key is a config error."""
    parsed: dict[str, dict[str, jwt.PyJWK]] = {}
    errors = []
    for client in clients.values():
        if client.auth != PRIVATE_KEY_JWT or client.jwks is None:
            continue
        try:
            parsed[client.client_id] = parse_jwks(client.jwks)
        except FetchFailed as e:
            errors.append(f"clients[{client.client_id}].jwks: {e}")
    if errors:
        raise ConfigError(errors)
    return parsed


# -- the client side: what a client presents to a token endpoint -----------------------------

ASSERTION_LIFETIME = 60
FormFields = list[tuple[str, str]]


class ClientCredential(Protocol):
    """Adds client authentication to a token request: (form fields, headers)."""

    def authenticate(self, endpoint: str, now: float) -> tuple[FormFields, dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class ClientSecretBasic:
    """RFC 6749 §2.3.1: id and secret form-urlencoded, then Basic (what ``_basic`` reads)."""

    client_id: str
    client_secret: str = field(repr=False)

    def authenticate(self, endpoint: str, now: float) -> tuple[FormFields, dict[str, str]]:
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self.client_secret)}"
        return [], {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


@dataclass(frozen=True, slots=True)
class PrivateKeyJwt:
    """RFC 7523 §2.2: a fresh, short-lived assertion with a new ``jti`` on every call."""

    client_id: str
    key: SigningKey = field(repr=False)

    def authenticate(self, endpoint: str, now: float) -> tuple[FormFields, dict[str, str]]:
        issued = int(now)
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": endpoint,
            "jti": secrets.token_urlsafe(16),
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        assertion = jwt.encode(
            claims, self.key.private_key, algorithm=self.key.alg, headers={"kid": self.key.kid}
        )
        return assertion_fields(self.client_id, assertion), {}


@dataclass(frozen=True, slots=True)
class ServiceAccountToken:
    """A Kubernetes projected service-account token as a jwt-bearer client assertion;
    ``read`` returns the current token (the kubelet rotates the file)."""

    client_id: str
    read: Callable[[], str] = field(repr=False)

    def authenticate(self, endpoint: str, now: float) -> tuple[FormFields, dict[str, str]]:
        return assertion_fields(self.client_id, self.read()), {}


@dataclass(frozen=True, slots=True)
class TlsClientAuth:
    """RFC 8705 §2.1: the client certificate on the TLS connection is the credential; the body
    names the client (``client_id``, RFC 8705 §2). The connection's TLS context presents it."""

    client_id: str

    def authenticate(self, endpoint: str, now: float) -> tuple[FormFields, dict[str, str]]:
        return [("client_id", self.client_id)], {}


def assertion_fields(client_id: str, assertion: str) -> FormFields:
    """RFC 7521 §4.2: a client assertion in the form."""
    return [
        ("client_id", client_id),
        ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
        ("client_assertion", assertion),
    ]
