"""Keys of trusted issuers: OIDC discovery then ``jwks_uri``, cached, refetched on an unknown kid.

Sans-IO: the documents come from an injected ``Fetcher`` (the server's is aiohttp, never
pyjwt's blocking ``PyJWKClient``) and time from an injected clock; the JWKS dict goes to
``PyJWK``. Rules:

* keys are fresh for the response's ``Cache-Control: max-age`` (bounded), then refreshed;
* an unknown ``kid`` triggers one refetch, at most every ``min_refresh`` seconds per issuer,
  so a flood of random kids cannot become a flood of fetches;
* if the issuer is unreachable, keys already held keep working for ``stale_for`` seconds;
* a failed fetch with nothing held fails at once with ``TemporarilyUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from exchange.config import ExchangeConfig
from exchange.errors import InvalidRequest, TemporarilyUnavailable
from exchange.keys import verification_key
from exchange.metadata import openid_configuration_url

log = logging.getLogger("zonegate.issuers")

MIN_MAX_AGE = 60
FetchObserver = Callable[[str, str], None]  # (issuer, outcome) -> None
Clock = Callable[[], float]


class Fetcher(Protocol):
    """Gets a JSON document and its Cache-Control; raises FetchFailed."""

    async def __call__(self, url: str) -> tuple[dict[str, Any], str | None]: ...

    async def close(self) -> None: ...


class FetchFailed(Exception):
    """A discovery or JWKS document could not be had; the message says why."""


def max_age(cache_control: str | None, default: int, upper: int) -> int:
    """Seconds a document stays fresh per its Cache-Control, within [min(60, upper), upper].

    ``upper`` (``jwks_max_age``) always wins: held keys must be refreshed before they age past
    ``jwks_max_age + jwks_stale_for``, or they would stop working while the issuer is up.
    """
    floor = min(MIN_MAX_AGE, upper)
    if cache_control:
        if re.search(r"\bno-(cache|store)\b", cache_control):
            return floor
        m = re.search(r"\bmax-age=(\d+)", cache_control)
        if m:
            return max(floor, min(int(m.group(1)), upper))
    return min(default, upper)


@dataclass
class _Held:
    keys: dict[str, jwt.PyJWK]
    fetched_at: float
    fresh_until: float


class IssuerKeys:
    """The signing keys of one issuer, fetched through discovery (or a configured jwks_uri)."""

    def __init__(
        self,
        issuer: str,
        fetch: Fetcher,
        *,
        clock: Clock,
        jwks_uri: str | None = None,
        min_refresh: float = 10.0,
        max_age: int = 3600,
        stale_for: int = 86400,
        observe: FetchObserver | None = None,
    ) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._jwks_uri = jwks_uri
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._stale_for = stale_for
        self._observe = observe
        self._clock = clock
        self._held: _Held | None = None
        self._last_attempt: float | None = None
        self._inflight: asyncio.Future[None] | None = None
        self.last_error: str | None = None

    @classmethod
    def for_config(
        cls,
        issuer: str,
        fetch: Fetcher,
        config: ExchangeConfig,
        *,
        clock: Clock,
        jwks_uri: str | None = None,
        observe: FetchObserver | None = None,
    ) -> IssuerKeys:
        """Keys of ``issuer`` with the refetch and staleness bounds of an exchange config."""
        return cls(
            issuer,
            fetch,
            clock=clock,
            jwks_uri=jwks_uri,
            min_refresh=config.jwks_min_refresh,
            max_age=config.jwks_max_age,
            stale_for=config.jwks_stale_for,
            observe=observe,
        )

    @property
    def held(self) -> int:
        """How many keys are held now."""
        return len(self._held.keys) if self._held else 0

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The verification key for ``kid`` (None: the issuer's only key), fetching if needed."""
        now = self._clock()
        held = self._held
        if held is None or now >= held.fresh_until:
            await self._refresh(force=held is None)
        elif self._lookup(kid) is None and self._may_refetch(now):
            await self._refresh(force=False)
        return self._require(kid)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if self._held is None:
            return None
        if kid is None:
            return next(iter(self._held.keys.values())) if len(self._held.keys) == 1 else None
        return self._held.keys.get(kid)

    def _require(self, kid: str | None) -> jwt.PyJWK:
        held = self._held
        if held is None or self._clock() > held.fetched_at + self._max_age + self._stale_for:
            raise TemporarilyUnavailable(
                f"signing keys of issuer {self.issuer} cannot be fetched: {self.last_error}",
                retry_after=max(1, int(self._min_refresh)),
            )
        key = self._lookup(kid)
        if key is not None:
            return key
        if kid is None:
            raise InvalidRequest("token header has no kid and the issuer has more than one key")
        if self.last_error:  # the issuer may have rotated while we cannot reach it
            raise TemporarilyUnavailable(
                f"token signed with a key (kid) issuer {self.issuer} did not publish when last "
                f"reached, and refetching its keys failed: {self.last_error}",
                retry_after=max(1, int(self._min_refresh)),
            )
        raise InvalidRequest(
            f"token signed with a key (kid) that issuer {self.issuer} does not publish"
        )

    def _may_refetch(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self._min_refresh

    async def _refresh(self, *, force: bool) -> None:
        """One fetch at a time; concurrent callers wait for it (single-flight)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        if not force and not self._may_refetch(self._clock()):
            return
        if force and self._held is None and not self._may_refetch(self._clock()):
            return  # nothing held and a fetch just failed: fail fast, don't hammer
        self._inflight = asyncio.get_running_loop().create_future()
        try:
            await self._fetch_keys()
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    async def _fetch_keys(self) -> None:
        self._last_attempt = self._clock()
        try:
            jwks_uri = self._jwks_uri or await self._discover()
            document, cache_control = await self._fetch(jwks_uri)
            keys = parse_jwks(document)
        except FetchFailed as e:
            self.last_error = str(e)
            log.warning("issuer %s: key fetch failed: %s", self.issuer, e)
            self._count("error")
            return
        now = self._clock()
        fresh = max_age(cache_control, self._max_age, self._max_age)
        self._held = _Held(keys, now, now + fresh)
        self.last_error = None
        self._count("ok")

    async def _discover(self) -> str:
        url = openid_configuration_url(self.issuer)
        document, _ = await self._fetch(url)
        if document.get("issuer") != self.issuer:
            raise FetchFailed(
                f"discovery document at {url} names issuer {document.get('issuer')!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("http://", "https://")):
            raise FetchFailed(f"discovery document at {url} has no usable jwks_uri")
        self._jwks_uri = jwks_uri
        return jwks_uri

    def _count(self, outcome: str) -> None:
        if self._observe is not None:
            self._observe(self.issuer, outcome)


def parse_jwks(document: dict[str, Any]) -> dict[str, jwt.PyJWK]:
    """The keys of a JWKS that may verify signatures, by kid (``keys.verification_key`` says
    which may). A kid listed more than once is refused whole, every entry of it, with a
    warning: a key planted under a genuine kid must not shadow the genuine key, and guessing
    which of the two is genuine would be exactly that."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise FetchFailed("JWKS document has no keys list")
    out: dict[str, jwt.PyJWK] = {}
    listed: dict[str, int] = {}
    skipped: list[str] = []
    for i, jwk in enumerate(keys):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        name = kid if isinstance(kid, str) else f"#{i}"
        if isinstance(kid, str):
            listed[kid] = listed.get(kid, 0) + 1
        try:
            key = verification_key(jwk)
        except ValueError as e:
            skipped.append(f"{name[:64]}: {e}")
            continue
        out[name] = key
    for kid, count in listed.items():
        if count > 1:
            out.pop(kid, None)
            log.warning(
                "JWKS lists a kid more than once: none of its keys is used",
                extra={"kid": kid[:64], "entries": count},
            )
    if skipped:
        log.info("JWKS keys skipped", extra={"skipped": skipped[:16]})
    if not out:
        reasons = "; ".join(skipped[:4]) or "duplicate kids only"
        raise FetchFailed(f"JWKS document has no usable signature keys ({reasons})")
    return out
