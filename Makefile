# `make run` and `make test` install what they need into .venv by themselves.
PY ?= python3
# The directory of this Makefile: `sam build` runs the layer target from a scratch directory (-f this file).
ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat $(ROOT)pyproject.toml | sha1sum | cut -c1-10)

.PHONY: install run test lint typecheck unit bench chaos lint-infra clean build-AikitLayer layer

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
	@# No function above radon grade C (cyclomatic complexity 20).
	@above="$$($(BIN)/radon cc -nd shared functions)"; if [ -n "$$above" ]; then \
		echo "radon: functions above grade C:"; echo "$$above"; exit 1; fi

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
	CHAOS_FULL=1 $(BIN)/pytest tests/chaos tests/hostile/test_served_limits.py -q -s

clean:
	rm -rf $(VENV) .venv-sam .venv-artifacts .mypy_cache .ruff_cache .pytest_cache aikit.db* build

# ------------------------------------------------------------------------------------------ the Lambda layer
# `sam build` runs `make -f <this file> build-AikitLayer` (template.yaml: BuildMethod: makefile) with
# ARTIFACTS_DIR set; `make layer` does the same into .aws-sam/layer. The layer is the package built from
# pyproject.toml plus its runtime dependencies as wheels for the Lambda platform, minus boto3/botocore/s3transfer
# (the Lambda runtime's are used, as by every function), compiled to bytecode that is used without checking
# the sources (/opt is read-only: a layer without .pyc compiles every module on every cold start).
# LAYER_PLATFORM=manylinux2014_x86_64 builds for x86_64 (the artifact tests build for the host).
LAYER_PLATFORM ?= manylinux2014_aarch64
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null)
LAYER_PYTHON ?= $(or $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12)),python3.12)
LAYER_RUNTIME_PROVIDED := boto3 botocore s3transfer

build-AikitLayer:
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set (sam build sets it)" >&2; exit 2; }
	@$(LAYER_PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
	  || { echo "the layer needs python3.12 for its bytecode: set LAYER_PYTHON" >&2; exit 2; }
	rm -rf "$(ARTIFACTS_DIR)/python" "$(ARTIFACTS_DIR)/.wheel" "$(ARTIFACTS_DIR)/.src"
	# The wheel is built from a clean copy: an in-tree build/ directory would keep modules deleted since.
	mkdir -p "$(ARTIFACTS_DIR)/.src"
	tar -C "$(ROOT)" --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md shared \
	  | tar -C "$(ARTIFACTS_DIR)/.src" -xf -
	$(LAYER_PYTHON) -m pip wheel -q --no-deps -w "$(ARTIFACTS_DIR)/.wheel" "$(ARTIFACTS_DIR)/.src"
	$(LAYER_PYTHON) -m pip install -q --target "$(ARTIFACTS_DIR)/python" --no-compile \
	  --platform $(LAYER_PLATFORM) --implementation cp --python-version 3.12 --only-binary=:all: \
	  "$(ARTIFACTS_DIR)"/.wheel/aikit-*.whl
	cd "$(ARTIFACTS_DIR)/python" && rm -rf bin $(foreach p,$(LAYER_RUNTIME_PROVIDED),$(p) $(p)-*.dist-info) \
	  && rm -rf "$(ARTIFACTS_DIR)/.wheel" "$(ARTIFACTS_DIR)/.src"
	# Test suites some dependencies carry; nothing imports them at run time.
	find "$(ARTIFACTS_DIR)/python" -depth -type d \( -name tests -o -path '*/testing/suite' \) -exec rm -rf {} +
	$(LAYER_PYTHON) -m compileall -q -j 0 --invalidation-mode unchecked-hash \
	  -s "$(ARTIFACTS_DIR)" -p /opt "$(ARTIFACTS_DIR)/python"

layer:
	$(MAKE) -f $(ROOT)Makefile build-AikitLayer ARTIFACTS_DIR=$(ROOT).aws-sam/layer
