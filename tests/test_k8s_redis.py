"""k8s/components/redis and k8s/examples/ha-exchange: shared state for the exchange replicas."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from exchange.config import parse_exchange_config
from runtime.configload import secrets_unread
from tests.test_k8s_manifests import (
    CUSTOM_SCHEMAS,
    K8S,
    VERSIONS,
    Docs,
    config_file,
    custom_validator,
    find,
    kustomize,
    pod_specs,
)

EXAMPLE = "examples/ha-exchange"
COMPONENT = "components/redis"
SECRET = "zonegate-shared-state"
URL_FILE = "/var/run/secrets/zonegate/shared-state/url"


@pytest.fixture(scope="module")
def docs() -> Docs:
    """The example (install + the Redis component), rendered once."""
    return kustomize(EXAMPLE)


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    (only,) = containers
    return only


def labels(workload: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return found


@pytest.mark.parametrize("name", [EXAMPLE, COMPONENT])
@pytest.mark.parametrize("version", VERSIONS)
def test_renders_and_validates_strictly(name: str, version: str) -> None:
    """`kubectl kustomize` renders it; built-in kinds pass kubernetes-validate --strict, the
    cert-manager ones (from k8s/install) their shipped schema."""
    rendered = kustomize(name)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert {("Deployment", "zonegate-redis"), ("Service", "zonegate-redis")} <= kinds
    assert ("NetworkPolicy", "zonegate-redis") in kinds
    for d in rendered:
        custom = (d["apiVersion"], d["kind"])
        if custom in CUSTOM_SCHEMAS:
            assert not list(custom_validator(*custom).iter_errors(d)), d["metadata"]["name"]
        else:
            kubernetes_validate.validate(d, version, strict=True)


def test_the_component_is_a_component() -> None:
    text = (K8S / COMPONENT / "kustomization.yaml").read_text()
    assert re.search(r"^kind: Component$", text, re.MULTILINE)
    assert (
        "components:\n  - ../../components/redis"
        in (K8S / EXAMPLE / "kustomization.yaml").read_text()
    )


def test_exchange_reads_the_url_from_the_secret_its_config_names(docs: Docs) -> None:
    """The Secret's `url` is mounted where the config's shared_state.url_file points."""
    exchange = find(docs, "Deployment", "zonegate-exchange")
    volumes = {v["name"]: v for v in exchange["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["shared-state"]["secret"]
    assert secret["secretName"] == SECRET and secret["items"] == [{"key": "url", "path": "url"}]
    mount = next(m for m in container(exchange)["volumeMounts"] if m["name"] == "shared-state")
    assert mount["readOnly"] is True and f"{mount['mountPath']}/url" == URL_FILE
    document = config_file(docs, "zonegate-exchange", "exchange.yaml")
    assert document["shared_state"] == {"backend": "redis", "url_file": URL_FILE}
    with secrets_unread():  # the key files and the URL file exist in the pod only
        config = parse_exchange_config(document, Path("/"))
    assert config.shared_state.backend == "redis"


def test_only_the_exchange_pods_reach_redis(docs: Docs) -> None:
    """Redis admits the exchange server's pods on 6379 only and sends nothing; the exchange
    server's own egress policy lets it out to Redis."""
    exchange, redis = (find(docs, "Deployment", n) for n in ("zonegate-exchange", "zonegate-redis"))
    namespace = redis["metadata"]["namespace"]
    assert exchange["metadata"]["namespace"] == namespace
    policy = find(docs, "NetworkPolicy", "zonegate-redis")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels(redis).items()
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # this namespace only
    assert source["podSelector"]["matchLabels"].items() <= labels(exchange).items()
    assert not source["podSelector"]["matchLabels"].items() <= labels(redis).items()
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    egress = find(docs, "NetworkPolicy", "zonegate-exchange")["spec"]["egress"]
    to_redis = [
        r
        for r in egress
        if any(
            t.get("podSelector", {}).get("matchLabels", {}).items() <= labels(redis).items()
            and "podSelector" in t
            for t in r.get("to", [])
        )
    ]
    assert [r["ports"] for r in to_redis] == [[{"port": 6379, "protocol": "TCP"}]]


def test_redis_is_one_restricted_pod_with_a_password_and_no_eviction(docs: Docs) -> None:
    """One replica, a pinned image, the password from the Secret, noeviction (an evicted jti
    could be replayed), a read-only root with an emptyDir for its working directory."""
    redis = find(docs, "Deployment", "zonegate-redis")
    assert redis["spec"]["replicas"] == 1
    spec = redis["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(redis)
    assert re.fullmatch(r"redis:7\.\d+\.\d+-alpine", c["image"])
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    (env,) = c["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "password"}
    data = args[args.index("--dir") + 1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == data)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume


def test_the_documented_url_names_the_redis_service(docs: Docs) -> None:
    """The URL the example tells you to store is the component's Service, port and namespace."""
    service = find(docs, "Service", "zonegate-redis")
    (port,) = service["spec"]["ports"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port['port']}"
    assert port["targetPort"] in {
        p["name"] for p in container(find(docs, "Deployment", "zonegate-redis"))["ports"]
    }
    for text in (
        (K8S / EXAMPLE / "kustomization.yaml").read_text(),
        (K8S / COMPONENT / "kustomization.yaml").read_text(),
        (K8S.parent / "docs" / "shared-state.md").read_text(),
    ):
        assert f"redis://:$pw@{host}/0" in text or f"@{host}/0" in text


def test_redis_pods_are_selected_only_by_their_own_service(docs: Docs) -> None:
    redis = find(docs, "Deployment", "zonegate-redis")
    for service in (d for d in docs if d["kind"] == "Service"):
        selects = service["spec"]["selector"].items() <= labels(redis).items()
        assert selects == (service["metadata"]["name"] == "zonegate-redis")
    assert [
        w["metadata"]["name"] for w, _ in pod_specs(docs) if w["metadata"]["name"].endswith("redis")
    ] == ["zonegate-redis"]
