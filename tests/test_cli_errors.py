"""The CLI's errors: one per cause, all in one run, naming the file, line and fix."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_config import VALID


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zonegate.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The indented problem lines of a config error."""
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


def write(tmp_path: Path, document: Any, name: str = "exchange.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def valid() -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    document["clients"][0]["client_secret"] = "s"
    return document


def test_an_unset_environment_variable_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """${UNSET} is reported once, naming the variable, not also as a missing secret."""
    monkeypatch.delenv("ZONEGATE_TEST_UNSET", raising=False)
    document = valid()
    document["clients"][0]["client_secret"] = "${ZONEGATE_TEST_UNSET}"
    result = run("check", str(write(tmp_path, document)))
    assert result.returncode == 2
    assert problems(result) == [
        "clients[0].client_secret: environment variable ZONEGATE_TEST_UNSET is not set "
        "(set it, or write the value)"
    ]


def test_key_file_errors_come_with_every_other_error(tmp_path: Path) -> None:
    """A bad key file and a typo are both reported by the same run."""
    (tmp_path / "red.pem").write_text("not a key")
    document = valid()
    document["zones"]["red"]["signing_key_file"] = "red.pem"
    document["zones"]["red"]["typo"] = 1
    found = problems(run("check", str(write(tmp_path, document))))
    assert any(p.startswith("zones.red.typo: unknown key") for p in found), found
    assert any(
        p.startswith("zones.red.signing_key_file:") and "not an unencrypted PEM private key" in p
        for p in found
    ), found


def test_broken_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    """A YAML syntax error says where, as file:line:column, not <unicode string>."""
    path = tmp_path / "broken.yaml"
    path.write_text("issuer: http://x\nzones:\n  red: [billing\n")
    result = run("check", str(path))
    assert result.returncode == 2
    assert problems(result)[0].startswith(f"{path}:4:1: not valid YAML")
    assert "<unicode string>" not in result.stderr


def test_another_programs_config_is_named_as_such(tmp_path: Path) -> None:
    """A sidecar config given to the exchange server is one error saying what it is."""
    sidecar = {
        "routes": [
            {"path_prefix": "/red/", "upstream": "http://127.0.0.1:9", "audience": "billing"}
        ]
    }
    path = write(tmp_path, sidecar, "sidecar.yaml")
    result = run("exchange", "--config", str(path))
    assert result.returncode == 2
    assert problems(result) == [
        f"{path}: this is a sidecar config, not an exchange config "
        f"(run `zonegate sidecar --config {path}`, or `zonegate check {path}`)"
    ]


def test_explain_names_an_unreadable_token_file(tmp_path: Path) -> None:
    """explain --subject-token @FILE says which file it could not read; no traceback."""
    result = run(
        "explain", "--config", str(write(tmp_path, valid())), "--subject-token", "@/nope.jwt",
        "--audience", "billing",
    )  # fmt: skip
    assert result.returncode != 0
    assert "/nope.jwt" in result.stderr and "Traceback" not in result.stderr


def test_explain_needs_no_client_secrets(tmp_path: Path) -> None:
    """explain authenticates nobody, so secrets it cannot read do not stop it."""
    document = valid()
    document["clients"][0].pop("client_secret")
    document["clients"][0]["client_secret_file"] = "missing-secret"
    result = run(
        "explain", "--config", str(write(tmp_path, document)), "--subject-token", "a.b.c",
        "--audience", "billing",
    )  # fmt: skip
    assert "invalid configuration" not in result.stderr, result.stderr
    assert "subject token sha256:" in result.stdout


def test_a_garbage_token_is_described_without_library_internals(tmp_path: Path) -> None:
    """A malformed token's reason names the part that is wrong, no codec or parser message."""
    result = run(
        "explain", "--config", str(write(tmp_path, valid())), "--subject-token", "%%%.e30.sig",
        "--audience", "billing",
    )  # fmt: skip
    assert "header is not base64url-encoded JSON" in result.stdout
    for internal in ("codec", "utf-8", "Expecting value", "Incorrect padding", "Invalid"):
        assert internal not in result.stdout, result.stdout


def test_json_is_yaml_too(tmp_path: Path) -> None:
    """A JSON config file loads (YAML is a superset), so generated configs work as they are."""
    path = tmp_path / "exchange.json"
    path.write_text(json.dumps(valid()))
    assert run("check", str(path)).returncode == 0
