"""meancache::weighted_step (a skipped step with any estimator, as host weights) on every backend.

Hierarchy of truth as in tests/test_ops.py: the formula in float64 (written out below, on copies of the ring taken
before the call), the pure-torch reference (reference.weighted_step_ref, float32 math), then the Triton kernels (CPU
interpreter here, GPU when present) and the CUDA extension (GPU only). Every backend is held to the reference with
test_ops.py's per-dtype tolerances and to float64 with its rule: an error at most twice that of eager PyTorch doing
the math in the latent dtype. Then: the published MeanCache estimator written as weights against ``skip_step`` and
``estimate``, a latent term left out without reading its ring row (NaN there), the written row aliasing the rows
read (a full ring), opcheck, autograd, and every validation error, raised before any write.
"""

from __future__ import annotations

import pytest
import torch
from op_truth import random_latent
from op_truth import SIGMAS
from op_truth import truth as formula
from test_ops import BACKENDS
from test_ops import HAS_GPU
from test_ops import KERNEL_BACKENDS
from test_ops import TOL
from test_ops import _device

from meancache import _backend
from meancache import ops
from meancache.estimators import extrapolation_weights
from meancache.estimators import meancache_weights
from meancache.reference import step_scalars
from meancache.reference import weighted_step_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# the estimate's output dtype per latent dtype: always another one, so the cast on store is exercised
OUT_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float16, torch.float16: torch.float32}

INV_D, DT = step_scalars(*SIGMAS)
W_START, W_LAST, X_WEIGHT = meancache_weights(INV_D, DT)
CAPACITY, STEP = 6, 9  # step 9 writes ring slot 3
WRITE = STEP % CAPACITY
COMPUTED = 4  # rows of the computed-velocity stack vc
# Sigmas of the last 4 computed steps before the step SIGMAS[1] -> SIGMAS[2]: the extrapolation weights of order
# 1..3 through them are the 2..4-term cases; 1 term is plain reuse.
NODES = (1.0, 0.95, 0.86, 0.78)


def _extrapolation(order: int) -> list[float]:
    q, weights = extrapolation_weights(NODES, SIGMAS[1], SIGMAS[2], order)
    assert q == order, (q, order)  # the conditioning guard kept the order asked for
    return list(weights)


# n_terms: (rows of vs, none of them the written slot 3; rows of vc; weights)
TERMS = {
    1: ([2], [3], [1.0]),
    2: ([5, 2], [2, 3], _extrapolation(1)),
    3: ([1, 5, 2], [1, 2, 3], _extrapolation(2)),
    4: ([0, 1, 5, 2], [0, 1, 2, 3], _extrapolation(3)),
}
X_SLOT = 4  # the latent term's row: read by no velocity term and not the written slot


def _inputs(shape, dtype, device, seed=0, capacity=CAPACITY, strided=False, math=torch.float32):
    """``(x, xs, vs, vc)``: random latent (optionally a non-contiguous view), ring and computed-velocity stack."""
    g = torch.Generator().manual_seed(seed)
    x = random_latent(shape, dtype, device, g, strided)
    xs = torch.randn((capacity, *shape), generator=g).to(device=device, dtype=math)
    vs = torch.randn((capacity, *shape), generator=g).to(device=device, dtype=math)
    vc = torch.randn((COMPUTED, *shape), generator=g).to(device=device, dtype=math)
    return x, xs, vs, vc


def weighted_truth(x, xs, vs, vc, v_slots, v_weights, x_slot, x_weight, write, dt, out_scale, euler,
                   math_dtype=torch.float64):
    """``(output, ring xs, ring vs)`` of one weighted step with every operand in ``math_dtype`` (float64: the
    truth; the latent dtype: what an eager torch loop computes), the output before its cast to the output dtype."""
    xd, xsd, vsd = x.to(math_dtype), xs.to(math_dtype), vs.to(math_dtype)
    source = vsd if vc is None else vc.to(math_dtype)
    v_hat = source[v_slots[0]] * v_weights[0]
    for slot, w in zip(v_slots[1:], v_weights[1:]):
        v_hat = v_hat + source[slot] * w
    if x_weight != 0.0:  # left out, its row unread, like the op
        v_hat = v_hat + (xd - xsd[x_slot]) * x_weight
    v_hat = v_hat.clone()  # before the writes: the written row may be one of the rows read
    xsd[write], vsd[write] = xd, v_hat
    return (xd + dt * v_hat if euler else v_hat * out_scale), xsd, vsd


def _call(backend, x, xs, vs, vc, v_slots, v_weights, x_slot, x_weight, euler, out_dtype, monkeypatch, step=STEP):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    return ops.weighted_step(x, xs, vs, vc, step, v_slots, v_weights, x_slot, x_weight, DT, out_scale=-1.0,
                             out_dtype=out_dtype, euler=euler)


def _case(n_terms, source, latent):
    """``(vc or None, v_slots, v_weights, x_slot, x_weight)`` of a configuration, given the stack ``source``."""
    ring_slots, vc_slots, weights = TERMS[n_terms]
    x_weight = X_WEIGHT if latent else 0.0
    return (None, ring_slots) if source is None else (source, vc_slots), weights, X_SLOT, x_weight


def _check(backend, x, xs, vs, vc, v_slots, v_weights, x_slot, x_weight, euler, out_dtype, monkeypatch,
           step=STEP):
    """The op under ``backend`` against the reference and float64, on copies of the ring. Without the latent term
    its row is poisoned (NaN); the written row is poisoned whenever nothing reads it, so an element a kernel forgets
    to write shows."""
    write = step % xs.shape[0]
    xs, vs = xs.clone(), vs.clone()
    if x_weight == 0.0:
        xs[x_slot] = float("nan")
    if (vc is not None or write not in v_slots) and (x_weight == 0.0 or x_slot != write):
        xs[write], vs[write] = float("nan"), float("nan")
    x_before, vc_before = x.clone(), None if vc is None else vc.clone()
    runs = []
    for which in (backend, "torch"):
        a, b = xs.clone(), vs.clone()
        out = _call(which, x, a, b, vc, v_slots, v_weights, x_slot, x_weight, euler, out_dtype, monkeypatch, step)
        runs.append((out, a, b))
    (out, xs_b, vs_b), (ref, xs_r, vs_r) = runs
    want_dtype = x.dtype if euler else out_dtype
    assert out.shape == x.shape and out.dtype == want_dtype and out.device == x.device
    assert torch.equal(x, x_before), "the op wrote into its input latent"
    assert vc is None or torch.equal(vc, vc_before), "the op wrote into vc"
    unread = x_slot if x_weight == 0.0 and x_slot != write else None  # the NaN row nothing may read or write
    assert torch.isfinite(out).all() and torch.isfinite(vs_b).all(), "NaN from an unread row, or an unwritten element"
    keep = [r for r in range(xs.shape[0]) if r != unread]
    assert torch.isfinite(xs_b[keep]).all()
    if unread is not None:
        assert torch.isnan(xs_b[unread]).all(), "the unread latent row was written"
    torch.testing.assert_close(out, ref, **TOL[want_dtype])
    torch.testing.assert_close(xs_b, xs_r, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vs_b, vs_r, **TOL[torch.float32])
    # second rule: no worse than twice eager PyTorch computing in the latent dtype
    args = (vc, v_slots, v_weights, x_slot, x_weight, write, DT, -1.0, euler)
    truth, _, vs_t = weighted_truth(x, xs, vs, *args)
    eager, _, _ = weighted_truth(x, xs, vs, *args, math_dtype=x.dtype)
    err = (out.double() - truth).abs().max().item()
    err_eager = (eager.to(want_dtype).double() - truth).abs().max().item()
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)
    assert (vs_b.double() - vs_t).abs().max().item() <= 1e-4


# -- every backend x dtype x terms x source x latent term x output --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("euler", [True, False], ids=["euler", "estimate"])
@pytest.mark.parametrize("latent", [True, False], ids=["latent", "no-latent"])
@pytest.mark.parametrize("source", ["vs", "vc"])
@pytest.mark.parametrize("n_terms", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_terms_sources_and_outputs(dtype, n_terms, source, latent, euler, backend, monkeypatch):
    x, xs, vs, vc = _inputs((3, 7, 129), dtype, _device(backend), seed=n_terms)
    (vc, v_slots), weights, x_slot, x_weight = _case(n_terms, vc if source == "vc" else None, latent)
    _check(backend, x, xs, vs, vc, v_slots, weights, x_slot, x_weight, euler, OUT_DTYPE[dtype], monkeypatch)


SHAPES = {"flux-1024": (1, 4096, 64), "odd-3x7x129": (3, 7, 129), "one": (1, 1, 1), "prime-1031": (1031,)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("form", ["published", "cubic-vc"])
def test_shapes(form, shape, dtype, backend, monkeypatch):
    x, xs, vs, vc = _inputs(shape, dtype, _device(backend), seed=7)
    if form == "published":  # step 9, K = 4: window start slot 5, newest entry slot 2
        args = (None, [5, 2], [W_START, W_LAST], 5, X_WEIGHT)
    else:
        args = (vc, TERMS[4][1], TERMS[4][2], X_SLOT, 0.0)
    _check(backend, x, xs, vs, *args, True, dtype, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_latent(dtype, backend, monkeypatch):
    x, xs, vs, vc = _inputs((2, 9, 33), dtype, _device(backend), seed=8, strided=True)
    _check(backend, x, xs, vs, vc, TERMS[3][1], TERMS[3][2], X_SLOT, X_WEIGHT, True, dtype, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("euler", [True, False], ids=["euler", "estimate"])
@pytest.mark.parametrize("capacity, v_slots, x_slot", [
    (1, [0], 0),                # every row the same
    (3, [0, 2], 0),             # the published form on a full ring: write == window start == latent row
    (4, [3, 2, 1, 0], 0),       # 4 terms, the last one the written row
    (3, [1, 0], 2),             # write == the newest term, latent row apart
], ids=["C1", "C3-published", "C4-four-terms", "C3-latent-apart"])
def test_full_ring_writes_over_rows_it_reads(capacity, v_slots, x_slot, euler, backend, monkeypatch):
    # step 2 * capacity writes slot 0, which the step also reads: every input must be read before the write
    step = 2 * capacity
    x, xs, vs, _ = _inputs((4, 65), torch.float32, _device(backend), seed=9, capacity=capacity)
    weights = TERMS[len(v_slots)][2]
    a, b = xs.clone(), vs.clone()
    out = _call(backend, x, a, b, None, v_slots, weights, x_slot, X_WEIGHT, euler, torch.float32, monkeypatch, step)
    truth, xs_t, vs_t = weighted_truth(x, xs, vs, None, v_slots, weights, x_slot, X_WEIGHT, 0, DT, -1.0, euler)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), xs_t, rtol=0, atol=0)
    torch.testing.assert_close(b.double(), vs_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_latent_term_left_out_never_reads_its_row(backend, monkeypatch):
    # x_weight == 0 means the term is absent, not 0 * xs[x_slot]: an unwritten row (NaN, inf) must not matter, even
    # when it is the window start of the published form at a zero-length window (inv_d = 0)
    x, xs, vs, _ = _inputs((3, 40), torch.bfloat16, _device(backend), seed=10)
    w_start, w_last, x_weight = meancache_weights(0.0, DT)
    assert x_weight == 0.0
    for poison in (float("nan"), float("inf")):
        a, b = xs.clone(), vs.clone()
        a[5] = poison
        out = _call(backend, x, a, b, None, [5, 2], [w_start, w_last], 5, x_weight, True, None, monkeypatch)
        assert torch.isfinite(out).all() and torch.isfinite(b).all()
        # a zero-length window is plain reuse of the newest velocity, as skip_step makes it
        ref = ops.skip_step(x, xs.clone(), vs.clone(), STEP, 4, SIGMAS[1], SIGMAS[1], SIGMAS[2])
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_float64_runs_on_the_reference(monkeypatch):
    x, xs, vs, vc = _inputs((5, 7), torch.float64, "cpu", seed=11, math=torch.float64)
    for euler in (True, False):
        for source in (None, vc):
            (src, v_slots), weights, x_slot, x_weight = _case(4, source, True)
            a, b = xs.clone(), vs.clone()
            out = _call("torch", x, a, b, src, v_slots, weights, x_slot, x_weight, euler, torch.float64, monkeypatch)
            truth, xs_t, vs_t = weighted_truth(x, xs, vs, src, v_slots, weights, x_slot, x_weight, WRITE, DT, -1.0,
                                               euler)
            assert out.dtype == torch.float64
            torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a, xs_t, rtol=0, atol=0)
            torch.testing.assert_close(b, vs_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_kernel_backends_refuse_float64_latents_and_serve_float64_estimates(backend, monkeypatch):
    device = _device(backend)
    x, xs, vs, vc = _inputs((3, 33), torch.float64, device, seed=12, math=torch.float64)
    with pytest.raises(RuntimeError, match="float16/bfloat16/float32 latents, not torch.float64"):
        _call(backend, x, xs, vs, vc, [0, 1], [-1.0, 2.0], 0, 0.0, True, None, monkeypatch)
    # a float32 latent whose estimate is asked for in float64: the kernels store 16/32-bit outputs, so the
    # reference serves it
    x, xs, vs, vc = _inputs((3, 33), torch.float32, device, seed=12)
    a, b = xs.clone(), vs.clone()
    out = _call(backend, x, a, b, vc, [0, 1], [-1.0, 2.0], 0, 0.0, False, torch.float64, monkeypatch)
    truth, _, _ = weighted_truth(x, xs, vs, vc, [0, 1], [-1.0, 2.0], 0, 0.0, WRITE, DT, -1.0, False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)


# -- the published estimator through weighted_step ----------------------------------------------------------------

# weighted_step sums the expanded form w_start * v_start + w_last * v_last + x_weight * (x - x_start) in float32,
# skip_step the nested one v_last - (v_start - (x - x_start) * inv_d) * inv_d * dt: the two differ by float32
# rounding order only, a few ulps of the largest term (about 5e-7 on the output and 2e-6 on v_hat here). Held to
# PUBLISHED_TOL for float32 values; 16-bit outputs may differ by one rounding of the stored result (TOL).
PUBLISHED_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("capacity, step, k", [(6, 9, 4), (6, 9, 1), (3, 7, 3), (2, 5, 2)],
                         ids=["K4", "K1", "K3-full-ring", "K2-full-ring"])
@pytest.mark.parametrize("op", ["skip_step", "estimate"])
def test_published_estimator_as_weights_matches_skip_step_and_estimate(op, capacity, step, k, dtype, backend,
                                                                       monkeypatch):
    x, xs, vs, _ = _inputs((2, 9, 129), dtype, _device(backend), seed=13, capacity=capacity)
    start, last = (step - k) % capacity, (step - 1) % capacity
    w_start, w_last, x_weight = meancache_weights(INV_D, DT)
    euler = op == "skip_step"
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    a, b = xs.clone(), vs.clone()
    if euler:
        published = ops.skip_step(x, a, b, step, k, *SIGMAS)
    else:
        published = ops.estimate(x, a, b, step, k, *SIGMAS, out_scale=-1.0)
    c, d = xs.clone(), vs.clone()
    weighted = ops.weighted_step(x, c, d, None, step, [start, last], [w_start, w_last], start, x_weight, DT,
                                 out_scale=-1.0, euler=euler)
    assert weighted.dtype == published.dtype == dtype
    # the two forms agree within float32 rounding ...
    torch.testing.assert_close(weighted, published, **(PUBLISHED_TOL if dtype == torch.float32 else TOL[dtype]))
    assert torch.equal(c, a)
    torch.testing.assert_close(d, b, **PUBLISHED_TOL)
    # ... and each meets the float64 truth as tightly as tests/test_ops.py holds skip_step and estimate
    truth, _, vs_t = formula(op, x, None, xs, vs, step, k)
    eager, _, _ = formula(op, x, None, xs, vs, step, k, math_dtype=dtype)
    err_eager = (eager.double() - truth).abs().max().item()
    for out, ring_v in ((published, b), (weighted, d)):
        err = (out.double() - truth).abs().max().item()
        assert err <= 2 * err_eager + 1e-6, (err, err_eager)
        assert (ring_v.double() - vs_t).abs().max().item() <= 1e-4


# -- op hygiene ---------------------------------------------------------------------------------------------------


def _opcheck_args(device, with_vc, euler):
    x, xs, vs, vc = _inputs((2, 3, 8), torch.float32, device, seed=14)
    ring_slots, vc_slots, weights = TERMS[3]
    return (x, xs, vs, vc if with_vc else None, STEP, vc_slots if with_vc else ring_slots, weights, X_SLOT, X_WEIGHT,
            DT, -1.0, torch.bfloat16, euler)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("euler", [True, False], ids=["euler", "estimate"])
@pytest.mark.parametrize("with_vc", [False, True], ids=["vs", "vc"])
def test_opcheck(with_vc, euler, backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    torch.library.opcheck(torch.ops.meancache.weighted_step.default, _opcheck_args(_device(backend), with_vc, euler))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_with_inputs_that_require_grad(backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    args = _opcheck_args(_device(backend), True, True)
    args = (args[0].requires_grad_(True), args[1], args[2], args[3].requires_grad_(True)) + args[4:]
    torch.library.opcheck(torch.ops.meancache.weighted_step.default, args)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.meancache.weighted_step.default, args)


def test_schema_marks_the_ring_writes():
    schema = str(torch.ops.meancache.weighted_step.default._schema)
    assert "Tensor(a!) xs" in schema and "Tensor(b!) vs" in schema and "Tensor? vc" in schema, schema


def test_differentiable_in_x_and_the_computed_velocities():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    vc = torch.randn(COMPUTED, 2, 5, dtype=torch.float64, requires_grad=True)

    def step(x, vc):
        g = torch.Generator().manual_seed(15)
        xs = torch.randn(CAPACITY, 2, 5, generator=g, dtype=torch.float64)
        vs = torch.randn(CAPACITY, 2, 5, generator=g, dtype=torch.float64)
        return ops.weighted_step(x, xs, vs, vc, STEP, TERMS[4][1], TERMS[4][2], X_SLOT, X_WEIGHT, DT)

    assert torch.autograd.gradcheck(step, (x, vc))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_do_not_depend_on_the_backend(backend, monkeypatch):
    x, xs, vs, _ = _inputs((3, 16), torch.float32, "cpu", seed=16)
    x.requires_grad_(True)
    out = _call(backend, x, xs.clone(), vs.clone(), None, [5, 2], [W_START, W_LAST], 5, X_WEIGHT, True, None,
                monkeypatch)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # d/dx of x + dt * (... + x_weight * (x - x_start)); the same as skip_step's 1 + dt * inv_d^2 * dt
    torch.testing.assert_close(grad, torch.full_like(x, 1 + DT * X_WEIGHT))
    with torch.no_grad():
        plain = _call("torch", x, xs.clone(), vs.clone(), None, [5, 2], [W_START, W_LAST], 5, X_WEIGHT, True, None,
                      monkeypatch)
    torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_without_autograd_the_fused_backend_bumps_the_ring_version(backend, monkeypatch):
    x, xs, vs, vc = _inputs((2, 8), torch.float32, "cpu")
    w = torch.ones(2, 8, requires_grad=True)
    loss = (w * vs[WRITE]).sum()
    _call(backend, x, xs, vs, vc, [0, 1], [-1.0, 2.0], 0, 0.0, True, None, monkeypatch)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- bad input: named, and refused before any write ----------------------------------------------------------------

_X_SHAPE = (2, 8)


def _bad_cases():
    """``(id, change, message)``: ``change(kwargs, x, xs, vs, vc)`` edits the arguments of a good call."""
    def kw(**updates):
        return lambda a, x, xs, vs, vc: a.update(updates)

    def vc_is(make):
        return lambda a, x, xs, vs, vc: a.update(vc=make(x, xs, vs, vc), v_slots=[0], v_weights=[1.0])

    op = "weighted_step"
    return [
        ("weights-length", kw(v_weights=[1.0]),
         rf"{op}: v_slots=\[0, 1\] and v_weights=\[1.0\]: need 1..4 slots and one weight per slot"),
        ("no-terms", kw(v_slots=[], v_weights=[]), rf"{op}: v_slots=\[\] and v_weights=\[\]: need 1..4 slots"),
        ("five-terms", kw(v_slots=[0, 1, 2, 3, 0], v_weights=[1.0] * 5),
         rf"{op}: v_slots=\[0, 1, 2, 3, 0\] .*: need 1..4 slots"),
        ("slot-past-vc", kw(v_slots=[0, 4]), rf"{op}: v_slots entry 4: must be in 0..3 \(vc holds 4 rows\)"),
        ("slot-past-vs", kw(vc=None, v_slots=[0, 6]), rf"{op}: v_slots entry 6: must be in 0..5 \(vs holds 6 rows\)"),
        ("negative-slot", kw(v_slots=[-1, 0]), rf"{op}: v_slots entry -1: must be in 0..3"),
        ("nan-weight", kw(v_weights=[1.0, float("nan")]), rf"{op}: v_weights holds nan: every weight must be finite"),
        ("inf-x-weight", kw(x_weight=float("inf")), rf"{op}: x_weight holds inf: every weight must be finite"),
        ("x-slot-past-ring", kw(x_slot=6), rf"{op}: x_slot=6: must be in 0..5 \(xs.shape\[0\]=6\)"),
        ("negative-x-slot", kw(x_slot=-1), rf"{op}: x_slot=-1: must be in 0..5"),
        ("x-slot-float", kw(x_slot=1.0), rf"{op}: x_slot=1.0: must be a Python int, not a float"),
        ("slot-entry-float", kw(v_slots=[0, 1.5]), rf"{op}: v_slots entry=1.5: must be a Python int, not a float"),
        ("slots-tensor", kw(v_slots=torch.tensor([0, 1])),
         rf"{op}: v_slots=tensor\(\[0, 1\]\): v_slots and v_weights must be lists of host ints"),
        ("weights-str", kw(v_weights=["a", "b"]),
         rf"{op}: v_weights entry='a': must be a real number \(int or float\), not a str"),
        ("euler-int", kw(euler=1), rf"{op}: euler=1: must be True or False"),
        ("step-negative", kw(step=-1), rf"{op}: step=-1: must be >= 0"),
        ("step-bool", kw(step=True), rf"{op}: step=True: must be a Python int, not a bool"),
        ("out-dtype", kw(out_dtype=torch.int32), rf"{op}: out_dtype=torch.int32: must be float16, bfloat16, float32 "
                                                 r"or float64"),
        ("vc-shape", vc_is(lambda x, xs, vs, vc: torch.zeros(3, 2, 9)),
         rf"{op}: vc has shape \(3, 2, 9\) but x has shape \(2, 8\): must be \(D, \*x.shape\) with 1 <= D <= 6"),
        ("vc-too-deep", vc_is(lambda x, xs, vs, vc: torch.zeros(7, 2, 8)), rf"{op}: vc has shape \(7, 2, 8\)"),
        ("vc-empty", vc_is(lambda x, xs, vs, vc: torch.zeros(0, 2, 8)), rf"{op}: vc has shape \(0, 2, 8\)"),
        ("vc-dtype", vc_is(lambda x, xs, vs, vc: vc.double()),
         rf"{op}: vc is torch.float64 on cpu \(contiguous=True\): must be contiguous torch.float32 on cpu, like the "
         r"ring"),
        ("vc-strided", vc_is(lambda x, xs, vs, vc: torch.zeros(4, 8, 2).transpose(1, 2)),
         rf"{op}: vc is torch.float32 on cpu \(contiguous=False\)"),
        ("vc-device", vc_is(lambda x, xs, vs, vc: vc.to("meta")), rf"{op}: vc is torch.float32 on meta"),
        ("vc-over-written-vs", vc_is(lambda x, xs, vs, vc: vs[2:4]),
         rf"{op}: vc shares memory with vs\[3\], the ring slot this call writes \(step=9, slot step % C=3\)"),
        ("vc-over-written-xs", vc_is(lambda x, xs, vs, vc: xs[3:4]), rf"{op}: vc shares memory with xs\[3\]"),
        ("x-over-written-xs", lambda a, x, xs, vs, vc: a.update(x=xs[3]), rf"{op}: x shares memory with xs\[3\]"),
        ("rings-shared", lambda a, x, xs, vs, vc: a.update(vs=xs), rf"{op}: xs and vs share memory"),
        ("ring-capacities", lambda a, x, xs, vs, vc: a.update(vs=torch.zeros(5, 2, 8)),
         rf"{op}: xs has shape \(6, 2, 8\) but vs has shape \(5, 2, 8\): xs and vs must have the same capacity C"),
        ("ring-dtype", lambda a, x, xs, vs, vc: a.update(vs=vs.half()), rf"{op}: vs dtype=torch.float16 but x "
                                                                        r"dtype=torch.float32"),
        ("x-dtype", lambda a, x, xs, vs, vc: a.update(x=x.int()), rf"{op}: x dtype=torch.int32"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("change, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_named_and_refused_before_any_write(change, message, backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    x, xs, vs, vc = _inputs(_X_SHAPE, torch.float32, "cpu", seed=17)
    kwargs = dict(x=x, xs=xs, vs=vs, vc=vc, step=STEP, v_slots=[0, 1], v_weights=[-1.0, 2.0], x_slot=X_SLOT,
                  x_weight=X_WEIGHT, dt=DT, out_scale=1.0, out_dtype=None, euler=True)
    ops.weighted_step(**{**kwargs, "xs": xs.clone(), "vs": vs.clone()})  # the good call runs
    change(kwargs, x, xs, vs, vc)
    before = xs.clone(), vs.clone(), vc.clone()
    with pytest.raises(ValueError, match=message):
        ops.weighted_step(**kwargs)
    assert torch.equal(xs, before[0]) and torch.equal(vs, before[1]) and torch.equal(vc, before[2])


def test_a_ring_that_is_a_leaf_requiring_grad_is_refused():
    x, xs, vs, vc = _inputs(_X_SHAPE, torch.float32, "cpu")
    xs.requires_grad_(True)
    with pytest.raises(ValueError, match=r"weighted_step: xs is a leaf tensor that requires grad .* in place"):
        ops.weighted_step(x, xs, vs, vc, STEP, [0, 1], [-1.0, 2.0])
    with torch.no_grad():  # nothing is recorded, so the in-place write is fine
        ops.weighted_step(x, xs, vs, vc, STEP, [0, 1], [-1.0, 2.0])


def test_inputs_in_other_slots_are_accepted():
    # no false positives: a vc that is rows of the ring other than the written one, a latent from another row
    x, xs, vs, _ = _inputs(_X_SHAPE, torch.float32, "cpu")
    args = ([0, 1], [-1.0, 2.0], X_SLOT, X_WEIGHT, DT)
    expected = ops.weighted_step(xs[4].clone(), xs.clone(), vs.clone(), vs[4:6].clone(), STEP, *args)
    assert torch.equal(ops.weighted_step(xs[4], xs, vs, vs[4:6], STEP, *args), expected)


def test_fake_tensors_apply_the_rules():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8)
        xs, vs, vc = torch.empty(6, 2, 8), torch.empty(6, 2, 8), torch.empty(4, 2, 8)
        assert ops.weighted_step(x, xs, vs, vc, STEP, [0, 1], [1.0, 0.0], euler=False,
                                 out_dtype=torch.bfloat16).dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"v_slots entry 4: must be in 0..3 \(vc holds 4 rows\)"):
            ops.weighted_step(x, xs, vs, vc, STEP, [4], [1.0])
        with pytest.raises(ValueError, match=r"vc shares memory with vs\[3\]"):
            ops.weighted_step(x, xs, vs, vs[3:5], STEP, [0], [1.0])
        with pytest.raises(ValueError, match=r"x_slot=9: must be in 0..5"):
            ops.weighted_step(x, xs, vs, None, STEP, [0], [1.0], 9, 1.0)


def test_reference_is_the_formula():
    # the reference against the float64 formula of this file, on float64 operands: to rounding
    x, xs, vs, vc = _inputs((5, 7), torch.float64, "cpu", seed=18, math=torch.float64)
    for source in (None, vc):
        (src, v_slots), weights, x_slot, x_weight = _case(3, source, True)
        a, b = xs.clone(), vs.clone()
        out = weighted_step_ref(x, a, b, src, v_slots, weights, x_slot, x_weight, WRITE, DT, -1.0, torch.float64,
                                False)
        truth, xs_t, vs_t = weighted_truth(x, xs, vs, src, v_slots, weights, x_slot, x_weight, WRITE, DT, -1.0, False)
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, xs_t, rtol=0, atol=0)
        torch.testing.assert_close(b, vs_t, rtol=1e-12, atol=1e-12)


# -- the launchers' own checks ------------------------------------------------------------------------------------


@pytest.mark.skipif(_backend.triton_kernels() is None or not (HAS_GPU or _backend._interpreting()),
                    reason="needs triton on CUDA or under TRITON_INTERPRET=1")
def test_triton_launcher_refuses_rows_it_would_address_outside_of():
    kernels = _backend.triton_kernels()
    device = "cuda" if HAS_GPU else "cpu"
    x, xs, vs, vc = _inputs(_X_SHAPE, torch.float32, device)
    xs0, vs0 = xs.clone(), vs.clone()
    call = kernels.weighted_step_triton
    with pytest.raises(ValueError, match=r"weighted_step_triton: v_slots entry 4: must be in 0..3 \(vc holds 4"):
        call(x, xs, vs, vc, [4], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: v_slots entry 6: must be in 0..5 \(vs holds 6"):
        call(x, xs, vs, None, [6], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: v_slots=\[0, 1, 2, 3, 0\]"):
        call(x, xs, vs, vc, [0, 1, 2, 3, 0], [1.0] * 5, 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: vc has shape \(4, 8\)"):
        call(x, xs, vs, vc.view(4, 16)[:, :8].contiguous(), [0], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: vc is torch.float64"):
        call(x, xs, vs, vc.double(), [0], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: x_slot=6: must be in 0..5"):
        call(x, xs, vs, vc, [0], [1.0], 6, 1.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(ValueError, match=r"weighted_step_triton: slot_write=6: must be in 0..5"):
        call(x, xs, vs, vc, [0], [1.0], 0, 1.0, 6, DT, 1.0, torch.float32, True)
    assert torch.equal(xs, xs0) and torch.equal(vs, vs0)


@pytest.mark.skipif(not (HAS_GPU and _backend.cuda_ops() is not None), reason="needs the CUDA extension and a GPU")
def test_cuda_entry_point_checks_its_arguments_itself():
    # defence in depth: the private C++ op refuses rows outside their tensors and aliased rings when called directly
    x, xs, vs, vc = _inputs(_X_SHAPE, torch.float32, "cuda")
    xs0, vs0 = xs.clone(), vs.clone()
    call = torch.ops.meancache._weighted_step_cuda
    with pytest.raises(RuntimeError, match=r"v_slots entry 4 is out of range for vc, which holds 4 rows"):
        call(x, xs, vs, vc, [4], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"v_slots entry 6 is out of range for vs, which holds 6 rows"):
        call(x, xs, vs, None, [6], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"v_slots has 5 entries and v_weights 5: need 1..4"):
        call(x, xs, vs, vc, [0, 1, 2, 3, 0], [1.0] * 5, 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"v_slots has 2 entries and v_weights 1"):
        call(x, xs, vs, vc, [0, 1], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"vc has shape \[4, 16\] but x has shape \[2, 8\]"):
        call(x, xs, vs, vc.view(4, 16), [0], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"vc must be float32"):
        call(x, xs, vs, vc.double(), [0], [1.0], 0, 0.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"x_slot=6 is out of range"):
        call(x, xs, vs, vc, [0], [1.0], 6, 1.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"slot_write=6 is out of range"):
        call(x, xs, vs, vc, [0], [1.0], 0, 1.0, 6, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"vc shares memory with vs\[3\]"):
        call(x, xs, vs, vs[2:6], [0], [1.0], 0, 1.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"x shares memory with xs\[3\]"):
        call(xs[3], xs, vs, vc, [0], [1.0], 0, 1.0, 3, DT, 1.0, torch.float32, True)
    with pytest.raises(RuntimeError, match=r"out_dtype must be float16, bfloat16 or float32"):
        call(x, xs, vs, vc, [0], [1.0], 0, 1.0, 3, DT, 1.0, torch.float64, False)
    assert torch.equal(xs, xs0) and torch.equal(vs, vs0)
