"""An open-loop load generator at a fixed rate (wrk2 is not in Debian): its own process.

``python -m bench.openloop URL --rate 500 --duration 3 [-H 'Name: value']`` sends requests on
schedule (request i at ``start + i / rate``), whatever the answers do, on a pool of keep-alive
connections that grows when every connection is busy. It prints one JSON object: requests sent,
errors, latency percentiles in milliseconds (first byte written to last byte read) and how far
behind schedule the sender fell at worst (large values mean the client, not the server, lagged).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from yarl import URL

from bench.client import Connection, Timed, percentile, request_bytes


class OpenLoop:
    """Requests on a fixed schedule over a growing pool of connections."""

    def __init__(self, url: URL, raw: bytes) -> None:
        self.url, self.raw = url, raw
        self.idle: list[Connection] = []
        self.timings: list[Timed] = []
        self.errors = 0
        self.max_lag = 0.0

    async def one(self) -> None:
        connection = self.idle.pop() if self.idle else await Connection.open(self.url)
        try:
            self.timings.append(await connection.send(self.raw))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
            await connection.close()
            return
        self.idle.append(connection)

    async def run(self, rate: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time()
        for i in range(int(rate * duration)):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.max_lag = max(self.max_lag, loop.time() - due)
            task = asyncio.ensure_future(self.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        for connection in self.idle:
            await connection.close()

    def summary(self) -> dict[str, Any]:
        ms = [t.seconds * 1000 for t in self.timings]
        return {
            "sent": len(self.timings) + self.errors,
            "errors": self.errors,
            "non_2xx": sum(1 for t in self.timings if not 200 <= t.status < 300),
            "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99),
            "max_lag_ms": self.max_lag * 1000,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop")
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds not recorded")
    parser.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args(argv)
    url = URL(args.url)
    headers = dict(h.split(": ", 1) for h in args.header)
    raw = request_bytes(url, headers=headers)

    async def measure() -> dict[str, Any]:
        if args.warmup > 0:
            await OpenLoop(url, raw).run(args.rate, args.warmup)
        load = OpenLoop(url, raw)
        await load.run(args.rate, args.duration)
        return load.summary()

    json.dump(run_fast(measure()), sys.stdout)
    print()
    return 0


def run_fast(coro: Any) -> Any:
    """Run on uvloop when installed, like the servers under test."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


if __name__ == "__main__":
    raise SystemExit(main())
