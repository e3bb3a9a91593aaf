"""A development OpenID Provider: discovery, JWKS and a token endpoint for demo users.

For ``zonegate demo`` and the test suite only: real keys, real JWKS over HTTP, but users log in
with their name as password. It can rotate keys and pretend to be down, so clients of it can be
tested against the failures a real provider has.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from exchange.keys import PrivateKey, SigningKey, generate_private_key, signing_key

DEMO_USERS: dict[str, dict[str, Any]] = {
    "alice": {"email": "alice@example.com", "name": "Alice Blue", "groups": ["shoppers"]},
    "bob": {"email": "bob@example.com", "name": "Bob Blue", "groups": ["support"]},
}


@dataclass
class DevOpenIDProvider:
    """An OpenID Provider serving discovery and JWKS, minting tokens on request."""

    issuer: str = "http://127.0.0.1:0"
    audience: str = "frontend"
    token_lifetime: int = 600
    keys: dict[str, SigningKey] = field(default_factory=dict)
    default_kid: str = ""
    available: bool = True
    jwks_fetches: int = 0
    discovery_fetches: int = 0
    cache_control: str = "max-age=300"

    def __post_init__(self) -> None:
        if not self.keys:
            self.rotate("RS256")
            self.rotate("ES256")

    def rotate(self, alg: str = "ES256", key: PrivateKey | None = None) -> str:
        """Add a new key and make it the default signer; return its kid."""
        new = signing_key(key or generate_private_key(alg), alg)
        self.keys[new.kid] = new
        self.default_kid = new.kid
        return new.kid

    def drop(self, kid: str) -> None:
        """Stop publishing a key."""
        self.keys.pop(kid, None)

    def kid_for(self, alg: str) -> str:
        """The newest key signing with ``alg``."""
        return [k for k, v in self.keys.items() if v.alg == alg][-1]

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        alg: str | None = None,
        kid: str | None = None,
        headers: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> str:
        """A signed token; ``claims`` override the defaults (a None value removes a claim)."""
        kid = kid or (self.kid_for(alg) if alg else self.default_kid)
        key = self.keys[kid]
        iat = int(time.time() if now is None else now)
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice",
            "aud": self.audience,
            "iat": iat,
            "nbf": iat,
            "exp": iat + self.token_lifetime,
            "jti": secrets.token_urlsafe(8),
        }
        body.update(claims or {})
        body = {k: v for k, v in body.items() if v is not None}
        header = {"kid": kid, **(headers or {})}
        return jwt.encode(body, key.private_key, algorithm=key.alg, headers=header)

    def login(self, username: str) -> str:
        """A user access token for a demo user."""
        profile = DEMO_USERS[username]
        return self.mint({"sub": username, "scope": "openid profile email", **profile})

    # -- HTTP --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks.json", self._jwks)
        app.router.add_post("/token", self._token)
        return app

    def _unavailable(self) -> web.Response | None:
        return None if self.available else web.Response(status=503, text="down for testing")

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        down = self._unavailable()
        if down:
            return down
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/jwks.json",
                "token_endpoint": f"{self.issuer}/token",
                "response_types_supported": ["token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": sorted(
                    {k.alg for k in self.keys.values()}
                ),
                "grant_types_supported": ["password"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        down = self._unavailable()
        if down:
            return down
        return web.json_response(
            {"keys": [k.public_jwk for k in self.keys.values()]},
            headers={"Cache-Control": self.cache_control},
        )

    async def _token(self, request: web.Request) -> web.Response:
        down = self._unavailable()
        if down:
            return down
        form = await request.post()
        username = str(form.get("username", ""))
        if form.get("grant_type") != "password" or username not in DEMO_USERS:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "demo users: alice, bob"},
                status=400,
            )
        if form.get("password") != username:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "demo password is the user name"},
                status=400,
            )
        return web.json_response(
            {
                "access_token": self.login(username),
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
            },
            headers={"Cache-Control": "no-store"},
        )
