"""A development OpenID Provider: discovery, JWKS and tokens for demo users.

For ``zonegate dev-provider``, ``zonegate demo`` and the test suite only: real keys, real JWKS
over HTTP, but anyone may ask for a token (``GET /dev/token?sub=alice``) and users log in with
their name as password. It can rotate keys and pretend to be down, so clients of it can be
tested against the failures a real provider has. Never for production.
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

    @classmethod
    def with_key(cls, issuer: str, alg: str) -> DevOpenIDProvider:
        """A provider at ``issuer`` signing with one fresh key of ``alg``."""
        key = signing_key(generate_private_key(alg), alg)
        return cls(issuer=issuer, keys={key.kid: key}, default_kid=key.kid)

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
        app.router.add_get("/dev/token", self._dev_token)
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

    async def _dev_token(self, request: web.Request) -> web.Response:
        """``GET /dev/token?sub=alice&aud=frontend&scope=billing:read&ttl=600``: a signed
        access token for anyone who asks (development only)."""
        down = self._unavailable()
        if down:
            return down
        try:
            claims, ttl = dev_token_claims(request.query)
        except ValueError as e:
            body = {"error": "invalid_request", "error_description": str(e)}
            return web.json_response(body, status=400)
        token = self.mint({**claims, "exp": int(time.time()) + ttl})
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": ttl},
            headers={"Cache-Control": "no-store"},
        )


MAX_DEV_TTL = 86400
_CLAIM_TEXT = 256


def dev_token_claims(query: Any) -> tuple[dict[str, Any], int]:
    """The claims and lifetime ``/dev/token`` was asked for; ValueError says what is wrong."""
    unknown = sorted(set(query) - {"sub", "aud", "scope", "ttl"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; use sub, aud, scope, ttl")
    claims: dict[str, Any] = {"sub": _text(query, "sub", "alice")}
    audiences = query.getall("aud", ["frontend"])
    claims["aud"] = audiences[0] if len(audiences) == 1 else list(audiences)
    if "scope" in query:
        claims["scope"] = _text(query, "scope", "")
    if claims["sub"] in DEMO_USERS:
        claims.update(DEMO_USERS[claims["sub"]])
    return claims, _ttl(query.get("ttl", "600"))


def _text(query: Any, name: str, default: str) -> str:
    value = str(query.get(name, default))
    if not value or len(value) > _CLAIM_TEXT or not value.isprintable():
        raise ValueError(f"{name} must be 1 to {_CLAIM_TEXT} printable characters")
    return value


def _ttl(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_DEV_TTL:
        raise ValueError(f"ttl must be whole seconds from 1 to {MAX_DEV_TTL}")
    return int(value)


def main(listen: str = "127.0.0.1:8080", alg: str = "ES256") -> int:
    """``zonegate dev-provider``: serve a development OpenID Provider until SIGTERM."""
    from runtime.logsetup import setup_logging
    from runtime.serving import Listener, run, serve

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(
            f"zonegate: --listen must be host:port, e.g. 127.0.0.1:8080, got {listen!r}"
        )
    setup_logging("INFO")
    provider = DevOpenIDProvider.with_key(f"http://{host}:{port}", alg)
    print(
        "zonegate dev-provider: a development OpenID Provider, NOT for production "
        f"(anyone may ask for a token): issuer {provider.issuer}",
        flush=True,
    )
    print(f"  curl -s '{provider.issuer}/dev/token?sub=alice&aud=frontend&scope=billing:read'")
    return run(serve([Listener("dev-provider", provider.app(), host, int(port))]))
