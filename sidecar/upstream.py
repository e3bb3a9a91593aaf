"""A lean HTTP/1.1 client for the upstream leg: asyncio Protocols and llhttp (``httptools``).

Standalone on purpose (it imports nothing else of zonegate): the sidecar's hot path forwards
with it, the benchmark measures it bare.

* Framing out (RFC 9112 §2-§7) is built here, line by line, from a caller's already-filtered
  ``(name, value)`` list; a name that is not a token, a name this client writes itself (Host,
  Content-Length, Transfer-Encoding, Connection, Upgrade) or a CR, LF or NUL anywhere raises
  :class:`UnsafeRequest` before a byte is sent. Bodies go by Content-Length or chunked.
* Framing in is llhttp's, strict (no leniencies): it refuses Content-Length beside
  Transfer-Encoding and a repeated Content-Length; this module refuses both too, in case a
  future llhttp is laxer. HEAD, 204, 304 and 1xx carry no body; interim 1xx are skipped.
  Upgrades bypass this client: it never sends ``Upgrade``, so a 101 is a protocol error.
* Flow control: a response body waits in a queue of at most ``high_water`` bytes before the
  socket is paused; a request body waits for the transport's write buffer to drain.
* A connection goes back to its origin's idle pool only when its answer was read to the end
  and neither side said ``Connection: close``.

Errors (every one an :class:`UpstreamError`)::

    UpstreamError
    ├── UpstreamConnectError      no connection; nothing was sent: safe to retry
    │   └── UpstreamConnectTimeout  (also an UpstreamTimeout)
    ├── UpstreamTimeout           no byte for ``read_timeout`` seconds
    ├── UpstreamProtocolError     an answer llhttp (or this module) refuses
    └── UpstreamClosed            the connection ended before a full answer

    UnsafeRequest (ValueError)    a request this module will not write
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes] | None

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"[^\x00-\x20\x7f]+")
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade"})
_NO_BODY_STATUS = frozenset({204, 304})
_NAME_CACHE_MAX = 4096
MAX_HEADERS = 256  # answer header fields, at most
_names: dict[str, bool] = {}  # header name -> may the caller send it (a bounded cache)


class UpstreamError(Exception):
    """Base of every failure talking to an upstream."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened; nothing was sent, so a retry is safe."""


class UpstreamTimeout(UpstreamError):
    """The upstream sent (or accepted) no byte within the timeout."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """The connection was not established within ``connect_timeout``."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not HTTP/1.1 this client accepts (llhttp refused it)."""


class UpstreamClosed(UpstreamError):
    """The connection ended before a full answer; ``reused``: it had served a request before."""

    def __init__(self, message: str, *, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


class UnsafeRequest(ValueError):
    """A request line or header this client refuses to write (RFC 9112 §2.2, §5)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a pool connects: scheme, host and port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


# -- request framing ------------------------------------------------------------------------------


def _allowed_name(name: str) -> bool:
    ok = _names.get(name)
    if ok is None:
        ok = _TOKEN.fullmatch(name) is not None and name.lower() not in _RESERVED
        if len(_names) < _NAME_CACHE_MAX:
            _names[name] = ok
    return ok


def build_head(
    method: str, target: str, host: str, headers: Iterable[tuple[str, str]], framing: str
) -> bytes:
    """The request line and header block; ``framing`` is "" or one built framing line."""
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        raise UnsafeRequest("request line with a forbidden character")
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    count = 2
    for name, value in headers:
        if not _allowed_name(name):
            raise UnsafeRequest(f"header name refused: {name!r}")
        lines.append(f"{name}: {value}\r\n")
        count += 1
    lines.append(framing)
    lines.append("\r\n")
    head = "".join(lines)
    lf = count + 1 + (framing != "")
    # every CR and LF must be one this function wrote: none came from a host or a value
    if head.count("\n") != lf or head.count("\r") != lf or "\x00" in head:
        raise UnsafeRequest("CR, LF or NUL in a header")
    return head.encode("utf-8", "surrogateescape")


def framing_line(body: Body, content_length: int | None) -> str:
    if body is None:
        return "" if content_length is None else f"Content-Length: {content_length}\r\n"
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n"
    if content_length is not None:
        return f"Content-Length: {content_length}\r\n"
    return "Transfer-Encoding: chunked\r\n"


# -- one connection -------------------------------------------------------------------------------


class _HeadersOnly(Exception):
    """Raised from the parser callback to stop at the end of a HEAD answer's headers."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, llhttp reading the answer."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0  # loop time it went back to the pool
        self._writable = True
        self._drain: asyncio.Future[None] | None = None
        self._exchange: Exchange | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        self._lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # the rest
    def _lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if self._exchange is not None:
            self._exchange.lost(exc)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamClosed("connection closed while sending"))
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Close now; an answer being read ends with UpstreamClosed."""
        if self.transport is not None:
            self.transport.abort()
        self._lost(None)

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamClosed("connection closed while sending", reused=self.reused)
        if self._writable:
            return
        self._drain = self.loop.create_future()
        handle = self.loop.call_later(self.pool.read_timeout, self._stalled_write)
        try:
            await self._drain
        finally:
            handle.cancel()
            self._drain = None

    def _stalled_write(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamTimeout("upstream stopped reading the request"))
        self.close()

    def start(self, head: bytes, method: str) -> Exchange:
        assert self.transport is not None
        exchange = self._exchange = Exchange(self, method == "HEAD")
        self.transport.write(head)
        return exchange

    def finished(self, exchange: Exchange, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        if self._exchange is exchange:
            self._exchange = None
        if reusable and not self.closed:
            self.pool.put_back(self)
        else:
            self.close()


# -- one request and its answer -------------------------------------------------------------------


class _AfterAnswer(Exception):
    """Raised from the parser callback when a second answer starts: nobody asked for it."""


class Exchange:
    """The parser callbacks and body queue of one request on one connection."""

    def __init__(self, conn: Connection, head_request: bool) -> None:
        self.conn = conn
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self._lengths: set[bytes] = set()
        self._chunked = False

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            raise _AfterAnswer

    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        if len(self.reason) > self.conn.pool.max_field_size:
            raise UpstreamProtocolError("status line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self.conn.pool.max_field_size:
            raise UpstreamProtocolError("answer header field too long")
        if len(self.headers) >= MAX_HEADERS:
            raise UpstreamProtocolError(f"more than {MAX_HEADERS} answer header fields")
        lower = name.lower()
        if lower == b"content-length":
            self._lengths.add(value)
        elif lower == b"transfer-encoding":
            self._chunked = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("101 Switching Protocols to a request without Upgrade")
            self.reason, self.headers, self._lengths = b"", [], set()  # interim: skipped
            return
        if len(self._lengths) > 1 or (self._lengths and self._chunked):
            raise UpstreamProtocolError("ambiguous framing: Content-Length with another length")
        self.status = status
        self.head_done = True
        self._wake()
        if self.head_request:
            raise _HeadersOnly

    def on_body(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self.conn.pool.high_water and not self.paused:
            self.paused = True
            assert self.conn.transport is not None
            self.conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # the end of an interim 1xx
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # driven by the connection
    def feed(self, data: bytes) -> None:
        if self.complete or self.error is not None:
            self.conn.close()  # bytes after the answer: nothing may follow on this connection
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            self._callback_failed(e, data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("unexpected upgrade"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"llhttp refused the answer: {e}"))

    def _callback_failed(self, e: httptools.HttpParserCallbackError, data: bytes) -> None:
        cause = e.__context__
        if isinstance(cause, _HeadersOnly):
            # reusable only if nothing followed the header block in this read
            self.keep_alive = data.endswith(b"\r\n\r\n") and self.parser.should_keep_alive()
            self.complete = True
            self._wake()
        elif isinstance(cause, _AfterAnswer):
            self.keep_alive = False
            self.conn.close()
        elif isinstance(cause, UpstreamError):
            self._fail(cause)
        else:
            self._fail(UpstreamProtocolError(f"llhttp refused the answer: {e}"))

    def lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self.head_done and not self._lengths and not self._chunked and not self._bodyless():
            self.complete = True  # a body delimited by the end of the connection (RFC 9112 §6.3)
            self.keep_alive = False
            self._wake()
            return
        what = "before the answer's end" if self.head_done else "before an answer"
        self._fail(UpstreamClosed(f"upstream closed {what}", reused=self.conn.reused), exc)

    def _bodyless(self) -> bool:
        return self.head_request or self.status in _NO_BODY_STATUS

    def _fail(self, error: UpstreamError, cause: BaseException | None = None) -> None:
        if self.error is None:
            error.__cause__ = cause
            self.error = error
        self._wake()
        self.conn.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something happens, or ``read_timeout`` seconds without a byte."""
        if self.error is not None:
            raise self.error
        loop, pool = self.conn.loop, self.conn.pool
        self.waiter = loop.create_future()
        pool.watch(self, loop.time() + pool.read_timeout)
        try:
            await self.waiter
        finally:
            pool.unwatch(self)
            self.waiter = None
        if self.error is not None:
            raise self.error

    def timed_out(self) -> None:
        self._fail(UpstreamTimeout(f"no byte from upstream in {self.conn.pool.read_timeout} s"))

    def take(self) -> bytes:
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self.paused and self.buffered <= self.conn.pool.high_water // 2:
            self.paused = False
            assert self.conn.transport is not None
            self.conn.transport.resume_reading()
        return data


# -- the answer -----------------------------------------------------------------------------------


class UpstreamResponse:
    """Status, reason and the raw header list as llhttp parsed them; the body as an async iterator.

    ``release()`` returns the connection to its pool if the body was read to the end, and
    closes it otherwise; ``close()`` always closes it. ``async with`` releases.
    """

    def __init__(
        self,
        exchange: Exchange,
        sender: asyncio.Task[None] | None,
        slots: tuple[Slots, ...] = (),
    ) -> None:
        self._exchange = exchange
        self._sender = sender
        self._slots = slots
        self.status = exchange.status
        self.reason = exchange.reason.decode("latin-1")
        self.headers = exchange.headers
        self.content_length = _length(exchange._lengths)
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        while True:
            if exchange.chunks:
                yield exchange.take()
            elif exchange.complete:
                return
            else:
                await exchange.wait()

    async def read(self) -> bytes:
        """The whole body (for small answers; stream big ones with ``async for``)."""
        exchange = self._exchange
        if exchange.complete and not exchange.paused:  # all in already: no wait
            body = b"".join(exchange.chunks)
            exchange.chunks.clear()
            exchange.buffered = 0
            return body
        return b"".join([chunk async for chunk in self])

    @property
    def complete(self) -> bool:
        return self._exchange.complete and not self._exchange.chunks

    def release(self) -> None:
        """Done with this answer: pool the connection if it can serve another request."""
        if self._done:
            return
        self._done = True
        exchange = self._exchange
        sent = self._sender is None or self._sender.done()
        reusable = self.complete and exchange.keep_alive and exchange.error is None and sent
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        exchange.conn.finished(exchange, reusable)
        _give_back(self._slots)

    def close(self) -> None:
        """Done with this answer and its connection."""
        self._exchange.keep_alive = False
        self.release()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _length(lengths: set[bytes]) -> int | None:
    """The one Content-Length of an answer (llhttp refused a repeated or malformed one)."""
    if len(lengths) != 1:
        return None
    value = next(iter(lengths)).strip()
    return int(value) if value.isdigit() else None


def _give_back(slots: tuple[Slots, ...]) -> None:
    for slot in slots:
        slot.give()


# -- request bodies -------------------------------------------------------------------------------


async def send_body(conn: Connection, body: AsyncIterable[bytes], length: int | None) -> None:
    """Stream a body, chunked when ``length`` is None, waiting on the write buffer."""
    transport = conn.transport
    assert transport is not None
    sent = 0
    async for chunk in body:
        if not chunk:
            continue
        sent += len(chunk)
        if length is None:
            transport.writelines((f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"))
        elif sent > length:
            conn.close()
            raise UnsafeRequest("request body longer than its Content-Length")
        else:
            transport.write(chunk)
        await conn.drain()
    if length is None:
        transport.write(b"0\r\n\r\n")
    elif sent != length:
        conn.close()
        raise UnsafeRequest("request body shorter than its Content-Length")


# -- the pool -------------------------------------------------------------------------------------


class Slots:
    """At most ``limit`` holders at once; the others wait their turn, first come first served.
    ``take_now`` is the wait-free path (a free slot and nobody waiting)."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as the wait was cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the waiter, free stays as it is
                return
        self.free += 1


class UpstreamPool:
    """Keep-alive connections per origin, and the one entry point: :meth:`request`."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 32,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        high_water: int = 256 * 1024,
        max_busy: int | None = None,
        max_busy_per_origin: int | None = None,
        max_field_size: int = 32768,
    ) -> None:
        self.ssl_context = ssl_context
        self.max_idle, self.idle_timeout = max_idle, idle_timeout
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.high_water = high_water
        self.max_field_size = max_field_size  # bytes of one answer header field (name + value)
        self._idle: dict[Origin, deque[Connection]] = {}
        self._all: set[Connection] = set()
        # Requests in flight (a connection each), at most this many; the others wait their turn.
        self._busy = Slots(max_busy) if max_busy else None
        self._max_per_origin = max_busy_per_origin
        self._busy_per_origin: dict[Origin, Slots] = {}
        # One timer for the whole pool, not one per wait or idle connection: every ``_tick``
        # seconds, while something is watched, it fails the answers waited for past their
        # deadline and closes the connections idle for ``idle_timeout``. A timeout fires
        # within one tick after it is due.
        self._deadlines: dict[Exchange, float] = {}  # answers waited for -> loop time
        self._tick = min(max(min(read_timeout, idle_timeout) / 5, 0.01), 1.0)
        self._ticking: asyncio.TimerHandle | None = None

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: Body = None,
        *,
        content_length: int | None = None,
        host: str | None = None,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send one request; return once the answer's head is in (its body streams after).

        ``fresh``: on a new connection, never a pooled one (the one resend RFC 9112 §9.3.1
        allows after a pooled connection closed before answering)."""
        framing = framing_line(body, content_length)
        head = build_head(method, target, host or origin.authority, headers, framing)
        if isinstance(body, bytes):
            head += body
        slots = self._slots_now(origin)
        if slots is None:
            slots = await self._take_slots(origin)
        try:
            conn = None if fresh else self.idle_connection(origin)
            if conn is None:
                conn = await self.connect(origin)
        except BaseException:
            _give_back(slots)
            raise
        exchange = conn.start(head, method)
        sender = None
        if body is not None and not isinstance(body, bytes):
            sender = asyncio.ensure_future(send_body(conn, body, content_length))
        try:
            while not exchange.head_done:
                await exchange.wait()
        except BaseException:
            if sender is not None:
                sender.cancel()
            conn.close()
            _give_back(slots)
            raise
        return UpstreamResponse(exchange, sender, slots)

    def _slots_now(self, origin: Origin) -> tuple[Slots, ...] | None:
        """``_take_slots`` when no wait is needed (the common case); None otherwise."""
        slots: tuple[Slots, ...] = ()
        if self._max_per_origin:
            per_origin = self._busy_per_origin.get(origin)
            if per_origin is None or not per_origin.take_now():
                return None
            slots = (per_origin,)
        if self._busy is not None:
            if not self._busy.take_now():
                _give_back(slots)
                return None
            slots += (self._busy,)
        return slots

    async def _take_slots(self, origin: Origin) -> tuple[Slots, ...]:
        """One place among the requests in flight, overall and per origin (waiting if full)."""
        slots: tuple[Slots, ...] = ()
        if self._max_per_origin:
            per_origin = self._busy_per_origin.get(origin)
            if per_origin is None:
                per_origin = self._busy_per_origin[origin] = Slots(self._max_per_origin)
            await per_origin.take()
            slots = (per_origin,)
        if self._busy is not None:
            try:
                await self._busy.take()
            except BaseException:
                _give_back(slots)
                raise
            slots += (self._busy,)
        return slots

    def idle_connection(self, origin: Origin) -> Connection | None:
        """The most recently pooled connection to ``origin`` still open and not idle for
        ``idle_timeout`` (older ones met on the way are closed); None: connect anew."""
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < self.idle_timeout:
                conn.reused = True
                return conn
            conn.close()
        return None

    async def connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        if tls and self.ssl_context is None:
            raise UpstreamConnectError(f"{origin.authority}: https needs an ssl_context")
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=self.ssl_context if tls else None,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError as e:
            raise UpstreamConnectTimeout(f"{origin.authority}: connect timed out") from e
        except OSError as e:
            raise UpstreamConnectError(f"{origin.authority}: {e}") from e
        self._all.add(conn)
        return conn

    def put_back(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin, deque())
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)
        self._start_ticking()

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def watch(self, exchange: Exchange, deadline: float) -> None:
        """Fail ``exchange`` (``timed_out``) if it is still waited for at ``deadline``."""
        self._deadlines[exchange] = deadline
        if self._ticking is None:
            self._start_ticking()

    def unwatch(self, exchange: Exchange) -> None:
        self._deadlines.pop(exchange, None)

    def _start_ticking(self) -> None:
        if self._ticking is None:
            self._ticking = asyncio.get_running_loop().call_later(self._tick, self._on_tick)

    def _on_tick(self) -> None:
        self._ticking = None
        now = asyncio.get_running_loop().time()
        for exchange, deadline in list(self._deadlines.items()):
            if deadline <= now:
                self._deadlines.pop(exchange, None)
                exchange.timed_out()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self.idle_timeout:
                idle.popleft().close()  # the oldest first: each deque is in put-back order
        if self._deadlines or any(self._idle.values()):
            self._start_ticking()

    def idle_count(self, origin: Origin) -> int:
        return len(self._idle.get(origin, ()))

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
        await asyncio.sleep(0)  # let transports run their connection_lost
