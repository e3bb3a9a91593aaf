"""Exchange-server metrics (the documented names, see docs/operations.md), in a registry of their own.

Labels are bounded: configured client ids (or ``unknown``), configured zones (or ``none``),
configured issuer URLs, and RFC error codes. Never a token, never a presented value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.telemetry import LATENCY_BUCKETS, program_registry

UNKNOWN_CLIENT = "unknown"
NO_ZONE = "none"
SHARED_STATE_OPERATIONS = ("start", "first_use", "take")


class ExchangeMetrics:
    """Counters and histograms of one exchange server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or program_registry()
        self.requests = Counter(
            "zonegate_exchange_requests",
            "Token exchange requests by client, zone and outcome (ok or the error code).",
            ["client", "zone", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "zonegate_exchange_duration_seconds",
            "Time to answer a token exchange request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jwks_fetches = Counter(
            "zonegate_jwks_fetches",
            "Key fetches (discovery + JWKS) from trusted, client and cluster issuers by outcome.",
            ["issuer", "outcome"],
            registry=self.registry,
        )

        self.shared_state_errors = Counter(
            "zonegate_shared_state_errors",
            "Failed shared-state operations (start, first_use, take): Redis unreachable.",
            ["operation"],
            registry=self.registry,
        )
        for operation in SHARED_STATE_OPERATIONS:
            self.shared_state_errors.labels(operation=operation)
        # (client, zone, outcome) -> its requests counter: labels() validates and locks on
        # every call; the label values are bounded (see the module doc), so is this dict.
        self._requests_by: dict[tuple[str, str, str], Counter] = {}

    def observe_shared_state_error(self, operation: str) -> None:
        """Count one failed shared-state operation."""
        self.shared_state_errors.labels(operation=operation).inc()

    def observe_fetch(self, issuer: str, outcome: str) -> None:
        """The ``observe`` hook of ``exchange.issuers.IssuerKeys``."""
        self.jwks_fetches.labels(issuer=issuer, outcome=outcome).inc()

    def observe_exchange(self, client: str, zone: str, outcome: str, seconds: float) -> None:
        """Count one answered token request and its duration."""
        key = (client, zone, outcome)
        counter = self._requests_by.get(key)
        if counter is None:
            counter = self._requests_by[key] = self.requests.labels(
                client=client, zone=zone, outcome=outcome
            )
        counter.inc()
        self.duration.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
