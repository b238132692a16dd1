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
# torch and torchvision (test references only) go in with pip first: pip takes the wheels that
# lie on this kind of machine's disk (uv would download a CUDA build of several GB).
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/uv pip install -q -p .venv/bin/python -e '.[test]'
