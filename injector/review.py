"""Kubernetes mutating admission webhook: the zonegate sidecar for opted-in pods.

The decision is pure: ``answer_review(body, config)`` turns the bytes of an AdmissionReview v1
into the AdmissionReview to send back (a JSONPatch, or a refusal whose message names the
cause) and raises ``InvalidReview`` for a request that is not an AdmissionReview at all. The
I/O edge (``injector.server``) is an aiohttp app on ``POST /mutate`` served over TLS; the certificate and key are
reloaded when their files change (cert-manager renews them in place) and on SIGHUP.

The contract (docs/kubernetes.md): the pod label ``zonegate.io/inject: "true"`` opts a pod in;
the namespace label ``zonegate.io/inject=enabled`` opts in every pod of the namespace that is
not labelled ``"false"`` (the API server sends those to ``/mutate/namespace``); the annotation
``zonegate.io/config`` names the ConfigMap, ``zonegate.io/status: injected`` marks the pod,
per-pod annotations adjust resources and log level, and the sidecar is a native sidecar (an
init container with ``restartPolicy: Always``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from injector.config import (
    CONFIG_ANNOTATION,
    CONFIG_VOLUME,
    DNS_SUBDOMAIN,
    INJECT_LABEL,
    LOG_LEVEL_ANNOTATION,
    LOG_LEVELS,
    OPERATIONS,
    QUANTITY,
    RESOURCE_ANNOTATIONS,
    REVIEW_API_VERSION,
    SIDECAR_CONFIG_FILE,
    SIDECAR_NAME,
    STATUS_ANNOTATION,
    STATUS_INJECTED,
    TOKEN_VOLUME,
    HttpProxyEnv,
    InjectorConfig,
    TokenProjection,
)

log = logging.getLogger("zonegate.injector")

# --- the review (pure) -----------------------------------------------------------------------


class InvalidReview(Exception):
    """The body is not an AdmissionReview v1 we can answer: HTTP 400, no review in reply."""


class Refused(Exception):
    """The pod opted in but cannot get the sidecar; the API server refuses it with this text."""


@dataclass(frozen=True, slots=True)
class Review:
    """The parts of an AdmissionReview request the webhook reads."""

    uid: str
    operation: str
    namespace: str
    kind: str
    pod: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The webhook's answer for one review, and why (for the log line)."""

    uid: str
    outcome: str  # injected | skipped | already-injected | refused
    reason: str
    patch: tuple[dict[str, Any], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome != "refused"


def parse_review(body: bytes) -> Review:
    """Read the AdmissionReview v1 request, or raise InvalidReview saying what is wrong."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidReview(f"body is not JSON: {e}") from e
    except RecursionError as e:  # "[[[[..." deeper than the parser's recursion limit
        raise InvalidReview("body is not JSON the webhook reads: nested too deeply") from e
    if not isinstance(document, dict):
        raise InvalidReview("body must be a JSON object (an AdmissionReview)")
    if (
        document.get("apiVersion") != REVIEW_API_VERSION
        or document.get("kind") != "AdmissionReview"
    ):
        raise InvalidReview(
            f"expected apiVersion {REVIEW_API_VERSION} kind AdmissionReview, got "
            f"apiVersion {document.get('apiVersion')!r} kind {document.get('kind')!r}"
        )
    request = document.get("request")
    if not isinstance(request, dict):
        raise InvalidReview("AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidReview("request.uid is missing")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        raise InvalidReview(f"request.operation must be one of {', '.join(OPERATIONS)}")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise InvalidReview("request.kind must be a GroupVersionKind object")
    pod = request.get("object")
    if operation in ("CREATE", "UPDATE") and not isinstance(pod, dict):
        raise InvalidReview(f"request.object is missing for operation {operation}")
    return Review(
        uid=uid,
        operation=operation,
        namespace=str(request.get("namespace") or ""),
        kind=kind["kind"],
        pod=pod if isinstance(pod, dict) else None,
    )


def decide(review: Review, config: InjectorConfig, *, namespace_enabled: bool = False) -> Decision:
    """Inject, skip or refuse the pod in ``review``. ``namespace_enabled``: the review came
    through the webhook for namespaces labelled ``zonegate.io/inject=enabled``."""
    if review.kind != "Pod" or review.operation != "CREATE" or review.pod is None:
        return Decision(
            review.uid, "skipped", f"not a pod creation ({review.kind} {review.operation})"
        )
    try:
        return _decide_pod(review.uid, review.pod, config, namespace_enabled)
    except Refused as e:
        return Decision(review.uid, "refused", str(e))


def _decide_pod(
    uid: str, pod: dict[str, Any], config: InjectorConfig, namespace_enabled: bool
) -> Decision:
    label = _mapping(_mapping(pod, "metadata"), "labels").get(INJECT_LABEL)
    if label == "false":
        return Decision(uid, "skipped", f"pod opts out with label {INJECT_LABEL}=false")
    if label != "true" and not namespace_enabled:
        return Decision(uid, "skipped", f"pod has no label {INJECT_LABEL}=true")
    if _already_injected(pod):
        return Decision(uid, "already-injected", "sidecar already present")
    return Decision(uid, "injected", "sidecar added", tuple(pod_patch(pod, config)))


def admission_response(decision: Decision) -> dict[str, Any]:
    """The AdmissionReview v1 to send back to the API server."""
    response: dict[str, Any] = {"uid": decision.uid, "allowed": decision.allowed}
    if decision.patch:
        raw = json.dumps(list(decision.patch), separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(raw).decode()
    if not decision.allowed:
        response["status"] = {
            "status": "Failure",
            "code": 403,
            "reason": "Forbidden",
            "message": f"zonegate sidecar injection refused: {decision.reason}",
        }
    return {"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}


def answer_review(
    body: bytes, config: InjectorConfig, *, namespace_enabled: bool = False
) -> tuple[dict[str, Any], Review, Decision]:
    """Bytes of an AdmissionReview in; the reply, the review and the decision out.

    Raises InvalidReview for a body that is not an AdmissionReview v1 request.
    """
    review = parse_review(body)
    decision = decide(review, config, namespace_enabled=namespace_enabled)
    return admission_response(decision), review, decision


def _mapping(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused(f"{key} must be an object, got {type(value).__name__}")
    return value


def _list(parent: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Refused(f"{key} must be a list of objects")
    return value


def _already_injected(pod: dict[str, Any]) -> bool:
    annotations = _mapping(_mapping(pod, "metadata"), "annotations")
    if annotations.get(STATUS_ANNOTATION) == STATUS_INJECTED:
        return True
    spec = _mapping(pod, "spec")
    names = (c.get("name") for key in ("initContainers", "containers") for c in _list(spec, key))
    return SIDECAR_NAME in names


# --- the patch (pure) ------------------------------------------------------------------------


def pointer(*parts: str | int) -> str:
    """A JSON Pointer (RFC 6901): '~' becomes '~0' and '/' becomes '~1' in each part."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def pod_patch(pod: dict[str, Any], config: InjectorConfig) -> list[dict[str, Any]]:
    """The JSONPatch (RFC 6902) that adds the sidecar to ``pod``; Refused when it cannot."""
    metadata, spec = _mapping(pod, "metadata"), _mapping(pod, "spec")
    annotations = _mapping(metadata, "annotations")
    config_map = _config_map_name(annotations)
    _check_pod(spec, config)
    container = sidecar_container(config, pod_overrides(annotations))
    volumes = [{"name": CONFIG_VOLUME, "configMap": {"name": config_map}}]
    if config.service_account_token is not None:
        volumes.append(_token_volume(config.service_account_token))
    patch = [
        *_spec_if_null(pod),
        *_insert_first(spec, "initContainers", container),
        *_append_all(spec, ("spec",), "volumes", volumes),
        *_proxy_env_patch(spec, config),
        *_annotations_patch(_new_annotations(metadata, config)),
    ]
    return patch


def _config_map_name(annotations: dict[str, Any]) -> str:
    name = annotations.get(CONFIG_ANNOTATION)
    if name is None:
        raise Refused(
            f"pod opted in to zonegate ({INJECT_LABEL}) but has no annotation "
            f"{CONFIG_ANNOTATION} naming the ConfigMap that holds {SIDECAR_CONFIG_FILE}; add "
            f"the annotation, or label the pod {INJECT_LABEL}=false"
        )
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        raise Refused(f"annotation {CONFIG_ANNOTATION}={name!r} is not a valid ConfigMap name")
    return name


def _check_pod(spec: dict[str, Any], config: InjectorConfig) -> None:
    if spec.get("hostNetwork") is True:
        raise Refused("pod uses hostNetwork: the sidecar would listen on the node's own ports")
    taken = _names(_list(spec, "volumes"))
    for name in (CONFIG_VOLUME, TOKEN_VOLUME):
        if name in taken:
            raise Refused(f"pod already has a volume named {name!r}, which the sidecar needs")
    wanted = {config.proxy_port: "proxy", config.admin_port: "admin", config.authz_port: "authz"}
    for container in _containers(spec):
        for port in _list(container, "ports"):
            number = port.get("containerPort")
            if isinstance(number, int) and number in wanted:
                raise Refused(
                    f"container {container.get('name')!r} uses port {number}, the sidecar's "
                    f"{wanted[number]} port; change sidecar.{wanted[number]}_port in the injector "
                    "config or the container's port"
                )


def _names(objects: list[dict[str, Any]]) -> set[str]:
    """The string ``name`` of each object (a list or object there is no name, not a crash)."""
    return {o["name"] for o in objects if isinstance(o.get("name"), str)}


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from _list(spec, "initContainers")
    yield from _list(spec, "containers")


@dataclass(frozen=True, slots=True)
class Overrides:
    """What a pod's annotations change in its sidecar."""

    resources: dict[str, dict[str, str]]
    log_level: str | None = None


def pod_overrides(annotations: dict[str, Any]) -> Overrides:
    """Resources and log level from the pod's annotations; a bad value refuses the pod."""
    resources: dict[str, dict[str, str]] = {}
    for name, (kind, resource) in RESOURCE_ANNOTATIONS.items():
        value = annotations.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not QUANTITY.match(value):
            raise Refused(
                f"annotation {name}={value!r} is not a Kubernetes quantity (e.g. 50m, 96Mi)"
            )
        resources.setdefault(kind, {})[resource] = value
    level = annotations.get(LOG_LEVEL_ANNOTATION)
    if level is not None and (not isinstance(level, str) or level.upper() not in LOG_LEVELS):
        raise Refused(
            f"annotation {LOG_LEVEL_ANNOTATION}={level!r} must be one of {', '.join(LOG_LEVELS)}"
        )
    return Overrides(resources, level.upper() if isinstance(level, str) else None)


def _resources(config: InjectorConfig, overrides: Overrides) -> dict[str, dict[str, str]]:
    merged = {kind: dict(amounts) for kind, amounts in config.resources.items()}
    for kind, amounts in overrides.resources.items():
        merged.setdefault(kind, {}).update(amounts)
    return merged


def sidecar_container(
    config: InjectorConfig, overrides: Overrides = Overrides({})
) -> dict[str, Any]:
    """The native sidecar: an init container that keeps running (restartPolicy Always)."""
    readyz = {"httpGet": {"path": "/readyz", "port": "zonegate-admin"}}
    mounts: list[dict[str, Any]] = [
        {"name": CONFIG_VOLUME, "mountPath": config.config_mount_path, "readOnly": True}
    ]
    if config.service_account_token is not None:
        mounts.append(
            {
                "name": TOKEN_VOLUME,
                "mountPath": config.service_account_token.mount_path,
                "readOnly": True,
            }
        )
    return {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": [
            "sidecar",
            "--config",
            config.sidecar_config_path,
            *(["--log-level", overrides.log_level] if overrides.log_level else []),
        ],
        "restartPolicy": "Always",
        "ports": [
            {"name": "zonegate-proxy", "containerPort": config.proxy_port, "protocol": "TCP"},
            {"name": "zonegate-admin", "containerPort": config.admin_port, "protocol": "TCP"},
            # The authz listener's port (authz_listen, in the ConfigMap the injector cannot
            # read): declared on every sidecar, so no app container may take it.
            {"name": "zonegate-authz", "containerPort": config.authz_port, "protocol": "TCP"},
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
        ],
        # Startup gates the app containers: they start once the sidecar answers /readyz.
        "startupProbe": {
            **readyz,
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 120,
        },
        "readinessProbe": {
            **readyz,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "zonegate-admin"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": _resources(config, overrides),
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _token_volume(token: TokenProjection) -> dict[str, Any]:
    source = {
        "audience": token.audience,
        "expirationSeconds": token.expiration_seconds,
        "path": "token",
    }
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": source}]}}


def _spec_if_null(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """A null (or absent) ``spec`` becomes ``{}`` first, so the paths under it resolve."""
    return [{"op": "add", "path": "/spec", "value": {}}] if pod.get("spec") is None else []


def _insert_first(spec: dict[str, Any], key: str, value: dict[str, Any]) -> list[dict[str, Any]]:
    if spec.get(key) is None:  # absent or null
        return [{"op": "add", "path": pointer("spec", key), "value": [value]}]
    return [{"op": "add", "path": pointer("spec", key, 0), "value": value}]


def _append_all(
    parent: dict[str, Any], at: tuple[str | int, ...], key: str, values: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Append ``values`` to the list ``parent[key]``, creating it when absent."""
    if not values:
        return []
    if parent.get(key) is None:
        return [{"op": "add", "path": pointer(*at, key), "value": values}]
    return [{"op": "add", "path": pointer(*at, key, "-"), "value": v} for v in values]


def proxy_env(config: InjectorConfig, http_proxy: HttpProxyEnv) -> list[dict[str, str]]:
    """``HTTP_PROXY`` at the sidecar, and ``NO_PROXY`` for loopback and the cluster's services."""
    proxy = f"http://127.0.0.1:{config.proxy_port}"
    service_domains = (".svc", f".svc.{config.cluster_domain}")
    no_proxy = ",".join(("localhost", "127.0.0.1", "::1", *service_domains, *http_proxy.no_proxy))
    # Lower-case too: curl and several libraries read only http_proxy/no_proxy.
    pairs = (
        ("HTTP_PROXY", proxy),
        ("http_proxy", proxy),
        ("NO_PROXY", no_proxy),
        ("no_proxy", no_proxy),
    )
    return [{"name": name, "value": value} for name, value in pairs]


def _proxy_env_patch(spec: dict[str, Any], config: InjectorConfig) -> list[dict[str, Any]]:
    if config.http_proxy is None:
        return []
    env = proxy_env(config, config.http_proxy)
    patch: list[dict[str, Any]] = []
    for i, container in enumerate(_list(spec, "containers")):
        present = _names(_list(container, "env"))
        missing = [e for e in env if e["name"] not in present]  # the app's own win
        patch += _append_all(container, ("spec", "containers", i), "env", missing)
    return patch


def _new_annotations(metadata: dict[str, Any], config: InjectorConfig) -> dict[str, str]:
    annotations = _mapping(metadata, "annotations")
    new = {STATUS_ANNOTATION: STATUS_INJECTED}
    # An app that already asks to be scraped keeps its own target; the PodMonitor finds ours.
    if not any(key.startswith("prometheus.io/") for key in annotations):
        new |= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(config.admin_port),
            "prometheus.io/path": "/metrics",
        }
    return new


def _annotations_patch(new: dict[str, str]) -> list[dict[str, Any]]:
    # The map exists: the zonegate.io/config annotation was required to get here.
    return [
        {"op": "add", "path": pointer("metadata", "annotations", key), "value": value}
        for key, value in new.items()
    ]
