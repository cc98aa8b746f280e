#!/usr/bin/env bash
# Every GPU figure of meancache from one run on a bare GPU machine: tools/gpu_check.py with the right interpreter.
#
#   bash tools/gpu_check.sh [gpu_check.py options]      e.g. --dry-run, --stages env,build,correctness, --budget 480
#
# Interpreter: $PYTHON if set, else .venv/bin/python when it exists (a developer machine after `make setup`), else
# python3 (a GPU machine: the working tree arrives without .venv, and its system python3 has torch, Triton, pytest).
# Nothing is installed into that interpreter. Optional wheels (diffusers for the FLUX end-to-end stage) carried in
# $GPU_CHECK_WHEELS (default .whl/) are installed with --no-index --no-deps into a temporary folder that goes first
# on PYTHONPATH for this run only.
# Results: $OUT when set, else bench/gpu-check/ (results.json, results.md, gpu_check.log, bench_ops.json).
# Exit status: that of gpu_check.py (0 without a CUDA device: "no CUDA device: nothing measured").
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
command -v "$PY" > /dev/null || { echo "gpu_check.sh: no Python at $PY; no CUDA device: nothing measured"; exit 0; }

WHEELS=${GPU_CHECK_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/meancache-gpu-check-site.XXXXXX")
  trap 'rm -rf "$SITE"' EXIT
  echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheel(s) from $WHEELS into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check.sh: the carried wheels did not install; going on without them"
  fi
fi

"$PY" tools/gpu_check.py "$@"
