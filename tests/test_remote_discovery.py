"""A remote sidecar's discovery of its token endpoint, and what its logged identity reveals."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from exchange.errors import InvalidClient, TemporarilyUnavailable
from exchange.tokens import TOKEN_TYPE_ACCESS_TOKEN, TokenExchangeRequest
from sidecar.config import RemoteExchange
from sidecar.exchanger import RemoteExchanger

ServerFactory = Callable[..., Awaitable[TestServer]]
SUBJECT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"


@dataclass
class MetadataServer:
    """Serves RFC 8414 and OIDC metadata naming ``named_issuer``, and records token POSTs."""

    named_issuer: str | None = None  # None: the server's own URL (a correct document)
    url: str = ""
    posts: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_get("/.well-known/openid-configuration", self._metadata)
        app.router.add_post("/token", self._token)
        return app

    async def _metadata(self, request: web.Request) -> web.Response:
        issuer = self.url if self.named_issuer is None else self.named_issuer
        return web.json_response({"issuer": issuer, "token_endpoint": f"{self.url}/token"})

    async def _token(self, request: web.Request) -> web.Response:
        self.posts.append(dict(await request.post()))  # type: ignore[arg-type]
        return web.json_response({"error": "invalid_client"}, status=401)


async def serve(aiohttp_server: ServerFactory, named_issuer: str | None) -> MetadataServer:
    metadata = MetadataServer(named_issuer)
    server = await aiohttp_server(metadata.app(), host="127.0.0.1")
    metadata.url = str(server.make_url("")).rstrip("/")
    return metadata


def request() -> TokenExchangeRequest:
    return TokenExchangeRequest(subject_token=SUBJECT, subject_token_type=TOKEN_TYPE_ACCESS_TOKEN)


async def test_metadata_naming_another_issuer_gets_no_credentials(
    aiohttp_server: ServerFactory,
) -> None:
    """Discovery metadata that names another issuer is not used: no secret or token is posted."""
    metadata = await serve(aiohttp_server, named_issuer="https://tx.elsewhere.example")
    exchanger = RemoteExchanger(
        RemoteExchange(client_id="shop", issuer=metadata.url, client_secret="s3cret", retries=0)
    )
    try:
        with pytest.raises(TemporarilyUnavailable) as refused:
            await exchanger.exchange(request())
    finally:
        await exchanger.close()
    assert metadata.posts == []
    assert "https://tx.elsewhere.example" in refused.value.description
    assert "RFC 8414" in refused.value.description


async def test_metadata_naming_the_configured_issuer_is_used(aiohttp_server: ServerFactory) -> None:
    """Metadata whose issuer is the configured one gives the endpoint the sidecar posts to."""
    metadata = await serve(aiohttp_server, named_issuer=None)
    exchanger = RemoteExchanger(
        RemoteExchange(client_id="shop", issuer=metadata.url, client_secret="s3cret", retries=0)
    )
    try:
        with pytest.raises(InvalidClient):
            await exchanger.exchange(request())
    finally:
        await exchanger.close()
    assert len(metadata.posts) == 1 and metadata.posts[0]["subject_token"] == SUBJECT


# -- the logged identity of an exchange --------------------------------------------------------

IDENTITY_SCRIPT = """
from sidecar.config import RemoteExchange
print(RemoteExchange(client_id="shop", issuer="http://tx.example", client_secret="hunter2").identity)
"""


def _unsalted(settings: RemoteExchange) -> set[str]:
    """What an offline guesser would compute: SHA-256 digests of the settings, unsalted."""
    values = [getattr(settings, f.name) for f in fields(settings) if not f.metadata.get("loaded")]
    texts: list[Any] = [repr(values), repr(settings), str(values)]
    return {hashlib.sha256(t.encode()).hexdigest()[:12] for t in texts}


def test_logged_identity_cannot_be_recomputed_from_the_secret() -> None:
    """Exchanges differing only in their secret log distinct identities that no guess of the
    secret reproduces, and the same config logs another identity in another process."""
    one = RemoteExchange(client_id="shop", issuer="http://tx.example", client_secret="hunter2")
    two = RemoteExchange(client_id="shop", issuer="http://tx.example", client_secret="hunter3")
    assert one.identity != two.identity
    for settings in (one, two):
        fingerprint = settings.identity.rsplit(":", 1)[1]
        assert fingerprint not in _unsalted(settings)
    runs = {
        subprocess.run(
            [sys.executable, "-c", IDENTITY_SCRIPT], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(runs) == 2 and one.identity not in runs
