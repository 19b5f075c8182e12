# Carillon developer commands. On a fresh clone `make run` and `make test` are all you need:
# each creates the virtual environment and installs the project when needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: help install run test lint protos check-protos buf-lint buf-breaking clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BUF): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $(BUF)

install: $(STAMP)  ## create .venv and install Carillon with its dev tools

run: $(STAMP)  ## start the four services on SQLite, run the demo campaign, keep serving until Ctrl-C
	$(BIN)/carillon up --demo

protos: $(STAMP)  ## regenerate the Python code of protos/
	$(BIN)/python scripts/gen_protos.py

check-protos: $(STAMP)  ## fail when the generated code is stale
	$(BIN)/python scripts/gen_protos.py --check

buf-lint: $(BUF)  ## lint the contracts with buf (STANDARD rules)
	cd protos && ../$(BUF) lint

# The v1 contracts are stable: every change is checked against their first published version (the
# repository's root commit), so renumbering, renaming or removing anything fails the build.
BUF_BASELINE ?= $(shell git rev-list --max-parents=0 HEAD 2>/dev/null)

buf-breaking: $(BUF)  ## fail on a breaking change to the v1 contracts
	@if [ -z "$(BUF_BASELINE)" ]; then echo "buf-breaking: no git history to compare with" >&2; exit 1; fi
	cd protos && ../$(BUF) breaking --against "../.git#ref=$(BUF_BASELINE),subdir=protos"

lint: $(STAMP)  ## ruff and mypy on hand-written code
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(STAMP) buf-lint buf-breaking check-protos lint  ## lint everything and run the whole test suite
	$(BIN)/python -m pytest -q

clean:  ## remove the virtual environment, node_modules and local data
	rm -rf $(VENV) node_modules var
