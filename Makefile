# Two commands set everything up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv run-deps system-deps models run test bench clean

help:
	@echo "make run     - build models if needed, start tritonserver (CPU) + gateway on 127.0.0.1:8080 (RUN_ARGS=...)"
	@echo "make test    - build models if needed, run the whole test suite (PYTEST_ARGS=...)"
	@echo "make bench   - side-by-side benchmarks: in-process, Triton, gateway (BENCH_ARGS=...)"
	@echo "make models  - fetch the pinned weights and export the ONNX models (a no-op when current)"
	@echo "make venv    - create .venv and install the project with its models, gateway and test extras"
	@echo "make system-deps - the Debian packages the tests and benchmarks use (run-deps: those make run needs)"
	@echo "make clean   - remove the exported models, test artifacts and benchmark runs (keeps .venv, the"
	@echo "               downloaded weights and the kept reference run)"

# The Makefile too: the extras installed are named below. A venv whose base Python is gone is made again.
$(INSTALLED): setup.cfg pyproject.toml Makefile
	$(PY) -c 'import pip' 2>/dev/null || python3 -m venv --clear $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip wheel
	$(PIP) install -q --disable-pip-version-check -e '.[models,gateway,test]'
	touch $@

venv: $(INSTALLED)

# Debian packages. make run needs only libpython (of the venv's Python) for Triton's Python-backend stub.
# The tests and benchmarks also run libb64 for perf_analyzer, Chromium for the web page, Prometheus (promtool)
# and Alertmanager (amtool) for rules and dashboards, and wrk for the gateway benchmark.
RUN_PACKAGES = libpython$(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TOOL_PACKAGES := libb64-0d prometheus prometheus-alertmanager wrk
BROWSER_PACKAGES := chromium chromium-driver
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef
run-deps: venv
	$(call apt_install,$(RUN_PACKAGES),--no-install-recommends)
system-deps: run-deps
	$(call apt_install,$(TOOL_PACKAGES),--no-install-recommends)
	$(call apt_install,$(BROWSER_PACKAGES),)

# Fetch the pinned weights and export both ONNX models; a no-op when they are up to date.
models: venv
	$(PY) -m ensemble.build

run: venv run-deps models
	$(PY) -m gateway.serve $(RUN_ARGS)

test: venv system-deps models
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv system-deps models
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf artifacts .pytest_cache model_repository/*/1/model.onnx model_repository/*/1/priors.npy \
	  model_repository/*/1/.build.json
	find benchmarks/results -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
