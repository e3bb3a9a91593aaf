"""Which program a config document is for, read from its top-level keys."""

from __future__ import annotations

from typing import Any


def config_kind(document: Any) -> str:
    """Which program a config document is for: sidecar (routes), injector (image), exchange."""
    if isinstance(document, dict):
        if "routes" in document:
            return "sidecar"
        if "image" in document:
            return "injector"
    return "exchange"
