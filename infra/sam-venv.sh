#!/usr/bin/env bash
# Creates .venv-sam with aws-sam-cli pinned, in a venv of its own: it pins boto3, click and pydantic exactly,
# which must never leak into the project's .venv. Idempotent; safe to run from several processes at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAM_VENV:-$ROOT/.venv-sam}"
SAM_CLI_VERSION="${SAM_CLI_VERSION:-1.170.0}"
PY="${PY:-python3}"
STAMP="$VENV/.installed-aws-sam-cli-$SAM_CLI_VERSION"

install() {
  [ -f "$STAMP" ] && [ -x "$VENV/bin/sam" ] && return 0
  echo "creating $VENV with aws-sam-cli==$SAM_CLI_VERSION" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "aws-sam-cli==$SAM_CLI_VERSION"
  rm -f "$VENV"/.installed-aws-sam-cli-*
  touch "$STAMP"
}

if [ -f "$STAMP" ] && [ -x "$VENV/bin/sam" ]; then
  exit 0
fi
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
  # Two test runs starting together must not both pip-install into the same venv.
  exec 9>"$VENV/.install.lock"
  flock 9
  install
else
  install
fi
