"""The injector's I/O edge: ``POST /mutate`` over TLS, the certificate following its files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

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
from runtime.tls import ReloadingTls

log = logging.getLogger("zonegate.injector")

# --- HTTP ------------------------------------------------------------------------------------

CONFIG_KEY = web.AppKey("injector_config", InjectorConfig)
TLS_KEY = web.AppKey("injector_tls", ReloadingTls)


async def mutate(request: web.Request) -> web.Response:
    """``POST /mutate``: answer one AdmissionReview."""
    if request.content_type != "application/json":
        return _error(415, f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        reply, review, decision = answer_review(await request.read(), request.app[CONFIG_KEY])
    except InvalidReview as e:
        log.warning("invalid admission review: %s", e)
        return _error(400, str(e))
    _log_decision(review, decision)
    return web.json_response(reply)


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
    """Liveness and readiness: the process answers, and its certificate loaded at start."""
    return web.json_response({"status": "ok"})


def make_app(config: InjectorConfig, tls: ReloadingTls | None = None) -> web.Application:
    """The webhook app; with ``tls`` it polls the certificate files for changes."""
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[CONFIG_KEY] = config
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
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

    app = make_app(config, tls)
    listener = Listener(
        "injector", app, host, port, ssl_context=tls.context, timeouts=config.listeners
    )
    return run(serve([listener], grace=5.0, on_hup=on_hup))


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
