"""The proxy: route, exchange, rewrite headers, stream both ways.

Each request goes: CONNECT refused -> route matched (origin-form: Host header + path; absolute-form,
i.e. the app uses us as ``HTTP_PROXY``: the target's authority + path) -> the subject token taken
from ``Authorization`` and exchanged (through the cache) -> headers rewritten (``headers``) ->
the body streamed to the upstream and the answer streamed back. The original token never leaves.
Every answer the proxy gives itself comes from ``refusals``; WebSockets relay in ``websocket``.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import aiohttp
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from exchange.errors import ExchangeError, InvalidClient, SlowDown, TemporarilyUnavailable
from exchange.tokens import TokenExchangeRequest, TokenResponse
from exchange.validate import unverified_claims
from runtime.logsetup import AccessLine, Throttle
from sidecar.cache import CacheKey, Fetch, Issued, TokenCache
from sidecar.config import Route, SidecarConfig
from sidecar.exchanger import Exchanger
from sidecar.headers import (
    WEBSOCKET_HANDSHAKE,
    BadAuthorization,
    Headers,
    Hop,
    answer_fields,
    bearer_token,
    removed_for_safety,
    upstream_fields,
    upstream_headers,
    websocket_protocols,
    with_authorization,
)
from sidecar.metrics import NO_ROUTE, SidecarMetrics
from sidecar.refusals import (
    ProxyError,
    authz_only_route,
    bearer_request_refused,
    connect_refused,
    exchange_refusal,
    no_route,
    upstream_failure,
)
from sidecar.routes import BadPath, Match, RouteTable, TokenInTarget, refuse_token_in_target
from sidecar.upstream import Origin, UpstreamClosed, UpstreamError, UpstreamPool, UpstreamResponse
from sidecar.websocket import relay

log = logging.getLogger("zonegate.sidecar")


class _Miss(enum.Enum):
    MISS = "miss"


MISS = _Miss.MISS  # no cached zone token: an exchange is due
Known = str | None | Literal[_Miss.MISS]
CHUNK = 64 * 1024
_VERSIONS: dict[HttpVersion, str] = {
    HttpVersion10: "1.0",
    HttpVersion11: "1.1",
}  # the usual two, looked up; any other is formatted
WARN_EVERY = 30.0  # seconds between warnings about one exchange's one kind of failure
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


# -- the proxy -----------------------------------------------------------------------------------


@dataclass
class Call:
    """What one request became: for metrics, the log line and the 401 retry."""

    route: str = NO_ROUTE
    subject: str | None = None
    key: CacheKey | None = None
    status: int = 0
    started: float = field(default_factory=time.monotonic)


class Decision(NamedTuple):
    """One call decided, the same way for both listeners (``Proxy.decide``): the route, the
    subject token, the zone token to send (None: a ``missing_token: forward`` route called
    without one) and the incoming headers that must not reach the upstream (lower-case names:
    spoofable identity headers and copies of the subject token)."""

    match: Match
    subject_token: str | None
    token: str | None
    unsafe: tuple[str, ...]

    def __repr__(self) -> str:  # never the tokens
        return f"Decision(route={self.match.route.name!r}, unsafe={self.unsafe!r})"


@dataclass
class Upstream:
    """The upstream clients and their TLS settings, created in the app's lifecycle: the lean
    HTTP/1.1 pool (``sidecar.upstream``) carries every request; the aiohttp session only
    WebSocket upgrades."""

    pool: UpstreamPool | None = None
    session: aiohttp.ClientSession | None = None
    ssl: Any = True

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.close()


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
        # One table for both listeners; a route without upstream is matched by the proxy too,
        # and refused there (Envoy or nginx carries its calls, asking the authz listener).
        self.table = RouteTable(config.routes)
        self.cache = cache
        self.exchangers = {  # by route name: an identity hashes every setting, once here
            route.name: exchangers[config.exchange_for(route).identity] for route in config.routes
        }
        self.origins = {  # by route name: where its calls go and the Host they carry
            route.name: _origin(route.upstream) for route in config.routes if route.upstream
        }
        self.metrics = metrics
        self.upstream = Upstream()
        self._zones: dict[str, str] = {}  # route name -> zone last issued, for failure labels
        self._throttle = Throttle(WARN_EVERY, time.monotonic)
        self.access = AccessLine(log, "request") if config.access_log else None
        self.authz_access = (
            AccessLine(logging.getLogger("zonegate.sidecar.authz"), "authz check")
            if config.access_log
            else None
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self.upstream.session is not None, "the proxy app is not started"
        return self.upstream.session

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request to the proxy listener, whatever its target form (the router has
        no say): the answer, its metrics and its access line."""
        call = Call()
        try:
            response = await self._handle(request, call)
        except ProxyError as e:
            response = e.response()
        call.status = response.status
        self._record(request, call)
        return response

    def _record(self, request: web.BaseRequest, call: Call) -> None:
        seconds = time.monotonic() - call.started
        self.metrics.observe_request(call.route, call.status, seconds)
        if self.access is not None:
            self.access.write(
                {
                    "method": request.method,
                    "route": call.route,
                    "status": call.status,
                    "duration": round(seconds, 6),  # seconds, as every zonegate access line
                    "subject": call.subject,  # a short SHA-256 handle, never the token
                }
            )

    async def _handle(self, request: web.BaseRequest, call: Call) -> web.StreamResponse:
        if request.method == "CONNECT":
            raise connect_refused()
        authority, raw_target, absolute = _target(request)
        decision = await self.decide(
            request.headers, authority, raw_target, call, absolute=absolute, forwarding=True
        )
        hop = _hop(request, authority)
        if _is_websocket(request):
            headers = upstream_headers(request.headers, hop, unsafe=decision.unsafe)
            protocols = websocket_protocols(request.headers, decision.subject_token)
            return await self._websocket(
                request, decision.match, headers, decision.token, protocols
            )
        response = await self._send_replaying_401(request, decision, hop, call)
        return await answer(request, response)

    async def decide(
        self,
        headers: Headers,
        authority: str | None,
        raw_target: str,
        call: Call,
        *,
        absolute: bool = False,
        forwarding: bool,
    ) -> Decision:
        """The decision both listeners share: the route (escapes refused), the subject token
        (malformed or leaked ones refused), the zone token (cache, single flight, the refusals
        of ``sidecar.refusals``) and the headers to drop. ``forwarding``: the proxy listener
        asks (it refuses a route without upstream); else the authz listener (no route: 403)."""
        match = route_for(self.table, authority, raw_target, absolute=absolute)
        if match is None:
            raise no_route(authority, absolute=absolute, forwarding=forwarding)
        call.route = match.route.name
        if forwarding and match.target is None:
            raise authz_only_route(match.route.name)
        subject_token = subject_token_of(headers, raw_target)
        token = self.known_token(subject_token, match.route, call)
        if token is MISS:
            token = await self.exchanged_token(subject_token, match.route, call)
        return Decision(match, subject_token, token, removed_for_safety(headers, subject_token))

    async def _send_replaying_401(
        self, request: web.BaseRequest, decision: Decision, hop: Hop, call: Call
    ) -> UpstreamResponse:
        """Send; an upstream 401 on an exchanged token evicts it and resends once with a fresh
        exchange, when the request is safe to send twice (docs/sidecar.md "Upstream 401")."""
        match, unsafe = decision.match, decision.unsafe
        fields = upstream_fields(request.headers, hop, unsafe=unsafe, token=decision.token)
        response = await self._send(request, match, fields)
        if response.status != 401 or call.key is None or not _replayable(request):
            return response
        response.close()
        self.cache.evict(call.key)
        token = await self.token_for(decision.subject_token, decision.match.route, call)
        fields = upstream_fields(request.headers, hop, unsafe=unsafe, token=token)
        return await self._send(request, match, fields)

    async def token_for(self, subject_token: str | None, route: Route, call: Call) -> str | None:
        """The zone token for this call, or None when the route forwards token-less calls: the
        part of ``decide`` that a replay after an upstream 401 asks again."""
        token = self.known_token(subject_token, route, call)
        if token is MISS:
            return await self.exchanged_token(subject_token, route, call)
        return token

    def known_token(self, subject_token: str | None, route: Route, call: Call) -> Known:
        """``token_for`` without waiting: the cached zone token, None for a token-less call a
        route forwards, or MISS (an exchange is due). A refusal raises ``ProxyError``."""
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
        call.key = key = CacheKey.of(subject_token, route.target, exchanger.identity)
        call.subject = key.subject_sha256[:12]  # = subject_hash(token), without a 2nd SHA-256
        try:
            token = self.cache.cached(key, self._fetch(route, subject_token))
        except ExchangeError as e:
            raise exchange_refusal(e) from e
        return MISS if token is None else token

    async def exchanged_token(self, subject_token: str | None, route: Route, call: Call) -> str:
        """The zone token after a ``known_token`` MISS: one exchange shared by concurrent
        misses (``TokenCache.get``)."""
        assert subject_token is not None and call.key is not None, "known_token comes first"
        try:
            return await self.cache.get(call.key, self._fetch(route, subject_token))
        except ExchangeError as e:
            raise exchange_refusal(e) from e

    def _fetch(self, route: Route, subject_token: str) -> Fetch:
        """The exchange a miss (or a refresh-ahead) of this route and subject makes."""
        return functools.partial(self._exchange, self.exchangers[route.name], route, subject_token)

    async def _exchange(self, exchanger: Exchanger, route: Route, subject_token: str) -> Issued:
        """One exchange for a cache miss, measured; its zone labels the route's later failures."""
        started = time.monotonic()
        try:
            answer = await _ask(exchanger, route, subject_token)
        except ExchangeError as e:
            self._observe(route, None, e.error, exchanger.mode, started)
            self._warn_operator(exchanger, e)
            raise
        self._observe(route, answer.zone, "ok", exchanger.mode, started)
        return Issued(answer.access_token, answer.expires_at, subject_expiry(subject_token))

    def _warn_operator(self, exchanger: Exchanger, e: ExchangeError) -> None:
        """A failure that is the operator's to fix, not the user's, is a warning: at most one
        per exchange and kind every WARN_EVERY seconds, saying how many were held back."""
        problem = operator_problem(e)
        if problem is None:
            return
        held = self._throttle.allow(f"{exchanger.identity}:{e.error}")
        if held is not None:
            log.warning(
                "%s: %s",
                problem,
                e.description,
                extra={"exchange": exchanger.identity, "error": e.error, "suppressed": held},
            )

    def _observe(
        self, route: Route, zone: str | None, outcome: str, mode: str, started: float
    ) -> None:
        if zone is not None:
            self._zones[route.name] = zone
        zone = self._zones.get(route.name)
        self.metrics.observe_exchange(zone, outcome, mode, time.monotonic() - started)

    async def _send(
        self, request: web.BaseRequest, match: Match, fields: list[tuple[str, str]]
    ) -> UpstreamResponse:
        """Send the request upstream through the lean client (``sidecar.upstream``).

        A pooled connection the upstream closed before any byte of the answer
        (``UpstreamClosed(reused=True)``) is the one case resent, once, on a new connection,
        and only an idempotent request whose body was not streamed (RFC 9112 §9.3.1): the
        upstream may have closed an idle connection as the request was written. Never more.
        """
        pool = self.upstream.pool
        assert pool is not None, "the proxy app is not started"
        origin, host = self.origins[match.route.name]
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        method, target, length = request.method, match.target or "/", request.content_length
        try:
            try:
                return await pool.request(
                    origin, method, target, fields, body, content_length=length, host=host
                )
            except UpstreamClosed as e:
                if not (e.reused and body is None and method in IDEMPOTENT):
                    raise
            return await pool.request(
                origin, method, target, fields, None, content_length=length, host=host, fresh=True
            )
        except (UpstreamError, ValueError) as e:  # ValueError: UnsafeRequest
            raise upstream_failure(e) from e

    async def _websocket(
        self,
        request: web.BaseRequest,
        match: Match,
        headers: CIMultiDict[str],
        token: str | None,
        protocols: list[str],
    ) -> web.StreamResponse:
        """Exchange at the handshake, then relay messages both ways."""
        for name in WEBSOCKET_HANDSHAKE:
            headers.popall(name, None)
        try:
            upstream = await self.session.ws_connect(
                url_of(match),
                headers=with_authorization(headers, token),
                protocols=protocols,
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
            await relay(downstream, upstream)
        return downstream


async def answer(request: web.BaseRequest, upstream: UpstreamResponse) -> web.StreamResponse:
    """The upstream's answer to the app, headers filtered, bytes untouched.

    An answer with a body of at most ``CHUNK`` bytes by its ``Content-Length`` is read whole
    and returned as a ``web.Response``: headers and body leave in one ``send``, and an
    upstream that fails before its last byte is still a clean 502. Any other answer (HEAD,
    204, 304, chunked, large) streams as it comes, headers first, the upstream paused while
    the app reads slowly.
    """
    try:
        headers = answer_fields(upstream.headers)
        length = upstream.content_length
        if (
            length is not None
            and length <= CHUNK
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
        ):
            try:
                body = await upstream.read()
            except UpstreamError as e:
                raise upstream_failure(e) from e
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        await response.prepare(request)
        try:
            async for chunk in upstream:
                await response.write(chunk)
        except UpstreamError as e:
            # Headers are gone already: the only honest signal left is a cut connection.
            log.warning("upstream failed mid-response: %s", type(e).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
    finally:
        upstream.release()


def _origin(upstream: URL) -> tuple[Origin, str]:
    """The pool's key for an upstream URL and the Host header it is sent with."""
    scheme = upstream.scheme
    origin = Origin(
        scheme, upstream.raw_host or "", upstream.port or (443 if scheme == "https" else 80)
    )
    return origin, origin.authority


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


def operator_problem(e: ExchangeError) -> str | None:
    """What an operator should hear about an exchange failure (None: the user's own fault)."""
    if isinstance(e, InvalidClient):
        return "the exchange refuses this sidecar's client credentials"
    if isinstance(e, SlowDown):
        return "the exchange rate-limits this sidecar"
    if isinstance(e, TemporarilyUnavailable):
        return "the exchange cannot be reached or cannot answer now"
    if type(e) is ExchangeError:
        return "the exchange gave an answer the sidecar cannot use"
    return None


def route_for(
    table: RouteTable, authority: str | None, raw_target: str, *, absolute: bool
) -> Match | None:
    """The route of a request target, escapes refused as the proxy refuses them (400)."""
    try:
        return table.match(authority, raw_target, absolute_form=absolute)
    except BadPath as e:
        raise ProxyError(400, "invalid_request", str(e)) from e


def url_of(match: Match) -> URL:
    assert match.url is not None, "decide(forwarding=True) refuses routes without upstream"
    return match.url


def _target(request: web.BaseRequest) -> tuple[str | None, str, bool]:
    """(authority, origin-form target, absolute?) of a request to the proxy listener."""
    raw_target = request.raw_path
    if raw_target.startswith("/"):
        return request.headers.get("Host"), raw_target, False
    # absolute-form (RFC 9112 §3.2.2): the app uses us as HTTP_PROXY
    target = URL(raw_target, encoded=True)
    if target.scheme not in ("http", "https") or not target.raw_host:
        raise ProxyError(400, "invalid_request", "request target must be a path or an http URL")
    host = target.raw_host.lower()
    authority = f"{host}:{target.explicit_port}" if target.explicit_port else host
    return authority, target.raw_path_qs, True


def subject_expiry(token: str) -> float | None:
    """The subject's ``exp``, unverified: it can only shorten how long an entry is served."""
    exp = unverified_claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def subject_token_of(headers: Headers, raw_target: str) -> str | None:
    """The Bearer token of ``Authorization`` (None: there is none), or a 400 when that header
    is malformed or repeated, or when the request target carries a token (RFC 6750 §3.1)."""
    try:
        subject_token = bearer_token(headers)
        refuse_token_in_target(raw_target, subject_token)
    except (BadAuthorization, TokenInTarget) as e:
        raise bearer_request_refused(str(e)) from e
    return subject_token


def _hop(request: web.BaseRequest, original_host: str | None) -> Hop:
    version = _VERSIONS.get(request.version) or "{}.{}".format(*request.version)
    return Hop(request.remote, request.scheme, version, original_host)


def _is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def _replayable(request: web.BaseRequest) -> bool:
    """Idempotent and without a body: safe to send twice (RFC 9110 §9.2.2)."""
    return request.method in IDEMPOTENT and not request.body_exists
