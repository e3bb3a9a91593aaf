"""Builds an ExchangeCore with the real world plugged in: key files, aiohttp, the wall clock."""

from __future__ import annotations

import time

from exchange.config import ExchangeConfig
from exchange.core import ExchangeCore
from exchange.issuers import Fetcher, FetchObserver
from exchange.keys import KeyRing
from exchange.server.fetcher import HttpFetcher
from exchange.server.keyfiles import load_keyring


def build_core(
    config: ExchangeConfig,
    *,
    keys: KeyRing | None = None,
    fetcher: Fetcher | None = None,
    observe_fetch: FetchObserver | None = None,
) -> ExchangeCore:
    """The core for ``config``: zone keys from their files (ConfigError naming any that cannot
    be used) unless given, trusted issuers fetched over HTTP, time from the wall clock."""
    return ExchangeCore(
        config,
        keys=keys if keys is not None else load_keyring(config),
        fetcher=fetcher if fetcher is not None else HttpFetcher(config.fetch_timeout),
        clock=time.time,
        observe_fetch=observe_fetch,
    )
