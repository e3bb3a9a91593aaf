"""Reading YAML config into typed models, with errors that name the YAML path and the fix.

A ``Node`` wraps one mapping of the document at its path (``routes[2]``). Readers record every
problem instead of stopping at the first, and ``finish()`` reports keys nobody read: a typo must
not silently disable a check. ``${ENV}`` is expanded in strings, and ``<name>_file`` keys read a
secret from a file (how Kubernetes Secrets mount); relative paths resolve against the config
file's folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MISSING: Any = object()
# When a set, every key path read is recorded (``routes[].audience``): the test that keeps the
# loader, the JSON Schema and docs/configuration.md in agreement switches it on.
READ_KEYS: set[str] | None = None
READ_SECRETS: ContextVar[bool] = ContextVar("read_secrets", default=True)
UNREAD_SECRET = "<not read>"


class ConfigError(Exception):
    """A config file that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class Problems:
    """Collects every problem found while reading one document, one per cause: once a value
    is known bad (an unset environment variable, an unreadable file), later complaints about
    the same path are left out (they would only repeat the cause, misleadingly)."""

    lines: list[str] = field(default_factory=list)
    blamed: set[str] = field(default_factory=set)

    def add(self, path: str, message: str) -> None:
        if path in self.blamed:
            return
        self.lines.append(f"{path or '<top>'}: {message}")

    def blame(self, path: str, message: str) -> None:
        """Report ``message`` and stay quiet about ``path`` from now on."""
        self.add(path, message)
        self.blamed.add(path)


class Node:
    """One mapping of a config document, read key by key."""

    def __init__(self, data: Any, path: str, problems: Problems, base_dir: Path) -> None:
        self.path = path
        self.problems = problems
        self.base_dir = base_dir
        self._seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            problems.add(path, f"must be a mapping, got {_kind(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def _read(self, key: str) -> None:
        self._seen.add(key)
        if READ_KEYS is not None:
            READ_KEYS.add(re.sub(r"\[\d+\]", "[]", self.at(key)))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.problems.add(self.at(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self._read(key)
        return self.data.get(key)

    def _typed(self, key: str, kind: type[T] | tuple[type, ...], name: str, default: Any) -> Any:
        self._read(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                self.error(key, "required")
                return None
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            self.error(key, f"must be {name}, got a boolean")
            return default if default is not _MISSING else None
        if not isinstance(value, kind):
            self.error(key, f"must be {name}, got {_kind(value)}")
            return default if default is not _MISSING else None
        return value

    def text(self, key: str, default: Any = _MISSING) -> Any:
        """A string, with ``${ENV}`` expanded."""
        value = self._typed(key, str, "a string", default)
        if isinstance(value, str):
            return self._expand(key, value)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is not None and value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
            return default if default is not _MISSING else None
        return value

    def flag(self, key: str, default: bool) -> bool:
        value: bool = self._typed(key, bool, "true or false", default)
        return value

    def number(
        self, key: str, default: Any = _MISSING, *, minimum: float = 0, maximum: float = 1e12
    ) -> Any:
        value = self._typed(key, (int, float), "a number", default)
        if value is not None and not (minimum <= value <= maximum):
            self.error(key, f"must be between {minimum:g} and {maximum:g}, got {value}")
            return default if default is not _MISSING else None
        return value

    def integer(
        self, key: str, default: Any = _MISSING, *, minimum: int = 0, maximum: int = 10**9
    ) -> Any:
        value = self._typed(key, int, "a whole number", default)
        if value is not None and not (minimum <= value <= maximum):
            self.error(key, f"must be between {minimum} and {maximum}, got {value}")
            return default if default is not _MISSING else None
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings; a single string is accepted as a list of one."""
        self._read(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                self.error(key, "required")
                return ()
            return default
        value = self.data[key]
        if isinstance(value, str):
            return (self._expand(key, value),)
        if not isinstance(value, list):
            self.error(key, f"must be a list of strings, got {_kind(value)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problems.add(f"{self.at(key)}[{i}]", f"must be a string, got {_kind(item)}")
            else:
                out.append(self._expand(f"{key}[{i}]", item))
        return tuple(out)

    def path_value(self, key: str, default: Any = None) -> Path | None:
        """A file path, relative ones resolved against the config file's folder."""
        value: str | None = self.text(key, default)
        if value is None:
            return None
        return (self.base_dir / os.path.expanduser(value)).resolve()

    def secret(self, key: str) -> str | None:
        """``key`` inline (``${ENV}`` allowed) or ``key_file`` read from a file; not both.
        Under ``secrets_unread()`` neither is read: a given secret stands as a placeholder."""
        file_key = f"{key}_file"
        if not READ_SECRETS.get():
            given = self.has(key) or self.has(file_key)
            self._read(key)
            self._read(file_key)
            return UNREAD_SECRET if given else None
        inline: str | None = self.text(key, None)
        if not self.has(file_key):
            return inline
        if inline is not None:
            self._read(file_key)
            self.error(key, f"give either {key} or {file_key}, not both")
            return inline
        path = self.path_value(file_key)
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            self.problems.blame(
                self.at(file_key), f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
            )
            self.problems.blamed.add(self.at(key))
            return None

    def file_bytes(self, key: str) -> tuple[Path, bytes] | None:
        """The path ``key`` names and the file's bytes; None when absent or unreadable (then
        the problem is recorded at ``key``)."""
        path = self.path_value(key)
        if path is None:
            return None
        try:
            return path, path.read_bytes()
        except OSError as e:
            self.problems.blame(self.at(key), f"cannot read {path}: {e.strerror}")
            return None

    def child(self, key: str, *, required: bool = False) -> Node:
        self._read(key)
        if required and key not in self.data:
            self.error(key, "required")
        return Node(self.data.get(key), self.at(key), self.problems, self.base_dir)

    def children(self, key: str, *, required: bool = False) -> Iterator[Node]:
        """The mappings of a list, each at ``key[i]``."""
        self._read(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.error(key, "required: give at least one entry")
            return
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {_kind(value)}")
            return
        for i, item in enumerate(value):
            yield Node(item, f"{self.at(key)}[{i}]", self.problems, self.base_dir)

    def entries(self, key: str) -> Iterator[tuple[str, Node]]:
        """The mappings of a mapping, each at ``key.name``."""
        node = self.child(key)
        for name, value in node.data.items():
            yield str(name), Node(value, node.at(str(name)), self.problems, self.base_dir)

    def finish(self) -> None:
        """Report keys that were never read: a typo must not silently disable a check."""
        for key in self.data:
            if key not in self._seen:
                self.error(str(key), f"unknown key (known here: {', '.join(sorted(self._seen))})")

    def _expand(self, key: str, value: str) -> str:
        def lookup(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                self.problems.blame(
                    self.at(key),
                    f"environment variable {name} is not set (set it, or write the value)",
                )
                self.problems.blamed.add(self.at(re.sub(r"_file$", "", key)))
                return ""
            return os.environ[name]

        return _ENV_REF.sub(lookup, value)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def load_yaml(path: Path) -> Any:
    """Parse a YAML file, turning every failure into a ConfigError naming the file (and the
    line and column of a syntax error)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([yaml_problem(path, e)]) from e


def yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    """``file:line:column: not valid YAML: what`` (PyYAML counts from 0, editors from 1)."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(
        str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part
    )
    return f"{where}: not valid YAML: {what or type(e).__name__}"


KINDS = ("sidecar", "exchange", "injector")


def config_kind(document: Any) -> str:
    """Which program a config document is for: sidecar (routes), injector (image), exchange."""
    if isinstance(document, dict):
        if "routes" in document:
            return "sidecar"
        if "image" in document:
            return "injector"
    return "exchange"


def load_document(path: Path, kind: str) -> Any:
    """The YAML document of a ``kind`` config; another program's config is one clear error."""
    document = load_yaml(path)
    found = config_kind(document)
    if found != kind:
        raise ConfigError(
            [
                f"{path}: this is {_a(found)} config, not {_a(kind)} config "
                f"(run `zonegate {found} --config {path}`, or `zonegate check {path}`)"
            ]
        )
    return document


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


@contextmanager
def secrets_unread() -> Iterator[None]:
    """Read configs without their secrets (``zonegate explain`` needs none): ``*_file``
    secrets are not opened and stand as a placeholder."""
    token = READ_SECRETS.set(False)
    try:
        yield
    finally:
        READ_SECRETS.reset(token)


def read_document(data: Any, base_dir: Path, build: Callable[[Node], T], path: str = "") -> T:
    """Run ``build`` over the document and raise ConfigError with every problem found."""
    problems = Problems()
    root = Node(data, path, problems, base_dir)
    result = build(root)
    if problems.lines:
        raise ConfigError(problems.lines)
    return result


def parse_listen(node: Node, key: str, default: str) -> tuple[str, int]:
    """A ``host:port`` listen address."""
    value = node.text(key, default) or default
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        node.error(key, f"must be host:port, e.g. 127.0.0.1:8081, got {value!r}")
        return "127.0.0.1", 0
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True, slots=True)
class ListenerTimeouts:
    """How long every listener of a program waits on a client (``listeners:`` in its config)."""

    header_timeout: float = 10.0  # accept -> the first request head complete
    keepalive_timeout: float = 75.0  # an answer -> the next request head complete (idle or not)


def read_listener_timeouts(node: Node) -> ListenerTimeouts:
    """The ``listeners:`` block: ``header_timeout`` and ``keepalive_timeout``, in seconds."""
    timeouts = ListenerTimeouts(
        header_timeout=node.number("header_timeout", 10.0, minimum=0.1, maximum=600),
        keepalive_timeout=node.number("keepalive_timeout", 75.0, minimum=0.1, maximum=3600),
    )
    node.finish()
    return timeouts
