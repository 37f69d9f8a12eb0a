#!/usr/bin/env bash
# Lints template.yaml with `sam validate --lint` and `cfn-lint`; any error or warning fails (exit != 0).
# Creates .venv-sam on first use (infra/sam-venv.sh). Works offline once the venvs exist.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAM_VENV="${SAM_VENV:-$ROOT/.venv-sam}"
TEMPLATE="${TEMPLATE:-$ROOT/template.yaml}"
export SAM_CLI_TELEMETRY=0

SAM_VENV="$SAM_VENV" bash "$ROOT/infra/sam-venv.sh"

echo "== sam validate --lint" >&2
"$SAM_VENV/bin/sam" validate --lint --template-file "$TEMPLATE"

# The project's cfn-lint (pyproject dev dependency) when installed, else the one aws-sam-cli brings.
CFN_LINT="$ROOT/.venv/bin/cfn-lint"
[ -x "$CFN_LINT" ] || CFN_LINT="$SAM_VENV/bin/cfn-lint"
echo "== $("$CFN_LINT" --version) $TEMPLATE" >&2
"$CFN_LINT" -- "$TEMPLATE"
echo "template lint: clean" >&2
