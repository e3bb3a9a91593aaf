"""Token Exchange vocabulary (RFC 8693 §2-3): URNs, the request and the response. Sans-IO."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exchange.errors import InvalidRequest, UnsupportedGrantType

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
    """An RFC 8693 §2.2.1 successful response."""

    access_token: str
    issued_token_type: str
    expires_in: int
    scope: tuple[str, ...]
    token_type: str = "Bearer"
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
            f"expires_in={self.expires_in}, scope={self.scope!r})"
        )


def _absolute_uri(value: str) -> bool:
    scheme, sep, rest = value.partition(":")
    return bool(sep and rest and _SCHEME.fullmatch(scheme)) and "#" not in value


def parse_scope(value: str) -> tuple[str, ...]:
    """Split an RFC 6749 §3.3 scope string into its tokens, order kept, duplicates removed."""
    if len(value) > MAX_SCOPE_LENGTH:
        raise InvalidRequest(f"scope longer than {MAX_SCOPE_LENGTH} characters")
    for ch in value:
        if ch != " " and not ("\x21" <= ch <= "\x7e" and ch not in '"\\'):
            raise InvalidRequest("scope contains a character RFC 6749 §3.3 does not allow")
    return tuple(dict.fromkeys(value.split()))


def single(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The one value of a single-valued parameter; repeating it is invalid_request."""
    values = form.get(name, ())
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} must not be repeated")
    return values[0] if values else None


def parse_token_request(form: Mapping[str, Sequence[str]]) -> TokenExchangeRequest:
    """Turn RFC 8693 §2.1 form fields (name -> every value) into a request, or raise."""
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
