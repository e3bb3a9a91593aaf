"""Checks the package layers: who may import whom, no cycles, a core that loads no I/O stack.

``python -m tools.layers`` (run by ``make test``) prints every broken rule and exits 1, or
prints the import graph's summary and exits 0. docs/architecture.md explains the rules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Each package and the packages it may import (itself always allowed). Order: bottom first.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "runtime": frozenset(),
    "exchange": frozenset({"runtime"}),
    "exchange.server": frozenset({"runtime", "exchange"}),
    "sidecar": frozenset({"runtime", "exchange", "exchange.server"}),
    "injector": frozenset({"runtime"}),
    "devkit": frozenset({"runtime", "exchange", "exchange.server", "sidecar"}),
    "zonegate": frozenset(
        {"runtime", "exchange", "exchange.server", "sidecar", "injector", "devkit"}
    ),
}
CORE_MODULES = (
    "exchange.errors",
    "exchange.tokens",
    "exchange.policy",
    "exchange.validate",
    "exchange.mint",
    "exchange.keys",
    "exchange.config",
    "exchange.core",
    "exchange.issuers",
    "exchange.clientauth",
    "exchange.ratelimit",
    "exchange.metadata",
)
IO_STACKS = ("aiohttp", "prometheus_client")
CLOCK_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter")}
NOT_IN_SIDECAR = ("inject", "demo", "pep", "cli", "explain", "provider", "devop")


@dataclass(frozen=True, slots=True)
class Edge:
    """One import: ``source`` (a module) imports ``target`` (a module of ours)."""

    source: str
    target: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """Every module of the layered packages under ``root``."""
    found = {}
    for package in {p.split(".")[0] for p in MAY_IMPORT}:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[Edge]:
    """The imports of one module that name a module of ours (function-level ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            if target in known:
                yield Edge(name, target, node.lineno)


# ``python -m exchange`` starts the server: the entry point sits with the adapters it runs.
ENTRY_POINTS = {"exchange.__main__": "exchange.server"}


def layer(module: str) -> str:
    """The package a module belongs to (the longest package name it falls under)."""
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    return max((p for p in MAY_IMPORT if module == p or module.startswith(p + ".")), key=len)


def rule_breaks(edges: list[Edge]) -> Iterator[str]:
    for edge in edges:
        source, target = layer(edge.source), layer(edge.target)
        if source != target and target not in MAY_IMPORT[source]:
            yield f"{edge.source}:{edge.line} imports {edge.target}: {source} may not import {target}"


def cycles(edges: list[Edge]) -> Iterator[str]:
    """Import cycles between modules (a package's __init__ importing its own modules aside)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if not edge.source or edge.target.startswith(edge.source + "."):
            continue
        graph.setdefault(edge.source, set()).add(edge.target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> Iterator[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                yield "import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                yield from visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            yield from visit(node)


def clock_reads(found: dict[str, Path]) -> Iterator[str]:
    """Core modules must take time as a parameter, never read a clock."""
    for name in CORE_MODULES:
        tree = ast.parse(found[name].read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in CLOCK_CALLS
            ):
                yield f"{name}:{node.lineno} reads the clock ({node.value.id}.{node.attr})"


def misplaced(found: dict[str, Path]) -> Iterator[str]:
    for name in found:
        if layer(name) == "sidecar" and any(w in name.split(".")[-1] for w in NOT_IN_SIDECAR):
            yield f"{name}: sidecar/ holds the proxy only (webhook, dev kit and CLI live elsewhere)"


def io_stacks_loaded(root: Path) -> Iterator[str]:
    """Importing the core must not load aiohttp or prometheus_client (checked in a fresh
    interpreter, so nothing imported here counts)."""
    probe = (
        f"import sys; import {', '.join(CORE_MODULES)}; "
        f"print(' '.join(m for m in {IO_STACKS!r} if m in sys.modules))"
    )
    loaded = subprocess.run(  # noqa: S603 - our own interpreter, a fixed probe
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    for stack in loaded:
        yield f"importing the core modules loads {stack}"


def check(root: Path) -> list[str]:
    """Every broken rule under ``root``; empty when the layers hold."""
    found = modules(root)
    edges = [e for name, path in found.items() for e in imports(name, path, set(found))]
    return [
        *rule_breaks(edges),
        *cycles(edges),
        *clock_reads(found),
        *misplaced(found),
        *io_stacks_loaded(root),
    ]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    problems = check(root)
    for problem in problems:
        print(f"layers: {problem}", file=sys.stderr)
    if not problems:
        print(f"layers: {len(modules(root))} modules; import rules, no cycles, pure core: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
