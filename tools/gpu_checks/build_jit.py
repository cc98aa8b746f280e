"""Fallback build of meancache._C with torch.utils.cpp_extension.load, for when ``setup.py build_ext`` fails.

tools/gpu_check.py builds the extension with ``python setup.py build_ext --inplace`` first. That path goes through
setuptools and the project metadata in pyproject.toml, which an older setuptools on a GPU machine may reject before
anything is compiled. This script compiles the same csrc/ sources with the same flags through torch's JIT builder
(ninja, no setuptools) and places the library at ``meancache/_C.so``, where ``import meancache._C`` finds it, so the
CUDA kernels still get measured. It reads TORCH_CUDA_ARCH_LIST and MAX_JOBS from the environment as torch does.

Example (on a GPU machine, from the repository root):
    $ TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python tools/gpu_checks/build_jit.py
    build_jit: meancache/_C.so built in 41.3 s
    $ python tools/gpu_checks/build_jit.py --dry-run     # sources and flags only, no compiler run
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / "build" / "gpu-check-jit"
# setup.py's release flags: C++20 for the torch headers, no fast math (the estimator divides by small sigma gaps).
CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20"]


def sources() -> list[str]:
    """The extension's sources, as setup.py lists them: every csrc/*.cu plus the bindings."""
    found = sorted(str(p) for p in (ROOT / "csrc").glob("*.cu"))
    return [*found, str(ROOT / "csrc" / "torch_bindings.cpp")]


def resolve_cuda_home() -> str | None:
    """Set CUDA_HOME, when unset, to a toolkit that has the CUDA headers (setup.py's rule, repeated here because
    importing setup.py would run the build): the toolkit of the ``nvcc`` on PATH, followed through links and
    wrapper scripts, else /usr/local/cuda. torch's own guess, the parent of the ``bin`` holding ``nvcc``, is wrong
    for a wrapper such as /usr/local/bin/nvcc and then links against a folder without libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # a wrapper script names the real compiler: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        try:
            text = pathlib.Path(real).read_text(errors="replace")[:4096]
        except OSError:
            text = ""
        candidates += [os.path.dirname(os.path.dirname(m)) for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print sources and flags, compile nothing")
    args = parser.parse_args(argv)
    srcs = sources()
    missing = [s for s in srcs if not pathlib.Path(s).is_file()]
    if missing:
        print(f"build_jit: missing sources {missing}", file=sys.stderr)
        return 1
    print(f"build_jit: sources {[str(pathlib.Path(s).relative_to(ROOT)) for s in srcs]}")
    print(f"build_jit: cxx {CXX_FLAGS}, nvcc {NVCC_FLAGS}, build dir {BUILD_DIR.relative_to(ROOT)}, "
          f"CUDA_HOME {resolve_cuda_home()}")
    if args.dry_run:
        return 0

    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # is_python_module=False: torch.ops.load_library registers the ops; the Python module is imported below, from
    # the package, once the library sits where the import system looks for it.
    load(name="_C", sources=srcs, extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
         extra_include_paths=[str(ROOT / "csrc")], build_directory=str(BUILD_DIR), is_python_module=False,
         verbose=True)
    built = BUILD_DIR / "_C.so"
    # One library per package: an older _C.<tag>.so would shadow _C.so (the import system tries tagged names first).
    for old in (ROOT / "meancache").glob("_C*.so"):
        old.unlink()
    shutil.copy2(built, ROOT / "meancache" / "_C.so")
    print(f"build_jit: meancache/_C.so built in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
