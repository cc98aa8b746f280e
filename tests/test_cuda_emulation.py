"""The CUDA kernels of csrc/, compiled as host C++ and run thread by thread against a plain loop (no GPU needed).

tools/emulate_kernels.sh does the work; this test runs it so that `make test` checks the CUDA indexing, the vector
path's alignment condition, the scalar tail, the grid-stride loop and aliased ring slots on every CI run.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_HEADERS = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include" / "vector_types.h"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++ compiler")
@pytest.mark.skipif(not CUDA_HEADERS.is_file(), reason=f"needs the CUDA headers ({CUDA_HEADERS})")
def test_cuda_kernels_match_plain_loop_in_emulation():
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "emulate_kernels.sh")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    match = re.search(r"(\d+) cases \((\d+) on the vector path\), (\d+) failures", done.stdout)
    assert match, done.stdout[-2000:]
    cases, vector, failures = map(int, match.groups())
    assert failures == 0
    assert cases > 10000 and vector > 1000
