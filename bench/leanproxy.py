"""The lean floor: aiohttp's low-level server in front of ``sidecar.upstream``, nothing else.

``python -m bench.leanproxy UPSTREAM_URL`` forwards every request with the sidecar's own
hop-by-hop filter (``sidecar.proxy.end_to_end``) and server settings, but no Application, no
router and no ClientSession: the listener is ``aiohttp.web_server.Server`` and the upstream
leg is the llhttp client. What a cache hit costs above this row is zonegate's own work.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web, web_request, web_server

from runtime.serving import run
from sidecar.app import proxy_server_args
from sidecar.config import SidecarConfig
from sidecar.headers import HOP_BY_HOP, end_to_end
from sidecar.proxy import CHUNK
from sidecar.upstream import Origin, UpstreamPool, UpstreamResponse

DROP_UP = ("host", "content-length", "transfer-encoding")
DROP_DOWN = HOP_BY_HOP | {"content-length", "transfer-encoding"}


def answer_head(r: UpstreamResponse) -> web.StreamResponse:
    """The client-side answer: the upstream's status, reason and end-to-end headers."""
    out = web.StreamResponse(status=r.status, reason=r.reason)
    for raw_name, raw_value in r.headers:
        name = raw_name.decode("latin-1")
        if name.lower() not in DROP_DOWN:
            out.headers.add(name, raw_value.decode("latin-1"))
        elif name.lower() == "content-length":
            out.content_length = int(raw_value)
    return out


Handler = Callable[[web_request.BaseRequest], Awaitable[web.StreamResponse]]


def handler(pool: UpstreamPool, origin: Origin) -> Handler:
    async def forward(request: web_request.BaseRequest) -> web.StreamResponse:
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        r = await pool.request(
            origin,
            request.method,
            request.raw_path,
            end_to_end(request.headers, DROP_UP).items(),
            body,
            content_length=request.content_length,
        )
        try:
            out = answer_head(r)
            await out.prepare(request)
            async for chunk in r:
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            r.release()

    return forward


async def main_async(upstream: str) -> int:
    loop = asyncio.get_running_loop()
    pool = UpstreamPool()
    server = web_server.Server(
        handler(pool, Origin.parse(upstream)),
        access_log=None,
        **proxy_server_args(SidecarConfig(routes=())),
    )
    listener = await loop.create_server(server, "127.0.0.1", 0, backlog=4096)
    port = listener.sockets[0].getsockname()[1]
    print(f"zonegate lean listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()
    await server.shutdown(1.0)
    await pool.close()
    return 0


def main(argv: list[str]) -> int:
    return run(main_async(argv[0]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
