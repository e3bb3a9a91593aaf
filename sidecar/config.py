"""The sidecar config: typed, frozen, validated at start.

Every problem is reported by its YAML path (``routes[1].upstream: required``), all at once. The
embedded exchange config is read from ``exchange.config`` (a file, relative to this config's
folder) or inline from ``exchange.core``; its problems carry the matching prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from yarl import URL

from exchange.config import ExchangeConfig, parse_exchange_config, read_exchange
from exchange.errors import InvalidRequest
from exchange.keys import KeyRing, SigningKey, signing_key
from exchange.server.keyfiles import load_keyring, load_private_key
from exchange.tokens import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, parse_scope
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

REQUESTED_TOKEN_TYPES = {
    "access_token": TOKEN_TYPE_ACCESS_TOKEN,
    "jwt": TOKEN_TYPE_JWT,
    TOKEN_TYPE_ACCESS_TOKEN: TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT: TOKEN_TYPE_JWT,
}
ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")
LOADED = {"loaded": True}  # a field loaded from files the config names: not part of identity
READINESS = {"loaded": True}  # how readiness treats an exchange: not part of its identity
_IDENTITY_KEY = secrets.token_bytes(32)
HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:.]+\](:\d{1,5})?$")


@dataclass(frozen=True, slots=True)
class Target:
    """What a route asks the exchange for (RFC 8693 §2.1): part of the cache key."""

    audience: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    scope: tuple[str, ...] | None = None
    requested_token_type: str = TOKEN_TYPE_ACCESS_TOKEN


@dataclass(frozen=True, slots=True)
class EmbeddedExchange:
    """The exchange core runs in-process; ``client_id`` names whose policy applies. ``keys``
    are the zone keys, loaded once while the config was checked."""

    client_id: str
    core: ExchangeConfig = field(repr=False)
    keys: KeyRing | None = field(default=None, repr=False, compare=False, metadata=LOADED)
    required: bool = field(default=True, compare=False, metadata=READINESS)
    mode = "embedded"

    @property
    def identity(self) -> str:
        return f"embedded:{self.client_id}:{fingerprint(self)}"


@dataclass(frozen=True, slots=True)
class RemoteExchange:
    """An RFC 8693 token endpoint reached over HTTP, with one client credential."""

    client_id: str
    token_endpoint: str | None = None
    issuer: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    private_key_file: Path | None = None
    client_key: SigningKey | None = field(default=None, repr=False, compare=False, metadata=LOADED)
    service_account_token_file: Path | None = None
    ca_file: Path | None = None
    # the client certificate presented to the token endpoint (mTLS); alone, without another
    # credential, it is the credential: tls_client_auth (RFC 8705 §2.1)
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    timeout: float = 1.0
    retries: int = 2
    required: bool = field(default=True, compare=False, metadata=READINESS)
    mode = "remote"

    @property
    def identity(self) -> str:
        return f"remote:{self.token_endpoint or self.issuer}:{self.client_id}:{fingerprint(self)}"


ExchangeSettings = EmbeddedExchange | RemoteExchange


def fingerprint(settings: ExchangeSettings) -> str:
    """A short HMAC over every setting, secrets and file paths included, keyed with a random
    per-process key: exchanges that differ in anything get distinct identities, and the
    identity (logged) reveals nothing about a secret, not even to an offline guesser."""
    values = [getattr(settings, f.name) for f in fields(settings) if not f.metadata.get("loaded")]
    return hmac.new(_IDENTITY_KEY, repr(values).encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Route:
    """Where matching calls go and which token they carry there."""

    name: str
    upstream: URL | None  # None: served by the authz listener only
    target: Target
    host: str | None = None
    path_prefix: str = "/"
    strip_prefix: bool = False
    missing_token: str = "reject"
    exchange: ExchangeSettings | None = None  # None: the top-level exchange


@dataclass(frozen=True, slots=True)
class AuthzSettings:
    """The authz listener (Envoy ext_authz HTTP service, nginx auth_request)."""

    path_prefix: str = "/check"  # what the proxy in front puts before the original path
    # Headers the proxy would drop (spoofable identity, copies of the token): ``name`` them in
    # x-envoy-auth-headers-to-remove (Envoy removes them), or ``refuse`` the call (nginx, which
    # cannot remove a header it is told about at run time).
    unsafe_headers: str = "name"


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """Token cache bounds."""

    max_entries: int = 10000
    expiry_skew: int = 30
    negative_ttl: float = 5.0
    refresh_ahead: float = 0.8  # refresh once this fraction of an entry's life has passed


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How the sidecar talks to upstreams: TLS trust, timeouts and connection pool."""

    ca_file: Path | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_host: int = 64


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything ``zonegate sidecar`` needs."""

    routes: tuple[Route, ...]
    exchange: ExchangeSettings | None = None
    listen: tuple[str, int] = ("127.0.0.1", 4480)
    admin_listen: tuple[str, int] = ("0.0.0.0", 4490)
    authz_listen: tuple[str, int] | None = None
    authz: AuthzSettings = AuthzSettings()
    cache: CacheSettings = CacheSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    max_header_size: int = 32768
    shutdown_grace: float = 10.0
    listeners: ListenerTimeouts = field(default_factory=ListenerTimeouts)
    access_log: bool = True  # one JSON line per proxied or checked request

    def exchange_for(self, route: Route) -> ExchangeSettings:
        """The exchange serving a route: its own, else the top-level one."""
        settings = route.exchange or self.exchange
        assert settings is not None  # guaranteed by read_sidecar
        return settings

    def exchanges(self) -> dict[str, ExchangeSettings]:
        """Every distinct exchange the routes use, by identity."""
        return {s.identity: s for s in (self.exchange_for(r) for r in self.routes)}

    def required_exchanges(self) -> set[str]:
        """The identities of the exchanges readiness waits for: those some route uses whose
        ``required`` is true (the top-level exchange by default, a route's own one if set)."""
        used = [self.exchange_for(r) for r in self.routes]
        return {s.identity for s in used if s.required}


def read_sidecar(node: Node) -> SidecarConfig:
    """Build a SidecarConfig from a document node, recording every problem."""
    exchange = (
        read_exchange_settings(node.child("exchange"), required=True)
        if node.has("exchange")
        else None
    )
    node.raw("exchange")
    routes = tuple(read_route(i, n) for i, n in enumerate(node.children("routes", required=True)))
    for i, route in enumerate(routes):
        if route.exchange is None and exchange is None:
            node.problems.add(f"routes[{i}].exchange", "required: no top-level exchange is set")
    _check_unique_names(node, routes)
    config = SidecarConfig(
        routes=routes,
        exchange=exchange,
        listen=parse_listen(node, "listen", "127.0.0.1:4480"),
        admin_listen=parse_listen(node, "admin_listen", "0.0.0.0:4490"),
        authz_listen=(
            parse_listen(node, "authz_listen", "127.0.0.1:4481")
            if node.has("authz_listen")
            else None
        ),
        authz=_read_authz(node.child("authz")),
        cache=_read_cache(node.child("cache")),
        upstream=_read_upstream(node.child("upstream")),
        max_header_size=node.integer("max_header_size", 32768, minimum=8190, maximum=1 << 20),
        shutdown_grace=node.number("shutdown_grace", 10.0, maximum=600),
        listeners=read_listener_timeouts(node.child("listeners")),
        access_log=node.flag("access_log", True),
    )
    _check_upstreams(node, config)
    node.finish()
    return config


def _read_authz(node: Node) -> AuthzSettings:
    prefix = node.text("path_prefix", "/check")
    if prefix is not None and (not _is_clean_prefix(prefix) or prefix == "/"):
        node.error("path_prefix", f"must be a path such as /check, got {prefix!r}")
    unsafe = node.choice("unsafe_headers", ("name", "refuse"), "name")
    node.finish()
    return AuthzSettings(path_prefix=(prefix or "/check").rstrip("/"), unsafe_headers=unsafe)


def _check_upstreams(node: Node, config: SidecarConfig) -> None:
    """A route without upstream serves the authz listener only: without one it is a typo."""
    if config.authz_listen is not None:
        return
    for i, route in enumerate(config.routes):
        if route.upstream is None:
            node.problems.add(
                f"routes[{i}].upstream",
                "required (a route without upstream is for the authz listener: set authz_listen)",
            )


def read_exchange_settings(node: Node, *, required: bool = True) -> ExchangeSettings:
    """``exchange:`` at the top or in a route: embedded or remote. ``required`` (whether the
    sidecar waits for it before it is ready) defaults to true at the top, false in a route:
    one zone's exchange being down must not keep the pod from serving the other zones."""
    mode = node.choice("mode", ("embedded", "remote"), "embedded")
    client_id = node.text("client_id") or ""
    settings: ExchangeSettings
    if mode == "remote":
        settings = _read_remote(node, client_id)
    else:
        settings = _read_embedded(node, client_id)
    settings = replace(settings, required=node.flag("required", required))
    node.finish()
    return settings


def _read_embedded(node: Node, client_id: str) -> EmbeddedExchange:
    if node.has("config") == node.has("core"):
        node.error("config", "embedded mode needs exactly one of config (a file) or core (inline)")
        node.raw("core")
        node.raw("config")
        return EmbeddedExchange(client_id, _EMPTY_CORE)
    core = read_exchange(node.child("core")) if node.has("core") else _load_core_file(node)
    keys = _load_zone_keys(node, core)
    if client_id and core.clients and client_id not in core.clients:
        node.error("client_id", f"no client {client_id!r} in the exchange config")
    return EmbeddedExchange(client_id, core, keys)


def _load_core_file(node: Node) -> ExchangeConfig:
    path = node.path_value("config")
    if path is None:
        return _EMPTY_CORE
    try:
        return parse_exchange_config(load_document(path, "exchange"), path.parent)
    except ConfigError as e:
        for line in e.errors:
            node.error("config", f"{path}: {line}")
        return _EMPTY_CORE


def _load_zone_keys(node: Node, core: ExchangeConfig) -> KeyRing | None:
    """Signing key files load now, once, not at the first request; errors name the zone."""
    try:
        return load_keyring(core)
    except ConfigError as e:
        for line in e.errors:
            node.problems.add(node.at(f"core.{line.split(': ', 1)[0]}"), line.split(": ", 1)[1])
        return None


def _load_client_key(node: Node, key: str, path: Path) -> SigningKey | None:
    try:
        return signing_key(load_private_key(path))
    except ValueError as e:
        node.error(key, str(e))
        return None


def _read_remote(node: Node, client_id: str) -> RemoteExchange:
    settings = RemoteExchange(
        client_id=client_id,
        token_endpoint=_url(node, "token_endpoint"),
        issuer=_url(node, "issuer"),
        client_secret=node.secret("client_secret"),
        private_key_file=node.path_value("private_key_file"),
        service_account_token_file=node.path_value("service_account_token_file"),
        ca_file=_ca_file(node, "ca_file"),
        tls_client_cert_file=_existing_file(node, "tls_client_cert_file"),
        tls_client_key_file=_existing_file(node, "tls_client_key_file"),
        timeout=node.number("timeout", 1.0, minimum=0.05, maximum=30),
        retries=node.integer("retries", 2, maximum=5),
    )
    if (settings.token_endpoint is None) == (settings.issuer is None):
        node.error("token_endpoint", "remote mode needs exactly one of token_endpoint or issuer")
    credentials = [
        k
        for k, v in (
            ("client_secret", settings.client_secret),
            ("private_key_file", settings.private_key_file),
            ("service_account_token_file", settings.service_account_token_file),
        )
        if v is not None
    ]
    _check_client_certificate(node, settings)
    has_certificate = settings.tls_client_cert_file is not None
    if len(credentials) > 1 or not (credentials or has_certificate):
        node.error(
            "client_secret",
            "remote mode needs exactly one credential: client_secret(_file), private_key_file, "
            "service_account_token_file, or a client certificate alone "
            "(tls_client_cert_file and tls_client_key_file: tls_client_auth) "
            f"(got {', '.join(credentials) or 'none'})",
        )
    if settings.private_key_file is not None:
        key = _load_client_key(node, "private_key_file", settings.private_key_file)
        settings = replace(settings, client_key=key)
    return settings


def _check_client_certificate(node: Node, settings: RemoteExchange) -> None:
    """The client certificate and its key come together and must load together."""
    cert, key = settings.tls_client_cert_file, settings.tls_client_key_file
    if (cert is None) != (key is None):
        node.error(
            "tls_client_cert_file" if cert is None else "tls_client_key_file",
            "give tls_client_cert_file and tls_client_key_file together",
        )
    elif cert and key and cert.is_file() and key.is_file() and READ_SECRETS.get():
        problem = check_pair(cert, key)
        if problem is not None:
            node.error("tls_client_cert_file", f"cannot load {cert} with {key}: {problem}")
    if cert is not None and settings.token_endpoint and settings.token_endpoint.startswith("http:"):
        node.error("tls_client_cert_file", "a client certificate needs an https token_endpoint")


def _ca_file(node: Node, key: str) -> Path | None:
    """A CA bundle (PEM) that must exist and load now, not at the first exchange."""
    path = _existing_file(node, key)
    if path is not None and path.is_file():
        problem = check_ca_bundle(path)
        if problem is not None:
            node.error(key, f"cannot load {path} as a PEM CA bundle: {problem}")
    return path


def read_route(index: int, node: Node) -> Route:
    """One entry of ``routes``."""
    name = node.text("name", str(index))
    if name is not None and not ROUTE_NAME.match(name):
        node.error("name", "use 1 to 63 letters, digits, '.', '_' or '-' (it is a metric label)")
    host = node.text("host", None)
    if host is not None:
        host = host.lower()
        if not HOST.match(host):
            node.error("host", f"must be a host name, optionally with :port, got {host!r}")
    path_prefix = node.text("path_prefix", "/")
    if path_prefix is not None and not _is_clean_prefix(path_prefix):
        node.error("path_prefix", "must start with '/' and hold no '.', '..', '%' or '//' segments")
    route = Route(
        name=name or str(index),
        host=host,
        path_prefix=path_prefix or "/",
        strip_prefix=node.flag("strip_prefix", False),
        upstream=_upstream(node),
        target=_read_target(node),
        missing_token=node.choice("missing_token", ("reject", "forward"), "reject"),
        exchange=(
            read_exchange_settings(node.child("exchange"), required=False)
            if node.has("exchange")
            else None
        ),
    )
    node.raw("exchange")
    node.finish()
    return route


def _is_clean_prefix(prefix: str) -> bool:
    if not prefix.startswith("/") or "%" in prefix or "\\" in prefix or "//" in prefix:
        return False
    return not any(segment in (".", "..") for segment in prefix.split("/"))


def _upstream(node: Node) -> URL | None:
    value = node.text("upstream", None)
    if value is None:
        return None
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        node.error("upstream", f"must be an http(s) URL without query or fragment, got {value!r}")
        return URL("http://invalid")
    return url


def _read_target(node: Node) -> Target:
    scope = node.text("scope", None)
    scopes: tuple[str, ...] | None = None
    if scope is not None:
        try:
            scopes = parse_scope(scope)
        except InvalidRequest as e:
            node.error("scope", e.description)
    requested = node.choice("requested_token_type", tuple(REQUESTED_TOKEN_TYPES), "access_token")
    return Target(
        audience=node.strings("audience", ()),
        resource=node.strings("resource", ()),
        scope=scopes,
        requested_token_type=REQUESTED_TOKEN_TYPES.get(requested or "", TOKEN_TYPE_ACCESS_TOKEN),
    )


def _read_cache(node: Node) -> CacheSettings:
    settings = CacheSettings(
        max_entries=node.integer("max_entries", 10000, minimum=1, maximum=10**7),
        expiry_skew=node.integer("expiry_skew", 30, maximum=3600),
        negative_ttl=node.number("negative_ttl", 5.0, maximum=300),
        refresh_ahead=node.number("refresh_ahead", 0.8, minimum=0.1, maximum=1.0),
    )
    node.finish()
    return settings


def _read_upstream(node: Node) -> UpstreamSettings:
    settings = UpstreamSettings(
        ca_file=_existing_file(node, "ca_file"),
        connect_timeout=node.number("connect_timeout", 5.0, minimum=0.05, maximum=300),
        read_timeout=node.number("read_timeout", 60.0, minimum=0.05, maximum=3600),
        max_connections=node.integer("max_connections", 256, minimum=1, maximum=100000),
        max_connections_per_host=node.integer(
            "max_connections_per_host", 64, minimum=1, maximum=100000
        ),
    )
    node.finish()
    return settings


def _url(node: Node, key: str) -> str | None:
    value: str | None = node.text(key, None)
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        node.error(key, f"must be an http(s) URL, got {value!r}")
    return value


def _existing_file(node: Node, key: str) -> Path | None:
    path = node.path_value(key)
    if path is not None and not path.is_file():
        node.error(key, f"no such file: {path}")
    return path


def _check_unique_names(node: Node, routes: tuple[Route, ...]) -> None:
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.name in seen:
            node.problems.add(f"routes[{i}].name", f"duplicate route name {route.name!r}")
        seen.add(route.name)


_EMPTY_CORE = ExchangeConfig(issuer="", trusted_issuers=(), zones={}, clients={})


def parse_sidecar_config(data: Any, base_dir: Path) -> SidecarConfig:
    """Validate an already parsed sidecar config document."""
    return read_document(data, base_dir, read_sidecar)


def load_sidecar_config(path: Path) -> SidecarConfig:
    """Load and validate a sidecar config file; raises ConfigError listing every problem."""
    return parse_sidecar_config(load_document(path, "sidecar"), path.parent)
