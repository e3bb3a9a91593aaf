"""sidecar.upstream against real servers on 127.0.0.1: aiohttp ones, and raw ones sending bytes."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from sidecar.upstream import (
    Origin,
    UnsafeRequest,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)

MiB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[Origin, list[int]]]:
    """A raw asyncio server; yields its origin and a list that grows by one per accept."""
    accepts: list[int] = []

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepts.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Origin("http", "127.0.0.1", port), accepts
    finally:
        server.close()
        await server.wait_closed()


def answering(*answers: bytes) -> Handler:
    """A handler that reads one request head per answer and writes the answers in turn."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the client closes

    return handler


@contextlib.asynccontextmanager
async def app_server(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Origin]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Origin("https" if ssl_context else "http", "127.0.0.1", port)
    finally:
        await runner.cleanup()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=2.0, read_timeout=2.0)
    yield p
    await p.close()


async def fetch(pool: UpstreamPool, origin: Origin, method: str = "GET") -> tuple[int, bytes]:
    async with await pool.request(origin, method, "/") as r:
        return r.status, await r.read()


def rss_kib() -> int:
    """This process's resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def header(r: UpstreamResponse, name: bytes) -> bytes | None:
    return next((v for n, v in r.headers if n.lower() == name), None)


# -- keep-alive -----------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(pool: UpstreamPool) -> None:
    """N requests one after another cost one TCP accept."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(*[ok] * 20)) as (origin, accepts):
        for _ in range(20):
            assert await fetch(pool, origin) == (200, b"ok")
    assert len(accepts) == 1


def test_keep_alive_on_uvloop() -> None:
    """The sidecar runs on uvloop, whose transports are not asyncio's classes: same behaviour."""
    uvloop = pytest.importorskip("uvloop")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> tuple[list[tuple[int, bytes]], int]:
        pool = UpstreamPool()
        try:
            async with raw_server(answering(ok, ok, ok)) as (origin, accepts):
                answers = [await fetch(pool, origin) for _ in range(3)]
                return answers, len(accepts)
        finally:
            await pool.close()

    answers, accepts = uvloop.run(main())
    assert answers == [(200, b"ok")] * 3
    assert accepts == 1


async def test_aiohttp_server_keeps_one_connection_and_sees_our_headers(pool: UpstreamPool) -> None:
    """An aiohttp server gets Host, our headers in order, and one connection for all requests."""
    peers: set[object] = set()

    async def echo(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text=f"{request.host}|{request.headers['X-A']}|{request.path_qs}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    async with app_server(app) as origin:
        for i in range(5):
            r = await pool.request(origin, "GET", f"/p?i={i}", [("X-A", "b c")])
            assert await r.read() == f"{origin.authority}|b c|/p?i={i}".encode()
            r.release()
    assert len(peers) == 1


async def test_connection_close_answer_is_not_reused(pool: UpstreamPool) -> None:
    """An answer with Connection: close leaves nothing in the pool."""
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    async with raw_server(answering(answer)) as (origin, accepts):
        assert await fetch(pool, origin) == (200, b"x")
        assert pool.idle_count(origin) == 0
    assert len(accepts) == 1


async def test_unread_body_closes_the_connection(pool: UpstreamPool) -> None:
    """Releasing before the body's end closes the connection instead of pooling it."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
    async with raw_server(answering(answer)) as (origin, _):
        r = await pool.request(origin, "GET", "/")
        r.release()
        assert pool.idle_count(origin) == 0


async def test_server_closing_an_idle_connection_means_a_fresh_one(pool: UpstreamPool) -> None:
    """A pooled connection the server closed is dropped; the next request opens a new one."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok)
        await writer.drain()  # the handler ends: the server closes the connection

    async with raw_server(once_then_close) as (origin, accepts):
        assert await fetch(pool, origin) == (200, b"ok")
        for _ in range(100):
            if pool.idle_count(origin) == 0:
                break
            await asyncio.sleep(0.01)
        assert await fetch(pool, origin) == (200, b"ok")
    assert len(accepts) == 2


async def test_close_racing_a_reused_connection_is_upstream_closed_reused(
    pool: UpstreamPool,
) -> None:
    """A request on a pooled connection that dies unanswered says so (reused=True)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def answer_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second request: dropped unanswered

    async with raw_server(answer_then_drop) as (origin, _):
        assert await fetch(pool, origin) == (200, b"ok")
        with pytest.raises(UpstreamClosed) as caught:
            await fetch(pool, origin)
        assert caught.value.reused


# -- response framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
    ],
)
async def test_bodies_by_length_and_chunked_are_read_and_pooled(
    pool: UpstreamPool, answer: bytes, body: bytes
) -> None:
    """Content-Length and chunked bodies arrive whole; the connection goes back to the pool."""
    async with raw_server(answering(answer, answer)) as (origin, accepts):
        assert await fetch(pool, origin) == (200, body)
        assert pool.idle_count(origin) == 1
        assert await fetch(pool, origin) == (200, body)
    assert len(accepts) == 1


async def test_body_delimited_by_close(pool: UpstreamPool) -> None:
    """A body without length runs to the end of the connection, which is then not reused."""

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b" the end")
        await writer.drain()

    async with raw_server(close_delimited) as (origin, _):
        assert await fetch(pool, origin) == (200, b"until the end")
        assert pool.idle_count(origin) == 0


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    ],
)
async def test_answers_without_body_end_at_their_headers(
    pool: UpstreamPool, method: str, answer: bytes
) -> None:
    """HEAD, 204 and 304 have no body whatever they announce; the connection stays usable."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(answer, ok)) as (origin, accepts):
        async with await pool.request(origin, method, "/") as r:
            assert await asyncio.wait_for(r.read(), 1) == b""
        assert await fetch(pool, origin) == (200, b"ok")
    assert len(accepts) == 1


async def test_interim_1xx_answers_are_skipped(pool: UpstreamPool) -> None:
    """100 Continue and 103 Early Hints come before the answer; the caller sees the final one."""
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 4\r\n\r\ndone"
    )
    async with raw_server(answering(answer)) as (origin, _):
        r = await pool.request(origin, "GET", "/")
        async with r:
            assert (r.status, r.reason) == (201, "Created")
            assert r.headers == [(b"X-Final", b"yes"), (b"Content-Length", b"4")]
            assert await r.read() == b"done"


async def test_unrequested_101_is_a_protocol_error(pool: UpstreamPool) -> None:
    """Upgrades bypass this client: a 101 it never asked for is refused."""
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    async with raw_server(answering(answer)) as (origin, _):
        with pytest.raises(UpstreamProtocolError):
            await fetch(pool, origin)


# -- strictness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3, 5\r\n\r\nabcde",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad : v\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
async def test_smuggling_shaped_answers_are_refused(pool: UpstreamPool, answer: bytes) -> None:
    """CL with TE, repeated or odd Content-Length, bare LF, bad chunks: UpstreamProtocolError."""
    async with raw_server(answering(answer)) as (origin, _):
        with pytest.raises(UpstreamProtocolError):
            await fetch(pool, origin)
        assert pool.idle_count(origin) == 0


async def test_bytes_after_the_answer_poison_the_connection(pool: UpstreamPool) -> None:
    """A second answer nobody asked for closes the connection rather than answer the next request."""
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(extra, ok)) as (origin, accepts):
        status, body = await fetch(pool, origin)
        assert (status, body) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await fetch(pool, origin) == (200, b"ok")
    assert len(accepts) == 2


@pytest.mark.parametrize(
    "headers",
    [
        [("X-A", "v\r\nX-Injected: 1")],
        [("X-A", "v\nX-Injected: 1")],
        [("X-A", "v\rX")],
        [("X-A", "v\x00")],
        [("X-A\r\nX-Injected", "1")],
        [("X A", "1")],
        [("X-A:", "1")],
        [("Content-Length", "5")],
        [("transfer-encoding", "chunked")],
        [("Host", "elsewhere")],
        [("Connection", "upgrade")],
    ],
)
async def test_response_splitting_headers_are_refused_before_sending(
    pool: UpstreamPool, headers: list[tuple[str, str]]
) -> None:
    """CR, LF or NUL in a header, a non-token name, or a framing header: UnsafeRequest, nothing sent."""
    async with raw_server(answering()) as (origin, accepts):
        with pytest.raises(UnsafeRequest):
            await pool.request(origin, "GET", "/", headers)
    assert accepts == []


@pytest.mark.parametrize(
    ("method", "target"), [("GET", "/a b"), ("GET", "/\r\nX: 1"), ("G T", "/")]
)
async def test_unsafe_request_lines_are_refused(
    pool: UpstreamPool, method: str, target: str
) -> None:
    """A space or control character in the method or target: UnsafeRequest."""
    with pytest.raises(UnsafeRequest):
        await pool.request(Origin("http", "127.0.0.1", 9), method, target)


# -- request bodies -------------------------------------------------------------------------------


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        framing = "chunked" if request.headers.get("Transfer-Encoding") else "length"
        return web.Response(body=body, headers={"X-Framing": framing})

    app = web.Application()
    app.router.add_post("/", echo)
    return app


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


@pytest.mark.parametrize(
    ("body", "length", "framing"),
    [
        (b"whole body", None, b"length"),
        (parts(b"one ", b"", b"two"), None, b"chunked"),
        (parts(b"one ", b"two"), 7, b"length"),
    ],
)
async def test_request_bodies_by_length_and_chunked(
    pool: UpstreamPool, body: bytes | AsyncIterator[bytes], length: int | None, framing: bytes
) -> None:
    """Bytes go with Content-Length, a stream chunked, or by length when the caller knows it."""
    async with app_server(echo_app()) as origin:
        r = await pool.request(origin, "POST", "/", body=body, content_length=length)
        async with r:
            assert header(r, b"x-framing") == framing
            assert await r.read() in (b"whole body", b"one two")


async def test_streamed_body_longer_than_announced_is_refused(pool: UpstreamPool) -> None:
    """A stream that overruns its Content-Length is cut: the server never sees an extra byte."""
    async with raw_server(answering()) as (origin, _):
        with pytest.raises((UnsafeRequest, UpstreamClosed)):
            r = await pool.request(origin, "POST", "/", body=parts(b"toolong"), content_length=3)
            await r.read()


async def test_request_body_waits_for_a_slow_server(pool: UpstreamPool) -> None:
    """A server that reads slowly holds the sender at the transport's write buffer."""
    produced = 0

    async def big() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(256):
            produced += 64 * 1024
            yield b"x" * (64 * 1024)

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        received = 0
        while received < 16 * MiB:
            received += len(await reader.read(64 * 1024))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with raw_server(slow_reader) as (origin, _):
        task = asyncio.ensure_future(
            pool.request(origin, "POST", "/", body=big(), content_length=16 * MiB)
        )
        await asyncio.sleep(0.2)
        assert produced < 8 * MiB  # held back, not buffered in our process
        async with await task as r:
            assert r.status == 200


# -- flow control down ----------------------------------------------------------------------------


async def test_100_mib_through_a_slow_consumer_stays_bounded() -> None:
    """A slow reader pauses the upstream socket: never more than a high-water mark is queued."""
    block = b"z" * (64 * 1024)
    total = 100 * MiB

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()

    pool = UpstreamPool(high_water=64 * 1024, read_timeout=5.0)
    rss_before = rss_kib()
    try:
        async with raw_server(big) as (origin, _):
            r = await pool.request(origin, "GET", "/")
            received, most, paused = 0, 0, 0
            async for chunk in r:
                received += len(chunk)
                exchange = r._exchange
                most = max(most, exchange.buffered + len(chunk))
                if received % MiB < len(chunk):
                    await asyncio.sleep(0.003)  # the slow consumer
                    paused += exchange.paused
            r.release()
    finally:
        await pool.close()
    assert received == total
    assert paused > 0
    assert most <= 64 * 1024 + 256 * 1024  # high water plus one socket read
    assert rss_kib() - rss_before < 40 * 1024


# -- failures -------------------------------------------------------------------------------------


async def test_connect_refused_is_a_connect_error(pool: UpstreamPool) -> None:
    """Nothing listening: UpstreamConnectError (nothing was sent, so a retry is safe)."""
    async with raw_server(answering()) as (origin, _):
        pass  # the port is free again
    with pytest.raises(UpstreamConnectError):
        await fetch(pool, origin)


async def test_stalled_upstream_is_a_timeout() -> None:
    """No byte within read_timeout: UpstreamTimeout, and the connection is gone."""

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    pool = UpstreamPool(read_timeout=0.2)
    try:
        async with raw_server(stall) as (origin, _):
            r = await pool.request(origin, "GET", "/")
            with pytest.raises(UpstreamTimeout):
                await r.read()
            r.release()
            assert pool.idle_count(origin) == 0
    finally:
        await pool.close()


async def test_timeouts_fire_within_a_tick_of_their_deadline() -> None:
    """One timer serves the pool: a stalled answer fails between read_timeout and one tick
    (a fifth of it) later, and an idle connection closes after idle_timeout, never before."""

    async def one_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    pool = UpstreamPool(read_timeout=0.5, idle_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        async with raw_server(one_then_stall) as (origin, accepts):
            assert await fetch(pool, origin) == (200, b"ok")
            await asyncio.sleep(0.3)
            assert pool.idle_count(origin) == 1  # not idle for 0.5 s yet
            started = loop.time()
            with pytest.raises(UpstreamTimeout):
                await pool.request(origin, "GET", "/")  # the same connection: it stalls
            assert 0.5 <= loop.time() - started <= 0.5 + 0.1 + 0.05
            assert await fetch(pool, origin) == (200, b"ok")  # a new connection
            await asyncio.sleep(0.75)
            assert pool.idle_count(origin) == 0
            assert len(accepts) == 2
    finally:
        await pool.close()


async def test_stall_before_the_head_is_a_timeout() -> None:
    """An upstream that accepts and never answers: UpstreamTimeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    pool = UpstreamPool(read_timeout=0.2)
    try:
        async with raw_server(silent) as (origin, _):
            with pytest.raises(UpstreamTimeout):
                await pool.request(origin, "GET", "/")
    finally:
        await pool.close()


async def test_truncated_body_is_upstream_closed(pool: UpstreamPool) -> None:
    """The connection ends inside a Content-Length body: UpstreamClosed."""

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    async with raw_server(short) as (origin, _):
        r = await pool.request(origin, "GET", "/")
        with pytest.raises(UpstreamClosed):
            await r.read()
        r.release()


# -- TLS ------------------------------------------------------------------------------------------


async def test_https_upstream_with_a_private_ca(tmp_path: Path) -> None:
    """TLS to an https server whose certificate a trustme CA issued; a stranger CA fails."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="over tls")

    app.router.add_get("/", hello)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    async with app_server(app, server_ctx) as origin:
        good = UpstreamPool(ssl_context=trusted)
        bad = UpstreamPool(ssl_context=stranger)
        try:
            assert await fetch(good, origin) == (200, b"over tls")
            assert await fetch(good, origin) == (200, b"over tls")
            with pytest.raises(UpstreamConnectError):
                await fetch(bad, origin)
        finally:
            await good.close()
            await bad.close()


async def test_requests_beyond_the_per_origin_limit_wait_their_turn() -> None:
    """With one request allowed per upstream, a second waits until the first answer is done."""
    limited = UpstreamPool(connect_timeout=2.0, read_timeout=2.0, max_busy_per_origin=1)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(ok, ok)) as (origin, accepts):
        first = await limited.request(origin, "GET", "/")
        second = asyncio.ensure_future(fetch(limited, origin))
        await asyncio.sleep(0.1)
        assert not second.done()  # held back, not sent on a second connection
        assert await first.read() == b"ok"
        first.release()
        assert await asyncio.wait_for(second, 2) == (200, b"ok")
        assert len(accepts) == 1
    await limited.close()


async def test_a_failed_request_gives_its_place_back() -> None:
    """A refused connection does not use up the limit: later requests still go out."""
    limited = UpstreamPool(connect_timeout=2.0, read_timeout=2.0, max_busy=1)
    closed = Origin("http", "127.0.0.1", 1)
    for _ in range(3):
        with pytest.raises(UpstreamConnectError):
            await limited.request(closed, "GET", "/")
    async with raw_server(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as (origin, _):
        assert await asyncio.wait_for(fetch(limited, origin), 2) == (204, b"")
    await limited.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 300 + b"Content-Length: 0\r\n\r\n",
    ],
    ids=["long field", "too many fields"],
)
async def test_oversized_answer_heads_are_refused(pool: UpstreamPool, answer: bytes) -> None:
    """An answer header over 32 KiB, or more than 256 of them, is a protocol error."""
    async with raw_server(answering(answer)) as (origin, _):
        with pytest.raises(UpstreamProtocolError):
            await pool.request(origin, "GET", "/")


async def test_fresh_never_takes_a_pooled_connection(pool: UpstreamPool) -> None:
    """fresh=True opens a new connection even when an idle one is pooled."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(ok)) as (origin, accepts):
        assert await fetch(pool, origin) == (200, b"ok")
        assert pool.idle_count(origin) == 1
        async with await pool.request(origin, "GET", "/", fresh=True) as r:
            assert await r.read() == b"ok"
        assert len(accepts) == 2


# -- how many requests at once --------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{"max_busy": 2}, {"max_busy_per_origin": 2}])
async def test_requests_in_flight_are_bounded_and_a_cancelled_wait_keeps_no_slot(
    limits: dict[str, Any],
) -> None:
    """With two slots, six concurrent requests reach the upstream at most two at a time,
    in order; a request cancelled while waiting for a slot neither takes one nor loses one."""
    in_flight, most, release = 0, 0, asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return web.Response(text=request.path)

    app = web.Application()
    app.router.add_get("/{n}", handler)
    pool = UpstreamPool(connect_timeout=2.0, read_timeout=5.0, **limits)
    async with app_server(app) as origin:

        async def get(n: int) -> bytes:
            async with await pool.request(origin, "GET", f"/{n}") as r:
                return await r.read()

        tasks = [asyncio.ensure_future(get(n)) for n in range(6)]
        await asyncio.sleep(0.2)
        assert (in_flight, most) == (2, 2)
        tasks[3].cancel()  # waiting for a slot
        release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i != 3] == [b"/0", b"/1", b"/2", b"/4", b"/5"]
        assert most == 2
        release.clear()
        again = [asyncio.ensure_future(get(n)) for n in range(2)]
        await asyncio.sleep(0.2)
        assert in_flight == 2  # both slots are free again
        release.set()
        assert await asyncio.gather(*again) == [b"/0", b"/1"]
    await pool.close()
