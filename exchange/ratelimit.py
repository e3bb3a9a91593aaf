"""Per-client rate limits: one token bucket per client with a ``rate_limit`` (issue 8).

A refused request is ``SlowDown`` (429 ``slow_down``, the RFC 8628 §3.5 word for "ask less
often") with ``Retry-After``: the whole seconds until the bucket holds a token again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from exchange.config import ClientConfig, RateLimit
from exchange.errors import SlowDown


@dataclass(slots=True)
class TokenBucket:
    """``limit.burst`` tokens at most, refilled at ``limit.rate`` per second."""

    limit: RateLimit
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; return 0, or the seconds until one is available (nothing taken)."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * self.limit.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.limit.rate


class RateLimiter:
    """The buckets of every rate-limited client; clients without ``rate_limit`` pass freely."""

    def __init__(
        self,
        clients: Mapping[str, ClientConfig],
        *,
        clock: Callable[[], float],
        previous: RateLimiter | None = None,
    ) -> None:
        self._clock = clock
        now = clock()
        old = previous._buckets if previous is not None else {}
        self._buckets: dict[str, TokenBucket] = {}
        for client in clients.values():
            limit = client.rate_limit
            if limit is None:
                continue
            kept = old.get(client.client_id)
            # A reload keeps a client's bucket when its limit did not change.
            self._buckets[client.client_id] = (
                kept
                if kept is not None and kept.limit == limit
                else TokenBucket(limit, float(limit.burst), now)
            )

    def check(self, client_id: str) -> None:
        """Spend one request of ``client_id``'s budget, or raise SlowDown with Retry-After."""
        bucket = self._buckets.get(client_id)
        if bucket is None:
            return
        wait = bucket.take(self._clock())
        if wait > 0:
            raise SlowDown(
                f"client {client_id} exceeds its rate limit of {bucket.limit.rate:g}/s",
                retry_after=max(1, math.ceil(wait)),
            )
