"""Log checks for the whole suite, loaded as a pytest plugin by tests/conftest.py.

Every token ``DevOpenIDProvider.mint`` or the exchange core mints, every configured client
secret, and every private key's private member is registered as a secret. Every log record of
the session (root logger, DEBUG and up) and every metrics registry's exposition is scanned at
the end; a test may add text it got elsewhere (a subprocess's output) with ``scan_text``.
Besides registered secrets, anything shaped like a compact JWT and any PEM private key marker
is a leak. ``tests/test_secrets_scan.py`` proves the scanner finds what it should.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from devkit.provider import DevOpenIDProvider
from runtime.logsetup import JsonFormatter

JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.eyJ[A-Za-z0-9_-]{6,}\.")
B64URL_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")
PEM_MARKERS = ("PRIVATE KEY-----", "BEGIN PRIVATE KEY", "BEGIN RSA PRIVATE", "BEGIN EC PRIVATE")
MIN_PLAIN_SECRET = 8  # shorter configured secrets ("wrong") are too common to search for
PREFIX = 32


class SecretScan:
    """Secrets to look for, and the text to look in; ``leaks()`` says what was found where."""

    def __init__(self) -> None:
        self.segments: set[str] = set()  # base64url runs: token payloads/signatures, key members
        self.prefixes: dict[str, str] = {}  # their first 32 characters: truncated copies count
        self.plain: set[str] = set()  # configured secrets, found by substring search
        self.texts: list[tuple[str, str]] = []  # (where, text)

    def token(self, token: str) -> None:
        """A compact JWT: its payload and signature must never appear, whole or cut short."""
        for part in token.split(".")[1:]:
            self.segment(part)

    def segment(self, value: str) -> None:
        if len(value) >= 16:
            self.segments.add(value)
            if len(value) >= PREFIX:
                self.prefixes.setdefault(value[:PREFIX], value)

    def secret(self, value: str | None) -> None:
        if value and len(value) >= MIN_PLAIN_SECRET:
            self.plain.add(value)

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def leaks(self) -> list[str]:
        found: list[str] = []
        for where, text in self.texts:
            found += [f"{where}: {problem}" for problem in self._problems(text)]
        return found

    def _problems(self, text: str) -> Iterator[str]:
        if m := JWT_SHAPE.search(text):
            yield f"a JWT ({m.group(0)[:24]}...)"
        for marker in PEM_MARKERS:
            if marker in text:
                yield f"PEM private key marker {marker!r}"
        for run in B64URL_RUN.findall(text):
            if run in self.segments or (len(run) >= PREFIX and run[:PREFIX] in self.prefixes):
                yield f"token or key material ({run[:12]}...)"
        for secret in self.plain:
            if secret in text:
                yield f"a configured secret ({secret[:3]}...)"


class _Recorder(logging.Handler):
    """Formats every record as the programs print it (JSON) into the scan."""

    def __init__(self, scan: SecretScan) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.scan = scan

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.scan.add(f"log {record.name}", self.format(record))
        except Exception:  # a record that cannot be formatted must not break the test
            self.scan.add(f"log {record.name}", str(record.msg))


SCAN = SecretScan()
_RECORDER = _Recorder(SCAN)
_REGISTRIES: list[CollectorRegistry] = []  # made during the running test


def scan_text(where: str, text: str) -> None:
    """Add text from outside the logging system (a subprocess's output) to the session scan."""
    SCAN.add(where, text)


def register_secret(*values: str) -> None:
    """Remember values (tokens or secrets) that must never show in logs, metrics or outputs."""
    for value in values:
        if value.count(".") == 2:
            SCAN.token(value)
        else:
            SCAN.secret(value)


def _wrap_return(owner: Any, name: str, record: Callable[[Any], None]) -> Callable[[], None]:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        record(result)
        return result

    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def _wrap_init(cls: Any, record: Callable[[Any], None]) -> Callable[[], None]:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        record(self)

    cls.__init__ = __init__
    return lambda: setattr(cls, "__init__", original)


def private_members(key: Any) -> Iterable[str]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
        return (jwk["d"], jwk["p"], jwk["q"])
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return (ECAlgorithm.to_jwk(key, as_dict=True)["d"],)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return (OKPAlgorithm.to_jwk(key, as_dict=True)["d"],)
    return ()


def _record_signing_key(key: Any) -> None:
    for member in private_members(key.private_key):
        SCAN.segment(member)


def _record_registry(registry: CollectorRegistry) -> None:
    _REGISTRIES.append(registry)


def _instrument() -> list[Callable[[], None]]:
    """Record secrets where they are made; nothing changes what the wrapped code returns."""
    from exchange import config as exchange_config_module
    from exchange import keys, mint
    from sidecar import config as sidecar_config

    return [
        _wrap_return(DevOpenIDProvider, "mint", SCAN.token),
        _wrap_return(mint, "sign", SCAN.token),
        _wrap_init(exchange_config_module.ClientConfig, lambda c: SCAN.secret(c.client_secret)),
        _wrap_init(sidecar_config.RemoteExchange, lambda r: SCAN.secret(r.client_secret)),
        _wrap_init(keys.SigningKey, _record_signing_key),
        _wrap_init(CollectorRegistry, _record_registry),
    ]


def _scan_metrics(registries: Iterable[CollectorRegistry]) -> None:
    for registry in registries:
        try:
            text = generate_latest(registry).decode()
        except Exception as e:  # a gauge callback of a torn-down app; nothing to expose
            text = f"unrenderable: {type(e).__name__}"
        SCAN.add("metrics", text)


@contextlib.contextmanager
def recording(handler: logging.Handler) -> Iterator[None]:
    """``handler`` sees every record (DEBUG and up) of the root logger while the block runs."""
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def secrets_scan() -> Iterator[SecretScan]:
    """Session-wide: no token, secret or private key in any log line, metric or scanned output."""
    undo = _instrument()
    with recording(_RECORDER):
        yield SCAN
    for restore in reversed(undo):
        restore()
    _scan_metrics([REGISTRY, *_REGISTRIES])
    leaks = SCAN.leaks()
    assert not leaks, f"{len(leaks)} leak(s) of tokens or secrets: " + "; ".join(leaks[:20])


@pytest.fixture(autouse=True)
def _scan_each_test() -> Iterator[None]:
    """Record logs even if a program replaced the root handlers; expose the test's metrics."""
    root = logging.getLogger()
    if _RECORDER not in root.handlers:
        root.addHandler(_RECORDER)
    if root.level > logging.DEBUG:
        root.setLevel(logging.DEBUG)
    yield
    _scan_metrics(_REGISTRIES)  # every registry the test made, scraped or not
    _REGISTRIES.clear()


class Records(logging.Handler):
    """Every log record of the test: none may be an error or carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def crashes(self) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()[:120]}"
            for r in self.records
            if r.exc_info or r.levelno >= logging.ERROR
        ]


@pytest.fixture
def no_crash() -> Iterator[Records]:
    """Fails the test if anything logged an error or a traceback while it ran."""
    records = Records()
    with recording(records):
        yield records
    assert not records.crashes(), records.crashes()
