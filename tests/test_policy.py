"""Policy and minting as pure functions at a fixed clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exchange import mint, policy
from exchange.config import ClientConfig, ExchangeConfig, parse_exchange_config
from exchange.errors import InvalidRequest, InvalidScope, InvalidTarget, UnauthorizedClient
from exchange.tokens import TokenExchangeRequest
from tests.conftest import NOW

CONFIG: ExchangeConfig = parse_exchange_config(
    {
        "issuer": "https://tx.example",
        "trusted_issuers": [{"issuer": "https://op.example"}],
        "zones": {
            "red": {
                "audiences": ["billing"],
                "resources": ["https://billing.red"],
                "scopes": ["billing:read", "billing:write"],
                "token_lifetime": 300,
                "claims": {"sub": "email", "copy": ["name"]},
            },
            "green": {"audiences": ["orders"], "scopes": ["orders:read"], "token_lifetime": 60},
        },
        "clients": [
            {
                "client_id": "fe",
                "client_secret": "x",
                "zones": ["red"],
                "scopes": ["billing:read", "orders:read"],
            },
            {
                "client_id": "narrow",
                "client_secret": "x",
                "zones": ["red", "green"],
                "scopes": ["billing:read", "orders:read"],
                "subject_audiences": ["frontend"],
            },
        ],
    },
    Path.cwd(),
)
INDEX = policy.zone_index(CONFIG.zones)
FE: ClientConfig = CONFIG.clients["fe"]
SUBJECT: dict[str, Any] = {
    "iss": "https://op.example",
    "sub": "u-1",
    "email": "alice@example.com",
    "name": "Alice",
    "groups": ["admins"],
    "aud": "frontend",
    "exp": NOW + 3600,
}


def decide(
    subject: dict[str, Any] = SUBJECT, client: ClientConfig = FE, **fields: Any
) -> policy.Decision:
    fields.setdefault("audience", ("billing",))
    request = TokenExchangeRequest(subject_token="t", **fields)
    return policy.decide(request, client, CONFIG, INDEX, subject, None, NOW)


@pytest.mark.parametrize(
    ("requested", "granted"),
    [
        (None, ("billing:read",)),
        (("billing:read",), ("billing:read",)),
        ((), ()),
    ],
)
def test_scope_is_intersection(requested: tuple[str, ...] | None, granted: tuple[str, ...]) -> None:
    """Granted scope is requested ∩ zone ∩ client; omitted scope grants zone ∩ client."""
    assert decide(scope=requested).scope == granted


@pytest.mark.parametrize("scope", [("billing:write",), ("orders:read",), ("admin",)])
def test_scope_never_up_scopes(scope: tuple[str, ...]) -> None:
    """A scope outside zone ∩ client is invalid_scope, never silently granted."""
    with pytest.raises(InvalidScope):
        decide(scope=scope)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"audience": ("billing", "orders")}, InvalidTarget),
        ({"audience": ("billing",), "resource": ("https://evil",)}, InvalidTarget),
        ({"audience": ()}, InvalidTarget),
        ({"audience": ("orders",)}, UnauthorizedClient),
    ],
)
def test_target_refusals(fields: dict[str, Any], error: type[Exception]) -> None:
    """Targets must all map to one zone the client may use."""
    with pytest.raises(error):
        decide(**fields)


def test_claim_mapping_and_lifetime() -> None:
    """sub comes from the configured claim, the copy list is copied, the rest dropped."""
    decision = decide()
    assert decision.claims == {"sub": "alice@example.com", "name": "Alice"}
    assert decision.lifetime == 300
    short = decide({**SUBJECT, "exp": NOW + 10})
    assert short.lifetime == 10


def test_missing_sub_claim_is_invalid_request() -> None:
    """A subject without the claim the zone maps to sub cannot be exchanged."""
    with pytest.raises(InvalidRequest, match="email"):
        decide({k: v for k, v in SUBJECT.items() if k != "email"})


def test_subject_audiences_bind_tokens_to_their_client() -> None:
    """A client limited to subject audiences cannot exchange a token issued to another client."""
    narrow = CONFIG.clients["narrow"]
    assert decide(client=narrow).zone.name == "red"
    with pytest.raises(InvalidRequest, match="aud"):
        decide({**SUBJECT, "aud": "other-app"}, client=narrow)


def test_minted_claims_follow_rfc9068() -> None:
    """Minted claims carry iss of the zone, aud, client_id, scope and times from the clock."""
    claims = mint.claims_for(
        decide(resource=("https://billing.red",)),
        issuer=CONFIG.zone_issuer("red"),
        client_id="fe",
        now=NOW,
        jti="j-1",
    )
    assert claims == {
        "sub": "alice@example.com",
        "name": "Alice",
        "iss": "https://tx.example/zones/red",
        "aud": ["billing", "https://billing.red"],
        "exp": int(NOW) + 300,
        "iat": int(NOW),
        "nbf": int(NOW),
        "jti": "j-1",
        "client_id": "fe",
        "scope": "billing:read",
    }


@pytest.mark.parametrize(
    ("subject_extra", "actor", "ok"),
    [
        ({}, {"sub": "svc", "iss": "https://op.example"}, True),
        ({"may_act": {"sub": "svc"}}, {"sub": "svc", "iss": "i"}, True),
        ({"may_act": {"sub": "other"}}, {"sub": "svc", "iss": "i"}, False),
        ({"may_act": "svc"}, {"sub": "svc", "iss": "i"}, False),
        ({}, {"iss": "i"}, False),
        ({"act": {"sub": "edge"}}, {"sub": "svc", "iss": "i"}, True),
        ({"act": "edge"}, {"sub": "svc", "iss": "i"}, False),
    ],
)
def test_delegation(subject_extra: dict[str, Any], actor: dict[str, Any], ok: bool) -> None:
    """act names the actor; may_act, when present, must admit it (RFC 8693 §4.4)."""
    subject = {**SUBJECT, **subject_extra}
    if ok:
        act = policy.delegate(subject, actor)
        assert act is not None and act["sub"] == actor["sub"]
        assert act.get("act") == subject_extra.get("act")
    else:
        with pytest.raises(InvalidRequest):
            policy.delegate(subject, actor)


def test_long_values_are_not_echoed_in_refusals() -> None:
    """A token pasted into audience or scope is described by length and hash, never echoed."""
    pasted = "eyJhbGciOiJFUzI1NiJ9." + "x" * 200 + ".sig"
    with pytest.raises(InvalidTarget) as target:
        decide(audience=(pasted,))
    with pytest.raises(InvalidScope) as scope:
        decide(scope=(pasted,))
    for raised in (target, scope):
        assert pasted[:30] not in raised.value.description
        assert f"<{len(pasted)} characters, sha256:" in raised.value.description
