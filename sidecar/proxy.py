"""The proxy: route, exchange, rewrite headers, stream both ways. HTTP errors made in one place.

Each request goes: CONNECT refused -> route matched (origin-form: Host header + path; absolute-form,
i.e. the app uses us as ``HTTP_PROXY``: the target's authority + path) -> the subject token taken
from ``Authorization`` and exchanged (through the cache) -> headers rewritten -> the body streamed
to the upstream and the answer streamed back. The original token never leaves.

Headers dropped on the way up (documented in docs/sidecar.md):

* hop-by-hop (RFC 9110 §7.6.1) and every header named in ``Connection``;
* ``Authorization`` (replaced, last, by the zone token) and ``Expect`` (handled here);
* identity headers an app (or an attacker inside it) could spoof to a backend that trusts an
  auth proxy in front of it: see ``SPOOFABLE_IDENTITY`` and ``SPOOFABLE_IDENTITY_PREFIXES``,
  matched with ``_`` read as ``-``;
* any header whose value holds the subject token (``drop_copies``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from exchange.errors import (
    ExchangeError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    SlowDown,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from exchange.tokens import TokenExchangeRequest, TokenResponse
from exchange.validate import unverified_claims
from sidecar.cache import CacheKey, Issued, TokenCache
from sidecar.config import Route, SidecarConfig
from sidecar.exchanger import Exchanger
from sidecar.metrics import NO_ROUTE, SidecarMetrics
from sidecar.routes import BadPath, Match, RouteTable

log = logging.getLogger("zonegate.sidecar")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHUNK = 64 * 1024
DEFAULT_RETRY_AFTER = 2
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
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONFIG_REFUSALS = (InvalidTarget, InvalidScope, UnauthorizedClient)
_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)
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


def _quotable(text: str) -> str:
    return _QUOTED_SAFE.sub("", text)[:200]


def connect_refused() -> ProxyError:
    return ProxyError(
        405,
        "method_not_allowed",
        "CONNECT opens an end-to-end tunnel the sidecar cannot see into, so it cannot put an "
        "exchanged token into it. Send plain http:// requests (the sidecar originates TLS to "
        "https upstreams) or call it in reverse mode.",
        {"Allow": ", ".join(sorted(IDEMPOTENT | {"POST", "PATCH"}))},
    )


# -- headers -------------------------------------------------------------------------------------


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1): hop-by-hop too."""
    values = headers.getall("Connection", [])
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def is_spoofable_identity(name: str) -> bool:
    """``_`` counts as ``-``: CGI and nginx (``underscores_in_headers``) read them as one."""
    folded = name.lower().replace("_", "-")
    return folded in SPOOFABLE_IDENTITY or folded.startswith(SPOOFABLE_IDENTITY_PREFIXES)


def end_to_end(headers: CIMultiDictProxy[str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """The headers a proxy passes on: hop-by-hop and ``drop`` removed, repeats kept."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | set(drop)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def upstream_headers(request: web.Request, original_host: str | None) -> CIMultiDict[str]:
    """Request headers for the upstream, without Authorization (set last by the caller)."""
    headers = end_to_end(request.headers, NOT_FORWARDED)
    for name in [k for k in headers if is_spoofable_identity(k)]:
        headers.popall(name, None)
    _append(headers, "X-Forwarded-For", request.remote or "unknown")
    _append(headers, "X-Forwarded-Proto", request.scheme)
    if original_host:
        _append(headers, "X-Forwarded-Host", original_host)
    _append(headers, "Via", f"{request.version.major}.{request.version.minor} zonegate")
    return headers


def drop_copies(headers: CIMultiDict[str], subject_token: str | None) -> None:
    """Drop every header holding the subject token: the original token is never forwarded,
    not even where the app copied it (a warning names the header, never its value)."""
    if subject_token is None:
        return
    for name in {k.lower(): k for k, v in headers.items() if subject_token in v}.values():
        headers.popall(name, None)
        log.warning("request header holding the subject token dropped", extra={"header": name})


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    existing = ", ".join(headers.popall(name, []))
    headers[name] = f"{existing}, {value}" if existing else value


def bearer_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The RFC 6750 §2.1 Bearer token of ``Authorization``, if it holds one."""
    values = headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    m = _BEARER.match(values[0])
    return m.group(1) if m else None


def subject_expiry(token: str) -> float | None:
    """The subject's ``exp``, unverified: it can only shorten how long an entry is served."""
    exp = unverified_claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


# -- the proxy -----------------------------------------------------------------------------------


@dataclass
class Call:
    """What one request became: for metrics, the log line and the 401 retry."""

    route: str = NO_ROUTE
    subject: str | None = None
    key: CacheKey | None = None
    status: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class Upstream:
    """The upstream session and its TLS settings, created in the app's lifecycle."""

    session: aiohttp.ClientSession | None = None
    ssl: Any = True


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(
        self,
        config: SidecarConfig,
        cache: TokenCache,
        exchangers: Mapping[str, Exchanger],
        metrics: SidecarMetrics,
    ) -> None:
        self.config = config
        self.table = RouteTable(config.routes)
        self.cache = cache
        self.exchangers = {  # by route name: an identity hashes every setting, once here
            route.name: exchangers[config.exchange_for(route).identity] for route in config.routes
        }
        self.metrics = metrics
        self.upstream = Upstream()
        self._zones: dict[str, str] = {}  # route name -> zone last issued, for failure labels

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.upstream.session is not None, "the proxy app is not started"
        return self.upstream.session

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request, whatever its target form (the router has no say)."""
        call = Call()
        try:
            response = await self._handle(request, call)
        except ProxyError as e:
            response = e.response()
        call.status = response.status
        self._record(request, call)
        return response

    def _record(self, request: web.Request, call: Call) -> None:
        seconds = time.monotonic() - call.started
        self.metrics.observe_request(call.route, call.status, seconds)
        entry = {
            "method": request.method,
            "route": call.route,
            "status": call.status,
            "duration_ms": round(seconds * 1000, 1),
            "subject": call.subject,  # a short SHA-256 handle, never the token
        }
        log.info("request", extra=entry)

    async def _handle(self, request: web.Request, call: Call) -> web.StreamResponse:
        if request.method == "CONNECT":
            raise connect_refused()
        match, original_host = self._match(request)
        call.route = match.route.name
        subject_token = bearer_token(request.headers)
        token = await self._token_for(subject_token, match.route, call)
        headers = upstream_headers(request, original_host)
        drop_copies(headers, subject_token)
        if _is_websocket(request):
            return await self._websocket(request, match, headers, token)
        response = await self._send(request, match.url, headers, token)
        if response.status == 401 and call.key is not None and _replayable(request):
            response.release()
            self.cache.evict(call.key)
            token = await self._token_for(subject_token, match.route, call)
            response = await self._send(request, match.url, headers, token)
        return await stream_back(request, response)

    def _match(self, request: web.Request) -> tuple[Match, str | None]:
        raw_target = request.raw_path
        absolute = not raw_target.startswith("/")
        authority: str | None = request.headers.get("Host")
        if absolute:  # absolute-form (RFC 9112 §3.2.2): the app uses us as HTTP_PROXY
            target = URL(raw_target, encoded=True)
            if target.scheme not in ("http", "https") or not target.raw_host:
                raise ProxyError(
                    400, "invalid_request", "request target must be a path or an http URL"
                )
            host = target.raw_host.lower()
            authority = f"{host}:{target.explicit_port}" if target.explicit_port else host
            raw_target = target.raw_path_qs
        try:
            match = self.table.match(authority, raw_target, absolute_form=absolute)
        except BadPath as e:
            raise ProxyError(400, "invalid_request", str(e)) from e
        if match is None and absolute:
            raise ProxyError(403, "access_denied", f"no route for {authority}: not an open proxy")
        if match is None:
            raise ProxyError(404, "not_found", "no route matches this host and path")
        return match, authority

    async def _token_for(self, subject_token: str | None, route: Route, call: Call) -> str | None:
        """The zone token for this call, or None when the route forwards token-less calls."""
        if subject_token is None:
            if route.missing_token == "forward":
                return None
            raise ProxyError(
                401,
                "invalid_request",
                "this route needs Authorization: Bearer <token>",
                {"WWW-Authenticate": 'Bearer realm="zonegate"'},
            )
        exchanger = self.exchangers[route.name]
        call.key = CacheKey.of(subject_token, route.target, exchanger.identity)
        call.subject = call.key.subject_sha256[:12]  # = subject_hash(token), without a 2nd SHA-256
        try:
            return await self.cache.get(
                call.key, lambda: self._exchange(exchanger, route, subject_token)
            )
        except ExchangeError as e:
            raise exchange_refusal(e) from e

    async def _exchange(self, exchanger: Exchanger, route: Route, subject_token: str) -> Issued:
        """One exchange for a cache miss, measured; its zone labels the route's later failures."""
        started = time.monotonic()
        try:
            exchanged = await _ask(exchanger, route, subject_token)
        except ExchangeError as e:
            self._observe(route, None, e.error, exchanger.mode, started)
            raise
        self._observe(route, exchanged.zone, "ok", exchanger.mode, started)
        return Issued(exchanged.access_token, exchanged.expires_at, subject_expiry(subject_token))

    def _observe(
        self, route: Route, zone: str | None, outcome: str, mode: str, started: float
    ) -> None:
        if zone is not None:
            self._zones[route.name] = zone
        zone = self._zones.get(route.name)
        self.metrics.observe_exchange(zone, outcome, mode, time.monotonic() - started)

    async def _send(
        self, request: web.Request, url: URL, headers: CIMultiDict[str], token: str | None
    ) -> aiohttp.ClientResponse:
        """Send the request upstream; the sidecar itself never resends it.

        aiohttp's client resends an idempotent request once, on a fresh connection, when the
        connection drops before any answer and no body byte was taken from the app (RFC 9112
        §9.3.1): that covers a stale pooled connection, and aiohttp offers no switch to turn it
        off. A second retry here would deliver such a request up to four times.
        """
        try:
            return await self.session.request(
                request.method,
                url,
                headers=_with_authorization(headers, token),
                data=request.content.iter_chunked(CHUNK) if request.body_exists else None,
                allow_redirects=False,
                ssl=self.upstream.ssl,
            )
        except aiohttp.ServerDisconnectedError as e:
            raise ProxyError(502, "bad_gateway", "upstream closed the connection") from e
        except aiohttp.ClientConnectorError as e:
            raise ProxyError(502, "bad_gateway", f"upstream unreachable: {e.os_error}") from e
        except TimeoutError as e:
            raise ProxyError(504, "gateway_timeout", "upstream did not answer in time") from e
        except aiohttp.ClientError as e:
            raise ProxyError(502, "bad_gateway", f"upstream failed: {type(e).__name__}") from e

    async def _websocket(
        self, request: web.Request, match: Match, headers: CIMultiDict[str], token: str | None
    ) -> web.StreamResponse:
        """Exchange at the handshake, then relay messages both ways."""
        for name in WEBSOCKET_HANDSHAKE:
            headers.popall(name, None)
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
        ]
        try:
            upstream = await self.session.ws_connect(
                match.url,
                headers=_with_authorization(headers, token),
                protocols=[p for p in protocols if p],
                ssl=self.upstream.ssl,
            )
        except aiohttp.WSServerHandshakeError as e:
            raise ProxyError(
                e.status if e.status >= 400 else 502, "bad_gateway", "upstream refused the upgrade"
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProxyError(502, "bad_gateway", f"upstream unreachable: {type(e).__name__}") from e
        downstream = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else ()
        )
        await downstream.prepare(request)
        async with upstream:
            await _relay(downstream, upstream)
        return downstream


class _HeadersWithBody(web.StreamResponse):
    """Headers held back until the first body write (or the end), so that a small answer
    leaves in one ``send`` instead of two: what aiohttp's own ``web.Response`` does."""

    _send_headers_immediately = False


async def stream_back(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream the upstream's answer to the app, headers filtered, bytes untouched.

    An answer whose ``Content-Length`` fits in one chunk goes out headers and body together;
    any other streams as it comes, headers first. The bare aiohttp proxy of the benchmark
    (``bench/bareproxy.py``) answers through this same function.
    """
    async with upstream:
        small = upstream.content_length is not None and upstream.content_length <= CHUNK
        response = (_HeadersWithBody if small else web.StreamResponse)(
            status=upstream.status,
            reason=upstream.reason,
            headers=end_to_end(upstream.headers),
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            # Headers may be gone already: the only honest signal left is a cut connection.
            log.warning("upstream failed mid-response: %s", type(e).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


async def _ask(exchanger: Exchanger, route: Route, subject_token: str) -> TokenResponse:
    """The RFC 8693 request for a route's target; every failure is an ExchangeError."""
    try:
        request = TokenExchangeRequest(
            subject_token=subject_token,
            audience=route.target.audience,
            resource=route.target.resource,
            scope=route.target.scope,
            requested_token_type=route.target.requested_token_type,
        )
        return await exchanger.exchange(request)
    except ExchangeError:
        raise
    except Exception as e:  # a bug must not become a 500 with a traceback for the app
        log.exception("exchange failed unexpectedly", extra={"route": route.name})
        raise ExchangeError(f"exchange failed: {type(e).__name__}") from e


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay(
    downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Pump messages both ways until one side closes, then close the other with its code."""
    tasks = {
        asyncio.ensure_future(_pump(downstream, upstream)),
        asyncio.ensure_future(_pump(upstream, downstream)),
    }
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await upstream.close()
    await downstream.close()


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    async for message in source:
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
    await sink.close(code=source.close_code or 1000)


def _with_authorization(headers: CIMultiDict[str], token: str | None) -> CIMultiDict[str]:
    """A copy of ``headers`` with the zone token set last (or no Authorization at all)."""
    out = headers.copy()
    if token is not None:
        out["Authorization"] = f"Bearer {token}"
    return out


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def _replayable(request: web.Request) -> bool:
    """Idempotent and without a body: safe to send twice (RFC 9110 §9.2.2)."""
    return request.method in IDEMPOTENT and not request.body_exists
