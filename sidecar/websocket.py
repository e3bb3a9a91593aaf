"""The WebSocket relay: after the handshake carried the zone token, messages flow both ways."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def relay(
    downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Pump messages both ways until one side closes, then close the other with its code."""
    tasks = {
        asyncio.ensure_future(_pump(downstream, upstream)),
        asyncio.ensure_future(_pump(upstream, downstream)),
    }
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await upstream.close()
    await downstream.close()


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    async for message in source:
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
    await sink.close(code=source.close_code or 1000)
