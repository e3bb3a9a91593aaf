"""What every program's /metrics starts with: ``zonegate_build_info`` and the process metrics."""

from __future__ import annotations

import importlib.metadata
import platform

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

# Latency histograms start at 100 µs: the sidecar's own share of a call is well under 1 ms.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def version() -> str:
    """The installed zonegate version (``unknown`` when run from a bare checkout)."""
    try:
        return importlib.metadata.version("zonegate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def program_registry() -> CollectorRegistry:
    """A registry of one program's own: build info and ``process_*`` (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    build = Gauge(
        "zonegate_build_info",
        "Always 1; the labels say which zonegate and Python this process runs.",
        ["version", "python"],
        registry=registry,
    )
    build.labels(version=version(), python=platform.python_version()).set(1)
    return registry
