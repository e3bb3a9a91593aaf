"""Hostile input against POST /token of the real exchange server on 127.0.0.1.

Every case must be a clear 4xx: never a 5xx, never a traceback in the body or in a log record,
never a URL fetched because a token named it (``jku``, ``x5u``, an untrusted ``iss``). Cases are
hand-written (forms, every JWT trick, raw-socket HTTP framing) and hypothesis-generated (bytes,
forms, JWT headers and claims, credentials); one server serves all examples of a test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.keys import generate_private_key, signing_key
from exchange.server.app import create_app
from exchange.tokens import (
    CLIENT_ASSERTION_TYPE_JWT_BEARER,
    GRANT_TYPE_TOKEN_EXCHANGE,
    SINGLE_VALUED,
    TOKEN_TYPE_ACCESS_TOKEN,
)
from tests.conftest import ServerFactory, exchange_document
from tests.logchecks import Records

pytestmark = pytest.mark.usefixtures("no_crash")  # no error log, no traceback, ever

FORM = "application/x-www-form-urlencoded"
SHOP = "Basic " + base64.b64encode(b"shop-frontend:s3cret-shop").decode()
ATTACKER = signing_key(generate_private_key("RS256"), "RS256")
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/')
EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def compact(header: Any, claims: Any, signature: bytes = b"sig") -> str:
    """A compact JWS with any header and claims, signed with nothing trustworthy."""
    return f"{b64(json.dumps(header))}.{b64(json.dumps(claims))}.{b64(signature)}"


# -- servers: the exchange server, and a trap that must never be fetched ----------------------


@dataclass
class Trap:
    """A server that counts every request: a token pointing here must never make us call it."""

    url: str = ""
    hits: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.record)
        return app

    async def record(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        jwks = {"keys": [ATTACKER.public_jwk]}
        return web.json_response(jwks if "jwks" in request.path else {"issuer": self.url})


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


@dataclass
class Target:
    """The exchange server under attack, its trusted OP and the trap."""

    url: str
    port: int
    op: DevOpenIDProvider
    trap: Trap
    session: aiohttp.ClientSession

    async def post(
        self,
        data: Any,
        *,
        authorization: str | None = SHOP,
        content_type: str | None = FORM,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if content_type is not None:
            sent["Content-Type"] = content_type
        if authorization is not None:
            sent["Authorization"] = authorization
        if isinstance(data, dict | list):
            data = urllib.parse.urlencode(data).encode()
        if isinstance(data, bytes) and len(data) > 1 << 16:
            data = io.BytesIO(data)  # aiohttp warns about large raw bodies
        async with self.session.post(f"{self.url}/token", data=data, headers=sent) as r:
            return Answer(r.status, dict(r.headers), await r.read())

    def form(self, subject_token: str | None = None, **fields: str) -> dict[str, str]:
        """A token request for the billing audience, with overrides."""
        return {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": subject_token if subject_token is not None else self.op.mint(),
            "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
            "audience": "billing",
            **fields,
        }

    async def raw(self, request: bytes) -> tuple[int, bytes]:
        """Send bytes aiohttp's client would refuse to; return the status and the body."""
        return await raw_exchange(self.port, request)


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Write raw bytes to 127.0.0.1:port; read one response (head, then its Content-Length)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                (int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                 if k.strip().lower() == "content-length"),
                None,
            )  # fmt: skip
            body = await (reader.readexactly(length) if length is not None else reader.read())
    finally:
        writer.close()
    return int(lines[0].split(" ", 2)[1]), body


def assert_clear_4xx(answer: Answer, error: str | None = None) -> None:
    """A 4xx whose body is the RFC 6749 §5.2 JSON error, without a traceback."""
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    text = answer.body.decode(errors="replace")
    assert not any(marker in text for marker in TRACEBACK_MARKERS), text
    body = answer.json()
    assert isinstance(body.get("error"), str) and body.get("error_description"), body
    if error is not None:
        assert body["error"] == error, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def target(op: DevOpenIDProvider, aiohttp_server: ServerFactory) -> AsyncIterator[Target]:
    trap = Trap()
    trap_server = await aiohttp_server(trap.app(), host="127.0.0.1")
    trap.url = str(trap_server.make_url("")).rstrip("/")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    document = exchange_document(op, issuer=url, jwks_min_refresh=60)
    app = create_app(parse_exchange_config(document, Path.cwd()))
    await aiohttp_server(app, host="127.0.0.1", port=port)
    async with aiohttp.ClientSession() as session:
        attacked = Target(url, port, op, trap, session)
        assert (await attacked.post(attacked.form())).status == 200  # keys held: a real server
        yield attacked
    assert trap.hits == [], f"a URL named in a request was fetched: {trap.hits}"


# -- forms --------------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes, str | None, int]] = [
    ("empty", b"", FORM, 400),
    ("json", b'{"grant_type": "x"}', "application/json", 400),
    ("text", b"grant_type=x", "text/plain", 400),
    ("multipart", b"--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", 400),
    ("no content type", b"grant_type=x", None, 400),
    ("only separators", b"&&&&=&=", FORM, 400),
    ("lone percent", b"grant_type=%", FORM, 400),
    ("bad escape", b"grant_type=%zz", FORM, 400),
    ("overlong utf8 escape", b"grant_type=%c0%af", FORM, 400),
    ("raw non-ascii", "grant_type=ü".encode(), FORM, 400),
    ("raw nul", b"grant_type=\x00", FORM, 400),
    (
        "escaped nul",
        b"subject_token=%00&grant_type=" + GRANT_TYPE_TOKEN_EXCHANGE.encode(),
        FORM,
        400,
    ),
    ("name only", b"grant_type", FORM, 400),
    ("plus soup", b"++++=++++", FORM, 400),
    ("65 fields", b"&".join(b"f%d=1" % i for i in range(65)), FORM, 400),
    ("64 KiB + 1", b"x=" + b"a" * (64 * 1024 - 1), FORM, 413),
    ("1 MiB", b"x=" + b"a" * (1 << 20), FORM, 413),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_malformed_and_oversized_bodies(
    target: Target, body: bytes, content_type: str | None, status: int
) -> None:
    """Bodies that are no token request, or too large, are refused with 400 or 413."""
    answer = await target.post(body, content_type=content_type)
    assert answer.status == status
    assert_clear_4xx(answer)
    assert answer.json()["error"] in ("invalid_request", "unsupported_grant_type")


async def test_oversized_chunked_body_without_content_length(target: Target) -> None:
    """A chunked body past 64 KiB is cut off at the limit: 413, not read to the end."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x="
        for _ in range(40):
            yield b"a" * 4096

    answer = await target.post(chunks())
    assert answer.status == 413
    assert_clear_4xx(answer, "invalid_request")


@pytest.mark.parametrize("name", sorted(SINGLE_VALUED))
async def test_repeated_single_valued_parameter(target: Target, name: str) -> None:
    """Every single-valued RFC 8693 / RFC 6749 parameter given twice is invalid_request."""
    form = [*target.form().items(), (name, "one"), (name, "two")]
    assert_clear_4xx(await target.post(form), "invalid_request")


FIELD_CASES: list[tuple[str, dict[str, str | None], str]] = [
    ("no grant_type", {"grant_type": None}, "invalid_request"),
    ("empty grant_type", {"grant_type": ""}, "unsupported_grant_type"),
    ("password grant", {"grant_type": "password"}, "unsupported_grant_type"),
    ("grant with space", {"grant_type": GRANT_TYPE_TOKEN_EXCHANGE + " "}, "unsupported_grant_type"),
    (
        "grant upper case",
        {"grant_type": GRANT_TYPE_TOKEN_EXCHANGE.upper()},
        "unsupported_grant_type",
    ),
    ("no subject", {"subject_token": None}, "invalid_request"),
    ("empty subject", {"subject_token": ""}, "invalid_request"),
    ("no subject type", {"subject_token_type": None}, "invalid_request"),
    (
        "refresh subject type",
        {"subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        "invalid_request",
    ),
    (
        "saml requested",
        {"requested_token_type": "urn:ietf:params:oauth:token-type:saml2"},
        "invalid_request",
    ),
    ("actor without type", {"actor_token": "a.b.c"}, "invalid_request"),
    ("actor type without token", {"actor_token_type": TOKEN_TYPE_ACCESS_TOKEN}, "invalid_request"),
    ("empty audience", {"audience": ""}, "invalid_request"),
    ("2 KiB audience", {"audience": "a" * 2049}, "invalid_request"),
    ("unknown audience", {"audience": "../red"}, "invalid_target"),
    (
        "resource of another zone",
        {"resource": "http://billing.red.internal", "audience": "orders"},
        "invalid_target",
    ),
    ("scope with quote", {"scope": 'billing:read"'}, "invalid_request"),
    ("scope with backslash", {"scope": "billing:read\\"}, "invalid_request"),
    ("scope non-ascii", {"scope": "billing:réad"}, "invalid_request"),
    ("scope 5000 chars", {"scope": "s" * 5000}, "invalid_request"),
    ("scope tab", {"scope": "billing:read\tbilling:write"}, "invalid_request"),
    ("scope up-scoping", {"scope": "billing:write"}, "invalid_scope"),
]


@pytest.mark.parametrize(
    ("fields", "error"), [case[1:] for case in FIELD_CASES], ids=[case[0] for case in FIELD_CASES]
)
async def test_bad_fields(target: Target, fields: dict[str, str | None], error: str) -> None:
    """Each wrong, missing or hostile field is refused with its RFC error code."""
    form = {name: value for name, value in (target.form() | fields).items() if value is not None}
    assert_clear_4xx(await target.post(form), error)


async def test_33_audiences(target: Target) -> None:
    """More than 32 audience/resource values is invalid_request."""
    form = list(target.form().items()) + [("audience", "billing")] * 33
    assert_clear_4xx(await target.post(form), "invalid_request")


AUTH_CASES = [
    "Basic",
    "Basic !!!",
    "Basic " + b64("no-colon"),
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
    "Basic " + base64.b64encode(b"shop-frontend:").decode(),
    "Basic " + base64.b64encode(b":s3cret-shop").decode(),
    "Basic " + base64.b64encode(b"shop-frontend:s3cret-shop" * 200).decode(),
    "Bearer " + "a.b.c",
    "Digest username=shop-frontend",
    "basic",
    "",
]


@pytest.mark.parametrize("authorization", AUTH_CASES, ids=range(len(AUTH_CASES)))
async def test_bad_client_authentication(target: Target, authorization: str) -> None:
    """Malformed or wrong client credentials are invalid_client (or invalid_request), never 5xx."""
    answer = await target.post(target.form(), authorization=authorization)
    assert_clear_4xx(answer)
    assert answer.json()["error"] in ("invalid_client", "invalid_request")


async def test_hostile_client_assertions(target: Target) -> None:
    """Garbage, alg none and jku-bearing client assertions are refused; the trap is not called."""
    assertions = [
        "garbage",
        compact({"alg": "none"}, {"iss": "shop-frontend", "sub": "shop-frontend"}, b""),
        jwt.encode(
            {"iss": "shop-frontend", "sub": "shop-frontend", "aud": target.url, "exp": 2**31},
            ATTACKER.private_key,
            algorithm="RS256",
            headers={"jku": f"{target.trap.url}/jwks", "kid": ATTACKER.kid},
        ),
    ]
    for assertion in assertions:
        form = target.form(
            client_assertion=assertion, client_assertion_type=CLIENT_ASSERTION_TYPE_JWT_BEARER
        )
        answer = await target.post(form, authorization=None)
        assert_clear_4xx(answer)
        assert answer.json()["error"] in ("invalid_client", "invalid_request")


async def test_credentials_in_two_places(target: Target) -> None:
    """Basic plus a client_secret in the body, or two Authorization headers: refused."""
    assert_clear_4xx(await target.post(target.form(client_secret="s3cret-shop")), "invalid_request")
    form = urllib.parse.urlencode(target.form()).encode()
    async with target.session.post(
        f"{target.url}/token",
        data=form,
        headers=[("Authorization", SHOP), ("Authorization", SHOP)],
    ) as r:
        answer = Answer(r.status, dict(r.headers), await r.read())
    assert_clear_4xx(answer)


# -- every JWT trick ----------------------------------------------------------------------------


def public_pem(op: DevOpenIDProvider) -> bytes:
    key = op.keys[op.kid_for("RS256")].private_key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def hs256(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HMAC-signed token, as an attacker signs with the issuer's public key as secret."""
    signing_input = f"{b64(json.dumps(header))}.{b64(json.dumps(claims))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims_of(op: DevOpenIDProvider, **overrides: Any) -> dict[str, Any]:
    """Claims the trusted OP would issue, so only the trick can be what is refused."""
    return jwt.decode(op.mint(overrides), options={"verify_signature": False})


def attacker_signed(op: DevOpenIDProvider, headers: dict[str, Any], **claims: Any) -> str:
    """Valid-looking claims signed with the attacker's own key."""
    return jwt.encode(
        claims_of(op, **claims), ATTACKER.private_key, algorithm="RS256", headers=headers
    )


Trick = Callable[[DevOpenIDProvider, str], str]


def nested(document: dict[str, Any], depth: int) -> str:
    """``document`` plus a member nested ``depth`` arrays deep (beyond any JSON encoder)."""
    head = json.dumps(document)[:-1]
    return b64(f'{head}, "x": {"[" * depth}{"]" * depth}}}')


JWT_TRICKS: list[tuple[str, Trick]] = [
    (
        "alg none",
        lambda op, trap: compact({"alg": "none", "kid": op.default_kid}, claims_of(op), b""),
    ),
    (
        "alg None",
        lambda op, trap: compact({"alg": "None", "kid": op.default_kid}, claims_of(op), b""),
    ),
    ("alg nOnE with signature", lambda op, trap: compact({"alg": "nOnE"}, claims_of(op))),
    (
        "HS256 with the RSA public key PEM",
        lambda op, trap: hs256(
            public_pem(op), {"alg": "HS256", "kid": op.kid_for("RS256")}, claims_of(op)
        ),
    ),
    (
        "HS256 with the public JWK",
        lambda op, trap: hs256(
            json.dumps(op.keys[op.kid_for("RS256")].public_jwk).encode(),
            {"alg": "HS256", "kid": op.kid_for("RS256")},
            claims_of(op),
        ),
    ),
    ("HS512 no kid", lambda op, trap: hs256(b"secret", {"alg": "HS512"}, claims_of(op))),
    (
        "RS256 header on the EC key",
        lambda op, trap: attacker_signed(op, {"kid": op.kid_for("ES256")}),
    ),
    (
        "ES256 header on the RSA key",
        lambda op, trap: compact({"alg": "ES256", "kid": op.kid_for("RS256")}, claims_of(op)),
    ),
    (
        "PS256 on a key declared RS256",
        lambda op, trap: jwt.encode(
            claims_of(op),
            ATTACKER.private_key,
            algorithm="PS256",
            headers={"kid": op.kid_for("RS256")},
        ),
    ),
    (
        "unknown alg",
        lambda op, trap: compact({"alg": "XX999", "kid": op.default_kid}, claims_of(op)),
    ),
    (
        "alg not a string",
        lambda op, trap: compact({"alg": ["RS256"], "kid": op.default_kid}, claims_of(op)),
    ),
    ("crit exp", lambda op, trap: op.mint(headers={"crit": ["exp"]})),
    ("crit b64 false", lambda op, trap: op.mint(headers={"crit": ["b64"], "b64": False})),
    ("crit empty", lambda op, trap: op.mint(headers={"crit": []})),
    (
        "jku to the trap",
        lambda op, trap: attacker_signed(op, {"jku": f"{trap}/jwks", "kid": ATTACKER.kid}),
    ),
    (
        "x5u to the trap",
        lambda op, trap: attacker_signed(op, {"x5u": f"{trap}/cert.pem", "kid": ATTACKER.kid}),
    ),
    (
        "jku with a trusted kid",
        lambda op, trap: attacker_signed(op, {"jku": f"{trap}/jwks", "kid": op.kid_for("RS256")}),
    ),
    (
        "embedded jwk",
        lambda op, trap: attacker_signed(op, {"jwk": ATTACKER.public_jwk, "kid": ATTACKER.kid}),
    ),
    (
        "x5c chain",
        lambda op, trap: attacker_signed(op, {"x5c": [b64(b"not a cert")], "kid": ATTACKER.kid}),
    ),
    ("iss is the trap", lambda op, trap: attacker_signed(op, {"kid": ATTACKER.kid}, iss=trap)),
    ("kid path traversal", lambda op, trap: attacker_signed(op, {"kid": "../../../../etc/passwd"})),
    ("kid sql", lambda op, trap: attacker_signed(op, {"kid": "' OR '1'='1"})),
    ("kid url", lambda op, trap: attacker_signed(op, {"kid": f"{trap}/jwks"})),
    ("kid nul", lambda op, trap: attacker_signed(op, {"kid": "a\x00b"})),
    ("kid 300 chars", lambda op, trap: attacker_signed(op, {"kid": "k" * 300})),
    ("kid number", lambda op, trap: compact({"alg": "RS256", "kid": 1}, claims_of(op))),
    ("kid object", lambda op, trap: compact({"alg": "RS256", "kid": {"$ne": None}}, claims_of(op))),
    ("kid empty", lambda op, trap: compact({"alg": "RS256", "kid": ""}, claims_of(op))),
    ("no kid, two keys", lambda op, trap: compact({"alg": "RS256"}, claims_of(op))),
    (
        "deep header",
        lambda op, trap: f"{nested({'alg': 'RS256'}, 3000)}.{b64(json.dumps(claims_of(op)))}.c2ln",
    ),
    (
        "deep claims",
        lambda op, trap: f"{b64(json.dumps({'alg': 'RS256'}))}.{nested(claims_of(op), 3000)}.c2ln",
    ),
    (
        "iss an object",
        lambda op, trap: compact({"alg": "RS256"}, {**claims_of(op), "iss": {"x": op.issuer}}),
    ),
    ("claims an array", lambda op, trap: compact({"alg": "RS256"}, [claims_of(op)])),
    ("claims a string", lambda op, trap: compact({"alg": "RS256"}, "claims")),
    ("header an array", lambda op, trap: compact(["RS256"], claims_of(op))),
    ("20 KiB claim", lambda op, trap: op.mint({"pad": "p" * 20_000})),
    ("60 KiB claim", lambda op, trap: op.mint({"pad": "p" * 45_000})),
    ("exp NaN, signed by the OP", lambda op, trap: op.mint({"exp": float("nan")})),
    ("exp Infinity, signed by the OP", lambda op, trap: op.mint({"exp": float("inf")})),
    ("exp 10**400, signed by the OP", lambda op, trap: op.mint({"exp": 10**400})),
    ("iat NaN, signed by the OP", lambda op, trap: op.mint({"iat": float("nan")})),
    ("exp a string, signed by the OP", lambda op, trap: op.mint({"exp": "tomorrow"})),
    ("sub an object, signed by the OP", lambda op, trap: op.mint({"sub": {"id": 1}})),
    ("expired, signed by the OP", lambda op, trap: op.mint({"exp": 1})),
    ("wrong aud, signed by the OP", lambda op, trap: op.mint({"aud": "someone-else"})),
    (
        "payload swapped",
        lambda op, trap: ".".join(
            [
                op.mint().split(".")[0],
                b64(json.dumps(claims_of(op, sub="admin"))),
                op.mint().split(".")[2],
            ]
        ),
    ),
    ("signature stripped", lambda op, trap: op.mint().rsplit(".", 1)[0] + "."),
    ("two parts", lambda op, trap: op.mint().rsplit(".", 1)[0]),
    ("four parts", lambda op, trap: op.mint() + ".x"),
    ("JWE shape", lambda op, trap: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d"),
    ("dots only", lambda op, trap: ".."),
    ("not base64", lambda op, trap: "!!!.@@@.###"),
    ("base64 not json", lambda op, trap: f"{b64('nope')}.{b64('nope')}.{b64('nope')}"),
]


@pytest.mark.parametrize(
    "trick", [case[1] for case in JWT_TRICKS], ids=[case[0] for case in JWT_TRICKS]
)
async def test_jwt_tricks_are_invalid_request(target: Target, trick: Trick) -> None:
    """Every forged, confused or malformed subject token is invalid_request; nothing is fetched."""
    token = trick(target.op, target.trap.url)
    answer = await target.post(target.form(token))
    assert_clear_4xx(answer)
    assert answer.json()["error"] == "invalid_request"
    assert token[:40] not in answer.body.decode()


async def test_hostile_actor_tokens(target: Target) -> None:
    """The same tricks as actor_token are invalid_request too."""
    for _name, trick in JWT_TRICKS[:20]:
        form = target.form(actor_token=trick(target.op, target.trap.url))
        form["actor_token_type"] = TOKEN_TYPE_ACCESS_TOKEN
        answer = await target.post(form)
        assert_clear_4xx(answer, "invalid_request")


async def test_random_kid_flood_over_http_makes_no_fetch(target: Target) -> None:
    """50 concurrent tokens with random kids: invalid_request each, no JWKS refetch at all."""
    await target.post(target.form())  # keys held
    before = target.op.jwks_fetches
    tokens = [target.op.mint(headers={"kid": f"random-{i}"}) for i in range(50)]
    answers = await asyncio.gather(*(target.post(target.form(t)) for t in tokens))
    for answer in answers:
        assert_clear_4xx(answer, "invalid_request")
    assert target.op.jwks_fetches - before <= 1  # jwks_min_refresh: 60 s


# -- generated cases ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD_NAMES = st.sampled_from(sorted(SINGLE_VALUED | {"audience", "resource"})) | st.text(
    max_size=12
)


@EXAMPLES
@given(body=st.binary(max_size=2048))
async def test_generated_bodies(target: Target, body: bytes) -> None:
    """Any bytes as a form body: a clear 4xx."""
    assert_clear_4xx(await target.post(body))


@EXAMPLES
@given(fields=st.lists(st.tuples(FIELD_NAMES, st.text(max_size=64)), max_size=12))
async def test_generated_forms(target: Target, fields: list[tuple[str, str]]) -> None:
    """Any form fields, repeated or not, with any text: a clear 4xx."""
    assert_clear_4xx(await target.post(fields))


@EXAMPLES
@given(
    header=st.dictionaries(
        st.sampled_from(["kid", "typ", "jku", "x5u", "jwk", "crit", "cty", "b64"]),
        JSON_VALUES,
        max_size=4,
    ),
    alg=st.sampled_from(["RS256", "ES256", "PS256", "EdDSA", "HS256", "none", "", "RS1"])
    | JSON_VALUES,
    claims=st.dictionaries(
        st.sampled_from(["sub", "aud", "exp", "nbf", "iat", "act", "may_act", "email"]),
        JSON_VALUES,
        max_size=5,
    ),
    issuer=st.sampled_from(["op", "trap", "other"]),
    signature=st.binary(max_size=300),
)
async def test_generated_jwts(
    target: Target,
    header: dict[str, Any],
    alg: Any,
    claims: dict[str, Any],
    issuer: str,
    signature: bytes,
) -> None:
    """Any header, alg, claims and signature bytes: invalid_request, and no URL is fetched."""
    iss = {"op": target.op.issuer, "trap": target.trap.url, "other": "https://idp.example"}[issuer]
    if header.get("jku") is not None or header.get("x5u") is not None:
        header |= {"jku": f"{target.trap.url}/jwks", "x5u": f"{target.trap.url}/x5u"}
    token = compact({**header, "alg": alg}, {"iss": iss, **claims}, signature)
    assert_clear_4xx(await target.post(target.form(token)), "invalid_request")


@EXAMPLES
@given(token=st.text(min_size=1, max_size=300))
async def test_generated_subject_token_strings(target: Target, token: str) -> None:
    """Any string as subject_token: invalid_request."""
    assert_clear_4xx(await target.post(target.form(token)), "invalid_request")


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@EXAMPLES
@given(scheme=st.sampled_from(["Basic ", "Bearer ", "", "basic "]), value=HEADER_TEXT)
async def test_generated_authorization_headers(target: Target, scheme: str, value: str) -> None:
    """Any Authorization header: invalid_client or invalid_request."""
    answer = await target.post(target.form(), authorization=(scheme + value).strip() or "x")
    assert_clear_4xx(answer)
    assert answer.json()["error"] in ("invalid_client", "invalid_request")


# -- HTTP framing the client library will not send -----------------------------------------------


def request_bytes(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


RAW_CASES: list[tuple[str, bytes]] = [
    (
        "bare CR in a header",
        b"POST /token HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "NUL in a header value",
        b"POST /token HTTP/1.1\r\nHost: x\r\nAuthorization: Basic a\x00b\r\nContent-Length: 0\r\n\r\n",
    ),
    (
        "NUL in a header name",
        b"POST /token HTTP/1.1\r\nHost: x\r\nX\x00A: b\r\nContent-Length: 0\r\n\r\n",
    ),
    ("NUL in the target", b"POST /tok\x00en HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
    (
        "CRLF-injected header line",
        b"POST /token HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\rInjected: 1\r\n\r\n",
    ),
    ("space before colon", b"POST /token HTTP/1.1\r\nHost : x\r\nContent-Length: 0\r\n\r\n"),
    ("obs-fold", b"POST /token HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    ("header without colon", b"POST /token HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n"),
    ("empty header name", b"POST /token HTTP/1.1\r\nHost: x\r\n: x\r\n\r\n"),
    (
        "CL and TE",
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "two different CL",
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    ),
    ("negative CL", b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("CL with plus", b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde"),
    ("CL hex", b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nabcde"),
    (
        "CL overflow",
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    ),
    ("TE gzip only", b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    (
        "TE chunked then gzip",
        b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE xchunked",
        b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE twice",
        b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "chunk size overflow",
        b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    ),
    (
        "chunk size not hex",
        b"POST /token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
    ),
    ("request line junk", b"POST /token HTTP/1.1 extra\r\nHost: x\r\n\r\n"),
    ("HTTP/9.9", b"POST /token HTTP/9.9\r\nHost: x\r\n\r\n"),
    ("method with NUL", b"PO\x00ST /token HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("100 KiB target", b"POST /token?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("40 KiB header", b"POST /token HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n"),
    ("CONNECT", b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n"),
    (
        "absolute-form elsewhere",
        b"POST http://evil.example/token HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ),
    ("TRACE", b"TRACE /token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("unknown method", b"BREW /token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ("non-HTTP bytes", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
]


@pytest.mark.parametrize(
    "raw", [case[1] for case in RAW_CASES], ids=[case[0] for case in RAW_CASES]
)
async def test_raw_http_framing_attacks(target: Target, raw: bytes) -> None:
    """Bad framing, smuggling attempts and control characters: a 4xx, never 5xx or traceback."""
    status, body = await target.raw(raw)
    assert 400 <= status < 500, (status, body[:200])
    assert not any(marker.encode() in body for marker in TRACEBACK_MARKERS)


@pytest.mark.parametrize(
    ("suffix", "expected"), [("\x00", 400), ("A" * 9000, 431)], ids=["nul", "too-long"]
)
async def test_unparsable_request_logs_no_header_bytes(
    target: Target, no_crash: Records, suffix: str, expected: int
) -> None:
    """A request aiohttp cannot parse is logged as one line with the reason, never its bytes."""
    token = target.op.mint()
    raw = request_bytes(f"POST /token HTTP/1.1\nHost: x\nAuthorization: Bearer {token}{suffix}\n\n")
    status, _ = await target.raw(raw)
    assert status in (400, expected)
    refused = [r for r in no_crash.records if "unparsable HTTP request" in r.getMessage()]
    assert refused, "the refusal was not logged"
    for record in no_crash.records:
        assert token[:24] not in record.getMessage() and "AAAA" not in record.getMessage()
        assert not record.exc_info


# -- a client may only exchange subject tokens meant for it --------------------------------------


async def test_a_client_cannot_exchange_a_token_issued_to_another_client(
    op: DevOpenIDProvider, aiohttp_server: ServerFactory
) -> None:
    """With clients[].subject_audiences, shop-frontend exchanges only tokens whose aud names
    "frontend", reports only those naming "reports-app"; the other's token is invalid_request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    document = exchange_document(op, issuer=url)
    document["trusted_issuers"][0]["audiences"] = ["frontend", "reports-app"]
    shop, reports = document["clients"]
    shop["subject_audiences"] = ["frontend"]
    reports["subject_audiences"] = ["reports-app"]
    await aiohttp_server(
        create_app(parse_exchange_config(document, Path.cwd())), host="127.0.0.1", port=port
    )
    reports_auth = "Basic " + base64.b64encode(b"reports:s3cret-reports").decode()
    async with aiohttp.ClientSession() as session:
        target = Target(url, port, op, Trap(), session)
        for aud, shop_status, reports_status in (
            ("frontend", 200, 400),
            ("reports-app", 400, 200),
            (["frontend", "reports-app"], 200, 200),
        ):
            form = target.form(op.mint({"aud": aud}), audience="orders")
            shop_answer = await target.post(form)
            reports_answer = await target.post(form, authorization=reports_auth)
            assert (shop_answer.status, reports_answer.status) == (shop_status, reports_status), aud
            for answer in (shop_answer, reports_answer):
                if answer.status == 400:
                    assert_clear_4xx(answer, "invalid_request")
                    assert "may present" in answer.json()["error_description"]
