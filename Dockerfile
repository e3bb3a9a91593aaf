# syntax=docker/dockerfile:1
# zonegate: one image for the sidecar, the exchange server and the injector.
#   docker build -t ghcr.io/zonegate/zonegate:0.1.0 .
#   docker run --rm ghcr.io/zonegate/zonegate:0.1.0 check /etc/zonegate/sidecar.yaml
#
# Base image: pinned by the digest of the multi-architecture index (linux/amd64, linux/arm64,
# ...), so a rebuild gets the same bytes whatever the tag points to today. Python 3.11, the same
# minor as CI, `requires-python` and mypy's python_version (tests/test_image.py checks this).
# Debian 12 (bookworm) is named in the tag because the unsuffixed python:3.11-slim moved to
# Debian 13 (trixie).
#   Recorded: the index published as python:3.11.14-slim-bookworm (also tagged
#   python:3.11-slim-bookworm then), as pinned in public Dockerfiles; not pulled from here.
#   Refresh:  docker buildx imagetools inspect python:3.11-slim-bookworm
#             (the "Digest:" line at the top is the index; not a per-platform "Manifests" one),
#             then replace the digest in both FROM lines and rebuild.
FROM python:3.11-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first, each file checked against requirements.lock (`make lock` writes it from
# pyproject.toml: runtime dependencies, the uvloop extra and the build backend). --no-deps: what
# is not in the lock is not installed.
COPY requirements.lock ./
RUN python -m venv /opt/zonegate \
 && /opt/zonegate/bin/pip install --no-deps --require-hashes -r requirements.lock
# Then the project itself, built with the locked setuptools (no build isolation, so nothing
# unhashed is fetched) and without dependencies. Only what the package needs: no tests, no
# local virtualenv, no keys.
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY exchange ./exchange
COPY sidecar ./sidecar
COPY injector ./injector
COPY devkit ./devkit
COPY zonegate ./zonegate
RUN /opt/zonegate/bin/pip install --no-deps --no-build-isolation . \
 && /opt/zonegate/bin/pip check

FROM python:3.11-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
LABEL org.opencontainers.image.title="zonegate" \
      org.opencontainers.image.description="Token-exchange sidecar (RFC 8693), exchange server and Kubernetes injector" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm" \
      org.opencontainers.image.base.digest="sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d"
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
