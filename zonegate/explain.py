"""``zonegate explain``: run the core's whole decision for a token, print every step, mint nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from exchange import mint
from exchange.config import ExchangeConfig, load_exchange_config
from exchange.core import ExchangeCore, Trace, subject_hash
from exchange.errors import ExchangeError
from exchange.keys import KeyRing, ZoneKeys, generate_private_key, signing_key
from exchange.server.wiring import build_core
from exchange.tokens import TokenExchangeRequest, parse_scope
from exchange.validate import peek
from runtime.configload import config_kind, load_yaml, secrets_unread
from sidecar.config import EmbeddedExchange, load_sidecar_config


def read_token(value: str) -> str:
    """The token itself, from the argument, ``@FILE`` or ``-`` (stdin): keeps it out of ps."""
    if value == "-":
        return sys.stdin.read().strip()
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise SystemExit(
                f"zonegate explain: cannot read the subject token from {path}: {reason}"
            ) from e
    return value.strip()


def load_config(path: Path) -> tuple[ExchangeConfig, str | None]:
    """The exchange config (and client), from an exchange config or an embedded sidecar config.
    Client secrets are not read: explain authenticates nobody."""
    with secrets_unread():
        if config_kind(load_yaml(path)) != "sidecar":
            return load_exchange_config(path), None
        exchange = load_sidecar_config(path).exchange
    if not isinstance(exchange, EmbeddedExchange):
        raise SystemExit(
            f"{path}: the sidecar's exchange is remote; run explain with the exchange server's config"
        )
    return exchange.core, exchange.client_id


def placeholder_keys(config: ExchangeConfig) -> KeyRing:
    """Throwaway zone keys: explain decides and signs nothing, so it needs no key files."""
    key = signing_key(generate_private_key("ES256"))
    return KeyRing({zone: ZoneKeys(key) for zone in config.zones})


def pick_clients(config: ExchangeConfig, wanted: str | None, default: str | None) -> list[str]:
    """--client, else the sidecar's client, else every configured client in turn."""
    if wanted or default:
        return [str(wanted or default)]
    return sorted(config.clients)


def _line(out: TextIO, mark: str, step: str, detail: str) -> None:
    out.write(f"  {mark} {step:<22} {detail}\n")


async def explain(
    config: ExchangeConfig, request: TokenExchangeRequest, client_ids: list[str], out: TextIO
) -> int:
    """Print the decision for ``request`` per client; 0 when a token would be issued to one."""
    core = build_core(config, keys=placeholder_keys(config))  # explain signs nothing
    size = len(request.subject_token)
    out.write(f"subject token sha256:{subject_hash(request.subject_token)} ({size} bytes)\n")
    _describe_unverified(request.subject_token, out, config.max_token_size)
    try:
        outcomes = [
            await _explain_client(core, request, c, out, len(client_ids) > 1) for c in client_ids
        ]
    finally:
        await core.close()
    return 0 if any(outcomes) else 1


async def _explain_client(
    core: ExchangeCore, request: TokenExchangeRequest, client_id: str, out: TextIO, heading: bool
) -> bool:
    """One client's decision, step by step; True when it would get a token."""
    if heading:
        out.write(f"client {client_id}:\n")
    trace, now = Trace(), time.time()
    try:
        verified = await core.verify(request, core.client(client_id), now, trace)
    except ExchangeError as e:
        for step, detail in trace.steps:
            _line(out, "✓", step, detail)
        _line(out, "✗", "refused", f"{e.error} ({e.status_hint}): {e.description}")
        return False
    for step, detail in trace.steps:
        _line(out, "✓", step, detail)
    decision = verified.decision
    claims = mint.claims_for(
        decision,
        issuer=core.config.zone_issuer(decision.zone.name),
        client_id=client_id,
        now=now,
        jti="(random)",
    )
    out.write("would issue a token with claims:\n")
    out.write(json.dumps(claims, indent=2, sort_keys=True) + "\n")
    return True


def _describe_unverified(token: str, out: TextIO, max_size: int) -> None:
    """What the token says about itself (the core's own parse), before anything is verified."""
    try:
        unverified = peek(token, what="subject_token", max_size=max_size)
    except ExchangeError as e:
        out.write(f"  (cannot be read: {e.description})\n")
        return
    seen = {k: unverified.header.get(k) for k in ("alg", "kid", "typ")}
    out.write(f"  header {json.dumps(seen)}\n")
    claims = unverified.claims
    shown = {k: claims[k] for k in ("iss", "sub", "aud", "exp", "scope") if k in claims}
    out.write(f"  claims (unverified) {json.dumps(shown)}\n")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``zonegate explain``."""
    logging.getLogger("zonegate.keys").setLevel(logging.ERROR)  # nothing is signed here
    config, default_client = load_config(args.config)
    try:
        request = TokenExchangeRequest(
            subject_token=read_token(args.subject_token),
            audience=tuple(args.audience),
            resource=tuple(args.resource),
            scope=parse_scope(args.scope) if args.scope is not None else None,
        )
    except ExchangeError as e:
        print(f"zonegate explain: {e.error}: {e.description}", file=sys.stderr)
        return 1
    client_ids = pick_clients(config, args.client, default_client)
    return asyncio.run(explain(config, request, client_ids, sys.stdout))
