# syntax=docker/dockerfile:1
# zonegate: one image for the sidecar, the exchange server and the injector.
#   docker build -t ghcr.io/zonegate/zonegate:0.1.0 .
#   docker run --rm ghcr.io/zonegate/zonegate:0.1.0 check /etc/zonegate/sidecar.yaml
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs: no tests, no local virtualenv, no keys.
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY exchange ./exchange
COPY sidecar ./sidecar
COPY injector ./injector
COPY devkit ./devkit
COPY zonegate ./zonegate
RUN python -m venv /opt/zonegate \
 && /opt/zonegate/bin/pip install '.[uvloop]'

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="zonegate" \
      org.opencontainers.image.description="Token-exchange sidecar (RFC 8693), exchange server and Kubernetes injector" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/zonegate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/zonegate /opt/zonegate
# A numeric user, so Kubernetes can enforce runAsNonRoot without a runAsUser; the manifests
# in k8s/ use the same 10001. Nothing is written at runtime: the root filesystem can be read-only.
RUN groupadd --system --gid 10001 zonegate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin zonegate
USER 10001:10001
# exchange server, injector (TLS), sidecar proxy, sidecar admin (/healthz /readyz /metrics)
EXPOSE 8081 8443 4480 4490
ENTRYPOINT ["zonegate"]
CMD ["--help"]
