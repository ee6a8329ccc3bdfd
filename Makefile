# Two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv system-deps models run test bench clean

help:
	@echo "make run    - build models if needed, start tritonserver (CPU) + gateway on 127.0.0.1:8080"
	@echo "make test   - build models if needed, run the whole test suite"
	@echo "make bench  - side-by-side benchmarks (in-process, Triton, gateway)"

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip wheel
	$(PIP) install -q --disable-pip-version-check -e '.[gateway,test]'
	touch $@

venv: $(INSTALLED)

# Debian packages the tests run for real: libpython for Triton's Python-backend stub, libb64 for perf_analyzer,
# Chromium for the web page, Prometheus (promtool) and Alertmanager (amtool) for rules and dashboards,
# wrk for the gateway benchmark.
SYSTEM_PACKAGES := libpython3.11 libb64-0d chromium chromium-driver prometheus prometheus-alertmanager wrk
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Fetch the pinned weights and export both ONNX models; a no-op when they are up to date.
models: venv
	$(PY) -m ensemble.build

run: venv system-deps models
	$(PY) -m gateway.serve $(RUN_ARGS)

test: venv system-deps models
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv system-deps models
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf .cache/onnx artifacts .pytest_cache
