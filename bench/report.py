"""The one table ``make bench`` prints: each figure against its same-run baseline, raw beside it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table; ``holds`` is None for figures without a target."""

    figure: str
    measured: str
    baseline: str
    relative: str
    target: str
    holds: bool | None


def ratio(measured: float, baseline: float) -> str:
    return f"{measured / baseline:.2f}x" if baseline else "n/a"


def delta_ms(measured: float, baseline: float) -> str:
    return f"{measured - baseline:+.3f} ms"


def verdict(holds: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[holds]


def table(rows: list[Row]) -> str:
    """A Markdown table (it reads as plain text too)."""
    header = ("figure", "measured", "baseline (same run)", "relative", "target", "holds")
    lines = [
        header,
        *((r.figure, r.measured, r.baseline, r.relative, r.target, verdict(r.holds)) for r in rows),
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def as_json(rows: list[Row], context: dict[str, Any]) -> str:
    return json.dumps({"context": context, "rows": [asdict(r) for r in rows]}, indent=2)
