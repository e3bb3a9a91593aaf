"""Memory per cached token: the sidecar's ``TokenCache`` filled in a process of its own.

``python -m bench.cachemem ENTRIES ZONE_TOKEN_FILE`` fills a cache (the sidecar's own class,
through its public ``get``) with ``ENTRIES`` distinct zone tokens as long as a real one, each
under the key of a distinct subject token, and prints the process's RSS before and after as
JSON. Filling 100k entries through HTTP would take minutes of exchanges; what is measured here
is the same data structure a sidecar holds, in a process that imported the same modules.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path

from bench.procs import rss_kib
from sidecar.cache import CacheKey, Issued, TokenCache
from sidecar.config import CacheSettings, Target


async def fill(cache: TokenCache, entries: int, template: str) -> None:
    target = Target(audience=("billing",), scope=("billing:read",))
    expires_at = time.time() + 3600
    head = template[:-12]
    for i in range(entries):
        token = f"{head}{i:012d}"  # distinct, as long as a real zone token
        issued = Issued(token, expires_at, expires_at)

        async def fetch(issued: Issued = issued) -> Issued:
            return issued

        await cache.get(CacheKey.of(f"subject-token-{i}", target, "embedded:shop"), fetch)


def main(argv: list[str]) -> int:
    entries = int(argv[0])
    template = Path(argv[1]).read_text().strip()
    cache = TokenCache(CacheSettings(max_entries=entries), clock=time.time)
    gc.collect()
    before = rss_kib(os.getpid())
    asyncio.run(fill(cache, entries, template))
    gc.collect()
    after = rss_kib(os.getpid())
    assert len(cache) == entries, len(cache)
    result = {
        "entries": entries,
        "token_bytes": len(template),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_entry": (after - before) * 1024 / entries,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
