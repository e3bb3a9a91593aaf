"""The route table: which upstream and which target a call gets. Pure, no I/O.

A request target is first normalised (RFC 3986 §6.2.2: percent-encoded unreserved characters
decoded, dot segments removed) so ``/green/../red/x`` or ``/green/%2e%2e/red`` is matched,
and forwarded, as the ``/red/x`` an upstream would see. What cannot be normalised without
changing its meaning is refused: an encoded ``/`` or ``\\`` (``%2f``, ``%5c``), a raw ``\\``,
NUL, a double-encoded dot, slash, backslash or NUL (``%252e``), a dot segment with parameters
(``..;``, which Tomcat-style servers treat as ``..``), or a path that climbs above the root.
Routes are tried in order; the first match wins.

A request target that carries a bearer token is refused too (``refuse_token_in_target``): a
URL is written to every access log it passes, so the token would reach the other zone's logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple
from urllib.parse import unquote, unquote_plus

from yarl import URL

from sidecar.config import Route

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|5[fF]|7[eE]|[46][1-9a-fA-F]|[57][0-9aA]|3[0-9])")
_FORBIDDEN_ESCAPE = re.compile(r"%(2[fF]|5[cC]|00)")
_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
# "%25" before an encoded dot, slash, backslash or NUL: one more decoding upstream makes it one.
_DOUBLE_ESCAPE = re.compile(r"%25(2[eEfF]|5[cC]|00)")
_PATH_PARAMS = re.compile(r";|%3[bB]")


class BadPath(ValueError):
    """A request target that cannot be routed safely; the message says why (HTTP 400)."""


class TokenInTarget(BadPath):
    """The request path or query carries a bearer token (RFC 6750 §3.1 ``invalid_request``:
    more than one method of sending a token); the message says where, never the token."""


ACCESS_TOKEN_PARAMETER = "access_token"  # RFC 6750 §2.3, the URI query carrier
_PARAMETER_SEPARATOR = re.compile(r"[&;]")


class Match(NamedTuple):
    """A matched route and the request target to send its upstream."""

    route: Route
    target: str | None  # encoded path and query; None: an authz-only route (no upstream)

    @property
    def url(self) -> URL | None:
        """The whole upstream URL (None: an authz-only route)."""
        if self.target is None or self.route.upstream is None:
            return None
        return URL(str(self.route.upstream.origin()) + self.target, encoded=True)


def normalise_path(raw_path: str) -> str:
    """The normalised form of an encoded path, or BadPath."""
    if (
        raw_path.startswith("/")
        and "%" not in raw_path
        and "." not in raw_path
        and "\\" not in raw_path
        and "\x00" not in raw_path
    ):
        return raw_path  # no escape and no dot segment: already normal (most paths)
    return normalise_escaped_path(raw_path)


def normalise_escaped_path(raw_path: str) -> str:
    """``normalise_path`` for any path: escapes decoded where unambiguous, dot segments
    removed, the ambiguous refused."""
    if not raw_path.startswith("/"):
        raise BadPath("the request path must start with '/'")
    if "\\" in raw_path or "\x00" in raw_path or _ESCAPE.search(raw_path):
        raise BadPath("the request path holds a backslash, NUL or a broken %-escape")
    if _FORBIDDEN_ESCAPE.search(raw_path):
        raise BadPath("encoded '/', '\\' or NUL in the path cannot be routed unambiguously")
    decoded = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw_path)
    if _DOUBLE_ESCAPE.search(decoded):
        raise BadPath("a double-encoded '.', '/', '\\' or NUL cannot be routed unambiguously")
    for segment in decoded.split("/"):
        if segment not in (".", "..") and _PATH_PARAMS.split(segment, 1)[0] in (".", ".."):
            raise BadPath("a dot segment with parameters ('..;') cannot be routed unambiguously")
    return remove_dot_segments(decoded)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, refusing a path that climbs above the root."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if not out:
                raise BadPath("the request path climbs above '/'")
            out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def refuse_token_in_target(raw_target: str, subject_token: str | None) -> None:
    """TokenInTarget when the request target holds the subject token (as sent or
    percent-decoded once) or has an ``access_token`` query parameter (RFC 6750 §2.3), whose
    token may not be the subject's: either would be forwarded in the URL."""
    path, _, query = raw_target.partition("?")
    if subject_token is not None:
        for where, part in (("path", path), ("query", query)):
            if subject_token in part or ("%" in part and subject_token in unquote(part)):
                raise TokenInTarget(
                    f"the request {where} holds the bearer token: a URL is logged at every "
                    "hop, so it is not forwarded; send the token in Authorization only"
                )
    if (
        query
        and _may_name_access_token(query)
        and ACCESS_TOKEN_PARAMETER in _parameter_names(query)
    ):
        raise TokenInTarget(
            f"the query parameter {ACCESS_TOKEN_PARAMETER} (RFC 6750 §2.3) carries a token in "
            "the URL, which is logged at every hop: send the token in Authorization only"
        )


def _may_name_access_token(query: str) -> bool:
    """Cheap first look (the common query has neither): escapes, or the name as it is."""
    return "%" in query or ACCESS_TOKEN_PARAMETER in query.lower()


def _parameter_names(query: str) -> Iterator[str]:
    """The names of a query's parameters, percent-decoded and lower-cased."""
    for pair in _PARAMETER_SEPARATOR.split(query):
        name = pair.partition("=")[0]
        yield (unquote_plus(name) if "%" in name or "+" in name else name).strip().lower()


def split_target(raw_target: str) -> tuple[str, str]:
    """(encoded path, encoded query) of an origin-form request target."""
    path, _, query = raw_target.partition("?")
    return path, query


class RouteTable:
    """Routes in config order; ``match`` returns the first that applies."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, host: str | None, raw_target: str, *, absolute_form: bool) -> Match | None:
        """The route for a request, or None (an open proxy this is not).

        ``host`` is the Host header (origin-form) or the request target's authority
        (absolute-form, i.e. the app uses us as HTTP_PROXY). Routes without a ``host``
        serve origin-form requests only.
        """
        raw_path, query = split_target(raw_target)
        path = normalise_path(raw_path or "/")
        for route in self.routes:
            if route.host is None and absolute_form:
                continue
            if route.host is not None and not host_matches(route.host, host):
                continue
            rest = prefix_rest(route.path_prefix, path)
            if rest is not None:
                forwarded = rest if route.strip_prefix else path
                return Match(route, upstream_target(route, forwarded, query))
        return None


def host_matches(pattern: str, host: str | None) -> bool:
    """A route host without a port matches any port; with a port, only that one."""
    if host is None:
        return False
    host = host.lower().rstrip(".")
    if ":" in pattern.rsplit("]", 1)[-1]:
        return host == pattern
    return _hostname(host) == pattern


def _hostname(authority: str) -> str:
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    name, colon, port = authority.rpartition(":")
    return name if colon and port.isdigit() else authority  # "host:80@evil" is no host:port


def prefix_rest(prefix: str, path: str) -> str | None:
    """The path after ``prefix`` (starting with '/'), or None when it does not match.

    Matching is by whole segments: ``/green`` and ``/green/`` match ``/green`` and
    ``/green/x``, never ``/greenhouse``.
    """
    base = prefix.rstrip("/")
    if path == base or path == base + "/":
        return "/"
    if path.startswith(base + "/"):
        return path[len(base) :]
    return None


def upstream_target(route: Route, path: str, query: str) -> str | None:
    """The upstream request target for a (normalised, maybe stripped) path and the original
    raw query: the upstream URL's own path in front."""
    if route.upstream is None:
        return None
    target = route.upstream.raw_path.rstrip("/") + path
    return f"{target}?{query}" if query else target
