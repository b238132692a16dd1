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
# Bytecode for every installed module and for the repo's own: uv writes none, and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) no import writes any, so each
# process would compile jax, flax, orbax, grain and tfds from source again: importing
# experiments.main took 7.7-8.5 s without them and 3.0-3.5 s with them (AVX2 machine), paid by
# every CLI run and every test subprocess. compileall writes only what is missing or stale
# (about 8 s when nothing is). A third-party file it cannot compile is one this Python cannot
# import either (torch ships Python 3.12-only test helpers); the repo's own must compile.
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
.venv/bin/python -m compileall -q -j 0 jdiff experiments tests
