#!/usr/bin/env bash
# Check a built CUDA wheel the way a user gets it: install it into a FRESH virtual environment next to a plain
# `pip install torch==X.Y.Z`, import it from outside the checkout, and check the device code inside its .so.
#
#   tools/check_wheel.sh [WHEEL]     default WHEEL: the newest dist/meancache-*.whl (`make wheel` builds it)
#
# Fails (non-zero exit, message on stderr) when the wheel lacks the extension or the preset data, when
# `import meancache._C` or the op registration fails, or when the .so lacks SASS for an architecture of the arch
# list or PTX for its +PTX entry.
#
# Environment: PYTHON (default .venv/bin/python: the interpreter the fresh venv is made from, and whose torch
# version is installed), TORCH_SPEC (default torch==<that torch's version without local tag>), TORCH_CUDA_ARCH_LIST
# (default: setup.py's DEFAULT_ARCH_LIST; set it to what the wheel was built with), CUOBJDUMP (default: cuobjdump on
# PATH, in $CUDA_HOME/bin, or from the nvidia-cuda-cuobjdump package in the project venv), KEEP_TMP=1 (keep the
# temporary venv for inspection).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { echo "check_wheel.sh: FAIL: $*" >&2; exit 1; }
say() { echo "check_wheel.sh: $*"; }

PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || die "no Python at $PYTHON (run \`make setup\` or set PYTHON)"

WHEEL=${1:-$(ls -t dist/meancache-*.whl 2> /dev/null | head -n 1 || true)}
[[ -n $WHEEL && -f $WHEEL ]] || die "no wheel given and none in dist/ (run \`make wheel\` first)"
WHEEL=$(readlink -f "$WHEEL")
say "checking $WHEEL"

# --- arch list: the one the wheel was built for ---------------------------------------------------------------
ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^DEFAULT_ARCH_LIST = "\(.*\)"$/\1/p' setup.py)}
[[ -n $ARCH_LIST ]] || die "cannot read DEFAULT_ARCH_LIST from setup.py"
SASS_ARCHS=()
PTX_ARCHS=()
for entry in ${ARCH_LIST//[; ]/ }; do
  num=${entry%%+*}
  num=${num//./}
  SASS_ARCHS+=("sm_$num")
  [[ $entry == *+PTX ]] && PTX_ARCHS+=("sm_$num")
done

# --- cuobjdump ----------------------------------------------------------------------------------------------------
CUOBJDUMP=${CUOBJDUMP:-$(command -v cuobjdump || true)}
[[ -z $CUOBJDUMP && -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/cuobjdump ]] && CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
if [[ -z $CUOBJDUMP ]]; then
  for candidate in "$(dirname "$PYTHON")"/../lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump \
    "$(dirname "$PYTHON")"/../lib/python3*/site-packages/nvidia/cuda_cuobjdump/bin/cuobjdump; do
    [[ -x $candidate ]] && CUOBJDUMP=$(readlink -f "$candidate") && break
  done
fi
[[ -n $CUOBJDUMP && -x $CUOBJDUMP ]] || die "cuobjdump not found (pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/meancache-check-wheel.XXXXXX")
if [[ ${KEEP_TMP:-0} == 1 ]]; then say "keeping $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi

# --- wheel contents -----------------------------------------------------------------------------------------------
mkdir "$TMP/unpacked"
"$PYTHON" -m zipfile -e "$WHEEL" "$TMP/unpacked"
SO=$(find "$TMP/unpacked/meancache" -maxdepth 1 -name '_C*.so' | head -n 1)
[[ -n $SO ]] || die "the wheel has no meancache/_C*.so (built with MEANCACHE_SKIP_CUDA_BUILD=1, or without CUDA?)"
ls "$TMP"/unpacked/meancache/presets/*.json > /dev/null 2>&1 || die "the wheel has no meancache/presets/*.json"
[[ -s $TMP/unpacked/meancache/examples/digits/weights/digits.safetensors ]] \
  || die "the wheel has no meancache/examples/digits/weights/digits.safetensors (the embedded model)"
METADATA=$(cat "$TMP"/unpacked/meancache-*.dist-info/METADATA)
grep -Eq '^Requires-Dist: torch==[0-9]+\.[0-9]+\.\*$' <<< "$METADATA" \
  || die "the wheel's METADATA does not pin torch==X.Y.* (found: $(grep '^Requires-Dist: torch' <<< "$METADATA" || echo none))"
say "wheel holds $(basename "$SO"), the presets, the digits weights and $(grep '^Requires-Dist: torch' <<< "$METADATA")"

# --- device code: SASS for every arch in every kernel object, PTX for the +PTX entries ---------------------------
ELF_LIST=$("$CUOBJDUMP" --list-elf "$SO") || die "cuobjdump --list-elf failed on $(basename "$SO")"
PTX_LIST=$("$CUOBJDUMP" --list-ptx "$SO") || die "cuobjdump --list-ptx failed on $(basename "$SO")"
missing=()
for src in csrc/*.cu; do
  obj=$(basename "$src" .cu)
  for arch in "${SASS_ARCHS[@]}"; do
    grep -q "[[:space:]]$obj\.$arch\.cubin$" <<< "$ELF_LIST" || missing+=("SASS $obj.$arch")
  done
  for arch in "${PTX_ARCHS[@]}"; do
    grep -q "[[:space:]]$obj\.$arch\.ptx$" <<< "$PTX_LIST" || missing+=("PTX $obj.$arch (compute_${arch#sm_})")
  done
done
# Any other SASS would mean the build ignored the arch list.
for arch in $(grep -o 'sm_[0-9a-z]*\.cubin' <<< "$ELF_LIST" | sed 's/\.cubin$//' | sort -u); do
  [[ " ${SASS_ARCHS[*]} " == *" $arch "* ]] || missing+=("unexpected SASS for $arch (not in $ARCH_LIST)")
done
((${#missing[@]} == 0)) || die "device code does not match TORCH_CUDA_ARCH_LIST=$ARCH_LIST: ${missing[*]}"
say "device code OK: SASS ${SASS_ARCHS[*]}; PTX ${PTX_ARCHS[*]:-none}"

# --- a fresh venv with a plain torch, the wheel without dependencies ---------------------------------------------
TORCH_SPEC=${TORCH_SPEC:-torch==$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')}
say "creating a fresh venv and installing $TORCH_SPEC (from pip's configured index)"
"$PYTHON" -m venv "$TMP/venv"
# numpy too: a declared dependency, and torch warns at import without it.
"$TMP/venv/bin/python" -m pip install --quiet "$TORCH_SPEC" numpy || die "pip install $TORCH_SPEC numpy failed"
"$TMP/venv/bin/python" -m pip install --quiet --no-deps "$WHEEL" || die "pip install --no-deps $WHEEL failed"

# From outside the checkout, so `import meancache` cannot pick up the source tree.
(cd "$TMP" && "$TMP/venv/bin/python" - "$TMP/venv" <<'PY') || die "the installed wheel does not import or register its ops"
import os
import sys

import torch

import meancache
import meancache._C

venv = os.path.realpath(sys.argv[1])
for module in (meancache, meancache._C):
    path = os.path.realpath(module.__file__)
    assert path.startswith(venv + os.sep), f"{module.__name__} imported from {path}, not from the fresh venv"
missing = [n for n in ("_skip_step_cuda", "_compute_step_cuda", "_estimate_cuda", "_weighted_step_cuda")
           if not hasattr(torch.ops.meancache, n)]
assert not missing, f"torch.ops.meancache lacks {missing}"
print(f"check_wheel.sh: imported meancache {meancache.__version__} with torch {torch.__version__}; ops registered")
PY
say "OK"
