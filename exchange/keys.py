"""Zone signing keys: key ids (RFC 7638 thumbprints), JWKS documents, rotation. Sans-IO:
the key files are read by ``exchange.server.keyfiles``."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
GENERATE_ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")
# RFC 7638 §3.2: the members that make up each key type's thumbprint.
THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}


# The group orders n of the curves ES256, ES384 and ES512 sign on (FIPS 186-4 D.1.2), by the
# byte length of r and of s in a JWS signature (RFC 7518 §3.4).
EC_ORDERS = {
    32: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    48: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    66: int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF"
        "2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}
SIGNATURE_OPS = frozenset({"sign", "verify"})  # RFC 7517 §4.3: what ``use: sig`` agrees with


def low_s(signature: bytes) -> bytes:
    """An ECDSA JWS signature (r || s) in its low-S form: s replaced by n - s when s > n/2.
    Both verify; the low-S one is the single spelling verifiers that insist on it accept."""
    size = len(signature) // 2
    order = EC_ORDERS.get(size)
    if order is None or len(signature) != 2 * size:
        return signature
    s = int.from_bytes(signature[size:], "big")
    if s <= order // 2:
        return signature
    return signature[:size] + (order - s).to_bytes(size, "big")


def verification_key(jwk: Any) -> jwt.PyJWK:
    """A public JWK that may verify signatures; ValueError saying why not.

    Refused: private or symmetric keys; ``use`` other than ``sig``; ``key_ops`` without
    ``verify``, or with an operation ``use: sig`` does not cover (RFC 7517 §4.3: the two must
    agree); RSA keys under 2048 bits (RFC 7518 §3.3); anything PyJWT cannot load.
    """
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    if "d" in jwk or jwk.get("kty") == "oct":
        raise ValueError("a private or symmetric key never verifies")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {str(use)[:20]!r}, not sig")
    ops = jwk.get("key_ops")
    if ops is not None:
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            raise ValueError("key_ops is not a list of strings")
        if "verify" not in ops:
            raise ValueError("key_ops does not include verify")
        if use is not None and not set(ops) <= SIGNATURE_OPS:
            raise ValueError("use and key_ops disagree (RFC 7517 §4.3)")
    try:
        key = jwt.PyJWK(jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
        raise ValueError("not a usable RSA, EC or OKP public key") from e
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key.key_size} bits (at least {MIN_RSA_BITS})")
    return key


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


@dataclass(frozen=True, slots=True)
class ZoneKeys:
    """A zone's current signing key and the next one, published ahead of rotation."""

    current: SigningKey
    next: SigningKey | None = None

    def jwks(self) -> dict[str, Any]:
        """The zone's JWKS document: current and next public keys."""
        keys = [self.current.public_jwk] + ([self.next.public_jwk] if self.next else [])
        return {"keys": keys}


class KeyRing:
    """Every zone's keys, as loaded by the caller; ``replace`` swaps one zone's on rotation."""

    def __init__(self, zones: dict[str, ZoneKeys]) -> None:
        self._keys = dict(zones)

    def __getitem__(self, zone: str) -> ZoneKeys:
        return self._keys[zone]

    def __contains__(self, zone: object) -> bool:
        return zone in self._keys

    def replace(self, zone: str, keys: ZoneKeys) -> None:
        self._keys[zone] = keys


def parse_private_key(pem: bytes, origin: str) -> PrivateKey:
    """A PEM private key; ValueError with a readable reason naming ``origin``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{origin} is not an unencrypted PEM private key") from e
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise ValueError(f"{origin}: unsupported key type {type(key).__name__}")
    return key
