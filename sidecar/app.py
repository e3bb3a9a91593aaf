"""The sidecar program: a proxy listener, an admin listener, their lifecycle and readiness.

``build_sidecar(config)`` returns ``(proxy_app, admin_app)``; both share one ``Sidecar`` (under
``SIDECAR``). Readiness (``/readyz``) is true once the config is loaded, both apps are started
and every required exchanger was reached once (embedded: core built and issuer keys warmed, or
tried; remote: token endpoint discovered or answering), and false again while draining. An
exchange is required unless it says ``required: false``; a route's own exchange defaults to
false (one zone's exchange down must not keep the pod from serving the other zones), the
top-level one to true. The others are tried behind readiness until reached. A later
outage of a remote core shows in 503s and metrics, never in readiness: flipping every pod
unready at once would turn a core outage into a total one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exchange.server.documents import zone_routes
from runtime.configload import ConfigError
from runtime.health import liveness, readiness
from runtime.logsetup import quiet_parse_errors, setup_logging
from runtime.retry import Backoff, retrying
from runtime.serving import HandlerRunner, Listener, RawHandler, run, serve
from sidecar.authz import check
from sidecar.cache import Clock, TokenCache
from sidecar.config import SidecarConfig, load_sidecar_config
from sidecar.exchanger import EmbeddedExchanger, Exchanger, build_exchanger
from sidecar.metrics import SidecarMetrics
from sidecar.proxy import Proxy, Upstream
from sidecar.upstream import UpstreamPool

log = logging.getLogger("zonegate.sidecar")

REACH = Backoff(base=0.2, cap=5.0)  # pauses between attempts to reach an exchanger
REACH_ON_RELOAD = 5.0  # seconds a reload waits for a new exchanger to answer once
RETIRE_AFTER_MAX = 60.0  # a replaced generation closes after min(shutdown_grace, this)


@dataclass
class Readiness:
    """What ``/readyz`` reports."""

    proxy_started: bool = False
    admin_started: bool = False
    exchange_reached: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return (
            self.proxy_started
            and self.admin_started
            and self.exchange_reached
            and not self.draining
        )

    def drain(self) -> None:
        self.draining = True


class Sidecar:
    """Everything one sidecar holds: config, routes, cache, exchangers, metrics, readiness."""

    def __init__(
        self,
        config: SidecarConfig,
        *,
        clock: Clock = time.time,
        exchangers: dict[str, Exchanger] | None = None,
    ) -> None:
        self.config = config
        self.readiness = Readiness()
        self.metrics = SidecarMetrics(lambda: len(self.cache))
        self._clock = clock
        self.cache = TokenCache(
            config.cache,
            clock=clock,
            on_event=self.metrics.observe_cache,
            on_evict=self.metrics.observe_eviction,
        )
        self.exchangers: dict[str, Exchanger] = exchangers or {
            identity: build_exchanger(settings) for identity, settings in config.exchanges().items()
        }
        self.proxy = Proxy(config, self.cache, self.exchangers, self.metrics)
        self._retiring: set[asyncio.Task[None]] = set()
        self._reaching: set[asyncio.Future[None]] = set()  # optional exchanges not reached yet
        self._reached: set[str] = set()

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy listener's handler: each request is answered by the proxy in force when
        it arrived, to its end."""
        return await self.proxy.serve(request)

    async def check(self, request: web.BaseRequest) -> web.StreamResponse:
        """The authz listener's handler: every request is a check, answered by the proxy
        generation in force when it arrived (``sidecar.authz``)."""
        return await check(self.proxy, request)

    async def reload(self, path: Path) -> bool:
        """SIGHUP: re-read the config, build routes, exchangers and cache, swap them in at once.

        The new cache keeps every entry whose route target and exchange identity are unchanged
        (the exchange identity is stable within one process); the others are evicted (reload).

        An invalid config is refused with its errors logged; the old one keeps serving. Exchangers
        whose settings did not change are kept (their connections and issuer keys with them);
        the replaced ones close once requests in flight had ``shutdown_grace`` to finish.
        """
        try:
            config = load_sidecar_config(path)
            exchangers = self._exchangers_for(config)
        except (ConfigError, ValueError, OSError) as e:
            errors = e.errors if isinstance(e, ConfigError) else [str(e)]
            log.error(
                "config reload refused; the previous config keeps serving",
                extra={"config": str(path), "errors": errors},
            )
            return False
        for listener in ("listen", "admin_listen", "authz_listen", "listeners"):
            if getattr(config, listener) != getattr(self.config, listener):
                log.warning("%s changed in config: takes effect on restart only", listener)
        await self._reach([e for i, e in exchangers.items() if self.exchangers.get(i) is not e])
        cache = TokenCache(
            config.cache,
            clock=self._clock,
            on_event=self.metrics.observe_cache,
            on_evict=self.metrics.observe_eviction,
        )
        made = {(r.target, config.exchange_for(r).identity) for r in config.routes}
        kept = cache.adopt(self.cache, lambda key: (key.target, key.exchange) in made)
        proxy = Proxy(config, cache, exchangers, self.metrics)
        proxy.upstream = self._upstream_for(config)
        old = (self.cache, self.exchangers, self.proxy.upstream)
        self.config, self.cache, self.exchangers, self.proxy = config, cache, exchangers, proxy
        self._retire(old[0], [e for i, e in old[1].items() if exchangers.get(i) is not e],
                     old[2] if old[2] is not proxy.upstream else None)  # fmt: skip
        log.info(
            "config reloaded",
            extra={"config": str(path), "routes": len(config.routes), "cache_entries_kept": kept},
        )
        return True

    def _exchangers_for(self, config: SidecarConfig) -> dict[str, Exchanger]:
        before = self.config.exchanges()
        return {
            identity: (
                self.exchangers[identity]
                if before.get(identity) == settings and identity in self.exchangers
                else build_exchanger(settings)
            )
            for identity, settings in config.exchanges().items()
        }

    async def _reach(self, exchangers: list[Exchanger]) -> None:
        for exchanger in exchangers:
            try:
                await asyncio.wait_for(exchanger.start(), REACH_ON_RELOAD)
            except Exception as e:  # reached on first use then; the reload goes on
                log.warning(
                    "exchange not reachable yet after reload: %s",
                    type(e).__name__,
                    extra={"exchange": exchanger.identity},
                )

    def _upstream_for(self, config: SidecarConfig) -> Upstream:
        same = (config.upstream, config.max_header_size)
        if same == (self.config.upstream, self.config.max_header_size):
            return self.proxy.upstream
        return configure_upstream(Upstream(), config)

    def _retire(
        self, cache: TokenCache, exchangers: list[Exchanger], upstream: Upstream | None
    ) -> None:
        async def later() -> None:
            try:
                await asyncio.sleep(min(self.config.shutdown_grace, RETIRE_AFTER_MAX))
            finally:
                await cache.close()
                for exchanger in exchangers:
                    await exchanger.close()
                if upstream is not None:
                    await upstream.close()

        task = asyncio.ensure_future(later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @property
    def embedded(self) -> EmbeddedExchanger | None:
        """The top-level embedded exchanger, whose zone documents the admin listener serves."""
        top = self.config.exchange
        exchanger = self.exchangers.get(top.identity) if top is not None else None
        return exchanger if isinstance(exchanger, EmbeddedExchanger) else None

    async def reach_exchangers(self) -> None:
        """Try every exchanger at once until each answered once. The sidecar is ready when the
        required ones were reached; the others (``required: false``) keep being tried behind
        it, and their routes answer 503 while their exchange cannot be reached."""
        required = self.config.required_exchanges()
        optional = [e for i, e in self.exchangers.items() if i not in required]
        for exchanger in optional:
            reaching = asyncio.ensure_future(self._reach_one(exchanger))
            self._reaching.add(reaching)
            reaching.add_done_callback(self._reaching.discard)
        await asyncio.gather(
            *(self._reach_one(e) for i, e in self.exchangers.items() if i in required)
        )
        self.readiness.exchange_reached = True
        log.info("exchange reached; ready", extra={"not_yet_reached": len(self._unreached())})

    async def _reach_one(self, exchanger: Exchanger) -> None:
        def warn(e: Exception, pause: float) -> None:
            log.warning("exchange not reachable yet: %s", e, extra={"exchange": exchanger.identity})

        # keep trying: readiness stays false meanwhile if this exchange is required
        await retrying(exchanger.start, retry_on=Exception, backoff=REACH, on_retry=warn)
        self._reached.add(exchanger.identity)

    def _unreached(self) -> list[str]:
        return [i for i in self.exchangers if i not in self._reached]

    async def close(self) -> None:
        reaching = list(self._reaching)
        for future in reaching:
            future.cancel()
        await asyncio.gather(*reaching, return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()  # its cleanup runs now
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.cache.close()
        for exchanger in self.exchangers.values():
            await exchanger.close()


SIDECAR = web.AppKey("sidecar", Sidecar)


def upstream_session(config: SidecarConfig) -> aiohttp.ClientSession:
    """The WebSocket upgrades' client: no decompression, explicit timeouts, pool limits, big
    headers. Every other request goes through ``upstream_pool``."""
    settings = config.upstream
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=settings.max_connections,
            limit_per_host=settings.max_connections_per_host,
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        max_line_size=config.max_header_size,
        max_field_size=config.max_header_size,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def upstream_pool(config: SidecarConfig, tls: ssl.SSLContext) -> UpstreamPool:
    """The upstream client of every request (``sidecar.upstream``): its timeouts and limits
    are ``upstream``'s, as the WebSocket session's are."""
    settings = config.upstream
    return UpstreamPool(
        ssl_context=tls,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_idle=settings.max_connections_per_host,
        max_busy=settings.max_connections,
        max_busy_per_origin=settings.max_connections_per_host,
        max_field_size=config.max_header_size,
    )


def configure_upstream(upstream: Upstream, config: SidecarConfig) -> Upstream:
    """Give ``upstream`` its clients and the TLS trust ``config`` names."""
    if config.upstream.ca_file is not None:
        upstream.ssl = ssl.create_default_context(cafile=str(config.upstream.ca_file))
    tls = upstream.ssl if isinstance(upstream.ssl, ssl.SSLContext) else ssl.create_default_context()
    upstream.pool = upstream_pool(config, tls)
    upstream.session = upstream_session(config)
    return upstream


def _proxy_lifecycle(sidecar: Sidecar) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        configure_upstream(sidecar.proxy.upstream, sidecar.config)
        reach = asyncio.ensure_future(sidecar.reach_exchangers())
        sidecar.readiness.proxy_started = True
        yield
        sidecar.readiness.drain()
        reach.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reach
        await sidecar.proxy.upstream.close()
        await sidecar.close()

    return lifecycle


def _admin_lifecycle(sidecar: Sidecar) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        sidecar.readiness.admin_started = True
        yield
        sidecar.readiness.drain()

    return lifecycle


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return liveness()


async def readyz(request: web.Request) -> web.Response:
    """Readiness: see the module docstring."""
    state = request.app[SIDECAR].readiness
    return readiness(
        {
            "proxy_listener": state.proxy_started,
            "admin_listener": state.admin_started,
            "exchange_reached": state.exchange_reached,
            "not_draining": not state.draining,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this sidecar's own registry."""
    sidecar = request.app[SIDECAR]
    return web.Response(
        body=sidecar.metrics.render(), headers={"Content-Type": sidecar.metrics.content_type}
    )


def proxy_server_args(config: SidecarConfig) -> dict[str, Any]:
    """The proxy listener's server settings: big headers, request bodies left encoded.

    A body with ``Content-Encoding`` is forwarded with that header, so its bytes must pass
    as they came: aiohttp's server would otherwise decompress them on the way in.
    """
    return {
        "max_line_size": config.max_header_size,
        "max_field_size": config.max_header_size,
        "auto_decompress": False,
    }


def build_sidecar(
    config: SidecarConfig,
    *,
    clock: Clock = time.time,
    exchangers: dict[str, Exchanger] | None = None,
) -> tuple[web.Application, web.Application]:
    """The proxy app and the admin app of one sidecar, ready to be served (or test-served).

    The proxy app holds the sidecar (``SIDECAR``) and its lifecycle; its requests are all
    answered by ``proxy_handler`` on aiohttp's low-level server (``runtime.serving``'s
    ``HandlerRunner``): whatever their target form, without a router or middlewares."""
    quiet_parse_errors()  # an unparsable request's bytes (its token) never reach the logs
    sidecar = Sidecar(config, clock=clock, exchangers=exchangers)
    proxy_app = web.Application()
    proxy_app[SIDECAR] = sidecar
    proxy_app.cleanup_ctx.append(_proxy_lifecycle(sidecar))

    admin_app = web.Application()
    admin_app[SIDECAR] = sidecar
    admin_app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    embedded = sidecar.embedded
    if embedded is not None:
        core = lambda: (sidecar.embedded or embedded).core  # noqa: E731 - a getter
        # The admin listener has no /token: its documents advertise none (RFC 8414 §2 makes
        # token_endpoint optional for issuers without one).
        admin_app.add_routes(zone_routes(core, token_endpoint=False))
    admin_app.cleanup_ctx.append(_admin_lifecycle(sidecar))
    return proxy_app, admin_app


def proxy_handler(app: web.Application) -> RawHandler:
    """What answers every request of the proxy listener: the sidecar's ``serve``."""
    return app[SIDECAR].serve


def proxy_runner(
    app: web.Application, handler: RawHandler | None = None, **settings: Any
) -> HandlerRunner:
    """A runner for the proxy app of ``build_sidecar`` outside ``serve_sidecar`` (the demo,
    the tests): ``proxy_handler`` (or ``handler``, e.g. ``Sidecar.check``) on the low-level
    server with the proxy listener's server settings, as ``serve_sidecar`` serves it."""
    server_args = proxy_server_args(app[SIDECAR].config)
    return HandlerRunner(app, handler or proxy_handler(app), **settings, **server_args)


def authz_listener(sidecar: Sidecar, host: str, port: int) -> Listener:
    """The authz listener (``authz_listen``): every request is a check (``Sidecar.check``),
    on the low-level server like the proxy listener; it has no lifecycle of its own."""
    app = web.Application()
    app[SIDECAR] = sidecar
    return Listener(
        "authz",
        app,
        host,
        port,
        timeouts=sidecar.config.listeners,
        handler=sidecar.check,
        server_args=proxy_server_args(sidecar.config),
    )


async def serve_sidecar(config: SidecarConfig, config_path: Path | None = None) -> int:
    """Serve both listeners until SIGTERM/SIGINT, then drain and return 0; SIGHUP re-reads
    ``config_path``."""
    proxy_app, admin_app = build_sidecar(config)
    sidecar = proxy_app[SIDECAR]

    async def on_hup() -> None:
        if config_path is not None:
            await sidecar.reload(config_path)

    listeners = [
        Listener(
            "sidecar",
            proxy_app,
            *config.listen,
            timeouts=config.listeners,
            handler=proxy_handler(proxy_app),
            server_args=proxy_server_args(config),
        ),
        Listener("admin", admin_app, *config.admin_listen, timeouts=config.listeners),
    ]
    if config.authz_listen is not None:
        listeners.append(authz_listener(sidecar, *config.authz_listen))
    return await serve(
        listeners,
        grace=config.shutdown_grace,
        on_hup=on_hup,
        on_drain=sidecar.readiness.drain,
        started=_freeze_startup_objects,
    )


def _freeze_startup_objects(bound: object) -> None:
    """Keep everything built at start out of the GC's full collections (``gc.freeze``).

    Modules, config, keys and apps are never garbage; without this each full collection walks
    them all again, a 20-30 ms pause in the middle of proxied requests (docs/benchmarks.md).
    """
    gc.collect()
    gc.freeze()


def main(config_path: Path, *, log_level: str = "INFO") -> int:
    """``zonegate sidecar --config F``."""
    setup_logging(log_level)
    config = load_sidecar_config(config_path)
    return run(serve_sidecar(config, config_path))
