"""k8s/examples/istio: it renders, validates strictly, and wires istio-proxy to the authz listener.

Built-in kinds are checked with kubernetes-validate (--strict), custom ones against the strict
schemas in tests/fixtures/crds (the EnvoyFilter schema is Istio's CRD made strict).
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

# The strict validation of every rendered resource: tests/test_k8s_manifests.py
from tests.test_k8s_manifests import custom_validator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "k8s" / "examples" / "istio"
CRDS = Path(__file__).parent / "fixtures" / "crds"
AUTHZ_PORT = 4481
EXT_AUTHZ = "envoy.filters.http.ext_authz"
MESH_RESERVED = set(range(15000, 15091)) | {4140, 4143, 4190, 4191}  # Istio, Linkerd
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def docs() -> Docs:
    result = subprocess.run(
        ["kubectl", "kustomize", str(EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/examples/istio failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def find(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def envoy_filter(docs: Docs) -> dict[str, Any]:
    return find(docs, "EnvoyFilter", "frontend-zonegate-authz")


def patch(docs: Docs, apply_to: str) -> dict[str, Any]:
    (found,) = [p for p in envoy_filter(docs)["spec"]["configPatches"] if p["applyTo"] == apply_to]
    return dict(found)


def frontend_template(docs: Docs) -> dict[str, Any]:
    template: dict[str, Any] = find(docs, "Deployment", "frontend")["spec"]["template"]
    return template


def sidecar_config(docs: Docs) -> dict[str, Any]:
    name = frontend_template(docs)["metadata"]["annotations"]["zonegate.io/config"]
    config_map = find(docs, "ConfigMap", name)
    document: dict[str, Any] = yaml.safe_load(config_map["data"]["sidecar.yaml"])
    return document


def port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        [{"op": "add", "path": "/spec/configPatches/0/match/contxt", "value": "ANY"}],
        [{"op": "replace", "path": "/spec/configPatches/0/match/context", "value": "OUTBOUND"}],
        [{"op": "replace", "path": "/spec/configPatches/1/patch/operation", "value": "INSERT"}],
        [{"op": "add", "path": "/spec/targetRefs", "value": [{"kind": "Service", "name": "x"}]}],
        [{"op": "add", "path": "/spec/workloadSelector/labels/app", "value": "front*"}],
        [{"op": "add", "path": "/spec/configPatches/1/match/listener/portNumbr", "value": 1}],
        [{"op": "add", "path": "/spec/configPatches/0/match/waypoint", "value": {}}],
        [{"op": "remove", "path": "/metadata/name"}],
    ],
    ids=[
        "typo",
        "bad-context",
        "bad-operation",
        "selector-and-refs",
        "wildcard",
        "nested-typo",
        "waypoint-outside-waypoint",
        "no-name",
    ],
)
def test_envoy_filter_schema_rejects_mistakes(docs: Docs, change: list[dict[str, Any]]) -> None:
    """The EnvoyFilter schema is strict, and carries the CRD's CEL rules as JSON Schema."""
    d = jsonpatch.apply_patch(copy.deepcopy(envoy_filter(docs)), change)
    assert list(custom_validator(d["apiVersion"], d["kind"]).iter_errors(d))


def test_envoy_filter_schema_is_istios_crd() -> None:
    """The fixture holds every spec field of Istio's CRD (it was made from it, not by hand)."""
    schema = json.loads((CRDS / "envoyfilter.json").read_text())
    spec = schema["properties"]["spec"]
    assert set(spec["properties"]) == {
        "configPatches",
        "priority",
        "targetRefs",
        "workloadSelector",
    }
    item = spec["properties"]["configPatches"]["items"]
    assert set(item["properties"]) == {"applyTo", "match", "patch"}
    assert "SIDECAR_OUTBOUND" in item["properties"]["match"]["properties"]["context"]["enum"]
    assert item["properties"]["patch"]["properties"]["value"] == {"type": "object"}


# --- the wiring ------------------------------------------------------------------------------


def test_envoy_filter_adds_ext_authz_to_the_apps_outbound_listener(docs: Docs) -> None:
    """Every patch targets SIDECAR_OUTBOUND; ext_authz goes in before the router, on the
    frontend only, and calls the authz port on the pod's loopback through a cluster it adds."""
    found = envoy_filter(docs)
    frontend = frontend_template(docs)
    assert (
        found["metadata"]["namespace"]
        == find(docs, "Deployment", "frontend")["metadata"]["namespace"]
    )
    selector = found["spec"]["workloadSelector"]["labels"]
    assert selector.items() <= frontend["metadata"]["labels"].items()
    assert {p["match"]["context"] for p in found["spec"]["configPatches"]} == {"SIDECAR_OUTBOUND"}

    http_filter = patch(docs, "HTTP_FILTER")
    chain = http_filter["match"]["listener"]["filterChain"]["filter"]
    assert chain["name"] == "envoy.filters.network.http_connection_manager"
    assert chain["subFilter"]["name"] == "envoy.filters.http.router"
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    value = http_filter["patch"]["value"]
    assert value["name"] == EXT_AUTHZ
    authz = value["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert {"exact": "authorization"} in authz["allowed_headers"]["patterns"]
    service = authz["http_service"]
    assert service["server_uri"]["uri"] == f"http://127.0.0.1:{AUTHZ_PORT}"
    response = service["authorization_response"]
    assert response["allowed_upstream_headers"]["patterns"] == [{"exact": "authorization"}]

    cluster = patch(docs, "CLUSTER")
    assert cluster["patch"]["operation"] == "ADD"
    added = cluster["patch"]["value"]
    assert added["name"] == service["server_uri"]["cluster"]
    (endpoints,) = added["load_assignment"]["endpoints"]
    (endpoint,) = endpoints["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": AUTHZ_PORT}

    reply = patch(docs, "NETWORK_FILTER")
    listener = reply["match"]["listener"]
    assert listener["portNumber"] == http_filter["match"]["listener"]["portNumber"]
    assert listener["filterChain"]["filter"]["name"] == chain["name"]
    assert reply["patch"]["operation"] == "MERGE"
    (mapper,) = reply["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    assert mapper["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "1"}


def test_envoy_filter_is_scoped_to_the_backends_port(docs: Docs) -> None:
    """ext_authz runs only on the outbound port the zone backends' Services use, which is not
    the exchange server's port (the sidecar's own calls must never be checked)."""
    port = patch(docs, "HTTP_FILTER")["match"]["listener"]["portNumber"]
    backends = [
        s for s in docs if s["kind"] == "Service" and s["metadata"]["name"].startswith("backend-")
    ]
    assert backends
    for service in backends:
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
    exchange = find(docs, "Service", "zonegate-exchange")
    assert port not in [p["port"] for p in exchange["spec"]["ports"]]
    excluded = frontend_template(docs)["metadata"]["annotations"][
        "traffic.sidecar.istio.io/excludeOutboundPorts"
    ]
    token_port = next(p["port"] for p in exchange["spec"]["ports"] if p["name"] == "http")
    assert int(excluded) == token_port  # the token endpoint; Prometheus scrapes the admin port


def test_frontend_opts_in_to_zonegate_and_istio(docs: Docs) -> None:
    """The frontend carries the zonegate label and config annotation and Istio's label; its
    namespace has Istio injection on; its app calls the backends by name."""
    template = frontend_template(docs)
    assert template["metadata"]["labels"]["zonegate.io/inject"] == "true"
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    namespace = find(docs, "Deployment", "frontend")["metadata"]["namespace"]
    assert find(docs, "Namespace", namespace)["metadata"]["labels"]["istio-injection"] == "enabled"
    name = template["metadata"]["annotations"]["zonegate.io/config"]
    assert find(docs, "ConfigMap", name)["metadata"]["namespace"] == namespace
    (app,) = template["spec"]["containers"]
    urls = {e["name"]: e["value"] for e in app["env"]}
    sidecar = sidecar_config(docs)
    hosts = {r["host"] for r in sidecar["routes"]}
    for url in urls.values():
        host = url.split("://", 1)[1].split("/", 1)[0].rpartition(":")[0]
        assert host in hosts, url


def test_sidecar_config_has_only_the_authz_listener(docs: Docs) -> None:
    """The injected sidecar is configured for the authz listener only: no proxy `listen`, no
    route with an upstream, the check prefix Envoy uses, ports clear of Istio and Linkerd."""
    sidecar = sidecar_config(docs)
    assert "listen" not in sidecar
    assert sidecar["authz_listen"] == f"127.0.0.1:{AUTHZ_PORT}"
    service = patch(docs, "HTTP_FILTER")["patch"]["value"]["typed_config"]["http_service"]
    assert sidecar["authz"] == {"path_prefix": service["path_prefix"]}
    assert sidecar["routes"]
    for route in sidecar["routes"]:
        assert "upstream" not in route and route["host"] and route["audience"]
    for key in ("admin_listen", "authz_listen"):
        assert port_of(sidecar[key]) not in MESH_RESERVED
    admin = port_of(sidecar["admin_listen"])
    excluded = frontend_template(docs)["metadata"]["annotations"][
        "traffic.sidecar.istio.io/excludeInboundPorts"
    ]
    assert int(excluded) == admin


def test_workloads_run_restricted(docs: Docs) -> None:
    """Every pod of the example is non-root with no privilege escalation and no capabilities."""
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]
