"""zonegate exchange core: OAuth 2.0 Token Exchange (RFC 8693) issuing RFC 9068 access tokens.

Names are imported on first use, so ``import exchange.errors`` loads the errors alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exchange.core import ExchangeCore
    from exchange.errors import ExchangeError
    from exchange.tokens import TokenExchangeRequest, TokenResponse

__all__ = ["ExchangeCore", "ExchangeError", "TokenExchangeRequest", "TokenResponse"]
_HOMES = {
    "ExchangeCore": "exchange.core",
    "ExchangeError": "exchange.errors",
    "TokenExchangeRequest": "exchange.tokens",
    "TokenResponse": "exchange.tokens",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'exchange' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
