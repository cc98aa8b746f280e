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


@pytest.mark.skipif(_backend.triton_kernels() is None or not (torch.cuda.is_available() or _backend._interpreting()),
                    reason="needs triton on CUDA or under TRITON_INTERPRET=1")
def test_triton_launchers_refuse_a_ring_they_would_address_outside_of():
    # meancache.ops checks first; the launchers are public too, and their kernels trust row = slot * numel
    kernels = _backend.triton_kernels()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(2, 8, device=device)
    xs, vs = torch.zeros(3, 2, 8, device=device), torch.zeros(2, 2, 8, device=device)
    with pytest.raises(ValueError, match=r"skip_step_triton: xs has shape \(3, 2, 8\) but vs has shape \(2, 2, 8\)"):
        kernels.skip_step_triton(x, xs, vs, 0, 1, 2, -2.0, -0.25)
    with pytest.raises(ValueError, match=r"estimate_triton: slot_write=3: must be in 0..2"):
        kernels.estimate_triton(x, xs, xs.clone(), 0, 1, 3, -2.0, -0.25, 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"compute_step_triton: xs has shape \(3, 8\): must be \(C, \*x.shape\)"):
        kernels.compute_step_triton(x, x, xs.view(3, 16)[:, :8].contiguous(), xs.view(3, 16)[:, :8].contiguous(),
                                    0, -0.25)
    with pytest.raises(ValueError, match=r"compute_step_triton: v has shape \(3,\)"):
        kernels.compute_step_triton(x, x[0, :3], xs, xs.clone(), 0, -0.25)
    assert not xs.any() and not vs.any()


def test_float64_velocity_never_reaches_the_compiled_kernel(monkeypatch):
    # the CUDA kernel reads float16/bfloat16/float32 velocities; a float64 one (allowed by compute_step) must take
    # the reference instead of failing inside the extension
    from meancache import ops

    monkeypatch.setattr(_backend, "select_backend", lambda x: "cuda")

    def no_extension():
        raise AssertionError("the CUDA extension was called with a float64 velocity")

    monkeypatch.setattr(_backend, "cuda_ops", no_extension)
    xs, vs = torch.zeros(2, 3), torch.zeros(2, 3)
    out = ops.compute_step(torch.ones(3), torch.ones(3, dtype=torch.float64), xs, vs, 1, 1.0, 0.5)
    assert torch.equal(out, torch.full((3,), 0.5)) and torch.equal(vs[1], torch.ones(3))
