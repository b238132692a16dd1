#!/usr/bin/env bash
# Creates (once) and updates the project-local virtual environment .venv with jdiff and its test deps.
# Idempotent: safe to call before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
.venv/bin/uv pip install -q -p .venv/bin/python -e '.[test]'
