"""The answers the proxy gives itself: every failure becomes a ProxyError here, once.

``exchange_refusal`` maps exchange failures (docs/sidecar.md "Errors"); ``upstream_failure``
maps what can go wrong talking to an upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from exchange.errors import (
    ExchangeError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    SlowDown,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from sidecar.upstream import (
    UnsafeRequest,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

DEFAULT_RETRY_AFTER = 2
CONFIG_REFUSALS = (InvalidTarget, InvalidScope, UnauthorizedClient)
ALLOWED_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
_QUOTED_SAFE = re.compile(r"[^\x20-\x7e]|[\"\\]")


class ProxyError(Exception):
    """A request the proxy answers itself, with a JSON ``{error, error_description}`` body."""

    def __init__(
        self, status: int, error: str, description: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(
            body, status=self.status, headers={**self.headers, "Cache-Control": "no-store"}
        )


def exchange_refusal(e: ExchangeError) -> ProxyError:
    """docs/sidecar.md "Errors": the one mapping of exchange failures to HTTP."""
    if isinstance(e, InvalidRequest):
        challenge = f'Bearer error="invalid_token", error_description="{_quotable(e.description)}"'
        return ProxyError(401, "invalid_token", e.description, {"WWW-Authenticate": challenge})
    if isinstance(e, CONFIG_REFUSALS):
        return ProxyError(403, e.error, e.description)
    if isinstance(e, TemporarilyUnavailable | SlowDown):
        retry_after = str(e.retry_after or DEFAULT_RETRY_AFTER)
        return ProxyError(503, e.error, e.description, {"Retry-After": retry_after})
    return ProxyError(502, e.error, f"the token exchange gave no usable answer: {e.description}")


def bearer_request_refused(description: str) -> ProxyError:
    """A request that sends its token wrongly (RFC 6750 §3.1 ``invalid_request``): 400."""
    challenge = f'Bearer error="invalid_request", error_description="{_quotable(description)}"'
    return ProxyError(400, "invalid_request", description, {"WWW-Authenticate": challenge})


def _quotable(text: str) -> str:
    return _QUOTED_SAFE.sub("", text)[:200]


def connect_refused() -> ProxyError:
    return ProxyError(
        405,
        "method_not_allowed",
        "CONNECT opens an end-to-end tunnel the sidecar cannot see into, so it cannot put an "
        "exchanged token into it. Send plain http:// requests (the sidecar originates TLS to "
        "https upstreams) or call it in reverse mode.",
        {"Allow": ", ".join(ALLOWED_METHODS)},
    )


def upstream_failure(e: Exception) -> ProxyError:
    """What the app hears when the upstream could not be reached or failed: the lean client's
    errors (``sidecar.upstream``, every request) and aiohttp's (WebSocket upgrades)."""
    if isinstance(e, UpstreamTimeout):  # a connect timeout included: 504, as with aiohttp
        return ProxyError(504, "gateway_timeout", "upstream did not answer in time")
    if isinstance(e, UpstreamConnectError):
        return ProxyError(502, "bad_gateway", f"upstream unreachable: {_cause(e)}")
    if isinstance(e, UpstreamClosed):
        return ProxyError(502, "bad_gateway", "upstream closed the connection")
    if isinstance(e, UpstreamProtocolError):
        return ProxyError(502, "bad_gateway", "upstream sent an answer that is not valid HTTP/1.1")
    if isinstance(e, UnsafeRequest):
        return ProxyError(400, "invalid_request", f"request not forwarded: {e}")
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return ProxyError(502, "bad_gateway", "upstream closed the connection")
    if isinstance(e, aiohttp.ClientConnectorError):
        return ProxyError(502, "bad_gateway", f"upstream unreachable: {e.os_error}")
    if isinstance(e, TimeoutError):
        return ProxyError(504, "gateway_timeout", "upstream did not answer in time")
    return ProxyError(502, "bad_gateway", f"upstream failed: {type(e).__name__}")


def _cause(e: UpstreamConnectError) -> str:
    """The OS's reason a connection failed (no address or path of ours in it)."""
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__ if cause is not None else "no connection"


def no_route(authority: str | None, *, absolute: bool, forwarding: bool) -> ProxyError:
    """No route matches: the proxy in reverse mode says 404; used as ``HTTP_PROXY`` it is not
    an open proxy (403); the authz listener never lets an unknown call through (403)."""
    if absolute:
        return ProxyError(403, "access_denied", f"no route for {authority}: not an open proxy")
    if forwarding:
        return ProxyError(404, "not_found", "no route matches this host and path")
    return ProxyError(403, "access_denied", "no route matches this host and path")


def authz_only_route(route: str) -> ProxyError:
    """A call to the proxy listener that matches a route without ``upstream``."""
    return ProxyError(
        403,
        "access_denied",
        f"route {route!r} has no upstream: its calls go through Envoy or nginx, which ask the "
        "authz listener for the token; the proxy listener does not forward them (give the "
        "route an upstream to proxy it)",
    )
