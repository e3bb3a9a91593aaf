"""ExchangeCore: the embedded API. ``await core.exchange(request, client=...) -> TokenResponse``.

The core decides and does no I/O: zone keys, the fetcher of trusted issuers' documents and the
clock are given to it (``exchange.server.wiring.build_core`` wires the real ones). The HTTP
server and the sidecar's embedded exchanger are adapters around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exchange import mint, policy, validate
from exchange.config import (
    DEFAULT_ALGORITHMS,
    TOKEN_TYPE_URN,
    ClientConfig,
    ExchangeConfig,
    TrustedIssuer,
)
from exchange.errors import ExchangeError, InvalidClient, InvalidRequest
from exchange.issuers import Clock, Fetcher, FetchObserver, IssuerKeys
from exchange.keys import KeyRing
from exchange.metadata import openid_configuration_url
from exchange.tokens import GRANT_TYPE_TOKEN_EXCHANGE, TokenExchangeRequest, TokenResponse


def subject_hash(token: str) -> str:
    """A short, non-reversible handle for logs: never log the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass
class Trace:
    """The steps of one decision, for ``zonegate explain`` (and nothing else)."""

    steps: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, step: str, detail: str) -> None:
        self.steps.append((step, detail))


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified subject (and actor) with the decision taken for it."""

    subject: dict[str, Any]
    actor: dict[str, Any] | None
    decision: policy.Decision


def _words(values: tuple[str, ...] | None) -> str:
    return " ".join(values) if values else "(none)"


def _explain_decision(
    note: Trace,
    request: TokenExchangeRequest,
    client: ClientConfig,
    decision: policy.Decision,
    subject: dict[str, Any],
    now: float,
    config: ExchangeConfig,
) -> None:
    """The policy steps, in words an operator can check against the config."""
    zone = decision.zone
    targets = _words(request.targets) if request.targets else f"none: default_zone {zone.name}"
    note("zone", f"{zone.name} (issuer {config.zone_issuer(zone.name)}) selected by {targets}")
    note("client", f"{client.client_id} may use zones {_words(client.zones)}")
    requested = _words(request.scope) if request.scope is not None else "(omitted: all allowed)"
    held = ""
    if client.subject_scope == "intersect":
        held = f" ∩ subject {_words(policy.subject_scopes(subject))}"
    note(
        "scope",
        f"granted {_words(decision.scope)} = requested {requested} ∩ zone {_words(zone.scopes)}"
        f" ∩ client {_words(client.scopes)}{held}",
    )
    remaining = int(float(subject["exp"]) - now)
    note(
        "lifetime",
        f"{decision.lifetime} s = min(zone token_lifetime {zone.token_lifetime} s, "
        f"subject's remaining {remaining} s)",
    )
    note(
        "claims",
        f"sub from {zone.claims.sub!r}; copied: {_words(zone.claims.copy)}; others dropped",
    )


class ExchangeCore:
    """Validates subject tokens, applies policy and mints zone tokens."""

    def __init__(
        self,
        config: ExchangeConfig,
        *,
        keys: KeyRing,
        fetcher: Fetcher,
        clock: Clock,
        observe_fetch: FetchObserver | None = None,
        issuer_fetchers: Mapping[str, Fetcher] | None = None,
    ) -> None:
        """``issuer_fetchers``: the fetcher of an issuer that has its own (its ``ca_file``),
        by issuer; the others use ``fetcher``."""
        self.config = config
        self.keys = keys
        self._fetcher = fetcher
        self._issuer_fetchers = dict(issuer_fetchers or {})
        self._clock = clock
        self.zone_index = policy.zone_index(config.zones)  # audience/resource -> zone
        self._trusted = {t.issuer: t for t in config.trusted_issuers}
        self.issuer_keys = {
            t.issuer: IssuerKeys.for_config(
                t.issuer,
                self._issuer_fetchers.get(t.issuer, fetcher),
                config,
                clock=clock,
                jwks_uri=t.jwks_uri,
                observe=observe_fetch,
            )
            for t in config.trusted_issuers
        }

    async def close(self) -> None:
        """Release the fetchers the core was given (their HTTP sessions)."""
        for fetcher in {
            id(f): f for f in (self._fetcher, *self._issuer_fetchers.values())
        }.values():
            await fetcher.close()

    async def warm(self) -> list[str]:
        """Fetch every trusted issuer's keys once; return the issuers that failed."""
        failed = []
        for keys in self.issuer_keys.values():
            try:
                await keys.key(None)
            except InvalidRequest:
                pass  # more than one key: fetched fine
            except ExchangeError:
                failed.append(keys.issuer)
        return failed

    def client(self, client_id: str) -> ClientConfig:
        """The configured client, or invalid_client."""
        client = self.config.clients.get(client_id)
        if client is None:
            raise InvalidClient(f"unknown client {client_id}")
        return client

    async def exchange(
        self,
        request: TokenExchangeRequest,
        *,
        client: str | ClientConfig,
        now: float | None = None,
    ) -> TokenResponse:
        """Exchange the request's subject token for a token of the zone it targets."""
        client = self.client(client) if isinstance(client, str) else client
        now = self._clock() if now is None else now
        verified = await self.verify(request, client, now)
        decision = verified.decision
        zone_keys = self.keys[decision.zone.name].current
        claims = mint.claims_for(
            decision,
            issuer=self.config.zone_issuer(decision.zone.name),
            client_id=client.client_id,
            now=now,
        )
        return TokenResponse(
            access_token=mint.sign(claims, zone_keys),
            issued_token_type=request.requested_token_type,
            expires_in=decision.lifetime,
            scope=decision.scope,
            claims=claims,
            zone=decision.zone.name,
            expires_at=float(claims["exp"]),
        )

    async def verify(
        self,
        request: TokenExchangeRequest,
        client: ClientConfig,
        now: float,
        trace: Trace | None = None,
    ) -> Verified:
        """Validate subject and actor tokens and take the policy decision, minting nothing."""
        subject = await self._verify_token(
            request.subject_token, "subject_token", request.subject_token_type, now, trace
        )
        actor = None
        if request.actor_token is not None:
            actor = await self._verify_token(
                request.actor_token, "actor_token", request.actor_token_type or "", now, trace
            )
        decision = policy.decide(request, client, self.config, self.zone_index, subject, actor, now)
        if trace is not None:
            _explain_decision(trace, request, client, decision, subject, now, self.config)
        return Verified(subject, actor, decision)

    async def _verify_token(
        self, raw: str, what: str, declared: str, now: float, note: Trace | None
    ) -> dict[str, Any]:
        """``note``: the explain trace, if any (its words are only built for it)."""
        token = validate.peek(raw, what=what, max_size=self.config.max_token_size)
        trusted = self._trusted_issuer(token)
        if note is not None:
            note(f"{what} issuer", f"{trusted.issuer} is trusted")
        validate.check_type(token, declared.removeprefix(TOKEN_TYPE_URN), trusted)
        if note is not None:
            note(f"{what} type", f"typ {validate.typ_of(token) or '(none)'} fits {declared}")
        key = await self.issuer_keys[trusted.issuer].key(token.kid)
        if note is not None:
            note(f"{what} key", f"kid {token.kid} found in the issuer's JWKS")
        claims = validate.verify(
            token, raw, key, issuer=trusted, now=now, leeway=self.config.leeway
        )
        if note is not None:
            note(
                f"{what} claims",
                "signature, iss, exp, nbf, iat" + (", aud" if trusted.audiences else "") + " valid",
            )
        return claims

    def _trusted_issuer(self, token: validate.Unverified) -> TrustedIssuer:
        trusted = self._trusted.get(token.issuer)
        if trusted is None:
            raise InvalidRequest(f"{token.what} issuer is not trusted")
        return trusted

    # -- documents for resource servers ------------------------------------------------------

    def zone_jwks(self, zone: str) -> dict[str, Any]:
        """The JWKS of one zone: its current and next keys only."""
        return self.keys[zone].jwks()

    def zone_metadata(
        self, zone: str, base: str | None = None, *, token_endpoint: bool = True
    ) -> dict[str, Any]:
        """RFC 8414 / OIDC discovery metadata of a zone issuer; ``jwks_uri`` is the zone's alone.

        ``token_endpoint``: whether ``<base>/token`` exists (the standalone server); an embedded
        sidecar's admin listener serves the documents only, so it advertises no endpoint.
        """
        issuer = self.config.zone_issuer(zone)
        root = (base or self.config.issuer).rstrip("/")
        document: dict[str, Any] = {
            "issuer": issuer,
            "jwks_uri": f"{root}/zones/{zone}/jwks.json",
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.keys[zone].current.alg],
        }
        if token_endpoint:
            document |= {
                "token_endpoint": f"{root}/token",
                "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
                "token_endpoint_auth_methods_supported": self.auth_methods(),
                # RFC 8414 §2: required when private_key_jwt is listed; assertions are checked
                # with the default algorithm allow-list
                "token_endpoint_auth_signing_alg_values_supported": list(DEFAULT_ALGORITHMS),
            }
        return document

    def server_metadata(self) -> dict[str, Any]:
        """RFC 8414 metadata of the exchange server itself."""
        root = self.config.issuer.rstrip("/")
        return {
            "issuer": root,
            "token_endpoint": f"{root}/token",
            "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": self.auth_methods(),
            "token_endpoint_auth_signing_alg_values_supported": list(DEFAULT_ALGORITHMS),
            "response_types_supported": ["token"],
            "zones": {
                name: openid_configuration_url(f"{root}/zones/{name}") for name in self.config.zones
            },
        }

    def auth_methods(self) -> list[str]:
        """What clients authenticate with; ``kubernetes`` is a client assertion
        (private_key_jwt's wire form), ``tls_client_auth`` is listed when a client uses it
        (which needs the listener's ``tls.client_ca_file``)."""
        methods = {c.auth for c in self.config.clients.values()} - {"kubernetes", "none"}
        if any(c.auth == "kubernetes" for c in self.config.clients.values()):
            methods.add("private_key_jwt")
        return sorted(methods) or ["client_secret_basic"]
