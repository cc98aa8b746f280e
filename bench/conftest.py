"""Benchmark fixtures: the machine record, a synchronising timer and the device-to-device copy bandwidth.

Benchmarks are pytest-benchmark tests in ``bench_*.py``; ``make bench`` runs them. Without a GPU they run once each
(``--benchmark-disable``) as a smoke test: CPU timings of GPU kernels mean nothing and are not reported.
"""

from __future__ import annotations

import datetime
import platform
import subprocess

import pytest
import torch

HAS_GPU = torch.cuda.is_available()


def machine() -> dict:
    """GPU, versions and commit recorded with every benchmark."""
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if HAS_GPU else f"CPU ({platform.processor() or platform.machine()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git"] = None
    return info


def time_ms(fn, *, repeats: int = 50) -> float:
    """Median milliseconds of ``fn()``: CUDA-event timing through triton.testing.do_bench on a GPU, wall clock on
    the CPU (a smoke figure only)."""
    if HAS_GPU:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=repeats, return_mode="median"))
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


@pytest.fixture(scope="session")
def copy_bandwidth() -> float | None:
    """GB/s of a 512 MB device-to-device copy on this GPU, measured once per run (None without a GPU)."""
    if not HAS_GPU:
        return None
    src = torch.empty(2**27, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@pytest.fixture(scope="session")
def machine_info() -> dict:
    return machine()
