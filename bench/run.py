"""``python -m bench [--tiny] [--json FILE]``: start the stack, measure every figure, print the table."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import figures
from bench.figures import FULL, TINY, Size
from bench.report import Row, as_json, table
from bench.stack import Stack, build_stack
from bench.tools import ensure_tools

PACKAGES = ("aiohttp", "uvloop", "httptools", "cryptography", "PyJWT", "prometheus_client")
Figure = Callable[[Stack, Size], Awaitable[list[Row]]]


def context(size: Size) -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": versions,
        "size": "tiny" if size == TINY else "full",
    }


STEPS: list[tuple[str, Figure]] = [
    ("cache-hit throughput", figures.throughput),
    ("added latency", figures.added_latency),
    ("POST /token throughput", figures.token_throughput),
    ("cold misses", figures.cold_miss),
    ("single flight", figures.single_flight),
    ("start to ready", figures.start_to_ready),
]


async def measure(
    size: Size, root: Path, progress: Callable[[str], None], only: frozenset[str] = frozenset()
) -> list[Row]:
    """Every figure (or those whose step name starts with one of ``only``), in an order where
    each leaves the next a clean slate."""
    stack = await build_stack(root)
    try:
        idle = {name: stack.procs[name].rss_kib() for name in ("embedded", "remote")}
        rows: list[Row] = []
        for name, figure in STEPS:
            if _chosen(name, only):
                progress(name)
                rows += await figure(stack, size)
        if _chosen("memory", only):
            progress("memory")
            rows += await figures.memory(stack, size, idle)
        return rows
    finally:
        await stack.close()


def _chosen(step: str, only: frozenset[str]) -> bool:
    return not only or any(step.lower().startswith(prefix) for prefix in only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: seconds, not minutes")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--keep", type=Path, help="keep configs and logs in this folder")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="STEP",
        help="measure only the steps whose name starts with STEP (repeatable), e.g. "
        "'cache-hit', 'added', 'post', 'cold', 'single', 'start', 'memory'",
    )
    args = parser.parse_args(argv)
    only = frozenset(step.lower() for step in args.only)
    ensure_tools()
    size = TINY if args.tiny else FULL

    def progress(step: str) -> None:
        print(f"bench: {step} ...", file=sys.stderr, flush=True)

    started = time.monotonic()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(measure(size, args.keep, progress, only))
    else:
        with tempfile.TemporaryDirectory(prefix="zonegate-bench-") as root:
            rows = asyncio.run(measure(size, Path(root), progress, only))
    info = context(size)
    print(
        f"\nzonegate bench ({info['size']}, {info['date']}, {info['cpus']} CPUs, "
        f"Python {info['python']}, {time.monotonic() - started:.0f} s)\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(as_json(rows, info))
    return 0
