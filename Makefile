# Two commands matter: `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test install lint format bench bench-monitoring bench-instructions bench-parts bench-batching bench-processes bench-restarts models clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/edgeharvest run

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check service tests bench models
	$(BIN)/ruff format --check service tests bench models
	$(BIN)/mypy service

format: $(STAMP)
	$(BIN)/ruff format service tests bench models
	$(BIN)/ruff check --fix service tests bench models

# Benchmarks need wrk (Debian: apt-get install -y wrk).
bench: $(STAMP)
	$(BIN)/python bench/serving.py

# Monitoring on against off, the two servers side by side in alternating short bursts.
bench-monitoring: $(STAMP)
	$(BIN)/python bench/side_by_side.py --compare monitoring

# Monitoring on against off in instructions per request, counted by callgrind (needs valgrind),
# with the first digit every time and with 64 held-out digits in turn.
bench-instructions: $(STAMP)
	$(BIN)/python bench/monitoring_instructions.py
	$(BIN)/python bench/monitoring_instructions.py --inputs held-out

# What each part of monitoring costs per row in a warm loop, counted by callgrind (needs valgrind).
bench-parts: $(STAMP)
	$(BIN)/python bench/monitoring_parts.py

# Adaptive batching on the compute-heavy wide-mlp model (built into var/bench-models on first use).
bench-batching: $(STAMP)
	$(BIN)/python bench/batching.py

# One API worker process against two (`serve --workers 2`) on the digits model.
bench-processes: $(STAMP)
	$(BIN)/python bench/processes.py

# Requests lost while SIGHUP replaces two workers under traffic: the service against uvicorn's protocol.
bench-restarts: $(STAMP)
	$(BIN)/python bench/restarts.py

# Rebuild the committed default model (reproducible: same bytes every time).
models: $(STAMP)
	$(BIN)/python models/digits/build.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# Deployment files (deploy/, Dockerfile) checked with the real tools: promtool (Debian's
# prometheus package; .ci/run installs it), kubernetes-validate, check-jsonschema, and a real
# Prometheus scraping the running service.
.PHONY: deploy-check
deploy-check: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_deploy_*.py tests/test_prometheus_e2e.py

# The alert rules as a Prometheus Operator resource, generated from deploy/prometheus/rules.yml
# (tests/test_deploy_k8s.py fails when the two disagree).
deploy/k8s/prometheusrule.yaml: deploy/prometheus/rules.yml
	{ printf '%s\n' \
	  '# Generated from deploy/prometheus/rules.yml by `make deploy/k8s/prometheusrule.yaml`: edit that file.' \
	  'apiVersion: monitoring.coreos.com/v1' \
	  'kind: PrometheusRule' \
	  'metadata:' \
	  '  name: edgeharvest' \
	  '  labels:' \
	  '    app.kubernetes.io/name: edgeharvest' \
	  'spec:'; \
	  sed -n '/^groups:/,$$p' $< | sed 's/^./  &/'; } > $@
