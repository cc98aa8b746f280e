"""Build script for meancache: the Python package plus, when a CUDA toolchain is present, the extension meancache._C.

Install from a checkout with ``pip install --no-build-isolation --no-deps -e .`` and build wheels with
``pip wheel --no-build-isolation --no-deps -w dist .``. ``--no-build-isolation`` makes the build use the torch already
installed: the extension is tied to the torch it was compiled against, so an isolated build (which downloads its own
torch) would produce a .so for the wrong torch.

Environment variables the build reads (tools/*.sh and CMakeLists.txt mirror the defaults):

  MEANCACHE_SKIP_CUDA_BUILD=1   Build no extension: a pure-Python package (CPU reference and Triton paths only).
  MEANCACHE_FORCE_CUDA_BUILD=1  Fail instead of falling back to pure Python when no CUDA build is possible (CPU-only
                                torch, no nvcc / CUDA_HOME). Conflicts with MEANCACHE_SKIP_CUDA_BUILD=1.
  TORCH_CUDA_ARCH_LIST          Target GPUs, e.g. "9.0" or "8.0;9.0+PTX". Default when unset:
                                "8.0;8.6;8.9;9.0;10.0;12.0+PTX" (Ampere, Ada, Hopper, Blackwell; PTX of the newest so
                                later GPUs can JIT it). Never derived from the visible GPU, so a GPU-less builder
                                produces the same wheel as any other.
  MAX_JOBS                      Parallel compile jobs (ninja). Default min(2, CPU cores): there are only four
                                sources, and each nvcc job already compiles its target archs in parallel.
  NVCC_THREADS                  Threads one nvcc job uses to compile its target archs in parallel (`nvcc --threads`).
                                Default 4.
  MEANCACHE_LOCAL_VERSION       Local version label appended as "+<label>", e.g. "cu130torch2.14" gives
                                0.1.0+cu130torch2.14. Letters, digits and . _ - only. Default: none.
  DEBUG=1                       Debug build: -O0 -g for host code, -O0 -g -G (device debug info) for device code.
  CUDA_HOME / CUDA_PATH         The CUDA toolkit. When neither is set, this script picks the toolkit of the `nvcc`
                                on PATH if its include/ has the CUDA headers, else /usr/local/cuda (see
                                _resolve_cuda_home); torch's own guess can land on a wrapper-script directory.

CUDA builds also pin the building torch's minor version (``torch==X.Y.*``) in the wheel's requirements, because the
.so only loads with the torch ABI it was compiled against.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
CSRC = "csrc"


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    sys.exit(f"meancache setup.py: {name}={os.environ[name]!r} is not a boolean (use 1 or 0)")


def _log(message: str) -> None:
    print(f"meancache setup.py: {message}", file=sys.stderr, flush=True)


def _read_version() -> str:
    """__version__ from meancache/__init__.py (regex: importing the package here would need its dependencies)."""
    text = (ROOT / "meancache" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        sys.exit("meancache setup.py: no __version__ = '...' line in meancache/__init__.py")
    version = match.group(1)
    local = os.environ.get("MEANCACHE_LOCAL_VERSION", "").strip()
    if local:
        # PEP 440 local label: alphanumeric segments separated by . (pip normalizes _ and - to .).
        if not re.fullmatch(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*", local):
            sys.exit(f"meancache setup.py: MEANCACHE_LOCAL_VERSION={local!r} is not a valid local version label")
        version = f"{version}+{local}"
    return version


def _has_cuda_headers(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _resolve_cuda_home() -> None:
    """Set CUDA_HOME before torch.utils.cpp_extension reads it, when the user has not.

    torch guesses dirname(dirname(which nvcc)). When nvcc on PATH is a wrapper script (e.g. a /usr/local/bin/nvcc
    that execs /usr/local/cuda-13.0/bin/nvcc), that guess is /usr/local: nvcc still runs, but the CUDA headers and
    libcudart are not under it, so the C++ sources fail to compile. Prefer a directory that has the headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cuda_headers(home):
            os.environ["CUDA_HOME"] = home
            return


def _cuda_build_plan():
    """(build_cuda, reason): whether to build meancache._C, and why not when not. Never asks for a GPU."""
    if _env_flag("MEANCACHE_SKIP_CUDA_BUILD"):
        return False, "MEANCACHE_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc}); install torch first and build with --no-build-isolation"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    _resolve_cuda_home()
    import torch.utils.cpp_extension as cpp_extension

    if os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        # Imported before _resolve_cuda_home ran (e.g. by a sitecustomize): its cached guess is stale.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    if not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        # torch takes CUDA_HOME from the environment unchecked; fail here, not in the middle of a compile.
        return False, f"CUDA_HOME={cpp_extension.CUDA_HOME} has no bin/nvcc"
    return True, ""


def _torch_requirement() -> str:
    import torch

    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match is None:
        sys.exit(f"meancache setup.py: cannot read major.minor from torch.__version__={torch.__version__!r}")
    return f"torch=={match.group(1)}.{match.group(2)}.*"


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else ""


def _cuda_extension():
    from torch.utils.cpp_extension import CUDA_HOME
    from torch.utils.cpp_extension import CUDAExtension

    # torch's BuildExtension reads these from the environment, so defaults go there.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(min(2, os.cpu_count() or 1)))
    nvcc_threads = os.environ.get("NVCC_THREADS", "4")
    if not nvcc_threads.isdigit() or int(nvcc_threads) < 1:
        sys.exit(f"meancache setup.py: NVCC_THREADS={nvcc_threads!r} must be a positive integer")

    # torch >= 2.10 headers need C++20 (std::strong_ordering in c10); no --use_fast_math: the estimator multiplies
    # by 1/H twice and H can be small (conventions.md §3).
    if _env_flag("DEBUG"):
        cxx_flags = ["-O0", "-g", "-std=c++20"]
        nvcc_flags = ["-O0", "-g", "-G", "-std=c++20"]
    else:
        cxx_flags = ["-O3", "-std=c++20"]
        nvcc_flags = ["-O3", "-lineinfo", "-std=c++20"]
    nvcc_flags.append(f"--threads={nvcc_threads}")

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
    sources.append(f"{CSRC}/torch_bindings.cpp")
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.h*"))
    _log(
        f"building meancache._C with CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']},"
        f" MAX_JOBS={os.environ['MAX_JOBS']}, NVCC_THREADS={nvcc_threads}, DEBUG={int(_env_flag('DEBUG'))}"
    )
    return CUDAExtension(
        name="meancache._C",
        sources=sources,
        depends=headers,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        # Limited Python API (PyInit only, no pybind11): one cp310-abi3 wheel per torch x CUDA pair.
        py_limited_api=True,
    )


VERSION = _read_version()
BUILD_CUDA, SKIP_REASON = _cuda_build_plan()
if not BUILD_CUDA:
    if _env_flag("MEANCACHE_FORCE_CUDA_BUILD"):
        sys.exit(f"meancache setup.py: MEANCACHE_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {SKIP_REASON}")
    _log(f"building pure-Python meancache without the CUDA extension: {SKIP_REASON}")
TORCH_PIN = _torch_requirement() if BUILD_CUDA else None


class MeanCacheDistribution(Distribution):
    """Applies the build-dependent metadata after pyproject.toml has been read.

    pyproject.toml declares `version` dynamic through `[tool.setuptools.dynamic]` and `dependencies` statically, and
    setuptools lets that configuration override setup() arguments. Two values depend on the build, so they are set
    here, after the configuration is applied:
    - the version gets the MEANCACHE_LOCAL_VERSION label;
    - a CUDA build replaces the `torch` requirement with `torch==X.Y.*` of the building torch. The requirements
      become a new list (not an in-place edit), so setuptools marks Requires-Dist `Dynamic` (PEP 643) in the
      metadata it writes.
    """

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        self.metadata.version = VERSION
        requires = list(self.install_requires or [])
        if TORCH_PIN is not None:
            requires = [*(r for r in requires if _requirement_name(r) != "torch"), TORCH_PIN]
        # Replaced by a plain list even in pure-Python builds: an sdist must declare Requires-Dist dynamic whenever
        # a wheel built from it may differ, and whether that wheel is a CUDA one is decided at wheel-build time.
        self.install_requires = requires
        self.metadata.install_requires = requires


setup_kwargs: dict = {"version": VERSION, "distclass": MeanCacheDistribution}
if BUILD_CUDA:
    from torch.utils.cpp_extension import BuildExtension

    setup_kwargs["ext_modules"] = [_cuda_extension()]
    setup_kwargs["cmdclass"] = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    setup_kwargs["options"] = {"bdist_wheel": {"py_limited_api": "cp310"}}

setup(**setup_kwargs)
