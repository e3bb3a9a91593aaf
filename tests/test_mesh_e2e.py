"""Envoy and nginx, started from the shipped configs with only their ports substituted, carry
the app's calls and ask the sidecar's authz listener for each one's zone token."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from jwcrypto import jwk, jwt
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from devkit.provider import DevOpenIDProvider
from tests import meshpeers
from tests.test_authz import Authz, start_authz
from tests.test_sidecar import ServerFactory, closed_port_url

USER_HEADERS = {"Host": "billing.red.internal"}


@dataclass
class Mesh:
    """The authz sidecar (with routes whose exchange refuses in each way) and its backends."""

    authz: Authz
    grpc_port: int
    grpc_seen: list[str]

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.authz.running.session

    def login(self, user: str = "alice") -> str:
        return self.authz.running.op.login(user)

    def envoy(self, tmp_path: Path) -> meshpeers.Peer:
        """Envoy from config/envoy/envoy.yaml, its ports the sidecar's and the backends'."""
        ports = meshpeers.fresh_ports(meshpeers.ENVOY_PORTS)
        ports[meshpeers.ENVOY_PORTS["authz"]] = self.authz_port
        ports[meshpeers.ENVOY_PORTS["http"]] = self.authz.red_port
        ports[meshpeers.ENVOY_PORTS["grpc"]] = self.grpc_port
        return meshpeers.envoy_peer(tmp_path, ports)

    def nginx(self, tmp_path: Path) -> meshpeers.Peer:
        """nginx from config/nginx/nginx.conf, with the sidecar refusing unsafe headers as
        config/nginx/sidecar.yaml does (nginx cannot remove headers named at run time)."""
        ports = meshpeers.fresh_ports(meshpeers.NGINX_PORTS)
        ports[meshpeers.NGINX_PORTS["authz"]] = self.authz_port
        ports[meshpeers.NGINX_PORTS["http"]] = self.authz.red_port
        proxy = self.authz.running.sidecar.proxy
        proxy.config = replace(
            proxy.config, authz=replace(proxy.config.authz, unsafe_headers="refuse")
        )
        return meshpeers.nginx_peer(tmp_path, ports)

    @property
    def authz_port(self) -> int:
        assert self.authz.server.port is not None
        return self.authz.server.port

    async def jwks(self) -> dict[str, Any]:
        async with self.session.get(self.authz.running.admin_url("/zones/red/jwks.json")) as r:
            document: dict[str, Any] = await r.json()
            return document


async def garbled_token_endpoint(aiohttp_server: ServerFactory) -> str:
    """A token endpoint that answers every request with 200 and HTML: no usable answer."""

    async def garbled(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="<html>maintenance</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", garbled)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("/token"))


def remote(token_endpoint: str) -> dict[str, Any]:
    return {
        "mode": "remote",
        "token_endpoint": token_endpoint,
        "client_id": "shop-frontend",
        "client_secret": "not-used",
        "timeout": 0.5,
        "retries": 0,
    }


@pytest.fixture
async def mesh(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, proxy_server: ServerFactory
) -> AsyncIterator[Mesh]:
    routes: list[dict[str, Any]] = [
        # On the host Envoy routes (config/envoy/envoy.yaml), before the sidecar's route for it.
        {"name": "scope", "host": "billing.red.internal", "path_prefix": "/write/",
         "audience": "billing", "scope": "billing:write"},
        {"name": "down", "host": "billing.red.internal", "path_prefix": "/down/",
         "audience": "billing", "exchange": remote(closed_port_url() + "/token")},
        {"name": "garbled", "host": "billing.red.internal", "path_prefix": "/garbled/",
         "audience": "billing", "exchange": remote(await garbled_token_endpoint(aiohttp_server))},
    ]  # fmt: skip
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
    connector = aiohttp.TCPConnector(limit=0)  # 200 concurrent calls are 200 connections
    try:
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            authz = await start_authz(op, aiohttp_server, proxy_server, session, routes)
            yield Mesh(authz, grpc_port, seen)
    finally:
        await server.stop(None)


def zone_token_verifies(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """jwcrypto, an independent peer, verifies a zone token against the zone's JWKS."""
    keys = jwk.JWKSet.from_json(json.dumps(jwks))
    claims: dict[str, Any] = json.loads(jwt.JWT(jwt=token, key=keys).claims)
    return claims


async def answer(
    mesh: Mesh, peer: meshpeers.Peer, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    url = URL(f"http://127.0.0.1:{peer.port}{path}", encoded=True)  # dot segments as written
    async with mesh.session.get(url, headers=headers) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


# -- what the upstream receives --------------------------------------------------------------


async def concurrent_first_calls(mesh: Mesh, peer: meshpeers.Peer, unsafe: dict[str, str]) -> None:
    """200 concurrent first calls of one user: all answered by the backend, one exchange; the
    backend saw one Authorization, the zone token (jwcrypto verifies it against the zone's
    JWKS), never the user's token or the headers the sidecar drops."""
    running = mesh.authz.running
    subject = mesh.login("alice")
    before = running.counted.calls
    headers = {**USER_HEADERS, "Authorization": f"Bearer {subject}", **unsafe}

    async def one() -> int:
        async with mesh.session.get(peer.url("/invoices"), headers=headers) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert set(statuses) == {201}, peer.output()[-3000:]
    assert running.counted.calls == before + 1  # single flight through the proxy
    assert len(running.red.seen) >= 200
    for seen in running.red.seen[-200:]:
        (authorization,) = seen.headers.getall("Authorization")
        assert subject not in str(list(seen.headers.items()))
        assert not {name.lower() for name in unsafe} & {name.lower() for name in seen.headers}
    token = authorization.removeprefix("Bearer ")
    assert token != subject
    claims = zone_token_verifies(token, await mesh.jwks())
    assert (claims["sub"], claims["aud"]) == ("alice", "billing")


async def test_envoy_sends_the_zone_token_and_removes_what_the_sidecar_drops(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Through Envoy: 200 concurrent first calls make one exchange; the backend gets exactly
    one Authorization, the zone token, and none of the spoofable headers, Proxy-Authorization
    or headers holding a copy of the user's token (Envoy removes what the sidecar names)."""
    async with meshpeers.started(mesh.envoy(tmp_path)) as envoy:
        subject = mesh.login("bob")
        unsafe = {
            "X-Forwarded-User": "admin",
            "Remote-User": "admin",
            "X-Forwarded-Client-Cert": "Hash=00",
            "Proxy-Authorization": "Basic YWRtaW46YWRtaW4=",
            "X-Copy": subject,
            "Cookie": f"session=1; at={subject}",
        }
        async with mesh.session.get(
            envoy.url("/invoices"),
            headers={**USER_HEADERS, "Authorization": f"Bearer {subject}", **unsafe},
        ) as r:
            assert r.status == 201, envoy.output()[-3000:]
        seen = mesh.authz.running.red.seen[-1]
        assert seen.headers.getall("Authorization") != [f"Bearer {subject}"]
        assert len(seen.headers.getall("Authorization")) == 1
        assert not {n.lower() for n in unsafe} & {n.lower() for n in seen.headers}
        assert subject not in str(list(seen.headers.items()))
        await concurrent_first_calls(mesh, envoy, {"X-Forwarded-User": "admin"})


async def test_nginx_sends_the_zone_token_and_refuses_what_it_cannot_remove(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Through nginx: the same single flight and zone token; a call carrying a copy of the
    token or a spoofable header nginx does not clear is refused (403), never forwarded."""
    async with meshpeers.started(mesh.nginx(tmp_path)) as nginx:
        subject = mesh.login("alice")
        for unsafe in ({"X-Copy": subject}, {"X-Consumer-Username": "admin"}):
            status, _, _ = await answer(
                mesh,
                nginx,
                "/invoices",
                {**USER_HEADERS, "Authorization": f"Bearer {subject}", **unsafe},
            )
            assert status == 403, nginx.output()[-3000:]
        assert not mesh.authz.running.red.seen
        await concurrent_first_calls(mesh, nginx, {})


# -- refusals ---------------------------------------------------------------------------------


# (path, token: "alice" | "Basic" | a literal | None) on billing.red.internal, then what the
# app gets through Envoy and through nginx: (status, the JSON body's error; None: the proxy's
# own body). Envoy turns any 5xx of the check into its own 503 (status_on_error) and drops that
# answer's headers and body (the shipped local-reply mapper adds Retry-After). nginx passes
# only 401 and 403; the shipped config answers the rest (400 as 400, else 503) with JSON of
# its own. Both resolve some dot segments before the check, and the check sees what the
# backend would: /x/%2e%2e/write/y is /write/y for both.
REFUSALS = [
    ("/invoices", None, (401, "invalid_request"), (401, "invalid_request")),
    ("/invoices", "not-a-jwt", (401, "invalid_token"), (401, "invalid_token")),
    ("/invoices", "Basic", (400, "invalid_request"), (400, "invalid_request")),
    ("/write/x", "alice", (403, "invalid_scope"), (403, "access_denied")),
    ("/x?access_token=abc", "alice", (400, "invalid_request"), (400, "invalid_request")),
    ("/a/..%2f..%2fsecret", "alice", (400, "invalid_request"), (400, None)),  # nginx's own 400
    ("/a/..%3b/secret", "alice", (400, "invalid_request"), (400, "invalid_request")),
    ("/x/..;/write/y", "alice", (403, "invalid_scope"), (400, "invalid_request")),
    ("/x/%2e%2e/write/y", "alice", (403, "invalid_scope"), (403, "access_denied")),
    ("/x/../write/y", "alice", (403, "invalid_scope"), (403, "access_denied")),
    ("/down/x", "alice", (503, None), (503, "temporarily_unavailable")),
    ("/garbled/x", "alice", (503, None), (503, "temporarily_unavailable")),
]


def user_headers(
    mesh: Mesh, token: str | None, host: str = "billing.red.internal"
) -> dict[str, str]:
    headers = {"Host": host}
    if token == "Basic":
        headers["Authorization"] = "Basic YWxpY2U6cGFzcw=="
    elif token is not None:
        value = mesh.login("alice") if token == "alice" else token
        headers["Authorization"] = f"Bearer {value}"
    return headers


async def checks_asked(mesh: Mesh) -> float:
    """How many checks the authz listener has answered (its metric)."""
    async with mesh.session.get(mesh.authz.running.admin_url("/metrics")) as r:
        text = await r.text()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "zonegate_sidecar_authz_checks_total"
    )


async def refusals_through(mesh: Mesh, peer: meshpeers.Peer, which: int) -> None:
    for path, token, *expected in REFUSALS:
        status, error = expected[which]
        got, headers, body = await answer(mesh, peer, path, user_headers(mesh, token))
        case = f"{peer.name} {path} {token}: {got} {headers} {body[:300]!r}"
        assert got == status, case
        if error is not None:
            assert json.loads(body)["error"] == error, case
            assert headers["cache-control"] == "no-store", case
        if status == 401:
            assert headers["www-authenticate"].startswith("Bearer"), case
        assert ("retry-after" in headers) == (status == 503), case
        if status == 503:
            assert headers["retry-after"] == "1", case
    assert not mesh.authz.running.red.seen


async def test_every_refusal_reaches_the_app_through_envoy(mesh: Mesh, tmp_path: Path) -> None:
    """Through Envoy each refusal keeps the sidecar's status, JSON body and challenge (401,
    400, 403); the sidecar's 502 and 503 arrive as 503 with Retry-After; a host Envoy does not
    route is Envoy's own 404, the check not even asked; no refused call reaches the backend."""
    async with meshpeers.started(mesh.envoy(tmp_path)) as envoy:
        await refusals_through(mesh, envoy, 0)
        before = await checks_asked(mesh)
        got, _, _ = await answer(mesh, envoy, "/x", user_headers(mesh, "alice", "evil.example"))
        assert got == 404 and await checks_asked(mesh) == before
    assert not mesh.authz.running.red.seen


async def test_the_authz_listener_answers_what_envoy_hides(mesh: Mesh) -> None:
    """Asked directly, the check answers the exchange's failures as pinned: 503 with the
    sidecar's Retry-After when the exchange is down, 502 when it gives no usable answer."""
    for path, status, error in (
        ("/check/down/x", 503, "temporarily_unavailable"),
        ("/check/garbled/x", 502, "server_error"),
    ):
        got, headers, body = await mesh.authz.check(
            path, host="billing.red.internal", Authorization=f"Bearer {mesh.login()}"
        )
        assert (got, json.loads(body)["error"]) == (status, error), body
        assert ("Retry-After" in headers) == (status == 503)


async def test_nginx_passes_401_and_403_and_answers_the_rest_itself(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Through nginx a 401 keeps its challenge and error code and a 403 its status (the
    shipped config writes the JSON bodies); the check's 400 stays 400, its 502 and 503 are 503
    with Retry-After; an unknown host is 403; no refused call reaches the backend."""
    async with meshpeers.started(mesh.nginx(tmp_path)) as nginx:
        await refusals_through(mesh, nginx, 1)
        got, _, body = await answer(mesh, nginx, "/x", user_headers(mesh, "alice", "evil.example"))
        assert (got, json.loads(body)["error"]) == (403, "access_denied")
    assert not mesh.authz.running.red.seen


# -- gRPC and HTTP/2 through Envoy ------------------------------------------------------------


async def test_grpc_through_envoy_carries_the_zone_token(mesh: Mesh, tmp_path: Path) -> None:
    """A grpcio client -> Envoy (h2c) -> ext_authz -> a grpcio server (h2c upstream): the
    server's authorization metadata is the zone token; without a token the call fails
    UNAUTHENTICATED and never reaches the server."""
    subject = mesh.login("alice")
    async with meshpeers.started(mesh.envoy(tmp_path)) as envoy:
        options = [("grpc.default_authority", "ledger.red.internal")]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.port}", options=options) as channel:
            call = channel.unary_unary("/zonegate.test.Ledger/Echo")
            reply = await call(b"hi", metadata=(("authorization", f"Bearer {subject}"),))
            assert reply == b"ledger:hi"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"hi")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (metadata,) = mesh.grpc_seen
    token = metadata.removeprefix("Bearer ")
    assert token != subject
    assert zone_token_verifies(token, await mesh.jwks())["sub"] == "alice"


async def test_http2_prior_knowledge_through_envoy_to_an_http1_backend(
    mesh: Mesh, tmp_path: Path
) -> None:
    """curl --http2-prior-knowledge through Envoy reaches the HTTP/1.1 backend with the zone
    token; without a token it gets the sidecar's 401 over HTTP/2."""
    curl = shutil.which("curl")
    assert curl, "curl is needed (make tools installs it)"
    subject = mesh.login("alice")
    async with meshpeers.started(mesh.envoy(tmp_path)) as envoy:

        async def h2(*headers: str) -> str:
            done = await asyncio.to_thread(  # the sidecar answers in this loop: don't block it
                subprocess.run,
                [curl, "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                 "--connect-to", f"billing.red.internal:80:127.0.0.1:{envoy.port}",
                 *(a for h in headers for a in ("-H", h)), "http://billing.red.internal/invoices"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            return done.stdout + done.stderr

        assert await h2(f"Authorization: Bearer {subject}") == "2 201"
        assert await h2() == "2 401"
    seen = mesh.authz.running.red.seen
    assert len(seen) == 1 and seen[0].headers["Authorization"] != f"Bearer {subject}"
    token = seen[0].headers["Authorization"].removeprefix("Bearer ")
    assert zone_token_verifies(token, await mesh.jwks())["sub"] == "alice"
