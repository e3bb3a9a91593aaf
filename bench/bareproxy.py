"""The baseline: a bare aiohttp pass-through proxy, no routes, no tokens, no metrics, no logs.

``python -m bench.bareproxy UPSTREAM_URL`` forwards every request to the upstream the way an
idiomatic aiohttp proxy does, with the sidecar's own building blocks: its upstream session
(``sidecar.app.upstream_session``) and server settings (``sidecar.app.proxy_server_args``:
request bodies pass still encoded), hop-by-hop filtering (``sidecar.headers.end_to_end``) and
chunked streaming both ways (``iter_chunked(CHUNK)`` up, ``stream_back`` below down: the
function the sidecar answered with before it had its own upstream client). It runs on
uvloop through ``runtime.serving``, as the sidecar does. What the sidecar costs beyond this is
what its routing, token cache, metrics and request log cost.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from runtime.serving import Listener, run, serve
from sidecar.app import proxy_server_args, upstream_session
from sidecar.config import SidecarConfig
from sidecar.headers import end_to_end
from sidecar.proxy import CHUNK

SESSION = web.AppKey("session", aiohttp.ClientSession)


class _HeadersWithBody(web.StreamResponse):
    """Headers held back until the first body write (or the end): one ``send`` for a small
    answer, as aiohttp's own ``web.Response`` does."""

    _send_headers_immediately = False


async def stream_back(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream an aiohttp client answer back, headers filtered: one ``send`` when its
    ``Content-Length`` fits in one chunk, else headers first and the body as it comes."""
    async with upstream:
        small = upstream.content_length is not None and upstream.content_length <= CHUNK
        response = (_HeadersWithBody if small else web.StreamResponse)(
            status=upstream.status,
            reason=upstream.reason,
            headers=end_to_end(upstream.headers),
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError):
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


def build_app(upstream: URL) -> web.Application:
    """A catch-all forwarding app."""

    async def forward(request: web.Request) -> web.StreamResponse:
        session = request.app[SESSION]
        data = request.content.iter_chunked(CHUNK) if request.body_exists else None
        answer = await session.request(
            request.method,
            upstream.join(request.rel_url),
            headers=end_to_end(request.headers, ("host",)),
            data=data,
            allow_redirects=False,
        )
        return await stream_back(request, answer)

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = upstream_session(SidecarConfig(routes=()))
        yield
        await app[SESSION].close()

    app = web.Application(handler_args=proxy_server_args(SidecarConfig(routes=())))
    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(session)
    return app


def main(argv: list[str]) -> int:
    app = build_app(URL(argv[0]))
    return run(serve([Listener("bare", app, "127.0.0.1", 0)], grace=1.0))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
