"""The sidecar injection webhook: AdmissionReview v1 in, JSONPatch out, served over TLS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest
import trustme
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.config import InjectorConfig, parse_injector_config
from injector.review import InvalidReview, answer_review, pointer
from injector.server import make_app
from runtime.logsetup import JsonFormatter
from runtime.tls import ReloadingTls
from zonegate import cli

FIXTURES = Path(__file__).parent / "fixtures" / "admission"
K8S_VERSIONS = ("1.29", "1.33")
IMAGE = "ghcr.io/zonegate/zonegate:0.1.0"
INJECTED = ("pod-with-label", "pod-with-init-containers", "pod-with-several-containers")
ServerFactory = Callable[..., Any]
ClientFactory = Callable[..., Any]


def review_bytes(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def review_of(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(review_bytes(name))
    return document


def injector_config(**overrides: Any) -> InjectorConfig:
    document: dict[str, Any] = {
        "image": IMAGE,
        "tls_cert_file": "/tls/tls.crt",
        "tls_key_file": "/tls/tls.key",
    }
    document.update(overrides)
    return parse_injector_config(document, Path("/"))


FULL = {
    "service_account_token": {"audience": "zonegate", "expiration_seconds": 3600},
    "http_proxy": {"enabled": True, "no_proxy": [".corp.example.com"]},
}


def answer(review: dict[str, Any], config: InjectorConfig) -> dict[str, Any]:
    reply, _, _ = answer_review(json.dumps(review).encode(), config)
    response: dict[str, Any] = reply["response"]
    assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
    assert response["uid"] == review["request"]["uid"]
    return response


def patched_pod(review: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    pod: dict[str, Any] = jsonpatch.apply_patch(review["request"]["object"], patch)
    return pod


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    every = spec.get("initContainers", []) + spec["containers"]
    return [c for c in every if c["name"] == "zonegate" or c.get("image") == IMAGE]


def review_for(pod: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    again = copy.deepcopy(template)
    again["request"]["object"] = pod
    again["request"]["uid"] = "0d1e2f3a-4b5c-4d6e-8f7a-8b9c0d1e2f30"
    return again


@pytest.mark.parametrize("variant", [{}, FULL], ids=["defaults", "token+proxy"])
@pytest.mark.parametrize("name", INJECTED)
def test_opted_in_pod_gets_exactly_one_valid_native_sidecar(
    name: str, variant: dict[str, Any]
) -> None:
    """An opted-in pod's patch applies, the result is a valid Pod with one native sidecar."""
    review = review_of(name)
    pod = patched_pod(review, answer(review, injector_config(**variant)))
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    assert len(sidecars(pod)) == 1
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "zonegate" and sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["sidecar", "--config", "/etc/zonegate/sidecar.yaml"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["metadata"]["annotations"]["zonegate.io/status"] == "injected"
    config_map = pod["metadata"]["annotations"]["zonegate.io/config"]
    assert {"name": "zonegate-config", "configMap": {"name": config_map}} in pod["spec"]["volumes"]


@pytest.mark.parametrize("name", INJECTED)
def test_webhook_on_its_own_output_adds_nothing(name: str) -> None:
    """Reinvocation on an injected pod is allowed without a patch: never two sidecars."""
    review = review_of(name)
    config = injector_config(**FULL)
    pod = patched_pod(review, answer(review, config))
    again = answer(review_for(pod, review), config)
    assert again["allowed"] is True and "patch" not in again


def test_own_container_counts_as_injected_without_the_annotation() -> None:
    """A pod that carries the zonegate container but lost the status annotation is left alone."""
    review = review_of("pod-already-injected")
    del review["request"]["object"]["metadata"]["annotations"]["zonegate.io/status"]
    response = answer(review, injector_config())
    assert response["allowed"] is True and "patch" not in response


@pytest.mark.parametrize("name", ["pod-without-label", "pod-already-injected"])
def test_pod_not_to_inject_is_allowed_unchanged(name: str) -> None:
    """A pod without the label, or already injected, is allowed with no patch."""
    response = answer(review_of(name), injector_config())
    assert response == {"uid": review_of(name)["request"]["uid"], "allowed": True}


def test_sidecar_goes_first_and_existing_init_containers_keep_their_order() -> None:
    """The native sidecar starts before the pod's own init containers, which keep their order."""
    review = review_of("pod-with-init-containers")
    pod = patched_pod(review, answer(review, injector_config()))
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == ["zonegate", "migrate", "warm-cache"]


def test_sidecar_runs_restricted() -> None:
    """The sidecar runs non-root, read-only, without capabilities, with small requests."""
    review = review_of("pod-with-label")
    sidecar = sidecars(patched_pod(review, answer(review, injector_config())))[0]
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "80Mi"},
        "limits": {"memory": "128Mi"},
    }
    assert sidecar["readinessProbe"]["httpGet"]["port"] == "zonegate-admin"


def test_missing_config_annotation_refuses_the_pod_naming_the_cause() -> None:
    """A labelled pod without zonegate.io/config is refused, the message says what to add."""
    review = review_of("pod-missing-config-annotation")
    response = answer(review, injector_config())
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 403
    assert "zonegate.io/config" in response["status"]["message"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        jsonpatch.apply_patch(pod, [{"op": "add", "path": path, "value": value}], in_place=True)

    return change


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (_set("/spec/containers/0/ports/0/containerPort", 4490), "port 4490"),
        (_set("/spec/containers/0/ports/0/containerPort", 4481), "sidecar's authz port"),
        (_set("/spec/hostNetwork", True), "hostNetwork"),
        (_set("/spec/volumes", [{"name": "zonegate-config", "emptyDir": {}}]), "zonegate-config"),
        (_set("/metadata/annotations/zonegate.io~1config", "Not_A_Name"), "not a valid ConfigMap"),
        (_set("/metadata/annotations", ["not", "a", "map"]), "annotations must be an object"),
    ],
    ids=["port", "authz-port", "hostNetwork", "volume", "configmap-name", "annotations-type"],
)
def test_pod_that_cannot_get_the_sidecar_is_refused(
    change: Callable[[dict[str, Any]], None], cause: str
) -> None:
    """A pod the sidecar cannot join is refused with a message naming why."""
    review = review_of("pod-with-label")
    change(review["request"]["object"])
    response = answer(review, injector_config())
    assert response["allowed"] is False
    assert cause in response["status"]["message"]


@pytest.mark.parametrize("path", ["/spec/initContainers", "/spec/volumes", "/spec"])
@pytest.mark.parametrize("name", ["pod-with-label", "pod-with-init-containers"])
def test_a_null_spec_or_list_counts_as_missing(name: str, path: str) -> None:
    """A pod whose spec, initContainers or volumes is null gets a patch that applies."""
    review = review_of(name)
    _set(path, None)(review["request"]["object"])
    pod = patched_pod(review, answer(review, injector_config(**FULL)))
    assert pod["spec"]["initContainers"][0]["name"] == "zonegate"
    assert "zonegate-config" in [v["name"] for v in pod["spec"]["volumes"]]
    if path != "/spec":  # a pod without containers is no valid Pod, patched or not
        assert len(sidecars(pod)) == 1
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)


def test_json_pointer_escapes_slash_and_tilde() -> None:
    """Annotation keys with '/' and '~' become valid JSON Pointer tokens (RFC 6901)."""
    assert pointer("metadata", "annotations", "zonegate.io/status") == (
        "/metadata/annotations/zonegate.io~1status"
    )
    assert pointer("a~/b", 0, "-") == "/a~0~1b/0/-"


def test_status_annotation_path_is_escaped_in_the_patch() -> None:
    """The patch writes zonegate.io/status at an escaped path, not a nested one."""
    review = review_of("pod-with-label")
    patch = json.loads(base64.b64decode(answer(review, injector_config())["patch"]))
    paths = {op["path"] for op in patch}
    assert "/metadata/annotations/zonegate.io~1status" in paths
    assert "/spec/initContainers" in paths and "/spec/volumes" in paths  # absent before


def test_http_proxy_env_only_on_app_containers_and_never_overrides() -> None:
    """HTTP_PROXY/NO_PROXY go to app containers that do not set them; the app's own value wins."""
    review = review_of("pod-with-several-containers")
    pod = patched_pod(review, answer(review, injector_config(**FULL)))
    app, exporter, _ = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in exporter["env"]}
    assert env["HTTP_PROXY"] == "http://127.0.0.1:4480"
    no_proxy = env["NO_PROXY"].split(",")
    assert {"localhost", "127.0.0.1", ".svc.cluster.local", ".corp.example.com"} <= set(no_proxy)
    app_env = [e for e in app["env"] if e["name"] == "HTTP_PROXY"]
    assert app_env == [{"name": "HTTP_PROXY", "value": "http://corporate-proxy.example.com:3128"}]
    assert "env" not in pod["spec"]["initContainers"][0] or all(
        e["name"] != "HTTP_PROXY" for e in pod["spec"]["initContainers"][0]["env"]
    )


def test_no_proxy_env_unless_configured() -> None:
    """Without http_proxy in the injector config, app containers are not touched."""
    review = review_of("pod-with-several-containers")
    pod = patched_pod(review, answer(review, injector_config()))
    assert pod["spec"]["containers"] == review["request"]["object"]["spec"]["containers"]


def test_service_account_token_is_projected_into_the_sidecar() -> None:
    """The token volume has the configured audience and expiry and is mounted in the sidecar."""
    review = review_of("pod-with-label")
    pod = patched_pod(review, answer(review, injector_config(**FULL)))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "zonegate-token")
    source = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert source == {"audience": "zonegate", "expirationSeconds": 3600, "path": "token"}
    mounts = {m["name"] for m in sidecars(pod)[0]["volumeMounts"]}
    assert mounts == {"zonegate-config", "zonegate-token"}


def test_prometheus_annotations_added_but_never_overwritten() -> None:
    """Scrape annotations point at the admin port, unless the app already has its own."""
    review = review_of("pod-with-label")
    annotations = patched_pod(review, answer(review, injector_config()))["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "4490"
    assert annotations["prometheus.io/path"] == "/metrics"
    review = review_of("pod-with-several-containers")
    annotations = patched_pod(review, answer(review, injector_config()))["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9102"


@pytest.mark.parametrize(
    ("operation", "kind"), [("UPDATE", "Pod"), ("CREATE", "Deployment")], ids=["update", "deploy"]
)
def test_anything_but_a_pod_creation_is_allowed_unchanged(operation: str, kind: str) -> None:
    """The webhook only mutates pod creations; anything else passes untouched."""
    review = review_of("pod-with-label")
    review["request"]["operation"] = operation
    review["request"]["kind"]["kind"] = kind
    response = answer(review, injector_config())
    assert response["allowed"] is True and "patch" not in response


# --- HTTP ------------------------------------------------------------------------------------


def _without(path: str) -> bytes:
    review = review_of("pod-with-label")
    jsonpatch.apply_patch(review, [{"op": "remove", "path": path}], in_place=True)
    return json.dumps(review).encode()


def _with(path: str, value: Any) -> bytes:
    review = review_of("pod-with-label")
    jsonpatch.apply_patch(review, [{"op": "replace", "path": path, "value": value}], in_place=True)
    return json.dumps(review).encode()


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (_with("/apiVersion", "admission.k8s.io/v1beta1"), "admission.k8s.io/v1"),
        (_with("/kind", "Pod"), "AdmissionReview"),
        (_without("/request"), "no request"),
        (_without("/request/uid"), "request.uid"),
        (_without("/request/object"), "request.object"),
        (_without("/request/operation"), "request.operation"),
        (b"\xff\xfe", "not JSON"),
    ],
    ids=["junk", "array", "apiversion", "kind", "request", "uid", "object", "operation", "bytes"],
)
async def test_malformed_review_is_a_clear_400(
    body: bytes, cause: str, aiohttp_client: ClientFactory
) -> None:
    """A body that is not an AdmissionReview v1 gets 400 with a message, never a 500."""
    client = await aiohttp_client(make_app(injector_config()))
    response = await client.post("/mutate", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    document = await response.json()
    assert document["error"] == "invalid_request"
    assert cause in document["error_description"]


def _nested_in_pod(depth: int) -> bytes:
    review = review_of("pod-with-label")
    review["request"]["object"]["metadata"]["labels"]["deep"] = "@"
    deep = "[" * depth + "]" * depth
    return json.dumps(review).encode().replace(b'"@"', deep.encode())


UNPARSABLE = [
    (b"[" * 20_000, "nested"),
    (b'{"a":' * 20_000, "nested"),
    (b"[" * 20_000 + b"]" * 20_000, "nested"),
    (_nested_in_pod(20_000), "nested"),
    (b'{"apiVersion": ' + b"1" * 5000 + b"}", "not JSON"),
    (b'{"a": "\\ud800"', "not JSON"),
    (b"\xef\xbb\xbf{}", "AdmissionReview"),
    (b"", "not JSON"),
]


@pytest.mark.usefixtures("no_crash")
@pytest.mark.parametrize(("body", "cause"), UNPARSABLE)
async def test_a_body_the_injector_cannot_parse_is_400_never_500(
    body: bytes, cause: str, aiohttp_client: ClientFactory
) -> None:
    """Deep nesting (RecursionError), huge numbers, broken encodings, nothing: 400 with a
    message, and no error line or traceback in the log."""
    client = await aiohttp_client(make_app(injector_config()))
    response = await client.post("/mutate", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    document = await response.json()
    assert document["error"] == "invalid_request"
    assert cause in document["error_description"]


WEIRD_VALUES: list[Any] = [[1], {"a": 1}, None, 1.5, "x", True, [[[]]]]


@pytest.mark.usefixtures("no_crash")
@pytest.mark.parametrize("value", WEIRD_VALUES, ids=repr)
@pytest.mark.parametrize(
    "path",
    [
        "/request/object/spec/containers/0/ports/0/containerPort",
        "/request/object/spec/containers/0/name",
        "/request/object/spec/containers/0/env/0/name",
        "/request/object/spec/volumes",
        "/request/object/metadata/annotations/zonegate.io~1config",
        "/request/object/metadata/labels",
        "/request/kind/kind",
        "/request/namespace",
    ],
)
async def test_a_review_with_values_of_the_wrong_type_is_answered_never_500(
    path: str, value: Any, aiohttp_client: ClientFactory
) -> None:
    """JSON that parses but puts a list or object where a name or port belongs: an answer
    (refusal or skip) or a 400, never a 500."""
    review = review_of("pod-with-label")
    review["request"]["object"]["spec"].setdefault("volumes", [])
    containers = review["request"]["object"]["spec"]["containers"]
    containers[0].setdefault("ports", [{"containerPort": 8080}])
    containers[0].setdefault("env", [{"name": "A", "value": "1"}])
    jsonpatch.apply_patch(review, [{"op": "add", "path": path, "value": value}], in_place=True)
    client = await aiohttp_client(make_app(injector_config(**FULL)))
    response = await client.post("/mutate", json=review)
    assert response.status in (200, 400)


# Keys the webhook reads, so that generated objects reach its code paths.
KEYS = st.sampled_from(["name", "containerPort", "ports", "env", "value", "zonegate.io/config"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
POD_PATHS = st.sampled_from(
    [
        ("metadata",), ("metadata", "labels"), ("metadata", "annotations"), ("spec",),
        ("spec", "containers"), ("spec", "initContainers"), ("spec", "volumes"),
        ("spec", "hostNetwork"), ("spec", "containers", 0), ("spec", "containers", 0, "ports"),
        ("spec", "containers", 0, "env"), ("spec", "containers", 0, "name"),
        ("spec", "containers", 0, "ports", 0, "containerPort"),
        ("spec", "containers", 0, "env", 0, "name"), ("spec", "volumes", 0, "name"),
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(at=POD_PATHS, value=JSON)
def test_any_json_in_a_pod_is_answered_or_invalid_never_a_crash(
    at: tuple[str | int, ...], value: Any
) -> None:
    """Whatever JSON a pod holds where the webhook looks, the answer is a review or
    InvalidReview (400): no TypeError or KeyError becomes a 500."""
    review = review_of("pod-with-label")
    review["request"]["object"]["spec"]["containers"][0].update(
        ports=[{"containerPort": 8080}], env=[{"name": "A", "value": "1"}]
    )
    review["request"]["object"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    parent = review["request"]["object"]
    for part in at[:-1]:
        parent = parent[part]
    parent[at[-1]] = value
    with contextlib.suppress(InvalidReview):
        answer_review(json.dumps(review).encode(), injector_config(**FULL))


async def test_wrong_content_type_is_415(aiohttp_client: ClientFactory) -> None:
    """The API server sends JSON; anything else is refused with 415, not guessed at."""
    client = await aiohttp_client(make_app(injector_config()))
    response = await client.post(
        "/mutate", data=review_bytes("pod-with-label"), headers={"Content-Type": "text/plain"}
    )
    assert response.status == 415


async def test_logs_name_the_pod_but_never_env_values(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """One log line per review names pod and outcome; env values never appear."""
    review = review_of("pod-with-label")
    secret = "hunter2-do-not-log"
    review["request"]["object"]["spec"]["containers"][0]["env"].append(
        {"name": "API_KEY", "value": secret}
    )
    client = await aiohttp_client(make_app(injector_config(**FULL)))
    with caplog.at_level(logging.INFO, logger="zonegate.injector"):
        response = await client.post("/mutate", json=review)
    assert response.status == 200
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any('"outcome": "injected"' in line and "frontend-" in line for line in lines)
    assert not any(secret in line for line in lines)


# --- TLS, as the API server calls it ---------------------------------------------------------


def write_cert(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    """Issue a serving cert for the webhook Service (and 127.0.0.1) and write it like a Secret."""
    cert = ca.issue_cert("zonegate-injector.zonegate-system.svc", "127.0.0.1")
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    for target, blob in ((cert_file, cert.cert_chain_pems[0]), (key_file, cert.private_key_pem)):
        tmp = target.with_suffix(".tmp")
        blob.write_to_path(str(tmp))
        os.replace(tmp, target)  # atomic, as the kubelet swaps a Secret volume
    return cert_file, key_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def post_review(url: str, ca: trustme.CA, body: bytes) -> dict[str, Any]:
    """POST /mutate the way kube-apiserver does: JSON AdmissionReview over verified HTTPS."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, */*"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/mutate", data=body, headers=headers, ssl=client_context(ca)) as r,
    ):
        assert r.status == 200
        document: dict[str, Any] = await r.json()
        return document


async def test_webhook_over_tls_answers_the_api_server(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """Over HTTPS verified against the test CA, an opted-in pod gets its patch."""
    ca = trustme.CA()
    cert_file, key_file = write_cert(ca, tmp_path)
    config = injector_config(tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    tls = ReloadingTls(cert_file, key_file)
    server = await aiohttp_server(make_app(config, tls), ssl=tls.context)
    url = f"https://127.0.0.1:{server.port}"
    reply = await post_review(url, ca, review_bytes("pod-with-several-containers"))
    review = review_of("pod-with-several-containers")
    assert len(sidecars(patched_pod(review, reply["response"]))) == 1
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post_review(url, trustme.CA(), review_bytes("pod-with-label"))


async def test_renewed_certificate_is_served_without_restart(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """When cert-manager rewrites the Secret files, new connections get the new certificate."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert_file, key_file = write_cert(old_ca, tmp_path)
    config = injector_config(
        tls_cert_file=str(cert_file), tls_key_file=str(key_file), tls_reload_interval=0.05
    )
    tls = ReloadingTls(cert_file, key_file)
    server = await aiohttp_server(make_app(config, tls), ssl=tls.context)
    url = f"https://127.0.0.1:{server.port}"
    await post_review(url, old_ca, review_bytes("pod-without-label"))
    write_cert(new_ca, tmp_path)
    for _ in range(100):  # bounded: 5 s at most
        await asyncio.sleep(0.05)
        try:
            await post_review(url, new_ca, review_bytes("pod-without-label"))
            break
        except aiohttp.ClientConnectorCertificateError:
            continue
    else:
        pytest.fail("the renewed certificate was never served")


async def test_half_rotated_pair_keeps_the_old_certificate(
    tmp_path: Path, aiohttp_server: ServerFactory
) -> None:
    """A new certificate next to the old key is not loaded; the old pair keeps serving."""
    ca = trustme.CA()
    cert_file, key_file = write_cert(ca, tmp_path)
    tls = ReloadingTls(cert_file, key_file)
    trustme.CA().issue_cert("other").cert_chain_pems[0].write_to_path(str(cert_file))
    with pytest.raises(ssl.SSLError):
        tls.reload()
    tls.try_reload()  # logs and keeps serving
    server = await aiohttp_server(make_app(injector_config(), tls), ssl=tls.context)
    reply = await post_review(
        f"https://127.0.0.1:{server.port}", ca, review_bytes("pod-without-label")
    )
    assert reply["response"]["allowed"] is True


async def test_injector_program_serves_tls_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`zonegate injector --config F` prints its https address, answers, and exits 0 on SIGTERM."""
    ca = trustme.CA()
    write_cert(ca, tmp_path)
    config_file = tmp_path / "injector.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "image": IMAGE,
                "listen": "127.0.0.1:0",
                "tls_cert_file": "tls.crt",  # relative to the config file
                "tls_key_file": "tls.key",
            }
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zonegate.cli", "injector", "--config", str(config_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stderr is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert "listening on https://127.0.0.1:" in line
        url = line.split()[-1]
        reply = await post_review(url, ca, review_bytes("pod-missing-config-annotation"))
        assert reply["response"]["allowed"] is False
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        logs = (await process.stderr.read()).decode()
        assert '"outcome": "refused"' in logs and "Traceback" not in logs
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- config ----------------------------------------------------------------------------------


def test_check_accepts_an_injector_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`zonegate check` recognises an injector config by its image key and exits 0."""
    path = tmp_path / "injector.yaml"
    path.write_text(
        yaml.safe_dump({"image": IMAGE, "tls_cert_file": "c", "tls_key_file": "k", **FULL})
    )
    assert cli.main(["check", str(path)]) == 0
    assert "valid injector config" in capsys.readouterr().out


def test_check_lists_every_injector_config_error_by_yaml_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken injector config exits 2 and names each problem by its YAML path."""
    path = tmp_path / "injector.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "image": IMAGE,
                "tls_key_file": "k",
                "imagePullPolicy": "Always",
                "sidecar": {
                    "admin_port": 4480,
                    "authz_port": 4480,
                    "resources": {"requests": {"cpu": "lots"}},
                },
                "service_account_token": {"expiration_seconds": 60},
                "http_proxy": {"enabled": "yes"},
            }
        )
    )
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in (
        "tls_cert_file: required",
        "imagePullPolicy: unknown key",
        "sidecar.admin_port: must differ from proxy_port",
        "sidecar.authz_port: must differ from proxy_port (4480) and admin_port",
        "sidecar.resources.requests.cpu: must be a Kubernetes quantity",
        "service_account_token.expiration_seconds: must be between 600",
        "http_proxy.enabled: must be true or false",
    ):
        assert expected in err


# -- namespace opt-in, per-pod annotations, metrics ---------------------------------------------


def without_label(review: dict[str, Any], value: str | None = None) -> dict[str, Any]:
    changed = copy.deepcopy(review)
    labels = changed["request"]["object"]["metadata"].setdefault("labels", {})
    labels.pop("zonegate.io/inject", None)
    if value is not None:
        labels["zonegate.io/inject"] = value
    return changed


def namespace_answer(review: dict[str, Any], config: InjectorConfig) -> dict[str, Any]:
    reply, _, _ = answer_review(json.dumps(review).encode(), config, namespace_enabled=True)
    response: dict[str, Any] = reply["response"]
    return response


def test_namespace_opt_in_injects_unlabelled_pods() -> None:
    """Through the namespace webhook a pod without the label gets the sidecar."""
    review = without_label(review_of("pod-with-label"))
    assert "patch" not in answer(review, injector_config())  # the label webhook skips it
    assert len(sidecars(patched_pod(review, namespace_answer(review, injector_config())))) == 1


@pytest.mark.parametrize("namespace_enabled", [False, True])
def test_pod_label_false_opts_out_everywhere(namespace_enabled: bool) -> None:
    """zonegate.io/inject: "false" wins over a namespace that is enabled."""
    review = without_label(review_of("pod-with-label"), "false")
    reply, _, decision = answer_review(
        json.dumps(review).encode(), injector_config(), namespace_enabled=namespace_enabled
    )
    assert decision.outcome == "skipped" and "patch" not in reply["response"]


def test_annotations_override_resources_and_log_level() -> None:
    """Per-pod annotations set the sidecar's requests, limits and log level."""
    review = review_of("pod-with-label")
    review["request"]["object"]["metadata"]["annotations"].update(
        {
            "zonegate.io/proxy-cpu-request": "50m",
            "zonegate.io/proxy-memory-limit": "256Mi",
            "zonegate.io/log-level": "debug",
        }
    )
    (sidecar,) = sidecars(patched_pod(review, answer(review, injector_config())))
    assert sidecar["resources"] == {
        "requests": {"cpu": "50m", "memory": "80Mi"},
        "limits": {"memory": "256Mi"},
    }
    assert sidecar["args"][-2:] == ["--log-level", "DEBUG"]


@pytest.mark.parametrize(
    ("annotation", "value"),
    [("zonegate.io/proxy-memory-request", "lots"), ("zonegate.io/log-level", "chatty")],
)
def test_a_bad_annotation_refuses_the_pod_naming_it(annotation: str, value: str) -> None:
    """A value the kubelet could not use is refused now, with the annotation named."""
    review = review_of("pod-with-label")
    review["request"]["object"]["metadata"]["annotations"][annotation] = value
    response = answer(review, injector_config())
    assert response["allowed"] is False and annotation in response["status"]["message"]


async def test_reviews_are_counted_on_the_metrics_listener(aiohttp_client: ClientFactory) -> None:
    """/metrics counts reviews by outcome, with build info and process metrics."""
    from injector.server import InjectorMetrics, metrics_app

    metrics = InjectorMetrics()
    webhook = await aiohttp_client(make_app(injector_config(), metrics=metrics))
    scrape = await aiohttp_client(metrics_app(metrics))
    for path, body in (("/mutate", review_bytes("pod-with-label")), ("/mutate", b"[")):
        await webhook.post(path, data=body, headers={"Content-Type": "application/json"})
    text = await (await scrape.get("/metrics")).text()
    assert 'zonegate_injector_reviews_total{outcome="injected"} 1.0' in text
    assert 'zonegate_injector_reviews_total{outcome="invalid"} 1.0' in text
    assert "zonegate_build_info{" in text and "process_resident_memory_bytes" in text
