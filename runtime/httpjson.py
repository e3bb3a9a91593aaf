"""Bounded JSON GET over aiohttp: every document zonegate fetches (discovery, JWKS) goes here."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

MAX_DOCUMENT_BYTES = 1 << 20


class DocumentError(Exception):
    """A JSON document could not be had; the message says why (never the body)."""


class UntrustedCertificate(DocumentError):
    """The server's TLS certificate did not verify against the CAs trusted for it."""


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    ssl: Any = None,
    limit: int = MAX_DOCUMENT_BYTES,
) -> tuple[dict[str, Any], str | None]:
    """GET ``url`` (no redirects) as a JSON object of at most ``limit`` bytes, with its
    Cache-Control; any failure is ``DocumentError``."""
    try:
        async with session.get(url, ssl=ssl, allow_redirects=False) as response:
            if response.status != 200:
                raise DocumentError(f"GET {url} answered {response.status}")
            body = await response.content.read(limit + 1)
            cache_control = response.headers.get("Cache-Control")
    except aiohttp.ClientConnectorCertificateError as e:
        reason = getattr(e.certificate_error, "verify_message", None) or "verification failed"
        raise UntrustedCertificate(f"GET {url}: TLS certificate not trusted: {reason}") from e
    except aiohttp.ClientConnectorError as e:  # its message shows the SSLContext's repr
        reason = e.os_error.strerror or type(e.os_error).__name__
        raise DocumentError(f"GET {url} failed: cannot connect: {reason}") from e
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise DocumentError(f"GET {url} failed: {type(e).__name__}: {e}") from e
    if len(body) > limit:
        raise DocumentError(f"GET {url}: document larger than {limit} bytes")
    return parse_object(body, url), cache_control


def parse_object(body: bytes, url: str) -> dict[str, Any]:
    """The body as a JSON object, or DocumentError."""
    try:
        document = json.loads(body)
    except ValueError as e:
        raise DocumentError(f"GET {url}: not JSON") from e
    if not isinstance(document, dict):
        raise DocumentError(f"GET {url}: not a JSON object")
    return document
