"""Timeouts on the clients of a listener: a request head must arrive, an idle connection ends.

aiohttp's server has a keep-alive timeout (``keepalive_timeout``) but no header-read timeout:
a connection that sends nothing, or a byte of its request head now and then (slowloris), is
kept as long as it likes. Two bounds, both configurable (``listeners:`` in every program's
config, ``runtime.configload.ListenerTimeouts``):

* ``header_timeout``: a new connection is closed unless its first request head is complete
  this many seconds after it was accepted (after the TLS handshake, on a TLS listener, which
  asyncio bounds at 60 s). ``HeadDeadline`` below, on aiohttp's public ``Server`` hooks.
* ``keepalive_timeout``: once an answer is sent, the next request head must be complete
  within this many seconds, or the connection is closed: aiohttp's own keep-alive timer,
  which counts from the answer and is not reset by the bytes of a head still arriving.

A request whose head is complete is never cut by either, however long its body, its handler
or its answer take (a WebSocket, a slow upstream, a large download).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from runtime.configload import ListenerTimeouts

log = logging.getLogger("zonegate.serving")


def server_settings(timeouts: ListenerTimeouts) -> dict[str, Any]:
    """The aiohttp server settings (``AppRunner`` keywords) that ``timeouts`` asks for."""
    return {"keepalive_timeout": timeouts.keepalive_timeout}


class HeadDeadline:
    """Closes a connection whose first request head is not complete ``seconds`` after it was
    accepted. Installed on a started runner's ``web.Server`` before its sites listen."""

    def __init__(self, server: web.Server, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}
        self._made, self._lost = server.connection_made, server.connection_lost
        self._make_request = server.request_factory
        server.connection_made = self._connection_made  # type: ignore[method-assign]
        server.connection_lost = self._connection_lost  # type: ignore[method-assign]
        server.request_factory = self._request_started

    def _connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self._made(handler, transport)
        self._deadlines[handler] = self._loop.call_later(self._seconds, self._expire, handler)

    def _connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._disarm(handler)
        self._lost(handler, exc)

    def _request_started(
        self, message: Any, payload: Any, handler: RequestHandler, *rest: Any
    ) -> Any:
        """aiohttp makes the request object once its head is parsed: the deadline is met."""
        if self._deadlines:
            self._disarm(handler)
        return self._make_request(message, payload, handler, *rest)

    def _disarm(self, handler: RequestHandler) -> None:
        deadline = self._deadlines.pop(handler, None)
        if deadline is not None:
            deadline.cancel()

    def _expire(self, handler: RequestHandler) -> None:
        if self._deadlines.pop(handler, None) is None:
            return
        log.debug("connection closed: no complete request head in %g s", self._seconds)
        handler.force_close()


def limit_slow_clients(runner: web.BaseRunner, timeouts: ListenerTimeouts) -> None:
    """Give a set-up runner's server the header deadline (its keep-alive timeout is a
    ``server_settings`` keyword of the runner)."""
    assert runner.server is not None, "set the runner up first"
    HeadDeadline(runner.server, timeouts.header_timeout)
