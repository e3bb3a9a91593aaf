"""Header rules of the proxy, pure: a header mapping and plain facts in, headers out.

Headers dropped on the way up (documented in docs/sidecar.md):

* hop-by-hop (RFC 9110 §7.6.1) and every header named in ``Connection``;
* ``Authorization`` (replaced, last, by the zone token) and ``Expect`` (handled by the server);
* identity headers an app (or an attacker inside it) could spoof to a backend that trusts an
  auth proxy in front of it: see ``SPOOFABLE_IDENTITY`` and ``SPOOFABLE_IDENTITY_PREFIXES``,
  matched with ``_`` read as ``-``;
* any header whose value holds the subject token (``drop_copies``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

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
SPOOFABLE_IDENTITY = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-preferred-username",
        "x-forwarded-groups",
        "x-forwarded-access-token",
        "x-forwarded-client-cert",
        "x-remote-user",
        "x-remote-group",
        "x-remote-groups",
        "remote-user",
        "x-user",
        "x-user-id",
        "x-userinfo",
        "x-id-token",
        "x-access-token",
        "x-jwt-assertion",
        "x-endpoint-api-userinfo",
        "x-goog-authenticated-user-email",
        "x-goog-authenticated-user-id",
        "x-goog-iap-jwt-assertion",
        "x-webauth-user",
        "x-authenticated-userid",
        "cf-access-jwt-assertion",
        "cf-access-authenticated-user-email",
    }
)
SPOOFABLE_IDENTITY_PREFIXES = (
    "x-auth-request-",
    "x-remote-",
    "x-ms-client-principal",
    "x-amzn-oidc-",
    "x-consumer-",
    "x-pomerium-",
    "x-ssl-client-",
    "ssl-client-",
)
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "expect", "host"}
WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)


def connection_tokens(headers: Headers) -> set[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1): hop-by-hop too."""
    values = headers.getall("Connection", [])
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def is_spoofable_identity(name: str) -> bool:
    """``_`` counts as ``-``: CGI and nginx (``underscores_in_headers``) read them as one."""
    folded = name.lower().replace("_", "-")
    return folded in SPOOFABLE_IDENTITY or folded.startswith(SPOOFABLE_IDENTITY_PREFIXES)


def end_to_end(headers: Headers, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """The headers a proxy passes on: hop-by-hop and ``drop`` removed, repeats kept."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | set(drop)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


@dataclass(frozen=True, slots=True)
class Hop:
    """The facts about the incoming connection that the upstream is told."""

    remote: str | None  # the peer address
    scheme: str  # http or https
    version: str  # "1.1"
    original_host: str | None


def upstream_headers(headers: Headers, hop: Hop) -> CIMultiDict[str]:
    """Request headers for the upstream, without Authorization (set last by the caller)."""
    out = end_to_end(headers, NOT_FORWARDED)
    for name in [k for k in out if is_spoofable_identity(k)]:
        out.popall(name, None)
    _append(out, "X-Forwarded-For", hop.remote or "unknown")
    _append(out, "X-Forwarded-Proto", hop.scheme)
    if hop.original_host:
        _append(out, "X-Forwarded-Host", hop.original_host)
    _append(out, "Via", f"{hop.version} zonegate")
    return out


def drop_copies(headers: CIMultiDict[str], subject_token: str | None) -> None:
    """Drop every header holding the subject token: the original token is never forwarded,
    not even where the app copied it (a warning names the header, never its value)."""
    if subject_token is None:
        return
    for name in {k.lower(): k for k, v in headers.items() if subject_token in v}.values():
        headers.popall(name, None)
        log.warning("request header holding the subject token dropped", extra={"header": name})


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


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    existing = ", ".join(headers.popall(name, []))
    headers[name] = f"{existing}, {value}" if existing else value


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
    m = _BEARER.match(values[0])
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
