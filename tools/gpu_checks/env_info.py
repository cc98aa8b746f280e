"""Print, as one JSON object, what a GPU check run must record about the machine: GPU, driver, versions, tools.

Run by tools/gpu_check.py as its first stage, in a subprocess of its own: importing torch and creating a CUDA context
there keeps a broken driver or a hanging device from taking the driver script down with it. Works without a GPU and
without torch (it then says so), so the CPU dry run exercises it too.

Example:
    $ python tools/gpu_checks/env_info.py [OUT.json]
    {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda_available": true, "device_name": "NVIDIA H200", ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Everything the measured code is made of: a digest of it names the code when the working tree travels without .git.
DIGEST_DIRS = ("meancache", "csrc", "tools", "bench", "tests")
DIGEST_SUFFIXES = (".py", ".cu", ".cuh", ".h", ".cpp", ".sh", ".json", ".txt", ".toml")


def _run(argv: list[str], timeout: float = 20) -> str | None:
    """stdout of ``argv`` stripped, or None when it cannot run or fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_digest() -> str:
    """sha256 (first 16 hex digits) over the paths and contents of the project's source files."""
    h = hashlib.sha256()
    for top in DIGEST_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in DIGEST_SUFFIXES and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(b"\0")
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit (CUDA_HOME, CUDA_PATH, the nvcc's own bin, /usr/local/cuda)."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in homes:
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    return None


def git_info() -> dict:
    """Commit and dirty flag from git when the tree has .git; GPU_CHECK_COMMIT when the caller states it."""
    commit = _run(["git", "rev-parse", "HEAD"])
    dirty = None
    if commit is not None:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        dirty = bool(status) if status is not None else None
    stated = os.environ.get("GPU_CHECK_COMMIT", "").strip() or None
    return {"commit": commit or stated, "commit_source": "git" if commit else ("GPU_CHECK_COMMIT" if stated else None),
            "dirty": dirty}


def torch_info() -> dict:
    info: dict = {"torch": None, "torch_cuda": None, "cuda_available": False}
    try:
        import torch
    except Exception as exc:  # a missing or broken torch is a finding, not a crash
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
        return info
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        info.update(
            device_count=torch.cuda.device_count(),
            device_name=props.name,
            capability=f"{major}.{minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        )
    return info


def module_version(name: str) -> str | None:
    """The installed version of distribution ``name`` from its metadata (no import: diffusers alone takes seconds),
    or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvcc_version() -> str | None:
    nvcc = find_tool("nvcc")
    out = _run([nvcc, "--version"]) if nvcc else None
    match = re.search(r"release ([0-9.]+), V([0-9.]+)", out or "")
    return match.group(2) if match else None


def nvidia_smi() -> dict:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,pstate",
                "--format=csv,noheader"])
    if not out:
        return {"driver": None}
    fields = [f.strip() for f in out.splitlines()[0].split(",")]
    keys = ["smi_name", "driver", "smi_memory", "sm_clock", "sm_clock_max", "pstate"]
    return dict(zip(keys, fields))


def collect() -> dict:
    """Everything above in one dict (keys are stable: tools/gpu_check.py and tests/test_gpu_check.py read them)."""
    info = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    info.update(torch_info())
    info.update(
        triton=module_version("triton"),
        diffusers=module_version("diffusers"),
        transformers=module_version("transformers"),
        pytest_benchmark=module_version("pytest-benchmark"),
        xdist=module_version("pytest-xdist"),
        pytest_timeout=module_version("pytest-timeout"),
        nvcc=nvcc_version(),
        compute_sanitizer=find_tool("compute-sanitizer"),
        ninja=shutil.which("ninja") or module_version("ninja"),
    )
    info.update(nvidia_smi())
    info.update(git_info())
    info["source_digest"] = source_digest()
    return info


if __name__ == "__main__":
    text = json.dumps(collect(), sort_keys=True)
    if len(sys.argv) > 1:  # tools/gpu_check.py passes a file, so the JSON stays apart from any warning on stdout
        pathlib.Path(sys.argv[1]).write_text(text + "\n")
    print(text)
