"""Zone signing keys: PEM loading, key ids (RFC 7638 thumbprints), JWKS documents, rotation."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from exchange.config import ExchangeConfig, ZoneConfig
from exchange.configload import ConfigError

log = logging.getLogger("zonegate.keys")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
GENERATE_ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")
# RFC 7638 §3.2: the members that make up each key type's thumbprint.
THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key ready to sign, with its public JWK."""

    kid: str
    alg: str
    private_key: PrivateKey = field(repr=False)
    public_jwk: dict[str, Any] = field(compare=False)


def generate_private_key(alg: str) -> PrivateKey:
    """A fresh private key for ``alg``."""
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {alg!r}; use one of {', '.join(GENERATE_ALGORITHMS)}")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (protect the file, not the bytes)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(key: PrivateKey, path: Path) -> None:
    """Write ``key`` to ``path`` readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file (--force) keeps its old mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))


def algorithm_for(key: PrivateKey, preferred: str | None = None) -> str:
    """The JWS algorithm a key signs with; RSA keys may prefer PS256. A ``preferred``
    algorithm the key cannot sign with is an error, not silently replaced."""
    alg = _natural_algorithm(key, preferred)
    if preferred is not None and preferred != alg:
        raise ValueError(f"signing_alg {preferred} does not fit this {alg} key")
    return alg


def _natural_algorithm(key: PrivateKey, preferred: str | None) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits, got {key.key_size}")
        return preferred if preferred in ("RS256", "PS256") else "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC keys must use P-256 for ES256, got {key.curve.name}")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def public_jwk(key: PrivateKey) -> dict[str, Any]:
    """The public JWK of a private key, without kid/alg/use."""
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        return dict(RSAAlgorithm.to_jwk(pub, as_dict=True))
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return dict(ECAlgorithm.to_jwk(pub, as_dict=True))
    return dict(OKPAlgorithm.to_jwk(pub, as_dict=True))


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): a stable key id."""
    members = {m: jwk[m] for m in THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode())
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def signing_key(key: PrivateKey, preferred_alg: str | None = None) -> SigningKey:
    """Wrap a private key with its kid, alg and public JWK."""
    alg = algorithm_for(key, preferred_alg)
    jwk = public_jwk(key)
    kid = thumbprint(jwk)
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return SigningKey(kid=kid, alg=alg, private_key=key, public_jwk=jwk)


def load_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key; raise ValueError with a readable reason."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key") from e
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    return key


@dataclass(frozen=True, slots=True)
class ZoneKeys:
    """A zone's current signing key and the next one, published ahead of rotation."""

    current: SigningKey
    next: SigningKey | None = None

    def jwks(self) -> dict[str, Any]:
        """The zone's JWKS document: current and next public keys."""
        keys = [self.current.public_jwk] + ([self.next.public_jwk] if self.next else [])
        return {"keys": keys}


def _file_stamp(path: Path | None) -> tuple[float, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


class KeyRing:
    """Every zone's keys; ``reload()`` re-reads key files that changed, keeping the old on error."""

    def __init__(self, config: ExchangeConfig) -> None:
        self._zones = config.zones
        self._keys: dict[str, ZoneKeys] = {}
        self._stamps: dict[str, tuple[object, object]] = {}
        errors = [e for name in self._zones if (e := self._load_zone(name))]
        if errors:
            raise ConfigError(errors)

    def __getitem__(self, zone: str) -> ZoneKeys:
        return self._keys[zone]

    def _load_zone(self, name: str) -> str | None:
        zone = self._zones[name]
        try:
            keys = self._read(zone)
        except ValueError as e:
            return f"zones.{name}.signing_key_file: {e}"
        self._keys[name] = keys
        self._stamps[name] = (
            _file_stamp(zone.signing_key_file),
            _file_stamp(zone.next_signing_key_file),
        )
        return None

    def _read(self, zone: ZoneConfig) -> ZoneKeys:
        if zone.signing_key_file is None:
            if zone.name in self._keys:
                return self._keys[zone.name]
            log.warning(
                "zone %s has no signing_key_file: using an ephemeral ES256 key (dev only; "
                "tokens stop verifying on restart)",
                zone.name,
            )
            current = signing_key(generate_private_key("ES256"))
        else:
            current = signing_key(load_private_key(zone.signing_key_file), zone.signing_alg)
        nxt = None
        if zone.next_signing_key_file is not None:
            nxt = signing_key(load_private_key(zone.next_signing_key_file), zone.signing_alg)
        return ZoneKeys(current, nxt)

    def reload(self) -> list[str]:
        """Re-read the key files whose stamp changed; return the errors (old keys kept)."""
        errors = []
        for name, zone in self._zones.items():
            stamps = (_file_stamp(zone.signing_key_file), _file_stamp(zone.next_signing_key_file))
            if stamps != self._stamps.get(name):
                if error := self._load_zone(name):
                    errors.append(error)
                else:
                    log.info("zone %s keys reloaded (kid %s)", name, self._keys[name].current.kid)
        return errors
