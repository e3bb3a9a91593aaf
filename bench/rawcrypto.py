"""The baseline of POST /token: ES256 verify + ES256 sign with ``cryptography``, nothing else.

``python -m bench.rawcrypto SUBJECT_TOKEN_FILE ISSUER_JWK_FILE ZONE_TOKEN_FILE ZONE_KEY_PEM
SECONDS`` verifies the subject token's signature with the issuer's public key and signs the
signing input of a zone token with the zone's private key, in a loop, one process, one thread:
the two operations an exchange cannot skip. It prints ``{"ops_per_second": N}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.utils import base64url_decode

from exchange.server.keyfiles import load_private_key

ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def der_signature(token: str) -> tuple[bytes, bytes]:
    """(signing input, DER signature) of a compact ES256 JWS."""
    signing_input, _, signature = token.rpartition(".")
    raw = base64url_decode(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    return signing_input.encode(), encode_dss_signature(r, s)


def ops_per_second(
    public: ec.EllipticCurvePublicKey,
    private: ec.EllipticCurvePrivateKey,
    subject_token: str,
    zone_token: str,
    seconds: float,
) -> float:
    """Verify-then-sign pairs per second."""
    verify_input, signature = der_signature(subject_token)
    sign_input = zone_token.rpartition(".")[0].encode()
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            public.verify(signature, verify_input, ECDSA_SHA256)
            private.sign(sign_input, ECDSA_SHA256)
        count += 50
    return count / (time.perf_counter() - started)


def main(argv: list[str]) -> int:
    subject_token = Path(argv[0]).read_text().strip()
    public = jwt.PyJWK(json.loads(Path(argv[1]).read_text())).key
    zone_token = Path(argv[2]).read_text().strip()
    private = load_private_key(Path(argv[3]))
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        private, ec.EllipticCurvePrivateKey
    ):
        raise SystemExit("ES256 keys expected")
    rate = ops_per_second(public, private, subject_token, zone_token, float(argv[4]))
    print(json.dumps({"ops_per_second": rate}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
