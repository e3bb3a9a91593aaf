"""Header rules of the proxy, pure: a header mapping and plain facts in, headers out.

Headers dropped on the way up (documented in docs/sidecar.md):

* hop-by-hop (RFC 9110 §7.6.1) and every header named in ``Connection``;
* ``Authorization`` (replaced, last, by the zone token) and ``Expect`` (handled by the server);
* identity, client-certificate and path-override headers an app (or an attacker inside it)
  could spoof to a backend that trusts an auth proxy in front of it: the table
  ``SPOOFABLE_IDENTITY`` (each entry with who sets it), matched with ``_`` read as ``-``;
* any header whose value holds the subject token (``removed_for_safety``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger("zonegate.sidecar")
Headers = CIMultiDict[str] | CIMultiDictProxy[str]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers an app (or an attacker inside it) could spoof to a backend that trusts an auth proxy,
# a TLS terminator or a URL rewriter in front of it: identities, tokens, client certificates
# and path overrides. Each entry: a lower-case name with '-' (or a prefix, ending in '*') and
# who sets it. Names are compared with '_' read as '-' (``is_spoofable_identity``).
# Forwarded (RFC 7239) is not here: like X-Forwarded-For/-Proto/-Host it is appended to, so its
# last element is always the sidecar's own view of the hop (``upstream_headers``).
SPOOFABLE_IDENTITY: tuple[tuple[str, str], ...] = (
    ("x-forwarded-user", "oauth2-proxy (--pass-user-headers)"),
    ("x-forwarded-email", "oauth2-proxy (--pass-user-headers)"),
    ("x-forwarded-preferred-username", "oauth2-proxy (--pass-user-headers)"),
    ("x-forwarded-groups", "oauth2-proxy (--pass-user-headers)"),
    ("x-forwarded-access-token", "oauth2-proxy (--pass-access-token)"),
    ("x-auth-request-*", "oauth2-proxy (--set-xauthrequest), nginx auth_request setups"),
    ("x-forwarded-client-cert", "Envoy, Istio (XFCC: the client certificate)"),
    ("x-remote-*", "Kubernetes front-proxy authentication (X-Remote-User/-Group/-Extra-*)"),
    ("remote-*", "Authelia, Authentik (Remote-User, Remote-Groups, Remote-Email, Remote-Name)"),
    ("x-user", "API gateways (forward-auth conventions)"),
    ("x-user-id", "API gateways (forward-auth conventions)"),
    ("x-auth-user", "forward-auth setups (Traefik, nginx auth_request)"),
    ("x-consumer-*", "Kong (X-Consumer-ID, -Username, -Custom-ID, -Groups)"),
    ("x-authenticated-userid", "Kong (OAuth 2.0 plugin)"),
    ("x-authenticated-scope", "Kong (OAuth 2.0 plugin)"),
    ("x-authenticated-groups", "Kong (LDAP and ACL plugins)"),
    ("x-credential-identifier", "Kong (authentication plugins)"),
    ("x-credential-username", "Kong (authentication plugins, before 3.0)"),
    ("x-anonymous-consumer", "Kong (anonymous consumer)"),
    ("x-userinfo", "kong-oidc, Apache APISIX openid-connect"),
    ("x-id-token", "kong-oidc, Apache APISIX openid-connect"),
    ("x-access-token", "kong-oidc, Apache APISIX openid-connect"),
    ("x-jwt-assertion", "WSO2 API Manager"),
    ("x-endpoint-api-userinfo", "Google Cloud Endpoints (ESP)"),
    ("x-goog-authenticated-user-email", "Google Cloud IAP"),
    ("x-goog-authenticated-user-id", "Google Cloud IAP"),
    ("x-goog-iap-jwt-assertion", "Google Cloud IAP"),
    ("x-webauth-user", "Grafana auth proxy"),
    ("cf-access-jwt-assertion", "Cloudflare Access"),
    ("cf-access-authenticated-user-email", "Cloudflare Access"),
    ("x-ms-client-principal*", "Azure App Service authentication (Easy Auth)"),
    ("x-ms-token-*", "Azure App Service token store (X-MS-TOKEN-AAD-*)"),
    ("x-arr-clientcert", "Azure App Service (client certificate)"),
    ("x-amzn-oidc-*", "AWS ALB OIDC authentication"),
    ("x-amzn-mtls-clientcert*", "AWS ALB mutual TLS (client certificate)"),
    ("x-pomerium-*", "Pomerium"),
    ("client-cert", "RFC 9440 (client certificate)"),
    ("client-cert-chain", "RFC 9440 (client certificate chain)"),
    ("x-client-cert*", "load balancers and TLS terminators (client certificate)"),
    ("x-ssl-cert", "nginx, HAProxy setups (client certificate)"),
    ("x-ssl-client-*", "nginx, HAProxy setups (client certificate)"),
    ("ssl-client-*", "Apache mod_ssl variables as headers (client certificate)"),
    ("oidc-*", "mod_auth_openidc (OIDC_CLAIM_*, OIDC_access_token, OIDC_id_token)"),
    ("tailscale-user-*", "Tailscale Serve (Tailscale-User-Login, -Name, -Profile-Pic)"),
    ("x-vouch-*", "Vouch Proxy (X-Vouch-User, X-Vouch-Idp-Claims-*)"),
    ("x-original-url", "IIS URL Rewrite: a path override some frameworks route by"),
    ("x-rewrite-url", "IIS URL Rewrite: a path override some frameworks route by"),
)
_SPOOFABLE_NAMES = frozenset(e for e, _ in SPOOFABLE_IDENTITY if not e.endswith("*"))
_SPOOFABLE_PREFIXES = tuple(e[:-1] for e, _ in SPOOFABLE_IDENTITY if e.endswith("*"))
# Content-Length: the upstream client frames the body itself (it counts what it sends).
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "expect", "host", "content-length"}
# Headers this hop appends to (their existing values joined, this hop's last).
_APPENDED = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "forwarded"}
)
_APPENDED_WITHOUT_HOST = _APPENDED - {"x-forwarded-host"}  # without an original host: kept as is
_APPENDED_NAMES = {
    "x-forwarded-for": "X-Forwarded-For",
    "x-forwarded-proto": "X-Forwarded-Proto",
    "x-forwarded-host": "X-Forwarded-Host",
    "via": "Via",
    "forwarded": "Forwarded",
}
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 §5.6.2 token
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # _BEARER's token; case-sensitive is 4x faster


def connection_tokens(headers: Headers) -> set[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1): hop-by-hop too."""
    values = headers.getall("Connection", [])
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def is_spoofable_identity(name: str) -> bool:
    """A name or prefix of ``SPOOFABLE_IDENTITY``; ``_`` counts as ``-``: CGI and nginx
    (``underscores_in_headers``) read them as one."""
    folded = name.lower().replace("_", "-")
    return folded in _SPOOFABLE_NAMES or folded.startswith(_SPOOFABLE_PREFIXES)


def end_to_end(headers: Headers, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """The headers a proxy passes on: hop-by-hop and ``drop`` removed, repeats kept."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | set(drop)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


class Hop(NamedTuple):
    """The facts about the incoming connection that the upstream is told."""

    remote: str | None  # the peer address
    scheme: str  # http or https
    version: str  # "1.1"
    original_host: str | None


def upstream_headers(
    headers: Headers, hop: Hop, *, unsafe: Iterable[str] | None = None
) -> CIMultiDict[str]:
    """Request headers for the upstream, without Authorization (set last by the caller) and
    without ``unsafe`` (``removed_for_safety``; by default the spoofable identity headers)."""
    return CIMultiDict(upstream_fields(headers, hop, unsafe=unsafe))


def upstream_fields(
    headers: Headers,
    hop: Hop,
    *,
    unsafe: Iterable[str] | None = None,
    token: str | None = None,
) -> list[tuple[str, str]]:
    """``upstream_headers`` as a list in one pass over the incoming headers, with
    ``Authorization: Bearer <token>`` last when a token is given: what the upstream client
    writes. Dropped: hop-by-hop, every name ``Connection`` lists, ``NOT_FORWARDED`` and
    ``unsafe``. ``X-Forwarded-For``/``-Proto``/``-Host``, ``Via`` and ``Forwarded`` keep the
    app's values, joined, with this hop's appended (RFC 7239 §4, RFC 9110 §7.6.3)."""
    if unsafe is None:
        unsafe = removed_for_safety(headers, None)
    dropped: frozenset[str] | set[str] = NOT_FORWARDED.union(unsafe) if unsafe else NOT_FORWARDED
    if "Connection" in headers:
        dropped = dropped | connection_tokens(headers)
    own = (
        ("x-forwarded-for", hop.remote or "unknown"),
        ("x-forwarded-proto", hop.scheme),
        ("x-forwarded-host", hop.original_host),
        ("via", f"{hop.version} zonegate"),
        ("forwarded", forwarded_element(hop)),
    )
    appended = _APPENDED if hop.original_host else _APPENDED_WITHOUT_HOST
    out: list[tuple[str, str]] = []
    seen: dict[str, list[str]] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in dropped:
            continue
        if lower in appended:
            seen.setdefault(lower, []).append(value)
            continue
        out.append((name, value))
    for lower, mine in own:
        if mine:
            values = seen.get(lower)
            joined = f"{', '.join(values)}, {mine}" if values else mine
            out.append((_APPENDED_NAMES[lower], joined))
    if token is not None:
        out.append(("Authorization", f"Bearer {token}"))
    return out


def answer_fields(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """An upstream answer's headers as the app gets them: hop-by-hop and every name its
    ``Connection`` lists removed, repeats and order kept, values as bytes passed through
    (decoded as aiohttp's own client decodes them: UTF-8, other bytes escaped)."""
    out: list[tuple[str, str]] = []
    listed: set[str] | None = None
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                listed = listed or set()
                listed.update(
                    t.strip().lower() for t in raw_value.decode("latin-1").split(",") if t.strip()
                )
            continue
        out.append((name, raw_value.decode("utf-8", "surrogateescape")))
    if listed:
        out = [(n, v) for n, v in out if n.lower() not in listed]
    return out


def forwarded_element(hop: Hop) -> str:
    """This hop as an RFC 7239 ``Forwarded`` element: ``for``, ``proto`` and ``host``."""
    return _forwarded_element(hop.remote, hop.scheme, hop.original_host)


@functools.lru_cache(maxsize=1024)  # a sidecar sees one peer and a few hosts: built once each
def _forwarded_element(remote: str | None, scheme: str, host: str | None) -> str:
    node = remote or "unknown"
    pairs = [("for", f"[{node}]" if ":" in node else node), ("proto", scheme)]
    if host:
        pairs.append(("host", host))
    return ";".join(f"{name}={_forwarded_value(value)}" for name, value in pairs)


def _forwarded_value(value: str) -> str:
    """A token as it is, anything else as a quoted-string (RFC 7239 §4, RFC 9110 §5.6.4)."""
    if _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def websocket_protocols(headers: Headers, subject_token: str | None) -> list[str]:
    """The app's WebSocket subprotocols (RFC 6455 §4.1) to offer the upstream, in order.

    The list is read from the app's own ``Sec-WebSocket-Protocol`` (the copy filter dropped
    that header whole when it held the token); an entry holding the subject token (a token
    passed as ``access_token.<T>``, as browsers must) is left out, with a warning.
    """
    offered = [
        p.strip() for v in headers.getall("Sec-WebSocket-Protocol", []) for p in v.split(",")
    ]
    kept = [p for p in offered if p and (subject_token is None or subject_token not in p)]
    if subject_token is not None and len(kept) < len([p for p in offered if p]):
        log.warning("WebSocket subprotocol holding the subject token not offered upstream")
    return kept


class BadAuthorization(ValueError):
    """``Authorization`` is present but is not exactly one RFC 6750 §2.1 Bearer credential:
    RFC 6750 §3.1 ``invalid_request`` (HTTP 400), on every route. The message never quotes
    the header's value."""


def bearer_token(headers: Headers) -> str | None:
    """The RFC 6750 §2.1 Bearer token of ``Authorization``; None when there is no such header.

    A repeated header, another scheme (``Basic``, ``Token``), a tab instead of a space or
    anything else after the token is ``BadAuthorization``: read as "no token", such a request
    would go on where a route forwards token-less calls, with the copies of the token that the
    copy filter only finds once it knows the token.
    """
    values = headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise BadAuthorization(
            f"{len(values)} Authorization headers: send exactly one, 'Bearer <token>'"
        )
    value = values[0]
    if value.startswith("Bearer ") and _TOKEN68.fullmatch(value, 7):  # the usual spelling
        return value[7:]
    m = _BEARER.match(value)
    if m is None:
        raise BadAuthorization(
            "Authorization must be 'Bearer <token>' (RFC 6750 §2.1: spaces, then a token68); "
            "the sidecar reads no other scheme and never forwards Authorization"
        )
    return m.group(1)


def with_authorization(headers: CIMultiDict[str], token: str | None) -> CIMultiDict[str]:
    """A copy of ``headers`` with the zone token set last (or no Authorization at all)."""
    out = headers.copy()
    if token is not None:
        out["Authorization"] = f"Bearer {token}"
    return out


def removed_for_safety(headers: Headers, subject_token: str | None) -> tuple[str, ...]:
    """The incoming headers never forwarded for safety, as sorted lower-case names: spoofable
    identity headers, ``Proxy-Authorization`` (a credential for a proxy, never the upstream's)
    and every header holding a copy of the subject token (a warning names each such header,
    never its value); never ``Authorization`` (it is replaced)."""
    names: set[str] = set()
    for name, value in headers.items():
        lower = name.lower()
        if lower == "authorization":
            continue
        if subject_token is not None and subject_token in value:
            if lower not in names:
                log.warning(
                    "request header holding the subject token dropped", extra={"header": name}
                )
            names.add(lower)
        elif lower == "proxy-authorization" or is_spoofable_identity(lower):
            names.add(lower)
    return tuple(sorted(names))
