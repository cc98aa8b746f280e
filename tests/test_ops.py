"""The fused ops (meancache::skip_step, compute_step, estimate) on every backend against the reference.

Hierarchy of truth: a float64 computation of the same formula, then the pure-torch reference (fp32 math), then the
Triton kernels (CPU interpreter here, GPU when present) and the CUDA extension (GPU only). Besides per-dtype
tolerances against the reference, each backend's error against float64 must be at most twice that of eager
PyTorch doing the math in the latent dtype (FlashAttention's rule).
"""

from __future__ import annotations

import pytest
import torch
from op_truth import random_latent
from op_truth import SIGMAS
from op_truth import truth as formula

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
    x = random_latent(shape, dtype, device, g, strided)
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




def _check_against_reference(op, backend, x, v, xs, vs, monkeypatch):
    out, xs_b, vs_b = _run(op, backend, x, v, xs, vs, monkeypatch=monkeypatch)
    ref, xs_r, vs_r = _run(op, "torch", x, v, xs, vs, monkeypatch=monkeypatch)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out, ref, **TOL[x.dtype])
    torch.testing.assert_close(xs_b, xs_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vs_b, vs_r, **TOL[torch.float32])
    # second rule: no worse than twice eager PyTorch computing in the latent dtype
    truth, _, vs_t = formula(op, x, v, xs, vs)
    eager, _, _ = formula(op, x, v, xs, vs, math_dtype=x.dtype)
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
    truth, xs_t, vs_t = formula(op, x, v, xs, vs, step=7, k=3)
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
        truth, xs_t, vs_t = formula(op, x, v, xs, vs, step=9, k=4)
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, xs_t, rtol=0, atol=0)
        torch.testing.assert_close(b, vs_t, rtol=1e-12, atol=1e-12)


# -- ring arguments checked against each other (issue 10, fault 2) ------------------------------------------------

KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "cuda"]  # the CPU-runnable ones: reference and Triton


def _call(op, x, xs, vs, step=9, k=4, v=None):
    if op == "skip_step":
        return ops.skip_step(x, xs, vs, step, k, *SIGMAS)
    if op == "compute_step":
        return ops.compute_step(x, x if v is None else v, xs, vs, step, SIGMAS[1], SIGMAS[2])
    return ops.estimate(x, xs, vs, step, k, *SIGMAS)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("vs_capacity", [2, 5], ids=["vs-shorter", "vs-longer"])
@pytest.mark.parametrize("op", OPS)
def test_ring_halves_of_different_capacity_are_refused_before_any_work(op, vs_capacity, backend, monkeypatch):
    # slots come from xs.shape[0]: a shorter vs was indexed past its end (IndexError on the reference, a write
    # outside vs on Triton), a longer one read the wrong slots without a word
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu", capacity=3)
    vs = torch.randn(vs_capacity, 2, 8)
    before = xs.clone(), vs.clone()
    with pytest.raises(ValueError, match=rf"{op}: xs has shape \(3, 2, 8\) but vs has shape \({vs_capacity}, 2, 8\): "
                                         r"xs and vs must have the same capacity C"):
        _call(op, x, xs, vs, step=7, k=2, v=v)
    assert torch.equal(xs, before[0]) and torch.equal(vs, before[1])


@pytest.mark.parametrize("value", [True, 2**63, -(2**63) - 1, 9.0, "9", torch.tensor(9)],
                         ids=["bool", "int64-max+1", "int64-min-1", "float", "str", "tensor"])
@pytest.mark.parametrize("op,arg", [(op, "step") for op in OPS] + [("skip_step", "k"), ("estimate", "k")])
def test_step_and_k_must_be_host_int64(op, arg, value):
    # the dispatcher took True as 1 and refused 2**63 with a message naming neither the argument nor the rule
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    kwargs = {"step": 9, "k": 1, arg: value}
    rule = "must fit in int64" if isinstance(value, int) and not isinstance(value, bool) else "must be a Python int"
    with pytest.raises(ValueError, match=rf"{op}: {arg}=.*: {rule}"):
        _call(op, x, xs, vs, v=v, **kwargs)


def test_numpy_and_plain_ints_are_accepted_as_step_and_k():
    np = pytest.importorskip("numpy")
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    a = ops.skip_step(x, xs.clone(), vs.clone(), np.int64(9), np.int32(4), *SIGMAS)
    b = ops.skip_step(x, xs.clone(), vs.clone(), 9, 4, *SIGMAS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_negative_step_is_named(op):
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=rf"{op}: step=-1: must be >= 0"):
        _call(op, x, xs, vs, step=-1, k=1, v=v)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_inputs_overlapping_the_written_slot_are_refused(op, backend, monkeypatch):
    # step 9 with C = 6 writes slot 3: an input there would be overwritten while the step still reads it
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    cases = [("x", "xs", lambda: _call(op, xs[3], xs, vs, v=v)),
             ("x", "vs", lambda: _call(op, vs[3], xs, vs, v=v)),
             # a strided view that reaches into slot 3 from slot 2
             ("x", "xs", lambda: _call(op, xs.view(6, 16)[2:4, 4].view(2, 1).expand(2, 8), xs, vs, v=v))]
    if op == "compute_step":
        cases.append(("v", "vs", lambda: _call(op, x, xs, vs, v=vs[3])))
    before = xs.clone(), vs.clone()
    for name, ring, call in cases:
        with pytest.raises(ValueError, match=rf"{op}: {name} shares memory with {ring}\[3\], the ring slot this call "
                                             r"writes \(step=9, slot step % C=3\)"):
            call()
    with pytest.raises(ValueError, match=rf"{op}: xs and vs share memory"):
        _call(op, x, xs, xs, v=v)
    assert torch.equal(xs, before[0]) and torch.equal(vs, before[1])


@pytest.mark.parametrize("op", OPS)
def test_inputs_in_other_slots_and_a_shared_ring_allocation_are_accepted(op):
    # no false positives: reading another slot of the ring, and xs/vs as two halves of one allocation, are fine
    x, v, _, _ = _inputs((2, 8), torch.float32, "cpu")
    both = torch.randn(2, 6, 2, 8)
    xs, vs = both[0], both[1]
    expected = _call(op, xs[4].clone(), xs.clone(), vs.clone(), v=v)
    assert torch.equal(_call(op, xs[4], xs, vs, v=v), expected)


def test_fake_tensors_apply_every_rule():
    # the checks torch.compile relies on: the fake implementations refuse what the kernels would refuse
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, v = torch.empty(2, 8), torch.empty(2, 8)
        xs, vs = torch.empty(6, 2, 8), torch.empty(6, 2, 8)
        with pytest.raises(ValueError, match=r"xs has shape \(6, 2, 8\) but vs has shape \(4, 2, 8\)"):
            ops.skip_step(x, xs, torch.empty(4, 2, 8), 9, 4, *SIGMAS)
        with pytest.raises(ValueError, match=r"compute_step: step=-2: must be >= 0"):
            ops.compute_step(x, v, xs, vs, -2, SIGMAS[1], SIGMAS[2])
        with pytest.raises(ValueError, match=r"estimate: out_dtype=torch.int32"):
            ops.estimate(x, xs, vs, 9, 4, *SIGMAS, out_dtype=torch.int32)
        with pytest.raises(ValueError, match=r"x shares memory with xs\[3\]"):
            ops.estimate(xs[3], xs, vs, 9, 4, *SIGMAS)
        with pytest.raises(ValueError, match=r"v shares memory with vs\[3\]"):
            ops.compute_step(x, vs[3], xs, vs, 9, SIGMAS[1], SIGMAS[2])


@pytest.mark.skipif(not (HAS_GPU and _backend.cuda_ops() is not None), reason="needs the CUDA extension and a GPU")
def test_cuda_entry_points_check_the_ring_themselves():
    # defence in depth: the private C++ ops refuse a mismatched or aliased ring even when called directly
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cuda")
    cuda = torch.ops.meancache
    with pytest.raises(RuntimeError, match=r"xs has shape \[6, 2, 8\] but vs has shape \[3, 2, 8\]"):
        cuda._skip_step_cuda(x, xs, vs[:3].clone(), 0, 1, 2, 1.0, -0.1)
    with pytest.raises(RuntimeError, match=r"xs has shape \[6, 16\] but x has shape \[2, 8\]"):
        cuda._estimate_cuda(x, xs.view(6, 16), vs.view(6, 16), 0, 1, 2, 1.0, -0.1, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match=r"x shares memory with xs\[2\]"):
        cuda._skip_step_cuda(xs[2], xs, vs, 0, 1, 2, 1.0, -0.1)
    with pytest.raises(RuntimeError, match=r"v shares memory with vs\[2\]"):
        cuda._compute_step_cuda(x, vs[2], xs, vs, 2, -0.1)
    with pytest.raises(RuntimeError, match=r"xs and vs share memory"):
        cuda._compute_step_cuda(x, v.float(), xs, xs, 2, -0.1)
    with pytest.raises(RuntimeError, match=r"slot_write=6 is out of range"):
        cuda._compute_step_cuda(x, v.float(), xs, vs, 6, -0.1)


# -- autograd ------------------------------------------------------------------------------------------------------


def _three_steps(x, v, capacity=3, dtype=torch.float64):
    """compute_step, then skip_step and estimate reading what it logged: gradients must cross the ring."""
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(capacity, *x.shape, generator=g, dtype=dtype)
    vs = torch.randn(capacity, *x.shape, generator=g, dtype=dtype)
    a = ops.compute_step(x, v, xs, vs, 3, 0.9, 0.8)  # logs x, v in slot 0
    b = ops.skip_step(a, xs, vs, 4, 2, 0.95, 0.8, 0.7)  # reads slot 2 and the newest entry, slot 0
    c = ops.estimate(b, xs, vs, 5, 2, 0.9, 0.7, 0.6, out_scale=-1.0)  # window starts at slot 0
    return a, b, c, xs, vs


def test_ops_are_differentiable_through_the_ring():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_three_steps, (x, v))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradients_do_not_depend_on_the_backend(op, backend, monkeypatch):
    # the kernels keep no graph: with autograd recording every backend runs the differentiable reference
    x, v, xs, vs = _inputs((3, 16), torch.float32, "cpu", seed=8)
    x.requires_grad_(True)
    v = v.float().requires_grad_(True)
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    out = _call(op, x, xs.clone(), vs.clone(), v=v)
    grads = torch.autograd.grad(out.sum(), (x, v), allow_unused=True)
    monkeypatch.setenv("MEANCACHE_BACKEND", "torch")
    with torch.no_grad():
        plain = _call(op, x, xs.clone(), vs.clone(), v=v)
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
    # d out / d x of x + dt * v_hat (skip), x + dt * v (compute), v_hat (estimate); d v_hat / d x = inv_d^2 dt
    inv_d, dt = step_scalars(*SIGMAS)
    want_x = {"skip_step": 1 + dt * inv_d * inv_d * dt, "compute_step": 1.0, "estimate": inv_d * inv_d * dt}[op]
    torch.testing.assert_close(grads[0], torch.full_like(x, want_x))
    if op == "compute_step":
        torch.testing.assert_close(grads[1], torch.full_like(v, dt))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_with_inputs_that_require_grad(op, backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    fn, args = _opcheck_args(op, _device(backend))
    args = (args[0].requires_grad_(True),) + args[1:]
    torch.library.opcheck(fn, args)
    with torch.no_grad():
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_without_autograd_the_fused_backend_runs_and_bumps_the_ring_version(backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    x.requires_grad_(True)
    with torch.no_grad():
        out = ops.skip_step(x, xs, vs, 9, 4, *SIGMAS)
    assert not out.requires_grad
    # a tensor autograd saved, then overwritten by a fused kernel, must fail the backward instead of feeding it
    # the new values
    w = torch.ones(2, 8, requires_grad=True)
    loss = (w * xs[3]).sum()
    ops.skip_step(x.detach(), xs, vs, 9, 4, *SIGMAS)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("op", OPS)
def test_a_ring_that_is_a_leaf_requiring_grad_is_refused(op):
    x, v, xs, vs = _inputs((2, 8), torch.float32, "cpu")
    xs.requires_grad_(True)
    with pytest.raises(ValueError, match=rf"{op}: xs is a leaf tensor that requires grad .* writes into it in place"):
        _call(op, x, xs, vs, v=v)
    with torch.no_grad():  # nothing is recorded, so the in-place write is fine
        _call(op, x, xs, vs, v=v)
