"""A lean HTTP/1.1 keep-alive client for latency figures: microsecond timing, little overhead.

aiohttp's client costs a few hundred microseconds per request of its own; the figures here are
differences of a fraction of a millisecond, so requests are written and parsed by hand (enough
of RFC 9112 for the answers our own servers and nginx give: Content-Length or chunked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

from yarl import URL


class ProtocolError(Exception):
    """An answer this client cannot read."""


@dataclass(frozen=True, slots=True)
class Timed:
    """One request's status and seconds from the first byte written to the last byte read."""

    status: int
    seconds: float


def request_bytes(
    url: URL, method: str = "GET", headers: Mapping[str, str] | None = None, body: bytes = b""
) -> bytes:
    """An origin-form HTTP/1.1 request."""
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {url.raw_authority}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: URL) -> Connection:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> Timed:
        """Write a prepared request and read its whole answer."""
        started = time.perf_counter()
        self.writer.write(raw)
        status = await self.read_response()
        return Timed(status, time.perf_counter() - started)

    async def read_response(self) -> int:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {status_line!r}")
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            await self._read_chunked()
        else:
            raise ProtocolError("answer without Content-Length or chunked encoding")
        return int(parts[1])

    async def _read_chunked(self) -> None:
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self.reader.readexactly(size + 2)
            if size == 0:
                return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def sequential(url: URL, requests: list[bytes]) -> list[Timed]:
    """Send prepared requests one after another on one connection."""
    connection = await Connection.open(url)
    try:
        return [await connection.send(raw) for raw in requests]
    finally:
        await connection.close()


async def burst(url: URL, raw: bytes, count: int, batch: int = 100) -> list[Timed]:
    """Open ``count`` connections first, then send one request on each at the same moment."""
    connections: list[Connection] = []
    for start in range(0, count, batch):  # in batches: the listen backlog is finite
        size = min(batch, count - start)
        connections += await asyncio.gather(*(Connection.open(url) for _ in range(size)))
    try:
        return list(await asyncio.gather(*(c.send(raw) for c in connections)))
    finally:
        await asyncio.gather(*(c.close() for c in connections))


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0-100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
