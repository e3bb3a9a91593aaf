"""The shared state in use: replay protection and rate limits over ``sharedstate``.

``SharedReplay`` is the core's ``ReplayGuard`` over a ``SharedState``: an assertion's ``jti``
is accepted once across every replica; when the store cannot be reached, a client assertion is
refused with 503 ``temporarily_unavailable`` and ``Retry-After`` (fail closed: a replay cannot
be ruled out). ``SharedLimits`` spends a client's rate limit in the shared buckets; when the
store cannot be reached, the request passes with a warning (fail open). Every failure counts in
``zonegate_shared_state_errors_total{operation}``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from exchange.config import ClientConfig, SharedStateConfig
from exchange.errors import InvalidClient, SlowDown, TemporarilyUnavailable
from exchange.server.sharedstate import (
    REDIS,
    MemoryState,
    RedisState,
    SharedState,
    SharedStateUnavailable,
)

log = logging.getLogger("zonegate.exchange.sharedstate")

RETRY_AFTER = 2  # seconds a client assertion refused for an unreachable store should wait
WARN_EVERY = 10.0  # seconds between warnings that rate limits are not enforced

ErrorCounter = Callable[[str], None]  # the operation that failed: start | first_use | take


def build_state(settings: SharedStateConfig) -> SharedState:
    """The store ``shared_state`` names (nothing is reached yet)."""
    if settings.backend == REDIS:
        assert settings.url is not None  # the config reader requires it
        ca_file = str(settings.ca_file) if settings.ca_file is not None else None
        return RedisState(settings.url, key_prefix=settings.key_prefix, ssl_ca_file=ca_file)
    return MemoryState()


class SharedReplay:
    """``exchange.clientauth.ReplayGuard`` over a shared store: fail closed."""

    def __init__(self, state: SharedState, errors: ErrorCounter) -> None:
        self._state = state
        self._errors = errors

    async def remember(self, key: tuple[str, str], until: float, now: float) -> None:
        client_id, jti = key
        try:
            first = await self._state.first_use(client_id, jti, until, now)
        except SharedStateUnavailable as e:
            self._errors("first_use")
            log.warning(
                "client assertion refused: replay protection cannot be checked: %s",
                e,
                extra={"client": client_id},
            )
            raise TemporarilyUnavailable(
                "client assertions cannot be checked for replay right now",
                retry_after=RETRY_AFTER,
            ) from None
        if not first:
            raise InvalidClient("client_assertion jti was already used (replay refused)")


class SharedLimits:
    """Per-client rate limits in the shared buckets: fail open, with a warning."""

    def __init__(self, state: SharedState, errors: ErrorCounter) -> None:
        self._state = state
        self._errors = errors
        self._warned_at = -math.inf

    async def check(self, client: ClientConfig) -> None:
        """Spend one request of ``client``'s budget, or raise SlowDown with Retry-After."""
        limit = client.rate_limit
        if limit is None:
            return
        try:
            taken = await self._state.take(client.client_id, limit.rate, limit.burst, time.time())
        except SharedStateUnavailable as e:
            self._errors("take")
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY:
                self._warned_at = now
                log.warning("rate limits not enforced: shared state unreachable: %s", e)
            return
        if not taken:
            raise SlowDown(
                f"client {client.client_id} exceeds its rate limit of {limit.rate:g}/s",
                retry_after=max(1, math.ceil(1 / limit.rate)),
            )
