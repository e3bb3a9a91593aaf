"""Running aiohttp apps as a program: listen, say where, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Listener:
    """One app on one address."""

    name: str
    app: web.Application
    host: str
    port: int
    ssl_context: object | None = None


async def serve(
    listeners: Sequence[Listener],
    *,
    grace: float = 10.0,
    on_hup: Callable[[], Coroutine[Any, Any, None]] | None = None,
    on_drain: Callable[[], None] | None = None,
    started: Callable[[list[tuple[str, str, int]]], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain for up to ``grace`` seconds and return 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hup is not None:
        hup = on_hup
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(hup()))
    runners: list[web.AppRunner] = []
    bound: list[tuple[str, str, int]] = []
    try:
        for listener in listeners:
            runner = web.AppRunner(listener.app, shutdown_timeout=grace, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(
                runner,
                listener.host,
                listener.port,
                ssl_context=listener.ssl_context,  # type: ignore[arg-type]
                reuse_address=True,
            )
            await site.start()
            runners.append(runner)
            port = _bound_port(runner)
            bound.append((listener.name, listener.host, port))
            scheme = "https" if listener.ssl_context else "http"
            print(
                f"zonegate {listener.name} listening on {scheme}://{listener.host}:{port}",
                flush=True,
            )
        if started is not None:
            started(bound)
        await stop.wait()
        print("zonegate: stopping (draining in-flight requests)", file=sys.stderr, flush=True)
        if on_drain is not None:
            on_drain()
    finally:
        for runner in reversed(runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run a program's main coroutine on uvloop when installed."""
    try:
        import uvloop

        return int(uvloop.run(main))
    except ImportError:
        return asyncio.run(main)
