"""A minimal resource server (PEP) for one zone, as the demo's red and green backends.

It knows only its zone's issuer URI and does what any OIDC resource server configured with
``issuer-uri`` does: discovery, then JWKS, then verify signature, ``iss``, ``aud``, ``exp`` and
``typ: at+jwt``. Nothing zonegate-specific: this is what a Spring or jose backend would do.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
from aiohttp import web

from exchange.errors import ExchangeError
from exchange.issuers import IssuerKeys
from exchange.server.fetcher import HttpFetcher


class ZoneBackend:
    """A backend that accepts tokens of one zone issuer and echoes the claims it verified."""

    def __init__(self, name: str, issuer_uri: str, audience: str) -> None:
        self.name = name
        self.issuer_uri = issuer_uri
        self.audience = audience
        self.fetcher = HttpFetcher(timeout=3.0)
        self.keys = IssuerKeys(issuer_uri, self.fetcher, clock=time.time, min_refresh=1.0)
        self.seen: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def close(_: web.Application) -> None:
            await self.fetcher.close()

        app.on_cleanup.append(close)
        return app

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or ValueError saying why this zone refuses it."""
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != "at+jwt":
                raise ValueError("not an RFC 9068 access token (typ is not at+jwt)")
            key = await self.keys.key(header.get("kid"))
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[str(header.get("alg"))],
                audience=self.audience,
                issuer=self.issuer_uri,
                options={"require": ["exp", "iat", "iss", "sub", "aud"]},
            )
        except ExchangeError as e:
            raise ValueError(e.description) from e
        except jwt.PyJWTError as e:
            raise ValueError(str(e)) from e
        return claims

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return self._refuse("no bearer token")
        try:
            claims = await self.verify(auth[7:])
        except ValueError as e:
            return self._refuse(str(e))
        self.seen.append(claims)
        return web.json_response(
            {"zone": self.name, "path": request.path, "method": request.method, "claims": claims}
        )

    def _refuse(self, why: str) -> web.Response:
        return web.json_response(
            {"error": "invalid_token", "error_description": f"{self.name}: {why}"},
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{self.name}", error="invalid_token"'},
        )
