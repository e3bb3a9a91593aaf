"""The package layers hold, and the checker that ``make test`` runs can see them broken."""

from __future__ import annotations

from pathlib import Path

from tools.layers import Edge, check, cycles, imports, modules, rule_breaks

ROOT = Path(__file__).resolve().parent.parent


def test_the_tree_keeps_its_layers() -> None:
    """No import breaks a layer rule, no cycle, the core reads no clock and loads no I/O stack."""
    assert check(ROOT) == []


def test_core_importing_the_proxy_is_reported() -> None:
    """exchange/ importing sidecar/ (an arrow pointing up) is named with its line."""
    breaks = list(rule_breaks([Edge("exchange.core", "sidecar.proxy", 7)]))
    assert breaks == ["exchange.core:7 imports sidecar.proxy: exchange may not import sidecar"]


def test_core_importing_its_adapters_is_reported() -> None:
    """The pure core may not reach into exchange/server (aiohttp lives there)."""
    assert list(rule_breaks([Edge("exchange.policy", "exchange.server.app", 3)]))


def test_a_cycle_is_reported() -> None:
    """Two modules importing each other form a cycle, whatever their layers."""
    edges = [
        Edge("zonegate.cli", "zonegate.explain", 1),
        Edge("zonegate.explain", "zonegate.cli", 2),
    ]
    assert list(cycles(edges)) == ["import cycle: zonegate.cli -> zonegate.explain -> zonegate.cli"]


def test_imports_inside_functions_count(tmp_path: Path) -> None:
    """A lazy import in a function body is an import all the same."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sidecar.proxy import Proxy\n    return Proxy\n")
    found = list(imports("exchange.m", module, {"sidecar.proxy"}))
    assert found == [Edge("exchange.m", "sidecar.proxy", 2)]


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md matches the tree: every module of every package is named there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        name
        for name, path in modules(ROOT).items()
        if path.stem not in ("__init__", "__main__", "py") and f"`{path.stem}`" not in doc
    ]
    assert missing == []
