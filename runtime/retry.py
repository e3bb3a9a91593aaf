"""One retry helper: exponential backoff with jitter, bounded or not, for every retry loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
OnRetry = Callable[[Exception, float], None]  # (the failure, seconds until the next attempt)


@dataclass(frozen=True, slots=True)
class Backoff:
    """``base * 2**attempt`` seconds capped at ``cap``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` so that many clients do not retry in step."""

    base: float
    cap: float
    jitter: float = 0.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        pause = min(self.cap, self.base * 2.0**attempt)
        if not self.jitter:
            return pause
        return pause * float(rng.uniform(1 - self.jitter, 1 + self.jitter))


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: type[Exception] | tuple[type[Exception], ...],
    backoff: Backoff,
    attempts: int | None = None,
    rng: random.Random | None = None,
    on_retry: OnRetry | None = None,
) -> T:
    """Await ``call()`` until it succeeds, retrying ``retry_on`` failures after a backoff;
    after ``attempts`` tries (None: no limit) the last failure is raised."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
    attempt = 0
    while True:
        try:
            return await call()
        except retry_on as e:
            attempt += 1
            if attempts is not None and attempt >= attempts:
                raise
            pause = backoff.delay(attempt - 1, rng)
            if on_retry is not None:
                on_retry(e, pause)
            await asyncio.sleep(pause)
