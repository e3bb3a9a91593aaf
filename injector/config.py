"""The injector's config (``zonegate injector``) and the names it shares with the API server.

Read with ``runtime.configload.Node``, so every error names its YAML path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.configload import (
    ListenerTimeouts,
    Node,
    load_document,
    parse_listen,
    read_document,
    read_listener_timeouts,
)

INJECT_LABEL = "zonegate.io/inject"  # on a pod: "true" opts in, "false" opts out
NAMESPACE_ENABLED = "enabled"  # zonegate.io/inject=enabled on a namespace: every pod unless "false"
LOG_LEVEL_ANNOTATION = "zonegate.io/log-level"
# Per-pod resource overrides of the injected container: annotation -> (requests|limits, resource)
RESOURCE_ANNOTATIONS = {
    "zonegate.io/proxy-cpu-request": ("requests", "cpu"),
    "zonegate.io/proxy-memory-request": ("requests", "memory"),
    "zonegate.io/proxy-cpu-limit": ("limits", "cpu"),
    "zonegate.io/proxy-memory-limit": ("limits", "memory"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CONFIG_ANNOTATION = "zonegate.io/config"
STATUS_ANNOTATION = "zonegate.io/status"
STATUS_INJECTED = "injected"
SIDECAR_NAME = "zonegate"
CONFIG_VOLUME = "zonegate-config"
TOKEN_VOLUME = "zonegate-token"
SIDECAR_CONFIG_FILE = "sidecar.yaml"
REVIEW_API_VERSION = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 8 << 20  # pods are at most ~1.5 MiB in etcd; leave room, refuse beyond
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")


@dataclass(frozen=True, slots=True)
class TokenProjection:
    """A projected service-account token the sidecar presents to a remote exchange server."""

    audience: str = "zonegate"
    expiration_seconds: int = 3600
    mount_path: str = "/var/run/secrets/zonegate/serviceaccount"


@dataclass(frozen=True, slots=True)
class HttpProxyEnv:
    """``HTTP_PROXY``/``NO_PROXY`` on app containers, for apps that call plain-http backends."""

    no_proxy: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    """What the webhook listens on and what sidecar it adds."""

    image: str
    tls_cert_file: Path
    tls_key_file: Path
    listen: tuple[str, int] = ("0.0.0.0", 8443)
    metrics_listen: tuple[str, int] | None = ("0.0.0.0", 9090)  # plain HTTP /metrics
    tls_reload_interval: float = 10.0
    image_pull_policy: str = "IfNotPresent"
    proxy_port: int = 4480
    admin_port: int = 4490
    authz_port: int = 4481  # declared always: the injector cannot see whether authz_listen is set
    config_mount_path: str = "/etc/zonegate"
    resources: dict[str, dict[str, str]] = field(default_factory=lambda: default_resources())
    service_account_token: TokenProjection | None = None
    http_proxy: HttpProxyEnv | None = None
    cluster_domain: str = "cluster.local"
    listeners: ListenerTimeouts = field(default_factory=ListenerTimeouts)

    @property
    def sidecar_config_path(self) -> str:
        return f"{self.config_mount_path.rstrip('/')}/{SIDECAR_CONFIG_FILE}"


def default_resources() -> dict[str, dict[str, str]]:
    """Requests and limits of the injected sidecar, from measured figures (docs/kubernetes.md
    "Sizing"): it idles at about 53 MiB resident and reached 64 MiB under load."""
    return {"requests": {"cpu": "50m", "memory": "80Mi"}, "limits": {"memory": "128Mi"}}


def read_injector(node: Node) -> InjectorConfig:
    """Build an InjectorConfig from a document node, recording every problem."""
    image = node.text("image")
    if image is not None and not image.strip():
        node.error("image", "must name the sidecar image, e.g. ghcr.io/zonegate/zonegate:0.1.0")
    sidecar = node.child("sidecar")
    config = InjectorConfig(
        image=image or "",
        tls_cert_file=_required_path(node, "tls_cert_file"),
        tls_key_file=_required_path(node, "tls_key_file"),
        listen=parse_listen(node, "listen", "0.0.0.0:8443"),
        metrics_listen=_metrics_listen(node),
        tls_reload_interval=node.number("tls_reload_interval", 10.0, minimum=0.05, maximum=3600),
        image_pull_policy=node.choice("image_pull_policy", PULL_POLICIES, "IfNotPresent"),
        proxy_port=sidecar.integer("proxy_port", 4480, minimum=1, maximum=65535),
        admin_port=sidecar.integer("admin_port", 4490, minimum=1, maximum=65535),
        authz_port=sidecar.integer("authz_port", 4481, minimum=1, maximum=65535),
        config_mount_path=_absolute(sidecar, "config_mount_path", "/etc/zonegate"),
        resources=_read_resources(sidecar.child("resources")),
        service_account_token=_read_token(node.child("service_account_token")),
        http_proxy=_read_http_proxy(node.child("http_proxy")),
        cluster_domain=node.text("cluster_domain", "cluster.local"),
        listeners=read_listener_timeouts(node.child("listeners")),
    )
    if config.proxy_port == config.admin_port:
        sidecar.error("admin_port", f"must differ from proxy_port ({config.proxy_port})")
    if config.authz_port in (config.proxy_port, config.admin_port):
        sidecar.error(
            "authz_port",
            f"must differ from proxy_port ({config.proxy_port}) and admin_port "
            f"({config.admin_port})",
        )
    sidecar.finish()
    node.finish()
    return config


def _metrics_listen(node: Node) -> tuple[str, int] | None:
    """Where /metrics is served over plain HTTP (``metrics_listen: ""`` turns it off)."""
    if node.has("metrics_listen") and node.raw("metrics_listen") == "":
        return None
    return parse_listen(node, "metrics_listen", "0.0.0.0:9090")


def _required_path(node: Node, key: str) -> Path:
    if not node.has(key):
        node.error(
            key, "required: the webhook serves TLS only (the API server accepts nothing else)"
        )
    return node.path_value(key) or Path()


def _absolute(node: Node, key: str, default: str) -> str:
    value: str = node.text(key, default) or default
    if not value.startswith("/"):
        node.error(key, f"must be an absolute path inside the container, got {value!r}")
    return value


def _read_resources(node: Node) -> dict[str, dict[str, str]]:
    if not node.data:
        node.finish()
        return default_resources()
    out: dict[str, dict[str, str]] = {}
    for kind in ("requests", "limits"):
        amounts = node.child(kind)
        for name in RESOURCE_NAMES:
            value = amounts.raw(name)
            if value is None:
                continue
            if not QUANTITY.match(str(value)):
                amounts.error(
                    name, f"must be a Kubernetes quantity such as 20m or 48Mi, got {value!r}"
                )
            out.setdefault(kind, {})[name] = str(value)
        amounts.finish()
    node.finish()
    return out


def _read_token(node: Node) -> TokenProjection | None:
    enabled = node.flag("enabled", bool(node.data))
    projection = TokenProjection(
        audience=node.text("audience", "zonegate"),
        expiration_seconds=node.integer("expiration_seconds", 3600, minimum=600, maximum=2**32),
        mount_path=_absolute(node, "mount_path", "/var/run/secrets/zonegate/serviceaccount"),
    )
    node.finish()
    return projection if enabled else None


def _read_http_proxy(node: Node) -> HttpProxyEnv | None:
    enabled = node.flag("enabled", False)
    env = HttpProxyEnv(no_proxy=tuple(node.strings("no_proxy", ())))
    node.finish()
    return env if enabled else None


def parse_injector_config(data: Any, base_dir: Path) -> InjectorConfig:
    """Validate an already parsed injector config document."""
    return read_document(data, base_dir, read_injector)


def load_injector_config(path: Path) -> InjectorConfig:
    """Load and validate an injector config file; raises ConfigError listing every problem."""
    return parse_injector_config(load_document(path, "injector"), path.parent)
