"""Hostile input against the sidecar proxy on 127.0.0.1 (embedded mode, real upstreams).

Every case is a clear 4xx (never a 5xx, never a traceback), nothing reaches an upstream it was
not routed to, and no path ever escapes a route's prefix on its way upstream. Requests that
aiohttp's client will not send go over raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from devkit.provider import DevOpenIDProvider
from sidecar.app import build_sidecar
from sidecar.config import parse_sidecar_config
from tests.conftest import ServerFactory, exchange_document
from tests.test_hostile_token_endpoint import (
    EXAMPLES,
    HEADER_TEXT,
    TRACEBACK_MARKERS,
    raw_exchange,
)
from tests.test_sidecar import Backend, wait_ready

pytestmark = pytest.mark.usefixtures("no_crash")  # no error log, no traceback, ever

RED_HOST = "billing.red.internal"


@dataclass
class Proxy:
    """The sidecar under attack and the upstreams behind it."""

    server: TestServer
    red: Backend
    green: Backend
    op: DevOpenIDProvider
    session: aiohttp.ClientSession
    subject: str

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def forwarded(self) -> int:
        return len(self.red.seen) + len(self.green.seen)

    async def raw(self, request: bytes) -> tuple[int, bytes]:
        return await raw_exchange(self.port, request)

    async def send(
        self, method: str, target: str, host: str = "127.0.0.1", **headers: str
    ) -> tuple[int, bytes]:
        """One request with a raw request target, the subject token and ``Connection: close``."""
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host}",
            f"Authorization: Bearer {self.subject}",
        ]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        head = "\r\n".join([*lines, "Connection: close", "", ""])
        return await self.raw(head.encode("latin-1"))


def assert_refused(status: int, body: bytes, expected: int | tuple[int, ...] | None = None) -> None:
    """A 4xx (the given one) without a traceback; the proxy's own answers are JSON errors."""
    assert 400 <= status < 500, (status, body[:300])
    if expected is not None:
        assert status in (expected if isinstance(expected, tuple) else (expected,)), (
            status,
            body[:300],
        )
    assert not any(marker.encode() in body for marker in TRACEBACK_MARKERS)
    if body.startswith(b"{"):
        document = json.loads(body)
        assert set(document) == {"error", "error_description"}


@pytest.fixture
async def proxy(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory, proxy_server: ServerFactory
) -> AsyncIterator[Proxy]:
    red, green = Backend("red"), Backend("green")
    red_url = str((await aiohttp_server(red.app(), host="127.0.0.1")).make_url("")).rstrip("/")
    green_url = str((await aiohttp_server(green.app(), host="127.0.0.1")).make_url("/v1"))
    document = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "exchange": {"mode": "embedded", "client_id": "shop-frontend", "core": exchange_document(op)},
        "routes": [
            {"name": "red", "host": RED_HOST, "upstream": red_url, "audience": "billing"},
            {"name": "green", "path_prefix": "/green/", "strip_prefix": True, "upstream": green_url, "audience": "orders"},
            {"name": "api", "path_prefix": "/red/api/", "upstream": red_url, "audience": "billing"},
        ],
    }  # fmt: skip
    proxy_app, admin_app = build_sidecar(parse_sidecar_config(document, Path.cwd()))
    admin = await aiohttp_server(admin_app, host="127.0.0.1")
    server = await proxy_server(proxy_app)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, str(admin.make_url("/readyz")))
        attacked = Proxy(server, red, green, op, session, op.mint())
        status, _ = await attacked.send(
            "GET", "/green/ok"
        )  # the route works: refusals mean something
        assert status == 201 and len(green.seen) == 1
        green.seen.clear()
        yield attacked
        async with session.get(admin.make_url("/healthz")) as r:
            assert r.status == 200  # the sidecar survived everything


# -- CONNECT and absolute-form ---------------------------------------------------------------------

CONNECTS = [
    (f"{RED_HOST}:443", f"{RED_HOST}:443"),
    (f"{RED_HOST}:80", f"{RED_HOST}:80"),
    ("evil.example:443", "evil.example:443"),
    ("127.0.0.1:22", "127.0.0.1:22"),
    ("[::1]:443", "[::1]:443"),
    ("/green/ok", "127.0.0.1"),
]


@pytest.mark.parametrize(("target", "host"), CONNECTS)
async def test_connect_is_refused(proxy: Proxy, target: str, host: str) -> None:
    """CONNECT, to a routed host or anywhere else: refused, nothing tunnelled or forwarded."""
    status, body = await proxy.send("CONNECT", target, host)
    assert_refused(status, body, (400, 405))
    assert proxy.forwarded() == 0


ABSOLUTE = [
    "http://evil.example/",
    "http://evil.example:80/green/ok",
    f"http://{RED_HOST}.evil.example/",
    f"http://evil.example/{RED_HOST}",
    f"http://{RED_HOST}@evil.example/",
    "http://user:pass@evil.example/",
    "http://127.0.0.1:22/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/",
    "http://0x7f000001/",
    "http://2130706433/",
    "https://evil.example/",
    f"ftp://{RED_HOST}/",
    f"gopher://{RED_HOST}/",
    "file:///etc/passwd",
    f"http:/{RED_HOST}/",
    "http:///",
    "*",
]


@pytest.mark.parametrize("target", ABSOLUTE)
async def test_absolute_form_to_unconfigured_hosts(proxy: Proxy, target: str) -> None:
    """Absolute-form (HTTP_PROXY) targets that name no configured host are refused: not an open
    proxy, whatever the Host header says."""
    status, body = await proxy.send("GET", target, host=RED_HOST)
    assert_refused(status, body)
    assert proxy.forwarded() == 0


async def test_absolute_form_to_the_configured_host_is_forwarded(proxy: Proxy) -> None:
    """The control case: the configured host in absolute-form reaches its upstream."""
    status, _ = await proxy.send("GET", f"http://{RED_HOST}/x", host="evil.example")
    assert status == 201
    assert proxy.red.seen[-1].path_qs == "/x"


HOSTNAMES = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}(\.[a-z]{2,6})?", fullmatch=True)


@EXAMPLES
@given(
    host=HOSTNAMES,
    port=st.none() | st.integers(1, 65535),
    path=st.sampled_from(["/", "/green/ok", "/x?y=1"]),
)
async def test_generated_absolute_form_hosts(
    proxy: Proxy, host: str, port: int | None, path: str
) -> None:
    """Any other host (and port) in absolute-form: 403, nothing forwarded."""
    if host.rstrip(".") == RED_HOST:
        return
    authority = f"{host}:{port}" if port else host
    status, body = await proxy.send("GET", f"http://{authority}{path}", host=RED_HOST)
    assert_refused(status, body, (400, 403))
    assert proxy.forwarded() == 0


# -- path tricks ----------------------------------------------------------------------------------

ESCAPES = [
    "/green/../../etc/passwd",
    "/green/%2e%2e/%2e%2e/admin",
    "/green/%2E%2E/%2e%2E/admin",
    "/green/..%2fadmin",
    "/green/..%2Fadmin",
    "/green/%2e%2e%2fadmin",
    "/green/..%5cadmin",
    "/green/..\\admin",
    "/green/%252e%252e/admin",
    "/green/%252e%252e%252fadmin",
    "/green/..%252fadmin",
    "/green/%25%32%65%25%32%65/admin",
    "/green/..;/admin",
    "/green/.;/..;/admin",
    "/green/%2e%2e;x=1/admin",
    "/green/..%00/admin",
    "/green/%00",
    "/green/%",
    "/green/%zz",
    "/green/a/..%2f..%2f..%2fadmin",
    "/green/./../../admin",
    "/..",
    "/../green/ok",
    "/%2e%2e/green/ok",
    "/green%2fok",
    "/green%2Fok",
    "/green/ok/%2e%2e/%2e%2e/%2e%2e",
]


@pytest.mark.parametrize("target", ESCAPES)
async def test_prefix_escape_attempts_are_refused(proxy: Proxy, target: str) -> None:
    """Dot segments that climb out of a prefix, encoded or double-encoded slashes and dots,
    backslashes, NUL, ``..;`` (path parameters) and broken escapes: a 4xx, nothing forwarded."""
    status, body = await proxy.send("GET", target)
    assert_refused(status, body, (400, 404))
    assert proxy.forwarded() == 0


def escapes_upstream_base(path_qs: str, base: str) -> bool:
    """Would an upstream that decodes (even twice) and resolves dots see a path outside base?"""
    path = path_qs.split("?", 1)[0]
    for _ in range(3):
        decoded = unquote(path)
        for segment in re.split(r"[/\\]", decoded):
            if segment.split(";", 1)[0] in (".", ".."):
                return True
        path = decoded
    return not path_qs.startswith(base)


SEGMENTS = st.sampled_from(
    ["..", ".", "%2e%2e", "%2E%2e", "%2e", ".%2e", "%2f", "%2F", "%252f", "%252e%252e", "%5c",
     "\\", "..;", ";", "%3b", "x", "admin", "", "%00", "%25", "a%20b", "~", "%7e", "v1", "..%2f"]
)  # fmt: skip


@EXAMPLES
@given(
    segments=st.lists(SEGMENTS, min_size=1, max_size=6),
    query=st.sampled_from(["", "?a=..", "?%2e%2e"]),
)
async def test_generated_paths_never_escape_the_prefix(
    proxy: Proxy, segments: list[str], query: str
) -> None:
    """Any mix of dot, slash and escape segments under /green/: refused (4xx), or forwarded to
    the green upstream below its base /v1/ with no dot segment left, even decoded twice."""
    before = len(proxy.green.seen)
    status, body = await proxy.send("GET", "/green/" + "/".join(segments) + query)
    if status < 400:
        assert status == 201
        forwarded = proxy.green.seen[before:] + proxy.red.seen
        for seen in forwarded:
            assert not escapes_upstream_base(seen.path_qs, "/v1/"), seen.path_qs
        proxy.red.seen.clear()
    else:
        assert_refused(status, body, (400, 404))
        assert len(proxy.green.seen) == before


# -- headers and framing -------------------------------------------------------------------------


def routed(head: str, body: bytes = b"") -> bytes:
    """A request for the red route with the given extra header lines."""
    return (f"POST /red/api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n").encode("latin-1") + body


RAW_CASES: list[tuple[str, bytes]] = [
    ("CL and TE", routed("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    ("TE and CL", routed("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n")),
    ("two CL", routed("Content-Length: 4\r\nContent-Length: 5\r\n", b"abcde")),
    ("CL list", routed("Content-Length: 4, 5\r\n", b"abcde")),
    ("negative CL", routed("Content-Length: -4\r\n")),
    ("TE gzip last", routed("Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n")),
    ("TE with space name", routed("Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    ("TE vertical tab", routed("Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    (
        "smuggled second request",
        routed(
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\nGET /red/api/admin HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ),
    ("bad chunk size", routed("Transfer-Encoding: chunked\r\n", b"-1\r\nx\r\n0\r\n\r\n")),
    ("CR in a header value", routed("X-A: a\rX-Injected: b\r\n")),
    ("NUL in a header value", routed("X-A: a\x00b\r\n")),
    ("NUL in Authorization", routed("Authorization: Bearer a\x00b\r\n")),
    ("LF-injected header", routed("X-A: a\n\rX-Injected: 1\r\n")),
    ("obs-fold", routed("X-A: a\r\n folded\r\n")),
    ("header name with space", routed("X A: b\r\n")),
    ("header without colon", routed("NoColon\r\n")),
    ("40 KiB header", routed("X-Big: " + "b" * 40_000 + "\r\n")),
    ("NUL in the target", b"GET /red/api/\x00x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("space in the target", b"GET /red/api/a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("fragment-only target", b"GET # HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("TLS hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40),
]


@pytest.mark.parametrize(
    "raw", [case[1] for case in RAW_CASES], ids=[case[0] for case in RAW_CASES]
)
async def test_raw_framing_attacks_never_reach_an_upstream(proxy: Proxy, raw: bytes) -> None:
    """Conflicting Content-Length/Transfer-Encoding, smuggling, CR/LF/NUL in headers, bad targets:
    a 4xx from the proxy and no byte of it at any upstream (no token is exchanged for it)."""
    token_line = f"Authorization: Bearer {proxy.subject}\r\n".encode()
    if b"Authorization" not in raw:
        raw = raw.replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\n" + token_line, 1)
    status, body = await proxy.raw(raw)
    assert_refused(status, body)
    await asyncio.sleep(0.05)
    assert proxy.forwarded() == 0


HOST_TRICKS = [
    f"{RED_HOST}@evil.example",
    f"evil.example#{RED_HOST}",
    f"{RED_HOST}:80@evil.example",
    f"{RED_HOST}\\@evil.example",
    f"{RED_HOST}.evil.example",
    f"evil.{RED_HOST}",
]


@pytest.mark.parametrize("host", HOST_TRICKS)
async def test_host_header_tricks_do_not_select_the_host_route(proxy: Proxy, host: str) -> None:
    """A Host header that only looks like the routed host does not select its route."""
    status, body = await proxy.send("GET", "/x", host=host)
    assert_refused(status, body, (400, 404))
    assert proxy.forwarded() == 0


@EXAMPLES
@given(scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]), value=HEADER_TEXT)
async def test_generated_authorization_headers_are_never_forwarded(
    proxy: Proxy, scheme: str, value: str
) -> None:
    """Any Authorization value that is no valid token: 401 (or 400), never forwarded upstream,
    never a 5xx; the sidecar never sends what it got as a token."""
    headers = {"Authorization": (scheme + value).strip() or "x", "Connection": "close"}
    async with proxy.session.get(proxy.server.make_url("/red/api/x"), headers=headers) as r:
        body = await r.read()
    assert_refused(r.status, body, (400, 401))
    assert proxy.forwarded() == 0


async def test_tokens_for_another_client_are_refused_before_the_upstream(
    proxy: Proxy,
) -> None:
    """Subject tokens the exchange refuses (expired, wrong audience, alg none) are 401s, and
    nothing is forwarded; the control token passes."""
    import base64

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"iss": proxy.op.issuer, "sub": "alice", "aud": "frontend", "exp": 2**31}
    for token in (
        proxy.op.mint({"exp": 1}),
        proxy.op.mint({"aud": "reports-app"}),
        f"{b64({'alg': 'none'})}.{b64(claims)}.",
    ):
        headers = {"Authorization": f"Bearer {token}"}
        async with proxy.session.get(proxy.server.make_url("/red/api/x"), headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert proxy.forwarded() == 0
