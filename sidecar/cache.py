"""The token cache: exchanged tokens by (SHA-256 of the subject token, target, exchange).

* An entry is served until ``min(exchanged exp, subject exp) - expiry_skew`` and never after
  (``TimedLRU`` checks the expiry against the injected clock on every read).
* At most ``max_entries`` entries; the least recently used goes first.
* Concurrent misses on one key share one exchange (single-flight).
* Refresh-ahead: a hit past ``refresh_ahead`` of the entry's life (jittered per entry) starts
  one background exchange, so a hot token never expires under load. Entries already bound by
  the subject's own ``exp`` are not refreshed: a new exchange could not outlive them.
* A subject refused by the exchange (``invalid_request``) is remembered for ``negative_ttl``
  seconds, so a client retrying a bad token does not hammer the core. What is remembered is
  the answer only (``Refusal``: until, code, description), never the exception: its
  traceback's frames hold the raw subject token and its decoded claims (some 30 KB per bogus
  14 KB token), and re-raising one stored exception grows its traceback on every request.
* A config reload hands the entries over (``adopt``): every entry whose route target and
  exchange identity the new config still has is kept; the others are dropped and counted as
  evictions with reason ``reload``.

Raw tokens are never keys: a key holds the subject token's SHA-256 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from exchange.errors import ExchangeError, InvalidRequest, error_from_code
from sidecar.config import CacheSettings, Target

log = logging.getLogger("zonegate.sidecar.cache")

Clock = Callable[[], float]
CacheEvent = Callable[[str], None]  # a lookup: hit | miss | coalesced
Eviction = Callable[
    [str, int], None
]  # (reason, how many): expired | capacity | upstream_401 | reload
Fetch = Callable[[], Awaitable["Issued"]]
JITTER = 0.1  # refresh-ahead point moves by up to this fraction of the entry's life
MAX_REFUSAL_DESCRIPTION = 256  # a remote endpoint's description is kept to this many characters


class CacheKey(NamedTuple):
    """What one exchanged token is good for. (A named tuple: made on every request, it costs
    a fifth of a frozen dataclass.)"""

    subject_sha256: str
    target: Target
    exchange: str

    @classmethod
    def of(cls, subject_token: str, target: Target, exchange: str) -> CacheKey:
        return cls(hashlib.sha256(subject_token.encode()).hexdigest(), target, exchange)


@dataclass(frozen=True, slots=True)
class Issued:
    """An exchanged token and the absolute times it and its subject stop being valid."""

    access_token: str = field(repr=False)
    expires_at: float
    subject_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    access_token: str = field(repr=False)
    serve_until: float
    refresh_at: float

    @property
    def until(self) -> float:
        return self.serve_until


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused subject's answer, as the negative cache keeps it (no exception, no frames)."""

    until: float
    error: str
    description: str

    @classmethod
    def of(cls, e: ExchangeError, until: float) -> Refusal:
        return cls(until, e.error, e.description[:MAX_REFUSAL_DESCRIPTION])

    def again(self) -> ExchangeError:
        """A fresh error to raise: nothing of the first refusal's frames comes with it."""
        return error_from_code(self.error, self.description)


class _Timed(Protocol):
    @property
    def until(self) -> float: ...


V = TypeVar("V", bound=_Timed)


class TimedLRU(Generic[V]):
    """At most ``maxsize`` values, each until its ``until`` on ``clock`` (gone from that moment
    on), the least recently used dropped first: a hit is one dictionary lookup and a move.

    Expired values are dropped by every insertion and by ``expire`` (a heap of their times),
    and a read never returns one; ``on_evict`` hears of each drop: ``expired`` or
    ``capacity``.
    """

    def __init__(self, maxsize: int, clock: Clock, on_evict: Eviction | None = None) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._on_evict = on_evict or (lambda reason, count: None)
        self._data: OrderedDict[CacheKey, V] = OrderedDict()
        self._expiries: list[tuple[float, int, CacheKey]] = []  # (until, order, key): a heap
        self._order = itertools.count()

    def get(self, key: CacheKey, now: float) -> V | None:
        value = self._data.get(key)
        if value is None:
            return None
        if now >= value.until:
            self.expire(now)
            return None
        self._data.move_to_end(key)
        return value

    def __getitem__(self, key: CacheKey) -> V:
        value = self.get(key, self._clock())
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: CacheKey, value: V) -> None:
        self.expire()
        self._data[key] = value
        self._data.move_to_end(key)
        heapq.heappush(self._expiries, (value.until, next(self._order), key))
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
            self._on_evict("capacity", 1)

    def pop(self, key: CacheKey) -> V | None:
        return self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def __bool__(self) -> bool:
        return bool(self._data)

    def items(self) -> Iterator[tuple[CacheKey, V]]:
        return iter(list(self._data.items()))

    def expire(self, now: float | None = None) -> None:
        """Drop every value whose time has come."""
        now = self._clock() if now is None else now
        heap, data, dropped = self._expiries, self._data, 0
        while heap and heap[0][0] <= now:
            _, _, key = heapq.heappop(heap)
            value = data.get(key)
            if value is not None and value.until <= now:  # else replaced by a later one
                del data[key]
                dropped += 1
        if len(heap) > 2 * len(data) + 64:  # times of replaced or popped values: rebuild
            self._expiries = [(v.until, next(self._order), k) for k, v in data.items()]
            heapq.heapify(self._expiries)
        if dropped:
            self._on_evict("expired", dropped)


class TokenCache:
    """Exchanged tokens, served until shortly before they (or their subject) expire."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        clock: Clock,
        on_event: CacheEvent | None = None,
        on_evict: Eviction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_event = on_event or (lambda result: None)
        self._on_evict = on_evict or (lambda reason, count: None)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._store: TimedLRU[Entry] = TimedLRU(settings.max_entries, clock, self._on_evict)
        self._refused: TimedLRU[Refusal] = TimedLRU(settings.max_entries, clock)
        self._flights: dict[CacheKey, asyncio.Future[Issued]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        self._store.expire()
        return len(self._store)

    def cached(self, key: CacheKey, fetch: Fetch) -> str | None:
        """The token for ``key`` if one is cached (a hit, counted), without waiting; None when
        ``get`` must fetch it. A remembered refusal raises; ``fetch`` serves a refresh-ahead."""
        now = self._clock()
        if self._refused:
            refused = self._refused.get(key, now)
            if refused is not None:
                raise refused.again()
        entry = self._store.get(key, now)
        if entry is None:
            return None
        self._on_event("hit")
        if now >= entry.refresh_at:
            self._refresh(key, fetch)
        return entry.access_token

    async def get(self, key: CacheKey, fetch: Fetch) -> str:
        """The token for ``key``: cached, shared with a concurrent miss, or freshly fetched."""
        token = self.cached(key, fetch)
        if token is not None:
            return token
        if key in self._flights:
            self._on_event("coalesced")
            issued = await asyncio.shield(self._flights[key])
        else:
            self._on_event("miss")
            issued = await asyncio.shield(self._fly(key, fetch))
        return issued.access_token

    def adopt(self, old: TokenCache, still_made: Callable[[CacheKey], bool]) -> int:
        """Take over ``old``'s entries (and remembered refusals) that ``still_made`` says this
        config can still produce; the rest are counted as ``reload`` evictions. Returns how many
        entries were kept."""
        old._store.expire()
        kept = dropped = 0
        for key, entry in old._store.items():
            if still_made(key):
                self._store[key] = entry
                kept += 1
            else:
                dropped += 1
        for key, refusal in old._refused.items():
            if still_made(key):
                self._refused[key] = refusal
        if dropped:
            self._on_evict("reload", dropped)
        return kept

    def evict(self, key: CacheKey) -> None:
        """Drop an entry an upstream refused, so the next request exchanges afresh."""
        if self._store.pop(key) is not None:
            self._on_evict("upstream_401", 1)

    async def close(self) -> None:
        """Cancel background refreshes."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def _fly(self, key: CacheKey, fetch: Fetch) -> asyncio.Future[Issued]:
        """Start the one exchange for ``key``; every waiter shares its result."""
        future = asyncio.ensure_future(self._fetch_and_store(key, fetch))
        self._flights[key] = future
        future.add_done_callback(lambda _f: self._flights.pop(key, None))
        # A waiter may be cancelled (client gone); the flight's error must not go unobserved.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _fetch_and_store(self, key: CacheKey, fetch: Fetch) -> Issued:
        try:
            issued = await fetch()
        except InvalidRequest as e:
            self._refused[key] = Refusal.of(e, self._clock() + self.settings.negative_ttl)
            raise
        self._store_issued(key, issued)
        return issued

    def _store_issued(self, key: CacheKey, issued: Issued) -> None:
        now = self._clock()
        skew = self.settings.expiry_skew
        exchanged_until = issued.expires_at - skew
        subject_until = (
            float("inf") if issued.subject_expires_at is None else issued.subject_expires_at - skew
        )
        serve_until = min(exchanged_until, subject_until)
        if serve_until <= now:
            self._store.pop(key)
            return  # usable for this request only
        refresh_at = float("inf")
        if exchanged_until < subject_until:  # a new exchange would outlive this one
            life = serve_until - now
            fraction = self.settings.refresh_ahead - self._rng.uniform(0, JITTER)
            refresh_at = now + max(fraction, 0.0) * life
        self._store[key] = Entry(issued.access_token, serve_until, refresh_at)

    def _refresh(self, key: CacheKey, fetch: Fetch) -> None:
        if key in self._flights:
            return
        task = asyncio.ensure_future(self._refresh_quietly(self._fly(key, fetch)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _refresh_quietly(flight: asyncio.Future[Issued]) -> None:
        try:
            await flight
        except ExchangeError as e:
            log.info(
                "refresh-ahead exchange failed (%s); the entry serves until it expires", e.error
            )
