"""The token cache on a fake clock: expiry, skew, LRU bound, single-flight, refresh-ahead."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import random
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

import pytest

from exchange.errors import InvalidRequest, TemporarilyUnavailable
from sidecar.cache import CacheKey, Issued, TokenCache
from sidecar.config import CacheSettings, Target

T0 = 1_900_000_000.0
RED = Target(audience=("billing",))


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Exchange:
    """Hands out numbered tokens valid for ``lifetime`` seconds, counting calls."""

    clock: FakeClock
    lifetime: float = 300
    subject_exp: float | None = None
    calls: int = 0
    gate: asyncio.Event | None = None
    fail: Exception | None = None

    async def __call__(self) -> Issued:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Issued(f"zone-{self.calls}", self.clock.now + self.lifetime, self.subject_exp)


class EventCounter(Counter[str]):
    def update_one(self, result: str) -> None:
        self[result] += 1


class EvictionCounter(Counter[str]):
    def update_one(self, reason: str, count: int) -> None:
        self[reason] += count


@dataclass
class Harness:
    clock: FakeClock = field(default_factory=FakeClock)
    events: EventCounter = field(default_factory=EventCounter)
    evictions: EvictionCounter = field(default_factory=EvictionCounter)

    def cache(self, **settings: float) -> TokenCache:
        return TokenCache(
            CacheSettings(**settings),  # type: ignore[arg-type]
            clock=self.clock,
            on_event=self.events.update_one,
            on_evict=self.evictions.update_one,
            rng=random.Random(7),
        )


@pytest.fixture
def h() -> Harness:
    return Harness()


KEY = CacheKey.of("subject-token-1", RED, "embedded:shop")


async def test_hits_until_exp_minus_skew_then_exchanges_again(h: Harness) -> None:
    """An entry is served until exp - expiry_skew and never a second later."""
    cache, exchange = h.cache(expiry_skew=30, refresh_ahead=1.0), Exchange(h.clock, lifetime=300)
    assert await cache.get(KEY, exchange) == "zone-1"
    h.clock.now = T0 + 269.9
    assert await cache.get(KEY, exchange) == "zone-1"
    h.clock.now = T0 + 270
    assert await cache.get(KEY, exchange) == "zone-2"
    assert exchange.calls == 2


async def test_never_served_past_the_subject_exp(h: Harness) -> None:
    """A subject expiring before the exchanged token bounds the entry (minus skew)."""
    cache = h.cache(expiry_skew=30)
    exchange = Exchange(h.clock, lifetime=300, subject_exp=T0 + 100)
    await cache.get(KEY, exchange)
    h.clock.now = T0 + 69
    assert await cache.get(KEY, exchange) == "zone-1"
    h.clock.now = T0 + 70
    assert await cache.get(KEY, exchange) == "zone-2"


async def test_token_within_skew_is_used_once_not_cached(h: Harness) -> None:
    """A token expiring within the skew serves its own request but is never cached."""
    cache, exchange = h.cache(expiry_skew=30), Exchange(h.clock, lifetime=20)
    assert await cache.get(KEY, exchange) == "zone-1"
    assert await cache.get(KEY, exchange) == "zone-2"
    assert len(cache) == 0


async def test_keys_separate_subjects_targets_and_exchanges(h: Harness) -> None:
    """Another subject, target or exchange never gets someone else's token."""
    cache, exchange = h.cache(), Exchange(h.clock)
    keys = [
        KEY,
        CacheKey.of("subject-token-2", RED, "embedded:shop"),
        CacheKey.of("subject-token-1", Target(audience=("orders",)), "embedded:shop"),
        CacheKey.of("subject-token-1", Target(audience=("billing",), scope=("billing:read",)), "embedded:shop"),
        CacheKey.of("subject-token-1", RED, "remote:http://tx:other"),
    ]  # fmt: skip
    tokens = [await cache.get(k, exchange) for k in keys]
    assert len(set(tokens)) == len(keys)
    assert "subject-token-1" not in repr(KEY)


async def test_lru_bound_evicts_least_recently_used(h: Harness) -> None:
    """max_entries bounds the cache; the least recently used entry goes and is counted."""
    cache, exchange = h.cache(max_entries=2), Exchange(h.clock)
    a, b, c = (CacheKey.of(f"s{i}", RED, "x") for i in range(3))
    await cache.get(a, exchange)
    await cache.get(b, exchange)
    await cache.get(a, exchange)  # a is now the most recent
    await cache.get(c, exchange)  # evicts b
    assert len(cache) == 2
    assert h.evictions == {"capacity": 1}
    calls = exchange.calls
    await cache.get(a, exchange)
    await cache.get(b, exchange)
    assert exchange.calls == calls + 1


async def test_concurrent_misses_share_one_exchange(h: Harness) -> None:
    """200 concurrent first requests for one key make one exchange."""
    cache, exchange = h.cache(), Exchange(h.clock, gate=asyncio.Event())
    waiters = [asyncio.ensure_future(cache.get(KEY, exchange)) for _ in range(200)]
    await asyncio.sleep(0)
    exchange.gate.set()  # type: ignore[union-attr]
    assert set(await asyncio.gather(*waiters)) == {"zone-1"}
    assert exchange.calls == 1
    assert (h.events["miss"], h.events["coalesced"]) == (1, 199)


async def test_concurrent_misses_share_the_failure_and_the_next_call_retries(h: Harness) -> None:
    """A failed shared exchange fails every waiter once; it is not cached (not a refusal)."""
    cache = h.cache()
    exchange = Exchange(h.clock, gate=asyncio.Event(), fail=TemporarilyUnavailable("down"))
    waiters = [asyncio.ensure_future(cache.get(KEY, exchange)) for _ in range(5)]
    await asyncio.sleep(0)
    exchange.gate.set()  # type: ignore[union-attr]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, TemporarilyUnavailable) for r in results)
    exchange.fail, exchange.gate = None, None
    assert await cache.get(KEY, exchange) == "zone-2"


async def test_cancelled_waiter_does_not_cancel_the_shared_exchange(h: Harness) -> None:
    """A client that goes away does not take the exchange others wait for with it."""
    cache, exchange = h.cache(), Exchange(h.clock, gate=asyncio.Event())
    first = asyncio.ensure_future(cache.get(KEY, exchange))
    second = asyncio.ensure_future(cache.get(KEY, exchange))
    await asyncio.sleep(0)
    first.cancel()
    exchange.gate.set()  # type: ignore[union-attr]
    assert await second == "zone-1"


async def test_refused_subject_is_negatively_cached_for_a_few_seconds(h: Harness) -> None:
    """A subject the exchange refused is refused again without asking, for negative_ttl."""
    cache = h.cache(negative_ttl=5)
    exchange = Exchange(h.clock, fail=InvalidRequest("subject_token expired"))
    for _ in range(3):
        with pytest.raises(InvalidRequest):
            await cache.get(KEY, exchange)
    assert exchange.calls == 1
    h.clock.now = T0 + 5
    exchange.fail = None
    assert await cache.get(KEY, exchange) == "zone-2"


def bogus_subject(i: int, size: int = 14_600) -> str:
    """A distinct JWT-shaped subject token of ``size`` characters (the attack used 14.6 KB)."""
    claims = {"sub": f"user-{i}", "pad": "p" * (size * 3 // 4 - 60)}
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJFUzI1NiJ9.{body}.{i:08d}"[:size]


async def refuse(subject_token: str) -> Issued:
    """Refuse as the real path does: frames below hold the raw token and its decoded claims,
    and the refusal is raised from a library error (a chained exception with its own frames)."""
    claims = json.loads(base64.urlsafe_b64decode(subject_token.split(".")[1] + "=="))

    def verify(token: str, decoded: dict[str, object]) -> None:
        try:
            raise ValueError(f"signature mismatch over {len(token)} bytes for {decoded['sub']}")
        except ValueError as e:
            raise InvalidRequest("subject_token signature is invalid") from e

    verify(subject_token, claims)
    raise AssertionError("unreachable")


async def issue(zone_token: str) -> Issued:
    return Issued(zone_token, T0 + 3600, None)


async def bytes_per_entry(cache: TokenCache, entries: int, refused: bool) -> float:
    """Traced memory per entry after ``entries`` distinct misses (refused or cached)."""
    zone_token = "z" * 700  # a real ES256 zone token is 600 to 900 characters
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(entries):
        subject = bogus_subject(i)
        key = CacheKey.of(subject, RED, "embedded:shop")
        if refused:
            with pytest.raises(InvalidRequest):
                await cache.get(key, lambda s=subject: refuse(s))  # type: ignore[misc]
        else:
            await cache.get(key, lambda i=i: issue(f"{zone_token}{i:08d}"))  # type: ignore[misc]
        del subject, key
    gc.collect()
    return (tracemalloc.get_traced_memory()[0] - before) / entries


async def test_a_refused_entry_costs_at_most_twice_a_cached_token(h: Harness) -> None:
    """The negative cache keeps (until, code, description) only, never the exception: its
    traceback's frames hold the raw subject token and its claims (about 32 KiB per entry)."""
    entries = 1500
    tracemalloc.start()
    try:
        cached = await bytes_per_entry(h.cache(max_entries=entries), entries, refused=False)
        refused = await bytes_per_entry(h.cache(max_entries=entries), entries, refused=True)
    finally:
        tracemalloc.stop()
    assert refused <= 2 * cached, f"refused {refused:.0f} B/entry, cached {cached:.0f} B/entry"


async def test_answering_from_the_negative_cache_does_not_grow_memory(h: Harness) -> None:
    """Each answer from the negative cache is a fresh error: re-raising one stored exception
    grew its traceback by a frame per request."""
    cache = h.cache(negative_ttl=60)
    subject = bogus_subject(0)
    key = CacheKey.of(subject, RED, "embedded:shop")
    with pytest.raises(InvalidRequest):
        await cache.get(key, lambda: refuse(subject))
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            with pytest.raises(InvalidRequest) as caught:
                await cache.get(key, lambda: refuse(subject))
            assert caught.value.description == "subject_token signature is invalid"
            del caught
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes after 2000 answers"


async def test_refresh_ahead_replaces_a_hot_entry_before_it_expires(h: Harness) -> None:
    """Past refresh_ahead of its life, a hit is served and one background exchange renews it."""
    cache, exchange = h.cache(expiry_skew=30, refresh_ahead=0.8), Exchange(h.clock, lifetime=130)
    await cache.get(KEY, exchange)  # serve_until T0+100; refresh between T0+70 and T0+80
    h.clock.now = T0 + 69
    assert await cache.get(KEY, exchange) == "zone-1"
    assert exchange.calls == 1
    h.clock.now = T0 + 80
    assert await cache.get(KEY, exchange) == "zone-1"  # served at once, refresh in background
    assert await cache.get(KEY, exchange) == "zone-1"  # no second refresh while one runs
    await asyncio.sleep(0.01)
    assert exchange.calls == 2
    h.clock.now = T0 + 150  # past the first entry's life, within the refreshed one's
    assert await cache.get(KEY, exchange) == "zone-2"
    await cache.close()


async def test_refresh_ahead_point_is_jittered(h: Harness) -> None:
    """Entries made at the same moment refresh at different moments (no thundering herd)."""
    cache = h.cache(expiry_skew=0, refresh_ahead=0.8)
    keys = [CacheKey.of(f"s{i}", RED, "x") for i in range(20)]
    for k in keys:
        await cache.get(k, Exchange(h.clock, lifetime=1000))
    points = {cache._store[k].refresh_at for k in keys}
    assert len(points) > 10
    assert all(T0 + 700 <= p <= T0 + 800 for p in points)


async def test_entry_bound_by_subject_exp_is_not_refreshed(h: Harness) -> None:
    """Refreshing cannot outlive the subject, so an entry bound by it is not refreshed."""
    cache = h.cache(expiry_skew=0, refresh_ahead=0.5)
    exchange = Exchange(h.clock, lifetime=300, subject_exp=T0 + 100)
    await cache.get(KEY, exchange)
    h.clock.now = T0 + 99
    await cache.get(KEY, exchange)
    await asyncio.sleep(0.01)
    assert exchange.calls == 1


async def test_evict_forces_a_fresh_exchange(h: Harness) -> None:
    """An evicted entry (upstream said 401) is exchanged afresh and the eviction counted."""
    cache, exchange = h.cache(), Exchange(h.clock)
    await cache.get(KEY, exchange)
    cache.evict(KEY)
    assert await cache.get(KEY, exchange) == "zone-2"
    assert h.evictions == {"upstream_401": 1}
    assert set(h.events) == {"miss"}  # lookups and evictions are counted apart


async def test_expired_entries_are_counted_as_expired(h: Harness) -> None:
    """An entry that outlived its serve time is dropped and counted with reason expired."""
    cache, exchange = h.cache(expiry_skew=30), Exchange(h.clock, lifetime=100)
    await cache.get(KEY, exchange)
    h.clock.now += 71  # past exp - skew
    assert len(cache) == 0
    assert h.evictions == {"expired": 1}
