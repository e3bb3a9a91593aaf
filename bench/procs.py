"""The processes a benchmark runs: zonegate programs, the bare proxy and nginx, all on loopback.

Every process gets its own log file in the run's temporary folder. Processes under test are
pinned to one CPU and load generators and upstreams to the other (when there are two), so the
figures compare programs, not the scheduler's mood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"zonegate (\S+) listening on (https?://\S+)")
START_TIMEOUT = 20.0


def cpus() -> tuple[int | None, int | None]:
    """(CPU for the process under test, CPU for load and upstream); None: do not pin."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return None, None
    return 0, 1


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def child_env() -> dict[str, str]:
    """The environment of child processes: ``bench`` importable from their temporary cwd."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def free_port() -> int:
    """A port that was free a moment ago (for nginx, which cannot report a port 0 choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """A running program and where it listens."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    async def stop(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def failure(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        return RuntimeError(f"{self.name}: {what}\n--- {self.log} ---\n{tail}")


class Workspace:
    """A temporary folder and the processes started in it; ``close`` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.test_cpu, self.load_cpu = cpus()

    def write(self, name: str, content: str | dict[str, Any]) -> Path:
        path = self.root / name
        text = content if isinstance(content, str) else json.dumps(content, indent=2)
        path.write_text(text)  # JSON is YAML: the config loaders read it as is
        return path

    async def spawn(
        self, name: str, command: list[str], *, cpu: int | None, stdout_pipe: bool = False
    ) -> Proc:
        log = self.root / f"{name}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *pinned(command, cpu),
                stdout=asyncio.subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                stdin=asyncio.subprocess.DEVNULL,
                cwd=self.root,
                env=child_env(),
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    async def zonegate(
        self, name: str, program: str, config: dict[str, Any], *, listeners: int
    ) -> Proc:
        """``zonegate sidecar|exchange --config F``, once it has said where it listens."""
        path = self.write(f"{name}.yaml", config)
        command = [sys.executable, "-m", "zonegate.cli", program, "--config", str(path)]
        proc = await self.spawn(name, command, cpu=self.test_cpu, stdout_pipe=True)
        await read_listeners(proc, listeners)
        return proc

    async def python(self, name: str, module: str, *args: str, cpu: int | None) -> Proc:
        """``python -m module args``, printing ``zonegate NAME listening on URL`` like ours."""
        proc = await self.spawn(
            name, [sys.executable, "-m", module, *args], cpu=cpu, stdout_pipe=True
        )
        await read_listeners(proc, 1)
        return proc

    async def nginx(self, name: str, server: str, *, cpu: int | None, http: str = "") -> Proc:
        """An unprivileged single-process nginx with its own prefix, serving ``server``."""
        prefix = self.root / name
        (prefix / "tmp").mkdir(parents=True)
        port = free_port()
        conf = self.write(f"{name}.conf", nginx_conf(prefix, port, server, http))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        command = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
        proc = await self.spawn(name, command, cpu=cpu)
        proc.urls["http"] = f"http://127.0.0.1:{port}"
        await wait_http(proc, f"{proc.urls['http']}/", expect=None)
        return proc

    async def envoy(
        self,
        name: str,
        binary: Path,
        upstream_url: str,
        *,
        cpu: int | None,
        authz_url: str | None = None,
    ) -> Proc:
        """Envoy, one worker thread (``--concurrency 1``), plain HTTP/1.1 to ``upstream_url``
        (asking the zonegate authz listener at ``authz_url`` first, when given)."""
        port = free_port()
        conf = self.write(f"{name}.json", envoy_bootstrap(port, upstream_url, authz_url))
        command = [str(binary), "-c", str(conf), "--concurrency", "1", "--disable-hot-restart"]
        command += ["--log-level", "warn"]
        proc = await self.spawn(name, command, cpu=cpu)
        proc.urls["http"] = f"http://127.0.0.1:{port}"
        # with ext_authz a call without a token is refused: any answer means Envoy is up
        await wait_http(proc, f"{proc.urls['http']}/", expect=None if authz_url else 200)
        return proc

    async def close(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()


async def read_listeners(proc: Proc, count: int) -> None:
    """Read ``zonegate NAME listening on URL`` lines from the process's stdout."""
    assert proc.process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    while len(proc.urls) < count:
        try:
            line = await asyncio.wait_for(
                proc.process.stdout.readline(), max(0.1, deadline - time.monotonic())
            )
        except TimeoutError as e:
            raise proc.failure("did not start in time") from e
        if not line:
            raise proc.failure("exited before listening")
        m = LISTENING.search(line.decode(errors="replace"))
        if m:
            proc.urls[m.group(1)] = m.group(2)


async def wait_http(proc: Proc | None, url: str, *, expect: int | None = 200) -> float:
    """Poll ``url`` until it answers (with ``expect``, when given); return seconds waited."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - started < START_TIMEOUT:
            if proc is not None and proc.process.returncode is not None:
                raise proc.failure(f"exited with {proc.process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url) as r:
                    if expect is None or r.status == expect:
                        return time.monotonic() - started
            await asyncio.sleep(0.005)
    raise RuntimeError(f"{url} did not answer {expect} within {START_TIMEOUT} s")


def nginx_conf(prefix: Path, port: int, server: str, http: str = "") -> str:
    """A self-contained nginx.conf: one process, no root, every path under ``prefix``."""
    tmp = prefix / "tmp"
    return f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {prefix}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {server}
    }}
    {http}
}}
"""


UPSTREAM_SERVER = """
        default_type application/json;
        location / { return 200 '{"ok":true,"from":"upstream"}\\n'; }
"""


def proxy_pass(upstream_url: str) -> tuple[str, str]:
    """nginx ``proxy_pass`` with a keep-alive upstream pool: (server block, http block)."""
    server = """
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
"""
    hostport = upstream_url.removeprefix("http://")
    http = f"upstream backend {{ server {hostport}; keepalive 64; keepalive_requests 1000000; }}"
    return server, http


def envoy_bootstrap(port: int, upstream_url: str, authz_url: str | None = None) -> dict[str, Any]:
    """A static Envoy bootstrap: one HTTP/1.1 listener routing everything to one cluster;
    with ``authz_url``, ext_authz asks that zonegate authz listener first (as
    config/envoy/envoy.yaml does)."""
    host, _, upstream_port = upstream_url.removeprefix("http://").rpartition(":")
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP1",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            *([ext_authz_filter()] if authz_url else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters = [static_cluster("upstream", host, int(upstream_port))]
    if authz_url:
        authz_host, _, authz_port = authz_url.removeprefix("http://").rpartition(":")
        clusters.append(static_cluster("authz", authz_host, int(authz_port)))
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        }
    }


def static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def ext_authz_filter() -> dict[str, Any]:
    """ext_authz as in config/envoy/envoy.yaml: the zonegate authz listener, /check prefix."""
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "status_on_error": {"code": "ServiceUnavailable"},
            "allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]},
            "http_service": {
                "server_uri": {"uri": "http://authz", "cluster": "authz", "timeout": "1s"},
                "path_prefix": "/check",
                "authorization_response": {
                    "allowed_upstream_headers": {"patterns": [{"exact": "authorization"}]}
                },
            },
        },
    }
