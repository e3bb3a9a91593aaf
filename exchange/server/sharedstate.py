"""State the exchange-server replicas share: assertion ids seen, and rate-limit buckets.

``MemoryState`` keeps both in one process. ``RedisState`` keeps them in Redis, so that every
replica (and a restarted one) sees the same ``jti`` set and the same buckets. Any failure to
reach Redis is ``SharedStateUnavailable``; the caller decides whether to fail open or closed.

Times are seconds since the epoch (``time.time()``) on every call: they are compared across
processes and hosts, so a per-process clock such as ``time.monotonic()`` must not be passed.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import math
from collections import OrderedDict
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

MEMORY: Final = "memory"
REDIS: Final = "redis"
_FAILURES: Final = (RedisError, OSError)  # ConnectionError, TimeoutError are both below these

# One token bucket, atomically: refill by elapsed time, take one token if there is one, and
# let the key expire once it would be full again (an idle bucket is the same as no bucket).
# The caller's clock is used, not Redis TIME, so MemoryState and RedisState agree exactly for
# the same calls; a clock that moves back never refills (and never rewinds the stored time).
_TAKE_LUA: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local stored = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(stored[1])
local ts = tonumber(stored[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'ts', string.format('%.17g', ts))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return taken
"""


class SharedStateUnavailable(Exception):
    """The shared state cannot be reached or cannot remember more; the message says why."""


class SharedState(Protocol):
    """Replay and rate-limit state, in this process or shared by every replica."""

    backend: str

    async def start(self) -> None:
        """Reach the store once; raise SharedStateUnavailable when it cannot be reached."""

    async def first_use(self, namespace: str, jti: str, expires_at: float, now: float) -> bool:
        """True iff ``jti`` was not seen in ``namespace``; it is remembered until ``expires_at``."""

    async def take(self, bucket: str, rate: float, burst: int, now: float) -> bool:
        """Take one token from ``bucket`` (full at ``burst``, refilled ``rate``/s): True if taken."""

    async def close(self) -> None:
        """Release connections; the object is not used afterwards."""


def _check_limit(rate: float, burst: int) -> None:
    """A bucket needs a positive rate and room for at least one token."""
    if not rate > 0 or burst < 1:
        raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")


def _idle_ttl(rate: float, burst: int) -> float:
    """Seconds after which an untouched bucket is full again, so it may be forgotten."""
    return burst / rate + 1.0


class MemoryState:
    """One process's state: bounded, expiring dicts (the default ``backend: memory``)."""

    backend: str = MEMORY

    def __init__(self, *, max_jtis: int = 100_000, max_buckets: int = 100_000) -> None:
        self._max_jtis = max_jtis
        self._max_buckets = max_buckets
        self._jtis: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def start(self) -> None:
        """Nothing to reach."""

    async def first_use(self, namespace: str, jti: str, expires_at: float, now: float) -> bool:
        """Remember a jti until it expires: an assertion is accepted once (RFC 7523 §3)."""
        self._purge(now)
        key = (namespace, jti)
        if key in self._jtis:
            return False
        if len(self._jtis) >= self._max_jtis:
            # Forgetting a live jti would allow a replay: refuse instead (fail closed).
            raise SharedStateUnavailable(f"more than {self._max_jtis} live jtis to remember")
        self._jtis[key] = expires_at
        heapq.heappush(self._expiry, (expires_at, key))
        return True

    def _purge(self, now: float) -> None:
        """Forget the jtis whose time is over."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            self._jtis.pop(key, None)

    async def take(self, bucket: str, rate: float, burst: int, now: float) -> bool:
        """A classic token bucket: starts full at ``burst``, refills ``rate`` tokens per second."""
        _check_limit(rate, burst)
        tokens, updated = self._buckets.pop(bucket, (float(burst), now))
        if now > updated:
            tokens, updated = min(float(burst), tokens + (now - updated) * rate), now
        taken = tokens >= 1.0
        self._buckets[bucket] = (tokens - 1.0 if taken else tokens, updated)
        while len(self._buckets) > self._max_buckets:
            self._buckets.popitem(last=False)  # the least recently used; likely full anyway
        return taken

    async def close(self) -> None:
        """Forget everything."""
        self._jtis.clear()
        self._expiry.clear()
        self._buckets.clear()


def redacted(url: str) -> str:
    """The URL without user name or password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisState:
    """State in Redis (redis-py asyncio), shared by every replica pointing at the same keys."""

    backend: str = REDIS

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "zonegate:",
        ssl_ca_file: str | None = None,
        timeout: float = 1.0,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"shared state URL must be redis:// or rediss://, not {scheme}://")
        if ssl_ca_file is not None and scheme != "rediss":
            raise ValueError("a CA file needs a rediss:// (TLS) URL")
        self._where = redacted(url)
        self._secret = urlsplit(url).password or ""
        self._prefix = key_prefix
        options: dict[str, Any] = {}
        if ssl_ca_file is not None:
            options["ssl_ca_certs"] = ssl_ca_file
        self._redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            # One immediate retry on a broken connection (Redis restarted); none on a timeout.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            **options,
        )
        self._take = self._redis.register_script(_TAKE_LUA)

    def _unavailable(self, operation: str, error: BaseException) -> SharedStateUnavailable:
        """The error as SharedStateUnavailable, naming Redis without its password."""
        detail = str(error) or type(error).__name__
        if self._secret:
            detail = detail.replace(self._secret, "***")
        return SharedStateUnavailable(f"redis {self._where} {operation}: {detail}")

    def jti_key(self, namespace: str, jti: str) -> str:
        """The key of one jti: hashed, so a long jti does not make a long key."""
        digest = hashlib.sha256(jti.encode()).hexdigest()
        return f"{self._prefix}jti:{namespace}:{digest}"

    def bucket_key(self, bucket: str) -> str:
        """The key of one rate-limit bucket."""
        return f"{self._prefix}bucket:{bucket}"

    async def start(self) -> None:
        """PING Redis once."""
        try:
            await self._redis.ping()
        except _FAILURES as e:
            raise self._unavailable("ping", e) from None

    async def first_use(self, namespace: str, jti: str, expires_at: float, now: float) -> bool:
        """``SET NX`` with the jti's remaining life: accepted once (RFC 7523 §3)."""
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000))
        try:
            created = await self._redis.set(self.jti_key(namespace, jti), b"1", nx=True, px=ttl_ms)
        except _FAILURES as e:
            raise self._unavailable("first_use", e) from None
        return bool(created)

    async def take(self, bucket: str, rate: float, burst: int, now: float) -> bool:
        """One atomic Lua call (EVALSHA, EVAL after a Redis restart) on the bucket's hash."""
        _check_limit(rate, burst)
        ttl_ms = math.ceil(_idle_ttl(rate, burst) * 1000)
        args = (repr(float(rate)), str(burst), repr(float(now)), str(ttl_ms))
        try:
            taken = await self._take(keys=[self.bucket_key(bucket)], args=args)
        except _FAILURES as e:
            raise self._unavailable("take", e) from None
        return bool(taken)

    async def close(self) -> None:
        """Close the connection pool."""
        with contextlib.suppress(*_FAILURES):  # nothing left to release on a dead connection
            await self._redis.aclose()
