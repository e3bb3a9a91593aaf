"""The exchange core's adapters: the HTTP server, its documents and metrics, key files, fetcher."""

from exchange.server.wiring import build_core

__all__ = ["build_core"]
