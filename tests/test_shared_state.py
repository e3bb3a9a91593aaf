"""Shared state: jti replay and token buckets, in memory and in a real redis-server."""

from __future__ import annotations

import hashlib
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import exchange.server as _server

if not hasattr(_server, "__path__"):
    # Until exchange/server.py moves into the exchange/server/ package, let the new module
    # under exchange/server/ import by its final name. Harmless (and unused) afterwards.
    setattr(_server, "__path__", [str(Path(_server.__file__).with_suffix(""))])  # noqa: B010

from exchange.config import RateLimit
from exchange.ratelimit import TokenBucket
from exchange.server.sharedstate import (
    MemoryState,
    RedisState,
    SharedState,
    SharedStateUnavailable,
    redacted,
)
from tests.logchecks import register_secret
from tests.redisproc import RedisFactory, RedisProcess, redis_factory  # noqa: F401

FAIL_FAST = 2.0  # seconds: a dead Redis must not hold a token request longer than this


@pytest.fixture
def redis(redis_factory: RedisFactory) -> RedisProcess:  # noqa: F811
    return redis_factory()


@pytest.fixture
async def states(redis: RedisProcess) -> AsyncIterator[Callable[[], Awaitable[RedisState]]]:
    """Started RedisState objects on the one ``redis`` (replicas); closed after the test."""
    made: list[RedisState] = []

    async def make() -> RedisState:
        state = RedisState(redis.url)
        made.append(state)
        await state.start()
        return state

    yield make
    for state in made:
        await state.close()


@pytest.fixture(params=["memory", "redis"])
async def state(
    request: pytest.FixtureRequest, states: Callable[[], Awaitable[RedisState]]
) -> AsyncIterator[SharedState]:
    """Each backend behind the one protocol."""
    if request.param == "redis":
        yield await states()
        return
    memory = MemoryState()
    await memory.start()
    yield memory
    await memory.close()


# --- both backends ---------------------------------------------------------------------------


async def test_a_jti_is_first_use_once(state: SharedState) -> None:
    """RFC 7523 §3: the same jti is accepted once; another jti or client is its own."""
    now = time.time()
    assert await state.first_use("client-a", "jti-1", now + 60, now)
    assert not await state.first_use("client-a", "jti-1", now + 60, now)
    assert await state.first_use("client-a", "jti-2", now + 60, now)
    assert await state.first_use("client-b", "jti-1", now + 60, now)


async def test_a_jti_is_forgotten_when_it_expires(state: SharedState) -> None:
    """A jti is remembered until expires_at, and no longer."""
    now = time.time()
    assert await state.first_use("client-a", "short", now + 0.3, now)
    assert not await state.first_use("client-a", "short", now + 0.3, now + 0.1)
    time.sleep(0.45)  # Redis expires by its own (real) clock
    later = now + 0.45
    assert await state.first_use("client-a", "short", later + 0.3, later)


async def test_a_long_jti_is_fine(state: SharedState) -> None:
    now = time.time()
    jti = "x" * 10_000
    assert await state.first_use("client-a", jti, now + 60, now)
    assert not await state.first_use("client-a", jti, now + 60, now)


async def test_a_bucket_starts_full_at_burst_and_refills_at_rate(state: SharedState) -> None:
    """Burst 3, 2/s: three at once, then one token every half second."""
    now = 1_900_000_000.0
    assert [await state.take("c", 2.0, 3, now) for _ in range(4)] == [True] * 3 + [False]
    assert not await state.take("c", 2.0, 3, now + 0.25)
    assert await state.take("c", 2.0, 3, now + 0.5)
    assert not await state.take("c", 2.0, 3, now + 0.5)
    # Long idle: full again, but never more than burst.
    assert [await state.take("c", 2.0, 3, now + 100) for _ in range(4)] == [True] * 3 + [False]
    assert await state.take("other", 2.0, 3, now + 100)


async def test_a_clock_that_goes_back_does_not_refill(state: SharedState) -> None:
    now = 1_900_000_000.0
    assert await state.take("c", 1.0, 1, now)
    assert not await state.take("c", 1.0, 1, now - 50)
    assert not await state.take("c", 1.0, 1, now + 0.5)
    assert await state.take("c", 1.0, 1, now + 1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
async def test_a_bucket_needs_a_rate_and_a_burst(
    state: SharedState, rate: float, burst: int
) -> None:
    with pytest.raises(ValueError, match="token bucket"):
        await state.take("c", rate, burst, 1.0)


async def test_buckets_decide_as_the_in_process_rate_limiter_does(state: SharedState) -> None:
    """Over a random request sequence, each backend answers as exchange.ratelimit's bucket."""
    rng = random.Random(8693)
    for rate, burst in [(2.5, 4), (0.5, 1), (10.0, 20)]:
        limit = RateLimit(rate=rate, burst=burst)
        now = 1_900_000_000.0
        reference = TokenBucket(limit, float(burst), now)
        bucket = f"seq-{rate}-{burst}"
        for step in range(300):
            now += rng.choice([0.0, 0.0, 0.01, 0.05, 0.1, 0.4, 1.3])
            expected = reference.take(now) == 0.0
            assert await state.take(bucket, rate, burst, now) == expected, (rate, burst, step)


async def test_memory_state_refuses_rather_than_forget_a_live_jti() -> None:
    """Full of live jtis: fail closed (SharedStateUnavailable), never drop one."""
    state = MemoryState(max_jtis=2)
    now = 1_900_000_000.0
    assert await state.first_use("c", "1", now + 10, now)
    assert await state.first_use("c", "2", now + 10, now)
    with pytest.raises(SharedStateUnavailable, match="live jtis"):
        await state.first_use("c", "3", now + 10, now)
    assert await state.first_use("c", "3", now + 30, now + 11)  # the others expired
    assert not await state.first_use("c", "3", now + 30, now + 12)


async def test_memory_state_bounds_its_buckets() -> None:
    state = MemoryState(max_buckets=2)
    for name in ("a", "b", "c"):
        assert await state.take(name, 1.0, 1, 1.0)
    assert not await state.take("c", 1.0, 1, 1.0)
    assert await state.take("a", 1.0, 1, 1.0)  # forgotten (least recently used): full again


# --- Redis: shared by replicas and restarts --------------------------------------------------


async def test_a_jti_stays_used_when_the_replica_restarts(
    states: Callable[[], Awaitable[RedisState]],
) -> None:
    now = time.time()
    first = await states()
    assert await first.first_use("client-a", "jti-1", now + 60, now)
    await first.close()
    again = await states()
    assert not await again.first_use("client-a", "jti-1", now + 60, now)


async def test_replicas_share_jtis_and_buckets(
    states: Callable[[], Awaitable[RedisState]],
) -> None:
    """Two RedisState objects on one Redis: a jti used on one is used on the other, and one
    bucket's burst is spent across both."""
    one, two = await states(), await states()
    now = time.time()
    assert await one.first_use("client-a", "jti-1", now + 60, now)
    assert not await two.first_use("client-a", "jti-1", now + 60, now)
    assert await two.first_use("client-a", "jti-2", now + 60, now)
    assert not await one.first_use("client-a", "jti-2", now + 60, now)
    assert await one.take("client-a", 1.0, 2, now)
    assert await two.take("client-a", 1.0, 2, now)
    assert not await one.take("client-a", 1.0, 2, now)
    assert not await two.take("client-a", 1.0, 2, now)


async def test_keys_are_prefixed_hashed_and_expire(redis: RedisProcess) -> None:
    """<prefix>jti:<namespace>:<sha256 of jti> with the jti's TTL; buckets vanish when idle."""
    state = RedisState(redis.url, key_prefix="zg-test:")
    raw = aioredis.Redis.from_url(redis.url)
    try:
        now = time.time()
        assert await state.first_use("client-a", "jti-1", now + 30, now)
        assert await state.take("client-a", 2.0, 4, now)
        keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*"))
        jti_key = f"zg-test:jti:client-a:{hashlib.sha256(b'jti-1').hexdigest()}"
        assert keys == ["zg-test:bucket:client-a", jti_key]
        assert 29_000 < await raw.pttl(jti_key) <= 30_000
        assert 0 < await raw.pttl("zg-test:bucket:client-a") <= 3_000  # burst/rate + 1 s
        other = RedisState(redis.url, key_prefix="zg-other:")
        assert await other.first_use("client-a", "jti-1", now + 30, now)  # prefixes don't mix
        await other.close()
    finally:
        await state.close()
        await raw.aclose()


# --- Redis down, and back ---------------------------------------------------------------------


async def test_a_dead_redis_fails_fast_and_a_restarted_one_works_again(
    redis: RedisProcess, states: Callable[[], Awaitable[RedisState]]
) -> None:
    """Killed: every operation raises SharedStateUnavailable within 2 s. Restarted on the same
    port: the same object works again (script re-loaded, connections re-made)."""
    state = await states()
    now = time.time()
    assert await state.take("c", 1.0, 5, now)
    redis.stop(signal.SIGKILL)
    for call in (
        state.start,
        lambda: state.first_use("c", "jti-1", now + 60, now),
        lambda: state.take("c", 1.0, 5, now),
    ):
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable, match=r"redis redis://127\.0\.0\.1:\d+/0"):
            await call()
        assert time.monotonic() - started < FAIL_FAST
    redis.start()
    assert await state.first_use("c", "jti-1", now + 60, now)
    assert not await state.first_use("c", "jti-1", now + 60, now)
    assert await state.take("c", 1.0, 5, now)  # Redis forgot the script (EVALSHA → EVAL)
    await state.start()


async def test_start_fails_fast_when_nothing_listens() -> None:
    from tests.redisproc import free_port

    state = RedisState(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(SharedStateUnavailable):
        await state.start()
    assert time.monotonic() - started < FAIL_FAST
    await state.close()


async def test_the_url_password_never_appears_in_an_error(redis_factory: RedisFactory) -> None:  # noqa: F811
    """Wrong password, right password then Redis gone: the message names Redis, not the secret."""
    password = "s3cret-redis-password-2f9c"
    register_secret(password)
    server = redis_factory(password=password)
    good = RedisState(server.url)
    await good.start()
    wrong = RedisState(server.url.replace(password, "not-the-password-7d1e"))
    messages: list[str] = []
    with pytest.raises(SharedStateUnavailable) as refused:
        await wrong.start()
    messages.append(str(refused.value))
    server.stop(signal.SIGKILL)
    now = time.time()
    for call in (good.start, lambda: good.first_use("c", "j", now + 9, now)):
        with pytest.raises(SharedStateUnavailable) as down:
            await call()
        messages.append(str(down.value))
    for message in messages:
        assert password not in message and "not-the-password" not in message, message
        assert f"redis://127.0.0.1:{server.port}/0" in message, message
    await good.close()
    await wrong.close()


def test_redacted_drops_user_and_password() -> None:
    assert redacted("rediss://user:pw@redis.example:6380/2") == "rediss://redis.example:6380/2"
    assert redacted("redis://:pw@[::1]:6379/0") == "redis://[::1]:6379/0"
    assert redacted("redis://h") == "redis://h"


def test_bad_urls_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        RedisState("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="rediss://"):
        RedisState("redis://127.0.0.1:6379/0", ssl_ca_file="/etc/ssl/ca.pem")
