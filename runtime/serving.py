"""Running aiohttp apps as a program: listen, say where, stop cleanly on SIGTERM/SIGINT.

Draining (SIGTERM/SIGINT) never makes a client wait for nothing: the listeners stop accepting,
idle keep-alive connections are closed at once, a request in flight is answered with
``Connection: close`` and its connection closed after it, and the program exits as soon as no
request is in flight (at the latest after ``grace``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from runtime.clienttimeouts import limit_slow_clients, server_settings
from runtime.configload import ListenerTimeouts

log = logging.getLogger("zonegate.serving")

DRAIN_POLL = 0.05  # seconds between looks at the connections still busy while draining
LAST_CUT = 0.1  # seconds aiohttp's own shutdown may add, per phase, once the grace is over


RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Listener:
    """One app on one address. With a ``handler``, that handler answers every request on
    aiohttp's low-level server (``HandlerRunner``) and ``app`` gives only its lifecycle and
    state; ``server_args`` are that server's settings (an app's own are its ``handler_args``)."""

    name: str
    app: web.Application
    host: str
    port: int
    ssl_context: object | None = None
    timeouts: ListenerTimeouts = field(default_factory=ListenerTimeouts)  # see clienttimeouts
    handler: RawHandler | None = None
    server_args: Mapping[str, Any] = field(default_factory=dict)


class HandlerRunner(web.BaseRunner):
    """One handler on aiohttp's low-level ``web.Server``: no router, no middlewares, no
    per-app ``Request``, the least aiohttp does per request (a proxy's hot path). ``app``
    still gives what an Application gives besides: its state and its lifecycle (startup,
    ``cleanup_ctx``, cleanup), run as ``web.AppRunner`` runs them."""

    def __init__(self, app: web.Application, handler: RawHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app, self._handler = app, handler

    async def shutdown(self) -> None:
        await self.app.shutdown()

    async def _make_server(self) -> web.Server:
        self.app.on_startup.freeze()
        await self.app.startup()
        self.app.freeze()
        return web.Server(self._handler, **self._kwargs)

    async def _cleanup_server(self) -> None:
        await self.app.cleanup()


def runner_for(listener: Listener, draining: Draining) -> web.BaseRunner:
    """The runner of one listener: its app's, or its handler's on the low-level server."""
    settings: dict[str, Any] = {"shutdown_timeout": LAST_CUT, "handle_signals": False}
    settings |= server_settings(listener.timeouts)
    if listener.handler is None:
        draining.attach(listener.app)
        return web.AppRunner(listener.app, **settings)
    handler = draining.wrap(listener.handler)
    return HandlerRunner(listener.app, handler, **settings, **listener.server_args)


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
    draining = Draining()
    runners: list[web.BaseRunner] = []
    bound: list[tuple[str, str, int]] = []
    try:
        for listener in listeners:
            runner = runner_for(listener, draining)
            await runner.setup()
            runners.append(runner)  # cleaned up even if binding fails (its sessions close)
            limit_slow_clients(runner, listener.timeouts)
            site = web.TCPSite(
                runner,
                listener.host,
                listener.port,
                ssl_context=listener.ssl_context,  # type: ignore[arg-type]
                reuse_address=True,
            )
            await site.start()
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
        log.info("stopping: draining in-flight requests", extra={"grace": grace})
        draining.started = True
        if on_drain is not None:
            on_drain()
        started_at = loop.time()
        await drain(runners, grace)
        log.info("drained", extra={"seconds": round(loop.time() - started_at, 3)})
    finally:
        await asyncio.gather(*(_cleanup(runner) for runner in runners))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


class Draining:
    """Once ``started``, every response says ``Connection: close``: a client learns from the
    answer itself that this connection ends, and sends its next request elsewhere."""

    def __init__(self) -> None:
        self.started = False

    def attach(self, app: web.Application) -> None:
        if not app.frozen:
            app.on_response_prepare.append(self._on_prepare)

    def wrap(self, handler: RawHandler) -> RawHandler:
        """The same for a low-level handler's answers (the low-level server has no signal): an
        answer it streamed itself, prepared before the drain began, still ends the
        connection after it, without the header."""

        async def answer(request: web.BaseRequest) -> web.StreamResponse:
            response = await handler(request)
            if self.started and not response.prepared:
                _closing(response)
            return response

        return answer

    async def _on_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        if self.started:
            _closing(response)


def _closing(response: web.StreamResponse) -> None:
    response.force_close()  # the connection closes after this answer
    response.headers["Connection"] = "close"  # (aiohttp may have set its headers already)


async def drain(runners: Sequence[web.BaseRunner], grace: float) -> None:
    """Stop accepting on every listener, close idle connections, and give the requests in
    flight on all of them one ``grace`` together; return as soon as none is left. (aiohttp's
    own shutdown waits per app, and twice per connection: for the handler, then again after
    asking it to stop; here it only has ``LAST_CUT`` left.)"""
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        busy = False
        for runner in runners:
            busy = _close_idle(runner) or busy
        if not busy or loop.time() >= deadline:
            return
        await asyncio.sleep(DRAIN_POLL)


def _close_idle(runner: web.BaseRunner) -> bool:
    """Close every connection of ``runner`` that has no request in flight or queued (a busy one
    closes after its answer); True while a busy one is left. Checked again on every poll: a
    request that arrived just before its connection was told to close is still answered."""
    busy = False
    if runner.server is None:
        return False
    for connection in list(runner.server.connections):
        if _in_flight(connection):
            connection.close()  # no further request is read; closes after this answer
            busy = True
        else:
            connection.force_close()  # idle keep-alive: nothing to wait for
    return busy


def _in_flight(connection: object) -> bool:
    """A request is being handled or waits on this connection. (aiohttp keeps no public flag;
    without these attributes, a connection counts as busy and the grace bounds the wait.)"""
    handling = getattr(connection, "_request_in_progress", True)
    queued = getattr(connection, "_messages", None)
    return bool(handling) or queued is None or len(queued) > 0


async def _cleanup(runner: web.BaseRunner) -> None:
    with contextlib.suppress(Exception):
        await runner.cleanup()


def _bound_port(runner: web.BaseRunner) -> int:
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
