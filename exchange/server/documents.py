"""HTTP routes that publish zone issuer documents (discovery metadata and JWKS).

Served by the standalone exchange server and by an embedded sidecar's admin listener, so a
resource server configured with ``issuer-uri: <issuer>/zones/<zone>`` finds that zone's keys
and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web

from exchange.core import ExchangeCore

DOCUMENT_CACHE_CONTROL = "public, max-age=300"


def zone_routes(
    core: Callable[[], ExchangeCore], *, token_endpoint: bool = True
) -> list[web.RouteDef]:
    """Routes for every zone's metadata (both well-known forms) and JWKS.

    ``core`` is a getter so a reloaded core is picked up without re-registering routes;
    ``token_endpoint``: whether this listener also serves ``POST /token`` (advertised then).
    """

    def zone_of(request: web.Request) -> str:
        zone = request.match_info["zone"]
        if zone not in core().config.zones:
            body = {"error": "not_found", "error_description": f"no zone {zone}"}
            raise web.HTTPNotFound(text=json.dumps(body), content_type="application/json")
        return zone

    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(
            core().zone_metadata(zone_of(request), token_endpoint=token_endpoint),
            headers={"Cache-Control": DOCUMENT_CACHE_CONTROL},
        )

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(
            core().zone_jwks(zone_of(request)),
            headers={"Cache-Control": DOCUMENT_CACHE_CONTROL},
        )

    return [
        web.get("/zones/{zone}/.well-known/openid-configuration", metadata),
        web.get("/zones/{zone}/.well-known/oauth-authorization-server", metadata),
        web.get("/.well-known/oauth-authorization-server/zones/{zone}", metadata),
        web.get("/.well-known/openid-configuration/zones/{zone}", metadata),
        web.get("/zones/{zone}/jwks.json", jwks),
    ]
