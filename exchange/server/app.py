"""The standalone exchange server (``zonegate exchange``): an aiohttp adapter around the core.

Endpoints: ``POST /token`` (RFC 8693), server metadata
(RFC 8414), zone issuer documents, ``/healthz``, ``/readyz``, ``/metrics``.

``error_response`` is the one place where an ``ExchangeError`` becomes an HTTP response.
Config and keys are parsed at start and on reload (SIGHUP, key files changing), never per
request: handlers read the current ``Service`` and swap nothing but that reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import hdrs, web

from exchange import policy
from exchange.clientauth import ClientAuthenticator, presented_credentials
from exchange.config import ClientConfig, ExchangeConfig, load_exchange_config
from exchange.core import ExchangeCore, subject_hash
from exchange.errors import ExchangeError, InvalidRequest
from exchange.ratelimit import RateLimiter
from exchange.server.documents import zone_routes
from exchange.server.fetcher import HttpFetcher
from exchange.server.keyfiles import KeyFiles
from exchange.server.metrics import NO_ZONE, UNKNOWN_CLIENT, ExchangeMetrics
from exchange.server.wiring import build_core
from exchange.tokens import TokenExchangeRequest, TokenResponse, parse_token_request
from runtime.configload import ConfigError
from runtime.logsetup import quiet_parse_errors, setup_logging
from runtime.serving import Listener, run, serve

log = logging.getLogger("zonegate.exchange")
access_log = logging.getLogger("zonegate.access")
audit_log = logging.getLogger("zonegate.audit")

FORM = "application/x-www-form-urlencoded"
MAX_BODY = 64 * 1024
MAX_FIELDS = 64
MAX_LOGGED_PATH = 200
KEY_CHECK_INTERVAL = 10.0
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

    @classmethod
    def build(
        cls,
        config: ExchangeConfig,
        fetcher: HttpFetcher,
        metrics: ExchangeMetrics,
        previous: Service | None = None,
    ) -> Service:
        """Load the zone keys and build everything the handlers use; ConfigError on bad keys."""
        key_files = KeyFiles(config)
        core = build_core(
            config, keys=key_files.ring, fetcher=fetcher, observe_fetch=metrics.observe_fetch
        )
        if previous is not None:
            adopt_issuer_keys(core, previous.core)
        return cls(
            core=core,
            auth=ClientAuthenticator(
                config, fetch=fetcher, clock=time.time, observe=metrics.observe_fetch
            ),
            limiter=RateLimiter(
                config.clients,
                previous=previous.limiter if previous else None,
                clock=time.monotonic,
            ),
            key_files=key_files,
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
    before = {t.issuer: t.jwks_uri for t in old.config.trusted_issuers}
    for trusted in new.config.trusted_issuers:
        if trusted.issuer in before and before[trusted.issuer] == trusted.jwks_uri:
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
    config_path: Path | None = None
    ready: bool = False

    async def reload(self) -> bool:
        """SIGHUP: re-read config and keys; an invalid config is refused and the old one serves."""
        if self.config_path is None:
            return self.check_keys()
        try:
            config = load_exchange_config(self.config_path)
            service = Service.build(config, self.fetcher, self.metrics, self.service)
        except ConfigError as e:
            log.error(
                "config reload refused; the previous config keeps serving",
                extra={"config": str(self.config_path), "errors": e.errors},
            )
            return False
        if config.listen != self.service.core.config.listen:
            log.warning("listen changed in config: takes effect on restart only")
        await _warm(service.core)
        self.service = service  # requests in flight finish with the generation they began with
        log.info("config reloaded", extra={"config": str(self.config_path)})
        return True

    def check_keys(self) -> bool:
        """Re-read zone key files that changed; errors keep the old keys and are logged."""
        errors = self.service.key_files.reload()
        for error in errors:
            log.error("zone key reload failed; previous keys kept", extra={"error": error})
        return not errors

    async def watch_keys(self, interval: float) -> None:
        """Check key files every ``interval`` seconds, so rotation needs no SIGHUP."""
        while True:
            await asyncio.sleep(interval)
            self.check_keys()

    async def close(self) -> None:
        """Release the shared fetcher's HTTP session."""
        await self.fetcher.close()


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
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidRequest(
            f"body is not a valid form (ASCII, UTF-8 percent-escapes, at most {MAX_FIELDS} fields)"
        ) from e
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


@dataclass(slots=True)
class Outcome:
    """What the audit line and the metrics say about one token request."""

    client: str = UNKNOWN_CLIENT
    zone: str = NO_ZONE
    subject: str | None = None  # subject_hash, never the token
    jti: str | None = None
    error: ExchangeError | None = None

    @property
    def code(self) -> str:
        return "ok" if self.error is None else self.error.error


async def token(request: web.Request) -> web.Response:
    """POST /token (RFC 8693 §2)."""
    runtime = request.app[RUNTIME]
    service = runtime.service  # one generation for the whole request, even across a reload
    started = time.perf_counter()
    outcome = Outcome()
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
    presented = presented_credentials(authorization(request), form)
    client = await service.auth.authenticate(presented, now=time.time())
    outcome.client = client.client_id
    CLIENT_ID.set(client.client_id)
    outcome.zone = service.zone_of(exchange_request, client)
    service.limiter.check(client.client_id)
    response = await service.core.exchange(exchange_request, client=client)
    outcome.jti = str(response.claims.get("jti"))
    return response


def authorization(request: web.Request) -> str | None:
    """The one Authorization header; two of them are ambiguous, so refused (RFC 9110 §5.3)."""
    values = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(values) > 1:
        raise InvalidRequest("Authorization must not be repeated")
    return values[0] if values else None


def _audit(outcome: Outcome) -> None:
    audit_log.info(
        "token exchange",
        extra={
            "client": outcome.client,
            "zone": outcome.zone,
            "outcome": outcome.code,
            "jti": outcome.jti,
            "subject": outcome.subject,
            "reason": outcome.error.description if outcome.error else None,
        },
    )


# -- documents, health, metrics ----------------------------------------------------------------


async def server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 metadata of the server itself."""
    core = request.app[RUNTIME].service.core
    return web.json_response(
        core.server_metadata(), headers={"Cache-Control": "public, max-age=300"}
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: config and keys loaded. An upstream OP being down does not make us unready."""
    if request.app[RUNTIME].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


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
        access_log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path[:MAX_LOGGED_PATH],
                "status": status,
                "duration": round(time.perf_counter() - started, 6),
                "client": CLIENT_ID.get(),
            },
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
    runtime = Runtime(Service.build(config, fetcher, metrics), metrics, fetcher, config_path)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[log_requests, json_errors])
    app[RUNTIME] = runtime
    app.router.add_post("/token", token)
    app.router.add_get("/.well-known/oauth-authorization-server", server_metadata)
    app.router.add_get("/.well-known/openid-configuration", server_metadata)
    app.router.add_routes(zone_routes(lambda: runtime.service.core))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus_metrics)
    app.cleanup_ctx.append(_lifecycle(key_check_interval))
    return app


def _lifecycle(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        tasks = [
            asyncio.create_task(_warm(runtime.service.core)),
            asyncio.create_task(runtime.watch_keys(interval)),
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

    listener = Listener("exchange", app, host, port, timeouts=config.listeners)
    return run(serve([listener], on_hup=on_hup, on_drain=on_drain))
