"""The one error tree of the exchange core.

Every failure the token endpoint can report is an ``ExchangeError``: it carries the RFC 6749
§5.2 / RFC 8693 §2.2.2 ``error`` code and a status *hint* that the one HTTP adapter
(``exchange.server.app``) or the sidecar turns into a response::

    ExchangeError                   server_error            500
    ├── InvalidRequest              invalid_request         400  (also: bad subject/actor token)
    ├── InvalidClient               invalid_client          401
    ├── InvalidGrant                invalid_grant           400
    ├── UnauthorizedClient          unauthorized_client     400
    ├── UnsupportedGrantType        unsupported_grant_type  400
    ├── InvalidScope                invalid_scope           400
    ├── InvalidTarget               invalid_target          400
    ├── SlowDown                    slow_down               429  (per-client rate limit)
    └── TemporarilyUnavailable      temporarily_unavailable 503  (issuer keys cannot be had)
        └── EndpointUnavailable                             503  (a remote token endpoint
                                                                  failed: worth a retry)

Descriptions are written for an operator and never contain a token or a secret.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar


class ExchangeError(Exception):
    """Base of every failure the token endpoint reports (RFC 6749 §5.2)."""

    error: ClassVar[str] = "server_error"
    status_hint: ClassVar[int] = 500

    def __init__(self, description: str, *, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, str]:
        """The JSON error body (RFC 6749 §5.2)."""
        return {"error": self.error, "error_description": self.description}


class InvalidRequest(ExchangeError):
    """Malformed request, or an invalid/unacceptable subject or actor token (RFC 8693 §2.2.2)."""

    error, status_hint = "invalid_request", 400


class InvalidClient(ExchangeError):
    """Client authentication failed (RFC 6749 §5.2)."""

    error, status_hint = "invalid_client", 401

    def __init__(self, description: str, *, basic_tried: bool = False) -> None:
        super().__init__(description)
        self.basic_tried = basic_tried


class InvalidGrant(ExchangeError):
    """The grant is invalid, expired or revoked (RFC 6749 §5.2)."""

    error, status_hint = "invalid_grant", 400


class UnauthorizedClient(ExchangeError):
    """The client may not use this grant for this target (RFC 6749 §5.2)."""

    error, status_hint = "unauthorized_client", 400


class UnsupportedGrantType(ExchangeError):
    """The grant type is not token exchange (RFC 6749 §5.2)."""

    error, status_hint = "unsupported_grant_type", 400


class InvalidScope(ExchangeError):
    """A requested scope is unknown or exceeds what may be granted (RFC 6749 §5.2)."""

    error, status_hint = "invalid_scope", 400


class InvalidTarget(ExchangeError):
    """No token can be issued for this audience or resource (RFC 8693 §2.2.2)."""

    error, status_hint = "invalid_target", 400


class SlowDown(ExchangeError):
    """The client exceeded its rate limit; retry after ``retry_after`` seconds."""

    error, status_hint = "slow_down", 429


class TemporarilyUnavailable(ExchangeError):
    """The server cannot answer now, e.g. a trusted issuer's keys cannot be had (RFC 6749 §4.1.2.1)."""

    error, status_hint = "temporarily_unavailable", 503


class EndpointUnavailable(TemporarilyUnavailable):
    """A remote token endpoint could not be reached or answered 5xx: another attempt may work."""


MAX_ECHOED = 64


def quoted(value: str) -> str:
    """A request value for an error description: short ones quoted, long ones (a token pasted
    into the wrong field, say) only by length and a SHA-256 prefix, never echoed."""
    if len(value) <= MAX_ECHOED and value.isprintable():
        return repr(value)
    return f"<{len(value)} characters, sha256:{hashlib.sha256(value.encode()).hexdigest()[:12]}>"


ERRORS_BY_CODE: dict[str, type[ExchangeError]] = {
    cls.error: cls
    for cls in (
        InvalidRequest,
        InvalidClient,
        InvalidGrant,
        UnauthorizedClient,
        UnsupportedGrantType,
        InvalidScope,
        InvalidTarget,
        SlowDown,
        TemporarilyUnavailable,
        ExchangeError,
    )
}


def error_from_code(code: str, description: str, retry_after: int | None = None) -> ExchangeError:
    """Rebuild an error received from a remote token endpoint."""
    cls = ERRORS_BY_CODE.get(code, ExchangeError)
    if cls is InvalidClient:
        return InvalidClient(description)
    return cls(description, retry_after=retry_after)
