"""Throughput of the fused MeanCache ops on real latent shapes, per provider.

Providers: ``torch_ref`` (the eager reference: a chain of small kernels), ``torch_compile`` (the reference under
torch.compile), ``triton`` and ``cuda`` (the fused single-launch kernels). Every provider is checked against the
reference before it is timed. Reported per case in ``extra_info``: median ms, GB/s from the bytes the op must move,
and that as a fraction of the device-to-device copy bandwidth measured in the same run.

Ops: ``skip_step``, ``compute_step`` and ``estimate`` (the published MeanCache steps), and ``meancache::weighted_step``
(a skipped step with any estimator, as host weights) three ways: ``weighted_step_published`` (the published estimator
restated as weights: 2 velocity terms from the ring plus the latent term, the same work as ``skip_step``), and
``weighted_step_e2`` / ``weighted_step_e4`` (the ``extrapolate`` estimator of order 1 and 3: 2 and 4 terms read from
a separate stack ``vc`` of computed velocities, no latent term). For the weighted rows the ``v`` operand is that
``(4, *shape)`` float32 stack.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU
from conftest import time_ms

from meancache import _backend
from meancache.estimators import extrapolation_weights
from meancache.estimators import meancache_weights
from meancache.reference import compute_step_ref
from meancache.reference import estimate_ref
from meancache.reference import skip_step_ref
from meancache.reference import step_scalars
from meancache.reference import weighted_step_ref

SHAPES = {
    "flux-1024-packed": (1, 4096, 64),
    "qwen-1664x928": (1, 6032, 64),
    "zimage-1280x720": (1, 16, 160, 90),
    "video-720p": (1, 16, 33, 90, 160),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ["torch_ref", "torch_compile", "triton", "cuda"]
CAPACITY = 6
SLOTS = (5, 2, 3)  # step 9 with K = 4: window start, newest entry, this step (all distinct, so calls repeat)
SCALARS = step_scalars(0.74, 0.62, 0.60)

OPS = ["skip_step", "compute_step", "estimate", "weighted_step_published", "weighted_step_e2", "weighted_step_e4"]
# The weighted rows' arguments after (x, xs, vs, vc): v_slots, v_weights, x_slot, x_weight, slot_write, dt,
# out_scale, euler (out_dtype is x's). The published estimator reads the window start and the newest entry of the
# ring (SLOTS) like skip_step; the extrapolations read the newest 2 or all 4 rows of vc (COMPUTED computed steps, at
# the sigmas below, before the step 0.62 -> 0.60).
COMPUTED = 4
NODES = (0.86, 0.80, 0.74, 0.68)
_W_START, _W_LAST, _X_WEIGHT = meancache_weights(*SCALARS)
_E2 = extrapolation_weights(NODES, 0.62, 0.60, order=1)
_E4 = extrapolation_weights(NODES, 0.62, 0.60, order=3)
assert _E2[0] == 1 and _E4[0] == 3, (_E2, _E4)  # the conditioning guard kept the orders asked for
WEIGHTED = {
    "weighted_step_published": ([SLOTS[0], SLOTS[1]], [_W_START, _W_LAST], SLOTS[0], _X_WEIGHT),
    "weighted_step_e2": ([2, 3], list(_E2[1]), 0, 0.0),
    "weighted_step_e4": ([0, 1, 2, 3], list(_E4[1]), 0, 0.0),
}


def _weighted_args(op):
    """``(v_slots, v_weights, x_slot, x_weight, slot_write, dt, out_scale)`` of a weighted row."""
    v_slots, v_weights, x_slot, x_weight = WEIGHTED[op]
    return v_slots, v_weights, x_slot, x_weight, SLOTS[2], SCALARS[1], 1.0


def _uses_vc(op):
    """Whether the op reads its velocity terms from the separate stack vc (passed as ``v``) rather than the ring."""
    return op in ("weighted_step_e2", "weighted_step_e4")


def _reference(op):
    if op == "skip_step":
        return lambda x, v, xs, vs: skip_step_ref(x, xs, vs, *SLOTS, *SCALARS)
    if op == "compute_step":
        return lambda x, v, xs, vs: compute_step_ref(x, v, xs, vs, SLOTS[2], SCALARS[1])
    if op in WEIGHTED:
        args = _weighted_args(op)
        if _uses_vc(op):
            return lambda x, v, xs, vs: weighted_step_ref(x, xs, vs, v, *args, x.dtype, True)
        return lambda x, v, xs, vs: weighted_step_ref(x, xs, vs, None, *args, x.dtype, True)
    return lambda x, v, xs, vs: estimate_ref(x, xs, vs, *SLOTS, *SCALARS, 1.0, x.dtype)


def _weighted_fn(op, launcher):
    """``f(x, v, xs, vs)`` of a weighted row on a fused launcher with the signature of weighted_step_triton."""
    args = _weighted_args(op)
    if _uses_vc(op):
        return lambda x, v, xs, vs: launcher(x, xs, vs, v, *args, x.dtype, True)
    return lambda x, v, xs, vs: launcher(x, xs, vs, None, *args, x.dtype, True)


def _provider(op, name):
    """The callable ``f(x, v, xs, vs)`` of a provider, or a skip reason."""
    if name == "torch_ref":
        return _reference(op)
    if name == "torch_compile":
        # Dynamo caches compiled graphs on the code object, and every case of an op compiles the same lambda of
        # _reference (the weighted rows even share theirs across ops): past torch._dynamo.config.recompile_limit
        # variants a fullgraph compile fails. Each case compiles for its own shape and dtype anyway, so start clean.
        torch._dynamo.reset()
        return torch.compile(_reference(op), fullgraph=True)
    if name == "triton":
        kernels = _backend.triton_kernels()
        if kernels is None:
            pytest.skip(_backend.available_backends()["triton"])
        if not HAS_GPU and not _backend._interpreting():
            pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
        fns = {
            "skip_step": lambda x, v, xs, vs: kernels.skip_step_triton(x, xs, vs, *SLOTS, *SCALARS),
            "compute_step": lambda x, v, xs, vs: kernels.compute_step_triton(x, v, xs, vs, SLOTS[2], SCALARS[1]),
            "estimate": lambda x, v, xs, vs: kernels.estimate_triton(x, xs, vs, *SLOTS, *SCALARS, 1.0, x.dtype),
        }
        return fns[op] if op in fns else _weighted_fn(op, kernels.weighted_step_triton)
    ext = _backend.cuda_ops()
    if ext is None or not HAS_GPU:
        pytest.skip(f"cuda: {_backend.available_backends()['cuda']}")
    fns = {
        "skip_step": lambda x, v, xs, vs: ext._skip_step_cuda(x, xs, vs, *SLOTS, *SCALARS),
        "compute_step": lambda x, v, xs, vs: ext._compute_step_cuda(x, v, xs, vs, SLOTS[2], SCALARS[1]),
        "estimate": lambda x, v, xs, vs: ext._estimate_cuda(x, xs, vs, *SLOTS, *SCALARS, 1.0, x.dtype),
    }
    return fns[op] if op in fns else _weighted_fn(op, ext._weighted_step_cuda)


def _bytes_moved(op, x):
    """Bytes an ideal single pass reads and writes: latent in/out in its dtype, ring entries in float32."""
    n, b = x.numel(), x.element_size()
    if op == "skip_step":  # read x, x0, v0, v_last; write x', ring x, ring v
        return n * (2 * b + 5 * 4)
    if op == "compute_step":  # read x, v (same dtype here); write x', ring x, ring v
        return n * (3 * b + 2 * 4)
    if op in ("weighted_step_e2", "weighted_step_e4"):  # read x and 2 or 4 rows of vc; write x', ring x, ring v
        return n * (2 * b + (len(WEIGHTED[op][0]) + 2) * 4)
    # estimate: read x, x0, v0, v_last; write v_hat, ring x, ring v (weighted_step_published: the same rows)
    return n * (2 * b + 5 * 4)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, shape, dtype, provider, copy_bandwidth, machine_info):
    device = "cuda" if HAS_GPU else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if _uses_vc(op):  # the computed velocities, a float32 stack like the ring
        v = torch.randn((COMPUTED, *shape), generator=g).to(device)
    else:
        v = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    xs = torch.randn((CAPACITY, *shape), generator=g).to(device)
    vs = torch.randn((CAPACITY, *shape), generator=g).to(device)
    fn = _provider(op, provider)

    # correctness first, on copies of the ring
    want_xs, want_vs = xs.clone(), vs.clone()
    want = _reference(op)(x, v, want_xs, want_vs)
    got_xs, got_vs = xs.clone(), vs.clone()
    got = fn(x, v, got_xs, got_vs)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_vs, want_vs, rtol=1e-5, atol=1e-5)

    def run():
        fn(x, v, xs, vs)
        if HAS_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10 if HAS_GPU else 3, iterations=1, warmup_rounds=2 if HAS_GPU else 1)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info["bytes"] = _bytes_moved(op, x)
    if HAS_GPU:
        ms = time_ms(lambda: fn(x, v, xs, vs))
        gbps = _bytes_moved(op, x) / (ms * 1e-3) / 1e9
        benchmark.extra_info.update(
            median_ms=ms, gbps=gbps, copy_gbps=copy_bandwidth, fraction_of_copy=gbps / copy_bandwidth
        )
