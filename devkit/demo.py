"""``zonegate demo``: the blue/red/green picture on 127.0.0.1, in one process.

A development OpenID Provider (blue), the exchange core (embedded, or ``--remote`` as the
standalone server), the sidecar, and backends red and green that validate tokens the way a PEP
does: through their own zone issuer's discovery document and JWKS, nothing else. The walkthrough
prints what happens at each hop; ``--once`` exits 0 only if every step behaved as described.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import jwt
from aiohttp import web

from devkit.pep import ZoneBackend
from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.server.app import create_app
from exchange.tokens import TokenExchangeRequest
from runtime.logsetup import setup_logging
from runtime.serving import RawHandler
from sidecar.app import SIDECAR, Sidecar, build_sidecar, proxy_handler, proxy_runner
from sidecar.config import parse_sidecar_config

# Fixed ports for the interactive demo (so the printed curl commands work); --once uses free ones.
PORTS = {
    "op": 18080,
    "exchange": 18081,
    "sidecar": 4480,
    "admin": 4490,
    "red": 19001,
    "green": 19002,
}
CLIENT_ID, CLIENT_SECRET = "shop-frontend", "demo-secret"  # dev-only credentials of the demo


@dataclass
class Stack:
    """Every server of the demo, with where it listens."""

    urls: dict[str, str]
    op: DevOpenIDProvider
    red: ZoneBackend
    green: ZoneBackend
    remote: bool
    runners: list[web.BaseRunner] = field(default_factory=list)
    sidecar: Sidecar | None = None

    @property
    def exchange_base(self) -> str:
        return self.urls["exchange" if self.remote else "admin"]


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"127.0.0.1:{port}: {e.strerror}") from e
    return sock


def exchange_document(op: DevOpenIDProvider, issuer: str) -> dict[str, Any]:
    """The demo's exchange config: zones red and green, one client."""
    return {
        "issuer": issuer,
        "listen": issuer.removeprefix("http://"),
        "trusted_issuers": [{"issuer": op.issuer, "audiences": [op.audience]}],
        "zones": {
            "red": {
                "audiences": ["billing"],
                "resources": ["http://billing.red.internal"],
                "scopes": ["billing:read", "billing:write"],
                "claims": {"sub": "sub", "copy": ["email"]},
            },
            "green": {"audiences": ["orders"], "scopes": ["orders:read"]},
        },
        "clients": [
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "zones": ["red", "green"],
                "scopes": ["billing:read", "orders:read"],
            }
        ],
    }


def sidecar_document(stack: Stack, core: dict[str, Any]) -> dict[str, Any]:
    """The demo's sidecar config: reverse routes /red/ and /green/, and a forward-mode host."""
    exchange: dict[str, Any] = {"mode": "embedded", "core": core, "client_id": CLIENT_ID}
    if stack.remote:
        exchange = {
            "mode": "remote",
            "token_endpoint": f"{stack.urls['exchange']}/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
    red, green = stack.urls["red"], stack.urls["green"]
    return {
        "listen": stack.urls["sidecar"].removeprefix("http://"),
        "admin_listen": stack.urls["admin"].removeprefix("http://"),
        "exchange": exchange,
        "routes": [
            {
                "path_prefix": "/red/",
                "strip_prefix": True,
                "upstream": red,
                "audience": "billing",
                "scope": "billing:read",
            },
            {
                "path_prefix": "/green/",
                "strip_prefix": True,
                "upstream": green,
                "audience": "orders",
            },
            {"host": "billing.red.internal", "upstream": red, "audience": "billing"},
        ],
    }


async def start(
    app: web.Application,
    sock: socket.socket,
    runners: list[web.BaseRunner],
    handler: RawHandler | None = None,
) -> None:
    """Serve ``app`` on ``sock`` (with a ``handler``: that handler on the low-level server,
    ``app`` giving its lifecycle, as the programs serve their proxy listeners)."""
    settings: dict[str, Any] = {"handle_signals": False, "shutdown_timeout": 2.0}
    runner = (
        web.AppRunner(app, **settings)
        if handler is None
        else proxy_runner(app, handler, **settings)
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    runners.append(runner)


async def build_stack(remote: bool, fixed_ports: bool) -> Stack:
    """Start the OP, the exchange (remote mode), the sidecar and both backends."""
    socks = {name: bind(port if fixed_ports else 0) for name, port in PORTS.items()}
    urls = {name: f"http://127.0.0.1:{s.getsockname()[1]}" for name, s in socks.items()}
    op = DevOpenIDProvider(issuer=urls["op"])
    base = urls["exchange" if remote else "admin"]
    stack = Stack(
        urls,
        op,
        ZoneBackend("red", f"{base}/zones/red", "billing"),
        ZoneBackend("green", f"{base}/zones/green", "orders"),
        remote,
    )
    core = exchange_document(op, base)
    await start(op.app(), socks.pop("op"), stack.runners)
    if remote:
        app = create_app(parse_exchange_config(core, Path.cwd()))
        await start(app, socks.pop("exchange"), stack.runners)
    else:
        socks.pop("exchange").close()
    proxy_app, admin_app = build_sidecar(
        parse_sidecar_config(sidecar_document(stack, core), Path.cwd())
    )
    stack.sidecar = proxy_app[SIDECAR]
    await start(admin_app, socks.pop("admin"), stack.runners)
    await start(proxy_app, socks.pop("sidecar"), stack.runners, proxy_handler(proxy_app))
    await start(stack.red.app(), socks.pop("red"), stack.runners)
    await start(stack.green.app(), socks.pop("green"), stack.runners)
    return stack


class Walkthrough:
    """The demo's steps, each printed, each checked."""

    def __init__(self, stack: Stack, http: aiohttp.ClientSession, out: TextIO) -> None:
        self.stack, self.http, self.out = stack, http, out
        self.failures: list[str] = []

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def check(self, ok: bool, what: str) -> None:
        self.say(f"   {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failures.append(what)

    def claims(self, claims: dict[str, Any], keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in claims:
                self.say(f"      {key:<10} {claims[key]}")

    async def run(self) -> bool:
        steps: list[Callable[[], Any]] = [
            self.login,
            self.call_red,
            self.call_red_again,
            self.call_green,
            self.green_token_at_red,
            self.no_token,
            self.metrics,
        ]
        for step in steps:
            await step()
            self.say()
        return not self.failures

    async def login(self) -> None:
        self.say("1. alice logs in at the blue OpenID Provider and the frontend gets a blue token")
        form = {"grant_type": "password", "username": "alice", "password": "alice"}
        async with self.http.post(f"{self.stack.urls['op']}/token", data=form) as r:
            self.blue = str((await r.json())["access_token"])
        blue = jwt.decode(self.blue, options={"verify_signature": False})
        self.claims(blue, ("iss", "sub", "aud", "email", "scope"))
        self.check(blue["iss"] == self.stack.op.issuer, "the blue token is issued by the blue OP")

    async def get(self, url: str, token: str | None) -> tuple[int, dict[str, Any], str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.get(url, headers=headers) as r:
            body = await r.json(content_type=None)
            return r.status, body, r.headers.get("WWW-Authenticate", "")

    async def call_red(self) -> None:
        url = f"{self.stack.urls['sidecar']}/red/invoices"
        self.say(
            f"2. the frontend calls {url} with the blue token; the sidecar exchanges it for red"
        )
        status, body, _ = await self.get(url, self.blue)
        self.check(status == 200, f"red backend answered {status}")
        seen = body.get("claims", {})
        self.say("   the red backend verified (via its zone's discovery + JWKS) a token with:")
        self.claims(seen, ("iss", "sub", "aud", "scope", "client_id", "email", "exp"))
        red_issuer = f"{self.stack.exchange_base}/zones/red"
        self.check(seen.get("iss") == red_issuer, f"iss is the red zone issuer {red_issuer}")
        self.check(seen.get("sub") == "alice", "sub is still alice")

    async def call_red_again(self) -> None:
        self.say("3. the same call again is served from the token cache (no new exchange)")
        before = await self.metric("zonegate_sidecar_token_cache_total", 'result="hit"')
        status, _, _ = await self.get(f"{self.stack.urls['sidecar']}/red/invoices", self.blue)
        after = await self.metric("zonegate_sidecar_token_cache_total", 'result="hit"')
        self.check(status == 200, f"red backend answered {status}")
        self.check(after == before + 1, f"cache hits went from {before:g} to {after:g}")

    async def call_green(self) -> None:
        self.say("4. a call to /green/ gets a green token, which only the green backend accepts")
        status, body, _ = await self.get(f"{self.stack.urls['sidecar']}/green/orders", self.blue)
        self.check(status == 200, f"green backend answered {status}")
        self.check(
            body.get("claims", {}).get("iss", "").endswith("/zones/green"),
            "iss is the green zone issuer",
        )

    async def green_token_at_red(self) -> None:
        self.say("5. a green token sent straight to the red backend is refused")
        token = await self.green_token()
        status, body, _ = await self.get(f"{self.stack.urls['red']}/invoices", token)
        self.say(f"   red backend: {status} {body.get('error_description', '')}")
        self.check(status == 401, "the red backend refuses a green token")

    async def green_token(self) -> str:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": self.blue,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "audience": "orders",
        }
        if self.stack.remote:
            auth = aiohttp.BasicAuth(CLIENT_ID, CLIENT_SECRET)
            async with self.http.post(
                f"{self.stack.urls['exchange']}/token", data=form, auth=auth
            ) as r:
                return str((await r.json())["access_token"])
        # Embedded: the core lives inside the sidecar; ask it directly, as the sidecar would.
        embedded = self.stack.sidecar.embedded if self.stack.sidecar else None
        assert embedded is not None
        response = await embedded.core.exchange(
            TokenExchangeRequest(subject_token=self.blue, audience=("orders",)), client=CLIENT_ID
        )
        return response.access_token

    async def no_token(self) -> None:
        self.say("6. a call without a token is refused by the sidecar, nothing is forwarded")
        seen = len(self.stack.red.seen)
        status, body, challenge = await self.get(f"{self.stack.urls['sidecar']}/red/invoices", None)
        self.say(f"   sidecar: {status} {body.get('error')}: {body.get('error_description')}")
        self.check(
            status == 401 and challenge.startswith("Bearer"), "401 with WWW-Authenticate: Bearer"
        )
        self.check(len(self.stack.red.seen) == seen, "the red backend saw nothing")

    async def metrics_text(self) -> str:
        async with self.http.get(f"{self.stack.urls['admin']}/metrics") as r:
            return await r.text()

    async def metric(self, name: str, label: str) -> float:
        for line in (await self.metrics_text()).splitlines():
            if line.startswith(name + "{") and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def metrics(self) -> None:
        self.say(f"7. sidecar metrics ({self.stack.urls['admin']}/metrics), excerpt:")
        wanted = (
            "zonegate_sidecar_requests_total",
            "zonegate_sidecar_token_cache_total",
            "zonegate_sidecar_exchanges_total",
        )
        lines = [x for x in (await self.metrics_text()).splitlines() if x.startswith(wanted)]
        for line in lines:
            self.say(f"      {line}")
        self.check(any("exchanges_total" in x for x in lines), "exchanges are counted")


def print_try_it(stack: Stack, out: TextIO) -> None:
    urls = stack.urls
    out.write(
        f"""zonegate demo is serving on 127.0.0.1 (Ctrl-C to stop). Try it by hand:

  TOKEN=$(curl -s -d grant_type=password -d username=alice -d password=alice {urls["op"]}/token \\
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s -H "Authorization: Bearer $TOKEN" {urls["sidecar"]}/red/invoices        # reverse mode
  curl -s -x {urls["sidecar"]} -H "Authorization: Bearer $TOKEN" http://billing.red.internal/x  # forward mode
  curl -s {urls["sidecar"]}/red/invoices                                         # no token: 401
  curl -s {stack.exchange_base}/zones/red/.well-known/openid-configuration           # what a PEP reads
  curl -s {urls["admin"]}/metrics | grep zonegate_
"""
    )
    out.flush()


async def wait_ready(http: aiohttp.ClientSession, admin: str, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout * 20)):
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{admin}/readyz") as r:
                if r.status == 200:
                    return True
        await asyncio.sleep(0.05)
    return False


async def run(once: bool, remote: bool, out: TextIO = sys.stdout) -> int:
    """Start everything, walk through, then exit (``once``) or keep serving until SIGTERM."""
    stack = await build_stack(remote, fixed_ports=not once)
    mode = "remote (standalone exchange server)" if remote else "embedded (core inside the sidecar)"
    out.write(f"zonegate demo: exchange {mode}\n")
    for name, url in stack.urls.items():
        if name != "exchange" or remote:
            out.write(f"  {name:<9} {url}\n")
    out.write("\n")
    try:
        async with aiohttp.ClientSession() as http:
            if not await wait_ready(http, stack.urls["admin"]):
                out.write("FAILED: the sidecar did not become ready\n")
                return 1
            passed = await Walkthrough(stack, http, out).run()
        out.write("every step behaved as described\n" if passed else "some steps FAILED\n")
        if once:
            return 0 if passed else 1
        print_try_it(stack, out)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        for runner in reversed(stack.runners):
            await runner.cleanup()


def main(*, once: bool, remote: bool) -> int:
    """Entry point of ``zonegate demo``."""
    setup_logging("WARNING")
    logging.getLogger("zonegate.keys").setLevel(logging.ERROR)  # ephemeral keys are the point here
    try:
        return asyncio.run(run(once, remote))
    except OSError as e:
        print(
            f"zonegate demo: cannot listen on {e.strerror} (is another demo running? "
            "`zonegate demo --once` uses free ports)",
            file=sys.stderr,
        )
        return 1
