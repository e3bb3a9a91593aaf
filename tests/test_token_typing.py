"""Subject token typing (RFC 8725 §3.11, RFC 9068 §4) and scopes bounded by the subject's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from devkit.provider import DevOpenIDProvider
from exchange.config import parse_exchange_config
from exchange.core import ExchangeCore
from exchange.errors import InvalidRequest, InvalidScope
from exchange.server.wiring import build_core
from exchange.tokens import (
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
    TokenExchangeRequest,
)
from runtime.configload import ConfigError
from tests.conftest import exchange_document

CoreFactory = Callable[..., Any]


@pytest.fixture
async def make_core(op: DevOpenIDProvider) -> AsyncIterator[CoreFactory]:
    """Cores trusting ``op`` with the trusted issuer's and shop-frontend's settings changed."""
    made: list[ExchangeCore] = []

    def make(issuer: dict[str, Any] | None = None, client: dict[str, Any] | None = None) -> Any:
        document = exchange_document(op)
        document["trusted_issuers"][0].update(issuer or {})
        document["clients"][0].update(client or {})
        core = build_core(parse_exchange_config(document, Path.cwd()))
        made.append(core)
        return core

    yield make
    for core in made:
        await core.close()


async def exchange(
    core: ExchangeCore, subject: str, declared: str = TOKEN_TYPE_ACCESS_TOKEN, **fields: Any
) -> tuple[str, ...]:
    fields.setdefault("audience", ("billing",))
    request = TokenExchangeRequest(subject_token=subject, subject_token_type=declared, **fields)
    return (await core.exchange(request, client="shop-frontend")).scope


@pytest.mark.parametrize(
    "typ", ["logout+jwt", "dpop+jwt", "secevent+jwt", "application/logout+jwt", "JOSE", "id+jwt"]
)
async def test_tokens_typed_as_something_else_are_never_exchanged(
    op: DevOpenIDProvider, make_core: CoreFactory, typ: str
) -> None:
    """A logout token, DPoP proof or security event token is refused, whatever it is declared."""
    core = make_core()
    subject = op.mint(headers={"typ": typ})
    for declared in (TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN):
        with pytest.raises(InvalidRequest, match="not JWT or at\\+jwt"):
            await exchange(core, subject, declared)


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt"])
async def test_access_tokens_typed_jwt_or_at_jwt_are_exchanged(
    op: DevOpenIDProvider, make_core: CoreFactory, typ: str | None
) -> None:
    """An access token typed JWT or at+jwt (any case, application/ prefix) or not typed works."""
    subject = op.mint(headers={} if typ is None else {"typ": typ})
    assert await exchange(make_core(), subject) == ("billing:read",)


async def test_an_id_token_typed_as_an_access_token_is_refused(
    op: DevOpenIDProvider, make_core: CoreFactory
) -> None:
    """A token declared id_token but typed at+jwt is refused; one typed JWT is accepted."""
    core = make_core()
    with pytest.raises(InvalidRequest, match="declared an id_token but typed at\\+jwt"):
        await exchange(core, op.mint(headers={"typ": "at+jwt"}), TOKEN_TYPE_ID_TOKEN)
    assert await exchange(core, op.mint(headers={"typ": "JWT"}), TOKEN_TYPE_ID_TOKEN)


async def test_an_issuer_may_accept_only_access_tokens(
    op: DevOpenIDProvider, make_core: CoreFactory
) -> None:
    """subject_token_types: [access_token] refuses ID tokens and plain JWTs from that issuer."""
    core = make_core(issuer={"subject_token_types": ["access_token"]})
    subject = op.mint()
    for declared in (TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT):
        with pytest.raises(InvalidRequest, match="is not accepted for tokens of"):
            await exchange(core, subject, declared)
    assert await exchange(core, subject, TOKEN_TYPE_ACCESS_TOKEN)


async def test_require_typ_makes_at_jwt_mandatory(
    op: DevOpenIDProvider, make_core: CoreFactory
) -> None:
    """require_typ: at+jwt refuses untyped and JWT-typed tokens of that issuer."""
    core = make_core(issuer={"require_typ": "at+jwt"})
    for headers in ({}, {"typ": "JWT"}):
        with pytest.raises(InvalidRequest, match="must be typed at\\+jwt"):
            await exchange(core, op.mint(headers=headers))
    assert await exchange(core, op.mint(headers={"typ": "application/at+jwt"}))


async def test_actor_tokens_are_typed_too(op: DevOpenIDProvider, make_core: CoreFactory) -> None:
    """An actor token typed as a logout token is refused."""
    core = make_core()
    actor = op.mint({"sub": "svc"}, headers={"typ": "logout+jwt"})
    with pytest.raises(InvalidRequest, match="actor_token is typed"):
        await exchange(core, op.mint(), actor_token=actor, actor_token_type=TOKEN_TYPE_ACCESS_TOKEN)


async def test_subject_scope_intersect_bounds_the_grant_by_the_subject(
    op: DevOpenIDProvider, make_core: CoreFactory
) -> None:
    """With subject_scope: intersect a client gets no scope the user's own token lacks."""
    core = make_core(client={"subject_scope": "intersect"})
    holding = op.mint({"scope": "openid billing:read"})
    assert await exchange(core, holding) == ("billing:read",)
    assert await exchange(core, op.mint({"scp": ["billing:read"]})) == ("billing:read",)
    lacking = op.mint({"scope": "openid profile"})
    assert await exchange(core, lacking) == ()
    with pytest.raises(InvalidScope, match="not among the subject token's own scopes"):
        await exchange(core, lacking, scope=("billing:read",))
    ignoring = make_core()  # the default, subject_scope: ignore
    assert await exchange(ignoring, lacking, scope=("billing:read",)) == ("billing:read",)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("issuer", {"subject_token_types": ["refresh_token"]}, "trusted_issuers[0].subject_token_types"),
        ("issuer", {"require_typ": "JWT"}, "trusted_issuers[0].require_typ"),
        ("client", {"subject_scope": "union"}, "clients[0].subject_scope"),
    ],
)  # fmt: skip
def test_typing_settings_are_checked_at_load(
    op: DevOpenIDProvider, where: str, value: dict[str, Any], message: str
) -> None:
    """A wrong subject_token_types, require_typ or subject_scope is named by its YAML path."""
    document = exchange_document(op)
    target = document["trusted_issuers"][0] if where == "issuer" else document["clients"][0]
    target.update(value)
    with pytest.raises(ConfigError) as refused:
        parse_exchange_config(document, Path.cwd())
    assert any(message in error for error in refused.value.errors)
