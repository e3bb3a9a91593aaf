"""The exchange server against independent implementations: google-auth's RFC 8693 client,
jwcrypto through discovery, promtool, and the ``zonegate exchange`` program as a subprocess."""

# ruff: noqa: F811  (fixtures imported from tests.test_server are parameters by the same name)

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import requests
import yaml
from google.auth.transport.requests import Request
from google.oauth2 import sts
from google.oauth2.utils import ClientAuthentication, ClientAuthType
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt

from devkit.provider import DevOpenIDProvider
from exchange.tokens import TOKEN_TYPE_ACCESS_TOKEN
from tests.test_server import (  # noqa: F401
    WEIRD_ID,
    WEIRD_SECRET,
    Exchange,
    LogScan,
    basic,
    cluster,
    exchange,
    log_scan,
    server_document,
    start_exchange,
)

STARTUP_TIMEOUT = 20.0


def google_exchange(endpoint: str, client_id: str, secret: str, subject: str) -> dict[str, Any]:
    """google-auth's synchronous STS client, Basic auth (it sends raw, not form-encoded, values)."""
    authentication = ClientAuthentication(ClientAuthType.basic, client_id, secret)  # type: ignore[no-untyped-call]
    client = sts.Client(endpoint, client_authentication=authentication)  # type: ignore[no-untyped-call]
    with requests.Session() as session:
        response: dict[str, Any] = client.exchange_token(  # type: ignore[no-untyped-call]
            Request(session),
            grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
            subject_token=subject,
            subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
            audience="billing",
            scopes=["billing:read"],
        )
    return response


@pytest.mark.parametrize(
    ("client_id", "secret"), [("shop-frontend", "s3cret-shop"), (WEIRD_ID, WEIRD_SECRET)]
)
async def test_google_auth_sts_client_exchanges(
    exchange: Exchange, client_id: str, secret: str
) -> None:
    """google.oauth2.sts.Client with Basic auth gets a red zone token from the running server."""
    response = await asyncio.to_thread(
        google_exchange, exchange.token_endpoint, client_id, secret, exchange.subject()
    )
    exchange.scan.secret(response["access_token"])
    assert response["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    assert response["token_type"] == "Bearer"
    assert response["scope"] == "billing:read"
    claims = jwt.decode(response["access_token"], options={"verify_signature": False})
    assert (claims["client_id"], claims["aud"]) == (client_id, "billing")


async def test_google_auth_sees_oauth_error(exchange: Exchange) -> None:
    """google-auth turns our JSON error into its OAuthError carrying the RFC error code."""
    from google.auth.exceptions import OAuthError

    with pytest.raises(OAuthError, match="invalid_client"):
        await asyncio.to_thread(
            google_exchange, exchange.token_endpoint, "shop-frontend", "wrong", exchange.subject()
        )


async def test_issued_token_verifies_through_zone_discovery(exchange: Exchange) -> None:
    """A resource server with issuer-uri <issuer>/zones/red verifies the token with jwcrypto."""
    answer = await exchange.post(exchange.form())
    token = answer.body["access_token"]
    issuer = f"{exchange.url}/zones/red"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{issuer}/.well-known/openid-configuration") as r:
            discovery = await r.json()
        async with session.get(discovery["jwks_uri"]) as r:
            jwks = await r.json()
    assert discovery["issuer"] == issuer
    keyset = jwc_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jwc_jwt.JWT(
        jwt=token,
        key=keyset,
        expected_type="JWS",
        check_claims={"iss": discovery["issuer"], "aud": "billing", "exp": None},
    )
    claims = json.loads(verified.claims)
    assert claims["sub"] == "alice"
    assert json.loads(verified.token.objects["protected"])["typ"] == "at+jwt"
    green = (await exchange.get("/zones/green/jwks.json")).body
    with pytest.raises(Exception, match=r"(?i)key|signature|verif"):
        jwc_jwt.JWT(jwt=token, key=jwc_jwk.JWKSet.from_json(json.dumps(green)), expected_type="JWS")


def promtool() -> str:
    """promtool's path; missing fails under CI=true (``make tools`` installs it) and skips locally."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool not installed: run `make tools` (Debian package prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


async def test_metrics_pass_promtool(exchange: Exchange) -> None:
    """/metrics, after exchanges that succeed and fail, passes `promtool check metrics`."""
    tool = promtool()
    await exchange.post(exchange.form())
    await exchange.post(exchange.form(scope="nope"))
    async with exchange.session.get(exchange.url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.read()
    assert b"zonegate_exchange_requests_total" in text
    assert b"zonegate_jwks_fetches_total" in text
    checked = await asyncio.to_thread(
        subprocess.run, [tool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the program ------------------------------------------------------------------------------


def zonegate_command() -> list[str]:
    """The installed console script, or the same entry point through the interpreter."""
    script = Path(sys.executable).parent / "zonegate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "zonegate.cli"]


async def read_listening_url(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while line := (await process.stdout.readline()).decode():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].strip()
    raise AssertionError("zonegate exchange exited without saying where it listens")


async def test_zonegate_exchange_program(
    op: DevOpenIDProvider, cluster: DevOpenIDProvider, log_scan: LogScan, tmp_path: Path
) -> None:
    """`zonegate exchange --config F` says where it listens, exchanges, survives a bad SIGHUP
    reload, and exits 0 on SIGTERM."""
    config = tmp_path / "exchange.yaml"
    document = server_document("http://127.0.0.1:8081", op, cluster)
    config.write_text(yaml.safe_dump(document))
    process = await asyncio.create_subprocess_exec(
        *zonegate_command(),
        "exchange",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        url = await read_listening_url(process)
        assert url.startswith("http://127.0.0.1:")
        subject = op.mint()
        log_scan.secret(subject, "s3cret-shop")
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/healthz") as r:
                assert r.status == 200
            form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange"}
            form |= {"subject_token": subject, "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN}
            auth = {"Authorization": basic("shop-frontend", "s3cret-shop")}
            async with session.post(
                url + "/token", data=form | {"audience": "billing"}, headers=auth
            ) as r:
                body = await r.json()
                assert r.status == 200, body
                log_scan.secret(body["access_token"])
            config.write_text("issuer: [not, a, url]\n")
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            async with session.get(url + "/healthz") as r:
                assert r.status == 200  # the bad config was refused; the old one serves
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    log_scan.lines.append(stderr)  # the program's own log lines join the scan
    assert "config reload refused" in stderr
    assert '"path": "/token"' in stderr and '"logger": "zonegate.audit"' in stderr
