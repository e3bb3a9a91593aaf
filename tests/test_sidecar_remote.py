"""The sidecar in remote mode against the standalone exchange server, all on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.errors import (
    EndpointUnavailable,
    ExchangeError,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    SlowDown,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from exchange.keys import generate_private_key, signing_key
from exchange.server.app import create_app
from exchange.server.keyfiles import write_private_key
from exchange.tokens import read_token_response
from sidecar.app import SIDECAR, Sidecar, build_sidecar
from sidecar.config import parse_sidecar_config
from sidecar.refusals import exchange_refusal
from tests.conftest import NOW, exchange_document
from tests.test_sidecar import Backend, wait_ready
from zonegate import cli

ServerFactory = Callable[..., Awaitable[TestServer]]
SERVICE_ACCOUNT = "system:serviceaccount:shop:frontend"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ExchangeServer:
    """The standalone exchange server on a fixed port, so it can go down and come back."""

    document: dict[str, Any]
    port: int
    token_requests: int = 0
    server: TestServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = create_app(parse_exchange_config(self.document, Path.cwd()))
        app.middlewares.insert(0, self._count)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/token":
            self.token_requests += 1
        response: web.StreamResponse = await handler(request)
        return response


@dataclass
class Setup:
    """Everything a remote-mode test needs; ``start_sidecar`` serves one."""

    op: DevOpenIDProvider
    exchange: ExchangeServer
    red: Backend
    red_url: str
    tmp_path: Path
    aiohttp_server: ServerFactory
    proxy_server: ServerFactory
    session: aiohttp.ClientSession
    client_key_file: Path
    proxy: TestServer | None = None
    admin: TestServer | None = None

    async def start_sidecar(
        self, exchange: dict[str, Any], *, ready: bool = True, routes: Sequence[dict[str, Any]] = ()
    ) -> Sidecar:
        document = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "exchange": {"mode": "remote", **exchange},
            "routes": [
                {"name": "red", "path_prefix": "/red/", "strip_prefix": True, "upstream": self.red_url,
                 "audience": "billing", "scope": "billing:read"},
                *routes,
            ],
        }  # fmt: skip
        config = parse_sidecar_config(document, self.tmp_path)
        proxy_app, admin_app = build_sidecar(config)
        self.admin = await self.aiohttp_server(admin_app, host="127.0.0.1")
        self.proxy = await self.proxy_server(proxy_app)
        if ready:
            await wait_ready(self.session, self.admin_url("/readyz"))
        return proxy_app[SIDECAR]

    def service_account_token(self, subject: str) -> str:
        """A projected service-account token as the kubelet writes it."""
        return self.op.mint({"sub": subject, "aud": "zonegate"})

    def url(self, path: str) -> str:
        assert self.proxy is not None
        return str(self.proxy.make_url(path))

    def admin_url(self, path: str) -> str:
        assert self.admin is not None
        return str(self.admin.make_url(path))

    async def call(self, subject: str) -> aiohttp.ClientResponse:
        async with self.session.get(
            self.url("/red/x"), headers={"Authorization": f"Bearer {subject}"}
        ) as r:
            await r.read()
            return r

    async def zone_sub(self) -> str:
        """The subject of the last token red saw, verified with the server's zone JWKS."""
        token = self.red.authorization().removeprefix("Bearer ")
        async with self.session.get(f"{self.exchange.url}/zones/red/jwks.json") as r:
            jwks = jwt.PyJWKSet.from_dict(await r.json())
        key = jwks[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(
            token,
            key,
            algorithms=[key.algorithm_name],
            audience="billing",
            issuer=f"{self.exchange.url}/zones/red",
        )
        return str(claims["sub"])


@pytest.fixture
async def setup(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    tmp_path: Path,
) -> AsyncIterator[Setup]:
    client_key = generate_private_key("ES256")
    key_file = tmp_path / "client.pem"
    write_private_key(client_key, key_file)
    port = free_port()
    document = exchange_document(op, issuer=f"http://127.0.0.1:{port}")
    document["clients"] += [
        {"client_id": "signer", "auth": "private_key_jwt", "zones": ["red"], "scopes": ["billing:read"],
         "jwks": {"keys": [signing_key(client_key).public_jwk]}},
        {"client_id": "workload", "auth": "kubernetes", "service_account": SERVICE_ACCOUNT,
         "zones": ["red"], "scopes": ["billing:read"]},
    ]  # fmt: skip
    # The IdP doubles as the cluster's service-account issuer (its tokens, audience zonegate).
    document["cluster_issuers"] = [{"issuer": op.issuer, "audiences": ["zonegate"]}]
    exchange = ExchangeServer(document, port)
    await exchange.start()
    red = Backend("red")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    async with aiohttp.ClientSession() as session:
        yield Setup(
            op, exchange, red, str(red_server.make_url("")).rstrip("/"),
            tmp_path, aiohttp_server, proxy_server, session, key_file,
        )  # fmt: skip
    await exchange.stop()


async def test_client_secret_basic_with_discovered_token_endpoint(setup: Setup) -> None:
    """Remote mode, Basic auth, endpoint discovered from the issuer: upstream gets a zone token."""
    await setup.start_sidecar(
        {"issuer": setup.exchange.url, "client_id": "shop-frontend", "client_secret": "s3cret-shop"}
    )
    subject = setup.op.login("alice")
    for _ in range(3):
        assert (await setup.call(subject)).status == 201
    assert await setup.zone_sub() == "alice"
    assert setup.exchange.token_requests == 1
    assert subject not in setup.red.authorization()


async def test_private_key_jwt(setup: Setup) -> None:
    """Remote mode, private_key_jwt: every exchange signs a fresh assertion (no replay refusal)."""
    await setup.start_sidecar(
        {
            "token_endpoint": f"{setup.exchange.url}/token",
            "client_id": "signer",
            "private_key_file": str(setup.client_key_file),
        }
    )
    for user in ("alice", "bob"):
        assert (await setup.call(setup.op.login(user))).status == 201
        assert await setup.zone_sub() == user
    assert setup.exchange.token_requests == 2


async def test_service_account_token_is_reread_when_it_rotates(setup: Setup) -> None:
    """A projected service-account token file is read again after the kubelet replaces it."""
    token_file = setup.tmp_path / "sa-token"
    token_file.write_text(setup.service_account_token(SERVICE_ACCOUNT))
    await setup.start_sidecar(
        {
            "token_endpoint": f"{setup.exchange.url}/token",
            "client_id": "workload",
            "service_account_token_file": str(token_file),
        }
    )
    assert (await setup.call(setup.op.login("alice"))).status == 201
    rotated = setup.tmp_path / "sa-token.new"
    rotated.write_text(setup.service_account_token("system:serviceaccount:shop:stranger"))
    rotated.replace(token_file)  # atomic swap, as the kubelet does
    refused = await setup.call(setup.op.login("bob"))
    assert refused.status == 502  # the server now refuses the sidecar's own credential
    rotated.write_text(setup.service_account_token(SERVICE_ACCOUNT))
    rotated.replace(token_file)
    assert (await setup.call(setup.op.mint({"sub": "carol"}))).status == 201


async def test_wrong_client_secret_is_502(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    """The sidecar's own credential refused (invalid_client) is a 502, not the user's fault,
    and the operator hears of it once (a throttled warning), not once per request."""
    await setup.start_sidecar(
        {"issuer": setup.exchange.url, "client_id": "shop-frontend", "client_secret": "wrong"}
    )
    for _ in range(5):
        async with setup.session.get(
            setup.url("/red/x"), headers={"Authorization": f"Bearer {setup.op.login('alice')}"}
        ) as r:
            assert r.status == 502
            assert (await r.json())["error"] == "invalid_client"
    warnings = [
        r for r in caplog.records if "refuses this sidecar's client credentials" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


async def test_a_route_exchange_differing_only_in_its_secret_is_its_own(setup: Setup) -> None:
    """Two exchanges with one issuer and client_id but different secrets each use their own."""
    own = {"mode": "remote", "issuer": setup.exchange.url, "client_id": "shop-frontend",
           "client_secret": "wrong-secret"}  # fmt: skip
    route = {"name": "wrong", "path_prefix": "/wrong/", "strip_prefix": True,
             "upstream": setup.red_url, "audience": "billing", "exchange": own}  # fmt: skip
    shop = {
        "issuer": setup.exchange.url,
        "client_id": "shop-frontend",
        "client_secret": "s3cret-shop",
    }
    sidecar = await setup.start_sidecar(shop, routes=[route])
    bearer = {"Authorization": f"Bearer {setup.op.login('alice')}"}
    async with setup.session.get(setup.url("/wrong/x"), headers=bearer) as r:
        assert (r.status, (await r.json())["error"]) == (502, "invalid_client")
    async with setup.session.get(setup.url("/red/x"), headers=bearer) as r:
        assert r.status == 201
    identities = list(sidecar.exchangers)
    assert len(identities) == 2
    assert not [i for i in identities if "wrong-secret" in i or "s3cret-shop" in i]


async def test_refused_subject_is_401_through_the_remote_server(setup: Setup) -> None:
    """A subject the remote server refuses (invalid_request) is a 401 with the Bearer challenge."""
    await setup.start_sidecar(
        {"issuer": setup.exchange.url, "client_id": "shop-frontend", "client_secret": "s3cret-shop"}
    )
    forged = jwt.encode({"iss": setup.op.issuer, "sub": "mallory"}, "k" * 32, algorithm="HS256")
    async with setup.session.get(
        setup.url("/red/x"), headers={"Authorization": f"Bearer {forged}"}
    ) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


async def test_core_down_is_503_with_retry_after_then_recovers_without_restart(
    setup: Setup,
) -> None:
    """Server down: 503 + Retry-After and readiness unchanged; server back: requests succeed."""
    sidecar = await setup.start_sidecar(
        {
            "token_endpoint": f"{setup.exchange.url}/token",
            "client_id": "shop-frontend",
            "client_secret": "s3cret-shop",
            "retries": 1,
        }
    )
    await setup.exchange.stop()
    async with setup.session.get(
        setup.url("/red/x"), headers={"Authorization": f"Bearer {setup.op.login('alice')}"}
    ) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"] == "temporarily_unavailable"
    async with setup.session.get(setup.admin_url("/readyz")) as r:
        assert r.status == 200  # a core outage must not take every pod out of rotation
    await setup.exchange.start()
    assert (await setup.call(setup.op.login("alice"))).status == 201
    assert await setup.zone_sub() == "alice"
    assert sidecar.readiness.ready


async def test_not_ready_until_the_remote_exchange_is_reached(setup: Setup) -> None:
    """Readiness stays false while the token endpoint cannot be discovered, then turns true."""
    await setup.exchange.stop()
    await setup.start_sidecar(
        {
            "issuer": setup.exchange.url,
            "client_id": "shop-frontend",
            "client_secret": "s3cret-shop",
        },
        ready=False,
    )
    async with setup.session.get(setup.admin_url("/readyz")) as r:
        assert r.status == 503
        assert (await r.json())["checks"]["exchange_reached"] is False
    await setup.exchange.start()
    await wait_ready(setup.session, setup.admin_url("/readyz"))


@pytest.mark.parametrize(
    ("status", "body", "error", "http_status"),
    [
        (400, b'{"error": "invalid_request", "error_description": "expired"}', InvalidRequest, 401),
        (400, b'{"error": "invalid_target", "error_description": "no zone"}', InvalidTarget, 403),
        (400, b'{"error": "invalid_scope"}', InvalidScope, 403),
        (400, b'{"error": "unauthorized_client"}', UnauthorizedClient, 403),
        (401, b'{"error": "invalid_client"}', InvalidClient, 502),
        (400, b"<html>bad request</html>", ExchangeError, 502),
        (200, b"not json", ExchangeError, 502),
        (200, b'{"access_token": "t"}', ExchangeError, 502),
        (200, b'{"access_token": "t", "token_type": "MAC"}', ExchangeError, 502),
        (429, b'{"error": "slow_down"}', SlowDown, 503),
    ],
)
def test_token_endpoint_answers_and_the_status_the_app_sees(
    status: int, body: bytes, error: type[ExchangeError], http_status: int
) -> None:
    """Each answer is rebuilt as its error, and the app sees the documented status for it."""
    with pytest.raises(ExchangeError) as raised:
        read_token_response(status, body, retry_after="7", now=NOW)
    assert type(raised.value) is error
    refusal = exchange_refusal(raised.value)
    assert refusal.status == http_status
    if http_status == 503:
        assert refusal.headers["Retry-After"] == "7"


def test_5xx_answer_is_retryable_and_temporarily_unavailable() -> None:
    """A 5xx is worth a retry; if it stays, the app sees 503 with the server's Retry-After."""
    with pytest.raises(EndpointUnavailable) as raised:
        read_token_response(502, b"bad gateway", retry_after="9", now=NOW)
    assert isinstance(raised.value, TemporarilyUnavailable)
    assert exchange_refusal(raised.value).headers["Retry-After"] == "9"


@pytest.mark.parametrize("where", ["top", "route"])
def test_check_names_a_doubled_client_secret_once(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """client_secret with client_secret_file: `zonegate check` exits 2 with that one error."""
    (tmp_path / "secret").write_text("s3cret-shop")
    exchange = {"mode": "remote", "issuer": "http://127.0.0.1:8081", "client_id": "shop-frontend",
                "client_secret": "s3cret-shop", "client_secret_file": "secret"}  # fmt: skip
    route: dict[str, Any] = {"upstream": "http://127.0.0.1:9001", "audience": "billing"}
    document: dict[str, Any] = {"routes": [route]}
    (document if where == "top" else route)["exchange"] = exchange
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(document))
    assert cli.main(["check", str(path)]) == 2
    problems = capsys.readouterr().err.splitlines()[1:]
    prefix = "exchange" if where == "top" else "routes[0].exchange"
    assert problems == [
        f"  {prefix}.client_secret: give either client_secret or client_secret_file, not both"
    ]
