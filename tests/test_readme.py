"""The README's embedding snippet runs as printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def embedding_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding the core", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md lost its embedding snippet"
    return match.group(1)


async def test_readme_embedding_snippet_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snippet's imports resolve and a malformed user token prints the RFC 8693 error."""
    monkeypatch.chdir(ROOT)
    namespace: dict[str, Any] = {}
    exec(compile(embedding_snippet(), "README.md", "exec"), namespace)
    await namespace["main"]("not-a-jwt")
    assert capsys.readouterr().out.startswith("invalid_request 400 subject_token is not a JWT")
