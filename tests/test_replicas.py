"""Two `zonegate exchange` replicas sharing one real redis-server, all on 127.0.0.1: a client
assertion is accepted once across both and across a restart, a rate limit is one bucket for
both, and a Redis outage fails assertions closed and rate limits open, without a restart."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkit.provider import DevOpenIDProvider
from exchange.clientauth import PrivateKeyJwt
from exchange.keys import SigningKey, generate_private_key, signing_key
from exchange.tokens import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN
from tests.conftest import exchange_document
from tests.logchecks import register_secret
from tests.programs import Program, free_port, write_yaml
from tests.redisproc import RedisFactory, RedisProcess, redis_factory  # noqa: F401
from tests.test_faults import SHOP_AUTH, Result, timed
from tests.test_sidecar import wait_ready

LIMITED_AUTH = "Basic bGltaXRlZDpzM2NyZXQtbGltaXRlZA=="  # limited:s3cret-limited
BURST = 3


@dataclass
class Replicas:
    """Two exchange-server replicas of one config (one issuer), each on its own port."""

    op: DevOpenIDProvider
    issuer: str
    urls: list[str]
    processes: list[Program]
    signer: SigningKey
    session: aiohttp.ClientSession
    make: Callable[..., Program]
    config: Path

    def assertion(self) -> dict[str, str]:
        """A fresh private_key_jwt client assertion (new jti) for the issuer's token endpoint."""
        fields, _ = PrivateKeyJwt("signer", self.signer).authenticate(
            f"{self.issuer}/token", time.time()
        )
        return dict(fields)

    def form(self, **fields: str) -> dict[str, str]:
        return {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": self.op.mint(),
            "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
            "audience": "billing",
            **fields,
        }

    async def post(self, replica: int, form: dict[str, str], auth: str | None = None) -> Result:
        headers = {"Authorization": auth} if auth else {}
        url = f"{self.urls[replica]}/token"
        return await timed(self.session.post(url, data=form, headers=headers))

    async def restart(self, replica: int, *, ready: bool = True) -> None:
        self.processes[replica].signal(signal.SIGTERM)
        assert await self.processes[replica].wait() == 0
        self.processes[replica] = self.make("exchange", "--config", str(self.config_of(replica)))
        await self.processes[replica].start()
        if ready:
            await wait_ready(self.session, self.urls[replica] + "/readyz")

    def config_of(self, replica: int) -> Path:
        return self.config.with_name(f"exchange{replica}.yaml")

    async def metric(self, replica: int, line_start: str) -> float:
        async with self.session.get(self.urls[replica] + "/metrics") as r:
            text = await r.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(line_start)
        )


@pytest.fixture
async def redis(redis_factory: RedisFactory) -> RedisProcess:  # noqa: F811
    """A redis-server with a password (it must never show in any output)."""
    server = redis_factory(password="r3dis-pa55word-xyz")
    register_secret("r3dis-pa55word-xyz")
    return server


@pytest.fixture
async def replicas(
    op: DevOpenIDProvider, redis: RedisProcess, programs: Callable[..., Program], tmp_path: Path
) -> AsyncIterator[Replicas]:
    ports = [free_port(), free_port()]
    issuer = f"http://127.0.0.1:{ports[0]}"  # both replicas are one server to their clients
    signer = signing_key(generate_private_key("ES256"))
    url_file = tmp_path / "redis-url"
    url_file.write_text(redis.url + "\n")
    processes = []
    for i, port in enumerate(ports):
        document: dict[str, Any] = exchange_document(op, issuer=issuer, listen=f"127.0.0.1:{port}")
        document["clients"] += [
            {"client_id": "signer", "auth": "private_key_jwt", "zones": ["red"],
             "jwks": {"keys": [signer.public_jwk]}},
            {"client_id": "limited", "client_secret": "s3cret-limited", "zones": ["red"],
             "rate_limit": {"rate": 0.05, "burst": BURST}},
        ]  # fmt: skip
        document["shared_state"] = {"backend": "redis", "url_file": str(url_file)}
        config = write_yaml(tmp_path / f"exchange{i}.yaml", document)
        processes.append(programs("exchange", "--config", str(config)))
    await asyncio.gather(*(p.start() for p in processes))
    async with aiohttp.ClientSession() as session:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            await wait_ready(session, url + "/readyz")
        yield Replicas(
            op, issuer, urls, processes, signer, session, programs, tmp_path / "exchange0.yaml"
        )


async def test_an_assertion_is_accepted_once_across_replicas_and_restarts(
    replicas: Replicas,
) -> None:
    """One private_key_jwt assertion: 200 on replica 0, then 401 invalid_client on replica 1,
    and 401 again on replica 0 after it restarted; a new assertion is 200 on either."""
    assertion = replicas.assertion()
    first = await replicas.post(0, replicas.form(**assertion))
    assert first.status == 200, first.body
    replayed = await replicas.post(1, replicas.form(**assertion))
    assert (replayed.status, b"invalid_client" in replayed.body) == (401, True)
    await replicas.restart(0)
    again = await replicas.post(0, replicas.form(**assertion))
    assert (again.status, b"already used" in again.body) == (401, True)
    for replica in (0, 1):
        assert (await replicas.post(replica, replicas.form(**replicas.assertion()))).status == 200


async def test_a_rate_limit_is_one_bucket_for_all_replicas(replicas: Replicas) -> None:
    """A client with burst 3 gets 3 answers spread over both replicas, then 429 slow_down with
    Retry-After on either one."""
    statuses = [
        (await replicas.post(i % 2, replicas.form(), LIMITED_AUTH)).status for i in range(BURST)
    ]
    assert statuses == [200] * BURST
    for replica in (0, 1):
        refused = await replicas.post(replica, replicas.form(), LIMITED_AUTH)
        assert (refused.status, b"slow_down" in refused.body) == (429, True)
        assert refused.retry_after is not None and int(refused.retry_after) >= 1


async def test_redis_down_fails_assertions_closed_and_secrets_pass_then_recovers(
    replicas: Replicas, redis: RedisProcess
) -> None:
    """Redis killed mid-run: an assertion is 503 temporarily_unavailable with Retry-After, a
    client secret is still 200 and a rate limit is not enforced, failures are counted by
    operation; a replica started meanwhile is not ready. Redis back (empty): assertions are
    200 again and that replica becomes ready, with no restart."""
    assert (await replicas.post(0, replicas.form(**replicas.assertion()))).status == 200
    redis.stop(signal.SIGKILL)
    for replica in (0, 1):
        refused = await replicas.post(replica, replicas.form(**replicas.assertion()))
        assert (refused.status, b"temporarily_unavailable" in refused.body) == (503, True)
        assert refused.retry_after is not None
        assert (await replicas.post(replica, replicas.form(), SHOP_AUTH)).status == 200
    limited = [
        (await replicas.post(i % 2, replicas.form(), LIMITED_AUTH)).status for i in range(BURST + 2)
    ]
    assert limited == [200] * (BURST + 2)  # fail open
    failures = 'zonegate_shared_state_errors_total{operation="first_use"}'
    assert await replicas.metric(0, failures) >= 1
    assert await replicas.metric(0, 'zonegate_shared_state_errors_total{operation="take"}') >= 1
    await replicas.restart(1, ready=False)
    await asyncio.sleep(0.5)
    async with replicas.session.get(replicas.urls[1] + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["checks"]["shared_state_reached"] is False
    redis.start()
    await wait_ready(replicas.session, replicas.urls[1] + "/readyz")
    for replica in (0, 1):
        accepted = await replicas.post(replica, replicas.form(**replicas.assertion()))
        assert accepted.status == 200, accepted.body
