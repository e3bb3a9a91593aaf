"""Every listener of every program closes a client that sends no complete request head in
time (idle, or trickling a byte now and then) and a keep-alive connection left idle: raw
sockets against the real `zonegate sidecar`, `exchange` and `injector` processes."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from devkit.provider import DevOpenIDProvider
from tests.conftest import exchange_document
from tests.test_inject import IMAGE, write_cert
from tests.test_sidecar import Backend, closed_port_url, sidecar_document

ServerFactory = Callable[..., Awaitable[Any]]
HEADER = 0.6  # listeners.header_timeout in every config below
KEEPALIVE = 2.5  # listeners.keepalive_timeout
SLACK = 1.5  # a busy machine's scheduling: a bound is met when closed within bound + SLACK
TIMEOUTS = {"header_timeout": HEADER, "keepalive_timeout": KEEPALIVE}


@dataclass(frozen=True)
class Endpoint:
    """One listener: where it is, its TLS trust, a path it answers quickly."""

    name: str
    port: int
    path: str
    tls: ssl.SSLContext | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls)


async def program(
    args: list[str], document: dict[str, Any], folder: Path, listeners: int
) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """Start ``python -m zonegate.cli <args> --config F``; its ports by listener name."""
    config_file = folder / f"{args[0]}.yaml"
    config_file.write_text(yaml.safe_dump(document))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zonegate.cli", *args, "--config", str(config_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    ports: dict[str, int] = {}
    while len(ports) < listeners:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line, f"{args[0]} exited before listening"
        if " listening on " in line:
            ports[line.split()[1]] = int(line.rsplit(":", 1)[1])
    return process, ports


@pytest.fixture
async def endpoints(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[tuple[list[Endpoint], Backend]]:
    """The sidecar (proxy and admin), the exchange server and the injector (TLS), each with
    ``listeners:`` set; and the sidecar's slow upstream."""
    slow = Backend("red", delay=3 * HEADER)
    upstream = str((await aiohttp_server(slow.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    sidecar = sidecar_document(op, upstream, closed_port_url())
    sidecar |= {"listeners": TIMEOUTS, "upstream": {"read_timeout": 10}}
    exchange = exchange_document(op) | {"listen": "127.0.0.1:0", "listeners": TIMEOUTS}
    ca = trustme.CA()
    write_cert(ca, tmp_path)
    injector = {
        "image": IMAGE,
        "listen": "127.0.0.1:0",
        "tls_cert_file": "tls.crt",
        "tls_key_file": "tls.key",
        "listeners": TIMEOUTS,
    }
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    started = [
        await program(["sidecar"], sidecar, tmp_path, 2),
        await program(["exchange"], exchange, tmp_path, 1),
        await program(["injector"], injector, tmp_path, 1),
    ]
    ports = {name: port for _, found in started for name, port in found.items()}
    try:
        yield (
            [
                Endpoint("sidecar", ports["sidecar"], "/nowhere"),  # no route: a quick 404
                Endpoint("admin", ports["admin"], "/healthz"),
                Endpoint("exchange", ports["exchange"], "/healthz"),
                Endpoint("injector", ports["injector"], "/healthz", client_tls),
            ],
            slow,
        )
    finally:
        for process, _ in started:
            process.kill()
            await process.wait()


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float) -> float:
    """How long until the server closes the connection (EOF or reset), at most ``limit``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return float("inf")
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    return time.monotonic() - started


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float = 0.1) -> None:
    """Send ``data`` one byte at a time, forever (a head that never completes)."""
    try:
        while True:
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(pause)
    except (OSError, ssl.SSLError, RuntimeError):
        return  # closed under us: what the test waits for


async def answered(endpoint: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has had one request answered and is kept alive."""
    reader, writer = await endpoint.connect()
    writer.write(f"GET {endpoint.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    assert b"keep-alive" in head.lower() or b"connection: close" not in head.lower()
    return reader, writer


async def idle(endpoint: Endpoint) -> float:
    reader, writer = await endpoint.connect()
    try:
        return await seconds_until_closed(reader, HEADER + KEEPALIVE + SLACK)
    finally:
        writer.close()


async def trickling(endpoint: Endpoint) -> float:
    reader, writer = await endpoint.connect()
    pump = asyncio.ensure_future(trickle(writer, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 200))
    try:
        return await seconds_until_closed(reader, HEADER + KEEPALIVE + SLACK)
    finally:
        pump.cancel()
        writer.close()


async def idle_after_an_answer(endpoint: Endpoint) -> float:
    reader, writer = await answered(endpoint)
    try:
        return await seconds_until_closed(reader, KEEPALIVE + 2 * SLACK)
    finally:
        writer.close()


async def trickling_after_an_answer(endpoint: Endpoint) -> float:
    reader, writer = await answered(endpoint)
    pump = asyncio.ensure_future(trickle(writer, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 200))
    try:
        return await seconds_until_closed(reader, KEEPALIVE + 2 * SLACK)
    finally:
        pump.cancel()
        writer.close()


async def test_every_listener_closes_idle_and_trickling_clients_within_the_bounds(
    endpoints: tuple[list[Endpoint], Backend],
) -> None:
    """A new connection gets header_timeout for its first complete head, silent or trickling;
    after an answer, keepalive_timeout for the next one, silent or trickling."""
    listeners, _ = endpoints
    probes = {
        "idle": (idle, HEADER),
        "trickling": (trickling, HEADER),
        "idle after an answer": (idle_after_an_answer, KEEPALIVE),
        "trickling after an answer": (trickling_after_an_answer, KEEPALIVE),
    }
    cases = [(e, name, probe, bound) for e in listeners for name, (probe, bound) in probes.items()]
    seconds = await asyncio.gather(*(probe(e) for e, _, probe, _ in cases))
    late = [
        f"{e.name} {name}: {took:.2f} s (bound {bound} s)"
        for (e, name, _, bound), took in zip(cases, seconds, strict=True)
        if not bound * 0.8 <= took <= bound + SLACK
    ]
    assert late == []


async def test_a_request_whose_head_arrived_is_never_cut_by_the_head_deadline(
    endpoints: tuple[list[Endpoint], Backend], op: DevOpenIDProvider
) -> None:
    """A proxied call to an upstream slower than header_timeout completes: the deadline ends
    with the head, not with the answer."""
    listeners, slow = endpoints
    sidecar = listeners[0]
    headers = {"Authorization": f"Bearer {op.login('alice')}", "Host": "billing.red.internal"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{sidecar.port}/x", headers=headers) as r,
    ):
        assert r.status == 201
    assert len(slow.seen) == 1
