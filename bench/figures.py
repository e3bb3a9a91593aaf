"""The figures of issue 7, each measured against a baseline taken in the same run."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from bench.client import Timed, burst, request_bytes, sequential
from bench.procs import child_env, pinned, wait_http
from bench.report import Row, delta_ms, ratio
from bench.stack import AUDIENCE, CLIENT_ID, CLIENT_SECRET, SCOPE, Stack, embedded_document
from bench.tools import WrkResult, post_script, wrk

MB = 1024 * 1024
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_CONNECTIONS = 8


@dataclass(frozen=True, slots=True)
class Size:
    """How much of everything one run does."""

    seconds: float  # per throughput run (wrk: whole seconds)
    latency_seconds: float  # per fixed-rate latency run
    warmup: float
    rounds: int  # throughput runs per target; the best counts (same rule for every target)
    connections: int
    rate: float  # requests per second for the latency figure
    cold: int  # cold misses (and as many hits) per mode
    burst: int
    entries: int
    starts: int
    crypto_seconds: float


FULL = Size(3.0, 3.0, 1.0, 3, 32, 500, 200, 1000, 100_000, 3, 2.0)
TINY = Size(1.0, 0.3, 0.0, 1, 4, 100, 5, 20, 1000, 1, 0.2)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_subject(stack: Stack) -> str:
    """A fresh ES256 subject token from the blue OP: a key the cache has never seen."""
    return stack.op.mint(alg="ES256")


# -- cache-hit throughput -------------------------------------------------------------------------


async def load(
    stack: Stack,
    url: str,
    seconds: float,
    connections: int,
    headers: dict[str, str] | None = None,
    script: Path | None = None,
) -> WrkResult:
    """wrk from the load CPU."""
    return await wrk(
        url,
        seconds=seconds,
        connections=connections,
        cpu=stack.ws.load_cpu,
        headers=headers,
        script=script,
    )


@dataclass(frozen=True, slots=True)
class Throughput:
    """The best wrk run of a target and the CPU its process spent per request."""

    result: WrkResult
    cpu_us: float

    def __str__(self) -> str:
        return f"{self.result.requests_per_second:,.0f} req/s, {self.cpu_us:.0f} us CPU/req"


async def measured(stack: Stack, size: Size, target: tuple[str, str, dict[str, str]]) -> Throughput:
    proc_names, url, headers = target  # "a+b": the CPU of both processes, summed
    procs = [stack.procs[name] for name in proc_names.split("+")]
    cpu = sum(proc.cpu_seconds() for proc in procs)
    result = await load(stack, url, size.seconds, size.connections, headers)
    spent = sum(proc.cpu_seconds() for proc in procs) - cpu
    return Throughput(result, spent * 1e6 / max(result.requests, 1))


async def best_of_rounds(
    stack: Stack, size: Size, targets: dict[str, tuple[str, str, dict[str, str]]]
) -> dict[str, Throughput]:
    """Warm each target up, then ``size.rounds`` interleaved rounds; each keeps its best."""
    if size.warmup:
        for _, url, headers in targets.values():
            await load(stack, url, size.warmup, size.connections, headers)
    best: dict[str, Throughput] = {}
    for _ in range(size.rounds):
        for name, target in targets.items():
            run = await measured(stack, size, target)
            if (
                name not in best
                or run.result.requests_per_second > best[name].result.requests_per_second
            ):
                best[name] = run
    return best


BASELINES = {  # the same-run baselines every throughput row is compared with
    "nginx": "nginx proxy_pass",
    "envoy": "Envoy --concurrency 1",
    "bare": "bare aiohttp proxy",
}
FLOORS = {**BASELINES, "lean": "lean floor: aiohttp low-level server + sidecar/upstream.py"}


def versus(run: Throughput, runs: dict[str, Throughput]) -> str:
    """A run's CPU/req and req/s as ratios to each baseline of the same run."""
    present = [name for name in BASELINES if name in runs]
    cpu = ", ".join(f"{run.cpu_us / runs[n].cpu_us:.2f}x {n}" for n in present)
    rps = ", ".join(
        f"{run.result.requests_per_second / runs[n].result.requests_per_second:.2f}x {n}"
        for n in present
    )
    return f"CPU/req {cpu}; req/s {rps}"


def floor_rows(runs: dict[str, Throughput]) -> list[Row]:
    rows = []
    for name, label in FLOORS.items():
        if name not in runs:
            rows.append(Row(f"(baseline) {label}", "skipped: not installed", "-", "-", "-", None))
            continue
        rows.append(
            Row(f"(baseline) {label}", str(runs[name]), "-", versus(runs[name], runs), "-", None)
        )
    return rows


def cpu_rows(hit: Throughput, runs: dict[str, Throughput]) -> list[Row]:
    """The data path's budget: a hit's CPU/req against the bare proxy and Envoy."""
    rows = []
    for name, limit in (("bare", 0.4), ("envoy", 1.25)):
        if name not in runs:
            continue
        base = runs[name].cpu_us
        rows.append(
            Row(
                "cache-hit CPU per request, sidecar",
                f"{hit.cpu_us:.0f} us CPU/req",
                f"{base:.0f} us CPU/req {BASELINES[name]}",
                ratio(hit.cpu_us, base),
                f"<= {limit}x",
                hit.cpu_us <= limit * base,
            )
        )
    return rows


async def throughput(stack: Stack, size: Size) -> list[Row]:
    sidecar = stack.url("embedded", "sidecar")
    targets = {
        "bare": ("bare", f"{stack.url('bare')}/x", {}),
        "hit": ("embedded", f"{sidecar}/hit/x", bearer(new_subject(stack))),
        "forward": ("embedded", f"{sidecar}/fwd/x", {}),
        "nginx": ("nginx", f"{stack.url('nginx')}/x", {}),
        "lean": ("lean", f"{stack.url('lean')}/x", {}),
    }
    if "envoy" in stack.procs:
        targets["envoy"] = ("envoy", f"{stack.url('envoy')}/x", {})
    if "envoy_authz" in stack.procs:
        subject = bearer(new_subject(stack))
        targets["envoy_authz"] = ("envoy_authz+authz", f"{stack.url('envoy_authz')}/hit/x", subject)
    runs = await best_of_rounds(stack, size, targets)
    hit, bare, nginx = runs["hit"], runs["bare"], runs["nginx"]
    rps = {name: run.result.requests_per_second for name, run in runs.items()}
    return [
        Row(
            "cache-hit throughput, sidecar (1 process)",
            str(hit),
            f"{bare} bare aiohttp proxy",
            ratio(rps["hit"], rps["bare"]),
            ">= 1.0x",
            rps["hit"] >= rps["bare"],
        ),
        Row(
            "cache-hit throughput, sidecar (1 process)",
            str(hit),
            f"{nginx} nginx proxy_pass",
            ratio(rps["hit"], rps["nginx"]),
            ">= 0.4x",
            rps["hit"] >= 0.4 * rps["nginx"],
        ),
        *cpu_rows(hit, runs),
        Row("(context) cache hit, ratios", str(hit), "-", versus(hit, runs), "-", None),
        Row(
            "(context) token-less forward route, sidecar",
            str(runs["forward"]),
            f"{bare} bare aiohttp proxy",
            ratio(rps["forward"], rps["bare"]),
            "-",
            None,
        ),
        *floor_rows(runs),
        *authz_rows(runs),
    ]


def authz_rows(runs: dict[str, Throughput]) -> list[Row]:
    """What each deployment costs: Envoy + zonegate authz (both processes' CPU) beside Envoy
    plain and the zonegate proxy, cache hits all."""
    if "envoy_authz" not in runs:
        return [
            Row("(deployment) Envoy + zonegate authz", "skipped: no Envoy", "-", "-", "-", None)
        ]
    both = runs["envoy_authz"]
    return [
        Row(
            "(deployment) Envoy + zonegate authz, cache hit (CPU of both processes)",
            str(both),
            f"{runs['hit']} zonegate proxy",
            versus(both, runs),
            "-",
            None,
        )
    ]


# -- added latency at a fixed rate ------------------------------------------------------------------


async def open_loop(stack: Stack, size: Size, url: str, headers: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.openloop", url, f"--rate={size.rate}"]
    command += [f"--duration={size.latency_seconds}", f"--warmup={size.warmup}"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    process = await asyncio.create_subprocess_exec(
        *pinned(command, stack.ws.load_cpu), stdout=asyncio.subprocess.PIPE, env=child_env()
    )
    out, _ = await asyncio.wait_for(process.communicate(), size.latency_seconds + size.warmup + 30)
    result: dict[str, Any] = json.loads(out)
    if result["errors"] or result["non_2xx"]:
        raise RuntimeError(f"open loop {url}: {result}")
    return result


async def added_latency(stack: Stack, size: Size) -> list[Row]:
    hot = bearer(new_subject(stack))
    direct = await open_loop(stack, size, f"{stack.url('upstream')}/x", {})
    hop = await open_loop(stack, size, f"{stack.url('embedded', 'sidecar')}/hit/x", hot)
    nginx = await open_loop(stack, size, f"{stack.url('nginx')}/x", {})
    peers = {"nginx proxy_pass": nginx}
    if "envoy" in stack.procs:
        peers["Envoy --concurrency 1"] = await open_loop(stack, size, f"{stack.url('envoy')}/x", {})
    rate = f"{size.rate:.0f} req/s"
    rows = [
        Row(
            f"added latency per hop at {rate}, p{p}",
            f"{hop[f'p{p}_ms']:.3f} ms via sidecar",
            f"{direct[f'p{p}_ms']:.3f} ms direct",
            delta_ms(hop[f"p{p}_ms"], direct[f"p{p}_ms"]),
            f"<= +{limit} ms",
            hop[f"p{p}_ms"] - direct[f"p{p}_ms"] <= limit,
        )
        for p, limit in ((50, 0.35), (99, 2.0))
    ]
    rows += [
        Row(
            f"(context) {name} hop at {rate}, p50 / p99",
            f"{peer['p50_ms']:.3f} / {peer['p99_ms']:.3f} ms",
            f"{direct['p50_ms']:.3f} / {direct['p99_ms']:.3f} ms direct",
            f"{delta_ms(peer['p50_ms'], direct['p50_ms'])} / "
            f"{delta_ms(peer['p99_ms'], direct['p99_ms'])}",
            "-",
            None,
        )
        for name, peer in peers.items()
    ]
    return rows


# -- POST /token ----------------------------------------------------------------------------------


def token_form(subject_token: str) -> str:
    return urllib.parse.urlencode(
        {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN,
            "audience": AUDIENCE,
            "scope": SCOPE,
        }
    )


async def one_zone_token(token_endpoint: str, form: str) -> str:
    auth = aiohttp.BasicAuth(CLIENT_ID, CLIENT_SECRET)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(token_endpoint, data=form, auth=auth, headers=headers) as r,
    ):
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"POST /token: {r.status} {body}")
        return str(body["access_token"])


async def raw_crypto(stack: Stack, size: Size, subject_token: str, zone_token: str) -> float:
    ws = stack.ws
    files = [
        ws.write("subject.jwt", subject_token),
        ws.write("issuer.jwk", json.dumps(stack.op.keys[stack.op.kid_for("ES256")].public_jwk)),
        ws.write("zone.jwt", zone_token),
        stack.zone_key,
    ]
    command = [sys.executable, "-m", "bench.rawcrypto", *map(str, files), str(size.crypto_seconds)]
    process = await asyncio.create_subprocess_exec(
        *pinned(command, ws.test_cpu), stdout=asyncio.subprocess.PIPE, env=child_env()
    )
    out, _ = await asyncio.wait_for(process.communicate(), size.crypto_seconds + 30)
    return float(json.loads(out)["ops_per_second"])


async def token_throughput(stack: Stack, size: Size) -> list[Row]:
    endpoint = f"{stack.url('exchange', 'exchange')}/token"
    subject_token = new_subject(stack)
    form = token_form(subject_token)
    zone_token = await one_zone_token(endpoint, form)
    basic = aiohttp.BasicAuth(CLIENT_ID, CLIENT_SECRET).encode()
    script = stack.ws.write(
        "token.lua",
        post_script(
            form, {"Content-Type": "application/x-www-form-urlencoded", "Authorization": basic}
        ),
    )
    if size.warmup:
        await load(stack, endpoint, size.warmup, TOKEN_CONNECTIONS, script=script)
    exchange = stack.procs["exchange"]
    cpu = exchange.cpu_seconds()
    served = await load(stack, endpoint, size.seconds, TOKEN_CONNECTIONS, script=script)
    cpu_us = (exchange.cpu_seconds() - cpu) * 1e6 / max(served.requests, 1)
    raw = await raw_crypto(stack, size, subject_token, zone_token)
    return [
        Row(
            "POST /token throughput, exchange server (ES256 in, ES256 out)",
            f"{served.requests_per_second:,.0f} req/s, {cpu_us:.0f} us CPU/req",
            f"{raw:,.0f} verify+sign/s raw cryptography ({1e6 / raw:.0f} us each)",
            ratio(served.requests_per_second, raw),
            ">= 0.35x",
            served.requests_per_second >= 0.35 * raw,
        )
    ]


# -- cold misses ----------------------------------------------------------------------------------


def median_ms(timings: list[Timed]) -> float:
    return statistics.median(t.seconds for t in timings) * 1000


async def cold_and_hot(stack: Stack, size: Size, mode: str) -> tuple[float, float]:
    """p50 of cold misses (a new subject each) and of hits, interleaved on one connection."""
    url = URL(f"{stack.url(mode, 'sidecar')}/hit/x")
    hot = request_bytes(url, headers=bearer(new_subject(stack)))
    requests = [hot]  # its miss is not counted
    for _ in range(size.cold):
        requests += [request_bytes(url, headers=bearer(new_subject(stack))), hot]
    timings = await sequential(url, requests)
    if any(t.status != 200 for t in timings):
        raise RuntimeError(f"{mode}: {Counter(t.status for t in timings)}")
    return median_ms(timings[1::2]), median_ms(timings[2::2])


async def cold_miss(stack: Stack, size: Size) -> list[Row]:
    rows = []
    for mode, limit in (("embedded", 1.0), ("remote", 3.0)):
        cold, hot = await cold_and_hot(stack, size, mode)
        rows.append(
            Row(
                f"cold-miss latency, {mode}, p50",
                f"{cold:.3f} ms",
                f"{hot:.3f} ms cache hit",
                delta_ms(cold, hot),
                f"<= +{limit:g} ms",
                cold - hot <= limit,
            )
        )
    return rows


# -- single flight ----------------------------------------------------------------------------------


async def sidecar_counters(admin: str) -> dict[str, float]:
    """Exchanges and cache results from the sidecar's /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as r:
        text = await r.text()
    counters: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "zonegate_sidecar_exchanges_total":
                counters["exchanges"] += sample.value
            elif sample.name == "zonegate_sidecar_token_cache_total":
                counters[sample.labels["result"]] += sample.value
    return counters


async def single_flight(stack: Stack, size: Size) -> list[Row]:
    admin = stack.url("embedded", "admin")
    url = URL(f"{stack.url('embedded', 'sidecar')}/hit/x")
    before = await sidecar_counters(admin)
    timings = await burst(url, request_bytes(url, headers=bearer(new_subject(stack))), size.burst)
    after = await sidecar_counters(admin)
    delta = {k: int(after[k] - before[k]) for k in ("exchanges", "miss", "coalesced", "hit")}
    ok = sum(1 for t in timings if t.status == 200)
    return [
        Row(
            f"{size.burst} concurrent first requests, one new token",
            f"{delta['exchanges']} exchange(s); {ok}/{size.burst} answered 200",
            f"{delta['miss']} miss, {delta['coalesced']} coalesced, {delta['hit']} hit",
            "-",
            "exactly 1 exchange",
            delta["exchanges"] == 1 and ok == size.burst,
        )
    ]


# -- memory and start-up --------------------------------------------------------------------------


async def memory(stack: Stack, size: Size, idle_kib: dict[str, int]) -> list[Row]:
    endpoint = f"{stack.url('exchange', 'exchange')}/token"
    template = stack.ws.write(
        "template.jwt", await one_zone_token(endpoint, token_form(new_subject(stack)))
    )
    command = [sys.executable, "-m", "bench.cachemem", str(size.entries), str(template)]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, env=child_env()
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    filled = json.loads(out)
    loaded = stack.procs["embedded"].rss_kib()
    return [
        Row(
            f"sidecar RSS idle, {mode}",
            f"{kib / 1024:.1f} MB",
            "-",
            "-",
            "<= 60 MB",
            kib * 1024 <= 60 * MB,
        )
        for mode, kib in idle_kib.items()
    ] + [
        Row(
            f"RSS per cached entry at {size.entries:,} entries",
            f"{filled['bytes_per_entry']:.0f} B/entry ({filled['token_bytes']} B tokens)",
            f"RSS {filled['rss_before_kib'] / 1024:.1f} -> {filled['rss_after_kib'] / 1024:.1f} MB",
            "-",
            "<= 2 KB",
            filled["bytes_per_entry"] <= 2048,
        ),
        Row(
            "(context) embedded sidecar RSS after every load above",
            f"{loaded / 1024:.1f} MB",
            "-",
            "-",
            "-",
            None,
        ),
    ]


async def start_to_ready(stack: Stack, size: Size) -> list[Row]:
    """``zonegate sidecar`` (embedded: it also fetches the OP's keys) from exec to /readyz 200."""
    document = embedded_document(stack, stack.url("upstream"))
    seconds = []
    for i in range(size.starts):
        started = time.monotonic()
        proc = await stack.ws.zonegate(f"start{i}", "sidecar", document, listeners=2)
        await wait_http(proc, f"{proc.urls['admin']}/readyz")
        seconds.append(time.monotonic() - started)
        await proc.stop()
    median = statistics.median(seconds)
    return [
        Row(
            f"start to /readyz 200, embedded sidecar (median of {size.starts})",
            f"{median:.3f} s",
            "-",
            "-",
            "<= 1 s",
            median <= 1.0,
        )
    ]
