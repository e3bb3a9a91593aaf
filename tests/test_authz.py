"""The authz listener: Envoy ext_authz and nginx auth_request decide through the sidecar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from jwcrypto import jwk, jwt
from prometheus_client.parser import text_string_to_metric_families

from devkit.provider import DevOpenIDProvider
from sidecar.app import build_authz_app
from sidecar.config import parse_sidecar_config
from sidecar.exchanger import EmbeddedExchanger
from tests import meshpeers
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

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def check(
        self, path: str, *, method: str = "GET", host: str = "127.0.0.1", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        async with self.running.session.request(
            method, self.url(path), headers={"Host": host, **headers}
        ) as r:
            return r.status, dict(r.headers), await r.read()


@pytest.fixture
async def authz(op: DevOpenIDProvider, aiohttp_server: ServerFactory) -> AsyncIterator[Authz]:
    red, green = Backend("red"), Backend("green")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    green_server = await aiohttp_server(green.app(), host="127.0.0.1")
    document = sidecar_document(
        op, str(red_server.make_url("")).rstrip("/"), str(green_server.make_url("/v1"))
    )
    document["routes"].append(
        {"name": "authz-only", "host": "ledger.red.internal", "audience": "billing"}
    )
    document["authz_listen"] = "127.0.0.1:0"
    config = parse_sidecar_config(document, Path.cwd())
    exchangers = counted_exchangers(config)
    proxy, admin, sidecar = await start_sidecar(config, aiohttp_server, exchangers)
    server = await aiohttp_server(build_authz_app(sidecar), host="127.0.0.1")
    counted = next(iter(exchangers.values()))
    assert isinstance(counted, EmbeddedExchanger) and isinstance(counted.core, CountedCore)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        running = Running(proxy, admin, sidecar, red, green, op, counted.core, session)
        assert red_server.port is not None
        yield Authz(running, server, red_server.port)


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


# -- the real programs, started from the shipped example configs ---------------------------------


def authz_port(authz: Authz) -> int:
    port = authz.server.port
    assert port is not None
    return port


def zone_token_verifies(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """jwcrypto, an independent peer, verifies a zone token against the zone's JWKS."""
    keys = jwk.JWKSet.from_json(json.dumps(jwks))
    claims: dict[str, Any] = json.loads(jwt.JWT(jwt=token, key=keys).claims)
    return claims


async def test_through_real_envoy(authz: Authz, tmp_path: Path) -> None:
    """Envoy from config/envoy/envoy.yaml: the upstream sees exactly one Authorization, the
    zone token, and none of the dropped headers; a refusal reaches the app as the sidecar
    answered it; 50 concurrent first requests make one exchange."""
    ports = meshpeers.fresh_ports(meshpeers.ENVOY_PORTS)
    ports[meshpeers.ENVOY_PORTS["authz"]] = authz_port(authz)
    ports[meshpeers.ENVOY_PORTS["http"]] = authz.red_port
    async with meshpeers.started(meshpeers.envoy_peer(tmp_path, ports)) as envoy:
        await through_proxy(authz, envoy, tmp_path)


async def test_through_real_nginx(authz: Authz, tmp_path: Path) -> None:
    """nginx from config/nginx/nginx.conf: the same, with its 401 reaching the app."""
    ports = meshpeers.fresh_ports(meshpeers.NGINX_PORTS)
    ports[meshpeers.NGINX_PORTS["authz"]] = authz_port(authz)
    ports[meshpeers.NGINX_PORTS["http"]] = authz.red_port
    refusing = replace(authz.running.sidecar.config.authz, unsafe_headers="refuse")
    authz.running.sidecar.proxy.config = replace(authz.running.sidecar.config, authz=refusing)
    async with meshpeers.started(meshpeers.nginx_peer(tmp_path, ports)) as nginx:
        await through_proxy(authz, nginx, tmp_path, removes_headers=False)


async def through_proxy(
    authz: Authz, peer: meshpeers.Peer, tmp_path: Path, *, removes_headers: bool = True
) -> None:
    running = authz.running
    subject = running.op.login("alice")
    before = running.counted.calls
    unsafe = {"X-Forwarded-User": "admin", "X-Copy": subject}
    headers = {"Host": "billing.red.internal", "Authorization": f"Bearer {subject}"}
    if not removes_headers:  # nginx: such a call is refused, never forwarded with them
        async with running.session.get(peer.url("/invoices"), headers={**headers, **unsafe}) as r:
            assert r.status == 403, peer.output()[-3000:]
        assert not running.red.seen
    else:
        headers |= unsafe
    answers = await asyncio.gather(
        *(running.session.get(peer.url("/invoices"), headers=headers) for _ in range(50))
    )
    assert {a.status for a in answers} == {201}, peer.output()[-3000:]
    assert running.counted.calls == before + 1  # single flight through the proxy
    seen = running.red.seen[-1]
    assert seen.headers.getall("Authorization") == [seen.headers["Authorization"]]
    token = seen.headers["Authorization"].removeprefix("Bearer ")
    assert token != subject and subject not in str(dict(seen.headers))
    assert "X-Forwarded-User" not in seen.headers and "X-Copy" not in seen.headers
    async with running.session.get(running.admin_url("/zones/red/jwks.json")) as r:
        claims = zone_token_verifies(token, await r.json())
    assert claims["sub"] == "alice" and claims["aud"] == "billing"
    async with running.session.get(
        peer.url("/invoices"), headers={**headers, "Authorization": "Bearer not-a-jwt"}
    ) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"] == "invalid_token"


async def test_grpc_and_h2c_through_real_envoy(authz: Authz, tmp_path: Path) -> None:
    """A grpcio client -> Envoy (h2c) -> ext_authz -> a grpcio server (h2c upstream) that
    sees the zone token in its authorization metadata; and curl with HTTP/2 prior knowledge
    through Envoy to the HTTP/1.1 backend."""
    import shutil
    import subprocess

    import grpc

    seen: list[str] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen.extend(v for k, v in context.invocation_metadata() or () if k == "authorization")
        return b"ledger:" + request

    handler = grpc.method_handlers_generic_handler(
        "zonegate.test.Ledger",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # bytes in, bytes out: no protoc
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports = meshpeers.fresh_ports(meshpeers.ENVOY_PORTS)
    ports[meshpeers.ENVOY_PORTS["authz"]] = authz_port(authz)
    ports[meshpeers.ENVOY_PORTS["http"]] = authz.red_port
    ports[meshpeers.ENVOY_PORTS["grpc"]] = grpc_port
    subject = authz.running.op.login("alice")
    try:
        async with meshpeers.started(meshpeers.envoy_peer(tmp_path, ports)) as envoy:
            options = [("grpc.default_authority", "ledger.red.internal")]
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{envoy.port}", options=options
            ) as channel:
                call = channel.unary_unary("/zonegate.test.Ledger/Echo")
                answer = await call(b"hi", metadata=(("authorization", f"Bearer {subject}"),))
            assert answer == b"ledger:hi"
            curl = shutil.which("curl")
            assert curl, "curl is needed (make tools installs it)"
            h2 = await asyncio.to_thread(  # the sidecar answers in this loop: don't block it
                subprocess.run,
                [curl, "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                 "--connect-to", f"billing.red.internal:80:127.0.0.1:{envoy.port}",
                 "-H", f"Authorization: Bearer {subject}", "http://billing.red.internal/invoices"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert h2.stdout == "2 201", h2.stdout + h2.stderr
    finally:
        await server.stop(None)
    (metadata,) = seen
    token = metadata.removeprefix("Bearer ")
    assert token != subject
    async with authz.running.session.get(authz.running.admin_url("/zones/red/jwks.json")) as r:
        assert zone_token_verifies(token, await r.json())["sub"] == "alice"
    assert authz.running.red.seen[-1].headers["Authorization"] != f"Bearer {subject}"
