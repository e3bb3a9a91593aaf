"""The exchange server over real HTTP on 127.0.0.1, with a real OpenID Provider and cluster issuer.

Every test runs under ``log_scan``: all log lines the server writes are captured and searched
for every token, assertion and secret the test used.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.keys import SigningKey, generate_private_key, signing_key
from exchange.server.app import RUNTIME, Runtime, create_app
from exchange.server.keyfiles import write_private_key
from exchange.tokens import (
    CLIENT_ASSERTION_TYPE_JWT_BEARER,
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
)
from runtime.logsetup import JsonFormatter
from tests.conftest import exchange_document
from tests.logchecks import recording

ServerFactory = Callable[..., Any]
FORM = "application/x-www-form-urlencoded"
WEIRD_ID = "weird+client"
WEIRD_SECRET = "p:a+s%25s w/rd"  # ':', '+', '%', ' ' and '/' all survive both Basic readings
SERVICE_ACCOUNT = "system:serviceaccount:shop:frontend"
CLIENT_SIGNER = signing_key(generate_private_key("ES256"))


# -- the log scan ---------------------------------------------------------------------------------


class LogScan(logging.Handler):
    """Captures every log line (as the JSON the server prints) and the secrets to look for."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.secrets: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def secret(self, *values: str) -> None:
        """Remember values that must never appear in a log line."""
        self.secrets.update(v for v in values if v)

    def leaks(self) -> list[str]:
        text = "\n".join(self.lines)
        return [s[:16] + "..." for s in self.secrets if s in text]


@pytest.fixture
def log_scan() -> Iterator[LogScan]:
    """Every log line of the test, checked at the end for tokens and secrets."""
    scan = LogScan()
    with recording(scan):
        yield scan
    assert scan.lines, "the server logged nothing: the scan would prove nothing"
    assert not scan.leaks(), f"log lines contain tokens or secrets: {scan.leaks()}"


# -- the server under test ------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 now, so the config's issuer can name the server's real URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def basic(client_id: str, secret: str, *, form_encoded: bool = False) -> str:
    """An Authorization header value; RFC 6749 §2.3.1 form-encodes before base64."""
    if form_encoded:
        client_id, secret = quote_plus(client_id), quote_plus(secret)
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@dataclass
class Answer:
    """An HTTP answer: status, headers and the JSON body."""

    status: int
    headers: Mapping[str, str]
    body: dict[str, Any]


@dataclass
class Exchange:
    """A running exchange server with the providers it trusts, and a client for it."""

    url: str
    app: web.Application
    op: DevOpenIDProvider
    cluster: DevOpenIDProvider
    scan: LogScan
    session: aiohttp.ClientSession
    sent: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token"

    def subject(self, claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """A subject token from the trusted OP (remembered for the log scan)."""
        token = self.op.mint(claims, **kwargs)
        self.scan.secret(token)
        return token

    def form(self, subject: str | None = None, **fields: str) -> dict[str, str]:
        """An RFC 8693 request for the red zone's billing audience, with overrides."""
        return {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": subject or self.subject(),
            "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
            "audience": "billing",
            **fields,
        }

    async def post(
        self,
        data: Any,
        *,
        authorization: str | None = basic("shop-frontend", "s3cret-shop"),
        content_type: str = FORM,
    ) -> Answer:
        """POST /token; a successful answer's access_token joins the log scan."""
        headers = {"Content-Type": content_type}
        if authorization is not None:
            headers["Authorization"] = authorization
        if isinstance(data, dict | list):
            data = aiohttp.FormData(data)()
        async with self.session.post(self.token_endpoint, data=data, headers=headers) as r:
            body = await r.json(content_type=None)
        if "access_token" in body:
            self.scan.secret(body["access_token"])
        return Answer(r.status, r.headers, body)

    async def get(self, path: str) -> Answer:
        async with self.session.get(self.url + path) as r:
            body = await r.json(content_type=None) if "json" in r.content_type else {}
            return Answer(r.status, r.headers, body)

    def assertion(
        self, client_id: str = "signer", key: SigningKey = CLIENT_SIGNER, **overrides: Any
    ) -> str:
        """An RFC 7523 client assertion, by default of client ``signer``."""
        claims: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": self.token_endpoint,
            "exp": int(time.time()) + 60,
            "jti": secrets.token_urlsafe(12),
            **overrides,
        }
        token = jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid})
        self.scan.secret(token)
        return token

    def service_account_token(self, sub: str = SERVICE_ACCOUNT, **claims: Any) -> str:
        """A projected service-account token from the cluster issuer."""
        token = self.cluster.mint({"sub": sub, "aud": ["zonegate"], **claims})
        self.scan.secret(token)
        return token


def server_document(
    url: str, op: DevOpenIDProvider, cluster: DevOpenIDProvider, **overrides: Any
) -> dict[str, Any]:
    """``exchange_document`` plus a client for every authentication method."""
    document = exchange_document(op, issuer=url, listen="127.0.0.1:0")
    document["clients"] += [
        {
            "client_id": WEIRD_ID,
            "client_secret": WEIRD_SECRET,
            "zones": ["red"],
            "scopes": ["billing:read"],
        },
        {
            "client_id": "poster",
            "auth": "client_secret_post",
            "client_secret": "s3cret-post",
            "zones": ["red"],
        },
        {
            "client_id": "signer",
            "auth": "private_key_jwt",
            "jwks": {"keys": [CLIENT_SIGNER.public_jwk]},
            "zones": ["red"],
        },
        {
            "client_id": "workload",
            "auth": "kubernetes",
            "service_account": SERVICE_ACCOUNT,
            "zones": ["red"],
            "scopes": ["billing:read"],
        },
        {
            "client_id": "limited",
            "client_secret": "s3cret-limited",
            "zones": ["red"],
            "rate_limit": {"rate": 0.01, "burst": 2},
        },
    ]
    document["cluster_issuers"] = [{"issuer": cluster.issuer, "audiences": ["zonegate"]}]
    document.update(overrides)
    return document


CLIENT_SECRETS = ("s3cret-shop", "s3cret-reports", WEIRD_SECRET, "s3cret-post", "s3cret-limited")


@pytest.fixture
async def cluster(aiohttp_server: ServerFactory) -> DevOpenIDProvider:
    """A Kubernetes API server's service-account issuer: discovery + JWKS on 127.0.0.1."""
    provider = DevOpenIDProvider(audience="zonegate")
    server = await aiohttp_server(provider.app(), host="127.0.0.1")
    provider.issuer = str(server.make_url("")).rstrip("/")
    return provider


ExchangeFactory = Callable[..., Any]


@pytest.fixture
async def start_exchange(
    aiohttp_server: ServerFactory,
    op: DevOpenIDProvider,
    cluster: DevOpenIDProvider,
    log_scan: LogScan,
    tmp_path: Path,
) -> AsyncIterator[ExchangeFactory]:
    """Start an exchange server from a config file (so reloads re-read it); overrides allowed."""
    sessions: list[aiohttp.ClientSession] = []
    log_scan.secret(*CLIENT_SECRETS)

    async def start(
        key_check_interval: float = 10.0, extra_clients: tuple[dict[str, Any], ...] = ()
    ) -> Exchange:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        path = tmp_path / "exchange.yaml"
        document = server_document(url, op, cluster)
        document["clients"] += extra_clients
        path.write_text(yaml.safe_dump(document))
        config = parse_exchange_config(yaml.safe_load(path.read_text()), tmp_path)
        app = create_app(config, config_path=path, key_check_interval=key_check_interval)
        await aiohttp_server(app, host="127.0.0.1", port=port)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Exchange(url, app, op, cluster, log_scan, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def exchange(start_exchange: ExchangeFactory) -> Exchange:
    """The exchange server with the default test config."""
    server: Exchange = await start_exchange()
    return server


# -- RFC 8693 success -----------------------------------------------------------------------------


async def test_exchange_over_http_returns_rfc8693_response(exchange: Exchange) -> None:
    """A Basic client gets an RFC 8693 §2.2.1 response, not cacheable, with the zone token."""
    answer = await exchange.post(exchange.form())
    assert answer.status == 200, answer.body
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Pragma"] == "no-cache"
    body = answer.body
    assert body["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "billing:read"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["iss"] == f"{exchange.url}/zones/red"
    assert claims["client_id"] == "shop-frontend"


@pytest.mark.parametrize("form_encoded", [True, False])
async def test_basic_credentials_form_encoded_and_raw(
    exchange: Exchange, form_encoded: bool
) -> None:
    """Basic works both form-urlencoded (openid-client) and raw (google-auth, curl)."""
    answer = await exchange.post(
        exchange.form(), authorization=basic(WEIRD_ID, WEIRD_SECRET, form_encoded=form_encoded)
    )
    assert answer.status == 200, answer.body


async def test_client_secret_post(exchange: Exchange) -> None:
    """client_secret_post sends id and secret in the body."""
    form = exchange.form(client_id="poster", client_secret="s3cret-post")
    assert (await exchange.post(form, authorization=None)).status == 200


async def test_private_key_jwt_success_then_replay_refused(exchange: Exchange) -> None:
    """A private_key_jwt client authenticates once per jti; replaying the assertion is refused."""
    assertion = exchange.assertion()
    form = exchange.form(
        client_assertion=assertion, client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER
    )
    first = await exchange.post(form, authorization=None)
    assert first.status == 200, first.body
    form["subject_token"] = exchange.subject()
    replay = await exchange.post(form, authorization=None)
    assert replay.status == 401
    assert replay.body["error"] == "invalid_client"
    assert "replay" in replay.body["error_description"]
    assert replay.headers["WWW-Authenticate"] == 'Basic realm="zonegate"'


async def test_private_key_jwt_with_jwks_uri(
    start_exchange: ExchangeFactory, aiohttp_server: ServerFactory
) -> None:
    """A private_key_jwt client's keys are fetched from its jwks_uri (and counted as fetches)."""
    key = signing_key(generate_private_key("RS256"), "RS256")

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.public_jwk]})

    jwks_app = web.Application()
    jwks_app.router.add_get("/jwks", jwks)
    jwks_server = await aiohttp_server(jwks_app, host="127.0.0.1")
    jwks_uri = str(jwks_server.make_url("/jwks"))
    client = {"client_id": "remote", "auth": "private_key_jwt", "jwks_uri": jwks_uri}
    server: Exchange = await start_exchange(extra_clients=({**client, "zones": ["red"]},))
    assertion = server.assertion("remote", key)
    form = server.form(
        client_assertion=assertion, client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER
    )
    answer = await server.post(form, authorization=None)
    assert answer.status == 200, answer.body
    forged = server.assertion("remote", CLIENT_SIGNER)  # a key the client does not publish
    form = server.form(
        client_assertion=forged, client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER
    )
    assert (await server.post(form, authorization=None)).status == 401
    async with server.session.get(server.url + "/metrics") as r:
        assert f'zonegate_jwks_fetches_total{{issuer="{jwks_uri}",outcome="ok"}}' in await r.text()


async def test_service_account_client_end_to_end(exchange: Exchange) -> None:
    """A projected service-account token from the cluster issuer authenticates its client."""
    form = exchange.form(
        client_assertion=exchange.service_account_token(),
        client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER,
    )
    answer = await exchange.post(form, authorization=None)
    assert answer.status == 200, answer.body
    claims = jwt.decode(answer.body["access_token"], options={"verify_signature": False})
    assert claims["client_id"] == "workload"
    assert exchange.cluster.jwks_fetches >= 1


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ({"sub": "system:serviceaccount:shop:other"}, "not a configured client"),
        ({"aud": ["kubernetes"]}, "aud"),
        ({"iat": int(time.time()) - 200_000}, "max_token_age"),
        ({"exp": None}, "exp"),
    ],
)
async def test_service_account_refusals(
    exchange: Exchange, token: dict[str, Any], reason: str
) -> None:
    """Unmapped accounts, wrong audiences, old or exp-less SA tokens are invalid_client."""
    sub = token.pop("sub", SERVICE_ACCOUNT)
    form = exchange.form(
        client_assertion=exchange.service_account_token(sub, **token),
        client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER,
    )
    answer = await exchange.post(form, authorization=None)
    assert (answer.status, answer.body["error"]) == (401, "invalid_client")
    assert reason in answer.body["error_description"]


# -- every error reachable from outside -----------------------------------------------------------


async def test_error_codes_with_their_status(exchange: Exchange) -> None:
    """Each RFC 6749/8693 error code comes back with its status and a JSON body."""
    cases: list[tuple[dict[str, str], str | None, int, str]] = [
        (exchange.form("not-a-jwt"), None, 400, "invalid_request"),
        (exchange.form(grant_type="password"), None, 400, "unsupported_grant_type"),
        (exchange.form(scope="billing:write"), None, 400, "invalid_scope"),
        (exchange.form(audience="nowhere"), None, 400, "invalid_target"),
        (exchange.form(), basic("reports", "s3cret-reports"), 400, "unauthorized_client"),
        (exchange.form(), basic("shop-frontend", "wrong"), 401, "invalid_client"),
        (exchange.form(), basic("ghost", "whatever"), 401, "invalid_client"),
    ]
    for form, authorization, status, error in cases:
        answer = await exchange.post(
            form, authorization=authorization or basic("shop-frontend", "s3cret-shop")
        )
        assert (answer.status, answer.body["error"]) == (status, error), answer.body
        assert answer.body["error_description"]
        assert answer.headers["Cache-Control"] == "no-store"
        if status == 401:
            assert answer.headers["WWW-Authenticate"] == 'Basic realm="zonegate"'


async def test_invalid_client_without_basic_still_has_a_challenge(exchange: Exchange) -> None:
    """A failed client_secret_post is 401 invalid_client with a challenge (RFC 9110 §15.5.2)."""
    form = exchange.form(client_id="poster", client_secret="wrong")
    answer = await exchange.post(form, authorization=None)
    assert (answer.status, answer.body["error"]) == (401, "invalid_client")
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="zonegate"'


async def test_client_must_use_its_configured_method(exchange: Exchange) -> None:
    """A Basic client presenting its secret in the body is refused."""
    form = exchange.form(client_id="shop-frontend", client_secret="s3cret-shop")
    answer = await exchange.post(form, authorization=None)
    assert (answer.status, answer.body["error"]) == (401, "invalid_client")


async def test_issuer_down_with_nothing_cached_is_503(exchange: Exchange) -> None:
    """When the OP's keys cannot be had at all, the answer is 503 with Retry-After."""
    exchange.op.available = False
    answer = await exchange.post(exchange.form())
    assert (answer.status, answer.body["error"]) == (503, "temporarily_unavailable")
    assert int(answer.headers["Retry-After"]) >= 1
    ready = await exchange.get("/readyz")
    assert ready.status == 200  # an upstream outage does not make the server unready


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b'{"grant_type": "x"}', "application/json", 400),
        (b"grant_type=x", "text/plain", 400),
        (b"x=" + b"a" * (64 * 1024), FORM, 413),
        (
            b"subject_token=a&subject_token=b&grant_type=" + GRANT_TYPE_TOKEN_EXCHANGE.encode(),
            FORM,
            400,
        ),
        (b"grant_type=%ff%fe", FORM, 400),
        (b"&".join(b"f%d=1" % i for i in range(100)), FORM, 400),
    ],
    ids=["json", "text", "oversized", "repeated", "bad-utf8", "too-many-fields"],
)
async def test_bad_request_bodies_are_json_4xx(
    exchange: Exchange, data: bytes, content_type: str, status: int
) -> None:
    """Non-form bodies, oversized or repeated fields get a JSON invalid_request, never a 5xx."""
    answer = await exchange.post(data, content_type=content_type)
    assert (answer.status, answer.body["error"]) == (status, "invalid_request")


async def test_mixed_client_authentication_is_invalid_request(exchange: Exchange) -> None:
    """Basic plus a client_secret in the body is invalid_request."""
    answer = await exchange.post(exchange.form(client_secret="s3cret-shop"))
    assert (answer.status, answer.body["error"]) == (400, "invalid_request")


async def test_wrong_method_and_path_answer_json(exchange: Exchange) -> None:
    """GET /token is 405 with Allow, an unknown path 404: both JSON."""
    answer = await exchange.get("/token")
    assert answer.status == 405 and answer.headers["Allow"] == "POST"
    assert answer.body["error"] == "invalid_request"
    assert (await exchange.get("/nope")).body["error"] == "not_found"


async def test_rate_limit_answers_429_with_retry_after(exchange: Exchange) -> None:
    """Past its burst a rate-limited client gets 429 slow_down with Retry-After."""
    auth = basic("limited", "s3cret-limited")
    statuses = [(await exchange.post(exchange.form(), authorization=auth)).status for _ in range(2)]
    assert statuses == [200, 200]
    answer = await exchange.post(exchange.form(), authorization=auth)
    assert (answer.status, answer.body["error"]) == (429, "slow_down")
    assert int(answer.headers["Retry-After"]) >= 1
    assert (await exchange.post(exchange.form())).status == 200  # other clients unaffected


# -- documents, health, audit ---------------------------------------------------------------------


async def test_metadata_and_zone_documents(exchange: Exchange) -> None:
    """Server metadata (both well-known names) and each zone's own issuer documents are served."""
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        meta = (await exchange.get(path)).body
        assert meta["issuer"] == exchange.url
        assert meta["token_endpoint"] == exchange.token_endpoint
        assert "private_key_jwt" in meta["token_endpoint_auth_methods_supported"]
    for path in (
        "/zones/red/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/zones/red",
    ):
        zone = (await exchange.get(path)).body
        assert zone["issuer"] == f"{exchange.url}/zones/red"
        assert zone["jwks_uri"] == f"{exchange.url}/zones/red/jwks.json"
    red = (await exchange.get("/zones/red/jwks.json")).body["keys"]
    green = (await exchange.get("/zones/green/jwks.json")).body["keys"]
    assert {k["kid"] for k in red}.isdisjoint(k["kid"] for k in green)
    assert (await exchange.get("/zones/blue/jwks.json")).status == 404


async def test_access_log_has_the_status_sent(
    exchange: Exchange, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 for an unknown zone is logged as 404, not as a 500."""
    caplog.set_level(logging.INFO, logger="zonegate.access")
    assert (await exchange.get("/zones/blue/jwks.json")).status == 404
    logged = [r for r in caplog.records if r.name == "zonegate.access"]
    assert [getattr(r, "status", None) for r in logged] == [404]


async def test_health_and_readiness(exchange: Exchange) -> None:
    """/healthz and /readyz answer 200 once the config and keys are loaded."""
    assert (await exchange.get("/healthz")).status == 200
    assert (await exchange.get("/readyz")).body == {
        "status": "ready",
        "checks": {"config_and_keys_loaded": True},
    }


async def test_audit_and_access_lines(exchange: Exchange) -> None:
    """Each exchange writes an audit line (client, zone, outcome, jti, subject hash) and an access line."""
    subject = exchange.subject()
    answer = await exchange.post(exchange.form(subject))
    jti = jwt.decode(answer.body["access_token"], options={"verify_signature": False})["jti"]
    from exchange.core import subject_hash

    audit = [line for line in exchange.scan.lines if '"logger": "zonegate.audit"' in line]
    assert any(
        f'"jti": "{jti}"' in line
        and f'"subject": "{subject_hash(subject)}"' in line
        and '"client": "shop-frontend"' in line
        and '"zone": "red"' in line
        and '"outcome": "ok"' in line
        and '"audience": ["billing"]' in line
        and '"scope": "billing:read"' in line
        and '"peer": "127.0.0.1"' in line
        for line in audit
    ), audit
    access = [line for line in exchange.scan.lines if '"logger": "zonegate.access"' in line]
    assert any(
        '"path": "/token"' in line
        and '"status": 200' in line
        and '"client": "shop-frontend"' in line
        for line in access
    ), access


async def test_failed_client_authentication_is_a_warning_naming_the_client(
    exchange: Exchange,
) -> None:
    """A wrong secret is audited at warning with the client id it claimed, never the secret."""
    answer = await exchange.post(
        exchange.form(), authorization=basic("shop-frontend", "wrong-secret")
    )
    assert answer.status == 401
    failed = [
        json.loads(line)
        for line in exchange.scan.lines
        if '"logger": "zonegate.audit"' in line and "authentication failed" in line
    ]
    assert failed and failed[-1]["level"] == "warning"
    assert failed[-1]["presented_client"] == "shop-frontend"
    assert failed[-1]["peer"] == "127.0.0.1"
    assert "wrong-secret" not in json.dumps(failed)


async def test_metrics_count_exchanges_and_fetches(exchange: Exchange) -> None:
    """Exchange outcomes and JWKS fetches show in /metrics under the pinned names."""
    await exchange.post(exchange.form())
    await exchange.post(exchange.form(audience="nowhere"))
    async with exchange.session.get(exchange.url + "/metrics") as r:
        text = await r.text()
    assert (
        'zonegate_exchange_requests_total{client="shop-frontend",outcome="ok",zone="red"} 1.0'
        in text
    )
    assert 'outcome="invalid_target",zone="none"' in text
    assert "zonegate_exchange_duration_seconds_count 2.0" in text
    assert f'zonegate_jwks_fetches_total{{issuer="{exchange.op.issuer}",outcome="ok"}}' in text


async def test_refusals_after_authentication_carry_the_targeted_zone(exchange: Exchange) -> None:
    """A request refused after the client authenticated is labelled (metrics, audit) with the
    zone it targets, or ``none`` when it targets none; a refusal before authentication, with
    the unknown client and no zone."""
    shop = basic("shop-frontend", "s3cret-shop")
    limited = basic("limited", "s3cret-limited")  # zone red only, a burst of 2
    cases = [  # (form, authorization, client label, outcome, zone label)
        (exchange.form(scope="billing:write"), shop, "shop-frontend", "invalid_scope", "red"),
        (exchange.form(audience="nowhere"), shop, "shop-frontend", "invalid_target", "none"),
        (exchange.form(subject="a.b.c"), shop, "shop-frontend", "invalid_request", "red"),
        (exchange.form(), basic("shop-frontend", "wrong"), "unknown", "invalid_client", "none"),
        (exchange.form(audience="orders"), limited, "limited", "unauthorized_client", "green"),
        (exchange.form(), limited, "limited", "ok", "red"),
        (exchange.form(), limited, "limited", "slow_down", "red"),  # before the core
    ]
    for form, authorization, *_ in cases:
        await exchange.post(form, authorization=authorization)
    async with exchange.session.get(exchange.url + "/metrics") as r:
        text = await r.text()
    audit = [
        json.loads(line) for line in exchange.scan.lines if '"logger": "zonegate.audit"' in line
    ]
    assert [(a["client"], a["outcome"], a["zone"]) for a in audit[-len(cases) :]] == [
        case[2:] for case in cases
    ]
    for _, _, client, outcome, zone in cases:
        series = f'{{client="{client}",outcome="{outcome}",zone="{zone}"}} 1.0'
        assert f"zonegate_exchange_requests_total{series}" in text, series


# -- reload -------------------------------------------------------------------------------------


def config_path(exchange: Exchange) -> Path:
    path = exchange.runtime.config_path
    assert path is not None
    return path


async def test_reload_applies_valid_config(exchange: Exchange) -> None:
    """A reload with a valid new config takes effect: here shop-frontend loses zone red."""
    path = config_path(exchange)
    document = yaml.safe_load(path.read_text())
    document["clients"][0]["zones"] = ["green"]
    path.write_text(yaml.safe_dump(document))
    assert await exchange.runtime.reload()
    answer = await exchange.post(exchange.form())
    assert answer.body["error"] == "unauthorized_client"


async def test_reload_during_provider_outage_keeps_cached_keys(exchange: Exchange) -> None:
    """Keys held before a reload keep working after it, even while the OP is down."""
    assert (await exchange.post(exchange.form())).status == 200
    exchange.op.available = False
    path = config_path(exchange)
    document = yaml.safe_load(path.read_text())
    document["zones"]["green"]["token_lifetime"] = 60
    path.write_text(yaml.safe_dump(document))
    assert await exchange.runtime.reload()
    assert exchange.runtime.service.core.config.zones["green"].token_lifetime == 60
    answer = await exchange.post(exchange.form())
    assert answer.status == 200, answer.body


async def test_reload_refuses_invalid_config_and_keeps_serving(exchange: Exchange) -> None:
    """An invalid config is refused with its errors logged; the old one keeps serving."""
    path = config_path(exchange)
    path.write_text(path.read_text() + "\ntypo_key: 1\n")
    assert not await exchange.runtime.reload()
    assert any("typo_key" in line and "reload refused" in line for line in exchange.scan.lines)
    assert (await exchange.post(exchange.form())).status == 200


def write_key(path: Path) -> SigningKey:
    key = generate_private_key("ES256")
    write_private_key(key, path)
    return signing_key(key)


async def test_zone_key_rotation_without_sighup(
    start_exchange: ExchangeFactory, tmp_path: Path
) -> None:
    """A zone key file replaced on disk is picked up by the periodic check; the JWKS follows."""
    first = write_key(tmp_path / "red.pem")
    server = await start_exchange(key_check_interval=0.05)
    document = yaml.safe_load(config_path(server).read_text())
    document["zones"]["red"]["signing_key_file"] = str(tmp_path / "red.pem")
    config_path(server).write_text(yaml.safe_dump(document))
    assert await server.runtime.reload()
    assert [k["kid"] for k in (await server.get("/zones/red/jwks.json")).body["keys"]] == [
        first.kid
    ]
    second = write_key(tmp_path / "red.pem.new")
    (tmp_path / "red.pem.new").replace(tmp_path / "red.pem")
    deadline = time.monotonic() + 3
    kids: list[str] = []
    while time.monotonic() < deadline:
        kids = [k["kid"] for k in (await server.get("/zones/red/jwks.json")).body["keys"]]
        if kids == [second.kid]:
            break
        import asyncio

        await asyncio.sleep(0.05)
    assert kids == [second.kid]
    answer = await server.post(server.form())
    assert jwt.get_unverified_header(answer.body["access_token"])["kid"] == second.kid
