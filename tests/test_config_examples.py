"""config/ examples, the JSON Schemas, the loader and docs/configuration.md agree."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from referencing import Registry, Resource

import runtime.configload as configload
from exchange.config import parse_exchange_config
from exchange.keys import generate_private_key
from exchange.server.keyfiles import write_private_key
from runtime.configload import ConfigError
from sidecar.config import parse_sidecar_config
from zonegate.cli import main as zonegate

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS: dict[str, dict[str, Any]] = {
    n: json.loads((ROOT / f"config/schema/{n}.schema.json").read_text())
    for n in ("exchange", "sidecar")
}
# zonegate's own configs; config/envoy/envoy.yaml is Envoy's (tests/test_mesh_configs.py)
EXAMPLES = sorted(p for p in (ROOT / "config").glob("*/*.yaml") if p.name != "envoy.yaml")
ENV = {
    "SHOP_FRONTEND_SECRET": "a",
    "SHOP_FRONTEND_RED_SECRET": "b",
    "SHOP_FRONTEND_GREEN_SECRET": "c",
}


def schema_for(path: Path) -> dict[str, Any]:
    return SCHEMAS["sidecar" if "routes" in yaml.safe_load(path.read_text()) else "exchange"]


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resources(
        [(f"{n}.schema.json", Resource.from_contents(s)) for n, s in SCHEMAS.items()]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_paths(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Every key path a schema allows (``routes[].audience``, ``zones.<zone>.scopes``)."""
    if schema.get("type") == "object" and "properties" in schema:
        for key, sub in schema["properties"].items():
            child = f"{path}.{key}" if path else key
            yield child
            if "$ref" not in sub:
                yield from schema_paths(sub, child)
    elif schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        yield from schema_paths(schema["additionalProperties"], f"{path}.<zone>")
    elif schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        yield from schema_paths(schema["items"], f"{path}[]")


ALL_SCHEMA_PATHS = set(schema_paths(SCHEMAS["exchange"])) | set(schema_paths(SCHEMAS["sidecar"]))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of config/ with the zone keys the examples name, and their env secrets set."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    for folder in ("standalone", "segregated"):
        (tmp_path / "config" / folder / "keys").mkdir()
        for zone in ("red", "green"):
            write_private_key(
                generate_private_key("ES256"), tmp_path / "config" / folder / "keys" / f"{zone}.pem"
            )
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "config"


@pytest.mark.parametrize("example", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_every_example_checks_and_fits_the_schema(
    example: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each example passes `zonegate check` and validates against its JSON Schema."""
    copy = workdir / example.relative_to(ROOT / "config")
    assert zonegate(["check", str(copy)]) == 0, capsys.readouterr().err
    document = yaml.safe_load(example.read_text())
    errors = [e.message for e in validator(schema_for(example)).iter_errors(document)]
    assert errors == []


def test_schema_rejects_a_typo() -> None:
    """The schema, like the loader, refuses unknown keys."""
    document = {"routes": [{"upstream": "http://x", "audiance": "billing"}]}
    assert not validator(SCHEMAS["sidecar"]).is_valid(document)


def normalise(path: str) -> str:
    path = re.sub(r"^(routes\[\]\.)?exchange\.core\.", "", path)  # inline core: exchange keys
    return re.sub(r"zones\.[^.]+", "zones.<zone>", path)


KITCHEN_SINK_CORE: dict[str, Any] = {
    "issuer": "http://127.0.0.1:8081",
    "listen": "127.0.0.1:8081",
    "admin_listen": "127.0.0.1:8091",
    "tls": {"cert_file": "tls.crt", "key_file": "tls.key", "client_ca_file": "clients-ca.pem"},
    "trusted_issuers": [
        {
            "issuer": "http://op",
            "ca_file": "op-ca.pem",
            "audiences": ["fe"],
            "algorithms": ["ES256"],
            "jwks_uri": "http://op/jwks",
            "subject_token_types": ["access_token"],
            "require_typ": "at+jwt",
        }
    ],
    "zones": {
        "red": {
            "audiences": ["a"],
            "resources": ["http://r"],
            "scopes": ["s"],
            "token_lifetime": 60,
            "signing_key_file": "k.pem",
            "next_signing_key_file": "n.pem",
            "signing_alg": "ES256",
            "claims": {"sub": "sub", "copy": ["email"]},
        }
    },
    "clients": [
        {
            "client_id": "a",
            "auth": "client_secret_post",
            "client_secret_file": "secret",
            "zones": ["red"],
            "scopes": ["s"],
            "default_zone": "red",
            "subject_audiences": ["fe"],
            "rate_limit": {"rate": 1, "burst": 2},
            "subject_scope": "intersect",
        },
        {"client_id": "b", "client_secret_sha256": "0" * 64},
        {
            "client_id": "c",
            "auth": "private_key_jwt",
            "jwks": {"keys": []},
            "jwks_uri": "http://c/jwks",
        },
        {
            "client_id": "d",
            "auth": "kubernetes",
            "service_account": "system:serviceaccount:ns:sa",
            "cluster_issuer": "https://k8s",
        },
        {
            "client_id": "e",
            "auth": "tls_client_auth",
            "tls_client_auth_subject_dn": "CN=e",
            "tls_client_auth_san_dns": "e.example",
            "tls_client_auth_san_uri": "spiffe://cluster.local/ns/e/sa/e",
        },
    ],
    "cluster_issuers": [
        {
            "issuer": "https://k8s",
            "audiences": ["zonegate"],
            "max_token_age": 3600,
            "jwks_uri": "https://k8s/jwks",
            "ca_file": "k8s-ca.pem",
        }
    ],
    "leeway": 10,
    "max_token_size": 8192,
    "jwks_min_refresh": 5,
    "jwks_max_age": 600,
    "jwks_stale_for": 3600,
    "fetch_timeout": 2,
    "shared_state": {
        "backend": "redis",
        "url_file": "redis-url",
        "ca_file": "redis-ca.pem",
        "key_prefix": "zg:",
    },
    "listeners": {"header_timeout": 5, "keepalive_timeout": 30},
}
REMOTE: dict[str, Any] = {
    "mode": "remote",
    "token_endpoint": "http://tx/token",
    "client_id": "a",
    "timeout": 1,
    "retries": 1,
}
KITCHEN_SINK_SIDECAR: dict[str, Any] = {
    "listen": "127.0.0.1:4480",
    "admin_listen": "127.0.0.1:4490",
    "authz_listen": "127.0.0.1:4481",
    "authz": {"path_prefix": "/check", "unsafe_headers": "refuse"},
    "exchange": {"mode": "embedded", "client_id": "a", "core": KITCHEN_SINK_CORE},
    "routes": [
        {
            "name": "r",
            "host": "h",
            "path_prefix": "/p/",
            "strip_prefix": True,
            "upstream": "http://u",
            "audience": "a",
            "resource": "http://r",
            "scope": "s",
            "requested_token_type": "jwt",
            "missing_token": "forward",
            "exchange": {
                **REMOTE,
                "client_secret_file": "secret",
                "ca_file": "ca.pem",
                "tls_client_cert_file": "c.crt",
                "tls_client_key_file": "c.key",
            },
        },
        {
            "upstream": "http://u",
            "exchange": {**REMOTE, "issuer": "http://tx", "client_secret": "x"},
        },
        {"upstream": "http://u", "exchange": {**REMOTE, "private_key_file": "k.pem"}},
        {"upstream": "http://u", "exchange": {**REMOTE, "service_account_token_file": "t"}},
        {
            "upstream": "http://u",
            "exchange": {"mode": "embedded", "client_id": "a", "config": "x.yaml"},
        },
        {
            "upstream": "http://u",
            "exchange": {"mode": "embedded", "client_id": "a", "core": KITCHEN_SINK_CORE},
        },
    ],
    "cache": {"max_entries": 1, "expiry_skew": 1, "negative_ttl": 1, "refresh_ahead": 0.5},
    "upstream": {
        "ca_file": "ca.pem",
        "connect_timeout": 1,
        "read_timeout": 1,
        "max_connections": 1,
        "max_connections_per_host": 1,
    },
    "max_header_size": 16384,
    "shutdown_grace": 1,
    "listeners": {"header_timeout": 5, "keepalive_timeout": 30},
}


KITCHEN_SINK_REMOTE_SIDECAR: dict[str, Any] = {
    "exchange": {**REMOTE, "client_secret_file": "secret"},
    "routes": [{"upstream": "http://u"}],
}


def keys_the_loader_reads(workdir: Path) -> set[str]:
    """Every key path the loaders read, over all examples and a document using every key."""
    configload.READ_KEYS = set()
    try:
        for example in EXAMPLES:
            zonegate(["check", str(workdir / example.relative_to(ROOT / "config"))])
        for parse, data in (
            (parse_sidecar_config, KITCHEN_SINK_SIDECAR),
            (parse_sidecar_config, KITCHEN_SINK_REMOTE_SIDECAR),
            (parse_exchange_config, KITCHEN_SINK_CORE),
        ):
            with pytest.raises(ConfigError):  # files it names do not exist; the keys still count
                parse(data, workdir)
        return {normalise(k) for k in configload.READ_KEYS}
    finally:
        configload.READ_KEYS = None


def test_loader_and_schema_know_the_same_keys(workdir: Path) -> None:
    """Every key the loader reads is in a schema, and every schema key is read by the loader."""
    read = keys_the_loader_reads(workdir)
    assert read - ALL_SCHEMA_PATHS == set(), "keys the loader accepts but the schema lacks"
    assert ALL_SCHEMA_PATHS - read == set(), "keys the schema allows but the loader never reads"


def test_every_schema_key_is_documented() -> None:
    """docs/configuration.md has a row for every key of both schemas."""
    doc = (ROOT / "docs/configuration.md").read_text()
    missing = sorted(p for p in ALL_SCHEMA_PATHS if f"| `{p}` |" not in doc)
    assert missing == []
