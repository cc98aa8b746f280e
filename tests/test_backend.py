"""Backend choice: MEANCACHE_BACKEND, available_backends(), and a package that works with nothing compiled."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from fields import SmoothField
from fields import rel_err

import meancache
from meancache import _backend
from meancache.flows import shifted_sigmas

SIGMAS = shifted_sigmas(50).tolist()


def test_available_backends_reports_every_backend_with_a_state():
    states = meancache.available_backends()
    assert set(states) == {"cuda", "triton", "torch"}
    assert states["torch"].startswith("available")
    for name, state in states.items():
        assert state.startswith(("available: ", "unavailable: ")), (name, state)
    if not torch.cuda.is_available():
        assert states["cuda"].startswith("unavailable: ")


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("MEANCACHE_BACKEND", raising=False)
    assert _backend.select_backend(torch.zeros(3)) == "torch"
    assert _backend.select_backend(torch.zeros(3, dtype=torch.float64)) == "torch"


def test_unknown_backend_value_is_rejected(monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="MEANCACHE_BACKEND='tensorrt': must be one of auto, cuda, triton, torch"):
        meancache.sample(SmoothField(8), torch.zeros(2, 8), SIGMAS, meancache.Schedule.preset("qwen-image", 10))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_forced_cuda_without_gpu_names_what_is_available(monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"MEANCACHE_BACKEND=cuda cannot run this call: .*Backends: cuda: .*"
                                           r"triton: .*torch: available"):
        meancache.sample(SmoothField(8), torch.zeros(2, 8), SIGMAS, meancache.Schedule.preset("qwen-image", 10))


def test_forced_kernel_backend_rejects_float64(monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="take float16/bfloat16/float32 latents, not torch.float64"):
        meancache.sample(
            SmoothField(8), torch.zeros(2, 8, dtype=torch.float64), SIGMAS, meancache.Schedule.preset("z-image", 13)
        )


@pytest.mark.skipif(_backend.triton_kernels() is None, reason="triton is not importable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sample_with_triton_matches_reference(dtype, monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    schedule = meancache.Schedule.preset("qwen-image", 17)
    field = SmoothField(24, seed=3)
    x0 = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    monkeypatch.setenv("MEANCACHE_BACKEND", "torch")
    ref = meancache.sample(field, x0, SIGMAS, schedule)
    monkeypatch.setenv("MEANCACHE_BACKEND", "triton")
    out = meancache.sample(field, x0, SIGMAS, schedule)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_package_works_without_triton_and_extension(tmp_path):
    # a fresh interpreter in which neither triton nor meancache._C can be imported
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        sys.modules["meancache._C"] = None
        import torch, meancache
        states = meancache.available_backends()
        assert states["triton"].startswith("unavailable: triton is not installed"), states
        assert states["cuda"].startswith("unavailable: meancache._C did not load"), states
        x = meancache.sample(lambda x, s: x - 1.0, torch.randn(2, 8), torch.linspace(1, 0, 11),
                             meancache.Schedule.default(4, 10))
        assert x.shape == (2, 8) and torch.isfinite(x).all()
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
