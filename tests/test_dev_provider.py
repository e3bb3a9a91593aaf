"""``zonegate dev-provider``: a development OpenID Provider any OIDC client can use."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import aiohttp
from jwcrypto import jwk, jwt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_dev_provider_serves_tokens_that_verify_through_its_discovery() -> None:
    """It says it is not for production, serves /dev/token, and jwcrypto verifies the token
    through discovery -> jwks_uri; bad parameters are invalid_request; SIGTERM exits 0."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zonegate.cli", "dev-provider", "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        banner = ""
        while " listening on " not in banner:
            line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
            assert line, "dev-provider exited before listening"
            banner += line
        assert "NOT for production" in banner and f"http://127.0.0.1:{port}" in banner
        issuer = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            query = "sub=alice&aud=frontend&scope=billing:read&ttl=120"
            async with http.get(f"{issuer}/dev/token?{query}") as r:
                answer = await r.json()
            async with http.get(f"{issuer}/.well-known/openid-configuration") as r:
                discovery = await r.json()
            async with http.get(discovery["jwks_uri"]) as r:
                keys = jwk.JWKSet.from_json(await r.text())
            async with http.get(f"{issuer}/dev/token?ttl=0") as r:
                bad = (r.status, await r.json())
        assert answer["token_type"] == "Bearer" and answer["expires_in"] == 120
        verified = jwt.JWT(jwt=answer["access_token"], key=keys, algs=["ES256"])
        claims = json.loads(verified.claims)
        assert discovery["issuer"] == issuer == claims["iss"]
        assert (claims["sub"], claims["aud"], claims["scope"]) == (
            "alice",
            "frontend",
            "billing:read",
        )
        assert claims["exp"] - claims["iat"] == 120
        assert bad[0] == 400 and bad[1]["error"] == "invalid_request"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_version_is_printed() -> None:
    """``zonegate --version`` names the installed version."""
    out = subprocess.run(
        [sys.executable, "-m", "zonegate.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("zonegate 0.")


def test_every_subcommand_describes_itself() -> None:
    """``zonegate COMMAND --help`` says what the command does, for every command."""
    import argparse

    from zonegate.cli import _parser

    actions = _parser()._actions
    (sub,) = [a for a in actions if isinstance(a, argparse._SubParsersAction)]
    commands: dict[str, argparse.ArgumentParser] = dict(sub.choices)
    assert {
        "sidecar",
        "exchange",
        "injector",
        "demo",
        "check",
        "keys",
        "explain",
        "dev-provider",
    } <= set(commands)
    for name, command in commands.items():
        assert command.description and len(command.description) > 15, name
