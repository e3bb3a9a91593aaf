"""Route matching: host, path prefix, strip_prefix, first match wins, no path escapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.configload import ConfigError
from sidecar.config import parse_sidecar_config
from sidecar.routes import (
    BadPath,
    RouteTable,
    TokenInTarget,
    normalise_escaped_path,
    normalise_path,
    refuse_token_in_target,
)

EXCHANGE = {
    "mode": "remote",
    "token_endpoint": "http://127.0.0.1:8081/token",
    "client_id": "shop-frontend",
    "client_secret": "s3cret-shop",
}
ROUTES: list[dict[str, Any]] = [
    {"name": "red", "host": "billing.red.internal", "upstream": "http://127.0.0.1:9001", "audience": "billing"},
    {"name": "red-admin", "host": "billing.red.internal:8443", "upstream": "https://10.0.0.1/api/", "audience": "billing"},
    {"name": "green", "path_prefix": "/green/", "strip_prefix": True, "upstream": "http://127.0.0.1:9002/v1", "audience": "orders"},
    {"name": "greenish", "path_prefix": "/green", "upstream": "http://127.0.0.1:9003", "audience": "orders"},
    {"name": "blue", "path_prefix": "/blue", "upstream": "http://127.0.0.1:9004", "audience": "orders"},
]  # fmt: skip


@pytest.fixture
def table() -> RouteTable:
    config = parse_sidecar_config({"exchange": EXCHANGE, "routes": ROUTES}, Path.cwd())
    return RouteTable(config.routes)


@pytest.mark.parametrize(
    ("host", "target", "absolute", "route", "url"),
    [
        ("billing.red.internal", "/x?a=1", True, "red", "http://127.0.0.1:9001/x?a=1"),
        ("billing.red.internal:80", "/x", True, "red", "http://127.0.0.1:9001/x"),
        ("BILLING.red.internal", "/x", False, "red", "http://127.0.0.1:9001/x"),
        ("billing.red.internal:8443", "/x", True, "red", "http://127.0.0.1:9001/x"),
        ("127.0.0.1:4480", "/green/a/b?q=%20", False, "green", "http://127.0.0.1:9002/v1/a/b?q=%20"),
        ("127.0.0.1:4480", "/green", False, "green", "http://127.0.0.1:9002/v1/"),
        ("127.0.0.1:4480", "/blue/x", False, "blue", "http://127.0.0.1:9004/blue/x"),
        ("127.0.0.1:4480", "/blue", False, "blue", "http://127.0.0.1:9004/blue"),
    ],
)  # fmt: skip
def test_first_matching_route_and_upstream_url(
    table: RouteTable, host: str, target: str, absolute: bool, route: str, url: str
) -> None:
    """A call goes to the first route whose host and path prefix match, with the right URL."""
    match = table.match(host, target, absolute_form=absolute)
    assert match is not None
    assert (match.route.name, str(match.url)) == (route, url)


def test_route_with_port_matches_that_port_only() -> None:
    """A route host naming a port matches only requests to that port."""
    routes = [{**ROUTES[1], "name": "only"}]
    table = RouteTable(
        parse_sidecar_config({"exchange": EXCHANGE, "routes": routes}, Path.cwd()).routes
    )
    assert table.match("billing.red.internal:8443", "/", absolute_form=True) is not None
    assert table.match("billing.red.internal", "/", absolute_form=True) is None


@pytest.mark.parametrize(
    ("host", "target", "absolute"),
    [
        ("evil.example", "/x", True),  # not an open proxy
        ("127.0.0.1", "/green/x", True),  # routes without host serve reverse mode only
        ("127.0.0.1:4480", "/greenhouse", False),  # prefixes match whole segments
        ("127.0.0.1:4480", "/other", False),
    ],
)
def test_no_route(table: RouteTable, host: str, target: str, absolute: bool) -> None:
    """Calls matching no route get no route (the proxy answers 404/403)."""
    assert table.match(host, target, absolute_form=absolute) is None


@pytest.mark.parametrize(
    ("target", "route", "path"),
    [
        ("/green/../blue/x", "blue", "/blue/x"),
        ("/green/%2e%2e/blue/x", "blue", "/blue/x"),
        ("/green/%2E%2E/blue/x", "blue", "/blue/x"),
        ("/green/./a/../b", "green", "/v1/b"),
        ("/green/%7Euser", "green", "/v1/~user"),
    ],
)
def test_dot_segments_are_normalised_before_matching(
    table: RouteTable, target: str, route: str, path: str
) -> None:
    """Dot segments, even encoded, are resolved first: the route matched is what upstream sees."""
    match = table.match("127.0.0.1", target, absolute_form=False)
    assert match is not None and match.url is not None
    assert (match.route.name, match.url.raw_path) == (route, path)


@pytest.mark.parametrize(
    "target",
    ["/green/..%2f..%2fblue", "/green/%2F", "/green/%5c..", "/green\\..\\blue", "/..", "/green/../../x",
     "/green/%00", "/green/%zz", "green/x"],
)  # fmt: skip
def test_path_tricks_are_refused(table: RouteTable, target: str) -> None:
    """Encoded slashes, backslashes, NUL and climbs above / are refused, not guessed at."""
    with pytest.raises(BadPath):
        table.match("127.0.0.1", target, absolute_form=False)


def test_normalise_keeps_trailing_slash() -> None:
    """Normalising keeps the meaning: a trailing slash stays."""
    assert normalise_path("/a/b/../") == "/a/"
    assert normalise_path("/a/.") == "/a/"


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ({"upstream": "ftp://x"}, "routes[0].upstream: must be an http(s) URL"),
        ({"upstream": "http://x", "path_prefix": "/a/../b"}, "routes[0].path_prefix"),
        ({"upstream": "http://x", "host": "a b"}, "routes[0].host"),
        ({"upstream": "http://x", "missing_token": "maybe"}, "routes[0].missing_token"),
        ({"upstream": "http://x", "scope": 'a"b'}, "routes[0].scope"),
        ({"upstream": "http://x", "audiance": "x"}, "routes[0].audiance: unknown key"),
        ({}, "routes[0].upstream: required"),
    ],
)
def test_route_config_errors_name_the_yaml_path(route: dict[str, Any], error: str) -> None:
    """A bad route is reported at its YAML path."""
    with pytest.raises(ConfigError) as e:
        parse_sidecar_config({"exchange": EXCHANGE, "routes": [route]}, Path.cwd())
    assert any(line.startswith(error) for line in e.value.errors), e.value.errors


def _errors(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_sidecar_config(document, Path.cwd())
    return e.value.errors


def test_embedded_exchange_from_a_file_relative_to_the_sidecar_config(tmp_path: Path) -> None:
    """exchange.config is read relative to the sidecar config's folder."""
    (tmp_path / "exchange.yaml").write_text(
        "trusted_issuers: [{issuer: 'http://127.0.0.1:8080'}]\n"
        "zones: {red: {audiences: [billing]}}\n"
        "clients: [{client_id: shop, client_secret: s, zones: [red]}]\n"
    )
    document = {
        "exchange": {"mode": "embedded", "config": "exchange.yaml", "client_id": "shop"},
        "routes": [{"upstream": "http://127.0.0.1:9001", "audience": "billing"}],
    }
    config = parse_sidecar_config(document, tmp_path)
    assert config.exchange is not None and config.exchange.mode == "embedded"
    assert list(config.exchange.core.zones) == ["red"]  # type: ignore[union-attr]


def test_inline_core_errors_are_reported_under_exchange_core() -> None:
    """A bad inline exchange config is reported at its path below exchange.core."""
    document = {
        "exchange": {
            "mode": "embedded",
            "client_id": "shop",
            "core": {"trusted_issuers": [{"issuer": "ftp://x"}], "zones": {}, "clients": []},
        },
        "routes": [{"upstream": "http://127.0.0.1:9001"}],
    }
    errors = _errors(document)
    assert any(e.startswith("exchange.core.trusted_issuers[0].issuer:") for e in errors), errors
    assert any(e.startswith("exchange.core.zones:") for e in errors), errors


@pytest.mark.parametrize(
    ("exchange", "error"),
    [
        ({"mode": "remote", "client_id": "c", "token_endpoint": "http://x/token"}, "exchange.client_secret"),
        ({"mode": "remote", "client_id": "c", "client_secret": "s"}, "exchange.token_endpoint"),
        ({"mode": "remote", "client_id": "c", "client_secret": "s", "issuer": "http://x",
          "private_key_file": "/nonexistent.pem"}, "exchange.client_secret"),
        ({"mode": "remote", "client_id": "c", "issuer": "http://x", "private_key_file": "/nonexistent.pem"},
         "exchange.private_key_file"),
        ({"mode": "embedded", "client_id": "c"}, "exchange.config"),
        ({"mode": "sideways", "client_id": "c"}, "exchange.mode"),
    ],
)  # fmt: skip
def test_exchange_config_errors_name_the_yaml_path(exchange: dict[str, Any], error: str) -> None:
    """Remote mode needs one endpoint and one credential; errors say where."""
    errors = _errors({"exchange": exchange, "routes": [{"upstream": "http://127.0.0.1:9001"}]})
    assert any(e.startswith(error) for e in errors), errors


def test_route_without_any_exchange_is_an_error() -> None:
    """Without a top-level exchange every route must name its own."""
    routes = [{"upstream": "http://x"}, {"upstream": "http://y", "exchange": EXCHANGE}]
    assert _errors({"routes": routes}) == [
        "routes[0].exchange: required: no top-level exchange is set"
    ]


def test_route_exchange_is_its_own_in_the_cache_identity() -> None:
    """A route naming its own exchange gets a distinct exchanger (segregated deployment)."""
    other = {**EXCHANGE, "token_endpoint": "http://127.0.0.1:8082/token"}
    routes = [{"upstream": "http://x"}, {"upstream": "http://y", "exchange": other}]
    config = parse_sidecar_config({"exchange": EXCHANGE, "routes": routes}, Path.cwd())
    assert len(config.exchanges()) == 2
    assert config.exchange_for(config.routes[1]).identity.startswith("remote:http://127.0.0.1:8082")


TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln+/=="


@pytest.mark.parametrize(
    ("target", "where"),
    [
        (f"/green/{TOKEN}", "path"),
        (f"/green/a{TOKEN}b/c", "path"),
        ("/green/" + TOKEN.replace("/", "%2F").replace("+", "%2B"), "path"),
        (f"/x?access_token={TOKEN}", "query"),
        (f"/x?a=1&t={TOKEN}", "query"),
        ("/x?t=" + TOKEN.replace("=", "%3D").replace("/", "%2f"), "query"),
        (f"http://billing.red.internal/x?t={TOKEN}", "query"),
        (f"http://billing.red.internal/{TOKEN}", "path"),
        ("/x?access_token=other", "query"),
        ("/x?a=1;access_token=", "query"),
        ("/x?ACCESS_TOKEN=other", "query"),
        ("/x?access%5Ftoken=other", "query"),
        ("/x?access_token", "query"),
    ],
)
def test_a_target_carrying_a_token_is_refused(target: str, where: str) -> None:
    """The subject token in the path or query, or RFC 6750 §2.3's access_token parameter."""
    with pytest.raises(TokenInTarget, match=f"query parameter access_token|request {where}") as e:
        refuse_token_in_target(target, TOKEN)
    assert TOKEN not in str(e.value) and isinstance(e.value, BadPath)


@pytest.mark.parametrize(
    ("target", "token"),
    [
        ("/x?a=1&b=2", TOKEN),
        ("/x?my_access_token=1&access_tokens=2", TOKEN),
        (f"/green/{TOKEN[:20]}", TOKEN),
        ("/green/anything", None),
        ("/", None),
    ],
)
def test_a_target_without_a_token_passes(target: str, token: str | None) -> None:
    """Other parameters, a part of the token, or no token known: nothing to refuse."""
    refuse_token_in_target(target, token)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="/a.%2eEfF5cC;\\\x00", max_size=16))
def test_the_fast_path_normalises_as_the_full_rules_do(path: str) -> None:
    """A path without escapes or dots is returned as it is: the full rules agree on every path."""
    try:
        expected: str | type[BadPath] = normalise_escaped_path(path)
    except BadPath:
        expected = BadPath
    try:
        assert normalise_path(path) == expected
    except BadPath:
        assert expected is BadPath
