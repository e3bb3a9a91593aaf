"""Subject and actor token validation (RFC 8693 §2.1, RFC 7519 §7.2). Pure, given the keys.

Every failure is ``InvalidRequest`` (RFC 8693 §2.2.2 says MUST) whose description tells an
operator why, and never echoes the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from exchange.config import TrustedIssuer
from exchange.errors import InvalidRequest

MAX_KID_LENGTH = 256
_JWS = jwt.PyJWS()
# Key types each algorithm family may verify with: "alg confusion" stops here.
ALG_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")  # RFC 4648 §5, unpadded


@dataclass(frozen=True, slots=True)
class Signed:
    """The bytes a compact JWS's signature covers, and the signature: what PyJWS would verify."""

    signing_input: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Unverified:
    """What a token says about itself before its signature is checked: only used to find keys."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    what: str  # "subject_token" or "actor_token", for messages
    # Set by peek() when PyJWS would read the token to the very same bytes (see signed_part):
    # verify() then checks the signature without parsing the token a second time.
    signed: Signed | None = field(default=None, repr=False, compare=False)

    @property
    def issuer(self) -> str:
        iss = self.claims.get("iss")
        if not isinstance(iss, str):
            raise InvalidRequest(f"{self.what} has no iss claim")
        return iss

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        if kid is None:
            return None
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
            raise InvalidRequest(f"{self.what} header kid must be a string of 1 to 256 characters")
        return kid

    @property
    def alg(self) -> str:
        alg = self.header.get("alg")
        if not isinstance(alg, str):
            raise InvalidRequest(f"{self.what} header has no alg")
        return alg


class MalformedJws(ValueError):
    """A compact JWS whose structure is wrong; the message names the part, never the bytes."""


def read_jws(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS (RFC 7515 §7.1), unverified: the one reader of
    unverified tokens. Raises MalformedJws saying which part is wrong."""
    segments = token.split(".")
    if len(segments) != 3:
        raise MalformedJws("compact JWS has three dot-separated parts")
    return _json_segment(segments[0], "header")[0], _json_segment(segments[1], "payload")[0]


def _json_segment(segment: str, name: str) -> tuple[dict[str, Any], bytes]:
    """The JSON object a segment encodes, and the bytes it decoded to."""
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(decoded)
    except (ValueError, RecursionError, binascii.Error) as e:  # JSON and UTF-8 errors too
        raise MalformedJws(f"{name} is not base64url-encoded JSON") from e
    if not isinstance(value, dict):
        raise MalformedJws(f"{name} is not a JSON object")
    return value, decoded


def _canonical(segment: str, decoded: bytes) -> bool:
    """Whether ``segment`` is the one spelling of ``decoded`` (URL-safe alphabet, no padding,
    no stray low bits): the spelling PyJWS decodes to the same bytes without a word."""
    return base64.urlsafe_b64encode(decoded).rstrip(b"=") == segment.encode("ascii")


def signed_part(
    segments: tuple[str, str, str], header: Mapping[str, Any], decoded: tuple[bytes, bytes]
) -> Signed | None:
    """Signing input and signature of a compact JWS whose header and payload segments
    ``_json_segment`` read (to ``header`` and the ``decoded`` bytes), when PyJWS's reader
    (``decode_complete``) would accept it and see the same header: every part canonical
    base64url, and no header PyJWS treats specially (``b64``, ``crit``, a ``kid`` that is no
    string). Anything else is None, and verify() hands the token to PyJWS whole, which then
    words the refusal as it always did."""
    if "b64" in header or "crit" in header or not isinstance(header.get("kid", ""), str):
        return None
    head, payload, signature = segments
    if not (_canonical(head, decoded[0]) and _canonical(payload, decoded[1])):
        return None
    if len(signature) % 4 == 1 or not _BASE64URL.fullmatch(signature):
        return None
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    if not _canonical(signature, raw_signature):
        return None
    return Signed(f"{head}.{payload}".encode("ascii"), raw_signature)


def check_signature(signed: Signed, alg: str, key: Any) -> None:
    """What ``PyJWS.decode_complete`` checks of a signature, through PyJWT's public
    ``Algorithm`` API: the allow-listed ``alg``'s own key preparation (which refuses a key of
    another type or curve) and its verification. InvalidSignatureError when it does not
    verify."""
    try:
        algorithm = _JWS.get_algorithm_by_name(alg)
    except NotImplementedError as e:  # as PyJWS words it
        raise jwt.InvalidAlgorithmError("Algorithm not supported") from e
    if not algorithm.verify(signed.signing_input, algorithm.prepare_key(key), signed.signature):
        raise jwt.InvalidSignatureError("Signature verification failed")


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS, unverified, ``{}`` when malformed: only for lifetimes and
    labels, never for a decision."""
    try:
        return read_jws(token)[1]
    except MalformedJws:
        return {}


def peek(token: str, *, what: str, max_size: int) -> Unverified:
    """Split and decode a compact JWS without trusting it; malformed is invalid_request."""
    if len(token) > max_size:
        raise InvalidRequest(f"{what} is larger than {max_size} bytes")
    if token.count(".") != 2:
        raise InvalidRequest(f"{what} is not a JWT (compact JWS has three dot-separated parts)")
    head, payload, signature = token.split(".")
    try:  # one parse for header and payload; verify() then checks the signature only
        header, header_bytes = _json_segment(head, "header")
        claims, claims_bytes = _json_segment(payload, "payload")
    except MalformedJws as e:
        raise InvalidRequest(f"{what} is not a well-formed JWT: {e}") from e
    if "crit" in header:
        raise InvalidRequest(f"{what} has a crit header; no JWS extensions are understood")
    signed = signed_part((head, payload, signature), header, (header_bytes, claims_bytes))
    return Unverified(header=header, claims=claims, what=what, signed=signed)


ACCESS_TOKEN_TYPS = frozenset({"jwt", "at+jwt"})  # RFC 7519 §5.1, RFC 9068 §2.1
MAX_SHOWN_TYP = 40


def typ_of(token: Unverified) -> str | None:
    """The JOSE ``typ``, lower case with an ``application/`` prefix removed (RFC 7515 §4.1.9)."""
    typ = token.header.get("typ")
    if typ is None:
        return None
    if not isinstance(typ, str):
        raise InvalidRequest(f"{token.what} header typ must be a string")
    return typ.lower().removeprefix("application/")


def check_type(token: Unverified, declared: str, issuer: TrustedIssuer) -> None:
    """Subject token typing (RFC 8725 §3.11, RFC 9068 §4): a token typed as anything but a
    JWT or an access token (a logout token, a DPoP proof, a security event) is never
    exchanged; a declared ``id_token`` must not be typed ``at+jwt``; the issuer's
    ``subject_token_types`` limit what a subject token may be declared as, and its
    ``require_typ`` makes ``typ: at+jwt`` mandatory. ``declared`` is a short type name."""
    typ = typ_of(token)
    if typ is not None and typ not in ACCESS_TOKEN_TYPS:
        shown = typ[:MAX_SHOWN_TYP]
        raise InvalidRequest(
            f"{token.what} is typed {shown!r}, not JWT or at+jwt: such a token is never "
            "exchanged (RFC 8725 §3.11)"
        )
    if token.what == "subject_token" and declared not in issuer.subject_token_types:
        raise InvalidRequest(
            f"subject_token_type {declared} is not accepted for tokens of {issuer.issuer} "
            f"(accepted: {', '.join(issuer.subject_token_types)})"
        )
    if declared == "id_token" and typ == "at+jwt":
        raise InvalidRequest(
            f"{token.what} is declared an id_token but typed at+jwt (an access token)"
        )
    if issuer.require_typ is not None and typ != issuer.require_typ:
        raise InvalidRequest(
            f"{token.what} of {issuer.issuer} must be typed {issuer.require_typ} "
            f"(require_typ), it is typed {typ or 'nothing'}"
        )


def verify(
    token: Unverified,
    raw: str,
    key: jwt.PyJWK,
    *,
    issuer: TrustedIssuer,
    now: float,
    leeway: int,
) -> dict[str, Any]:
    """Check signature and claims of a token from ``issuer``; return its claims."""
    alg = token.alg
    if alg not in issuer.algorithms:
        raise InvalidRequest(
            f"{token.what} alg {alg!r} is not allowed for {issuer.issuer} "
            f"(allowed: {', '.join(issuer.algorithms)})"
        )
    _check_key_fits(token, alg, key)
    try:  # the signature covers the very bytes peek() parsed: its claims are now verified
        if token.signed is not None:  # PyJWT's own algorithm, key preparation and check
            check_signature(token.signed, alg, key.key)
        else:  # a spelling PyJWS may refuse, or read differently: it reads the token itself
            _JWS.decode_complete(raw, key.key, algorithms=[alg])
    except jwt.InvalidSignatureError as e:
        raise InvalidRequest(f"{token.what} signature does not verify") from e
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise InvalidRequest(f"{token.what} cannot be verified: {_reason(e)}") from e
    claims = dict(token.claims)
    validate_claims(claims, issuer=issuer, now=now, leeway=leeway, what=token.what)
    return claims


def _check_key_fits(token: Unverified, alg: str, key: jwt.PyJWK) -> None:
    expected = ALG_KEY_TYPES.get(alg[:2])
    if expected is None or key.key_type != expected:
        raise InvalidRequest(f"{token.what} alg {alg} does not match the issuer key type")
    jwk_alg = getattr(key, "_jwk_data", {}).get("alg")
    if jwk_alg is not None and jwk_alg != alg:
        raise InvalidRequest(
            f"{token.what} alg {alg} differs from the key's declared alg {jwk_alg}"
        )


def validate_claims(
    claims: Mapping[str, Any], *, issuer: TrustedIssuer, now: float, leeway: int, what: str
) -> None:
    """The registered claims (RFC 7519 §4.1) at a given time."""
    _validate_iss(claims, issuer, what)
    _validate_exp(claims, now, leeway, what)
    _validate_nbf(claims, now, leeway, what)
    _validate_iat(claims, now, leeway, what)
    _validate_aud(claims, issuer, what)


def _validate_iss(claims: Mapping[str, Any], issuer: TrustedIssuer, what: str) -> None:
    if claims.get("iss") != issuer.issuer:
        raise InvalidRequest(f"{what} iss is not {issuer.issuer}")


def _number(claims: Mapping[str, Any], name: str, what: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{what} {name} claim must be a number")
    try:
        number = float(value)
    except OverflowError as e:  # an integer beyond any float: 10**400
        raise InvalidRequest(f"{what} {name} claim is out of range") from e
    if not math.isfinite(number):  # JSON parsers accept NaN and Infinity; no time is either
        raise InvalidRequest(f"{what} {name} claim must be a finite number")
    return number


def _validate_exp(claims: Mapping[str, Any], now: float, leeway: int, what: str) -> None:
    exp = _number(claims, "exp", what)
    if exp is None:
        raise InvalidRequest(f"{what} has no exp claim")
    if exp + leeway <= now:
        raise InvalidRequest(f"{what} expired {int(now - exp)} s ago")


def _validate_nbf(claims: Mapping[str, Any], now: float, leeway: int, what: str) -> None:
    nbf = _number(claims, "nbf", what)
    if nbf is not None and nbf - leeway > now:
        raise InvalidRequest(f"{what} is not valid before {int(nbf)} (nbf is in the future)")


def _validate_iat(claims: Mapping[str, Any], now: float, leeway: int, what: str) -> None:
    iat = _number(claims, "iat", what)
    if iat is not None and iat - leeway > now:
        raise InvalidRequest(f"{what} was issued in the future (iat)")


def _validate_aud(claims: Mapping[str, Any], issuer: TrustedIssuer, what: str) -> None:
    if issuer.audiences is None:
        return
    if not set(audiences_of(claims)) & set(issuer.audiences):
        raise InvalidRequest(f"{what} aud is not one of {', '.join(issuer.audiences)}")


def audiences_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``aud`` claim as a tuple (it may be a string or a list)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def _reason(e: Exception) -> str:
    # Library messages describe the structure, never the token; keep them short.
    return (str(e) or type(e).__name__)[:200]
