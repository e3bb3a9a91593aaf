"""The aiohttp fetcher the core's issuer keys are given: bounded in size and time."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp

from exchange.issuers import FetchFailed
from runtime.httpjson import DocumentError, get_json


class HttpFetcher:
    """Fetches JSON documents with one aiohttp session, opened on first use."""

    def __init__(self, timeout: float = 5.0, ssl: ssl.SSLContext | bool | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 2.0))
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, url: str) -> tuple[dict[str, Any], str | None]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            return await get_json(self._session, url, ssl=self._ssl)
        except DocumentError as e:
            raise FetchFailed(str(e)) from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
