"""The standalone exchange server (``zonegate exchange``): an aiohttp adapter around the core.

Endpoints: ``POST /token`` (RFC 8693), server metadata
(RFC 8414), zone issuer documents, ``/healthz``, ``/readyz``, ``/metrics``. With
``admin_listen`` the last three move to an app of their own (``create_admin_app``), so that
whoever can reach ``/token`` cannot read client ids and traffic from ``/metrics``.

With ``tls``, ``listen`` serves HTTPS (``runtime.tls.ReloadingTls``: files re-read when they
change); with ``tls.client_ca_file`` client certificates are requested and verified, and the
verified one is handed to client authentication (``tls_client_auth``, RFC 8705 §2.1).

``error_response`` is the one place where an ``ExchangeError`` becomes an HTTP response.
Config and keys are parsed at start and on reload (SIGHUP, key files changing), never per
request: handlers read the current ``Service`` and swap nothing but that reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from exchange import policy
from exchange.clientauth import ClientAuthenticator, presented_credentials
from exchange.config import ClientConfig, ExchangeConfig, load_exchange_config
from exchange.core import ExchangeCore, subject_hash
from exchange.errors import ExchangeError, InvalidClient, InvalidRequest
from exchange.ratelimit import RateLimiter
from exchange.server.documents import zone_routes
from exchange.server.fetcher import HttpFetcher
from exchange.server.guards import SharedLimits, SharedReplay, build_state
from exchange.server.keyfiles import KeyFiles
from exchange.server.metrics import NO_ZONE, UNKNOWN_CLIENT, ExchangeMetrics
from exchange.server.sharedstate import REDIS, SharedState, SharedStateUnavailable
from exchange.server.wiring import build_core, cluster_fetchers
from exchange.tokens import (
    TokenExchangeRequest,
    TokenResponse,
    parse_form,
    parse_token_request,
)
from runtime.configload import ConfigError
from runtime.health import liveness, readiness
from runtime.logsetup import AccessLine, quiet_parse_errors, setup_logging
from runtime.retry import Backoff, retrying
from runtime.serving import Listener, run, serve
from runtime.tls import ReloadingTls

log = logging.getLogger("zonegate.exchange")
access_log = logging.getLogger("zonegate.access")
audit_log = logging.getLogger("zonegate.audit")
ACCESS_LINE = AccessLine(access_log, "request")  # the bytes access_log.info would write
AUDIT_LINE = AccessLine(audit_log, "token exchange")

FORM = "application/x-www-form-urlencoded"
MAX_BODY = 64 * 1024
MAX_FIELDS = 64
MAX_LOGGED_PATH = 200
MAX_LOGGED_VALUE = 200
KEY_CHECK_INTERVAL = 10.0
REACH_STATE = Backoff(base=0.2, cap=5.0)  # pauses between attempts to reach the shared state
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
BASIC_CHALLENGE = 'Basic realm="zonegate"'
HTTP_ERRORS = {404: "not_found", 405: "invalid_request", 413: "invalid_request"}


class BodyTooLarge(InvalidRequest):
    """The request body exceeds 64 KiB: invalid_request, answered with 413."""

    status_hint = 413


# -- the one ExchangeError -> HTTP mapping ---------------------------------------------------


def error_response(error: ExchangeError) -> web.Response:
    """RFC 6749 §5.2 JSON error with the error's status, challenge and Retry-After."""
    headers = dict(NO_STORE)
    if error.status_hint == 401:  # RFC 9110 §15.5.2: every 401 carries a challenge
        headers[hdrs.WWW_AUTHENTICATE] = BASIC_CHALLENGE
    if error.retry_after is not None or error.status_hint in (429, 503):
        headers[hdrs.RETRY_AFTER] = str(error.retry_after or 1)
    return web.json_response(error.to_dict(), status=error.status_hint, headers=headers)


def token_response(response: TokenResponse) -> web.Response:
    """RFC 8693 §2.2.1 success: the JSON body, never cached."""
    return web.json_response(response.to_dict(), headers=NO_STORE)


# -- what the handlers use, swapped whole on reload ------------------------------------------


@dataclass(slots=True)
class Service:
    """The core, client authentication, rate limits and key files of one config generation."""

    core: ExchangeCore
    auth: ClientAuthenticator
    limiter: RateLimiter
    key_files: KeyFiles
    shared_limits: SharedLimits | None = None  # backend redis: the buckets every replica shares

    @classmethod
    def build(
        cls,
        config: ExchangeConfig,
        fetcher: HttpFetcher,
        metrics: ExchangeMetrics,
        previous: Service | None = None,
        *,
        state: SharedState,
    ) -> Service:
        """Load the zone keys and build everything the handlers use; ConfigError on bad keys.
        ``state`` outlives generations: a reload forgets no jti and no shared bucket."""
        key_files = KeyFiles(config)
        core = build_core(
            config, keys=key_files.ring, fetcher=fetcher, observe_fetch=metrics.observe_fetch
        )
        if previous is not None:
            adopt_issuer_keys(core, previous.core)
        return cls(
            core=core,
            auth=ClientAuthenticator(
                config,
                fetch=fetcher,
                clock=time.time,
                observe=metrics.observe_fetch,
                issuer_fetchers=cluster_fetchers(config, fetcher),
                replay=SharedReplay(state, metrics.observe_shared_state_error),
            ),
            limiter=RateLimiter(
                config.clients,
                previous=previous.limiter if previous else None,
                clock=time.monotonic,
            ),
            key_files=key_files,
            shared_limits=(
                SharedLimits(state, metrics.observe_shared_state_error)
                if state.backend == REDIS
                else None
            ),
        )

    def zone_of(self, request: TokenExchangeRequest, client: ClientConfig) -> str:
        """The zone a request targets, for labels (``none`` when it targets none)."""
        try:
            zone, _ = policy.select_zone(
                request, client, self.core.zone_index, self.core.config.zones
            )
        except ExchangeError:
            return NO_ZONE
        return zone.name


def _key_timing(config: ExchangeConfig) -> tuple[float, int, int]:
    return (config.jwks_min_refresh, config.jwks_max_age, config.jwks_stale_for)


def adopt_issuer_keys(new: ExchangeCore, old: ExchangeCore) -> None:
    """Trusted issuers' keys already held survive a reload: a reload during an OP outage must
    not turn cached keys into 503s. Only issuers configured the same way are adopted."""
    if _key_timing(new.config) != _key_timing(old.config):
        return
    before = {t.issuer: (t.jwks_uri, t.ca_file) for t in old.config.trusted_issuers}
    for trusted in new.config.trusted_issuers:
        if before.get(trusted.issuer) == (trusted.jwks_uri, trusted.ca_file):
            new.issuer_keys[trusted.issuer] = old.issuer_keys[trusted.issuer]


@dataclass
class Runtime:
    """The app's mutable state: the service in use, readiness, reloading, the HTTP fetcher.

    One fetcher serves every generation (cores built on reload, client authentication), so a
    reload closes nothing that a request in flight may still use.
    """

    service: Service
    metrics: ExchangeMetrics
    fetcher: HttpFetcher
    state: SharedState
    config_path: Path | None = None
    ready: bool = False
    state_reached: bool = False  # the shared state answered once (readiness, with redis)
    tls: ReloadingTls | None = None  # the listener's TLS, when ``tls`` is configured

    async def reload(self) -> bool:
        """SIGHUP: re-read config and keys; an invalid config is refused and the old one serves."""
        if self.config_path is None:
            return self.check_keys()
        try:
            config = load_exchange_config(self.config_path)
            service = Service.build(
                config, self.fetcher, self.metrics, self.service, state=self.state
            )
        except ConfigError as e:
            log.error(
                "config reload refused; the previous config keeps serving",
                extra={"config": str(self.config_path), "errors": e.errors},
            )
            return False
        before = self.service.core.config
        if (config.listen, config.admin_listen) != (before.listen, before.admin_listen):
            log.warning("listen or admin_listen changed in config: takes effect on restart only")
        if config.tls != before.tls:
            log.warning("tls changed in config: takes effect on restart only")
        if config.shared_state != before.shared_state:
            log.warning("shared_state changed in config: takes effect on restart only")
        await _warm(service.core)
        self.service = service  # requests in flight finish with the generation they began with
        log.info("config reloaded", extra={"config": str(self.config_path)})
        return True

    def check_keys(self) -> bool:
        """Re-read zone key files and TLS files that changed; errors keep the old ones and
        are logged."""
        if self.tls is not None:
            self.tls.try_reload()
        errors = self.service.key_files.reload()
        for error in errors:
            log.error("zone key reload failed; previous keys kept", extra={"error": error})
        return not errors

    async def watch_keys(self, interval: float) -> None:
        """Check key and TLS files every ``interval`` seconds, so rotation needs no SIGHUP."""
        while True:
            await asyncio.sleep(interval)
            self.check_keys()

    async def reach_state(self) -> None:
        """Try the shared state until it answers once (readiness waits for it with redis)."""

        def failed(e: Exception, pause: float) -> None:
            self.metrics.observe_shared_state_error("start")
            log.warning("shared state not reachable yet: %s", e)

        await retrying(
            self.state.start, retry_on=SharedStateUnavailable, backoff=REACH_STATE, on_retry=failed
        )
        self.state_reached = True
        if self.state.backend == REDIS:
            log.info("shared state reached", extra={"backend": self.state.backend})

    async def close(self) -> None:
        """Release the shared fetcher's HTTP session and the shared state's connections."""
        await self.fetcher.close()
        await self.state.close()


RUNTIME = web.AppKey("zonegate.exchange.runtime", Runtime)
# The authenticated client of the request being answered, for its access line. A ContextVar
# (not request storage) works on every aiohttp version: handler and middleware share a task.
CLIENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_id", default=None)


async def _warm(core: ExchangeCore) -> None:
    failed = await core.warm()
    for issuer in failed:
        log.warning(
            "trusted issuer keys unavailable; will retry on demand", extra={"issuer": issuer}
        )


# -- /token -----------------------------------------------------------------------------------


async def read_form(request: web.Request) -> dict[str, list[str]]:
    """The form fields of a token request: urlencoded only, at most 64 KiB, valid UTF-8."""
    if request.content_type != FORM:
        raise InvalidRequest(f"Content-Type must be {FORM}")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BodyTooLarge(f"request body larger than {MAX_BODY} bytes")
    try:
        body = await request.read()  # bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge as e:
        raise BodyTooLarge(f"request body larger than {MAX_BODY} bytes") from e
    try:
        return parse_form(body, max_fields=MAX_FIELDS)
    except ValueError as e:  # UnicodeDecodeError too
        raise InvalidRequest(
            f"body is not a valid form (ASCII, UTF-8 percent-escapes, at most {MAX_FIELDS} fields)"
        ) from e


@dataclass(slots=True)
class Outcome:
    """What the audit line and the metrics say about one token request."""

    client: str = UNKNOWN_CLIENT
    zone: str = NO_ZONE
    subject: str | None = None  # subject_hash, never the token
    jti: str | None = None
    error: ExchangeError | None = None
    peer: str | None = None
    presented_client: str | None = None  # the client id a failed authentication claimed
    audience: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    scope: tuple[str, ...] | None = None  # granted

    @property
    def code(self) -> str:
        return "ok" if self.error is None else self.error.error


async def token(request: web.Request) -> web.Response:
    """POST /token (RFC 8693 §2)."""
    runtime = request.app[RUNTIME]
    service = runtime.service  # one generation for the whole request, even across a reload
    started = time.perf_counter()
    outcome = Outcome(peer=request.remote)
    try:
        answer = token_response(await _exchange(request, service, outcome))
    except ExchangeError as e:
        outcome.error = e
        answer = error_response(e)
    runtime.metrics.observe_exchange(
        outcome.client, outcome.zone, outcome.code, time.perf_counter() - started
    )
    _audit(outcome)
    return answer


async def _exchange(request: web.Request, service: Service, outcome: Outcome) -> TokenResponse:
    form = await read_form(request)
    exchange_request = parse_token_request(form)
    outcome.subject = subject_hash(exchange_request.subject_token)
    outcome.audience, outcome.resource = exchange_request.audience, exchange_request.resource
    presented = presented_credentials(
        authorization(request), form, certificate=peer_certificate(request)
    )
    outcome.presented_client = presented.client_ids[0] if presented.client_ids else None
    client = await service.auth.authenticate(presented, now=time.time())
    outcome.client = client.client_id
    CLIENT_ID.set(client.client_id)
    try:
        if service.shared_limits is not None:
            await service.shared_limits.check(client)
        else:
            service.limiter.check(client.client_id)
        response = await service.core.exchange(exchange_request, client=client)
    except ExchangeError:  # the zone the request targets, for the labels, if it names one
        outcome.zone = service.zone_of(exchange_request, client)
        raise
    outcome.zone = response.zone or NO_ZONE  # the zone the policy selected, as zone_of would
    outcome.jti = str(response.claims.get("jti"))
    outcome.scope = response.scope
    return response


def peer_certificate(request: web.Request) -> bytes | None:
    """The client certificate (DER) the listener verified against ``tls.client_ca_file``;
    None without one (or without client CAs: nothing was verified)."""
    tls = request.app[RUNTIME].tls
    if tls is None or tls.client_ca_file is None or request.transport is None:
        return None
    ssl_object = request.transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert(binary_form=True)


def authorization(request: web.Request) -> str | None:
    """The one Authorization header; two of them are ambiguous, so refused (RFC 9110 §5.3)."""
    values = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(values) > 1:
        raise InvalidRequest("Authorization must not be repeated")
    return values[0] if values else None


def _audit(outcome: Outcome) -> None:
    """One audit line per token request; a failed client authentication is a warning naming
    the client id it claimed (an id is not a secret) and the peer address."""
    fields = {
        "client": outcome.client,
        "zone": outcome.zone,
        "audience": _bounded(outcome.audience),
        "resource": _bounded(outcome.resource),
        "scope": " ".join(outcome.scope) if outcome.scope is not None else None,
        "outcome": outcome.code,
        "jti": outcome.jti,
        "subject": outcome.subject,
        "peer": outcome.peer,
        "reason": outcome.error.description if outcome.error else None,
    }
    if isinstance(outcome.error, InvalidClient):
        fields["presented_client"] = _bounded((outcome.presented_client or "",))[0] or None
        audit_log.warning("client authentication failed", extra=fields)
        return
    AUDIT_LINE.write(fields)


def _bounded(values: tuple[str, ...]) -> list[str]:
    """Request values for a log line: at most 8, each cut to 200 characters."""
    return [v[:MAX_LOGGED_VALUE] for v in values[:8]]


# -- documents, health, metrics ----------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 metadata of the server itself."""
    core = request.app[RUNTIME].service.core
    return web.json_response(
        core.server_metadata(), headers={"Cache-Control": "public, max-age=300"}
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return liveness()


async def readyz(request: web.Request) -> web.Response:
    """Readiness: config and keys loaded (and, with a redis shared state, Redis reached once at
    start). An upstream OP or a later Redis outage does not make us unready."""
    runtime = request.app[RUNTIME]
    checks = {"config_and_keys_loaded": runtime.ready}
    if runtime.state.backend == REDIS:
        checks["shared_state_reached"] = runtime.state_reached
    return readiness(checks)


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus text format of this server's own registry."""
    exported = request.app[RUNTIME].metrics
    return web.Response(body=exported.render(), headers={hdrs.CONTENT_TYPE: exported.content_type})


# -- middleware -----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One JSON line per request: method, path (never the query), status, duration, client."""
    started = time.perf_counter()
    status = 500
    CLIENT_ID.set(None)
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:  # answered by aiohttp itself (a JSON 404 of a zone route)
        status = e.status
        raise
    finally:
        ACCESS_LINE.write(
            {
                "method": request.method,
                "path": request.path[:MAX_LOGGED_PATH],
                "status": status,
                "duration": round(time.perf_counter() - started, 6),
                "client": CLIENT_ID.get(),
            }
        )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Routing errors and bugs answer JSON too; a bug is a 500 without a traceback on the wire."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        code = HTTP_ERRORS.get(e.status, "invalid_request" if e.status < 500 else "server_error")
        body = {"error": code, "error_description": e.reason}
        return web.json_response(body, status=e.status, headers=_allow(e))
    except Exception:
        log.exception(
            "unhandled error answering %s %s", request.method, request.path[:MAX_LOGGED_PATH]
        )
        return error_response(ExchangeError("internal error"))


def _allow(e: web.HTTPException) -> dict[str, str]:
    allow = e.headers.get(hdrs.ALLOW)
    return {hdrs.ALLOW: allow} if allow else {}


# -- the app -------------------------------------------------------------------------------------


def create_app(
    config: ExchangeConfig,
    *,
    config_path: Path | None = None,
    key_check_interval: float = KEY_CHECK_INTERVAL,
) -> web.Application:
    """The exchange server's app for ``config``: zone keys loaded, fetcher and metrics wired.

    ``config_path``: reload (SIGHUP) re-reads it; without it, reload re-reads zone key files only.
    """
    quiet_parse_errors()  # no request bytes (tokens) or tracebacks in logs, embedded or not
    metrics = ExchangeMetrics()
    fetcher = HttpFetcher(config.fetch_timeout)
    state = build_state(config.shared_state)
    service = Service.build(config, fetcher, metrics, state=state)
    runtime = Runtime(service, metrics, fetcher, state, config_path)
    if config.tls is not None:
        runtime.tls = ReloadingTls(
            config.tls.cert_file,
            config.tls.key_file,
            client_ca_file=config.tls.client_ca_file,
            what="tls.cert_file/tls.key_file/tls.client_ca_file",
        )
    app = web.Application(client_max_size=MAX_BODY, middlewares=[log_requests, json_errors])
    app[RUNTIME] = runtime
    app.router.add_post("/token", token)
    app.router.add_get("/.well-known/oauth-authorization-server", server_metadata)
    app.router.add_get("/.well-known/openid-configuration", server_metadata)
    app.router.add_routes(zone_routes(lambda: runtime.service.core))
    if config.admin_listen is None:  # otherwise they live on the admin listener alone
        _add_operator_routes(app)
    app.cleanup_ctx.append(_lifecycle(key_check_interval))
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """The admin listener's app (``admin_listen``): /healthz, /readyz and /metrics of the
    exchange server ``app``, sharing its state. Nothing else is served there."""
    admin = web.Application(middlewares=[json_errors])
    admin[RUNTIME] = app[RUNTIME]
    _add_operator_routes(admin)
    return admin


def _add_operator_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus_metrics)


def _lifecycle(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        tasks = [
            asyncio.create_task(_warm(runtime.service.core)),
            asyncio.create_task(runtime.watch_keys(interval)),
            asyncio.create_task(runtime.reach_state()),
        ]
        runtime.ready = True  # config and zone keys are loaded: the core exists
        yield
        runtime.ready = False
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runtime.close()

    return lifecycle


def main(config_path: Path, *, log_level: str = "INFO") -> int:
    """``zonegate exchange --config F``: serve until SIGTERM/SIGINT; SIGHUP reloads."""
    setup_logging(log_level.upper())
    config = load_exchange_config(config_path)  # ConfigError: the CLI lists it, exit 2
    app = create_app(config, config_path=config_path)
    runtime = app[RUNTIME]
    host, port = config.listen

    async def on_hup() -> None:
        await runtime.reload()

    def on_drain() -> None:
        runtime.ready = False

    ssl_context = runtime.tls.context if runtime.tls is not None else None
    timeouts = config.listeners
    listeners = [Listener("exchange", app, host, port, ssl_context=ssl_context, timeouts=timeouts)]
    if config.admin_listen is not None:
        admin = create_admin_app(app)
        listeners.append(Listener("admin", admin, *config.admin_listen, timeouts=timeouts))
    return run(serve(listeners, on_hup=on_hup, on_drain=on_drain))
