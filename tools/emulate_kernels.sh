#!/usr/bin/env bash
# Build and run tools/emulate_kernels.cpp: the CUDA kernels of csrc/ run on the CPU, every grid thread in turn,
# compared bit for bit with a plain loop (see the comment at the top of the .cpp). Needs g++ and the torch and CUDA
# headers, no GPU. About a minute on 2 cores.
#
# Environment: PYTHON (default .venv/bin/python; its torch provides headers and libc10), CXX (default g++),
# CUDA_HOME (default /usr/local/cuda; only its headers are used, for uint4).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "emulate_kernels.sh: error: $*" >&2; exit 1; }
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || die "no Python at $PYTHON"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[[ -f $CUDA_HOME/include/vector_types.h ]] || die "no CUDA headers under $CUDA_HOME (set CUDA_HOME)"
TORCH_DIR=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')

TMP=$(mktemp -d "${TMPDIR:-/tmp}/meancache-emulate.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# The shared kernel code (elementwise_kernel in utils.cuh, EstimatorOp in estimator.cuh) is included by the .cpp
# through -I csrc. Each op's own device code (its op struct or output functor) lives in its .cu's anonymous
# namespace, extracted here; the host launchers after it need tensors and a device, and are left out.
"$PYTHON" - "$TMP/kernels_extracted.inc" <<'PY'
import pathlib
import sys

names = ("skip_step", "compute_step", "estimate", "weighted_step")
found = sorted(p.stem for p in pathlib.Path("csrc").glob("*.cu"))
if found != sorted(names):
    sys.exit(f"emulate_kernels.sh: csrc/*.cu is {found}, the emulation covers {sorted(names)}: update both scripts")
parts = []
for name in names:
    text = pathlib.Path(f"csrc/{name}.cu").read_text()
    start = text.index("namespace {\n")
    end = text.index("}  // namespace\n", start) + len("}  // namespace\n")
    parts.append(f"// ---- csrc/{name}.cu\n{text[start:end]}")
pathlib.Path(sys.argv[1]).write_text("\n".join(parts))
PY

# -w: host_defines.h turns __device__ / __global__ into attributes g++ ignores (with a warning each).
"${CXX:-g++}" -std=c++20 -O1 -w -I csrc -I "$TMP" -isystem "$TORCH_DIR/include" -isystem "$CUDA_HOME/include" \
  tools/emulate_kernels.cpp -o "$TMP/emulate_kernels" -L "$TORCH_DIR/lib" -lc10 -Wl,-rpath,"$TORCH_DIR/lib"
"$TMP/emulate_kernels"
