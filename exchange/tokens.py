"""Token Exchange vocabulary (RFC 8693 §2-3): URNs, the request and the response. Sans-IO.

Both sides of the wire live here: a server parses a request (``parse_token_request``) and
encodes its answer (``TokenResponse.to_dict``); a client encodes a request
(``encode_token_request``) and reads the answer (``read_token_response``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from exchange.config import ZONE_NAME
from exchange.errors import (
    EndpointUnavailable,
    ExchangeError,
    InvalidRequest,
    UnsupportedGrantType,
    error_from_code,
)
from exchange.validate import unverified_claims

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE_JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"

SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT})
ACTOR_TOKEN_TYPES = SUBJECT_TOKEN_TYPES
REQUESTED_TOKEN_TYPES = frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT})

# Parameters that RFC 8693 §2.1 allows more than once; every other one must appear at most once.
MULTI_VALUED = frozenset({"audience", "resource"})
SINGLE_VALUED = frozenset(
    {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "requested_token_type",
        "scope",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
    }
)
MAX_SCOPE_LENGTH = 4096
# RFC 6749 §3.3: scope tokens are %x21 / %x23-5B / %x5D-7E, separated by spaces.
_SCOPE_CHARACTERS = re.compile(r"[ \x21\x23-\x5b\x5d-\x7e]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986 §3.1
MAX_TARGET_VALUES = 32
MAX_TARGET_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class TokenExchangeRequest:
    """An RFC 8693 §2.1 token exchange request, after syntax checks."""

    subject_token: str = field(repr=False)
    subject_token_type: str = TOKEN_TYPE_ACCESS_TOKEN
    audience: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    scope: tuple[str, ...] | None = None
    requested_token_type: str = TOKEN_TYPE_ACCESS_TOKEN
    actor_token: str | None = field(default=None, repr=False)
    actor_token_type: str | None = None

    def __post_init__(self) -> None:
        if not self.subject_token:
            raise InvalidRequest("subject_token is required")
        if self.subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequest(
                "subject_token_type must be one of: " + ", ".join(sorted(SUBJECT_TOKEN_TYPES))
            )
        if self.requested_token_type not in REQUESTED_TOKEN_TYPES:
            raise InvalidRequest(
                "requested_token_type must be one of: " + ", ".join(sorted(REQUESTED_TOKEN_TYPES))
            )
        if (self.actor_token is None) != (self.actor_token_type is None):
            raise InvalidRequest("actor_token and actor_token_type must be given together")
        if self.actor_token_type is not None and self.actor_token_type not in ACTOR_TOKEN_TYPES:
            raise InvalidRequest(
                "actor_token_type must be one of: " + ", ".join(sorted(ACTOR_TOKEN_TYPES))
            )
        targets = self.audience + self.resource
        if len(targets) > MAX_TARGET_VALUES:
            raise InvalidRequest(f"at most {MAX_TARGET_VALUES} audience/resource values")
        if any(not t or len(t) > MAX_TARGET_LENGTH for t in targets):
            raise InvalidRequest("audience and resource values must be 1 to 2048 characters")
        if not all(_absolute_uri(r) for r in self.resource):
            raise InvalidRequest(
                "resource must be an absolute URI without a fragment (RFC 8693 §2.1)"
            )

    @property
    def targets(self) -> tuple[str, ...]:
        """Every audience and resource value, in request order."""
        return self.audience + self.resource


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """An RFC 8693 §2.2.1 successful response, with the zone whose token it carries (None when
    a remote answer does not say) and the absolute time it expires."""

    access_token: str
    issued_token_type: str
    expires_in: int
    scope: tuple[str, ...]
    token_type: str = "Bearer"
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    zone: str | None = None
    expires_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the response."""
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
        }
        if self.scope:
            body["scope"] = " ".join(self.scope)
        return body

    def __repr__(self) -> str:  # never print the token
        return (
            f"TokenResponse(issued_token_type={self.issued_token_type!r}, "
            f"expires_in={self.expires_in}, scope={self.scope!r}, zone={self.zone!r})"
        )


def _absolute_uri(value: str) -> bool:
    scheme, sep, rest = value.partition(":")
    return bool(sep and rest and _SCHEME.fullmatch(scheme)) and "#" not in value


def parse_scope(value: str) -> tuple[str, ...]:
    """Split an RFC 6749 §3.3 scope string into its tokens, order kept, duplicates removed."""
    if len(value) > MAX_SCOPE_LENGTH:
        raise InvalidRequest(f"scope longer than {MAX_SCOPE_LENGTH} characters")
    if not _SCOPE_CHARACTERS.fullmatch(value):
        raise InvalidRequest("scope contains a character RFC 6749 §3.3 does not allow")
    return tuple(dict.fromkeys(value.split()))


def parse_form(body: bytes, *, max_fields: int) -> dict[str, list[str]]:
    """The fields of an ``application/x-www-form-urlencoded`` body (name -> every value, in
    order): exactly what ``urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
    errors="strict", max_num_fields=max_fields)`` reads, without its generality. ValueError
    (UnicodeDecodeError included) when the body is not ASCII, has more than ``max_fields``
    fields (counted as parse_qsl counts them: one more than the ``&``), or a percent-escape
    is not UTF-8. Empty fields are skipped; a field without ``=`` has an empty value; ``+``
    is a space; an escape that is no escape (``%zz``, a lone ``%``) is kept as written."""
    if not body.isascii():
        raise ValueError("form body is not ASCII")
    if body and body.count(b"&") >= max_fields:
        raise ValueError("too many form fields")
    form: dict[str, list[str]] = {}
    for pair in body.split(b"&"):
        if pair:
            name, _, value = pair.partition(b"=")
            form.setdefault(_form_text(name), []).append(_form_text(value))
    return form


def _form_text(raw: bytes) -> str:
    """One form name or value of an ASCII body: ``+`` is a space, then %XX escapes are undone
    and the bytes read as UTF-8, strictly."""
    known = _ESCAPED_VOCABULARY.get(raw)
    return known if known is not None else _unescape(raw)


def _unescape(raw: bytes) -> str:
    raw = raw.replace(b"+", b" ")
    return (unquote_to_bytes(raw) if b"%" in raw else raw).decode("utf-8")


# The RFC 8693 / RFC 7521 URNs as form encoders write them (":" as %3A): most token requests
# carry two or three, and each would otherwise be unescaped byte by byte. Read by _unescape
# itself, so a value found here reads exactly as it would have.
_ESCAPED_VOCABULARY = {
    raw: _unescape(raw)
    for raw in (
        quote(urn, safe="").encode("ascii")
        for urn in (
            GRANT_TYPE_TOKEN_EXCHANGE,
            CLIENT_ASSERTION_TYPE_JWT_BEARER,
            *sorted(SUBJECT_TOKEN_TYPES | ACTOR_TOKEN_TYPES | REQUESTED_TOKEN_TYPES),
        )
    )
}


def single(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The one value of a single-valued parameter; repeating it is invalid_request."""
    values = form.get(name, ())
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} must not be repeated")
    return values[0] if values else None


def parse_token_request(form: Mapping[str, Sequence[str]]) -> TokenExchangeRequest:
    """Turn RFC 8693 §2.1 form fields (name -> every value) into a request, or raise."""
    if any(len(values) > 1 for values in form.values()):
        for name in SINGLE_VALUED:
            single(form, name)  # raises on repetition, before anything else is believed
    grant_type = single(form, "grant_type")
    if grant_type is None:
        raise InvalidRequest("grant_type is required")
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
        raise UnsupportedGrantType(f"grant_type must be {GRANT_TYPE_TOKEN_EXCHANGE}")
    subject_token = single(form, "subject_token")
    subject_token_type = single(form, "subject_token_type")
    if not subject_token:
        raise InvalidRequest("subject_token is required")
    if not subject_token_type:
        raise InvalidRequest("subject_token_type is required")
    scope = single(form, "scope")
    return TokenExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_token_type,
        audience=tuple(form.get("audience", ())),
        resource=tuple(form.get("resource", ())),
        scope=parse_scope(scope) if scope is not None else None,
        requested_token_type=single(form, "requested_token_type") or TOKEN_TYPE_ACCESS_TOKEN,
        actor_token=single(form, "actor_token") or None,
        actor_token_type=single(form, "actor_token_type") or None,
    )


def encode_token_request(request: TokenExchangeRequest) -> list[tuple[str, str]]:
    """The form fields of a request, for a client of a remote token endpoint."""
    fields = [
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("subject_token", request.subject_token),
        ("subject_token_type", request.subject_token_type),
        ("requested_token_type", request.requested_token_type),
    ]
    fields += [("audience", a) for a in request.audience]
    fields += [("resource", r) for r in request.resource]
    if request.scope is not None:
        fields.append(("scope", " ".join(request.scope)))
    if request.actor_token is not None and request.actor_token_type is not None:
        fields += [
            ("actor_token", request.actor_token),
            ("actor_token_type", request.actor_token_type),
        ]
    return fields


# -- the client side: reading a token endpoint's answer --------------------------------------

MAX_RETRY_AFTER = 300


def read_token_response(
    status: int, body: bytes, *, retry_after: str | None, now: float
) -> TokenResponse:
    """Turn a token endpoint's answer into a TokenResponse or the error it carries.

    5xx is EndpointUnavailable (worth a retry); any other non-200 is the OAuth error it names
    (RFC 6749 §5.2), or ExchangeError when it names none.
    """
    if status >= 500:
        raise EndpointUnavailable(
            f"token endpoint answered {status}", retry_after=parse_retry_after(retry_after)
        )
    document = _json_object(body)
    if status != 200:
        code = document.get("error") if document else None
        if not isinstance(code, str):
            raise ExchangeError(f"token endpoint answered {status} without an OAuth error")
        description = document.get("error_description") if document else None
        # e.g. 429 slow_down carries its Retry-After
        raise error_from_code(code, str(description or code), parse_retry_after(retry_after))
    return _token_of(document, now)


def _token_of(document: dict[str, Any] | None, now: float) -> TokenResponse:
    """RFC 8693 §2.2.1: access_token, token_type Bearer, expires_in (else the JWT's exp)."""
    if document is None:
        raise ExchangeError("token endpoint answer is not a JSON object")
    token = document.get("access_token")
    token_type = document.get("token_type")
    if not isinstance(token, str) or not token:
        raise ExchangeError("token endpoint answer has no access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ExchangeError("token endpoint answer is not a Bearer token")
    claims = unverified_claims(token)
    expires_in = document.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        expires_at = now + float(expires_in)
    elif isinstance(claims.get("exp"), int | float):
        expires_at = float(claims["exp"])
    else:
        expires_at = now  # unknown lifetime: use once, never cache
    issued_type = document.get("issued_token_type")
    scope = document.get("scope")
    return TokenResponse(
        access_token=token,
        issued_token_type=issued_type if isinstance(issued_type, str) else TOKEN_TYPE_ACCESS_TOKEN,
        expires_in=max(0, int(expires_at - now)),
        scope=tuple(scope.split()) if isinstance(scope, str) else (),
        claims=claims,
        zone=zone_of_issuer(claims.get("iss")),
        expires_at=expires_at,
    )


def zone_of_issuer(issuer: Any) -> str | None:
    """The zone of a zone issuer URL (``<base>/zones/<zone>``), or None."""
    if isinstance(issuer, str) and "/zones/" in issuer:
        zone = issuer.rsplit("/zones/", 1)[1]
        return zone if ZONE_NAME.match(zone) else None
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def parse_retry_after(value: str | None) -> int | None:
    """A delta-seconds Retry-After, bounded; None when absent or an HTTP date."""
    if value is not None and value.strip().isdigit():
        return max(1, min(int(value), MAX_RETRY_AFTER))
    return None
