"""The exchange config: typed, frozen models and their readers, validated at start."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from runtime.configload import (
    ConfigError,
    ListenerTimeouts,
    Node,
    load_yaml,
    parse_listen,
    read_document,
    read_listener_timeouts,
)

DEFAULT_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SIGNING_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
CLIENT_AUTH_METHODS = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "kubernetes",
    "none",
)
ZONE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:[a-z0-9.-]+:[a-z0-9.-]+$")


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An OpenID Provider whose tokens may be exchanged."""

    issuer: str
    audiences: tuple[str, ...] | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_uri: str | None = None  # skip discovery when given


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Which subject claims the zone token carries: ``sub`` from ``sub``, plus a copy list."""

    sub: str = "sub"
    copy: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    """A security zone: an issuer of its own with its own keys, audiences and scopes."""

    name: str
    audiences: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    token_lifetime: int = 300
    signing_key_file: Path | None = None
    next_signing_key_file: Path | None = None
    signing_alg: str | None = None  # RSA keys: RS256 (default) or PS256; others follow the key
    claims: ClaimMapping = ClaimMapping()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``rate`` exchanges per second, bursts up to ``burst``."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A client allowed to exchange tokens, and what it may get."""

    client_id: str
    auth: str = "client_secret_basic"
    client_secret: str | None = field(default=None, repr=False)
    client_secret_sha256: str | None = field(default=None, repr=False)
    jwks: dict[str, Any] | None = field(default=None, repr=False)
    jwks_uri: str | None = None
    service_account: str | None = None
    zones: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    default_zone: str | None = None
    subject_audiences: tuple[str, ...] | None = None  # subject `aud` values this client may present
    rate_limit: RateLimit | None = None

    def secret_matches(self, presented: str) -> bool:
        """Constant-time comparison against the stored secret or its SHA-256."""
        import hmac

        if self.client_secret is not None:
            return hmac.compare_digest(presented.encode(), self.client_secret.encode())
        if self.client_secret_sha256 is not None:
            digest = hashlib.sha256(presented.encode()).hexdigest()
            return hmac.compare_digest(digest, self.client_secret_sha256.lower())
        return False


@dataclass(frozen=True, slots=True)
class ClusterIssuer:
    """A Kubernetes service-account token issuer trusted for client authentication."""

    issuer: str
    audiences: tuple[str, ...] = ("zonegate",)
    max_token_age: int = 86400
    jwks_uri: str | None = None


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    """Everything the exchange core and server need."""

    issuer: str
    trusted_issuers: tuple[TrustedIssuer, ...]
    zones: dict[str, ZoneConfig]
    clients: dict[str, ClientConfig]
    listen: tuple[str, int] = ("127.0.0.1", 8081)
    cluster_issuers: tuple[ClusterIssuer, ...] = ()
    leeway: int = 30
    max_token_size: int = 16384
    jwks_min_refresh: float = 10.0  # unknown-kid refetches at most this often per issuer
    jwks_max_age: int = 3600  # upper bound on Cache-Control max-age
    jwks_stale_for: int = 86400  # keys keep working this long while the issuer is unreachable
    fetch_timeout: float = 5.0
    listeners: ListenerTimeouts = field(default_factory=ListenerTimeouts)  # server only

    def zone_issuer(self, zone: str) -> str:
        """The ``iss`` of tokens minted for ``zone``."""
        return f"{self.issuer.rstrip('/')}/zones/{zone}"


def read_exchange(node: Node) -> ExchangeConfig:
    """Build an ExchangeConfig from a document node, recording every problem."""
    issuer = node.text("issuer", "http://127.0.0.1:8081")
    _check_url(node, "issuer", issuer)
    listen = parse_listen(node, "listen", "127.0.0.1:8081")
    trusted = tuple(
        _read_trusted_issuer(n) for n in node.children("trusted_issuers", required=True)
    )
    zones = {name: _read_zone(name, n) for name, n in node.entries("zones")}
    if not zones:
        node.error("zones", "required: define at least one zone")
    clusters = tuple(_read_cluster_issuer(n) for n in node.children("cluster_issuers"))
    clients: dict[str, ClientConfig] = {}
    for n in node.children("clients", required=True):
        client = _read_client(n, zones, bool(clusters))
        if client.client_id in clients:
            n.error("client_id", f"duplicate client_id {client.client_id!r}")
        clients[client.client_id] = client
    _check_targets_unique(node, zones)
    config = ExchangeConfig(
        issuer=issuer or "",
        trusted_issuers=trusted,
        zones=zones,
        clients=clients,
        listen=listen,
        cluster_issuers=clusters,
        leeway=node.integer("leeway", 30, maximum=600),
        max_token_size=node.integer("max_token_size", 16384, minimum=1024, maximum=1 << 20),
        jwks_min_refresh=node.number("jwks_min_refresh", 10.0, maximum=3600),
        jwks_max_age=node.integer("jwks_max_age", 3600, minimum=1, maximum=86400),
        jwks_stale_for=node.integer("jwks_stale_for", 86400, maximum=7 * 86400),
        fetch_timeout=node.number("fetch_timeout", 5.0, minimum=0.1, maximum=60),
        listeners=read_listener_timeouts(node.child("listeners")),
    )
    node.finish()
    return config


def _url(node: Node, key: str) -> str | None:
    value: str | None = node.text(key, None)
    _check_url(node, key, value)
    return value


def _check_url(node: Node, key: str, value: str | None) -> None:
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        node.error(key, f"must be an http(s) URL, got {value!r}")


def _read_trusted_issuer(node: Node) -> TrustedIssuer:
    issuer = node.text("issuer")
    _check_url(node, "issuer", issuer)
    audiences = node.strings("audiences", None)
    algorithms = node.strings("algorithms", DEFAULT_ALGORITHMS)
    for alg in algorithms:
        if alg not in ALLOWED_ALGORITHMS:
            node.error(
                "algorithms",
                f"{alg!r} is not allowed (never none or HS*); use {', '.join(DEFAULT_ALGORITHMS)}",
            )
    jwks_uri = node.text("jwks_uri", None)
    _check_url(node, "jwks_uri", jwks_uri)
    node.finish()
    return TrustedIssuer(issuer or "", audiences, tuple(algorithms), jwks_uri)


def _read_zone(name: str, node: Node) -> ZoneConfig:
    if not ZONE_NAME.match(name):
        node.problems.add(node.path, "zone names are lowercase letters, digits and '-'")
    claims = node.child("claims")
    mapping = ClaimMapping(sub=claims.text("sub", "sub"), copy=tuple(claims.strings("copy", ())))
    for reserved in set(mapping.copy) & RESERVED_CLAIMS:
        claims.error("copy", f"{reserved!r} is set by zonegate and cannot be copied")
    claims.finish()
    zone = ZoneConfig(
        name=name,
        audiences=node.strings("audiences", ()),
        resources=node.strings("resources", ()),
        scopes=node.strings("scopes", ()),
        token_lifetime=node.integer("token_lifetime", 300, minimum=1, maximum=86400),
        signing_key_file=node.path_value("signing_key_file"),
        next_signing_key_file=node.path_value("next_signing_key_file"),
        signing_alg=node.choice("signing_alg", SIGNING_ALGORITHMS, None),
        claims=mapping,
    )
    for resource in zone.resources:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^#]+$", resource):
            node.error("resources", f"{resource!r} is not an absolute URI (RFC 8693 §2.1)")
    if not zone.audiences and not zone.resources:
        node.error("audiences", "give at least one audience or resource that selects this zone")
    node.finish()
    return zone


RESERVED_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "act", "may_act"}
)


def _read_client(node: Node, zones: dict[str, ZoneConfig], have_clusters: bool) -> ClientConfig:
    client = ClientConfig(
        client_id=node.text("client_id") or "",
        auth=node.choice("auth", CLIENT_AUTH_METHODS, "client_secret_basic")
        or "client_secret_basic",
        client_secret=node.secret("client_secret"),
        client_secret_sha256=node.text("client_secret_sha256", None),
        jwks=_read_jwks(node),
        jwks_uri=_url(node, "jwks_uri"),
        service_account=node.text("service_account", None),
        zones=node.strings("zones", ()),
        scopes=node.strings("scopes", ()),
        default_zone=node.text("default_zone", None),
        subject_audiences=node.strings("subject_audiences", None),
        rate_limit=_read_rate_limit(node),
    )
    _check_client_auth(node, client, have_clusters)
    _check_client_zones(node, client, zones)
    node.finish()
    return client


def _read_jwks(node: Node) -> dict[str, Any] | None:
    jwks = node.raw("jwks")
    if jwks is None:
        return None
    if not (isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)):
        node.error("jwks", "must be a JWKS mapping: {keys: [...]}")
        return None
    if not any(_usable_public_key(k) for k in jwks["keys"]):
        node.error(
            "jwks", "holds no usable public signature key (RSA, EC or OKP; no private or oct keys)"
        )
        return None
    return jwks


def _usable_public_key(jwk: Any) -> bool:
    if not isinstance(jwk, dict) or "d" in jwk or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return False
    try:
        jwt.PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return False
    return True


def _read_rate_limit(node: Node) -> RateLimit | None:
    rate = node.child("rate_limit")
    limit = None
    if node.has("rate_limit"):
        limit = RateLimit(
            rate=rate.number("rate", minimum=0.001), burst=rate.integer("burst", 10, minimum=1)
        )
    rate.finish()
    return limit


def _check_client_auth(node: Node, client: ClientConfig, have_clusters: bool) -> None:
    """Each auth method needs its credential."""
    auth, sha256 = client.auth, client.client_secret_sha256
    if auth in ("client_secret_basic", "client_secret_post") and not (
        client.client_secret or sha256
    ):
        node.error(
            "client_secret",
            f"auth {auth} needs client_secret, client_secret_file or client_secret_sha256",
        )
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        node.error("client_secret_sha256", "must be 64 hex digits (sha256sum of the secret)")
    if auth == "private_key_jwt" and not (client.jwks or client.jwks_uri):
        node.error("jwks", "auth private_key_jwt needs jwks (a JWKS mapping) or jwks_uri")
    if auth == "kubernetes":
        if client.service_account is None or not SERVICE_ACCOUNT.match(client.service_account):
            node.error("service_account", "auth kubernetes needs system:serviceaccount:<ns>:<name>")
        if not have_clusters:
            node.error("auth", "auth kubernetes needs a top-level cluster_issuers entry")


def _check_client_zones(node: Node, client: ClientConfig, zones: dict[str, ZoneConfig]) -> None:
    for z in client.zones:
        if z not in zones:
            node.error("zones", f"unknown zone {z!r} (zones: {', '.join(sorted(zones))})")
    if client.default_zone is not None and client.default_zone not in client.zones:
        node.error("default_zone", f"{client.default_zone!r} must be one of this client's zones")
    offered = {s for zone in zones.values() for s in zone.scopes}
    for scope in client.scopes:
        if scope not in offered:  # a typo here would silently never be granted
            node.error("scopes", f"{scope!r} is not a scope of any zone")


def _read_cluster_issuer(node: Node) -> ClusterIssuer:
    issuer = node.text("issuer")
    _check_url(node, "issuer", issuer)
    cluster = ClusterIssuer(
        issuer=issuer or "",
        audiences=node.strings("audiences", ("zonegate",)),
        max_token_age=node.integer("max_token_age", 86400, minimum=60, maximum=7 * 86400),
        jwks_uri=node.text("jwks_uri", None),
    )
    node.finish()
    return cluster


def _check_targets_unique(node: Node, zones: dict[str, ZoneConfig]) -> None:
    """An audience or resource selects one zone only; two zones claiming it is ambiguous."""
    owner: dict[str, str] = {}
    for zone in zones.values():
        for target in zone.audiences + zone.resources:
            if target in owner and owner[target] != zone.name:
                node.error(
                    f"zones.{zone.name}",
                    f"{target!r} already selects zone {owner[target]!r}; each value selects one zone",
                )
            owner[target] = zone.name


def load_exchange_config(path: Path) -> ExchangeConfig:
    """Load and validate an exchange config file; raises ConfigError listing every problem."""
    return parse_exchange_config(load_yaml(path), path.parent)


def parse_exchange_config(data: Any, base_dir: Path, path: str = "") -> ExchangeConfig:
    """Validate an already parsed exchange config document."""
    return read_document(data, base_dir, read_exchange, path)


__all__ = [
    "ClaimMapping",
    "ClientConfig",
    "ClusterIssuer",
    "ConfigError",
    "ExchangeConfig",
    "TrustedIssuer",
    "ZoneConfig",
    "load_exchange_config",
    "parse_exchange_config",
]
