"""Exchange config loading: every problem reported by YAML path, secrets from env and files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jwcrypto import jwk as jwc_jwk

from exchange.config import ExchangeConfig, load_exchange_config
from exchange.keys import signing_key
from exchange.server.keyfiles import KeyFiles, load_keyring, load_private_key
from runtime.configload import ConfigError

VALID: dict[str, Any] = {
    "issuer": "http://127.0.0.1:8081",
    "trusted_issuers": [{"issuer": "http://127.0.0.1:8080", "audiences": ["frontend"]}],
    "zones": {"red": {"audiences": ["billing"], "scopes": ["billing:read"]}},
    "clients": [
        {"client_id": "fe", "client_secret": "${ZG_TEST_SECRET}", "zones": ["red"], "scopes": []}
    ],
}


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "exchange.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def load(tmp_path: Path, document: dict[str, Any]) -> ExchangeConfig:
    return load_exchange_config(write(tmp_path, document))


def errors_of(tmp_path: Path, document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, document)
    return raised.value.errors


def test_valid_config_with_env_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """${ENV} is expanded, defaults apply, zone issuers derive from the base issuer."""
    monkeypatch.setenv("ZG_TEST_SECRET", "from-env")
    config = load(tmp_path, VALID)
    assert config.clients["fe"].secret_matches("from-env")
    assert config.zone_issuer("red") == "http://127.0.0.1:8081/zones/red"
    assert config.leeway == 30
    assert config.zones["red"].token_lifetime == 300


def test_secret_file_and_sha256(tmp_path: Path) -> None:
    """client_secret_file is read relative to the config file; a sha256 hash also matches."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "fe").write_text("file-secret\n")
    digest = hashlib.sha256(b"hashed").hexdigest()
    document = json.loads(json.dumps(VALID))
    document["clients"] = [
        {"client_id": "fe", "client_secret_file": "secrets/fe", "zones": ["red"]},
        {"client_id": "h", "client_secret_sha256": digest, "zones": ["red"]},
    ]
    config = load(tmp_path, document)
    assert config.clients["fe"].secret_matches("file-secret")
    assert not config.clients["fe"].secret_matches("file-secre")
    assert config.clients["h"].secret_matches("hashed")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("trusted_issuers"), "trusted_issuers: required"),
        (lambda d: d["zones"]["red"].update(audience=["typo"]), "zones.red.audience: unknown key"),
        (lambda d: d["clients"][0].update(zones=["blue"]), "clients[0].zones: unknown zone 'blue'"),
        (
            lambda d: d["trusted_issuers"][0].update(algorithms=["HS256"]),
            "trusted_issuers[0].algorithms",
        ),
        (lambda d: d["trusted_issuers"][0].update(algorithms=["none"]), "never none"),
        (
            lambda d: d["zones"]["red"].update(token_lifetime="5m"),
            "zones.red.token_lifetime: must be a whole number",
        ),
        (lambda d: d.update(issuer="not a url"), "issuer: must be an http(s) URL"),
        (lambda d: d["clients"][0].update(auth="magic"), "clients[0].auth: must be one of"),
        (
            lambda d: d["clients"][0].pop("client_secret"),
            "clients[0].client_secret: auth client_secret_basic needs",
        ),
        (lambda d: d["zones"].update(blue={"audiences": ["billing"]}), "already selects zone"),
        (lambda d: d["clients"].append(dict(d["clients"][0])), "duplicate client_id"),
        (lambda d: d["zones"]["red"].update(claims={"copy": ["exp"]}), "cannot be copied"),
        (
            lambda d: d["clients"][0].update(scopes=["billing:raed"]),
            "clients[0].scopes: 'billing:raed' is not a scope of any zone",
        ),
        (
            lambda d: d["zones"]["red"].update(resources=["billing"]),
            "zones.red.resources: 'billing' is not an absolute URI",
        ),
        (
            lambda d: d["clients"][0].update(
                auth="private_key_jwt", jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}
            ),
            "clients[0].jwks: holds no usable public signature key",
        ),
        (
            lambda d: d["clients"][0].update(
                auth="private_key_jwt", jwks={"keys": [{"kty": "EC"}]}
            ),
            "clients[0].jwks: holds no usable public signature key",
        ),
        (
            lambda d: d["clients"][0].update(jwks_uri="notaurl"),
            "clients[0].jwks_uri: must be an http(s) URL",
        ),
        (
            lambda d: d["clients"][0].update(client_secret_file="s"),
            "clients[0].client_secret: give either client_secret or client_secret_file, not both",
        ),
    ],
)
def test_errors_name_the_yaml_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mutate: Any, expected: str
) -> None:
    """Each mistake is reported with its YAML path and what to do."""
    monkeypatch.setenv("ZG_TEST_SECRET", "x")
    document = json.loads(json.dumps(VALID))
    mutate(document)
    assert any(expected in line for line in errors_of(tmp_path, document)), errors_of(
        tmp_path, document
    )


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes give several lines, not just the first."""
    document = json.loads(json.dumps(VALID))
    document["leeway"] = -1
    document["zones"]["red"]["scopes"] = "billing:read"  # a single string is accepted
    document["clients"][0]["zones"] = ["nope"]
    errors = errors_of(tmp_path, document)
    assert any(e.startswith("leeway:") for e in errors)
    assert any("ZG_TEST_SECRET is not set" in e for e in errors)
    assert any(e.startswith("clients[0].zones") for e in errors)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zonegate.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_cli_exit_codes(tmp_path: Path) -> None:
    """zonegate check exits 0 on a valid file and 2 listing every error by path."""
    good = json.loads(json.dumps(VALID))
    good["clients"][0]["client_secret"] = "s"
    ok = run_cli("check", str(write(tmp_path, good)))
    assert ok.returncode == 0, ok.stderr
    assert "valid exchange config" in ok.stdout
    good["zones"]["red"]["scops"] = []
    good["clients"][0]["zones"] = ["blue"]
    bad = run_cli("check", str(write(tmp_path, good)))
    assert bad.returncode == 2
    assert "zones.red.scops: unknown key" in bad.stderr
    assert "clients[0].zones: unknown zone 'blue'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_check_cli_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    """A missing file or broken YAML is a clear exit 2, not a traceback."""
    missing = run_cli("check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("zones: [unclosed\n")
    result = run_cli("check", str(broken))
    assert result.returncode == 2 and "not valid YAML" in result.stderr


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
def test_keys_generate_and_kid_is_rfc7638_thumbprint(tmp_path: Path, alg: str) -> None:
    """Generated keys load, sign with their alg, and kid equals jwcrypto's RFC 7638 thumbprint."""
    out = tmp_path / f"{alg}.pem"
    result = run_cli("keys", "generate", "--alg", alg, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o077 == 0  # private key readable by its owner only
    key = signing_key(load_private_key(out), alg)
    assert key.alg == alg
    assert key.kid == jwc_jwk.JWK(**key.public_jwk).thumbprint()
    again = run_cli("keys", "generate", "--alg", alg, "--out", str(out))
    assert again.returncode == 1 and "--force" in again.stderr
    out.chmod(0o644)
    assert run_cli("keys", "generate", "--alg", alg, "--out", str(out), "--force").returncode == 0
    assert out.stat().st_mode & 0o077 == 0  # overwriting tightens a loose mode
    fresh = run_cli("keys", "generate", "--out", str(tmp_path / "new" / "keys" / "k.pem"))
    assert fresh.returncode == 0, fresh.stderr
    for folder in (tmp_path / "new", tmp_path / "new" / "keys"):
        assert folder.stat().st_mode & 0o777 == 0o700  # missing folders made private
    (tmp_path / "a-file").write_text("not a folder")
    nowhere = run_cli("keys", "generate", "--out", str(tmp_path / "a-file" / "k.pem"))
    assert (
        nowhere.returncode == 1
        and "cannot write" in nowhere.stderr
        and "Traceback" not in nowhere.stderr
    )


def test_keyring_publishes_next_key_and_reloads(tmp_path: Path) -> None:
    """JWKS lists current and next keys; a changed key file is picked up by reload()."""
    for name in ("cur", "next", "newer"):
        assert run_cli("keys", "generate", "--out", str(tmp_path / f"{name}.pem")).returncode == 0
    document = json.loads(json.dumps(VALID))
    document["clients"][0]["client_secret"] = "s"
    document["zones"]["red"]["signing_key_file"] = "cur.pem"
    document["zones"]["red"]["next_signing_key_file"] = "next.pem"
    files = KeyFiles(load(tmp_path, document))
    ring = files.ring
    kids = [k["kid"] for k in ring["red"].jwks()["keys"]]
    assert len(kids) == 2 and kids[0] == ring["red"].current.kid
    (tmp_path / "cur.pem").write_bytes((tmp_path / "newer.pem").read_bytes())
    assert files.reload() == []
    assert ring["red"].current.kid not in kids
    (tmp_path / "cur.pem").write_text("garbage")
    before = ring["red"].current.kid
    assert files.reload() and ring["red"].current.kid == before  # bad file: old key kept


def test_short_rsa_zone_key_is_a_config_error(tmp_path: Path) -> None:
    """A zone key of fewer than 2048 RSA bits is refused at start, naming the YAML path."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from exchange.server.keyfiles import write_private_key

    write_private_key(
        rsa.generate_private_key(public_exponent=65537, key_size=1024), tmp_path / "weak.pem"
    )
    document = json.loads(json.dumps(VALID))
    document["clients"][0]["client_secret"] = "s"
    document["zones"]["red"]["signing_key_file"] = "weak.pem"
    with pytest.raises(ConfigError) as raised:
        load_keyring(load(tmp_path, document))
    assert raised.value.errors == [
        "zones.red.signing_key_file: RSA keys must have at least 2048 bits, got 1024"
    ]


def test_signing_alg_that_does_not_fit_the_key_is_refused(tmp_path: Path) -> None:
    """signing_alg RS256 on an EC key is an error, not silently replaced by ES256."""
    from exchange.keys import generate_private_key
    from exchange.server.keyfiles import write_private_key

    write_private_key(generate_private_key("ES256"), tmp_path / "ec.pem")
    document = json.loads(json.dumps(VALID))
    document["clients"][0]["client_secret"] = "s"
    document["zones"]["red"].update(signing_key_file="ec.pem", signing_alg="RS256")
    with pytest.raises(ConfigError, match="signing_alg RS256 does not fit this ES256 key"):
        load_keyring(load(tmp_path, document))


def test_non_utf8_config_is_a_clear_error(tmp_path: Path) -> None:
    """A config file that is not UTF-8 text is exit 2 with a message, not a traceback."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe")
    result = run_cli("check", str(path))
    assert (
        result.returncode == 2 and "not UTF-8" in result.stderr and "Traceback" not in result.stderr
    )


def test_address_in_use_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """zonegate exchange on a taken port says so and exits 1, with nothing left unclosed."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        document = json.loads(json.dumps(VALID))
        document["clients"][0]["client_secret"] = "s"
        document["listen"] = f"127.0.0.1:{port}"
        document["trusted_issuers"] = [{"issuer": "http://127.0.0.1:9"}]  # nothing listens there
        result = run_cli("exchange", "--config", str(write(tmp_path, document)))
    assert result.returncode == 1
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr
