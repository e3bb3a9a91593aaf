"""Sidecar metrics (the documented names, see docs/operations.md), in a registry of their own.

Labels are bounded sets: route names from the config (or ``none`` for refused requests), HTTP
status codes, cache results, zone names seen in issued tokens (at most ``MAX_ZONES``, then
``other``), RFC error codes and the exchange mode. Never a token, never a user.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.telemetry import LATENCY_BUCKETS, program_registry

NO_ROUTE = "none"
UNKNOWN_ZONE = "unknown"
MAX_ZONES = 64
CACHE_RESULTS = ("hit", "miss", "coalesced")
EVICTION_REASONS = ("expired", "capacity", "upstream_401", "reload")


class SidecarMetrics:
    """Counters, gauges and histograms of one sidecar."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, cache_entries: Callable[[], float]) -> None:
        self.registry = program_registry()
        self._zones: set[str] = set()
        self.requests = Counter(
            "zonegate_sidecar_requests",
            "Requests the proxy answered, by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "zonegate_sidecar_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_cache = Counter(
            "zonegate_sidecar_token_cache",
            "Token cache lookups: hit, miss, coalesced (joined an exchange already running).",
            ["result"],
            registry=self.registry,
        )
        self._cache_children = {r: self.token_cache.labels(result=r) for r in CACHE_RESULTS}
        self.evictions = Counter(
            "zonegate_sidecar_token_cache_evictions",
            "Cache entries dropped before use: expired, capacity (LRU), upstream_401, reload.",
            ["reason"],
            registry=self.registry,
        )
        self.authz_checks = Counter(
            "zonegate_sidecar_authz_checks",
            "Authz listener checks by route and outcome (allowed, or the error code).",
            ["route", "outcome"],
            registry=self.registry,
        )
        self._eviction_children = {r: self.evictions.labels(reason=r) for r in EVICTION_REASONS}
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._authz_children: dict[tuple[str, str], Counter] = {}
        self.cache_entries = Gauge(
            "zonegate_sidecar_token_cache_entries",
            "Exchanged tokens held in the cache.",
            registry=self.registry,
        )
        self.cache_entries.set_function(cache_entries)
        self.exchanges = Counter(
            "zonegate_sidecar_exchanges",
            "Token exchanges by zone and outcome (ok or the RFC error code).",
            ["zone", "outcome"],
            registry=self.registry,
        )
        self.exchange_duration = Histogram(
            "zonegate_sidecar_exchange_duration_seconds",
            "Time one token exchange took, by exchange mode (embedded or remote).",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        # Labelled children are looked up once per (route, status): labels() takes a lock and
        # builds tuples, a measurable share of a cache hit's CPU (docs/benchmarks.md).
        children = self._request_children.get((route, status))
        if children is None:
            children = (
                self.requests.labels(route=route, status=str(status)),
                self.request_duration.labels(route=route),
            )
            self._request_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_cache(self, result: str) -> None:
        child = self._cache_children.get(result)
        if child is None:
            child = self._cache_children[result] = self.token_cache.labels(result=result)
        child.inc()

    def observe_authz(self, route: str, outcome: str) -> None:
        """One authz check (Envoy ext_authz, nginx auth_request): ``allowed`` or the error."""
        child = self._authz_children.get((route, outcome))
        if child is None:
            child = self.authz_checks.labels(route=route, outcome=outcome)
            self._authz_children[(route, outcome)] = child
        child.inc()

    def observe_eviction(self, reason: str, count: int = 1) -> None:
        child = self._eviction_children.get(reason)
        if child is None:
            child = self._eviction_children[reason] = self.evictions.labels(reason=reason)
        child.inc(count)

    def observe_exchange(self, zone: str | None, outcome: str, mode: str, seconds: float) -> None:
        self.exchanges.labels(zone=self._bounded_zone(zone), outcome=outcome).inc()
        self.exchange_duration.labels(mode=mode).observe(seconds)

    def _bounded_zone(self, zone: str | None) -> str:
        if zone is None:
            return UNKNOWN_ZONE
        if zone in self._zones or len(self._zones) < MAX_ZONES:
            self._zones.add(zone)
            return zone
        return "other"

    def render(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
