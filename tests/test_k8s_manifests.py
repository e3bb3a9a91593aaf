"""The k8s/ kustomizations: they render, validate against Kubernetes 1.29 and 1.33, and fit together."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml

from exchange.config import parse_exchange_config
from injector.config import InjectorConfig, parse_injector_config
from injector.review import answer_review
from runtime.configload import secrets_unread
from sidecar.config import parse_sidecar_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = ("1.29", "1.33")
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("cert-manager.io/v1", "Certificate"): "certificate.json",
    ("cert-manager.io/v1", "Issuer"): "issuer.json",
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): "envoyfilter.json",
}
PINNED_METRICS = {
    "zonegate_sidecar_requests_total",
    "zonegate_sidecar_request_duration_seconds",
    "zonegate_sidecar_token_cache_total",
    "zonegate_sidecar_token_cache_evictions_total",
    "zonegate_sidecar_token_cache_entries",
    "zonegate_sidecar_authz_checks_total",
    "zonegate_shared_state_errors_total",
    "zonegate_build_info",
    "zonegate_sidecar_exchanges_total",
    "zonegate_sidecar_exchange_duration_seconds",
    "zonegate_exchange_requests_total",
    "zonegate_exchange_duration_seconds",
    "zonegate_jwks_fetches_total",
}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
Docs = list[dict[str, Any]]


def kustomize(name: str) -> Docs:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/{name} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, Docs]:
    """Every kustomization under k8s/, rendered once for the module (in parallel)."""
    assert KUSTOMIZATIONS, "no kustomization.yaml under k8s/"
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(KUSTOMIZATIONS, pool.map(kustomize, KUSTOMIZATIONS), strict=True))


def find(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def config_file(docs: Docs, prefix: str, key: str) -> Any:
    """The YAML document stored under ``key`` in the ConfigMap whose name starts with prefix."""
    maps = [d for d in docs if d["kind"] == "ConfigMap" and key in d.get("data", {})]
    found = [m for m in maps if m["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"expected one ConfigMap {prefix}* with {key}"
    return yaml.safe_load(found[0]["data"][key])


def pod_specs(docs: Docs) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] in WORKLOADS:
            yield d, d["spec"]["template"]


def custom_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((FIXTURES / "crds" / CUSTOM_SCHEMAS[(api_version, kind)]).read_text())
    return jsonschema.Draft202012Validator(schema)


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders(rendered: dict[str, Docs], name: str) -> None:
    """`kubectl kustomize` renders every kustomization into named, typed resources."""
    docs = rendered[name]
    assert docs
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_resources_validate_strictly(rendered: dict[str, Docs], name: str, version: str) -> None:
    """Built-in kinds pass kubernetes-validate --strict; custom ones their shipped schema."""
    errors: list[str] = []
    for d in rendered[name]:
        where = f"{d['kind']}/{d['metadata']['name']}"
        try:
            kubernetes_validate.validate(d, version, strict=True)
            continue
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError:
            pass
        if (d["apiVersion"], d["kind"]) not in CUSTOM_SCHEMAS:
            errors.append(
                f"{where}: no schema (neither Kubernetes {version} nor tests/fixtures/crds)"
            )
            continue
        for error in custom_validator(d["apiVersion"], d["kind"]).iter_errors(d):
            errors.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        (
            "PrometheusRule",
            [{"op": "add", "path": "/spec/groups/0/rules/0/expresion", "value": "1"}],
        ),
        ("PrometheusRule", [{"op": "remove", "path": "/spec/groups/0/rules/0/expr"}]),
        ("ServiceMonitor", [{"op": "add", "path": "/spec/endpoints/0/intervall", "value": "1m"}]),
        ("PodMonitor", [{"op": "remove", "path": "/spec/selector"}]),
        ("Certificate", [{"op": "remove", "path": "/spec/issuerRef"}]),
        ("Issuer", [{"op": "add", "path": "/spec/ca", "value": {"secretName": "x"}}]),
    ],
    ids=["rule-typo", "rule-no-expr", "monitor-typo", "podmonitor-no-selector", "cert", "issuer"],
)
def test_custom_resource_schemas_reject_mistakes(
    rendered: dict[str, Docs], kind: str, change: list[dict[str, Any]]
) -> None:
    """The shipped CRD schemas are strict: a typo or a missing required field is an error."""
    every = rendered["monitoring"] + rendered["injector"]
    name = {"Certificate": "zonegate-injector", "Issuer": "zonegate-selfsigned"}.get(kind)
    d = jsonpatch.apply_patch(find(every, kind, name), change)
    assert list(custom_validator(d["apiVersion"], kind).iter_errors(d))


# --- the webhook -----------------------------------------------------------------------------


def test_webhook_configuration_is_as_designed(rendered: dict[str, Docs]) -> None:
    """The MutatingWebhookConfiguration carries the documented settings."""
    webhook = find(rendered["injector"], "MutatingWebhookConfiguration")["webhooks"][0]
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["sideEffects"] == "None"
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["objectSelector"] == {"matchLabels": {"zonegate.io/inject": "true"}}
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    (condition,) = webhook["matchConditions"]
    assert "zonegate.io/status" in condition["expression"] and "injected" in condition["expression"]
    by_namespace = find(rendered["injector"], "MutatingWebhookConfiguration")["webhooks"][1]
    assert by_namespace["clientConfig"]["service"]["path"] == "/mutate/namespace"
    assert {"key": "zonegate.io/inject", "operator": "In", "values": ["enabled"]} in by_namespace[
        "namespaceSelector"
    ]["matchExpressions"]
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": "zonegate.io/inject", "operator": "NotIn", "values": ["true", "false"]}
    ]
    assert by_namespace["failurePolicy"] == "Fail" and by_namespace["matchConditions"] == [
        condition
    ]


@pytest.mark.parametrize("name", ["injector", "install", "examples/shop"])
def test_webhook_points_at_the_injector_and_trusts_its_certificate(
    rendered: dict[str, Docs], name: str
) -> None:
    """Service, port, namespace, CA annotation and certificate DNS names all agree."""
    docs = rendered[name]
    config = find(docs, "MutatingWebhookConfiguration")
    webhook = config["webhooks"][0]
    ref = webhook["clientConfig"]["service"]
    service = find(docs, "Service", ref["name"])
    namespace = service["metadata"]["namespace"]
    assert ref["namespace"] == namespace and ref["path"] == "/mutate"
    assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]
    skipped = webhook["namespaceSelector"]["matchExpressions"][0]
    assert skipped["key"] == "kubernetes.io/metadata.name" and skipped["operator"] == "NotIn"
    assert set(skipped["values"]) == {"kube-system", namespace}
    ca_from = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    cert_namespace, cert_name = ca_from.split("/")
    certificate = find(docs, "Certificate", cert_name)
    assert cert_namespace == certificate["metadata"]["namespace"] == namespace
    assert f"{ref['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    deployment = find(docs, "Deployment", "zonegate-injector")
    secrets = [
        v["secret"]["secretName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    ]
    assert certificate["spec"]["secretName"] in secrets


def injector_config_of(docs: Docs) -> InjectorConfig:
    return parse_injector_config(config_file(docs, "zonegate-injector", "injector.yaml"), Path("/"))


def test_injector_config_is_valid_and_names_the_deployed_image(rendered: dict[str, Docs]) -> None:
    """The shipped injector config loads, and injects the same image the injector runs."""
    docs = rendered["injector"]
    config = injector_config_of(docs)
    (container,) = find(docs, "Deployment", "zonegate-injector")["spec"]["template"]["spec"][
        "containers"
    ]
    assert config.image == container["image"]
    assert container["args"] == ["injector", "--config", "/etc/zonegate/injector.yaml"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "https")
    assert config.listen[1] == port
    document = config_file(docs, "zonegate-injector", "injector.yaml")
    tls_mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
    assert document["tls_cert_file"] == f"{tls_mount}/tls.crt"
    assert document["tls_key_file"] == f"{tls_mount}/tls.key"


# --- the exchange server ---------------------------------------------------------------------


def test_exchange_server_runs_two_scraped_replicas_with_keys_from_a_secret(
    rendered: dict[str, Docs],
) -> None:
    """Two replicas, a PDB and an HPA that keep two, prometheus.io annotations, keys from a Secret."""
    docs = rendered["exchange"]
    deployment = find(docs, "Deployment", "zonegate-exchange")
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (container,) = template["spec"]["containers"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        int(annotations["prometheus.io/port"]) in ports
        and annotations["prometheus.io/path"] == "/metrics"
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "zonegate-exchange-keys"
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == "zonegate-exchange"
        and hpa["spec"]["minReplicas"] >= 2
    )
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    policy = find(docs, "NetworkPolicy")
    assert (
        policy["spec"]["podSelector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("name", ["exchange", "examples/shop"])
def test_exchange_config_is_valid_and_reads_keys_from_the_secret_mount(
    rendered: dict[str, Docs], name: str
) -> None:
    """The exchange config in the ConfigMap loads and its signing keys live in the Secret volume."""
    docs = rendered[name]
    document = config_file(docs, "zonegate-exchange", "exchange.yaml")
    with secrets_unread():  # the key files live in the cluster's Secret, not here
        config = parse_exchange_config(document, Path("/"))
    template = find(docs, "Deployment", "zonegate-exchange")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys")
    for zone in document["zones"].values():
        assert zone["signing_key_file"].startswith(mount + "/")
    assert config.listen[1] in {p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("name", ["exchange", "examples/shop"])
def test_exchange_probes_and_scrapes_use_the_admin_port_only(
    rendered: dict[str, Docs], name: str
) -> None:
    """Probes, the prometheus.io port and the ServiceMonitor reach the exchange server's
    admin_listen; the token port serves none of them (it answers 404 there)."""
    docs = rendered[name]
    with secrets_unread():
        config = parse_exchange_config(
            config_file(docs, "zonegate-exchange", "exchange.yaml"), Path("/")
        )
    assert config.admin_listen is not None and config.admin_listen[1] != config.listen[1]
    template = find(docs, "Deployment", "zonegate-exchange")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == config.admin_listen[1] and ports["http"] == config.listen[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "admin", probe
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == ports["admin"]
    service = find(docs, "Service", "zonegate-exchange")
    by_name = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    monitor = find(rendered["monitoring"], "ServiceMonitor")
    assert by_name[monitor["spec"]["endpoints"][0]["port"]] == "admin"


# --- every workload --------------------------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_workloads_run_restricted(rendered: dict[str, Docs], name: str) -> None:
    """Every pod is non-root with RuntimeDefault seccomp, no privilege escalation, no capabilities."""
    for workload, template in pod_specs(rendered[name]):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_select_pods_and_name_their_ports(rendered: dict[str, Docs], name: str) -> None:
    """Each Service selects a workload in its namespace and targets a port that workload names."""
    docs = rendered[name]
    for service in (d for d in docs if d["kind"] == "Service"):
        namespace = service["metadata"].get("namespace")
        selector = service["spec"]["selector"].items()
        pods = [
            t
            for w, t in pod_specs(docs)
            if w["metadata"].get("namespace") == namespace
            and selector <= t["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pods"
        named = {
            p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, (
                f"{service['metadata']['name']}: {port['targetPort']}"
            )


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_map_volumes_name_rendered_config_maps(rendered: dict[str, Docs], name: str) -> None:
    """configMap volumes point at ConfigMaps the render contains (hash suffixes included)."""
    docs = rendered[name]
    maps = {
        (d["metadata"].get("namespace"), d["metadata"]["name"])
        for d in docs
        if d["kind"] == "ConfigMap"
    }
    for workload, template in pod_specs(docs):
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                wanted = (workload["metadata"].get("namespace"), volume["configMap"]["name"])
                assert wanted in maps, f"{workload['metadata']['name']}: no ConfigMap {wanted}"


# --- monitoring ------------------------------------------------------------------------------


def promtool() -> str:
    """The promtool binary; missing it fails on CI (make tools installs it) and skips locally."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing on CI: run `make tools` (Debian package prometheus)")
        pytest.skip("promtool not installed: apt-get install prometheus (or make tools)")
    return path


def rule_groups(rendered: dict[str, Docs]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = find(rendered["monitoring"], "PrometheusRule")["spec"]["groups"]
    return copy.deepcopy(groups)


def run_promtool(*args: str) -> None:
    result = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rules_pass_promtool_check(rendered: dict[str, Docs], tmp_path: Path) -> None:
    """The PrometheusRule's groups pass `promtool check rules` (PromQL and templates parse)."""
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups(rendered)}))
    run_promtool("check", "rules", str(path))


def test_alerts_fire_on_trouble_and_stay_quiet_otherwise(
    rendered: dict[str, Docs], tmp_path: Path
) -> None:
    """`promtool test rules`: each alert fires on its failure and not on healthy traffic."""
    groups = rule_groups(rendered)
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(FIXTURES / "promtool" / "alerts_test.yaml", tmp_path)
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    assert alerts == {
        "ZonegateExchangeErrorRateHigh",
        "ZonegateExchangeUnavailable",
        "ZonegateJwksFetchFailing",
        "ZonegateTokenCacheHitRatioLow",
        "ZonegateSidecar503s",
    }
    run_promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))


def dashboard(rendered: dict[str, Docs]) -> dict[str, Any]:
    found = find(rendered["monitoring"], "ConfigMap", "zonegate-dashboard")
    assert found["metadata"]["labels"]["grafana_dashboard"] == "1"
    document: dict[str, Any] = json.loads(found["data"]["zonegate.json"])
    return document


def test_dashboard_shows_exchanges_cache_ratio_and_latency(rendered: dict[str, Docs]) -> None:
    """The Grafana dashboard has exchanges by zone and outcome, cache hit ratio and percentiles."""
    exprs = [t["expr"] for p in dashboard(rendered)["panels"] for t in p["targets"]]
    assert any("zonegate_sidecar_exchanges_total" in e and "zone, outcome" in e for e in exprs)
    assert any('result="hit"' in e and "/" in e for e in exprs)
    for q in ("0.5", "0.9", "0.99"):
        assert any(
            f"histogram_quantile({q}" in e and "zonegate_exchange_duration" in e for e in exprs
        )


def test_dashboard_queries_parse_as_promql(rendered: dict[str, Docs], tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL (checked by promtool as recording rules)."""
    rules = []
    for panel in dashboard(rendered)["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$__rate_interval", "5m").replace("$namespace", ".*")
            rules.append({"record": f"dashboard:panel{panel['id']}:{t['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def test_rules_and_dashboard_use_only_pinned_metric_names(rendered: dict[str, Docs]) -> None:
    """Alerts and panels query the documented metric names, nothing misspelt."""
    text = json.dumps(rule_groups(rendered)) + json.dumps(dashboard(rendered))
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"zonegate_[a-z_]+", text)}
    assert used <= PINNED_METRICS, used - PINNED_METRICS
    assert used == PINNED_METRICS  # and every metric is watched somewhere


def test_monitors_scrape_the_exchange_service_and_every_sidecar(rendered: dict[str, Docs]) -> None:
    """The ServiceMonitor names the exchange Service's port; the PodMonitor the sidecar admin port."""
    monitor = find(rendered["monitoring"], "ServiceMonitor")
    service = find(rendered["exchange"], "Service", "zonegate-exchange")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in service["spec"]["ports"]]
    pods = find(rendered["monitoring"], "PodMonitor")["spec"]
    assert pods["selector"]["matchLabels"] == {"zonegate.io/inject": "true"}
    assert pods["namespaceSelector"] == {"any": True}
    assert pods["podMetricsEndpoints"][0]["port"] == "zonegate-admin"


# --- the example -----------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["examples/shop", "examples/istio"])
def test_example_frontend_gets_a_valid_sidecar_from_the_shipped_injector(
    rendered: dict[str, Docs], example: str
) -> None:
    """The example frontend, run through the webhook with the shipped config, is a valid Pod
    whose sidecar declares the ports its config listens on (the Istio one: authz only)."""
    docs = rendered[example]
    frontend = find(docs, "Deployment", "frontend")
    namespace = frontend["metadata"]["namespace"]
    pod = {"apiVersion": "v1", "kind": "Pod", **copy.deepcopy(frontend["spec"]["template"])}
    pod["metadata"]["namespace"] = namespace
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a80",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    }
    config = injector_config_of(docs)
    reply, _, decision = answer_review(json.dumps(review).encode(), config)
    assert decision.outcome == "injected", decision.reason
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(reply["response"]["patch"])))
    for version in VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    config_map = patched["metadata"]["annotations"]["zonegate.io/config"]
    sidecar_document = config_file(
        [d for d in docs if d["metadata"].get("namespace") == namespace], config_map, "sidecar.yaml"
    )
    sidecar = parse_sidecar_config(sidecar_document, Path("/"))
    assert sidecar.listen[1] == config.proxy_port and sidecar.admin_listen[1] == config.admin_port
    if sidecar.authz_listen is not None:  # the Istio example: authz listener only
        assert sidecar.authz_listen[1] == config.authz_port
    (injected,) = (c for c in patched["spec"]["initContainers"] if c["name"] == "zonegate")
    declared = {p["name"]: p["containerPort"] for p in injected["ports"]}
    assert declared == {
        "zonegate-proxy": config.proxy_port,
        "zonegate-admin": config.admin_port,
        "zonegate-authz": config.authz_port,
    }
    assert config.service_account_token is not None
    remote = sidecar_document["exchange"]
    assert (
        remote["service_account_token_file"] == config.service_account_token.mount_path + "/token"
    )


def test_example_client_is_the_frontend_service_account(rendered: dict[str, Docs]) -> None:
    """The exchange client the example sidecar uses is the frontend's service account."""
    docs = rendered["examples/shop"]
    with secrets_unread():  # the key files live in the cluster's Secret
        exchange = parse_exchange_config(
            config_file(docs, "zonegate-exchange", "exchange.yaml"), Path("/")
        )
    frontend = find(docs, "Deployment", "frontend")
    account = frontend["spec"]["template"]["spec"]["serviceAccountName"]
    sidecar = config_file(docs, "frontend-zonegate", "sidecar.yaml")
    client = exchange.clients[sidecar["exchange"]["client_id"]]
    assert client.auth == "kubernetes"
    assert (
        client.service_account
        == f"system:serviceaccount:{frontend['metadata']['namespace']}:{account}"
    )
    find(docs, "ServiceAccount", account)


def test_image_runs_as_the_non_root_user_the_manifests_expect(rendered: dict[str, Docs]) -> None:
    """The Dockerfile installs the package, runs `zonegate` as uid 10001, as the pods expect."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "USER 10001:10001" in lines
    assert 'ENTRYPOINT ["zonegate"]' in lines
    assert any("pip install --no-deps --no-build-isolation ." in ln for ln in lines)
    assert lines[[ln.startswith("FROM ") for ln in lines].index(True)].startswith("FROM python:")
    for name in ("exchange", "injector"):
        for workload, template in pod_specs(rendered[name]):
            assert template["spec"]["securityContext"]["runAsUser"] == 10001, workload["metadata"]
            (container,) = template["spec"]["containers"]
            assert container["args"][0] == name
