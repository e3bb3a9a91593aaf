"""Rolling updates with real processes on 127.0.0.1: drains that close idle connections at once,
a sidecar whose exchange client rides over an exchange-server restart, reloads that keep the
token cache, and readiness when one zone's exchange is down."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import jwt
from aiohttp.test_utils import TestServer
from yarl import URL

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.keys import generate_private_key, signing_key
from exchange.server.app import create_app
from exchange.tokens import TOKEN_TYPE_ACCESS_TOKEN, TokenExchangeRequest
from sidecar.app import build_sidecar
from sidecar.config import RemoteExchange, parse_sidecar_config
from sidecar.exchanger import RemoteExchanger
from tests.conftest import exchange_document
from tests.programs import Program, exchange_program, free_port, write_yaml
from tests.test_faults import (
    Result,
    ServerFactory,
    Steady,
    embedded_sidecar_document,
    load,
    statuses,
    timed,
)
from tests.test_sidecar import Backend, wait_ready

EXIT_ONCE_IDLE = 2.0  # seconds a drained program may take to exit once nothing is in flight


async def idle_keepalive(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 connection that asked for ``url`` once and now sits idle, kept alive."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    writer.write(f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return reader, writer


async def test_exchange_server_exits_at_once_despite_an_idle_keepalive_connection(
    op: DevOpenIDProvider, programs: Callable[..., Program], tmp_path: Path
) -> None:
    """SIGTERM to `zonegate exchange` while a client holds an idle keep-alive connection: the
    connection is closed at once and the program exits 0 within 2 s (not after the grace)."""
    launched = await exchange_program(programs, op, tmp_path / "x.yaml")
    exchange, url = launched.program, launched.url
    reader, writer = await idle_keepalive(url + "/healthz")
    started = time.monotonic()
    exchange.signal(signal.SIGTERM)
    async with asyncio.timeout(EXIT_ONCE_IDLE):
        assert await reader.read() == b""  # closed by the server, no answer owed
    assert await exchange.wait() == 0
    took = time.monotonic() - started
    writer.close()
    assert took < EXIT_ONCE_IDLE, took


async def test_sidecar_drain_answers_in_flight_with_connection_close_and_exits_once_idle(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """SIGTERM to `zonegate sidecar` with one request in flight (slow upstream, 1 s) and one idle
    keep-alive connection: the idle one closes at once, the request still gets the upstream's
    201 carrying `Connection: close`, and the program exits 0 within 2 s after it."""
    red = Backend("red", delay=1.0)
    server: TestServer = await aiohttp_server(red.app(), host="127.0.0.1")
    route = {
        "name": "red",
        "path_prefix": "/red/",
        "upstream": str(server.make_url("")).rstrip("/"),
        "audience": "billing",
    }
    document = embedded_sidecar_document(op, [route])
    document["shutdown_grace"] = 30
    sidecar = programs("sidecar", "--config", str(write_yaml(tmp_path / "s.yaml", document)))
    listening = await sidecar.start()
    headers = {"Authorization": f"Bearer {op.mint()}"}
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, listening["admin"] + "/readyz")
        reader, writer = await idle_keepalive(listening["admin"] + "/healthz")

        async def slow() -> tuple[int, str]:
            async with session.get(listening["sidecar"] + "/red/slow", headers=headers) as r:
                await r.read()
                return r.status, r.headers.get("Connection", "")

        in_flight = asyncio.create_task(slow())
        async with asyncio.timeout(5):
            while not red.seen:
                await asyncio.sleep(0.01)
        sidecar.signal(signal.SIGTERM)
        async with asyncio.timeout(0.5):
            assert await reader.read() == b""  # the idle connection did not wait for the drain
        writer.close()
        assert await in_flight == (201, "close")
        answered = time.monotonic()
        assert await sidecar.wait() == 0
        assert time.monotonic() - answered < EXIT_ONCE_IDLE


# -- the sidecar's exchange client across a closed pooled connection ------------------------------


class ClosingTokenEndpoint:
    """A raw HTTP/1.1 token endpoint that answers the first request on each connection (kept
    alive) and closes the connection, unanswered, when a second one arrives on it: what a
    restarting exchange server does to a pooled connection in the worst moment."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []  # form fields, in arrival order
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/token"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for answered in (False, True):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = (await reader.readexactly(length)).decode()
                self.requests.append(dict(parse_qsl(body)))
                if answered:
                    return  # the second request on this connection: closed, no answer
                answer = json.dumps(
                    {
                        "access_token": f"zone-token-{len(self.requests)}",
                        "token_type": "Bearer",
                        "expires_in": 300,
                        "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_exchange_on_a_pooled_connection_closed_unanswered_is_sent_again_at_once() -> None:
    """The exchange server closes the sidecar's pooled connection just as a POST /token goes out:
    the exchange still succeeds (retries: 0 — the resend is not a retry of a failure), at once,
    on a new connection, with a newly signed private_key_jwt assertion (a new jti)."""
    endpoint = ClosingTokenEndpoint()
    url = await endpoint.start()
    settings = RemoteExchange(
        client_id="signer",
        token_endpoint=url,
        client_key=signing_key(generate_private_key("ES256")),
        retries=0,
    )
    exchanger = RemoteExchanger(settings)
    request = TokenExchangeRequest(subject_token="subject-token", audience=("billing",))
    try:
        first = await exchanger.exchange(request)
        started = time.monotonic()
        second = await exchanger.exchange(request)
        took = time.monotonic() - started
    finally:
        await exchanger.close()
        await endpoint.close()
    assert (first.access_token, second.access_token) == ("zone-token-1", "zone-token-3")
    assert endpoint.connections == 2 and len(endpoint.requests) == 3
    assert took < 0.5, took  # no backoff pause
    jtis = [jwt.decode(r["client_assertion"], options={"verify_signature": False})["jti"]
            for r in endpoint.requests]  # fmt: skip
    assert len(set(jtis)) == 3


# -- remote-mode sidecar and exchange server, both as programs ------------------------------------


async def metric(session: aiohttp.ClientSession, admin: str, line_start: str) -> float:
    """The sum of the samples on /metrics whose line starts with ``line_start``."""
    async with session.get(admin + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


def remote_sidecar_document(
    exchange_url: str, routes: list[dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "shutdown_grace": 5,
        "exchange": {
            "mode": "remote",
            "token_endpoint": exchange_url + "/token",
            "client_id": "shop-frontend",
            "client_secret": "s3cret-shop",
        },
        "routes": routes,
        **overrides,
    }


def route(name: str, upstream: str, audience: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "path_prefix": f"/{name}/", "upstream": upstream, "audience": audience,
            **more}  # fmt: skip


async def test_sighup_under_load_keeps_cached_users_cached(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """Two SIGHUPs while 20 cached users call /red/ steadily: not one red exchange more, every
    request 201; /green/, whose scope the reload changed, is evicted (reason reload) and
    exchanged again; and with the exchange server then down, the cached users still get 201."""
    launched = await exchange_program(programs, op, tmp_path / "x.yaml")
    exchange, url = launched.program, launched.url
    backend = Backend("zone")
    upstream = str((await aiohttp_server(backend.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    routes = [route("red", upstream, "billing"), route("green", upstream, "orders")]
    document = remote_sidecar_document(url, routes)
    config = write_yaml(tmp_path / "s.yaml", document)
    sidecar = programs("sidecar", "--config", str(config))
    listening = await sidecar.start()
    proxy, admin = listening["sidecar"], listening["admin"]
    users = [{"Authorization": f"Bearer {op.mint({'sub': f'user{i}'})}"} for i in range(20)]
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, admin + "/readyz")

        async def call(path: str, i: int) -> Result:
            return await timed(session.get(f"{proxy}{path}{i}", headers=users[i % len(users)]))

        warm = await load(40, 20, lambda i: call("/red/" if i < 20 else "/green/", i))
        assert statuses(warm) == {201: 40}
        red_exchanges = 'zonegate_sidecar_exchanges_total{outcome="ok",zone="red"}'
        green_exchanges = 'zonegate_sidecar_exchanges_total{outcome="ok",zone="green"}'
        assert await metric(session, admin, red_exchanges) == 20
        steady = Steady(lambda i: call("/red/", i), seconds=8.0)
        running = asyncio.create_task(steady.run(workers=20))
        await steady.until(lambda r: r.status == 201)
        document["routes"] = [
            route("red", upstream, "billing"),
            route("green", upstream, "orders", scope="orders:read"),  # a new target
            route("blue", upstream, "billing", path_prefix="/blue/"),
        ]
        write_yaml(config, document)
        for _ in range(2):
            mark = len(sidecar.err)
            sidecar.signal(signal.SIGHUP)
            async with asyncio.timeout(5):
                while not any("config reloaded" in line for line in sidecar.err[mark:]):
                    await asyncio.sleep(0.02)
            await steady.until(lambda r: r.status == 201)
        steady.stopped = True
        results = await running
        assert statuses(results) == {201: len(results)}, statuses(results)
        assert len(results) >= 100
        assert await metric(session, admin, red_exchanges) == 20  # no red exchange after reloads
        reloaded = 'zonegate_sidecar_token_cache_evictions_total{reason="reload"}'
        assert await metric(session, admin, reloaded) == 20  # green's 20 entries only
        green = await load(20, 20, lambda i: call("/green/", i))
        assert statuses(green) == {201: 20}
        assert await metric(session, admin, green_exchanges) == 40
        exchange.signal(signal.SIGTERM)
        assert await exchange.wait() == 0
        cached = await load(20, 20, lambda i: call("/red/", i))
        assert statuses(cached) == {201: 20}  # served from the cache with the exchange down
    sidecar.signal(signal.SIGTERM)
    assert await sidecar.wait() == 0


# -- readiness in segregated mode --------------------------------------------------------------


async def test_one_zone_exchange_down_at_start_does_not_keep_the_pod_unready(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
    tmp_path: Path,
) -> None:
    """Segregated mode, green's exchange server down at start: the sidecar is ready (a route's
    exchange is not required by default), red serves 201, green answers 503 with Retry-After,
    and green serves once its exchange server comes up, without a restart. Marked
    `required: true`, the same down exchange keeps another sidecar unready."""
    red_port = free_port()
    # green's port stays bound (never listening) until its server starts: a connection is
    # refused, and no other test's server can take the port meanwhile (it once answered 502)
    green_holder = socket.socket()
    green_holder.bind(("127.0.0.1", 0))
    green_port = green_holder.getsockname()[1]
    red_url, green_url = f"http://127.0.0.1:{red_port}", f"http://127.0.0.1:{green_port}"
    red_exchange = create_app(
        parse_exchange_config(exchange_document(op, issuer=red_url), tmp_path)
    )
    await aiohttp_server(red_exchange, host="127.0.0.1", port=red_port)
    backend = Backend("zone")
    upstream = str((await aiohttp_server(backend.app(), host="127.0.0.1")).make_url("")).rstrip("/")

    def own_exchange(url: str, **more: Any) -> dict[str, Any]:
        return {"mode": "remote", "token_endpoint": url + "/token", "client_id": "shop-frontend",
                "client_secret": "s3cret-shop", "retries": 0, **more}  # fmt: skip

    async def sidecar(**green_more: Any) -> tuple[str, str]:
        document = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "routes": [
                route("red", upstream, "billing", exchange=own_exchange(red_url)),
                route("green", upstream, "orders", exchange=own_exchange(green_url, **green_more)),
            ],
        }
        proxy_app, admin_app = build_sidecar(parse_sidecar_config(document, tmp_path))
        admin = await aiohttp_server(admin_app, host="127.0.0.1")
        proxy = await proxy_server(proxy_app)
        return str(proxy.make_url("")).rstrip("/"), str(admin.make_url("")).rstrip("/")

    headers = {"Authorization": f"Bearer {op.mint()}"}
    async with aiohttp.ClientSession() as session:
        proxy, admin = await sidecar()
        await wait_ready(session, admin + "/readyz")
        red = await timed(session.get(proxy + "/red/x", headers=headers))
        green = await timed(session.get(proxy + "/green/x", headers=headers))
        assert (red.status, green.status) == (201, 503)
        assert green.retry_after is not None
        _, strict_admin = await sidecar(required=True)
        await asyncio.sleep(1.0)  # it keeps trying green
        async with session.get(strict_admin + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["checks"]["exchange_reached"] is False
        green_exchange = create_app(
            parse_exchange_config(exchange_document(op, issuer=green_url), tmp_path)
        )
        green_holder.close()
        await aiohttp_server(green_exchange, host="127.0.0.1", port=green_port)
        green = await timed(session.get(proxy + "/green/x", headers=headers))
        assert green.status == 201
        await wait_ready(session, strict_admin + "/readyz")


# -- a rolling update of the exchange server under load --------------------------------------------

ROLLING_CLIENTS = 20  # concurrent app clients
ROLLING_SECONDS = 4.0  # how long the load runs
NEW_USER_EVERY = 5  # each client logs in as a new user every this many requests (an exchange)


async def test_rolling_update_of_the_exchange_server_fails_no_app_request(
    op: DevOpenIDProvider,
    aiohttp_server: ServerFactory,
    programs: Callable[..., Program],
    tmp_path: Path,
) -> None:
    """A remote-mode sidecar under steady load (20 clients, about 4 s, a new user every 5th
    request) while its exchange server is SIGTERMed and a new one started on the same port:
    not one app request fails, and the old server exits within 2 s."""
    launched = await exchange_program(programs, op, tmp_path / "x.yaml")
    old, url, exchange_config = launched.program, launched.url, launched.config
    backend = Backend("zone")
    upstream = str((await aiohttp_server(backend.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    document = remote_sidecar_document(url, [route("red", upstream, "billing")])
    document["exchange"].update({"retries": 5, "timeout": 2})  # rides over the restart's gap
    sidecar = programs("sidecar", "--config", str(write_yaml(tmp_path / "s.yaml", document)))
    proxy = (await sidecar.start())["sidecar"]
    tokens: dict[tuple[int, int], str] = {}

    async def call(i: int) -> Result:
        client, n = i % ROLLING_CLIENTS, i // ROLLING_CLIENTS
        user = (client, n // NEW_USER_EVERY)
        if user not in tokens:
            tokens[user] = op.mint({"sub": f"user-{client}-{user[1]}"})
        headers = {"Authorization": f"Bearer {tokens[user]}"}
        return await timed(session.get(f"{proxy}/red/{i}", headers=headers))

    async with aiohttp.ClientSession() as session:
        await wait_ready(session, sidecar.listening()["admin"] + "/readyz")
        steady = Steady(call, limit=20000, seconds=ROLLING_SECONDS)
        running = asyncio.create_task(steady.run(workers=ROLLING_CLIENTS))
        await asyncio.sleep(1.0)
        before = len(steady.results)
        sigterm = time.monotonic()
        old.signal(signal.SIGTERM)
        drained = await old.wait_for_log('"drained"')
        assert await old.wait() == 0
        old_exit = time.monotonic() - sigterm
        new = programs("exchange", "--config", str(exchange_config))
        await new.start()
        gap = time.monotonic() - sigterm
        results = await running
    failed = len(results) - statuses(results).get(201, 0)
    exchanges = len(tokens)
    print(
        f"rolling update: {len(results)} app requests ({before} before SIGTERM), "
        f"{exchanges} users exchanged, failed {failed}; old exchange server exited "
        f"{old_exit:.2f} s after SIGTERM ({drained.strip()}); new one listening "
        f"{gap:.2f} s after SIGTERM"
    )
    assert failed == 0, statuses(results)
    assert old_exit < EXIT_ONCE_IDLE, old_exit
    assert len(results) > before > 0 and exchanges > ROLLING_CLIENTS
    sidecar.signal(signal.SIGTERM)
    assert await sidecar.wait() == 0
