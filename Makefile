# cdc-sink developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := deploy/local/stack
PYTEST_ARGS ?=

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

LOCK := requirements.lock

# The runtime dependencies come from the lock, hash-checked, as in the image; then the project
# itself and the dev tools.
$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is required"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create .venv with cdc-sink and the dev tools

.PHONY: lock
lock: venv ## pin pyproject's runtime dependencies with hashes in requirements.lock (Python 3.11, Linux x86-64)
	@$(BIN)/uv pip compile pyproject.toml --quiet --no-config --generate-hashes \
		--python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		--custom-compile-command 'make lock' --output-file $(LOCK)

.PHONY: image
image: ## build the container image localhost/cdc-sink:<version> with podman, on a Debian base
	@deploy/container/build

.PHONY: system-deps
system-deps: ## install missing system packages (JDK 17, Maven, PostgreSQL, Prometheus) from Debian
	@deploy/local/install-system-deps

.PHONY: stack-up
stack-up: system-deps venv ## start the local stack (Kafka, PostgreSQL, Cassandra, OpenBao, registry, Prometheus)
	@$(STACK) up

.PHONY: demo
demo: system-deps venv ## start the stack; CQL writes through the Debezium agent and the sink, then 30,000 synthetic events
	@$(STACK) up
	@$(BIN)/python -m cdc_synth.demo

.PHONY: stack-down
stack-down: ## stop the local stack
	@$(STACK) down

.PHONY: stack-status
stack-status: ## show each service of the local stack
	@$(STACK) status

.PHONY: lint
lint: venv ## ruff (lint + format check), mypy --strict on src, the import contracts, no import cycle
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/mypy
	@$(BIN)/lint-imports
	@$(BIN)/pytest -q -p no:cacheprovider tests/unit/test_import_cycles.py

.PHONY: format
format: venv ## apply ruff's formatting and safe fixes
	@$(BIN)/ruff format .
	@$(BIN)/ruff check --fix .

.PHONY: test-unit
test-unit: venv ## unit tests only (no services)
	@$(BIN)/pytest -m unit $(PYTEST_ARGS)

.PHONY: deploy-tools
deploy-tools: ## build or install, once, the tools that check deploy/helm and deploy/compose (helm, docker compose, kubernetes-validate, checkov)
	@deploy/tools/install >/dev/null

.PHONY: test
test: stack-up lint deploy-tools ## everything: install, start the stack, lint, unit and integration tests
	@CDC_TEST_REQUIRE_STACK=1 $(BIN)/pytest $(PYTEST_ARGS)
