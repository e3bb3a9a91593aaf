"""Private PKI and mTLS: issuers behind a private CA, the exchange server over HTTPS, clients
authenticated by their certificate (RFC 8705 §2.1). A `trustme` CA, real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import trustme
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devkit.provider import DevOpenIDProvider
from exchange.clientauth import certificate_matches
from exchange.config import ClientConfig, parse_exchange_config
from exchange.server.app import RUNTIME, create_app
from exchange.tokens import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN
from runtime.configload import ConfigError
from sidecar.app import build_sidecar
from sidecar.config import parse_sidecar_config
from tests.conftest import exchange_document
from tests.test_sidecar import Backend, wait_ready
from tests.test_sidecar_remote import free_port

ServerFactory = Callable[..., Awaitable[TestServer]]
SPIFFE_ID = "spiffe://cluster.local/ns/shop/sa/frontend"


@dataclass
class Pki:
    """Two CAs (ours and a stranger's), their bundles, and a server certificate for
    127.0.0.1 from ours."""

    ca: trustme.CA
    other: trustme.CA
    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def other_ca_file(self) -> Path:
        return self.dir / "other-ca.pem"

    def server_pair(self, name: str = "server", ca: trustme.CA | None = None) -> tuple[Path, Path]:
        """A fresh certificate for 127.0.0.1 and its key, as files."""
        leaf = (ca or self.ca).issue_cert("127.0.0.1", common_name=name)
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def client_pair(
        self,
        name: str,
        *,
        uri: str | None = None,
        dns: str | None = None,
        subject: str | None = None,
        ca: trustme.CA | None = None,
    ) -> tuple[Path, Path]:
        """A client certificate (clientAuth) with the given URI/DNS SAN or subject DN."""
        ca = ca or self.ca
        ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = []
        if uri:
            names.append(x509.UniformResourceIdentifier(uri))
        if dns:
            names.append(x509.DNSName(dns))
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name.from_rfc4514_string(subject)
                if subject
                else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        cert_file, key_file = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file

    def client_context(self, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client trusting our CA, presenting ``pair`` when given."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if pair is not None:
            context.load_cert_chain(*pair)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return Pki(ca, other, tmp_path)


@pytest.fixture
async def https_op(pki: Pki, aiohttp_server: ServerFactory) -> DevOpenIDProvider:
    """The OpenID Provider served over HTTPS with a certificate from the private CA."""
    provider = DevOpenIDProvider()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki.ca.issue_cert("127.0.0.1").configure_cert(context)
    server = await aiohttp_server(provider.app(), host="127.0.0.1", ssl=context)
    provider.issuer = str(server.make_url("")).rstrip("/")
    assert provider.issuer.startswith("https://")
    return provider


@dataclass
class Exchange:
    """The standalone exchange server, served as ``zonegate exchange`` serves it."""

    server: TestServer
    url: str
    app: Any


@pytest.fixture
async def serve_exchange(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Exchange]]]:
    servers: list[TestServer] = []

    async def start(document: dict[str, Any]) -> Exchange:
        port = free_port()
        scheme = "https" if "tls" in document else "http"
        document = {**document, "issuer": f"{scheme}://127.0.0.1:{port}"}
        app = create_app(parse_exchange_config(document, tmp_path), key_check_interval=0.05)
        tls = app[RUNTIME].tls
        server = TestServer(app, host="127.0.0.1", port=port)
        await server.start_server(ssl=tls.context if tls else None)
        servers.append(server)
        return Exchange(server, f"{scheme}://127.0.0.1:{port}", app)

    yield start
    for server in servers:
        await server.close()


def token_form(op: DevOpenIDProvider, **extra: str) -> dict[str, str]:
    return {
        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
        "subject_token": op.login("alice"),
        "subject_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        "audience": "billing",
        **extra,
    }


async def post_token(
    url: str, form: dict[str, str], *, context: ssl.SSLContext | bool = True, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/token", data=form, ssl=context, **kwargs) as r,
    ):
        return r.status, await r.json()


BASIC = {"Authorization": "Basic " + base64.b64encode(b"shop-frontend:s3cret-shop").decode()}


def mtls_document(op: DevOpenIDProvider, pki: Pki, **client: Any) -> dict[str, Any]:
    """An exchange server over HTTPS verifying client certificates against our CA, with one
    tls_client_auth client besides the secret-based ones."""
    cert, key = pki.server_pair()
    document = exchange_document(op)
    document["trusted_issuers"][0]["ca_file"] = str(pki.ca_file)
    document["tls"] = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": "ca.pem"}
    document["clients"].append(
        {"client_id": "spiffe-frontend", "auth": "tls_client_auth", "zones": ["red"],
         "scopes": ["billing:read"], **(client or {"tls_client_auth_san_uri": SPIFFE_ID})}
    )  # fmt: skip
    return document


# -- issuers behind a private CA ---------------------------------------------------------------


async def test_op_behind_a_private_ca_is_trusted_through_its_ca_file(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """An OP whose certificate a private CA issued works once its ca_file names that CA."""
    document = exchange_document(https_op)
    document["trusted_issuers"][0]["ca_file"] = str(pki.ca_file)
    exchange = await serve_exchange(document)
    status, body = await post_token(exchange.url, token_form(https_op), headers=BASIC)
    assert status == 200, body
    assert https_op.discovery_fetches == 1 and https_op.jwks_fetches == 1


@pytest.mark.parametrize("ca", ["other", "system"])
async def test_op_with_a_wrong_ca_is_503_naming_the_issuer(
    ca: str,
    https_op: DevOpenIDProvider,
    pki: Pki,
    serve_exchange: Callable[..., Awaitable[Exchange]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An OP whose certificate the configured CAs do not vouch for is refused: a 503 and a
    warning, both naming the issuer and the certificate, no traceback."""
    document = exchange_document(https_op)
    if ca == "other":
        document["trusted_issuers"][0]["ca_file"] = str(pki.other_ca_file)
    exchange = await serve_exchange(document)
    with caplog.at_level(logging.WARNING):
        status, body = await post_token(exchange.url, token_form(https_op), headers=BASIC)
    assert status == 503
    assert body["error"] == "temporarily_unavailable"
    description = body["error_description"]
    assert https_op.issuer in description and "TLS certificate not trusted" in description
    assert ("its ca_file" if ca == "other" else "set ca_file") in description
    assert "Traceback" not in description and "_ssl.c" not in description
    warned = [r for r in caplog.records if https_op.issuer in r.getMessage()]
    assert warned and all(r.exc_info is None for r in caplog.records)
    assert https_op.jwks_fetches == 0


async def test_cluster_issuer_behind_a_private_ca(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """A Kubernetes client authenticates when its cluster's API server certificate is from
    the CA in cluster_issuers[].ca_file; with another CA there it is refused, naming the
    cluster."""
    account = "system:serviceaccount:shop:frontend"
    for ca_file, expected in ((pki.ca_file, 200), (pki.other_ca_file, 503)):
        document = exchange_document(https_op)
        document["trusted_issuers"][0]["ca_file"] = str(pki.ca_file)
        document["cluster_issuers"] = [
            {"issuer": https_op.issuer, "audiences": ["zonegate"], "ca_file": str(ca_file)}
        ]
        document["clients"].append(
            {"client_id": "workload", "auth": "kubernetes", "service_account": account,
             "zones": ["red"], "scopes": ["billing:read"]}
        )  # fmt: skip
        exchange = await serve_exchange(document)
        form = token_form(
            https_op,
            client_id="workload",
            client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            client_assertion=https_op.mint({"sub": account, "aud": "zonegate"}),
        )
        status, body = await post_token(exchange.url, form)
        assert status == expected, body
        if expected == 503:
            assert https_op.issuer in body["error_description"]


# -- the exchange server over HTTPS -------------------------------------------------------------


async def test_exchange_server_over_https(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """With tls, listen serves HTTPS: a client trusting the CA gets its token; one that does
    not trust it never reaches the endpoint."""
    document = mtls_document(https_op, pki)
    exchange = await serve_exchange(document)
    assert exchange.url.startswith("https://")
    status, body = await post_token(
        exchange.url, token_form(https_op), context=pki.client_context(), headers=BASIC
    )
    assert status == 200, body
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post_token(exchange.url, token_form(https_op), headers=BASIC)  # system CAs only


async def test_metadata_lists_tls_client_auth(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """Server and zone metadata advertise tls_client_auth, and claim no certificate-bound
    tokens (RFC 8705 §3 is not implemented)."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    async with aiohttp.ClientSession() as session:
        for path in ("/.well-known/oauth-authorization-server",
                     "/zones/red/.well-known/openid-configuration"):  # fmt: skip
            async with session.get(exchange.url + path, ssl=pki.client_context()) as r:
                meta = await r.json()
            assert "tls_client_auth" in meta["token_endpoint_auth_methods_supported"], path
            assert "tls_client_certificate_bound_access_tokens" not in meta


async def test_certificate_files_replaced_on_disk_are_served_without_restart(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """cert-manager replacing tls.cert_file and tls.key_file: new connections get the new
    certificate, no restart or SIGHUP."""
    document = mtls_document(https_op, pki)
    exchange = await serve_exchange(document)
    port = exchange.server.port
    assert port is not None
    assert await served_common_name(port, pki) == "server"
    new_cert, new_key = pki.server_pair("rotated")
    os.replace(new_key, document["tls"]["key_file"])
    os.replace(new_cert, document["tls"]["cert_file"])
    for _ in range(100):
        if await served_common_name(port, pki) == "rotated":
            break
        await asyncio.sleep(0.05)
    assert await served_common_name(port, pki) == "rotated"
    status, _ = await post_token(
        exchange.url, token_form(https_op), context=pki.client_context(), headers=BASIC
    )
    assert status == 200


async def served_common_name(port: int, pki: Pki) -> str:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context())
    try:
        subject = writer.get_extra_info("peercert")["subject"]
        return str(dict(pair[0] for pair in subject)["commonName"])
    finally:
        writer.close()


# -- tls_client_auth ---------------------------------------------------------------------------


async def test_spiffe_client_through_a_sidecar_presenting_its_certificate(
    https_op: DevOpenIDProvider,
    pki: Pki,
    serve_exchange: Callable[..., Awaitable[Exchange]],
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
) -> None:
    """A sidecar in remote mode with only tls_client_cert_file/tls_client_key_file is
    authenticated by its certificate's URI SAN (a SPIFFE ID): the upstream gets a zone token
    issued to that client."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    cert, key = pki.client_pair("frontend", uri=SPIFFE_ID)
    red = Backend("red")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    config = parse_sidecar_config(
        {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "exchange": {
                "mode": "remote",
                "token_endpoint": f"{exchange.url}/token",
                "client_id": "spiffe-frontend",
                "ca_file": "ca.pem",
                "tls_client_cert_file": str(cert),
                "tls_client_key_file": str(key),
            },
            "routes": [
                {
                    "upstream": str(red_server.make_url("")).rstrip("/"),
                    "audience": "billing",
                    "scope": "billing:read",
                }
            ],
        },
        pki.dir,
    )
    proxy_app, admin_app = build_sidecar(config)
    admin = await aiohttp_server(admin_app, host="127.0.0.1")
    proxy = await proxy_server(proxy_app)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, str(admin.make_url("/readyz")))
        headers = {"Authorization": f"Bearer {https_op.login('alice')}"}
        async with session.get(proxy.make_url("/x"), headers=headers) as r:
            assert r.status == 201, await r.text()
    zone_token = red.authorization().removeprefix("Bearer ")
    claims = jwt.decode(zone_token, options={"verify_signature": False})
    assert claims["client_id"] == "spiffe-frontend" and claims["sub"] == "alice"


async def test_certificate_whose_san_does_not_match_is_invalid_client(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """A certificate from the trusted CA for another SPIFFE ID does not make this client."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    stranger = pki.client_pair("stranger", uri="spiffe://cluster.local/ns/shop/sa/stranger")
    status, body = await post_token(
        exchange.url,
        token_form(https_op, client_id="spiffe-frontend"),
        context=pki.client_context(stranger),
    )
    assert status == 401 and body["error"] == "invalid_client"
    assert "san_uri" in body["error_description"]


async def test_certificate_from_another_ca_is_refused(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """A certificate with the right SPIFFE ID from a CA not in client_ca_file gets no token."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    forged = pki.client_pair("forged", uri=SPIFFE_ID, ca=pki.other)
    form = token_form(https_op, client_id="spiffe-frontend")
    try:
        status, body = await post_token(exchange.url, form, context=pki.client_context(forged))
    except aiohttp.ClientError:
        return  # refused at the handshake
    assert status == 401 and body["error"] == "invalid_client"


async def test_client_certificates_are_optional_for_other_clients(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """On an mTLS listener, a secret-based client without a certificate still gets its token,
    and a tls_client_auth client without one is invalid_client."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    context = pki.client_context()
    status, _ = await post_token(exchange.url, token_form(https_op), context=context, headers=BASIC)
    assert status == 200
    status, body = await post_token(
        exchange.url, token_form(https_op, client_id="spiffe-frontend"), context=context
    )
    assert status == 401 and "tls_client_auth" in body["error_description"]


async def test_client_ca_file_replaced_drops_the_old_ca(
    https_op: DevOpenIDProvider, pki: Pki, serve_exchange: Callable[..., Awaitable[Exchange]]
) -> None:
    """Replacing tls.client_ca_file takes effect without restart, and a CA no longer in it is
    no longer trusted."""
    document = mtls_document(https_op, pki)
    document["tls"]["client_ca_file"] = str(pki.dir / "client-ca.pem")
    (pki.dir / "client-ca.pem").write_bytes(pki.ca.cert_pem.bytes())
    exchange = await serve_exchange(document)
    ours = pki.client_context(pki.client_pair("ours", uri=SPIFFE_ID))
    theirs = pki.client_context(pki.client_pair("theirs", uri=SPIFFE_ID, ca=pki.other))
    form = token_form(https_op, client_id="spiffe-frontend")
    assert (await post_token(exchange.url, form, context=ours))[0] == 200
    replacement = pki.dir / "client-ca.new"
    replacement.write_bytes(pki.other.cert_pem.bytes())
    os.replace(replacement, pki.dir / "client-ca.pem")
    for _ in range(100):
        try:
            if (await post_token(exchange.url, token_form(https_op, client_id="spiffe-frontend"),
                                 context=theirs))[0] == 200:  # fmt: skip
                break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    form = token_form(https_op, client_id="spiffe-frontend")
    assert (await post_token(exchange.url, form, context=theirs))[0] == 200
    with pytest.raises(aiohttp.ClientError):
        await post_token(exchange.url, form, context=ours)


def test_subject_dn_is_compared_normalised(pki: Pki) -> None:
    """tls_client_auth_subject_dn matches the certificate's subject whatever the case and
    spacing of the configured string, and not a DN that differs in a value or in order."""
    cert_file, _ = pki.client_pair("dn", subject="CN=Billing Service,OU=Shop,O=Acme\\, Inc.,C=DE")
    der = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )

    def client(dn: str) -> ClientConfig:
        return ClientConfig("c", auth="tls_client_auth", tls_client_auth_subject_dn=dn)

    assert certificate_matches(client("CN=Billing Service,OU=Shop,O=Acme\\, Inc.,C=DE"), der)
    assert certificate_matches(client("cn=billing  service, ou=SHOP, o=ACME\\, inc., c=de"), der)
    assert certificate_matches(client("2.5.4.3=Billing Service,OU=Shop,O=Acme\\, Inc.,C=DE"), der)
    assert not certificate_matches(client("CN=Billing Service,OU=Shop,O=Acme,C=DE"), der)
    assert not certificate_matches(client("C=DE,O=Acme\\, Inc.,OU=Shop,CN=Billing Service"), der)
    dns = ClientConfig("c", auth="tls_client_auth", tls_client_auth_san_dns="Billing.Shop.svc")
    assert certificate_matches(dns, pki_der(pki.client_pair("d", dns="billing.shop.svc")[0]))
    assert not certificate_matches(dns, der)


def pki_der(cert_file: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


# -- zonegate check ------------------------------------------------------------------------------


def config_errors(document: dict[str, Any], base: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_exchange_config(document, base)
    return raised.value.errors


def test_check_names_tls_client_auth_mistakes(op: DevOpenIDProvider, pki: Pki) -> None:
    """A tls_client_auth client needs exactly one match and a listener with client_ca_file;
    other clients take no tls_client_auth_* key; each error names its YAML path."""
    document = exchange_document(op)
    document["clients"] += [
        {"client_id": "none-given", "auth": "tls_client_auth", "zones": ["red"]},
        {"client_id": "two-given", "auth": "tls_client_auth", "zones": ["red"],
         "tls_client_auth_san_dns": "a.example", "tls_client_auth_san_uri": SPIFFE_ID},
        {"client_id": "bad-dn", "auth": "tls_client_auth", "zones": ["red"],
         "tls_client_auth_subject_dn": "not a dn"},
        {"client_id": "secret", "client_secret": "x", "zones": ["red"],
         "tls_client_auth_san_uri": SPIFFE_ID},
    ]  # fmt: skip
    errors = config_errors(document, pki.dir)
    text = "\n".join(errors)
    assert "clients[2].auth: auth tls_client_auth needs exactly one of" in text
    assert "clients[3].auth: auth tls_client_auth needs exactly one of" in text
    assert "clients[4].tls_client_auth_subject_dn: 'not a dn' is not an RFC 4514" in text
    assert "clients[5].tls_client_auth_san_uri: only a client with auth tls_client_auth" in text
    assert text.count("tls.client_ca_file") == 3, text  # no listener verifies certificates


def test_check_loads_every_tls_file(op: DevOpenIDProvider, pki: Pki) -> None:
    """Missing or unusable CA bundles and a certificate with the wrong key are reported by
    path, all in one run."""
    cert, _ = pki.server_pair()
    _, other_key = pki.server_pair("other")
    (pki.dir / "junk.pem").write_text("not a certificate")
    document = exchange_document(op)
    document["trusted_issuers"][0]["ca_file"] = "missing.pem"
    document["cluster_issuers"] = [{"issuer": "https://k8s", "ca_file": "junk.pem"}]
    document["tls"] = {"cert_file": str(cert), "key_file": str(other_key),
                       "client_ca_file": "junk.pem"}  # fmt: skip
    errors = config_errors(document, pki.dir)
    text = "\n".join(errors)
    assert "trusted_issuers[0].ca_file: cannot load" in text and "No such file" in text
    assert "cluster_issuers[0].ca_file: cannot load" in text
    assert "tls.client_ca_file: cannot load" in text and "no certificate" in text
    assert "tls.cert_file: cannot load" in text and "key values mismatch" in text
    assert "_ssl.c" not in text


def test_sidecar_check_of_the_client_certificate(pki: Pki) -> None:
    """The sidecar's client certificate comes with its key, loads with it, and alone is the
    one credential; next to a secret it is only the transport."""
    cert, key = pki.client_pair("c", uri=SPIFFE_ID)
    _, wrong = pki.client_pair("w", uri=SPIFFE_ID)
    base = {"mode": "remote", "token_endpoint": "https://tx/token", "client_id": "c"}

    def errors(**exchange: Any) -> list[str]:
        document = {"exchange": {**base, **exchange}, "routes": [{"upstream": "http://u"}]}
        try:
            parse_sidecar_config(document, pki.dir)
        except ConfigError as e:
            return e.errors
        return []

    assert errors(tls_client_cert_file=str(cert), tls_client_key_file=str(key)) == []
    assert errors(tls_client_cert_file=str(cert), tls_client_key_file=str(key),
                  client_secret="s") == []  # fmt: skip
    assert errors(tls_client_cert_file=str(cert)) == [
        "exchange.tls_client_key_file: give tls_client_cert_file and tls_client_key_file together"
    ]
    mismatch = errors(tls_client_cert_file=str(cert), tls_client_key_file=str(wrong))
    assert mismatch and "key values mismatch" in mismatch[0]
    assert any("exactly one credential" in e for e in errors())
    assert errors(ca_file="nope.pem")[0].startswith("exchange.ca_file: no such file")


async def test_sidecar_refuses_a_token_endpoint_its_ca_file_does_not_vouch_for(
    https_op: DevOpenIDProvider,
    pki: Pki,
    serve_exchange: Callable[..., Awaitable[Exchange]],
    aiohttp_server: ServerFactory,
    proxy_server: ServerFactory,
) -> None:
    """A sidecar whose ca_file is another CA does not talk to that endpoint: the call is a 503
    saying the certificate is not trusted, and nothing reaches the upstream."""
    exchange = await serve_exchange(mtls_document(https_op, pki))
    red = Backend("red")
    red_server = await aiohttp_server(red.app(), host="127.0.0.1")
    config = parse_sidecar_config(
        {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "exchange": {
                "mode": "remote",
                "token_endpoint": f"{exchange.url}/token",
                "client_id": "shop-frontend",
                "client_secret": "s3cret-shop",
                "ca_file": str(pki.other_ca_file),
            },
            "routes": [
                {"upstream": str(red_server.make_url("")).rstrip("/"), "audience": "billing"}
            ],
        },
        pki.dir,
    )
    proxy_app, _ = build_sidecar(config)
    proxy = await proxy_server(proxy_app)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {https_op.login('alice')}"}
        async with session.get(proxy.make_url("/x"), headers=headers) as r:
            assert r.status == 503
            body = await r.json()
    assert "TLS certificate not trusted" in body["error_description"]
    assert red.seen == []
