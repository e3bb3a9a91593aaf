"""The exchange config: typed, frozen models and their readers, validated at start."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from exchange.keys import SigningKey, parse_private_key, signing_key, verification_key
from runtime.configload import (
    READ_SECRETS,
    ConfigError,
    ListenerTimeouts,
    Node,
    load_document,
    parse_listen,
    read_document,
    read_listener_timeouts,
)
from runtime.tls import check_ca_bundle, check_pair

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
    "tls_client_auth",
    "none",
)
# RFC 8705 §2.1.2: how a tls_client_auth client's certificate is matched; exactly one is given
TLS_CLIENT_AUTH_KEYS = (
    "tls_client_auth_subject_dn",
    "tls_client_auth_san_dns",
    "tls_client_auth_san_uri",
)
ZONE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:[a-z0-9.-]+:[a-z0-9.-]+$")
TOKEN_TYPE_URN = "urn:ietf:params:oauth:token-type:"
SUBJECT_TOKEN_TYPES = ("access_token", "id_token", "jwt")  # RFC 8693 §3, short names
SUBJECT_SCOPES = ("ignore", "intersect")


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An OpenID Provider whose tokens may be exchanged."""

    issuer: str
    audiences: tuple[str, ...] | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_uri: str | None = None  # skip discovery when given
    # what a subject_token_type may declare for this issuer's tokens (short names)
    subject_token_types: tuple[str, ...] = SUBJECT_TOKEN_TYPES
    require_typ: str | None = None  # "at+jwt": the JOSE typ must say so (RFC 9068 §4)
    ca_file: Path | None = None  # CA bundle for its discovery and JWKS (None: system CAs)


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
    # The keys of the files above, read once with the config (None: no file, or not readable)
    signing_key: SigningKey | None = field(default=None, repr=False, compare=False)
    next_signing_key: SigningKey | None = field(default=None, repr=False, compare=False)
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
    subject_scope: str = "ignore"  # "intersect": granted scope ∩ the subject's scope/scp
    cluster_issuer: str | None = None  # auth kubernetes: the one cluster whose tokens it accepts
    # auth tls_client_auth (RFC 8705 §2.1): exactly one names the client's certificate
    tls_client_auth_subject_dn: str | None = None  # RFC 4514 string form
    tls_client_auth_san_dns: str | None = None
    tls_client_auth_san_uri: str | None = None  # a SPIFFE ID is a URI SAN

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
    ca_file: Path | None = None  # CA bundle for its discovery and JWKS (None: system CAs)


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The exchange server's TLS listener: its certificate and key, and the CA bundle client
    certificates are verified against (``tls_client_auth``)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


SHARED_STATE_BACKENDS = ("memory", "redis")
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:{}-]{1,64}$")


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    """Where the exchange server keeps the state its replicas share: the ``jti`` of accepted
    client assertions and the rate-limit buckets. ``memory``: this process only."""

    backend: str = "memory"
    url: str | None = field(default=None, repr=False)  # holds the Redis password
    ca_file: Path | None = None
    key_prefix: str = "zonegate:"


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    """Everything the exchange core and server need."""

    issuer: str
    trusted_issuers: tuple[TrustedIssuer, ...]
    zones: dict[str, ZoneConfig]
    clients: dict[str, ClientConfig]
    listen: tuple[str, int] = ("127.0.0.1", 8081)
    admin_listen: tuple[str, int] | None = None  # server only: /healthz /readyz /metrics there
    cluster_issuers: tuple[ClusterIssuer, ...] = ()
    leeway: int = 30
    max_token_size: int = 16384
    jwks_min_refresh: float = 10.0  # unknown-kid refetches at most this often per issuer
    jwks_max_age: int = 3600  # upper bound on Cache-Control max-age
    jwks_stale_for: int = 86400  # keys keep working this long while the issuer is unreachable
    fetch_timeout: float = 5.0
    tls: ServerTls | None = None  # None: listen serves plain HTTP
    shared_state: SharedStateConfig = SharedStateConfig()  # server only
    listeners: ListenerTimeouts = field(default_factory=ListenerTimeouts)  # server only

    def zone_issuer(self, zone: str) -> str:
        """The ``iss`` of tokens minted for ``zone``."""
        return f"{self.issuer.rstrip('/')}/zones/{zone}"


def read_exchange(node: Node) -> ExchangeConfig:
    """Build an ExchangeConfig from a document node, recording every problem."""
    issuer = node.text("issuer", "http://127.0.0.1:8081")
    _check_url(node, "issuer", issuer)
    listen = parse_listen(node, "listen", "127.0.0.1:8081")
    admin_listen = parse_listen(node, "admin_listen", "") if node.has("admin_listen") else None
    if admin_listen is not None and admin_listen == listen and listen[1] != 0:
        node.error("admin_listen", "must differ from listen (another port, or leave it out)")
    tls = _read_tls(node.child("tls")) if node.has("tls") else None
    node.raw("tls")
    trusted = tuple(
        _read_trusted_issuer(n) for n in node.children("trusted_issuers", required=True)
    )
    zones = {name: _read_zone(name, n) for name, n in node.entries("zones")}
    if not zones:
        node.error("zones", "required: define at least one zone")
    clusters = tuple(_read_cluster_issuer(n) for n in node.children("cluster_issuers"))
    clients: dict[str, ClientConfig] = {}
    for n in node.children("clients", required=True):
        client = _read_client(n, zones, clusters, tls)
        if client.client_id in clients:
            n.error("client_id", f"duplicate client_id {client.client_id!r}")
        clients[client.client_id] = client
    _check_targets_unique(node, zones)
    _check_service_accounts_unique(node, clients)
    config = ExchangeConfig(
        issuer=issuer or "",
        trusted_issuers=trusted,
        zones=zones,
        clients=clients,
        listen=listen,
        admin_listen=admin_listen,
        cluster_issuers=clusters,
        leeway=node.integer("leeway", 30, maximum=600),
        max_token_size=node.integer("max_token_size", 16384, minimum=1024, maximum=1 << 20),
        jwks_min_refresh=node.number("jwks_min_refresh", 10.0, maximum=3600),
        jwks_max_age=node.integer("jwks_max_age", 3600, minimum=1, maximum=86400),
        jwks_stale_for=node.integer("jwks_stale_for", 86400, maximum=7 * 86400),
        fetch_timeout=node.number("fetch_timeout", 5.0, minimum=0.1, maximum=60),
        tls=tls,
        shared_state=_read_shared_state(node.child("shared_state")),
        listeners=read_listener_timeouts(node.child("listeners")),
    )
    node.finish()
    return config


def _read_shared_state(node: Node) -> SharedStateConfig:
    """``shared_state:``: memory (default), or redis with ``url`` or ``url_file``."""
    backend = node.choice("backend", SHARED_STATE_BACKENDS, "memory") or "memory"
    url = node.secret("url")
    ca_file = _ca_file(node, "ca_file")
    key_prefix = node.text("key_prefix", "zonegate:") or "zonegate:"
    if not KEY_PREFIX.match(key_prefix):
        node.error("key_prefix", "use 1 to 64 letters, digits and . _ : - { }")
    if backend == "memory":
        for key, value in (("url", url), ("ca_file", ca_file)):
            if value is not None:
                node.error(key, "only with backend: redis (memory keeps the state in-process)")
    elif url is None:
        node.error("url", "required with backend: redis: give url or url_file")
    elif READ_SECRETS.get():
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("redis", "rediss"):
            # the value is not repeated: it holds the password
            node.error(
                "url", "must be a redis:// or rediss:// URL (redis://[:password@]host:port/db)"
            )
        elif ca_file is not None and scheme != "rediss":
            node.error("ca_file", "needs a rediss:// (TLS) url")
    node.finish()
    return SharedStateConfig(backend, url, ca_file, key_prefix)


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
    types = []
    for value in node.strings("subject_token_types", SUBJECT_TOKEN_TYPES):
        short = value.removeprefix(TOKEN_TYPE_URN)
        if short not in SUBJECT_TOKEN_TYPES:
            node.error(
                "subject_token_types",
                f"{value!r} is not a subject token type; use {', '.join(SUBJECT_TOKEN_TYPES)}",
            )
        types.append(short)
    if not types:
        node.error("subject_token_types", "name at least one type, or leave it out")
    require_typ = node.choice("require_typ", ("at+jwt",), None)
    ca_file = _ca_file(node, "ca_file")
    node.finish()
    return TrustedIssuer(
        issuer or "",
        audiences,
        tuple(algorithms),
        jwks_uri,
        subject_token_types=tuple(dict.fromkeys(types)),
        require_typ=require_typ,
        ca_file=ca_file,
    )


def _ca_file(node: Node, key: str) -> Path | None:
    """A CA bundle (PEM) that must exist and load now, not at the first fetch."""
    path = node.path_value(key)
    if path is not None:
        problem = check_ca_bundle(path)
        if problem is not None:
            node.error(key, f"cannot load {path} as a PEM CA bundle: {problem}")
    return path


def _read_tls(node: Node) -> ServerTls:
    """``tls:``: the listener's certificate and key (they must load together) and, for
    tls_client_auth, the client CA bundle."""
    cert_file, key_file = node.path_value("cert_file"), node.path_value("key_file")
    for key, value in (("cert_file", cert_file), ("key_file", key_file)):
        if value is None:
            node.error(key, "required: tls needs cert_file and key_file (PEM)")
    if cert_file is not None and key_file is not None and READ_SECRETS.get():
        problem = check_pair(cert_file, key_file)
        if problem is not None:
            node.error("cert_file", f"cannot load {cert_file} with {key_file}: {problem}")
    client_ca_file = _ca_file(node, "client_ca_file")
    node.finish()
    return ServerTls(cert_file or Path(), key_file or Path(), client_ca_file)


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
        signing_alg=(alg := node.choice("signing_alg", SIGNING_ALGORITHMS, None)),
        signing_key=_zone_key(node, "signing_key_file", alg),
        next_signing_key=_zone_key(node, "next_signing_key_file", alg),
        claims=mapping,
    )
    for resource in zone.resources:
        if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:[^#]+$", resource):
            node.error("resources", f"{resource!r} is not an absolute URI (RFC 8693 §2.1)")
    if not zone.audiences and not zone.resources:
        node.error("audiences", "give at least one audience or resource that selects this zone")
    node.finish()
    return zone


def _zone_key(node: Node, key: str, alg: str | None) -> SigningKey | None:
    """The signing key in the PEM file ``key`` names, read now so that every config error,
    key files included, is reported in one run. Private keys are secrets: under
    ``secrets_unread()`` they are not read."""
    if not READ_SECRETS.get():
        node.path_value(key)
        return None
    found = node.file_bytes(key)
    if found is None:
        return None
    path, pem = found
    try:
        return signing_key(parse_private_key(pem, str(path)), alg)
    except ValueError as e:
        node.error(key, str(e))
        return None


RESERVED_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "act", "may_act"}
)


def _read_client(
    node: Node,
    zones: dict[str, ZoneConfig],
    clusters: tuple[ClusterIssuer, ...],
    tls: ServerTls | None = None,
) -> ClientConfig:
    auth = node.choice("auth", CLIENT_AUTH_METHODS, "client_secret_basic") or "client_secret_basic"
    client = ClientConfig(
        client_id=node.text("client_id") or "",
        auth=auth,
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
        subject_scope=node.choice("subject_scope", SUBJECT_SCOPES, "ignore") or "ignore",
        cluster_issuer=_cluster_of(node, auth, clusters),
        tls_client_auth_subject_dn=node.text("tls_client_auth_subject_dn", None),
        tls_client_auth_san_dns=node.text("tls_client_auth_san_dns", None),
        tls_client_auth_san_uri=node.text("tls_client_auth_san_uri", None),
    )
    _check_client_auth(node, client, bool(clusters))
    _check_tls_client_auth(node, client, tls)
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
            "jwks",
            "holds no usable public signature key (RSA of 2048 bits or more, EC or OKP; no "
            "private or oct keys; use sig and key_ops with verify, when given)",
        )
        return None
    return jwks


def _usable_public_key(jwk: Any) -> bool:
    try:
        verification_key(jwk)
    except ValueError:
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


def _check_tls_client_auth(node: Node, client: ClientConfig, tls: ServerTls | None) -> None:
    """RFC 8705 §2.1: exactly one certificate match, and a listener that verifies it."""
    given = [k for k in TLS_CLIENT_AUTH_KEYS if getattr(client, k) is not None]
    if client.auth != "tls_client_auth":
        for key in given:
            node.error(key, "only a client with auth tls_client_auth is matched by certificate")
        return
    if len(given) != 1:
        node.error(
            "auth",
            "auth tls_client_auth needs exactly one of tls_client_auth_subject_dn, "
            f"tls_client_auth_san_dns or tls_client_auth_san_uri (got {', '.join(given) or 'none'})",
        )
    if tls is None or tls.client_ca_file is None:
        node.error(
            "auth",
            "auth tls_client_auth needs the server to verify client certificates: set "
            "tls.cert_file, tls.key_file and tls.client_ca_file",
        )
    dn = client.tls_client_auth_subject_dn
    if dn is not None:
        try:
            parse_dn(dn)
        except ValueError:
            node.error(
                "tls_client_auth_subject_dn",
                f"{dn!r} is not an RFC 4514 distinguished name (like CN=billing,O=Acme)",
            )
    uri = client.tls_client_auth_san_uri
    if uri is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", uri):
        node.error("tls_client_auth_san_uri", f"{uri!r} is not an absolute URI (spiffe://...)")
    name = client.tls_client_auth_san_dns
    if name is not None and not re.fullmatch(
        r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name
    ):
        node.error("tls_client_auth_san_dns", f"{name!r} is not a DNS name")


def parse_dn(text: str) -> x509.Name:
    """An RFC 4514 distinguished name, read as operators write them: attribute types in any
    case (RFC 4514 §3: they are case-insensitive), spaces around ``,``, ``+`` and ``=``."""
    parts = re.split(r"(?<!\\)([,+])", text)
    out = []
    for part in parts:
        if part in (",", "+"):
            out.append(part)
            continue
        kind, eq, value = part.partition("=")
        kind = kind.strip()
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", kind):
            kind = kind.upper()
        value = value.lstrip()
        if not value.endswith("\\ "):
            value = value.rstrip()
        out.append(f"{kind}{eq}{value}")
    name = x509.Name.from_rfc4514_string("".join(out))
    if not name.rdns:
        raise ValueError("empty distinguished name")
    return name


def _cluster_of(node: Node, auth: str, clusters: tuple[ClusterIssuer, ...]) -> str | None:
    """The cluster issuer an ``auth: kubernetes`` client is bound to: the one it names, or the
    only one configured. With several, naming one is required: a service account of the same
    name in another cluster must not become this client."""
    named: str | None = node.text("cluster_issuer", None)
    known = [c.issuer for c in clusters]
    if auth != "kubernetes":
        if named is not None:
            node.error("cluster_issuer", "only a client with auth kubernetes names a cluster")
        return None
    if named is None:
        if len(known) > 1:
            node.error(
                "cluster_issuer",
                "required with more than one cluster_issuers entry: name the cluster whose "
                f"service-account tokens this client accepts (one of: {', '.join(known)})",
            )
        return known[0] if len(known) == 1 else None
    if named not in known:
        node.error(
            "cluster_issuer",
            f"{named!r} is not a cluster_issuers entry (configured: {', '.join(known) or 'none'})",
        )
    return named


def _check_service_accounts_unique(node: Node, clients: dict[str, ClientConfig]) -> None:
    """One client per service account and cluster: two would make the mapping ambiguous."""
    owner: dict[tuple[str | None, str], str] = {}
    for client in clients.values():
        if client.auth != "kubernetes" or client.service_account is None:
            continue
        key = (client.cluster_issuer, client.service_account)
        if key in owner:
            node.error(
                "clients",
                f"clients {owner[key]!r} and {client.client_id!r} both map service account "
                f"{client.service_account} of cluster {client.cluster_issuer}; one client each",
            )
        owner[key] = client.client_id


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
        ca_file=_ca_file(node, "ca_file"),
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
    return parse_exchange_config(load_document(path, "exchange"), path.parent)


def parse_exchange_config(data: Any, base_dir: Path, path: str = "") -> ExchangeConfig:
    """Validate an already parsed exchange config document."""
    return read_document(data, base_dir, read_exchange, path)


__all__ = [
    "ClaimMapping",
    "ClientConfig",
    "ClusterIssuer",
    "ConfigError",
    "ExchangeConfig",
    "ServerTls",
    "TrustedIssuer",
    "ZoneConfig",
    "load_exchange_config",
    "parse_exchange_config",
]
