# shardworker developer entry points (GNU make).
#   make test   install system deps, venv, lint, typecheck, then the whole pytest suite
#   make run    migrate the local database and start the service (dev key on first run)
#   make demo   scripts/demo.sh: a local Dovecot with demo mailboxes, events printed live

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := $(wildcard shardworker tests bench scripts)
DEV_KEYS := .dev/secret-keys
PYTEST_ARGS ?=

.PHONY: venv deps lint typecheck test run demo

venv: $(STAMP)

# pip runs again only when pyproject.toml is newer than the stamp. The grep drops the
# machine-wide pip config's warnings about absent local package mirrors.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,dev]' 2>&1 \
		| { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $@

deps:
	@scripts/install-deps.sh

lint: venv
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

typecheck: venv
	$(BIN)/mypy shardworker tests/harness

test: deps venv lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# A dev key is made once into $(DEV_KEYS) (git-ignored) unless SHARDWORKER_SECRET_KEYS is set.
run: deps venv
	@if [ -z "$${SHARDWORKER_SECRET_KEYS:-}" ]; then \
		if [ ! -s $(DEV_KEYS) ]; then \
			mkdir -p $(dir $(DEV_KEYS)) && chmod 700 $(dir $(DEV_KEYS)); \
			(umask 077; echo "dev1:$$(head -c 32 /dev/urandom | base64 -w0)" > $(DEV_KEYS)); \
			echo "make run: wrote a development key to $(DEV_KEYS)" >&2; \
		fi; \
		SHARDWORKER_SECRET_KEYS="$$(cat $(DEV_KEYS))"; \
		export SHARDWORKER_SECRET_KEYS; \
	fi; \
	$(BIN)/shardworker migrate && exec $(BIN)/shardworker run

demo: deps venv
	bash scripts/demo.sh
