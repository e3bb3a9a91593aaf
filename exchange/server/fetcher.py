"""The aiohttp fetcher the core's issuer keys are given: bounded in size and time.

One ``HttpFetcher`` holds the HTTP session. An issuer with its own CA bundle (``ca_file``)
fetches through ``HttpFetcher.with_ca``: the same session, TLS verified against that bundle
only, re-read when the file changes. One such fetcher per distinct file, kept for the
fetcher's life (a config names a handful).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from exchange.issuers import FetchFailed
from runtime.filewatch import FileWatch
from runtime.httpjson import DocumentError, UntrustedCertificate, get_json

log = logging.getLogger("zonegate.fetcher")

SYSTEM_CAS = "the system CAs (set ca_file for a private CA)"


class HttpFetcher:
    """Fetches JSON documents with one aiohttp session, opened on first use."""

    def __init__(self, timeout: float = 5.0, ssl: ssl.SSLContext | bool | None = None) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 2.0))
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None
        self._by_ca: dict[Path, CaFetcher] = {}

    async def __call__(self, url: str) -> tuple[dict[str, Any], str | None]:
        return await self.get(url, self._ssl, SYSTEM_CAS)

    async def get(
        self, url: str, ssl: ssl.SSLContext | bool | None, trusted: str
    ) -> tuple[dict[str, Any], str | None]:
        """GET ``url`` verifying TLS with ``ssl``; ``trusted`` says what it trusts, for errors."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            return await get_json(self._session, url, ssl=ssl)
        except UntrustedCertificate as e:
            raise FetchFailed(f"{e} (verified against {trusted})") from e
        except DocumentError as e:
            raise FetchFailed(str(e)) from e

    def with_ca(self, ca_file: Path | None) -> HttpFetcher | CaFetcher:
        """The fetcher for documents served under ``ca_file``'s CAs (None: this one)."""
        if ca_file is None:
            return self
        fetcher = self._by_ca.get(ca_file)
        if fetcher is None:
            fetcher = self._by_ca[ca_file] = CaFetcher(self, ca_file)
        return fetcher

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class CaFetcher:
    """Fetches through its parent's session, trusting only the CAs in one bundle file."""

    def __init__(self, parent: HttpFetcher, ca_file: Path) -> None:
        self._parent = parent
        self.ca_file = ca_file
        self._watch = FileWatch(ca_file)
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The bundle's context, rebuilt when the file changed; a bundle that no longer loads
        keeps the previous one (and says so), or fails the fetch when there is none."""
        if self._context is None or self._watch.changed():
            try:
                self._context = self._watch.load(
                    lambda: ssl.create_default_context(cafile=str(self.ca_file))
                )
            except (OSError, ssl.SSLError) as e:
                if self._context is None:
                    raise FetchFailed(f"cannot load ca_file {self.ca_file}: {e}") from e
                log.warning(
                    "ca_file not reloaded, keeping the CAs loaded before",
                    extra={"ca_file": str(self.ca_file)},
                )
        return self._context

    async def __call__(self, url: str) -> tuple[dict[str, Any], str | None]:
        return await self._parent.get(url, self.context(), "its ca_file")

    async def close(self) -> None:
        """Nothing of its own: the parent's session is closed with the parent."""
