#!/usr/bin/env bash
# Developer build of csrc/ with CMake (CMakeLists.txt) into build/cmake, then check that it produced
# compile_commands.json and the _C library. `make cmake-build` runs this; CI runs it so the CMake and setup.py
# builds of the same sources cannot drift apart.
#
# Environment: PYTHON (default .venv/bin/python), CMAKE (default: the one next to PYTHON, else cmake on PATH),
# BUILD_DIR (default build/cmake), CUDA_HOME (default: /usr/local/cuda, else the toolkit of nvcc on PATH),
# CMAKE_BUILD_TYPE (default Release), NVCC_THREADS (default 4), MAX_JOBS (default min(2, cores)),
# CMAKE_CUDA_ARCHITECTURES (default: CMakeLists.txt's list, the same targets as the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build_cmake.sh: error: $*" >&2; exit 1; }

PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || die "no Python at $PYTHON (run \`make setup\` or set PYTHON)"
PY_BIN_DIR=$(dirname "$PYTHON")
CMAKE=${CMAKE:-}
if [[ -z $CMAKE ]]; then
  if [[ -x $PY_BIN_DIR/cmake ]]; then CMAKE=$PY_BIN_DIR/cmake; else CMAKE=$(command -v cmake || true); fi
fi
[[ -n $CMAKE && -x $CMAKE ]] || die "cmake not found (pip install cmake, see requirements.txt)"

# The real toolkit directory: nvcc on PATH may be a wrapper script outside it (see setup.py, _resolve_cuda_home).
if [[ -z ${CUDA_HOME:-} ]]; then
  if [[ -f /usr/local/cuda/include/cuda_runtime_api.h ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc > /dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
[[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]] || die "no CUDA toolkit found (set CUDA_HOME)"

BUILD_DIR=${BUILD_DIR:-build/cmake}
TORCH_PREFIX=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
JOBS=${MAX_JOBS:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}

GENERATOR=()
if command -v ninja > /dev/null || [[ -x $PY_BIN_DIR/ninja ]]; then
  GENERATOR=(-G Ninja)
  [[ -x $PY_BIN_DIR/ninja ]] && GENERATOR+=(-DCMAKE_MAKE_PROGRAM="$(readlink -f "$PY_BIN_DIR/ninja")")
fi
# A cache made with another generator would make the configure step fail.
if [[ -f $BUILD_DIR/CMakeCache.txt ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GENERATOR[1]:-Unix Makefiles}" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"
fi

ARCH_ARGS=()
[[ -n ${CMAKE_CUDA_ARCHITECTURES:-} ]] && ARCH_ARGS=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")

start=$(date +%s)
"$CMAKE" -S . -B "$BUILD_DIR" "${GENERATOR[@]}" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DPython_EXECUTABLE="$(readlink -f "$PYTHON")" \
  -DCUDAToolkit_ROOT="$CUDA_HOME" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" \
  -DNVCC_THREADS="${NVCC_THREADS:-4}" \
  "${ARCH_ARGS[@]}"
"$CMAKE" --build "$BUILD_DIR" --parallel "$JOBS"

[[ -s $BUILD_DIR/compile_commands.json ]] || die "$BUILD_DIR/compile_commands.json was not generated"
for src in csrc/*.cu csrc/torch_bindings.cpp; do
  grep -q "$(basename "$src")" "$BUILD_DIR/compile_commands.json" || die "compile_commands.json has no entry for $src"
done
LIB=$BUILD_DIR/_C.so
[[ -f $LIB ]] || die "$LIB was not produced"
# (Captured first: `nm | grep -q` under pipefail fails when grep exits early and nm gets SIGPIPE.)
exported=$(nm -D --defined-only "$LIB")
grep -q " PyInit__C$" <<< "$exported" || die "$LIB does not export PyInit__C"
# Loading runs the static op registrations; an unresolved symbol would only show up here.
"$PYTHON" - "$LIB" <<'PY' || die "$LIB does not load or does not register the meancache ops"
import sys

import torch

torch.ops.load_library(sys.argv[1])
for name in ("_skip_step_cuda", "_compute_step_cuda", "_estimate_cuda", "_weighted_step_cuda"):
    assert hasattr(torch.ops.meancache, name), name
PY
echo "build_cmake.sh: OK: $LIB and $BUILD_DIR/compile_commands.json ($(( $(date +%s) - start )) s)"
