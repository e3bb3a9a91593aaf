"""The authz listener: Envoy ext_authz and nginx auth_request decide through the sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from devkit.provider import DevOpenIDProvider
from sidecar.app import authz_listener
from sidecar.config import parse_sidecar_config
from sidecar.exchanger import EmbeddedExchanger, build_exchanger
from tests.test_sidecar import (
    Backend,
    CountedCore,
    Running,
    ServerFactory,
    counted_exchangers,
    sidecar_document,
    start_sidecar,
)


@dataclass
class Authz:
    """A sidecar (proxy and admin) plus its authz listener, on 127.0.0.1."""

    running: Running
    server: TestServer
    red_port: int

    def url(self, path: str) -> URL:
        """The listener's URL for ``path`` exactly as written (no dot segments resolved)."""
        return URL(f"http://127.0.0.1:{self.server.port}{path}", encoded=True)

    async def check(
        self, path: str, *, method: str = "GET", host: str = "127.0.0.1", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        async with self.running.session.request(
            method, self.url(path), headers={"Host": host, **headers}
        ) as r:
            return r.status, dict(r.headers), await r.read()


async def start_authz(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    session: aiohttp.ClientSession,
    extra_routes: Sequence[dict[str, Any]] = (),
) -> Authz:
    """The sidecar of ``tests.test_sidecar`` plus authz-only routes and the authz listener;
    exchangers of routes with their own exchange are the real ones."""
    red, green = Backend("red"), Backend("green")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    green_server = await aiohttp_server(green.app(), host="127.0.0.1")
    document = sidecar_document(
        op, str(red_server.make_url("")).rstrip("/"), str(green_server.make_url("/v1"))
    )
    document["routes"].append(
        {"name": "authz-only", "host": "ledger.red.internal", "audience": "billing"}
    )
    document["routes"][:0] = extra_routes  # first: they win over the broader routes
    document["authz_listen"] = "127.0.0.1:0"
    config = parse_sidecar_config(document, Path.cwd())
    exchangers = counted_exchangers(config)
    counted = next(iter(exchangers.values()))
    for route in config.routes:
        settings = config.exchange_for(route)
        if settings.identity not in exchangers:
            exchangers[settings.identity] = build_exchanger(settings)
    proxy, admin, sidecar = await start_sidecar(config, aiohttp_server, proxy_server, exchangers)
    listener = authz_listener(sidecar, "127.0.0.1", 0)  # served as `zonegate sidecar` serves it
    server = await proxy_server(listener.app, listener.handler)
    assert isinstance(counted, EmbeddedExchanger) and isinstance(counted.core, CountedCore)
    running = Running(proxy, admin, sidecar, red, green, op, counted.core, session)
    assert red_server.port is not None
    return Authz(running, server, red_server.port)


@pytest.fixture
async def authz(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, proxy_server: ServerFactory
) -> AsyncIterator[Authz]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield await start_authz(op, aiohttp_server, proxy_server, session)


async def test_allowed_check_carries_the_zone_token_and_what_to_remove(authz: Authz) -> None:
    """200 with no body, the zone token in Authorization and every dropped header named,
    never authorization; the token verifies against the zone's JWKS."""
    subject = authz.running.op.login("alice")
    status, headers, body = await authz.check(
        "/check/red/items?id=7",
        method="POST",
        Authorization=f"Bearer {subject}",
        X_Forwarded_User="admin",
        Cookie=f"session=1; copy={subject}",
        X_Request_Id="r1",
    )
    assert (status, body) == (200, b"")
    assert headers["Authorization"] != f"Bearer {subject}"
    claims = await authz.running.zone_claims(headers["Authorization"][7:], "red", "billing")
    assert claims["sub"] == "alice"
    assert headers["x-envoy-auth-headers-to-remove"] == "cookie,x-forwarded-user"


async def test_checks_and_proxied_calls_share_one_cache(authz: Authz) -> None:
    """A token exchanged for a check serves the proxy too, and 20 concurrent checks make one
    exchange (single flight)."""
    subject = authz.running.op.login("bob")
    answers = await asyncio.gather(
        *(authz.check("/check/red/x", Authorization=f"Bearer {subject}") for _ in range(20))
    )
    assert {a[0] for a in answers} == {200}
    assert len({a[1]["Authorization"] for a in answers}) == 1
    async with authz.running.session.get(
        authz.running.url("/red/x"), headers=authz.running.bearer(subject)
    ) as r:
        assert r.status == 201
    assert authz.running.counted.calls == 1


@pytest.mark.parametrize(
    ("path", "host", "token", "status", "error"),
    [
        ("/check/red/x", "127.0.0.1", None, 401, "invalid_request"),
        ("/check/red/x", "127.0.0.1", "not-a-jwt", 401, "invalid_token"),
        ("/check/write/x", "127.0.0.1", "alice", 403, "invalid_scope"),
        ("/check/nowhere", "127.0.0.1", "alice", 403, "access_denied"),
        ("/check/x", "evil.example", "alice", 403, "access_denied"),
        ("/other/red/x", "127.0.0.1", "alice", 403, "access_denied"),
        ("/check/red/..%2f..%2fsecret", "127.0.0.1", "alice", 400, "invalid_request"),
        ("/check/green/..;/x", "127.0.0.1", "alice", 400, "invalid_request"),
        ("/check/red/../../secret", "127.0.0.1", "alice", 400, "invalid_request"),
        ("/check/red/%2e%2e/secret", "127.0.0.1", "alice", 403, "access_denied"),  # = /secret
        ("/check/red/x?access_token=abc", "127.0.0.1", "alice", 400, "invalid_request"),
    ],
)
async def test_refusals_are_the_proxys(
    authz: Authz, path: str, host: str, token: str | None, status: int, error: str
) -> None:
    """Each refusal has the proxy's status, JSON body and challenge; escapes and unknown
    hosts are refused as the proxy refuses them; no route is 403."""
    headers = {}
    if token is not None:
        value = authz.running.op.login("alice") if token == "alice" else token
        headers["Authorization"] = f"Bearer {value}"
    got, answer, body = await authz.check(path, host=host, **headers)
    assert (got, json.loads(body)["error"]) == (status, error)
    assert "Authorization" not in answer
    if status == 401:
        assert answer["WWW-Authenticate"].startswith("Bearer")


async def test_forward_route_without_token_is_allowed_without_authorization(authz: Authz) -> None:
    """missing_token: forward answers 200 and sets no Authorization."""
    status, headers, _ = await authz.check("/check/public/x")
    assert status == 200 and "Authorization" not in headers


async def test_authz_only_route_serves_checks_not_the_proxy(authz: Authz) -> None:
    """A route without upstream answers checks; the proxy listener refuses its calls with a
    403 that says why, before any exchange, in both target forms."""
    subject = authz.running.op.login("alice")
    status, _, _ = await authz.check(
        "/check/", host="ledger.red.internal", Authorization=f"Bearer {subject}"
    )
    assert status == 200
    calls = authz.running.counted.calls
    async with authz.running.session.get(
        authz.running.url("/"),
        headers={"Host": "ledger.red.internal", **authz.running.bearer(subject)},
    ) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (403, "access_denied")
        assert "'authz-only' has no upstream" in body["error_description"]
    async with authz.running.session.get(
        "http://ledger.red.internal/x",
        proxy=authz.running.url("/"),
        headers=authz.running.bearer(subject),
    ) as r:
        assert r.status == 403 and "has no upstream" in (await r.json())["error_description"]
    assert authz.running.counted.calls == calls


async def test_checks_are_counted_by_route_and_outcome(authz: Authz) -> None:
    """zonegate_sidecar_authz_checks_total counts allowed checks and refusals by code."""
    subject = authz.running.op.login("alice")
    await authz.check("/check/red/x", Authorization=f"Bearer {subject}")
    await authz.check("/check/nowhere", Authorization=f"Bearer {subject}")
    async with authz.running.session.get(authz.running.admin_url("/metrics")) as r:
        text = await r.text()
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "zonegate_sidecar_authz_checks_total"
    }
    assert samples[(("outcome", "allowed"), ("route", "red-reverse"))] == 1
    assert samples[(("outcome", "access_denied"), ("route", "none"))] == 1
