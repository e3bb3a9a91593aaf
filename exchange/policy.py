"""Policy: which zone a request targets, what the client may get, what the token will say.

Pure functions over config and verified claims; every refusal is an ``ExchangeError`` in the
RFC's vocabulary. Policy is data (``ExchangeConfig``); this module only reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exchange.config import ClientConfig, ExchangeConfig, ZoneConfig
from exchange.errors import (
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
    quoted,
)
from exchange.tokens import TokenExchangeRequest
from exchange.validate import audiences_of

MAX_ACTOR_CHAIN = 5


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything needed to mint, decided before any key is touched."""

    zone: ZoneConfig
    audience: tuple[str, ...]
    scope: tuple[str, ...]
    lifetime: int
    claims: Mapping[str, Any]  # sub and copied claims
    act: Mapping[str, Any] | None = None


def zone_index(zones: Mapping[str, ZoneConfig]) -> dict[str, ZoneConfig]:
    """Audience and resource values -> the zone they select (built once at start)."""
    return {t: z for z in zones.values() for t in z.audiences + z.resources}


def select_zone(
    request: TokenExchangeRequest,
    client: ClientConfig,
    index: Mapping[str, ZoneConfig],
    zones: Mapping[str, ZoneConfig],
) -> tuple[ZoneConfig, tuple[str, ...]]:
    """The one zone every audience/resource maps to, and the token's ``aud`` values."""
    targets = request.targets
    if not targets:
        if client.default_zone is None:
            raise InvalidTarget("name an audience or resource (this client has no default_zone)")
        zone = zones[client.default_zone]
        return zone, (zone.audiences + zone.resources)[:1]
    selected = {t: index.get(t) for t in targets}
    unknown = [t for t, z in selected.items() if z is None]
    if unknown:
        raise InvalidTarget(f"no zone accepts audience/resource {quoted(unknown[0])}")
    names = {z.name for z in selected.values() if z is not None}
    if len(names) > 1:
        raise InvalidTarget(
            f"audience/resource values select different zones: {', '.join(sorted(names))}"
        )
    zone = zones[names.pop()]
    return zone, tuple(dict.fromkeys(targets))


def authorize_zone(client: ClientConfig, zone: ZoneConfig) -> None:
    """The client must be allowed the zone (RFC 6749 §5.2 unauthorized_client)."""
    if zone.name not in client.zones:
        raise UnauthorizedClient(
            f"client {client.client_id} may not obtain tokens for zone {zone.name}"
        )


def subject_scopes(subject: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The scopes a subject token carries: ``scope`` (RFC 8693 §4.2, space-separated), or else
    ``scp`` (a list or a string, as several providers write it); none: ()."""
    if subject is None:
        return ()
    value = subject.get("scope")
    if value is None:
        value = subject.get("scp")
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def grant_scope(
    requested: tuple[str, ...] | None,
    zone: ZoneConfig,
    client: ClientConfig,
    subject: Mapping[str, Any] | None = None,
) -> tuple[str, ...]:
    """requested ∩ zone ∩ client (∩ the subject's own scopes, for a client with
    ``subject_scope: intersect``); anything requested outside that is invalid_scope."""
    allowed = [s for s in zone.scopes if s in client.scopes]
    if client.subject_scope == "intersect":
        held = set(subject_scopes(subject))
        beyond = [s for s in requested or () if s in allowed and s not in held]
        if beyond:
            raise InvalidScope(
                f"scope {quoted(beyond[0])} is not among the subject token's own scopes "
                f"(client {client.client_id} has subject_scope: intersect)"
            )
        allowed = [s for s in allowed if s in held]
    if requested is None:
        return tuple(allowed)
    outside = [s for s in requested if s not in allowed]
    if outside:
        raise InvalidScope(
            f"scope {quoted(outside[0])} cannot be granted to client {client.client_id} in zone {zone.name}"
        )
    return requested


def check_subject_audience(client: ClientConfig, subject: Mapping[str, Any]) -> None:
    """A client may be limited to subject tokens issued to it (its ``subject_audiences``)."""
    if client.subject_audiences is None:
        return
    if not set(audiences_of(subject)) & set(client.subject_audiences):
        raise InvalidRequest(
            f"subject_token aud is not one that client {client.client_id} may present"
        )


def lifetime(zone: ZoneConfig, subject: Mapping[str, Any], now: float) -> int:
    """min(zone lifetime, the subject's remaining lifetime): a token never outlives its subject."""
    remaining = int(float(subject["exp"]) - now)
    if remaining <= 0:
        raise InvalidRequest("subject_token expires now; nothing left to exchange")
    return min(zone.token_lifetime, remaining)


def map_claims(zone: ZoneConfig, subject: Mapping[str, Any]) -> dict[str, Any]:
    """``sub`` from the configured claim, the copy list, nothing else."""
    sub = subject.get(zone.claims.sub)
    if not isinstance(sub, str) or not sub:
        raise InvalidRequest(f"subject_token has no string {zone.claims.sub} claim to use as sub")
    claims: dict[str, Any] = {"sub": sub}
    claims.update({name: subject[name] for name in zone.claims.copy if name in subject})
    return claims


def prior_actors(subject: Mapping[str, Any]) -> dict[str, Any] | None:
    """The subject token's own ``act`` chain (earlier delegations), checked, or None."""
    prior = subject.get("act")
    if prior is None:
        return None
    if not isinstance(prior, dict):
        raise InvalidRequest("subject_token act claim must be an object")
    if _chain_depth(prior) > MAX_ACTOR_CHAIN:
        raise InvalidRequest(f"delegation chain deeper than {MAX_ACTOR_CHAIN} actors")
    return prior


def delegate(subject: Mapping[str, Any], actor: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The ``act`` claim (RFC 8693 §4.1): the current actor outermost, the subject token's
    prior actors nested inside it; without an actor token, the subject's chain is kept."""
    prior = prior_actors(subject)
    if actor is None:
        return prior
    _check_may_act(subject, actor)
    if not isinstance(actor.get("sub"), str):
        raise InvalidRequest("actor_token has no sub claim")
    act: dict[str, Any] = {"sub": actor["sub"], "iss": actor.get("iss")}
    if prior is not None:
        if _chain_depth(prior) >= MAX_ACTOR_CHAIN:
            raise InvalidRequest(f"delegation chain deeper than {MAX_ACTOR_CHAIN} actors")
        act["act"] = prior
    return act


def _chain_depth(act: Mapping[str, Any]) -> int:
    depth = 0
    node: Any = act
    while isinstance(node, dict):
        depth += 1
        if depth > MAX_ACTOR_CHAIN:
            break
        node = node.get("act")
    return depth


def _check_may_act(subject: Mapping[str, Any], actor: Mapping[str, Any]) -> None:
    """RFC 8693 §4.4: when the subject says who may act for it, the actor must be that party."""
    may_act = subject.get("may_act")
    if may_act is None:
        return
    if not isinstance(may_act, dict) or not may_act:
        raise InvalidRequest("subject_token may_act claim must be a non-empty object")
    for name, value in may_act.items():
        if actor.get(name) != value:
            raise InvalidRequest(f"actor_token is not admitted by the subject's may_act ({name})")


def decide(
    request: TokenExchangeRequest,
    client: ClientConfig,
    config: ExchangeConfig,
    index: Mapping[str, ZoneConfig],
    subject: Mapping[str, Any],
    actor: Mapping[str, Any] | None,
    now: float,
) -> Decision:
    """The whole policy decision for verified subject (and actor) claims."""
    check_subject_audience(client, subject)
    zone, audience = select_zone(request, client, index, config.zones)
    authorize_zone(client, zone)
    return Decision(
        zone=zone,
        audience=audience,
        scope=grant_scope(request.scope, zone, client, subject),
        lifetime=lifetime(zone, subject, now),
        claims=map_claims(zone, subject),
        act=delegate(subject, actor),
    )
