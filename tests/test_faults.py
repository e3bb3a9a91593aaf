"""Faults with real processes and servers on 127.0.0.1, each with its stated expectation.

Programs run as ``zonegate exchange`` / ``zonegate sidecar`` subprocesses on fixed free ports;
their stdout and stderr join the session's secrets scan. Every load is bounded in count and
time, and every request in it has a client-side timeout so a hang fails the test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.server.app import create_app
from exchange.tokens import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN
from sidecar.app import build_sidecar
from sidecar.config import parse_sidecar_config
from tests.conftest import exchange_document
from tests.logchecks import register_secret
from tests.programs import Program, exchange_program, free_port, write_yaml
from tests.test_server import basic
from tests.test_sidecar import Backend, wait_ready

ServerFactory = Callable[..., Awaitable[TestServer]]
SHOP_AUTH = basic("shop-frontend", "s3cret-shop")
REQUEST_TIMEOUT = 5.0  # no request of any load may take longer: that would be a hang


# -- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    status: int
    seconds: float
    retry_after: str | None
    body: bytes


async def timed(request: Awaitable[aiohttp.ClientResponse]) -> Result:
    """One request under the client-side timeout; a transport failure is status 0."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            async with await request as r:
                body = await r.read()
                return Result(
                    r.status, time.monotonic() - started, r.headers.get("Retry-After"), body
                )
    except aiohttp.ClientError as e:
        return Result(0, time.monotonic() - started, None, type(e).__name__.encode())


async def load(
    count: int, concurrency: int, one: Callable[[int], Awaitable[Result]]
) -> list[Result]:
    """``count`` requests, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Result:
        async with gate:
            return await one(i)

    return list(await asyncio.gather(*(gated(i) for i in range(count))))


def statuses(results: list[Result]) -> dict[int, int]:
    counted: dict[int, int] = {}
    for result in results:
        counted[result.status] = counted.get(result.status, 0) + 1
    return counted


# -- the exchange server in-process ------------------------------------------------------------


@dataclass
class Exchange:
    url: str
    op: DevOpenIDProvider
    session: aiohttp.ClientSession

    def form(self, subject: str | None = None, **fields: str) -> dict[str, str]:
        return {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": subject or self.op.mint(),
            "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
            "audience": "billing",
            **fields,
        }

    async def post(self, form: dict[str, str], auth: str = SHOP_AUTH) -> Result:
        headers = {"Authorization": auth}
        return await timed(self.session.post(f"{self.url}/token", data=form, headers=headers))

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples whose line starts with ``name``."""
        async with self.session.get(f"{self.url}/metrics") as r:
            text = await r.text()
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
        )


ExchangeFactory = Callable[..., Awaitable[Exchange]]


@pytest.fixture
async def start_exchange(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory
) -> AsyncIterator[ExchangeFactory]:
    """Serve an exchange server (create_app, as the program does) trusting ``op``."""
    async with aiohttp.ClientSession() as session:

        async def start(**overrides: Any) -> Exchange:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            document = exchange_document(op, issuer=url, **overrides)
            await aiohttp_server(
                create_app(parse_exchange_config(document, Path.cwd())), host="127.0.0.1", port=port
            )
            return Exchange(url, op, session)

        yield start


async def test_issuer_rotates_keys(start_exchange: ExchangeFactory) -> None:
    """The OP rotates: a new kid verifies after one refetch; a key it dropped stops verifying."""
    exchange = await start_exchange()
    op = exchange.op
    old_kid = op.default_kid
    old = op.mint()
    assert (await exchange.post(exchange.form(old))).status == 200
    fetches = op.jwks_fetches
    op.rotate("ES256")
    assert (await exchange.post(exchange.form())).status == 200
    assert op.jwks_fetches == fetches + 1
    op.drop(old_kid)
    op.rotate("RS256")  # a new unknown kid: the refetch also learns that old_kid is gone
    assert (await exchange.post(exchange.form())).status == 200
    refused = await exchange.post(exchange.form(old))
    assert refused.status == 400 and b"does not publish" in refused.body


async def test_issuer_down_serves_cached_keys_for_the_bounded_time_then_fails_clearly(
    start_exchange: ExchangeFactory,
) -> None:
    """OP up: keys refresh every jwks_max_age (1 s, below the OP's max-age=300) and keep working.
    OP down: held keys serve for jwks_max_age + jwks_stale_for (1 + 1 s), then 503
    temporarily_unavailable with Retry-After; OP back: exchanges work again."""
    exchange = await start_exchange(jwks_max_age=1, jwks_stale_for=1, jwks_min_refresh=0.2)
    op = exchange.op
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # older code let keys expire here although the OP was up
        assert (await exchange.post(exchange.form())).status == 200
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.1)  # keys are stale now: the next exchange refetches
    fetches = op.jwks_fetches
    fetched_at = time.monotonic()
    assert (await exchange.post(exchange.form())).status == 200
    assert op.jwks_fetches == fetches + 1
    op.available = False
    seen: list[tuple[float, Result]] = []
    while time.monotonic() < fetched_at + 3.5:
        seen.append((time.monotonic() - fetched_at, await exchange.post(exchange.form())))
        await asyncio.sleep(0.1)
    for at, result in seen:
        if at < 1.9:
            assert result.status == 200, (at, result)
        if at > 2.3:
            assert result.status == 503, (at, result)
            assert b"temporarily_unavailable" in result.body
            assert result.retry_after is not None and int(result.retry_after) >= 1
    op.available = True
    await asyncio.sleep(0.25)
    assert (await exchange.post(exchange.form())).status == 200


async def test_random_kid_flood_fetches_at_most_once_per_min_refresh(
    start_exchange: ExchangeFactory,
) -> None:
    """2 s of tokens with random kids (jwks_min_refresh 1 s): every one invalid_request, and the
    OP's JWKS is fetched at most once per second (counted at the OP and in /metrics)."""
    exchange = await start_exchange(jwks_min_refresh=1)
    op = exchange.op
    assert (await exchange.post(exchange.form())).status == 200
    before = op.jwks_fetches
    metric = 'zonegate_jwks_fetches_total{issuer="' + op.issuer
    counted = await exchange.metric(metric)
    started = time.monotonic()
    results: list[Result] = []
    while (elapsed := time.monotonic() - started) < 2.0:
        tokens = [op.mint(headers={"kid": f"random-{elapsed}-{i}"}) for i in range(10)]
        results += await asyncio.gather(*(exchange.post(exchange.form(t)) for t in tokens))
    duration = time.monotonic() - started
    assert statuses(results) == {400: len(results)}
    assert len(results) >= 50
    fetches = op.jwks_fetches - before
    assert 1 <= fetches <= 1 + int(duration), (fetches, duration)
    assert await exchange.metric(metric) - counted == fetches


async def test_rate_limit_burst_then_refill(
    start_exchange: ExchangeFactory, op: DevOpenIDProvider
) -> None:
    """10 concurrent requests of a client with burst 3: exactly 3 succeed, 7 get 429 slow_down
    with Retry-After; after waiting that long it may exchange again; others are unaffected."""
    limited = {"client_id": "limited", "client_secret": "s3cret-limited", "zones": ["red"],
               "rate_limit": {"rate": 1, "burst": 3}}  # fmt: skip
    exchange = await start_exchange(clients=[*exchange_document(op)["clients"], limited])
    auth = basic("limited", "s3cret-limited")
    results = await asyncio.gather(*(exchange.post(exchange.form(), auth) for _ in range(10)))
    assert statuses(list(results)) == {200: 3, 429: 7}
    refused = [r for r in results if r.status == 429]
    assert all(b"slow_down" in r.body and r.retry_after == "1" for r in refused)
    assert (await exchange.post(exchange.form())).status == 200  # shop-frontend: no limit
    await asyncio.sleep(1.0)
    assert (await exchange.post(exchange.form(), auth)).status == 200


# -- the exchange server killed under load ----------------------------------------------------------


def remote_sidecar_document(token_endpoint: str, red_url: str) -> dict[str, Any]:
    """A remote-mode sidecar with one reverse route, /red/ -> red."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "exchange": {"mode": "remote", "token_endpoint": token_endpoint, "client_id": "shop-frontend",
                     "client_secret": "s3cret-shop", "timeout": 0.5, "retries": 1},
        "upstream": {"connect_timeout": 1, "read_timeout": 3},
        "routes": [{"name": "red", "path_prefix": "/red/", "strip_prefix": True, "upstream": red_url,
                    "audience": "billing", "scope": "billing:read"}],
    }  # fmt: skip


async def test_exchange_server_killed_under_load_and_restarted(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """`zonegate exchange` is SIGKILLed while the remote-mode sidecar is under load: every request
    is a 201 or a 503 with Retry-After, none takes longer than 2.5 s; once the program is back
    on the same port, every request succeeds again without restarting the sidecar."""
    launched = await exchange_program(programs, op, tmp_path / "exchange.yaml")
    exchange, url = launched.program, launched.url
    red = Backend("red")
    red_url = str((await aiohttp_server(red.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    proxy_app, admin_app = build_sidecar(
        parse_sidecar_config(remote_sidecar_document(f"{url}/token", red_url), tmp_path)
    )
    admin = await aiohttp_server(admin_app, host="127.0.0.1")
    proxy = await proxy_server(proxy_app)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, str(admin.make_url("/readyz")))

        async def call(i: int) -> Result:
            subject = op.mint({"sub": f"user-{i}-{time.monotonic()}"})  # a miss: a real exchange
            headers = {"Authorization": f"Bearer {subject}"}
            return await timed(session.get(proxy.make_url(f"/red/item/{i}"), headers=headers))

        assert statuses(await load(20, 10, call)) == {201: 20}
        under_load = asyncio.create_task(load(150, 10, call))
        await asyncio.sleep(0.2)
        exchange.signal(signal.SIGKILL)
        assert await exchange.wait() == -signal.SIGKILL
        down = await load(20, 10, call)
        assert statuses(down) == {503: 20}
        assert all(r.retry_after and int(r.retry_after) >= 1 for r in down)
        assert b"temporarily_unavailable" in down[0].body
        await exchange.start()
        mixed = await under_load
        assert set(statuses(mixed)) <= {201, 503}, statuses(mixed)
        assert all(r.retry_after for r in mixed if r.status == 503)
        assert max(r.seconds for r in mixed + down) < 2.5
        assert statuses(await load(40, 10, call)) == {201: 40}  # recovered, sidecar untouched
        async with session.get(admin.make_url("/readyz")) as r:
            assert r.status == 200


# -- upstreams that misbehave --------------------------------------------------------------------


@dataclass
class RawUpstream:
    """A TCP server on 127.0.0.1 that reads a request head, then misbehaves as told."""

    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    server: asyncio.Server | None = None
    connections: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            await self.behaviour(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.connections.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.server.wait_closed()


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()  # RST, not FIN


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage \r\n\r\n")
    await writer.drain()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3)


async def cut_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def cut_small_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


async def test_upstream_slow_resetting_or_garbage_then_healthy(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    tmp_path: Path,
) -> None:
    """Upstream resets: 502; answers garbage: 502; never answers: 504 after read_timeout; cuts a
    small body (read whole before answering) short: 502; cuts a streamed body short: the app's
    connection is cut (no invented status). The sidecar stays healthy: /healthz 200 and a good
    upstream still served."""
    servers = {name: RawUpstream(b) for name, b in
               (("reset", reset), ("garbage", garbage), ("silent", silent), ("cut", cut_body),
                ("cutsmall", cut_small_body))}  # fmt: skip
    urls = {name: await server.start() for name, server in servers.items()}
    red = Backend("red")
    red_url = str((await aiohttp_server(red.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    routes = [{"name": name, "path_prefix": f"/{name}/", "upstream": url, "audience": "billing"}
              for name, url in urls.items()]  # fmt: skip
    routes.append(
        {"name": "red", "path_prefix": "/red/", "upstream": red_url, "audience": "billing"}
    )
    document = {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "routes": routes,
        "exchange": {"mode": "embedded", "client_id": "shop-frontend", "core": exchange_document(op)},
        "upstream": {"connect_timeout": 1, "read_timeout": 0.5},
    }  # fmt: skip
    proxy_app, admin_app = build_sidecar(parse_sidecar_config(document, tmp_path))
    admin = await aiohttp_server(admin_app, host="127.0.0.1")
    proxy = await proxy_server(proxy_app)
    headers = {"Authorization": f"Bearer {op.mint()}"}
    expected = {"reset": (502, b"bad_gateway"), "garbage": (502, b"bad_gateway"),
                "silent": (504, b"gateway_timeout"), "cutsmall": (502, b"bad_gateway")}  # fmt: skip
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, str(admin.make_url("/readyz")))
            for name, (status, error) in expected.items():
                for method in ("GET", "POST"):
                    result = await timed(
                        session.request(
                            method,
                            proxy.make_url(f"/{name}/x"),
                            headers=headers,
                            data=b"d" if method == "POST" else None,
                        )
                    )
                    assert (result.status, error in result.body) == (status, True), (
                        name,
                        method,
                        result,
                    )
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(proxy.make_url("/cut/x"), headers=headers) as r:
                    assert r.status == 200  # the headers had gone out
                    await r.read()
            async with session.get(admin.make_url("/healthz")) as r:
                assert r.status == 200
            result = await timed(session.get(proxy.make_url("/red/x"), headers=headers))
            assert result.status == 201
    finally:
        for server in servers.values():
            await server.close()


# -- SIGTERM during load ---------------------------------------------------------------------------


def embedded_sidecar_document(
    op: DevOpenIDProvider, routes: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "shutdown_grace": 5,
        "exchange": {
            "mode": "embedded",
            "client_id": "shop-frontend",
            "core": exchange_document(op),
        },
        "routes": routes,
    }


async def test_sigterm_during_load_fails_no_request_in_flight(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """SIGTERM to `zonegate sidecar` while 20 requests wait on a slow upstream (1 s): all 20
    complete with the upstream's 201, then the program exits 0."""
    red = Backend("red", delay=1.0)
    red_url = str((await aiohttp_server(red.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    route = {
        "name": "red",
        "path_prefix": "/red/",
        "strip_prefix": True,
        "upstream": red_url,
        "audience": "billing",
    }
    config = write_yaml(tmp_path / "sidecar.yaml", embedded_sidecar_document(op, [route]))
    sidecar = programs("sidecar", "--config", str(config))
    listening = await sidecar.start()
    subject = op.mint()
    headers = {"Authorization": f"Bearer {subject}"}
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, listening["admin"] + "/readyz")

        async def call(i: int) -> Result:
            return await timed(session.get(f"{listening['sidecar']}/red/slow/{i}", headers=headers))

        in_flight = asyncio.create_task(load(20, 20, call))
        async with asyncio.timeout(5):
            while len(red.seen) < 20:  # every request is at the upstream now
                await asyncio.sleep(0.01)
        sidecar.signal(signal.SIGTERM)
        results = await in_flight
    assert statuses(results) == {201: 20}
    assert await sidecar.wait() == 0
    register_secret(subject)


# -- reload on SIGHUP -------------------------------------------------------------------------------


@dataclass
class Steady:
    """A bounded background load (at most ``limit`` requests, ``seconds`` long) until stopped."""

    one: Callable[[int], Awaitable[Result]]
    limit: int = 2000
    seconds: float = 15.0
    results: list[Result] = field(default_factory=list)
    stopped: bool = False

    async def run(self, workers: int = 4) -> list[Result]:
        deadline = time.monotonic() + self.seconds

        async def worker(w: int) -> None:
            i = w
            while (
                not self.stopped and len(self.results) < self.limit and time.monotonic() < deadline
            ):
                self.results.append(await self.one(i))
                i += workers

        await asyncio.gather(*(worker(w) for w in range(workers)))
        return self.results

    async def until(self, check: Callable[[Result], bool], timeout: float = 5.0) -> None:
        """Wait until a result arriving from now on satisfies ``check``."""
        seen = len(self.results)
        async with asyncio.timeout(timeout):
            while not any(check(r) for r in self.results[seen:]):
                await asyncio.sleep(0.02)


def expires_in(result: Result) -> int | None:
    return json.loads(result.body).get("expires_in") if result.status == 200 else None


async def test_exchange_sighup_reload_under_load(
    op: DevOpenIDProvider, programs: Callable[..., Program], tmp_path: Path
) -> None:
    """`zonegate exchange` under steady load: a valid new config (red lifetime 300 -> 120) takes
    effect on SIGHUP; an invalid one is refused, its errors logged by YAML path, and 120 stays;
    not one request of the load fails."""
    launched = await exchange_program(programs, op, tmp_path / "exchange.yaml")
    exchange, url = launched.program, launched.url
    document, config = launched.document, launched.config
    async with aiohttp.ClientSession() as session:
        client = Exchange(url, op, session)
        steady = Steady(lambda i: client.post(client.form()))
        running = asyncio.create_task(steady.run())
        await steady.until(lambda r: expires_in(r) == 300)
        document["zones"]["red"]["token_lifetime"] = 120
        write_yaml(config, document)
        exchange.signal(signal.SIGHUP)
        await steady.until(lambda r: expires_in(r) == 120)
        config.write_text(yaml.safe_dump(document) + "zones_typo: {}\n")
        exchange.signal(signal.SIGHUP)
        refused = await exchange.wait_for_log("config reload refused")
        assert "zones_typo" in refused
        mark = len(steady.results)
        async with asyncio.timeout(5):
            while len(steady.results) < mark + 20:
                await asyncio.sleep(0.02)
        steady.stopped = True
        results = await running
    assert statuses(results) == {200: len(results)}, statuses(results)
    assert {expires_in(r) for r in results[mark:]} == {120}  # the old (valid) config serves
    exchange.signal(signal.SIGTERM)
    assert await exchange.wait() == 0


async def test_sidecar_sighup_reload_under_load(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """`zonegate sidecar` under steady load on /red/: a valid new config adding /green/ takes effect
    on SIGHUP; an invalid one is refused with its errors by YAML path and /green/ stays; not one
    request of the load fails, and the unchanged embedded exchange keeps its zone keys."""
    red, green = Backend("red"), Backend("green")
    red_url = str((await aiohttp_server(red.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    green_url = str((await aiohttp_server(green.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    routes = [
        {
            "name": "red",
            "path_prefix": "/red/",
            "strip_prefix": True,
            "upstream": red_url,
            "audience": "billing",
        }
    ]
    document = embedded_sidecar_document(op, routes)
    config = write_yaml(tmp_path / "sidecar.yaml", document)
    sidecar = programs("sidecar", "--config", str(config))
    listening = await sidecar.start()
    headers = {"Authorization": f"Bearer {op.mint()}"}
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, listening["admin"] + "/readyz")
        jwks_url = listening["admin"] + "/zones/red/jwks.json"
        async with session.get(jwks_url) as r:
            keys_before = await r.json()

        async def green_status() -> int:
            return (
                await timed(session.get(f"{listening['sidecar']}/green/x", headers=headers))
            ).status

        assert await green_status() == 404
        steady = Steady(
            lambda i: timed(session.get(f"{listening['sidecar']}/red/{i}", headers=headers))
        )
        running = asyncio.create_task(steady.run())
        await steady.until(lambda r: r.status == 201)
        document["routes"] = [
            *routes,
            {
                "name": "green",
                "path_prefix": "/green/",
                "upstream": green_url,
                "audience": "orders",
            },
        ]
        write_yaml(config, document)
        sidecar.signal(signal.SIGHUP)
        await sidecar.wait_for_log("config reloaded")
        assert await green_status() == 201
        document["routes"].append(
            {"name": "broken", "path_prefix": "/broken/", "audience": "orders"}
        )
        write_yaml(config, document)
        sidecar.signal(signal.SIGHUP)
        refused = await sidecar.wait_for_log("config reload refused")
        assert "routes[2].upstream" in refused
        assert await green_status() == 201
        await steady.until(lambda r: r.status == 201)
        steady.stopped = True
        results = await running
        async with session.get(jwks_url) as r:
            assert await r.json() == keys_before
    assert statuses(results) == {201: len(results)}, statuses(results)
    assert len(results) >= 20
    sidecar.signal(signal.SIGTERM)
    assert await sidecar.wait() == 0
