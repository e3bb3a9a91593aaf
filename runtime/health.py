"""``/healthz`` and ``/readyz`` answers, one shape for every program.

``{"status": "ok"}`` for liveness; ``{"status": "ready" | "not ready", "checks": {name: bool}}``
for readiness, 200 or 503, so a probe and an operator read every program the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web


def liveness() -> web.Response:
    """The process answers."""
    return web.json_response({"status": "ok"})


def readiness(checks: Mapping[str, bool]) -> web.Response:
    """Ready when every check holds; the body names each one."""
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": dict(checks)}
    return web.json_response(body, status=200 if ready else 503)
