"""The session-wide secrets scan (tests/conftest.py) finds what it must, and sees real traffic."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web

from devkit.provider import DevOpenIDProvider
from exchange.keys import generate_private_key, private_key_pem, signing_key
from exchange.server.metrics import ExchangeMetrics
from tests.conftest import ServerFactory
from tests.logchecks import SCAN, SecretScan, private_members


def leaks_in(text: str, scan: SecretScan) -> list[str]:
    scan.texts.clear()
    scan.add("test", text)
    return scan.leaks()


@pytest.fixture
def scan() -> SecretScan:
    """A scan of its own, so these checks cannot disturb the session's."""
    return SecretScan()


def test_a_whole_token_or_any_jwt_is_a_leak(scan: SecretScan, op: DevOpenIDProvider) -> None:
    """A registered token, one never registered, or its signature alone are all found."""
    token = op.mint()
    scan.token(token)
    assert leaks_in(f'{{"msg": "got {token}"}}', scan)
    assert leaks_in("Bearer " + DevOpenIDProvider().mint(), scan)  # JWT shape, unregistered
    assert leaks_in("sig=" + token.split(".")[2], scan)


def test_a_truncated_payload_is_a_leak(scan: SecretScan, op: DevOpenIDProvider) -> None:
    """The first 32+ characters of a token's payload, cut short by a log, still count."""
    token = op.mint({"sub": "carol"})
    scan.token(token)
    assert leaks_in("payload " + token.split(".")[1][:40] + "...", scan)


def test_configured_secrets_and_private_keys(scan: SecretScan) -> None:
    """Client secrets, PEM private keys and a key's private JWK member are found."""
    scan.secret("s3cret-value")
    scan.secret("short")  # too common to search for: ignored
    assert leaks_in("client_secret=s3cret-value", scan)
    assert leaks_in("went short of time", scan) == []
    key = generate_private_key("ES256")
    assert leaks_in(private_key_pem(key).decode(), scan)
    (d,) = private_members(key)
    scan.segment(d)
    assert leaks_in(f"key d={d}", scan)


def test_clean_lines_pass(scan: SecretScan, op: DevOpenIDProvider) -> None:
    """Ordinary log lines, subject hashes and metrics are not mistaken for leaks."""
    scan.token(op.mint())
    scan.secret("s3cret-value")
    clean = (
        '{"level": "info", "logger": "zonegate.audit", "subject": "3f2a9c01b2d4", '
        '"client": "shop-frontend", "outcome": "invalid_request"}\n'
        'zonegate_exchange_requests_total{client="shop-frontend",outcome="ok",zone="red"} 1.0'
    )
    assert leaks_in(clean, scan) == []


async def test_the_session_scan_records_logs_metrics_and_secrets(
    aiohttp_server: ServerFactory, op: DevOpenIDProvider
) -> None:
    """Log lines of a real server, minted tokens, key material and new registries reach the scan."""
    before = len(SCAN.texts)
    token = op.mint()
    assert token.split(".")[2] in SCAN.segments  # DevOpenIDProvider.mint is recorded
    key = signing_key(generate_private_key("ES256"))
    assert set(private_members(key.private_key)) <= SCAN.segments
    ExchangeMetrics()  # its registry is exposed into the scan when this test ends

    async def hello(request: web.Request) -> web.Response:
        logging.getLogger("zonegate.test").info("hello answered")
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    server = await aiohttp_server(app, host="127.0.0.1")
    async with aiohttp.ClientSession() as session, session.get(str(server.make_url("/"))) as r:
        assert r.status == 200
    assert any("hello answered" in text for _, text in SCAN.texts[before:])
