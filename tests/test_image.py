"""The container image is reproducible: a base pinned by digest, dependencies pinned by hash.

Reads Dockerfile, pyproject.toml and requirements.lock as text; imports nothing of zonegate.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

PINNED_FROM = re.compile(r"^FROM\s+(?P<image>\S+?)@sha256:(?P<digest>[0-9a-f]{64})(\s+AS\s+\S+)?$")
# A requirement's distribution name (PEP 508), before extras, markers and version specifiers.
REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised name: pyjwt == PyJWT, prometheus-client == prometheus_client."""
    return re.sub(r"[-_.]+", "-", name).lower()


def from_lines() -> list[str]:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    return [ln for ln in lines if ln.upper().startswith("FROM ")]


def pyproject() -> dict[str, object]:
    return tomllib.loads(PYPROJECT.read_text())


def locked() -> dict[str, list[str]]:
    """Package name -> the lock's requirement entry (its `\\`-continued lines), comments dropped."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in LOCK.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw[:1].isspace():
            match = REQ_NAME.match(line)
            assert match, f"unreadable lock line: {raw!r}"
            current = entries.setdefault(canonical(match.group(1)), [])
        assert current is not None, f"continuation line without a package: {raw!r}"
        current.append(line)
    return entries


def runtime_dependencies() -> list[str]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    deps = list(project["dependencies"])
    # The image runs on uvloop (exchange/serving.py uses it when installed).
    deps += project["optional-dependencies"]["uvloop"]
    return deps


def python_minor_of_tag(image: str) -> str:
    match = re.fullmatch(r"(?:.*/)?python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?", image)
    assert match, f"not a python:X.Y-slim image: {image}"
    return match.group(1)


def test_every_from_line_is_pinned_by_digest() -> None:
    """Every FROM line names its base image by an @sha256 digest of 64 hex digits."""
    lines = from_lines()
    assert lines, "Dockerfile has no FROM line"
    for line in lines:
        assert PINNED_FROM.match(line), f"base image not pinned by digest: {line}"


def test_base_python_minor_equals_ci_and_packaging() -> None:
    """The base image's Python minor equals mypy's python_version and requires-python's floor."""
    data = pyproject()
    tool = data["tool"]
    project = data["project"]
    assert isinstance(tool, dict) and isinstance(project, dict)
    mypy_minor = tool["mypy"]["python_version"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"])
    assert floor, f"requires-python without a plain lower bound: {project['requires-python']}"
    assert floor.group(1) == mypy_minor
    for line in from_lines():
        match = PINNED_FROM.match(line)
        assert match, line
        assert python_minor_of_tag(match.group("image")) == mypy_minor, line


@pytest.mark.parametrize("requirement", runtime_dependencies())
def test_runtime_dependency_is_locked_with_hashes(requirement: str) -> None:
    """Each runtime dependency of pyproject.toml is pinned in requirements.lock with a hash."""
    match = REQ_NAME.match(requirement)
    assert match, requirement
    name = canonical(match.group(1))
    entries = locked()
    assert name in entries, f"{name} is a runtime dependency but not in requirements.lock"
    assert any(ln.startswith("--hash=sha256:") for ln in entries[name]), entries[name][0]


def test_every_locked_package_is_pinned_and_hashed() -> None:
    """Every package in requirements.lock has an exact == version and sha256 hashes."""
    entries = locked()
    assert entries, "requirements.lock lists no package"
    hash_line = re.compile(r"^--hash=sha256:[0-9a-f]{64}( \\)?$")
    for name, lines in entries.items():
        assert re.match(r"^[A-Za-z0-9._-]+==[^\s;]+", lines[0]), f"{name} not pinned: {lines[0]}"
        hashes = lines[1:]
        assert hashes, f"{name} has no --hash"
        for line in hashes:
            assert hash_line.match(line), f"{name}: not a sha256 hash line: {line}"


def test_lock_was_generated_from_pyproject() -> None:
    """requirements.lock's header says pip-compile generated it from pyproject.toml, hashed."""
    header = []
    for line in LOCK.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    command = next((ln for ln in header if "pip-compile" in ln and "--" in ln), "")
    assert command, "lock header has no pip-compile command: regenerate with `make lock`"
    assert command.split()[-1] == "pyproject.toml", command
    assert "--generate-hashes" in command
    assert "--extra=uvloop" in command


def test_dockerfile_installs_with_require_hashes_from_the_lock() -> None:
    """The image installs dependencies only from requirements.lock, hash-checked, no resolver."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY\s+requirements\.lock\s", text, re.M), "lock not copied into the build"
    installs = re.findall(r"pip install ([^\n&]*)", text)
    locked_install = [i for i in installs if "-r requirements.lock" in i]
    assert locked_install, "no `pip install -r requirements.lock`"
    for options in locked_install:
        assert "--require-hashes" in options.split(), options
        assert "--no-deps" in options.split(), options
    # Everything else pip installs (the project itself) must not pull dependencies.
    for options in installs:
        assert "--no-deps" in options.split(), f"pip install without --no-deps: {options}"
