"""The injector's I/O edge: ``POST /mutate`` over TLS, the certificate following its files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from exchange.configload import ConfigError
from sidecar.inject import (
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
from sidecar.injectconfig import (
    MAX_REVIEW_BYTES,
    InjectorConfig,
    load_injector_config,
    parse_injector_config,
)

log = logging.getLogger("zonegate.injector")

# --- TLS with reload -------------------------------------------------------------------------


class ReloadingTls:
    """A server SSLContext whose certificate and key follow their files."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[int, ...] | None = None
        try:
            self.reload()
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                [f"tls_cert_file/tls_key_file: cannot load {cert_file} and {key_file}: {e}"]
            ) from e

    def _current_stamp(self) -> tuple[int, ...]:
        stats = (os.stat(self.cert_file), os.stat(self.key_file))
        return tuple(n for s in stats for n in (s.st_ino, s.st_mtime_ns, s.st_size))

    def reload(self) -> bool:
        """Load the files when they changed; True when a new certificate is in use."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        # Check the pair on a scratch context first: a half-rotated pair must not break the
        # live one, whose certificate would otherwise no longer match its key.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp
        return True

    def try_reload(self) -> None:
        """Reload, logging instead of raising: the old certificate keeps serving meanwhile."""
        try:
            if self.reload():
                log.info("webhook certificate loaded", extra={"cert_file": str(self.cert_file)})
        except (OSError, ssl.SSLError) as e:
            log.warning("webhook certificate not reloaded, keeping the old one: %s", e)


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
    from exchange.logsetup import setup_logging
    from exchange.serving import Listener, run, serve

    setup_logging(log_level)
    config = load_injector_config(config_path)
    tls = ReloadingTls(config.tls_cert_file, config.tls_key_file)
    host, port = config.listen

    async def on_hup() -> None:
        tls.try_reload()

    listener = Listener("injector", make_app(config, tls), host, port, ssl_context=tls.context)
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
