"""`zonegate demo --once` and `zonegate explain`, run as a user runs them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from devkit.provider import DevOpenIDProvider
from tests.conftest import exchange_document


async def zonegate(
    *args: str, stdin: bytes | None = None, timeout: float = 90
) -> tuple[int, str, str]:
    """Run the CLI in a subprocess without blocking the loop that serves the test OP."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zonegate.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    return process.returncode or 0, out.decode(), err.decode()


@pytest.mark.parametrize("mode", [[], ["--remote"]], ids=["embedded", "remote"])
async def test_demo_once_walks_through_and_passes(mode: list[str]) -> None:
    """The demo's walkthrough behaves as described, embedded and remote, and exits 0."""
    code, out, err = await zonegate("demo", "--once", *mode)
    assert code == 0, out + err
    assert "every step behaved as described" in out
    assert "FAILED" not in out
    assert "eyJ" not in out + err  # no JWT is ever printed


@pytest.fixture
def exchange_yaml(op: DevOpenIDProvider, tmp_path: Path) -> Path:
    path = tmp_path / "exchange.yaml"
    path.write_text(yaml.safe_dump(exchange_document(op)))
    return path


async def test_explain_prints_every_step_and_the_claims(
    op: DevOpenIDProvider, exchange_yaml: Path, tmp_path: Path
) -> None:
    """explain shows issuer, key, claims, zone, scope and lifetime, and never the token."""
    token = op.mint({"email": "alice@example.com"})
    (tmp_path / "token").write_text(token)
    code, out, err = await zonegate(
        "explain",
        "--config",
        str(exchange_yaml),
        "--subject-token",
        f"@{tmp_path / 'token'}",
        "--audience",
        "billing",
        "--client",
        "shop-frontend",
    )
    assert code == 0, out + err
    for step in ("subject_token issuer", "subject_token key", "zone", "scope", "lifetime"):
        assert f"✓ {step}" in out
    assert '"iss": "http://127.0.0.1:8081/zones/red"' in out
    assert '"email": "alice@example.com"' in out
    assert token not in out and token.split(".")[2] not in out


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["--audience", "nowhere"], "invalid_target"),
        (["--audience", "billing", "--scope", "billing:write"], "invalid_scope"),
        (["--audience", "billing", "--client", "reports"], "unauthorized_client"),
    ],
)
async def test_explain_names_the_refusal(
    op: DevOpenIDProvider, exchange_yaml: Path, args: list[str], refusal: str
) -> None:
    """A refused decision exits 1 and says which rule refused it and why."""
    args = args if "--client" in args else [*args, "--client", "shop-frontend"]
    code, out, _ = await zonegate(
        "explain",
        "--config",
        str(exchange_yaml),
        "--subject-token",
        "-",
        *args,
        stdin=op.mint().encode(),
    )
    assert code == 1
    assert "✗ refused" in out and refusal in out


async def test_explain_expired_token(
    op: DevOpenIDProvider, exchange_yaml: Path, now: float
) -> None:
    """An expired subject token is explained as invalid_request with how long ago it expired."""
    code, out, _ = await zonegate(
        "explain",
        "--config",
        str(exchange_yaml),
        "--client",
        "shop-frontend",
        "--subject-token",
        op.mint({"exp": int(now) - 600}),
        "--audience",
        "billing",
    )
    assert code == 1
    assert "invalid_request" in out and "expired" in out


async def test_explain_without_client_walks_every_client(
    op: DevOpenIDProvider, exchange_yaml: Path
) -> None:
    """The pinned form (no --client) explains each configured client's decision in turn."""
    code, out, err = await zonegate(
        "explain",
        "--config",
        str(exchange_yaml),
        "--subject-token",
        "-",
        "--audience",
        "orders",
        stdin=op.mint().encode(),
    )
    assert code == 0, out + err
    assert "client reports:" in out and "client shop-frontend:" in out
    assert out.count("would issue a token") == 2


def test_a_taken_demo_port_is_named() -> None:
    """When a fixed demo port is taken, the message names it and there is no traceback."""
    import socket as socket_module
    import subprocess
    import sys

    from devkit.demo import PORTS

    holder = socket_module.socket()
    holder.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", PORTS["sidecar"]))
    except OSError:
        holder.close()
        pytest.skip(f"port {PORTS['sidecar']} is in use by something else already")
    holder.listen()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "zonegate.cli", "demo"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert f"127.0.0.1:{PORTS['sidecar']}" in result.stderr and "Traceback" not in result.stderr
