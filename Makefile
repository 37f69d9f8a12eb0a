# `make run` and `make test` install what they need into .venv by themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-10)

.PHONY: install run test lint typecheck unit bench chaos lint-infra clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/aikit migrate
	POWERTOOLS_METRICS_DISABLED=$${POWERTOOLS_METRICS_DISABLED:-true} $(BIN)/aikit serve --host 127.0.0.1 --port 8000

lint: install
	$(BIN)/ruff check shared functions tests bench examples

typecheck: install
	$(BIN)/mypy

lint-infra:
	bash infra/lint.sh

test: install lint typecheck
	bash .ci/services.sh
	$(BIN)/pytest

bench: install
	bash .ci/services.sh
	$(BIN)/python bench/run.py

chaos: install
	bash .ci/services.sh
	CHAOS_FULL=1 $(BIN)/pytest tests/chaos -q -s

clean:
	rm -rf $(VENV) .venv-sam .mypy_cache .ruff_cache .pytest_cache aikit.db*
