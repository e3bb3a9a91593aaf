"""Kubernetes clients are bound to one cluster: the same service account elsewhere is not them."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from devkit.provider import DevOpenIDProvider
from exchange.clientauth import ClientAuthenticator, presented_credentials
from exchange.config import ClientConfig, parse_exchange_config
from exchange.errors import InvalidClient
from exchange.server.fetcher import HttpFetcher
from exchange.tokens import CLIENT_ASSERTION_TYPE_JWT_BEARER
from runtime.configload import ConfigError
from tests.conftest import exchange_document

ServerFactory = Callable[..., Awaitable[TestServer]]
FRONTEND = "system:serviceaccount:shop:frontend"


async def cluster(aiohttp_server: ServerFactory) -> DevOpenIDProvider:
    """A cluster's service-account issuer (discovery and JWKS) on 127.0.0.1."""
    provider = DevOpenIDProvider(audience="zonegate")
    server = await aiohttp_server(provider.app(), host="127.0.0.1")
    provider.issuer = str(server.make_url("")).rstrip("/")
    return provider


def kubernetes_client(client_id: str, cluster_issuer: str | None = None) -> dict[str, Any]:
    client = {"client_id": client_id, "auth": "kubernetes", "service_account": FRONTEND,
              "zones": ["red"], "scopes": ["billing:read"]}  # fmt: skip
    if cluster_issuer is not None:
        client["cluster_issuer"] = cluster_issuer
    return client


def document(op: DevOpenIDProvider, clusters: list[str], *clients: dict[str, Any]) -> Any:
    doc = exchange_document(op)
    doc["cluster_issuers"] = [{"issuer": c, "audiences": ["zonegate"]} for c in clusters]
    doc["clients"] += list(clients)
    return doc


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpFetcher]:
    f = HttpFetcher(5.0)
    yield f
    await f.close()


async def authenticate(auth: ClientAuthenticator, token: str) -> ClientConfig:
    form = {
        "client_assertion": [token],
        "client_assertion_type": [CLIENT_ASSERTION_TYPE_JWT_BEARER],
    }
    return await auth.authenticate(presented_credentials(None, form), now=time.time())


async def test_a_token_from_another_cluster_is_not_the_client(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, fetcher: HttpFetcher
) -> None:
    """shop:frontend of cluster B does not authenticate as the client bound to cluster A; a
    client bound to B gets it."""
    a, b = await cluster(aiohttp_server), await cluster(aiohttp_server)
    only_a = parse_exchange_config(
        document(op, [a.issuer, b.issuer], kubernetes_client("frontend-a", a.issuer)), Path.cwd()
    )
    auth = ClientAuthenticator(only_a, fetch=fetcher, clock=time.time)
    assert (await authenticate(auth, a.mint({"sub": FRONTEND}))).client_id == "frontend-a"
    with pytest.raises(InvalidClient, match=f"of cluster {b.issuer} is not a configured client"):
        await authenticate(auth, b.mint({"sub": FRONTEND}))
    both = parse_exchange_config(
        document(
            op,
            [a.issuer, b.issuer],
            kubernetes_client("frontend-a", a.issuer),
            kubernetes_client("frontend-b", b.issuer),
        ),
        Path.cwd(),
    )
    auth = ClientAuthenticator(both, fetch=fetcher, clock=time.time)
    assert (await authenticate(auth, a.mint({"sub": FRONTEND}))).client_id == "frontend-a"
    assert (await authenticate(auth, b.mint({"sub": FRONTEND}))).client_id == "frontend-b"


async def test_with_one_cluster_the_binding_is_implied(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, fetcher: HttpFetcher
) -> None:
    """With a single cluster_issuers entry, a kubernetes client needs no cluster_issuer."""
    a = await cluster(aiohttp_server)
    config = parse_exchange_config(document(op, [a.issuer], kubernetes_client("fe")), Path.cwd())
    assert config.clients["fe"].cluster_issuer == a.issuer
    auth = ClientAuthenticator(config, fetch=fetcher, clock=time.time)
    assert (await authenticate(auth, a.mint({"sub": FRONTEND}))).client_id == "fe"


A, B = "https://a.cluster.example", "https://b.cluster.example"


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ([kubernetes_client("fe")], "clients[2].cluster_issuer: required with more than one"),
        ([kubernetes_client("fe", "https://c.example")], "clients[2].cluster_issuer: 'https://c.example' is not a cluster_issuers entry"),
        ([{"client_id": "x", "client_secret": "s", "cluster_issuer": A}], "clients[2].cluster_issuer: only a client with auth kubernetes"),
        ([kubernetes_client("fe", A), kubernetes_client("fe2", A)], "both map service account"),
    ],
)  # fmt: skip
def test_cluster_binding_errors_name_the_path_and_fix(
    op: DevOpenIDProvider, clients: list[dict[str, Any]], message: str
) -> None:
    """A missing, unknown, misplaced or doubled cluster binding is a config error."""
    with pytest.raises(ConfigError) as refused:
        parse_exchange_config(document(op, [A, B], *clients), Path.cwd())
    assert any(message in error for error in refused.value.errors), refused.value.errors


def test_zonegate_check_says_a_kubernetes_client_needs_its_cluster(
    op: DevOpenIDProvider, tmp_path: Path
) -> None:
    """`zonegate check` names the client and lists the cluster issuers to choose from."""
    path = tmp_path / "exchange.yaml"
    path.write_text(yaml.safe_dump(document(op, [A, B], kubernetes_client("fe"))))
    result = subprocess.run(
        [sys.executable, "-m", "zonegate.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "clients[2].cluster_issuer: required with more than one" in result.stderr
    assert A in result.stderr and B in result.stderr
