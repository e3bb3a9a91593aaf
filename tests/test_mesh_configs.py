"""The shipped Envoy and nginx examples: the real programs accept them, and they say what we pin.

config/envoy/envoy.yaml and config/nginx/nginx.conf in front of the sidecar's authz listener
(config/*/sidecar.yaml). These tests run Envoy and nginx without the sidecar: the checks that
need the authz listener itself live with the sidecar's tests.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import meshpeers
from tests.meshpeers import (
    ENVOY_CONFIG,
    ENVOY_PORTS,
    ENVOY_SIDECAR_CONFIG,
    NGINX_CONFIG,
    NGINX_PORTS,
    NGINX_SIDECAR_CONFIG,
    ROOT,
    SIDECAR_PORTS,
)

EXT_AUTHZ = "envoy.filters.http.ext_authz"
ENVOY_FILTER = ROOT / "k8s" / "examples" / "istio" / "envoyfilter.yaml"
MESH_RESERVED = set(range(15000, 15091)) | {4140, 4143, 4190, 4191}  # Istio, Linkerd


def envoy_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    return document


def connection_manager(document: dict[str, Any]) -> dict[str, Any]:
    (listener,) = document["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    config: dict[str, Any] = hcm["typed_config"]
    return config


def ext_authz(hcm: dict[str, Any]) -> dict[str, Any]:
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [EXT_AUTHZ, "envoy.filters.http.router"]
    config: dict[str, Any] = hcm["http_filters"][0]["typed_config"]
    return config


def cluster(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in document["static_resources"]["clusters"] if c["name"] == name
    ]
    assert len(found) == 1, name
    return found[0]


def cluster_port(found: dict[str, Any]) -> int:
    (endpoints,) = found["load_assignment"]["endpoints"]
    (endpoint,) = endpoints["lb_endpoints"]
    port: int = endpoint["endpoint"]["address"]["socket_address"]["port_value"]
    return port


def exact(patterns: list[dict[str, Any]]) -> set[str]:
    return {p["exact"] for p in patterns if "exact" in p}


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# --- the programs ----------------------------------------------------------------------------


def test_envoy_is_the_wheels_1_40() -> None:
    """The envoy the tests run is 1.40 or later (the behaviour the examples are written for)."""
    assert meshpeers.version_of(meshpeers.require_envoy()) >= (1, 40, 0)


def test_nginx_has_auth_request() -> None:
    """nginx 1.22 or later, built with the auth_request module."""
    nginx = meshpeers.require_nginx()
    assert meshpeers.version_of(nginx) >= (1, 22, 0)
    built = subprocess.run([str(nginx), "-V"], capture_output=True, text=True, timeout=30)
    assert "--with-http_auth_request_module" in built.stderr


# --- validation by the real programs ---------------------------------------------------------


def test_shipped_envoy_config_validates() -> None:
    """`envoy --mode validate` accepts config/envoy/envoy.yaml as shipped, with no warnings."""
    result = meshpeers.validate_envoy(ENVOY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_envoy_config_with_substituted_ports_validates(tmp_path: Path) -> None:
    """The copy a test runs (every port literal replaced) is still a valid config."""
    ports = meshpeers.fresh_ports(ENVOY_PORTS)
    copy = meshpeers.render(ENVOY_CONFIG, ports, tmp_path / "envoy.yaml")
    result = meshpeers.validate_envoy(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    text = copy.read_text()
    for old, new in ports.items():
        assert not re.search(rf"(?<![0-9]){old}(?![0-9])", text)
        assert str(new) in text


def test_shipped_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` accepts config/nginx/nginx.conf as shipped, and with substituted ports."""
    result = meshpeers.check_nginx(NGINX_CONFIG, tmp_path / "as-shipped")
    assert result.returncode == 0, result.stderr
    copy = meshpeers.render(NGINX_CONFIG, meshpeers.fresh_ports(NGINX_PORTS), tmp_path / "n.conf")
    result = meshpeers.check_nginx(copy, tmp_path / "substituted")
    assert result.returncode == 0, result.stderr


def test_istio_envoy_filter_patches_are_valid_envoy_config(tmp_path: Path) -> None:
    """The EnvoyFilter's cluster, ext_authz filter and local-reply patch, put into a bootstrap
    the way istiod would, pass `envoy --mode validate`."""
    envoy_filter = yaml.safe_load(ENVOY_FILTER.read_text())
    patches = {p["applyTo"]: p["patch"] for p in envoy_filter["spec"]["configPatches"]}
    hcm = connection_manager(envoy_document())
    hcm.update(patches["NETWORK_FILTER"]["value"]["typed_config"])
    hcm["http_filters"] = [patches["HTTP_FILTER"]["value"], hcm["http_filters"][-1]]
    document = envoy_document()
    connection_manager(document).clear()
    connection_manager(document).update(hcm)
    clusters = document["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != "zonegate_authz"]
    clusters.append(patches["CLUSTER"]["value"])
    path = tmp_path / "istio-like.yaml"
    path.write_text(yaml.safe_dump(document))
    result = meshpeers.validate_envoy(path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- what the examples pin -------------------------------------------------------------------


def test_each_port_literal_is_one_whole_number() -> None:
    """Every documented port literal is in its file, never inside a longer number, and the
    sidecar configs' authz port is the one the proxy configs call."""
    for path, literals in (
        (ENVOY_CONFIG, ENVOY_PORTS),
        (NGINX_CONFIG, NGINX_PORTS),
        (ENVOY_SIDECAR_CONFIG, SIDECAR_PORTS),
        (NGINX_SIDECAR_CONFIG, SIDECAR_PORTS),
    ):
        text = path.read_text()
        assert len(set(literals.values())) == len(literals)
        for literal in literals.values():
            assert re.search(rf"(?<![0-9]){literal}(?![0-9])", text), (path, literal)
        code = re.sub(r"#.*$", "", text, flags=re.MULTILINE)
        for number in re.findall(r"(?<![0-9.])[0-9]{4,5}(?![0-9.])", code):
            assert int(number) in literals.values(), (path, number)
    assert ENVOY_PORTS["authz"] == NGINX_PORTS["authz"] == SIDECAR_PORTS["authz"]


@pytest.mark.parametrize(
    "path", [ENVOY_SIDECAR_CONFIG, NGINX_SIDECAR_CONFIG], ids=["envoy", "nginx"]
)
def test_sidecar_configs_listen_where_the_proxies_call(path: Path) -> None:
    """authz_listen, authz.path_prefix and the ports sit where Envoy and nginx expect them,
    on 127.0.0.1 and outside the ports Istio and Linkerd reserve."""
    document = yaml.safe_load(path.read_text())
    assert document["authz_listen"] == "127.0.0.1:4481"
    assert document["authz"]["path_prefix"] == "/check"
    assert document["listen"] == "127.0.0.1:4480"
    assert document["admin_listen"] == "127.0.0.1:4490"
    assert document["exchange"]["mode"] == "embedded"
    assert (path.parent / document["exchange"]["config"]).is_file()
    for key in ("listen", "admin_listen", "authz_listen"):
        assert int(document[key].rpartition(":")[2]) not in MESH_RESERVED
    for route in document["routes"]:
        assert "upstream" not in route and route["host"] and route["audience"]


def test_envoy_config_is_as_designed() -> None:
    """ext_authz (HTTP service) with the settings the authz listener relies on."""
    document = envoy_document()
    (listener,) = document["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    assert document["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = connection_manager(document)
    assert hcm["codec_type"] == "AUTO"
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    authz = ext_authz(hcm)
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["allowed_headers"]["patterns"] == [{"safe_regex": {"regex": ".*"}}]
    service = authz["http_service"]
    assert "authorization_request" not in service  # its allowed_headers is deprecated
    sidecar = yaml.safe_load(ENVOY_SIDECAR_CONFIG.read_text())
    assert service["path_prefix"] == sidecar["authz"]["path_prefix"]
    response = service["authorization_response"]
    assert response["allowed_upstream_headers"]["patterns"] == [{"exact": "authorization"}]
    assert exact(response["allowed_client_headers"]["patterns"]) == {
        "www-authenticate",
        "retry-after",
        "content-type",
        "cache-control",
    }
    authz_cluster = cluster(document, service["server_uri"]["cluster"])
    assert f":{cluster_port(authz_cluster)}" in service["server_uri"]["uri"]
    assert sidecar["authz_listen"] == f"127.0.0.1:{cluster_port(authz_cluster)}"
    (mapper,) = hcm["local_reply_config"]["mappers"]
    assert mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 503
    assert mapper["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "1"}
    grpc = cluster(document, "ledger_grpc")
    options = grpc["typed_extension_protocol_options"]
    (http_options,) = options.values()
    assert "http2_protocol_options" in http_options["explicit_http_config"]
    assert "typed_extension_protocol_options" not in cluster(document, "billing_http1")


def test_envoy_forwards_every_identity_header_the_sidecar_may_remove() -> None:
    """The check sees every header (copies of the token may sit in any), the spoofable identity
    headers included, so the sidecar can name them in x-envoy-auth-headers-to-remove."""
    patterns = ext_authz(connection_manager(envoy_document()))["allowed_headers"]["patterns"]

    def allowed(name: str) -> bool:
        return any(
            re.fullmatch(p["safe_regex"]["regex"], name) for p in patterns if "safe_regex" in p
        )

    for name in (
        "authorization",
        "cookie",
        "x-forwarded-user",
        "x-forwarded-access-token",
        "x-auth-request-user",
        "x-authenticated-userid",
        "x-remote-user",
        "x-user",
        "x-userinfo",
        "x-id-token",
        "x-access-token",
        "x-goog-iap-jwt-assertion",
        "x-amzn-oidc-data",
        "cf-access-jwt-assertion",
    ):
        assert allowed(name), name


def test_nginx_config_is_as_designed() -> None:
    """The auth_request subrequest carries what the authz listener needs, and the zone token
    (never the user's) goes upstream."""
    text = NGINX_CONFIG.read_text()
    sidecar = yaml.safe_load(NGINX_SIDECAR_CONFIG.read_text())
    prefix = sidecar["authz"]["path_prefix"]
    for line in (
        "daemon off;",
        "pid nginx.pid;",
        "error_log stderr notice;",
        "auth_request /_zonegate;",
        f"proxy_pass http://{sidecar['authz_listen']}{prefix}$request_uri;",
        "proxy_method $request_method;",
        "proxy_set_header Host $host;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        "auth_request_set $zone_auth $upstream_http_authorization;",
        "proxy_set_header Authorization $zone_auth;",
        "error_page 401 = @zonegate_401;",
        "error_page 500 = @zonegate_other;",
        "add_header Retry-After 1 always;",
    ):
        assert line in text, line
    assert "internal;" in text.split("location = /_zonegate", 1)[1].split("}", 1)[0]
    for listen in re.findall(r"^\s*listen\s+(\S+);", text, re.MULTILINE):
        assert listen.startswith("127.0.0.1:"), listen


# --- running them ----------------------------------------------------------------------------


def test_envoy_without_the_sidecar_answers_503_with_retry_after(tmp_path: Path) -> None:
    """With nothing on the authz port, the shipped Envoy refuses (never forwards the user's
    token) with 503 and Retry-After: status_on_error and the local-reply mapper at work."""
    with meshpeers.running(meshpeers.envoy_peer(tmp_path)) as envoy:
        status, headers, _ = get(
            envoy.port,
            "/invoices",
            {"Host": "billing.red.internal", "Authorization": "Bearer user-token"},
        )
        assert status == 503, envoy.output()
        assert headers["retry-after"] == "1"
    assert envoy.process is None


def test_nginx_without_the_sidecar_answers_503_with_retry_after(tmp_path: Path) -> None:
    """With nothing on the authz port, nginx's auth_request fails (500 inside nginx); the
    shipped config turns that into 503 with Retry-After and a JSON body."""
    with meshpeers.running(meshpeers.nginx_peer(tmp_path)) as nginx:
        status, headers, body = get(
            nginx.port,
            "/invoices",
            {"Host": "billing.red.internal", "Authorization": "Bearer user-token"},
        )
        assert status == 503, nginx.output()
        assert headers["retry-after"] == "1"
        assert json.loads(body)["error"] == "temporarily_unavailable"
    assert "auth request" in nginx.output() or "connect() failed" in nginx.output()


async def test_peers_start_and_stop_from_async_tests(tmp_path: Path) -> None:
    """The async helpers start both programs side by side and stop them cleanly."""
    async with (
        meshpeers.started(meshpeers.envoy_peer(tmp_path / "e")) as envoy,
        meshpeers.started(meshpeers.nginx_peer(tmp_path / "n")) as nginx,
    ):
        assert meshpeers.port_open(envoy.port) and meshpeers.port_open(nginx.port)
        process = nginx.process
    assert process is not None and process.returncode == 0
    assert not meshpeers.port_open(envoy.port) and not meshpeers.port_open(nginx.port)
