"""The exchange server's admin listener: health and metrics off the token listener."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.server.app import create_admin_app, create_app
from runtime.configload import ConfigError
from tests.conftest import exchange_document
from tests.programs import Program, free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
OPERATOR_PATHS = ("/metrics", "/healthz", "/readyz")


async def token_request(session: aiohttp.ClientSession, base: str, op: DevOpenIDProvider) -> int:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": op.mint(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "billing",
    }
    basic = base64.b64encode(b"shop-frontend:s3cret-shop").decode()
    async with session.post(
        f"{base}/token", data=form, headers={"Authorization": f"Basic {basic}"}
    ) as r:
        return r.status


async def test_with_admin_listen_metrics_and_health_leave_the_token_listener(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory
) -> None:
    """With admin_listen, /metrics /healthz /readyz answer 404 where /token is served and 200 on
    the admin listener, whose metrics count the exchanges of the token listener."""
    config = parse_exchange_config(exchange_document(op, admin_listen="127.0.0.1:0"), Path.cwd())
    app = create_app(config)
    token_server = await aiohttp_server(app, host="127.0.0.1")
    admin_server = await aiohttp_server(create_admin_app(app), host="127.0.0.1")
    token_base = str(token_server.make_url("")).rstrip("/")
    admin_base = str(admin_server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        assert await token_request(session, token_base, op) == 200
        for path in OPERATOR_PATHS:
            async with session.get(token_base + path) as r:
                assert r.status == 404, path
            async with session.get(admin_base + path) as r:
                assert r.status == 200, path
        async with session.get(f"{admin_base}/metrics") as r:
            assert 'zonegate_exchange_requests_total{client="shop-frontend"' in await r.text()
        async with session.get(f"{token_base}/zones/red/jwks.json") as r:
            assert r.status == 200  # what resource servers fetch stays where they find it
        async with session.get(f"{admin_base}/token") as r:
            assert r.status == 404


async def test_without_admin_listen_one_listener_serves_everything(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory
) -> None:
    """Without admin_listen the token listener keeps /metrics, /healthz and /readyz."""
    app = create_app(parse_exchange_config(exchange_document(op), Path.cwd()))
    server = await aiohttp_server(app, host="127.0.0.1")
    async with aiohttp.ClientSession() as session:
        for path in OPERATOR_PATHS:
            async with session.get(server.make_url(path)) as r:
                assert r.status == 200, path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:8081", "admin_listen: must differ from listen"),
        ("nowhere", "admin_listen: must be host:port"),
    ],
)
def test_admin_listen_is_checked_at_load(op: DevOpenIDProvider, value: str, message: str) -> None:
    """An admin_listen equal to listen, or not host:port, is a config error naming the key."""
    document = exchange_document(op, listen="127.0.0.1:8081", admin_listen=value)
    with pytest.raises(ConfigError) as refused:
        parse_exchange_config(document, Path.cwd())
    assert any(message in error for error in refused.value.errors), refused.value.errors


async def test_the_program_serves_both_listeners(op: DevOpenIDProvider, tmp_path: Path) -> None:
    """`zonegate exchange` with admin_listen listens twice; probes and scrapes go to admin."""
    port, admin_port = free_port(), free_port()
    document = exchange_document(
        op, listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}"
    )
    path = tmp_path / "exchange.yaml"
    path.write_text(yaml.safe_dump(document))
    program = Program(("exchange", "--config", str(path)))
    try:
        await program.start()
        async with asyncio.timeout(15):
            while len(program.listening()) < 2:
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 404
            assert await token_request(session, f"http://127.0.0.1:{port}", op) == 200
    finally:
        await program.stop()
