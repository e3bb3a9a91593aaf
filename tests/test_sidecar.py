"""The sidecar end to end, embedded mode: real IdP, sidecar, upstreams and clients on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import requests
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from devkit.provider import DevOpenIDProvider
from exchange.core import ExchangeCore
from exchange.server.fetcher import HttpFetcher
from exchange.server.wiring import build_core
from exchange.tokens import TokenExchangeRequest, TokenResponse
from runtime.telemetry import version
from sidecar.app import SIDECAR, Sidecar, build_sidecar
from sidecar.config import EmbeddedExchange, SidecarConfig, parse_sidecar_config
from sidecar.exchanger import EmbeddedExchanger, Exchanger
from tests.conftest import exchange_document

ServerFactory = Callable[..., Awaitable[TestServer]]
CHUNK = 64 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)
EXCHANGE_ISSUER = "http://127.0.0.1:8081"


# -- an upstream that records what it saw ------------------------------------------------------


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Backend:
    """A zone backend: records requests, answers 201 with distinctive headers, can refuse."""

    name: str
    seen: list[Seen] = field(default_factory=list)
    refuse: int = 0  # answer 401 to this many requests
    delay: float = 0.0

    def app(self) -> web.Application:
        app = web.Application(handler_args={"auto_decompress": False})  # record the wire bytes
        app.router.add_route("*", "/upload", self.upload)
        app.router.add_get("/download/{size}", self.download)
        app.router.add_get("/ws", self.websocket)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    def authorization(self, i: int = -1) -> str:
        return self.seen[i].headers.get("Authorization", "")

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, request.headers, body))
        await asyncio.sleep(self.delay)
        if self.refuse:
            self.refuse -= 1
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        headers = CIMultiDict(
            [("X-Backend", self.name), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
        )
        headers["Content-Type"] = "application/x-zone"
        return web.Response(status=201, reason="Made", body=b"answer:" + body, headers=headers)

    async def upload(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.path_qs, request.headers, b""))
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def download(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // CHUNK):
            await response.write(PATTERN)
        await response.write_eof()
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(Seen(request.method, request.path_qs, request.headers, b""))
        ws = web.WebSocketResponse(protocols=("zone.v1",))
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{message.data}")
        return ws


# -- a real core, counted ---------------------------------------------------------------------


class CountedCore(ExchangeCore):
    """The real exchange core, counting the exchanges asked of it."""

    calls = 0

    async def exchange(self, request: TokenExchangeRequest, **kwargs: Any) -> TokenResponse:
        self.calls += 1
        return await super().exchange(request, **kwargs)


# -- the running sidecar -----------------------------------------------------------------------


@dataclass
class Running:
    """A sidecar served on 127.0.0.1 with its backends and IdP."""

    proxy: TestServer
    admin: TestServer
    sidecar: Sidecar
    red: Backend
    green: Backend
    op: DevOpenIDProvider
    counted: CountedCore
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.proxy.make_url(path))

    def admin_url(self, path: str) -> str:
        return str(self.admin.make_url(path))

    def bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def zone_claims(self, token: str, zone: str, audience: str) -> dict[str, Any]:
        """Verify a token as the zone's PEP does: the zone JWKS over HTTP, the zone issuer."""
        async with self.session.get(self.admin_url(f"/zones/{zone}/jwks.json")) as r:
            jwks = jwt.PyJWKSet.from_dict(await r.json())
        kid = jwt.get_unverified_header(token)["kid"]
        key = next(k for k in jwks.keys if k.key_id == kid)
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[key.algorithm_name],
            audience=audience,
            issuer=f"{EXCHANGE_ISSUER}/zones/{zone}",
        )
        return claims


def sidecar_document(op: DevOpenIDProvider, red: str, green: str) -> dict[str, Any]:
    """An embedded-mode sidecar config routing to the red and green backends."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "exchange": {"mode": "embedded", "client_id": "shop-frontend", "core": exchange_document(op)},
        "upstream": {"connect_timeout": 1, "read_timeout": 1},
        "routes": [
            {"name": "red", "host": "billing.red.internal", "upstream": red, "audience": "billing", "scope": "billing:read"},
            {"name": "green", "path_prefix": "/green/", "strip_prefix": True, "upstream": green, "audience": "orders"},
            {"name": "public", "path_prefix": "/public/", "upstream": red, "audience": "billing", "missing_token": "forward"},
            {"name": "write", "path_prefix": "/write/", "upstream": red, "audience": "billing", "scope": "billing:write"},
            {"name": "red-reverse", "path_prefix": "/red/", "strip_prefix": True, "upstream": red, "audience": "billing", "scope": "billing:read"},
            {"name": "dead", "path_prefix": "/dead/", "upstream": closed_port_url(), "audience": "billing"},
        ],
    }  # fmt: skip


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


async def start_sidecar(
    config: SidecarConfig,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    exchangers: dict[str, Exchanger],
) -> tuple[TestServer, TestServer, Sidecar]:
    """Serve a sidecar's two apps on 127.0.0.1 and wait for /readyz."""
    proxy_app, admin_app = build_sidecar(config, exchangers=exchangers)
    admin = await aiohttp_server(admin_app, host="127.0.0.1")
    proxy = await proxy_server(proxy_app)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, str(admin.make_url("/readyz")))
    return proxy, admin, proxy_app[SIDECAR]


def counted_exchangers(config: SidecarConfig) -> dict[str, Exchanger]:
    """The config's embedded exchanger around a counted core."""
    settings = config.exchange
    assert isinstance(settings, EmbeddedExchange)
    base = build_core(settings.core, keys=settings.keys)
    core = CountedCore(
        settings.core,
        keys=base.keys,
        fetcher=HttpFetcher(settings.core.fetch_timeout),
        clock=time.time,
    )
    exchanger = EmbeddedExchanger(settings, core=core)
    return {settings.identity: exchanger}


@pytest.fixture
async def running(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, proxy_server: ServerFactory
) -> AsyncIterator[Running]:
    red, green = Backend("red"), Backend("green")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    green_server = await aiohttp_server(green.app(), host="127.0.0.1")
    document = sidecar_document(
        op, str(red_server.make_url("")).rstrip("/"), str(green_server.make_url("/v1"))
    )
    config = parse_sidecar_config(document, Path.cwd())
    exchangers = counted_exchangers(config)
    proxy, admin, sidecar = await start_sidecar(config, aiohttp_server, proxy_server, exchangers)
    counted = next(iter(exchangers.values()))
    assert isinstance(counted, EmbeddedExchanger) and isinstance(counted.core, CountedCore)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield Running(proxy, admin, sidecar, red, green, op, counted.core, session)


# -- the exchange on the way through -----------------------------------------------------------


async def test_upstream_sees_zone_token_never_the_original(running: Running) -> None:
    """Upstream gets a zone token (valid against the zone JWKS), the app's headers and body."""
    subject = running.op.login("alice")
    headers = CIMultiDict(
        [("Authorization", f"Bearer {subject}"), ("X-App", "one"), ("X-App", "two"),
         ("Content-Type", "text/plain"), ("X-Forwarded-User", "admin"), ("X-Auth-Request-Email", "x@y"),
         ("Connection", "keep-alive, X-Hop"), ("X-Hop", "drop me"), ("Accept-Encoding", "gzip")]
    )  # fmt: skip
    async with running.session.post(
        running.url("/red/items?id=7&x=%20"), data=b"hello body", headers=headers
    ) as r:
        body = await r.read()
        assert (r.status, r.reason, body) == (201, "Made", b"answer:hello body")
        assert r.headers["X-Backend"] == "red"
        assert r.headers["Content-Type"] == "application/x-zone"
        assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    seen = running.red.seen[-1]
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/items?id=7&x=%20", b"hello body")
    assert seen.headers.getall("X-App") == ["one", "two"]
    assert seen.headers["Content-Type"] == "text/plain"
    assert seen.headers["Accept-Encoding"] == "gzip"
    assert seen.headers["Content-Length"] == "10"
    for dropped in ("X-Forwarded-User", "X-Auth-Request-Email", "X-Hop"):
        assert dropped not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == running.proxy.make_url("").authority
    host = running.proxy.make_url("").authority
    assert seen.headers["Forwarded"] == f'for=127.0.0.1;proto=http;host="{host}"'
    assert subject not in json.dumps(dict(seen.headers))
    scheme, zone_token = running.red.authorization().split(" ")
    assert scheme == "Bearer"
    claims = await running.zone_claims(zone_token, "red", "billing")
    assert (claims["sub"], claims["email"], claims["scope"]) == (
        "alice",
        "alice@example.com",
        "billing:read",
    )


SPOOFED = [
    "X_Forwarded_User", "X_Remote_User", "Remote_User", "X_Auth_Request_User", "X-Webauth-User",
    "X-Authenticated-Userid", "X-Consumer-Username", "X-Consumer-Custom-Id",
    "Cf-Access-Jwt-Assertion", "Cf-Access-Authenticated-User-Email", "X-Pomerium-Claim-Email",
    "X-Pomerium-Jwt-Assertion", "X-SSL-Client-S-DN", "X_Ssl_Client_Verify", "Ssl-Client-Cert",
    "Client-Cert", "Client-Cert-Chain", "X-Client-Cert", "X-SSL-Cert", "X-ARR-ClientCert",
    "X-Amzn-Mtls-Clientcert", "OIDC_CLAIM_email", "OIDC-Access-Token", "Remote-Groups",
    "X-MS-TOKEN-AAD-ACCESS-TOKEN", "Tailscale-User-Login", "X-Vouch-User", "X-Auth-User",
    "X-Credential-Identifier", "X-Authenticated-Scope", "X-Anonymous-Consumer",
    "X-Original-URL", "X-Rewrite-URL",
]  # fmt: skip


async def test_identity_headers_are_dropped_in_every_spelling(running: Running) -> None:
    """Spoofable identity headers are dropped, also spelled with '_' for '-'; others pass."""
    subject = running.op.login("alice")
    headers = {**running.bearer(subject), **dict.fromkeys(SPOOFED, "admin"), "X_App_Id": "7"}
    async with running.session.get(running.url("/red/x"), headers=headers) as r:
        assert r.status == 201
    seen = running.red.seen[-1].headers
    assert [name for name in SPOOFED if name in seen] == []
    assert seen["X_App_Id"] == "7"


async def test_a_copy_of_the_subject_token_in_another_header_is_dropped(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A header holding the original token is dropped, with a warning naming only the header."""
    subject = running.op.login("alice")
    headers = CIMultiDict(
        [*running.bearer(subject).items(), ("X-Other-Token", subject), ("X-App", "kept"),
         ("Cookie", f"a=1; session={subject}; b=2"), ("X-Copy", subject), ("X-Copy", "too")]
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="zonegate.sidecar"):
        async with running.session.get(running.url("/red/x"), headers=headers) as r:
            assert r.status == 201
    seen = running.red.seen[-1].headers
    assert [name for name in ("X-Other-Token", "Cookie", "X-Copy") if name in seen] == []
    assert seen["X-App"] == "kept"
    assert subject not in json.dumps(list(seen.items()))
    warned = [str(r.__dict__.get("header")) for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(warned) == ["Cookie", "X-Copy", "X-Other-Token"]


async def test_reverse_mode_strips_the_prefix_onto_the_upstream_path(running: Running) -> None:
    """/green/x goes to the green upstream's base path + /x with a green token."""
    subject = running.op.login("bob")
    async with running.session.get(
        running.url("/green/orders/1"), headers=running.bearer(subject)
    ) as r:
        assert r.status == 201
    assert running.green.seen[-1].path_qs == "/v1/orders/1"
    token = running.green.authorization().removeprefix("Bearer ")
    assert (await running.zone_claims(token, "green", "orders"))["sub"] == "bob"


async def test_forward_mode_with_http_proxy_from_the_environment(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests, configured only by HTTP_PROXY, reaches the upstream through the sidecar."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", running.url(""))
    monkeypatch.setenv("http_proxy", running.url(""))
    subject = running.op.login("alice")

    def call() -> requests.Response:
        return requests.post(
            "http://billing.red.internal/pay?amount=3",
            data=b"payload",
            headers={"Authorization": f"Bearer {subject}", "X-App": "kept"},
            timeout=5,
        )

    answer = await asyncio.to_thread(call)
    assert (answer.status_code, answer.content) == (201, b"answer:payload")
    assert answer.headers["X-Backend"] == "red"
    seen = running.red.seen[-1]
    assert (seen.path_qs, seen.headers["X-App"]) == ("/pay?amount=3", "kept")
    assert seen.headers["X-Forwarded-Host"] == "billing.red.internal"
    token = running.red.authorization().removeprefix("Bearer ")
    assert (await running.zone_claims(token, "red", "billing"))["sub"] == "alice"


async def test_head_gets_the_upstream_headers_and_no_body(running: Running) -> None:
    """HEAD is relayed: the upstream's status and Content-Length, no body."""
    subject = running.op.login("alice")
    async with running.session.head(running.url("/red/x"), headers=running.bearer(subject)) as r:
        assert (r.status, r.headers["Content-Length"], await r.read()) == (201, "7", b"")
    assert running.red.seen[-1].method == "HEAD"


async def test_a_16_kib_subject_token_passes(running: Running) -> None:
    """Header limits are raised: a 16 KiB JWT gets through the proxy listener."""
    subject = running.op.mint({"padding": "p" * 11500})
    assert 15 * 1024 < len(subject) <= 16 * 1024
    async with running.session.get(running.url("/red/big"), headers=running.bearer(subject)) as r:
        assert r.status == 201


GZIP_BODY = gzip.compress(b'{"a": 1}' * 50)


async def one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


@pytest.mark.usefixtures("no_crash")
@pytest.mark.parametrize(
    ("encoding", "body", "chunked"),
    [
        ("gzip", GZIP_BODY, False),
        ("gzip", GZIP_BODY, True),
        ("deflate", zlib.compress(b"deflated " * 40), False),
        ("br", bytes(range(256)), False),  # any bytes: the sidecar must not look inside
        ("gzip", b"\x1f\x8b\x08 this is not gzip", False),
    ],
    ids=["gzip", "gzip-chunked", "deflate", "br", "invalid-gzip"],
)
async def test_request_bodies_with_content_encoding_pass_untouched(
    running: Running, encoding: str, body: bytes, chunked: bool
) -> None:
    """An encoded request body reaches the upstream byte for byte, its Content-Encoding kept."""
    subject = running.op.login("alice")
    headers = {**running.bearer(subject), "Content-Encoding": encoding}
    data = one_chunk(body) if chunked else body
    async with running.session.post(running.url("/red/x"), data=data, headers=headers) as r:
        assert (r.status, await r.read()) == (201, b"answer:" + body)
    seen = running.red.seen[-1]
    assert (seen.body, seen.headers["Content-Encoding"]) == (body, encoding)
    assert seen.headers.get("Content-Length") == (None if chunked else str(len(body)))


# -- refusals ----------------------------------------------------------------------------------


async def error_of(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    assert set(body) == {"error", "error_description"}
    return str(body["error"])


@pytest.mark.parametrize(
    ("method", "target", "host", "status"),
    [
        ("GET", "/nowhere", None, 404),
        ("GET", "http://evil.example/", None, 403),
        ("CONNECT", "billing.red.internal:443", "billing.red.internal:443", 405),
        ("GET", "/green/..%2f..%2fred", None, 400),
    ],
)
async def test_requests_the_sidecar_refuses(
    running: Running, method: str, target: str, host: str | None, status: int
) -> None:
    """No route, an absolute-form target to anywhere, CONNECT and path tricks are refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy.port)
    host_header = host or "127.0.0.1"
    writer.write(
        f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    assert set(json.loads(body)) == {"error", "error_description"}
    if status == 405:
        assert b"tunnel" in body
    assert running.red.seen == [] and running.green.seen == []


async def test_missing_token_rejected_or_forwarded_per_route(running: Running) -> None:
    """No token: 401 with a Bearer challenge, or forwarded without Authorization when allowed."""
    async with running.session.get(running.url("/red/x")) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with running.session.get(running.url("/public/x"), headers={"X-App": "1"}) as r:
        assert r.status == 201
    assert "Authorization" not in running.red.seen[-1].headers
    assert running.counted.calls == 0


async def raw_exchange(port: int | None, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw request bytes (Connection: close); the status and the JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


MALFORMED_AUTHORIZATION = [
    "Authorization: Bearer {t}\r\nAuthorization: Bearer {t}",
    "Authorization: Bearer {t}\r\nAuthorization: Basic eDp5",
    "Authorization: bearer\t{t}",
    "Authorization: Token {t}",
    "Authorization: Basic eDp5",
    "Authorization: Bearer",
    "Authorization: Bearer {t} extra",
    "Authorization: ",
]


@pytest.mark.parametrize("route", ["/red/x", "/public/x"])
@pytest.mark.parametrize("authorization", MALFORMED_AUTHORIZATION)
async def test_a_malformed_or_repeated_authorization_is_400_on_every_route(
    running: Running, route: str, authorization: str
) -> None:
    """Not exactly one RFC 6750 Bearer credential: 400 invalid_request, nothing forwarded,
    on a missing_token: forward route too (where copies of the token would otherwise go on)."""
    subject = running.op.login("alice")
    request = (
        f"GET {route} HTTP/1.1\r\nHost: 127.0.0.1\r\n{authorization.format(t=subject)}\r\n"
        f"Cookie: session={subject}\r\nX-Copy: {subject}\r\nConnection: close\r\n\r\n"
    )
    status, body = await raw_exchange(running.proxy.port, request.encode())
    assert (status, body["error"]) == (400, "invalid_request")
    assert "Authorization" in body["error_description"]
    assert subject not in json.dumps(body)
    assert running.red.seen == [] and running.counted.calls == 0


TOKEN_IN_TARGET = [
    ("GET /red/x?access_token={t} HTTP/1.1", "query"),
    ("GET /red/x?a=1&access_token={t}&b=2 HTTP/1.1", "query"),
    ("GET /red/{t} HTTP/1.1", "path"),
    ("GET /red/x/{t}/y HTTP/1.1", "path"),
    ("GET /red/x?next=%2Fa%3Ftoken%3D{t} HTTP/1.1", "query"),
    ("GET /green/{t} HTTP/1.1", "path"),
    ("GET /public/{t} HTTP/1.1", "path"),
    ("GET http://billing.red.internal/x?access_token={t} HTTP/1.1", "query"),
    ("GET http://billing.red.internal/{t} HTTP/1.1", "path"),
]


@pytest.mark.parametrize(("request_line", "where"), TOKEN_IN_TARGET)
async def test_a_request_target_holding_the_subject_token_is_400_never_forwarded(
    running: Running, request_line: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The token in the path or query (RFC 6750 §2.3), reverse or forward mode: 400 saying
    why; a URL lands in every access log on its way, so it is never forwarded."""
    # The test servers' aiohttp access lines quote the URL: off, as in the programs (logsetup).
    caplog.set_level(logging.WARNING, logger="aiohttp.access")
    subject = running.op.login("alice")
    request = (
        f"{request_line.format(t=subject)}\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {subject}\r\nConnection: close\r\n\r\n"
    )
    status, body = await raw_exchange(running.proxy.port, request.encode())
    assert (status, body["error"]) == (400, "invalid_request")
    assert f"request {where} holds the bearer token" in body["error_description"]
    assert subject not in json.dumps(body)
    assert running.red.seen == [] and running.green.seen == []
    assert running.counted.calls == 0


@pytest.mark.parametrize(
    "target",
    ["/public/x?access_token=abc", "/red/x?Access_Token=abc", "/red/x?access%5Ftoken=abc"],
)
async def test_an_access_token_query_parameter_is_400_even_without_authorization(
    running: Running, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6750 §2.3's carrier is refused on any route: it would carry a token in the URL."""
    caplog.set_level(logging.WARNING, logger="aiohttp.access")
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    status, body = await raw_exchange(running.proxy.port, request.encode())
    assert (status, body["error"]) == (400, "invalid_request")
    assert "access_token" in body["error_description"]
    assert running.red.seen == []


async def test_refused_subject_token_is_401_invalid_token_and_not_retried(running: Running) -> None:
    """A subject the exchange refuses is 401 invalid_token; retries hit the negative cache."""
    expired = running.op.mint({"exp": int(time.time()) - 3600})
    for _ in range(3):
        async with running.session.get(running.url("/red/x"), headers=running.bearer(expired)) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
            assert await error_of(r) == "invalid_token"
    assert running.counted.calls == 1
    assert running.red.seen == []


async def test_config_refusal_is_403(running: Running) -> None:
    """A scope the client may not have is refused by the exchange: 403, nothing forwarded."""
    subject = running.op.login("alice")
    async with running.session.get(running.url("/write/x"), headers=running.bearer(subject)) as r:
        assert r.status == 403
        assert await error_of(r) == "invalid_scope"
    assert running.red.seen == []


# -- the cache through the proxy ---------------------------------------------------------------


async def test_200_sequential_requests_one_exchange(running: Running) -> None:
    """200 requests with one token make one exchange."""
    subject = running.op.login("alice")
    for _ in range(200):
        async with running.session.get(running.url("/red/x"), headers=running.bearer(subject)) as r:
            assert r.status == 201
    assert running.counted.calls == 1
    assert len({s.headers["Authorization"] for s in running.red.seen}) == 1


async def test_200_concurrent_first_requests_one_exchange(running: Running) -> None:
    """200 concurrent first requests with one new token make one exchange."""
    subject = running.op.login("bob")

    async def one() -> int:
        async with running.session.get(running.url("/red/x"), headers=running.bearer(subject)) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert set(statuses) == {201}
    assert running.counted.calls == 1


async def test_upstream_401_evicts_and_retries_once_with_a_fresh_exchange(running: Running) -> None:
    """An upstream 401 on a GET: one re-exchange and one retry; the app sees the 201."""
    subject = running.op.login("alice")
    running.red.refuse = 1
    async with running.session.get(running.url("/red/x"), headers=running.bearer(subject)) as r:
        assert r.status == 201
    assert running.counted.calls == 2
    assert running.red.authorization(0) != running.red.authorization(1)
    running.red.refuse = 2  # both attempts refused: the app sees the 401, no third try
    async with running.session.get(running.url("/red/y"), headers=running.bearer(subject)) as r:
        assert r.status == 401
    assert running.counted.calls == 3


async def test_upstream_401_on_a_request_with_a_body_is_not_retried(running: Running) -> None:
    """A streamed body cannot be replayed: the upstream's 401 goes back to the app."""
    subject = running.op.login("alice")
    running.red.refuse = 1
    async with running.session.post(
        running.url("/red/x"), data=b"once", headers=running.bearer(subject)
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert (running.counted.calls, len(running.red.seen)) == (1, 1)


# -- upstream failures -------------------------------------------------------------------------


async def test_upstream_unreachable_is_502_and_slow_is_504(running: Running) -> None:
    """Upstream connection refused: 502; upstream slower than read_timeout: 504."""
    subject = running.op.login("alice")
    async with running.session.get(running.url("/dead/x"), headers=running.bearer(subject)) as r:
        assert (r.status, await error_of(r)) == (502, "bad_gateway")
    running.red.delay = 3
    async with running.session.get(running.url("/red/slow"), headers=running.bearer(subject)) as r:
        assert (r.status, await error_of(r)) == (504, "gateway_timeout")


@dataclass
class Aborting:
    """An upstream that reads each whole request, then resets the connection unanswered."""

    deliveries: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        self.deliveries.append(head.split(b" ", 1)[0].decode())
        writer.transport.abort()


@dataclass
class AnswersOnceThenAborts(Aborting):
    """An upstream that answers its very first request (keep-alive), then reads every later
    request whole and resets the connection unanswered."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.deliveries:
            await reader.readuntil(b"\r\n\r\n")
            self.deliveries.append("first")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        await super().handle(reader, writer)


async def sidecar_in_front_of(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
) -> tuple[asyncio.Server, TestServer]:
    """A raw upstream answering with ``handle`` and a sidecar whose red routes go to it."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    document = sidecar_document(op, f"http://127.0.0.1:{port}", closed_port_url())
    config = parse_sidecar_config(document, Path.cwd())
    exchangers = counted_exchangers(config)
    proxy, _, _ = await start_sidecar(config, aiohttp_server, proxy_server, exchangers)
    return server, proxy


@pytest.mark.usefixtures("no_crash")
@pytest.mark.parametrize(
    ("method", "body", "deliveries"),
    [("GET", None, 2), ("PUT", None, 2), ("DELETE", None, 2), ("PUT", b"x", 1), ("POST", None, 1)],
)
async def test_a_request_a_pooled_connection_dropped_is_resent_once_if_idempotent(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    method: str,
    body: bytes | None,
    deliveries: int,
) -> None:
    """A kept-alive upstream connection reset before answering: 502, idempotent resent once."""
    upstream = AnswersOnceThenAborts()
    server, proxy = await sidecar_in_front_of(upstream.handle, op, aiohttp_server, proxy_server)
    headers = {"Authorization": f"Bearer {op.login('alice')}"}
    async with server, aiohttp.ClientSession() as session:
        async with session.get(proxy.make_url("/red/x"), headers=headers) as r:
            assert (r.status, await r.read()) == (200, b"ok")
        async with session.request(
            method, proxy.make_url("/red/x"), data=body, headers=headers
        ) as r:
            assert (r.status, await error_of(r)) == (502, "bad_gateway")
    assert upstream.deliveries == ["first"] + [method] * deliveries


@pytest.mark.usefixtures("no_crash")
@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("PUT", None), ("DELETE", None), ("PUT", b"x"), ("POST", None)],
)
async def test_a_request_a_new_connection_dropped_is_sent_once(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    method: str,
    body: bytes | None,
) -> None:
    """Upstream reads the request on a new connection and drops it: 502, never resent."""
    deliveries = 1
    upstream = Aborting()
    server, proxy = await sidecar_in_front_of(upstream.handle, op, aiohttp_server, proxy_server)
    headers = {"Authorization": f"Bearer {op.login('alice')}"}
    async with (
        server,
        aiohttp.ClientSession() as session,
        session.request(method, proxy.make_url("/red/x"), data=body, headers=headers) as r,
    ):
        assert (r.status, await error_of(r)) == (502, "bad_gateway")
    assert upstream.deliveries == [method] * deliveries


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_https_upstream_is_trusted_through_the_configured_ca_bundle(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    tmp_path: Path,
) -> None:
    """TLS to an https upstream is verified against upstream.ca_file; without it, 502."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    red = Backend("red")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1", ssl=server_tls)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    subject = op.login("alice")
    for ca_file, status in (("ca.pem", 201), (None, 502)):
        document = sidecar_document(op, f"https://127.0.0.1:{red_server.port}", closed_port_url())
        document["upstream"]["ca_file"] = ca_file
        config = parse_sidecar_config(document, tmp_path)
        proxy, _, _ = await start_sidecar(
            config, aiohttp_server, proxy_server, counted_exchangers(config)
        )
        async with aiohttp.ClientSession() as session:
            url = str(proxy.make_url("/red/x"))
            async with session.get(url, headers={"Authorization": f"Bearer {subject}"}) as r:
                assert r.status == status
    assert len(red.seen) == 1


# -- websocket ---------------------------------------------------------------------------------


async def test_websocket_upgrade_is_exchanged_and_relayed(running: Running) -> None:
    """A WebSocket through the sidecar: the handshake carries the zone token, messages relay."""
    subject = running.op.login("alice")
    async with running.session.ws_connect(
        running.url("/red/ws"), headers=running.bearer(subject), protocols=("zone.v1",)
    ) as ws:
        assert ws.protocol == "zone.v1"
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "red:ping"
    token = running.red.authorization().removeprefix("Bearer ")
    assert (await running.zone_claims(token, "red", "billing"))["sub"] == "alice"


async def test_a_websocket_subprotocol_holding_the_subject_token_is_not_offered_upstream(
    running: Running,
) -> None:
    """Sec-WebSocket-Protocol entries carrying the token are dropped; the others are offered."""
    subject = running.op.login("alice")
    protocols = (f"access_token.{subject}", "zone.v1")
    async with running.session.ws_connect(
        running.url("/red/ws"), headers=running.bearer(subject), protocols=protocols
    ) as ws:
        assert ws.protocol == "zone.v1"
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "red:ping"
    seen = running.red.seen[-1].headers
    assert seen["Sec-WebSocket-Protocol"] == "zone.v1"
    assert subject not in json.dumps(list(seen.items()))


# -- streaming ---------------------------------------------------------------------------------

PAYLOAD = 200 * 1024 * 1024


def vm_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


async def test_200_mb_up_and_down_stream_with_flat_memory(running: Running) -> None:
    """200 MB each way pass through while the process's peak RSS grows far less than that."""
    subject = running.op.login("alice")
    reset_peak_rss()
    baseline = vm_kib("VmRSS")
    sent = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(PAYLOAD // CHUNK):
            sent.update(PATTERN)
            yield PATTERN

    started = time.monotonic()
    async with running.session.post(
        running.url("/red/upload"), data=chunks(), headers=running.bearer(subject)
    ) as r:
        assert r.status == 200
        assert await r.json() == {"size": PAYLOAD, "sha256": sent.hexdigest()}
    received, size = hashlib.sha256(), 0
    async with running.session.get(
        running.url(f"/red/download/{PAYLOAD}"), headers=running.bearer(subject)
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(PAYLOAD)
        async for chunk in r.content.iter_chunked(CHUNK):
            received.update(chunk)
            size += len(chunk)
    assert (size, received.hexdigest()) == (PAYLOAD, sent.hexdigest())
    growth_mib = (vm_kib("VmHWM") - baseline) / 1024
    assert growth_mib < 40, f"peak RSS grew {growth_mib:.0f} MiB moving 2 x 200 MiB"
    assert time.monotonic() - started < 20


# -- admin listener ----------------------------------------------------------------------------


async def test_admin_health_readiness_and_zone_documents(running: Running) -> None:
    """healthz and readyz answer 200; the embedded zone issuer documents are served."""
    for path in ("/healthz", "/readyz"):
        async with running.session.get(running.admin_url(path)) as r:
            assert r.status == 200
    async with running.session.get(
        running.admin_url("/zones/red/.well-known/openid-configuration")
    ) as r:
        metadata = await r.json()
    assert metadata["issuer"] == f"{EXCHANGE_ISSUER}/zones/red"
    assert metadata["jwks_uri"].endswith("/zones/red/jwks.json")
    async with running.session.post(running.admin_url("/token")) as r:
        assert r.status == 404  # no token endpoint here ...
    assert "token_endpoint" not in metadata  # ... so none is advertised
    running.sidecar.readiness.drain()
    async with running.session.get(running.admin_url("/readyz")) as r:
        assert r.status == 503


async def test_metrics_have_pinned_names_and_pass_promtool(running: Running) -> None:
    """/metrics carries the pinned series and passes `promtool check metrics`."""
    subject = running.op.login("alice")
    for path in ("/red/x", "/red/x", "/nowhere"):
        async with running.session.get(running.url(path), headers=running.bearer(subject)) as r:
            await r.read()
    async with running.session.get(running.admin_url("/metrics")) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    expected = {
        ("zonegate_sidecar_requests_total", (("route", "red-reverse"), ("status", "201"))): 2,
        ("zonegate_sidecar_requests_total", (("route", "none"), ("status", "404"))): 1,
        ("zonegate_sidecar_request_duration_seconds_count", (("route", "red-reverse"),)): 2,
        ("zonegate_sidecar_token_cache_total", (("result", "hit"),)): 1,
        ("zonegate_sidecar_token_cache_total", (("result", "miss"),)): 1,
        ("zonegate_sidecar_token_cache_total", (("result", "coalesced"),)): 0,
        ("zonegate_sidecar_token_cache_evictions_total", (("reason", "upstream_401"),)): 0,
        ("zonegate_build_info", (("python", platform.python_version()), ("version", version()))): 1,
        ("zonegate_sidecar_token_cache_entries", ()): 1,
        ("zonegate_sidecar_exchanges_total", (("outcome", "ok"), ("zone", "red"))): 1,
        ("zonegate_sidecar_exchange_duration_seconds_count", (("mode", "embedded"),)): 1,
    }
    assert {k: samples.get(k) for k in expected} == expected
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert (
        min(
            float(s.labels["le"])
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "zonegate_sidecar_request_duration_seconds_bucket"
        )
        == 0.0001
    )
    assert subject not in text
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is required under CI (apt-get install prometheus)")
        pytest.skip("promtool not installed (make tools)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the program -------------------------------------------------------------------------------


async def test_zonegate_sidecar_subprocess_serves_readies_and_exits_0_on_sigterm(
    op: DevOpenIDProvider, tmp_path: Path
) -> None:
    """`zonegate sidecar --config F` prints where it listens, gets ready, exits 0 on SIGTERM."""
    process = await sidecar_process(
        sidecar_document(op, "http://127.0.0.1:9", "http://127.0.0.1:9"), tmp_path
    )
    assert process.stdout is not None
    try:
        listening = await listening_urls(process.stdout)
        assert set(listening) == {"sidecar", "admin"}
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, listening["admin"] + "/readyz")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_drain_is_bounded_by_one_grace_period(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGTERM with a request in flight past shutdown_grace: exit 0 within about one grace."""
    red = Backend("red", delay=10)
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    document = sidecar_document(op, str(red_server.make_url("")).rstrip("/"), closed_port_url())
    document |= {"shutdown_grace": 2, "upstream": {"read_timeout": 30}}
    process = await sidecar_process(document, tmp_path)
    assert process.stdout is not None and process.stderr is not None
    try:
        listening = await listening_urls(process.stdout)
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, listening["admin"] + "/readyz")
            in_flight = asyncio.ensure_future(
                session.get(listening["sidecar"] + "/red/slow", headers={
                    "Authorization": f"Bearer {op.login('alice')}"})
            )  # fmt: skip
            while not red.seen:
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert await asyncio.wait_for(process.wait(), 10) == 0
            assert time.monotonic() - started < 2.6
            await asyncio.gather(in_flight, return_exceptions=True)
        stderr = (await process.stderr.read()).decode()
        stopping = [json.loads(line) for line in stderr.splitlines() if "stopping" in line]
        assert [line["logger"] for line in stopping] == ["zonegate.serving"]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def sidecar_process(document: dict[str, Any], tmp_path: Path) -> asyncio.subprocess.Process:
    """`python -m sidecar --config F` with ``document`` as F, stdout and stderr piped."""
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(document))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "--config", str(config_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def listening_urls(stdout: asyncio.StreamReader) -> dict[str, str]:
    """The URLs a zonegate program prints it listens on, by listener name."""
    listening: dict[str, str] = {}
    while len(listening) < 2:
        line = (await asyncio.wait_for(stdout.readline(), 15)).decode()
        assert line, "the sidecar exited before listening"
        if " listening on " in line:
            listening[line.split()[1]] = line.split()[-1]
    return listening


# -- the access line -----------------------------------------------------------------------------


@pytest.mark.parametrize("access_log", [True, False])
async def test_access_log_switches_the_request_line_only(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    caplog: pytest.LogCaptureFixture,
    access_log: bool,
) -> None:
    """One access line per request (refusals too); ``access_log: false`` drops them."""
    red = await aiohttp_server(Backend("red").app(), host="127.0.0.1")
    document = sidecar_document(op, str(red.make_url("")).rstrip("/"), closed_port_url())
    config = parse_sidecar_config({**document, "access_log": access_log}, Path.cwd())
    proxy, _, _ = await start_sidecar(
        config, aiohttp_server, proxy_server, counted_exchangers(config)
    )
    caplog.set_level(logging.INFO, logger="zonegate.sidecar")
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {op.login('alice')}"}
        async with session.get(proxy.make_url("/red/x"), headers=headers) as r:
            assert r.status == 201
        async with session.get(proxy.make_url("/dead/x"), headers=headers) as r:
            assert r.status == 502
    lines = [r for r in caplog.records if r.name == "zonegate.sidecar" and r.msg == "request"]
    assert [(r.__dict__["route"], r.__dict__["status"]) for r in lines] == (
        [("red-reverse", 201), ("dead", 502)] if access_log else []
    )
