"""The benchmark still runs end to end (tiny size; no timing is asserted, only that it works)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tools import missing_tools

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(bool(missing_tools()), reason=f"needs wrk, hey, nginx: {missing_tools()}")
def test_tiny_benchmark_prints_every_figure_and_one_exchange_for_a_burst(tmp_path: Path) -> None:
    """`python -m bench --tiny` measures every figure of issue 7 and prints one table."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["figure"]: row for row in json.loads(out.read_text())["rows"]}
    for figure in (
        "cache-hit throughput, sidecar (1 process)",
        "added latency per hop at 100 req/s, p99",
        "POST /token throughput, exchange server (ES256 in, ES256 out)",
        "cold-miss latency, embedded, p50",
        "cold-miss latency, remote, p50",
        "start to /readyz 200, embedded sidecar (median of 1)",
        "sidecar RSS idle, embedded",
        "RSS per cached entry at 1,000 entries",
    ):
        assert figure in rows, sorted(rows)
        assert rows[figure]["measured"] in done.stdout
    burst = rows["20 concurrent first requests, one new token"]
    assert burst["holds"] is True, burst  # single flight is behaviour, not timing
