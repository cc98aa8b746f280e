"""The fused ops (meancache::skip_step, compute_step, estimate) on every backend against the reference.

Hierarchy of truth: a float64 computation of the same formula, then the pure-torch reference (fp32 math), then the
Triton kernels (CPU interpreter here, GPU when present) and the CUDA extension (GPU only). Besides per-dtype
tolerances against the reference, each backend's error against float64 must be at most twice that of eager
PyTorch doing the math in the latent dtype (FlashAttention's rule).
"""

from __future__ import annotations

import pytest
import torch

from meancache import _backend
from meancache import ops
from meancache.reference import compute_step_ref
from meancache.reference import estimate_ref
from meancache.reference import skip_step_ref
from meancache.reference import step_scalars

HAS_GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# NOTE: fp32 allows reordering/FMA differences; fp16/bf16 allow one rounding of the stored result (half an ulp is
# 4.9e-4 for fp16 and 3.9e-3 for bf16, doubled for the interpreter's emulated conversions).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
REAL_SHAPES = {"flux-1024": (1, 4096, 64), "qwen-1664x928": (1, 6032, 64), "zimage": (1, 16, 160, 90)}
ODD_SHAPES = {"odd-3x7x129": (3, 7, 129), "one": (1, 1, 1), "prime-1031": (1031,)}
SIGMAS = (0.92, 0.71, 0.66)  # window start, now, next
OPS = ["skip_step", "compute_step", "estimate"]


def _backends():
    out = [pytest.param("torch", id="torch")]
    triton_ok = _backend.triton_kernels() is not None
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not triton_ok, reason=f"triton: {_backend.available_backends()['triton']}")))
    cuda_ok = _backend.cuda_ops() is not None and HAS_GPU
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not cuda_ok, reason=f"cuda: {_backend.available_backends()['cuda']}")))
    return out


BACKENDS = _backends()


def _device(backend):
    return "cuda" if backend == "cuda" or HAS_GPU else "cpu"


def _inputs(shape, dtype, device, capacity=6, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:
        # a slice of a wider tensor: not contiguous, as a caller's view of packed latents would be
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=g).to(dtype=dtype, device=device)
        x = wide[..., 2 : 2 + shape[-1]]
        assert not x.is_contiguous()
    else:
        x = torch.randn(shape, generator=g).to(dtype=dtype, device=device)
    xs = torch.randn((capacity, *shape), generator=g).to(device)
    vs = torch.randn((capacity, *shape), generator=g).to(device)
    v = torch.randn(shape, generator=g).to(dtype=torch.bfloat16 if dtype == torch.float32 else torch.float32,
                                           device=device)
    return x, v, xs, vs


def _run(op, backend, x, v, xs, vs, step=9, k=4, out_dtype=None, monkeypatch=None):
    """Call the public op with MEANCACHE_BACKEND forced to ``backend``; returns (output, xs, vs) on copies."""
    xs, vs = xs.clone(), vs.clone()
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    if op == "skip_step":
        out = ops.skip_step(x, xs, vs, step, k, *SIGMAS)
    elif op == "compute_step":
        out = ops.compute_step(x, v, xs, vs, step, SIGMAS[1], SIGMAS[2])
    else:
        out = ops.estimate(x, xs, vs, step, k, *SIGMAS, out_scale=-1.0, out_dtype=out_dtype or x.dtype)
    return out, xs, vs


def _truth(op, x, v, xs, vs, step=9, k=4, out_dtype=None, math_dtype=torch.float64):
    """The op's formula with every operand in ``math_dtype`` (float64: the truth; the latent dtype: eager)."""
    c = xs.shape[0]
    start, last, write = (step - k) % c, (step - 1) % c, step % c
    inv_d, dt = step_scalars(*SIGMAS)
    xd, xsd, vsd = x.to(math_dtype), xs.to(math_dtype), vs.to(math_dtype)
    if op == "compute_step":
        vd = v.to(math_dtype)
        xsd[write], vsd[write] = xd, vd
        return (xd + dt * vd), xsd, vsd
    v_hat = vsd[last] - (vsd[start] - (xd - xsd[start]) * inv_d) * inv_d * dt
    xsd[write], vsd[write] = xd, v_hat
    if op == "skip_step":
        return xd + dt * v_hat, xsd, vsd
    return -v_hat, xsd, vsd


def _check_against_reference(op, backend, x, v, xs, vs, monkeypatch):
    out, xs_b, vs_b = _run(op, backend, x, v, xs, vs, monkeypatch=monkeypatch)
    ref, xs_r, vs_r = _run(op, "torch", x, v, xs, vs, monkeypatch=monkeypatch)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out, ref, **TOL[x.dtype])
    torch.testing.assert_close(xs_b, xs_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vs_b, vs_r, **TOL[torch.float32])
    # second rule: no worse than twice eager PyTorch computing in the latent dtype
    truth, _, vs_t = _truth(op, x, v, xs, vs)
    eager, _, _ = _truth(op, x, v, xs, vs, math_dtype=x.dtype)
    err = (out.double() - truth).abs().max().item()
    err_eager = (eager.double() - truth).abs().max().item()
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)
    assert (vs_b.double() - vs_t).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(REAL_SHAPES.values()), ids=list(REAL_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_real_latent_shapes(op, shape, dtype, backend, monkeypatch):
    x, v, xs, vs = _inputs(shape, dtype, _device(backend))
    _check_against_reference(op, backend, x, v, xs, vs, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(ODD_SHAPES.values()), ids=list(ODD_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_odd_sizes(op, shape, dtype, backend, monkeypatch):
    x, v, xs, vs = _inputs(shape, dtype, _device(backend), seed=1)
    _check_against_reference(op, backend, x, v, xs, vs, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_latent(op, dtype, backend, monkeypatch):
    x, v, xs, vs = _inputs((2, 9, 33), dtype, _device(backend), seed=2, strided=True)
    _check_against_reference(op, backend, x, v, xs, vs, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["skip_step", "estimate"])
def test_full_ring_writes_over_the_window_start(op, backend, monkeypatch):
    # capacity == k: this step's slot is the window start's slot; inputs must be read before the write
    x, v, xs, vs = _inputs((4, 65), torch.float32, _device(backend), capacity=3, seed=3)
    out, xs_b, vs_b = _run(op, backend, x, v, xs, vs, step=7, k=3, monkeypatch=monkeypatch)
    truth, xs_t, vs_t = _truth(op, x, v, xs, vs, step=7, k=3)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vs_b.double(), vs_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimate_output_dtype_and_zero_length_window(backend, monkeypatch):
    x, v, xs, vs = _inputs((3, 40), torch.bfloat16, _device(backend), seed=4)
    xs, vs = xs.clone(), vs.clone()
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    out = ops.estimate(x, xs, vs, 5, 2, 0.5, 0.5, 0.4, out_scale=1.0, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    # sigma_start == sigma_now: plain reuse of the newest velocity, not NaN
    torch.testing.assert_close(out.float(), vs[4 % 6].half().float(), rtol=1e-3, atol=1e-3)


# -- op hygiene --------------------------------------------------------------------------------------------------


def _opcheck_args(op, device):
    x, v, xs, vs = _inputs((2, 3, 8), torch.float32, device, seed=5)
    if op == "skip_step":
        return torch.ops.meancache.skip_step.default, (x, xs, vs, 9, 4, *SIGMAS)
    if op == "compute_step":
        return torch.ops.meancache.compute_step.default, (x, v, xs, vs, 9, SIGMAS[1], SIGMAS[2])
    return torch.ops.meancache.estimate.default, (x, xs, vs, 9, 4, *SIGMAS, -1.0, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    fn, args = _opcheck_args(op, _device(backend))
    torch.library.opcheck(fn, args)


def test_ops_live_in_one_namespace():
    for name in OPS:
        assert hasattr(torch.ops.meancache, name)
        schema = str(getattr(torch.ops.meancache, name).default._schema)
        assert "Tensor(a!) xs" in schema and "Tensor(b!) vs" in schema, schema


# -- bad input ---------------------------------------------------------------------------------------------------


def test_mismatched_shapes_dtypes_devices_and_windows_raise():
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"xs has shape \(6, 2, 8\) but x has shape \(2, 9\)"):
        ops.skip_step(torch.zeros(2, 9), xs, vs, 9, 4, *SIGMAS)
    with pytest.raises(ValueError, match=r"vs dtype=torch.float16 but x dtype=torch.float32"):
        ops.skip_step(x, xs, vs.half(), 9, 4, *SIGMAS)
    with pytest.raises(ValueError, match=r"xs is on meta but x is on cpu"):
        ops.skip_step(x, xs.to("meta"), vs, 9, 4, *SIGMAS)
    with pytest.raises(ValueError, match=r"k=7: the window K .* must be in 1..6"):
        ops.skip_step(x, xs, vs, 9, 7, *SIGMAS)
    with pytest.raises(ValueError, match=r"k=0"):
        ops.estimate(x, xs, vs, 9, 0, *SIGMAS)
    with pytest.raises(ValueError, match=r"k=4 at step=2: the history holds only 2 entries"):
        ops.skip_step(x, xs, vs, 2, 4, *SIGMAS)
    with pytest.raises(ValueError, match=r"k=4 but the ring holds only 3 entries"):
        ops.skip_step(x, xs[:3].clone(), vs[:3].clone(), 9, 4, *SIGMAS)
    with pytest.raises(ValueError, match=r"v has shape \(8,\) but x has shape \(2, 8\)"):
        ops.compute_step(x, v[0], xs, vs, 9, SIGMAS[1], SIGMAS[2])
    with pytest.raises(ValueError, match=r"x dtype=torch.int32"):
        ops.compute_step(x.int(), v, xs, vs, 9, SIGMAS[1], SIGMAS[2])
    before = (xs.clone(), vs.clone())
    with pytest.raises(ValueError):
        ops.skip_step(x, xs, vs, 9, 7, *SIGMAS)
    assert torch.equal(xs, before[0]) and torch.equal(vs, before[1])  # rejected before any work


def test_fake_tensors_check_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8)
        xs, vs = torch.empty(6, 2, 8), torch.empty(6, 2, 8)
        assert ops.skip_step(x, xs, vs, 9, 4, *SIGMAS).shape == (2, 8)
        assert ops.estimate(x, xs, vs, 9, 4, *SIGMAS, out_dtype=torch.bfloat16).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="k=7"):
            ops.skip_step(x, xs, vs, 9, 7, *SIGMAS)


def test_reference_functions_agree_with_truth():
    # float64 latents: the reference keeps a float64 ring and matches the formula to rounding
    x, v, xs, vs = _inputs((5, 7), torch.float64, "cpu", seed=6)
    xs, vs = xs.double(), vs.double()
    inv_d, dt = step_scalars(*SIGMAS)
    start, last, write = 5, 2, 3  # step 9, k 4, capacity 6
    calls = {
        "skip_step": lambda a, b: skip_step_ref(x, a, b, start, last, write, inv_d, dt),
        "compute_step": lambda a, b: compute_step_ref(x, v, a, b, write, dt),
        "estimate": lambda a, b: estimate_ref(x, a, b, start, last, write, inv_d, dt, -1.0, torch.float64),
    }
    for op, call in calls.items():
        a, b = xs.clone(), vs.clone()
        out = call(a, b)
        truth, xs_t, vs_t = _truth(op, x, v, xs, vs, step=9, k=4)
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, xs_t, rtol=0, atol=0)
        torch.testing.assert_close(b, vs_t, rtol=1e-12, atol=1e-12)
