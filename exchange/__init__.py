"""zonegate exchange core: OAuth 2.0 Token Exchange (RFC 8693) issuing RFC 9068 access tokens."""

from exchange.core import ExchangeCore
from exchange.errors import ExchangeError
from exchange.tokens import TokenExchangeRequest, TokenResponse

__all__ = ["ExchangeCore", "ExchangeError", "TokenExchangeRequest", "TokenResponse"]
