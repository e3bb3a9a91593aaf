"""Shared fixtures: a real OpenID Provider on 127.0.0.1 and exchange configs built around it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer

from devkit.provider import DevOpenIDProvider
from exchange.config import ExchangeConfig, parse_exchange_config
from exchange.core import ExchangeCore
from exchange.server.wiring import build_core
from runtime.serving import HandlerRunner, RawHandler
from sidecar.app import proxy_handler, proxy_runner

NOW = 1_900_000_000.0  # a fixed clock for pure tests
ServerFactory = Callable[..., Any]
# the session-wide secrets scan and no_crash; the programs fixture (zonegate subprocesses)
pytest_plugins = ["tests.logchecks", "tests.programs"]


@pytest.fixture
async def op(aiohttp_server: ServerFactory) -> DevOpenIDProvider:
    """The blue zone's OpenID Provider, served over HTTP on 127.0.0.1 (RS256 and ES256 keys)."""
    provider = DevOpenIDProvider()
    server: TestServer = await aiohttp_server(provider.app(), host="127.0.0.1")
    provider.issuer = str(server.make_url("")).rstrip("/")
    return provider


def exchange_document(op: DevOpenIDProvider, **overrides: Any) -> dict[str, Any]:
    """A complete exchange config document trusting ``op``, with zones red and green."""
    document: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8081",
        "trusted_issuers": [{"issuer": op.issuer, "audiences": ["frontend"]}],
        "jwks_min_refresh": 0,
        "zones": {
            "red": {
                "audiences": ["billing"],
                "resources": ["http://billing.red.internal"],
                "scopes": ["billing:read", "billing:write"],
                "token_lifetime": 300,
                "claims": {"sub": "sub", "copy": ["email"]},
            },
            "green": {
                "audiences": ["orders"],
                "scopes": ["orders:read"],
                "token_lifetime": 120,
            },
        },
        "clients": [
            {
                "client_id": "shop-frontend",
                "client_secret": "s3cret-shop",
                "zones": ["red", "green"],
                "scopes": ["billing:read", "orders:read"],
            },
            {
                "client_id": "reports",
                "client_secret": "s3cret-reports",
                "zones": ["green"],
                "scopes": ["orders:read"],
                "default_zone": "green",
            },
        ],
    }
    document.update(overrides)
    return document


def exchange_config(op: DevOpenIDProvider, **overrides: Any) -> ExchangeConfig:
    """The parsed form of ``exchange_document``."""
    return parse_exchange_config(exchange_document(op, **overrides), Path.cwd())


@pytest.fixture
async def core(op: DevOpenIDProvider) -> AsyncIterator[ExchangeCore]:
    """An exchange core trusting ``op``, on the real clock."""
    c = build_core(exchange_config(op))
    yield c
    await c.close()


@pytest.fixture
def now() -> float:
    """The current time, for tokens minted by ``op`` against the real-clock core."""
    return time.time()


# -- the secrets scan: every log line and every metric of the whole session ---------------------


class HandlerTestServer(BaseTestServer):
    """A handler served as ``zonegate`` serves its proxy and authz listeners: on aiohttp's
    low-level server, with ``app``'s lifecycle around it (``runtime.serving.HandlerRunner``)."""

    def __init__(self, app: web.Application, handler: RawHandler, **kwargs: Any) -> None:
        super().__init__(host="127.0.0.1", **kwargs)
        self.app, self._handler = app, handler

    async def _make_runner(self, **kwargs: Any) -> HandlerRunner:
        return proxy_runner(self.app, self._handler, **kwargs)


@pytest.fixture
async def proxy_server() -> AsyncIterator[Callable[..., Any]]:
    """``await proxy_server(proxy_app)``: serve a sidecar's proxy listener (``build_sidecar``)
    on 127.0.0.1 as ``zonegate sidecar`` does; ``proxy_server(app, handler)`` serves another
    low-level handler (the authz listener's) with ``app``'s lifecycle."""
    servers: list[HandlerTestServer] = []

    async def serve(app: web.Application, handler: RawHandler | None = None) -> HandlerTestServer:
        server = HandlerTestServer(app, handler or proxy_handler(app))
        await server.start_server()
        servers.append(server)
        return server

    yield serve
    for server in reversed(servers):
        await server.close()
