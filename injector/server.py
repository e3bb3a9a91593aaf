"""The injector's I/O edge: ``POST /mutate`` over TLS, the certificate following its files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from injector.config import (
    MAX_REVIEW_BYTES,
    InjectorConfig,
    load_injector_config,
    parse_injector_config,
)
from injector.review import (
    Decision,
    InvalidReview,
    Review,
    admission_response,
    answer_review,
    decide,
    parse_review,
    pod_patch,
    pointer,
)
from runtime.health import liveness, readiness
from runtime.telemetry import LATENCY_BUCKETS, program_registry
from runtime.tls import ReloadingTls

log = logging.getLogger("zonegate.injector")

# --- HTTP ------------------------------------------------------------------------------------

CONFIG_KEY = web.AppKey("injector_config", InjectorConfig)
TLS_KEY = web.AppKey("injector_tls", ReloadingTls)
NAMESPACE_PATH = "/mutate/namespace"


async def mutate(request: web.Request) -> web.Response:
    """``POST /mutate`` (pods labelled ``zonegate.io/inject: "true"``) and ``POST
    /mutate/namespace`` (every pod of a namespace labelled ``zonegate.io/inject=enabled``):
    answer one AdmissionReview."""
    started = time.perf_counter()
    metrics = request.app[METRICS_KEY]
    if request.content_type != "application/json":
        metrics.observe("invalid", time.perf_counter() - started)
        return _error(415, f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        reply, review, decision = answer_review(
            await request.read(),
            request.app[CONFIG_KEY],
            namespace_enabled=request.path == NAMESPACE_PATH,
        )
    except InvalidReview as e:
        log.warning("invalid admission review: %s", e)
        metrics.observe("invalid", time.perf_counter() - started)
        return _error(400, str(e))
    _log_decision(review, decision)
    metrics.observe(decision.outcome, time.perf_counter() - started)
    return web.json_response(reply)


class InjectorMetrics:
    """Admission reviews by outcome and how long they took, with build info and process_*."""

    def __init__(self) -> None:
        self.registry = program_registry()
        self.reviews = Counter(
            "zonegate_injector_reviews",
            "Admission reviews by outcome: injected, skipped, already-injected, refused, invalid.",
            ["outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "zonegate_injector_review_duration_seconds",
            "Time to answer one admission review.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe(self, outcome: str, seconds: float) -> None:
        self.reviews.labels(outcome=outcome).inc()
        self.duration.observe(seconds)


METRICS_KEY = web.AppKey("injector_metrics", InjectorMetrics)


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus text format of the injector's own registry."""
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: InjectorMetrics) -> web.Application:
    """The plain-HTTP listener for Prometheus (and probes that cannot speak TLS)."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_get("/healthz", healthz)
    return app


def _log_decision(review: Review, decision: Decision) -> None:
    """One line per review; the pod is named, never its env values."""
    metadata = (review.pod or {}).get("metadata")
    name = (
        metadata.get("name") or metadata.get("generateName") if isinstance(metadata, dict) else None
    )
    level = logging.WARNING if decision.outcome == "refused" else logging.INFO
    log.log(
        level,
        "admission review",
        extra={
            "uid": decision.uid,
            "namespace": review.namespace,
            "pod": name,
            "outcome": decision.outcome,
            "reason": decision.reason,
        },
    )


def _error(status: int, description: str) -> web.Response:
    return web.json_response(
        {"error": "invalid_request", "error_description": description}, status=status
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return liveness()


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the certificate loaded at start (or there is none: a test app)."""
    return readiness(
        {"certificate_loaded": TLS_KEY not in request.app or request.app[TLS_KEY].loaded}
    )


def make_app(
    config: InjectorConfig,
    tls: ReloadingTls | None = None,
    metrics: InjectorMetrics | None = None,
) -> web.Application:
    """The webhook app; with ``tls`` it polls the certificate files for changes."""
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[CONFIG_KEY] = config
    app[METRICS_KEY] = metrics or InjectorMetrics()
    app.router.add_post("/mutate", mutate)
    app.router.add_post(NAMESPACE_PATH, mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if tls is not None:
        app[TLS_KEY] = tls
        app.cleanup_ctx.append(_watch_tls)
    return app


async def _watch_tls(app: web.Application) -> AsyncIterator[None]:
    tls, interval = app[TLS_KEY], app[CONFIG_KEY].tls_reload_interval

    async def poll() -> None:
        while True:
            await asyncio.sleep(interval)
            tls.try_reload()

    task = asyncio.create_task(poll())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(config_path: Path, *, log_level: str) -> int:
    """``zonegate injector --config F``: serve the webhook over TLS until SIGTERM."""
    from runtime.logsetup import setup_logging
    from runtime.serving import Listener, run, serve

    setup_logging(log_level)
    config = load_injector_config(config_path)
    tls = ReloadingTls(config.tls_cert_file, config.tls_key_file)
    host, port = config.listen

    async def on_hup() -> None:
        tls.try_reload()

    metrics = InjectorMetrics()
    app = make_app(config, tls, metrics)
    listeners = [
        Listener("injector", app, host, port, ssl_context=tls.context, timeouts=config.listeners)
    ]
    if config.metrics_listen is not None:
        metrics_listener = Listener(
            "metrics", metrics_app(metrics), *config.metrics_listen, timeouts=config.listeners
        )
        listeners.append(metrics_listener)
    return run(serve(listeners, grace=5.0, on_hup=on_hup))


__all__ = [
    "Decision",
    "InjectorConfig",
    "InvalidReview",
    "admission_response",
    "answer_review",
    "decide",
    "load_injector_config",
    "main",
    "make_app",
    "parse_injector_config",
    "parse_review",
    "pod_patch",
    "pointer",
]
