"""The README's embedding snippet runs as printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def quick_starts() -> list[str]:
    """The README's shell blocks under "Three deployments"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Three deployments", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["embedded", "standalone"])
def test_readme_quick_start_runs_as_printed(index: int, tmp_path: Path) -> None:
    """Each quick start, run verbatim by bash in a fresh copy of config/, gets a 200 from the
    backend through the sidecar (and explain prints its steps)."""
    script = quick_starts()[index]
    shutil.copytree(ROOT / "config", tmp_path / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    wrapped = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    result = subprocess.run(
        ["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "200" in result.stdout.splitlines()
    if "zonegate explain" in script:
        assert "subject token sha256:" in result.stdout
