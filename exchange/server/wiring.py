"""Builds an ExchangeCore with the real world plugged in: key files, aiohttp, the wall clock."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from exchange.config import ExchangeConfig
from exchange.core import ExchangeCore
from exchange.issuers import Fetcher, FetchObserver
from exchange.keys import KeyRing
from exchange.server.fetcher import HttpFetcher
from exchange.server.keyfiles import load_keyring


def issuer_fetchers(
    fetcher: Fetcher, issuers: Iterable[tuple[str, Path | None]]
) -> dict[str, Fetcher]:
    """The fetcher of each ``(issuer, ca_file)`` that names a CA bundle: ``fetcher``'s, bound
    to that bundle. A fetcher that is not an ``HttpFetcher`` (a test's) serves every issuer."""
    if not isinstance(fetcher, HttpFetcher):
        return {}
    return {issuer: fetcher.with_ca(ca) for issuer, ca in issuers if ca is not None}


def trusted_fetchers(config: ExchangeConfig, fetcher: Fetcher) -> dict[str, Fetcher]:
    """Per trusted issuer with a ``ca_file``: its fetcher."""
    return issuer_fetchers(fetcher, ((t.issuer, t.ca_file) for t in config.trusted_issuers))


def cluster_fetchers(config: ExchangeConfig, fetcher: Fetcher) -> dict[str, Fetcher]:
    """Per cluster issuer with a ``ca_file``: its fetcher."""
    return issuer_fetchers(fetcher, ((c.issuer, c.ca_file) for c in config.cluster_issuers))


def build_core(
    config: ExchangeConfig,
    *,
    keys: KeyRing | None = None,
    fetcher: Fetcher | None = None,
    observe_fetch: FetchObserver | None = None,
) -> ExchangeCore:
    """The core for ``config``: zone keys from their files (ConfigError naming any that cannot
    be used) unless given, trusted issuers fetched over HTTP (each with its ``ca_file``), time
    from the wall clock."""
    fetcher = fetcher if fetcher is not None else HttpFetcher(config.fetch_timeout)
    return ExchangeCore(
        config,
        keys=keys if keys is not None else load_keyring(config),
        fetcher=fetcher,
        clock=time.time,
        observe_fetch=observe_fetch,
        issuer_fetchers=trusted_fetchers(config, fetcher),
    )
