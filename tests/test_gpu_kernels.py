"""The fused ops on a real GPU: every op x backend (cuda, triton, torch) x dtype against the reference.

Covers the benchmark shapes (read from bench/bench_ops.py, so the two stay the same), the inputs that reach every
path of the kernels (tails after the 16-byte vector groups, sizes past one pass of the grid, storage offsets that
break 16-byte alignment, non-contiguous latents, every aliasing of the ring's write slot with the window's slots),
float64 latents, and the ways a sampling loop is run on a GPU: captured in a CUDA graph over 50 steps and replayed,
on a non-default stream, and under torch.compile(fullgraph=True).

Each check runs the op under the backend being tested and under the pure-torch reference on copies of one random
ring, with the write slot poisoned (NaN) beforehand so an element the kernel forgets to write shows. Besides the
per-dtype tolerances against the reference, the output's error against float64 must be at most twice that of eager
PyTorch doing the math in the latent dtype (the rule of tests/test_ops.py).

meancache::weighted_step (a skipped step with any estimator, as host weights) gets the same treatment in its own
section: the published estimator as weights and the 2- and 4-term extrapolations from a separate stack of computed
velocities, at the benchmark shapes, tails, misaligned storage (the stack included), every output dtype, a latent
term left out (its ring row NaN, which must not be read), the written row aliasing every row read, a CUDA graph and
the current stream. Its float64 truth is tests/test_weighted_step.py's.

Skipped without a CUDA device; tools/gpu_check.py (`make gpu-check`) runs this file on a GPU machine. There it sets
GPU_CHECK_EXPECT_EXTENSION=1 after building meancache._C, and test_auto_backend_on_cuda then fails unless the
automatic backend choice picks the extension.
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib

import pytest
import torch
from op_truth import SIGMAS
from op_truth import truth as formula
from test_weighted_step import weighted_truth

import meancache
from meancache import _backend
from meancache import ops
from meancache.estimators import extrapolation_weights
from meancache.estimators import meancache_weights
from meancache.flows import shifted_sigmas
from meancache.reference import step_scalars

HAS_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (tools/gpu_check.py runs these on a GPU machine)"),
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("skip_step", "compute_step", "estimate")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# fp32: reordering and FMA; fp16/bf16: one rounding of the stored result (as tests/test_ops.py)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}

# Around the vector widths (4 fp32, 8 fp16/bf16 elements per 16 bytes), and past one grid pass of an H200 on the
# scalar path (132 SMs x 8 blocks x 256 threads = 270,336 elements) and on the bf16 vector path (x 8 = 2,162,688).
TAIL_SIZES = (1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 1025, 4097, 270_337, 2_162_695)
LAYOUTS = ("transposed", "sliced", "expanded", "permuted")
MISALIGNED = ("x", "v", "ring", "all")


def _bench_shapes() -> dict:
    """SHAPES of bench/bench_ops.py, read without importing it (it imports the benchmark conftest)."""
    tree = ast.parse((ROOT / "bench" / "bench_ops.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SHAPES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError("bench/bench_ops.py has no SHAPES = {...} literal")


BENCH_SHAPES = _bench_shapes()


def _backend_params():
    cuda_ok = _backend.cuda_ops() is not None
    triton_ok = _backend.triton_kernels() is not None
    states = _backend.available_backends()
    return [
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not cuda_ok, reason=f"cuda: {states['cuda']}")),
        pytest.param("triton", id="triton",
                     marks=pytest.mark.skipif(not triton_ok, reason=f"triton: {states['triton']}")),
        pytest.param("torch", id="torch"),
    ]


BACKENDS = _backend_params()


# -- helpers -----------------------------------------------------------------------------------------------------


def _rand(shape, dtype, g, offset: int = 0) -> torch.Tensor:
    """Random contiguous CUDA tensor whose storage starts ``offset`` elements into its allocation."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randn(n + offset, generator=g, device="cuda").to(dtype)
    return flat[offset:].view(shape)


def _copy_keeping_offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the same storage offset (clone() would realign a deliberately misaligned ring)."""
    off = t.storage_offset()
    return torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)[off:].view(t.shape).copy_(t)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _call(op, backend, x, v, xs, vs, step, k, monkeypatch, out_dtype=None):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    if op == "skip_step":
        return ops.skip_step(x, xs, vs, step, k, *SIGMAS)
    if op == "compute_step":
        return ops.compute_step(x, v, xs, vs, step, SIGMAS[1], SIGMAS[2])
    return ops.estimate(x, xs, vs, step, k, *SIGMAS, out_scale=-1.0, out_dtype=out_dtype or x.dtype)




def _check(op, backend, x, v, xs, vs, monkeypatch, step=9, k=4):
    """``op`` under ``backend`` against the reference and float64, on copies of the ring with the write slot
    poisoned when nothing reads it."""
    c = xs.shape[0]
    start, last, write = (step - k) % c, (step - 1) % c, step % c
    x_before = x.clone()
    runs = []
    for which in (backend, "torch"):
        a, b = _copy_keeping_offset(xs), _copy_keeping_offset(vs)
        if op == "compute_step" or write not in (start, last):
            a[write], b[write] = float("nan"), float("nan")
        runs.append((_call(op, which, x, v, a, b, step, k, monkeypatch), a, b))
    (out, xs_b, vs_b), (ref, xs_r, vs_r) = runs
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(x, x_before), "the op wrote into its input latent"
    assert torch.isfinite(out).all() and torch.isfinite(xs_b).all() and torch.isfinite(vs_b).all(), \
        "an element was left unwritten (NaN poison) or overflowed"
    torch.testing.assert_close(out, ref, **TOL[x.dtype])
    assert torch.equal(xs_b, xs_r), "ring xs differs from the reference"
    torch.testing.assert_close(vs_b, vs_r, rtol=1e-5, atol=1e-5)
    truth, _, vs_t = formula(op, x, v, xs, vs, step, k)
    eager, _, _ = formula(op, x, v, xs, vs, step, k, math_dtype=x.dtype)
    err = (out.double() - truth).abs().max().item()
    err_eager = (eager.double() - truth).abs().max().item()
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)
    assert (vs_b.double() - vs_t).abs().max().item() <= 1e-4


def _inputs(shape, dtype, seed, capacity=6, x_offset=0, ring_offset=0, v_offset=0):
    g = _generator(seed)
    x = _rand(shape, dtype, g, x_offset)
    v = _rand(shape, torch.bfloat16 if dtype == torch.float32 else torch.float32, g, v_offset)
    xs = _rand((capacity, *shape), torch.float32, g, ring_offset)
    vs = _rand((capacity, *shape), torch.float32, g, ring_offset)
    return x, v, xs, vs


# -- every op x backend x dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(BENCH_SHAPES.values()), ids=list(BENCH_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_bench_shapes(op, shape, dtype, backend, monkeypatch):
    _check(op, backend, *_inputs(shape, dtype, seed=0), monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n", TAIL_SIZES)
@pytest.mark.parametrize("op", OPS)
def test_tail_sizes(op, n, dtype, backend, monkeypatch):
    _check(op, backend, *_inputs((n,), dtype, seed=n), monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op, where", [(op, w) for op in OPS for w in MISALIGNED if w != "v" or op == "compute_step"])
def test_misaligned_storage(op, where, dtype, backend, monkeypatch):
    # (4, 1024): whole 16-byte groups, so only the storage offset keeps the kernels off the vector path
    offsets = dict(x_offset=int(where in ("x", "all")), v_offset=int(where in ("v", "all")),
                   ring_offset=int(where in ("ring", "all")))
    x, v, xs, vs = _inputs((4, 1024), dtype, seed=3, **offsets)
    if offsets["x_offset"]:
        assert x.data_ptr() % 16 != 0
    if offsets["ring_offset"]:
        assert xs.data_ptr() % 16 != 0
    _check(op, backend, x, v, xs, vs, monkeypatch)


def _layout(base: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return base.reshape(33, 65).t()
    if layout == "sliced":
        return torch.cat([base.reshape(5, 429), base.reshape(5, 429)[:, :7]], dim=1)[:, 2:431]
    if layout == "expanded":
        return base.reshape(-1)[:429].reshape(1, 429).expand(5, 429)
    return base.reshape(1, 11, 15, 13).permute(0, 2, 3, 1)  # channels-last view of an image latent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op, layout, dtype, backend, monkeypatch):
    g = _generator(4)
    x = _layout(_rand((2145,), dtype, g), layout)
    v = _layout(_rand((2145,), torch.float32, g), layout)
    assert not x.is_contiguous() and not v.is_contiguous()
    xs = _rand((6, *x.shape), torch.float32, g)
    vs = _rand((6, *x.shape), torch.float32, g)
    _check(op, backend, x, v, xs, vs, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_ring_is_rejected(backend, monkeypatch):
    g = _generator(5)
    x = _rand((3, 40), torch.float32, g)
    xs = _rand((6, 3, 80), torch.float32, g)[..., ::2]
    vs = _rand((6, 3, 40), torch.float32, g)
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    with pytest.raises(ValueError, match="xs must be contiguous"):
        ops.skip_step(x, xs, vs, 9, 4, *SIGMAS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity, k", [(c, k) for c in range(1, 7) for k in range(1, c + 1)])
@pytest.mark.parametrize("op", ["skip_step", "estimate"])
def test_aliased_ring_slots(op, capacity, k, backend, monkeypatch):
    # capacity == k: the write slot is the window start's; k == 1: the window start is the newest entry. Every
    # input of an element must be read before its slot is overwritten.
    step = capacity + k + 1
    x, v, xs, vs = _inputs((5, 1031), torch.float32, seed=10 * capacity + k, capacity=capacity)
    truth, xs_t, vs_t = formula(op, x, v, xs, vs, step, k)
    a, b = xs.clone(), vs.clone()
    out = _call(op, backend, x, v, a, b, step, k, monkeypatch)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), xs_t, rtol=0, atol=0)
    torch.testing.assert_close(b.double(), vs_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_float64(op, backend, monkeypatch):
    # float64 latents run on the reference with a float64 ring; a forced kernel backend refuses them by name
    g = _generator(6)
    x = _rand((7, 129), torch.float64, g)
    v = _rand((7, 129), torch.float64, g)
    xs = _rand((6, 7, 129), torch.float64, g)
    vs = _rand((6, 7, 129), torch.float64, g)
    if backend != "torch":
        with pytest.raises(RuntimeError, match="float16/bfloat16/float32 latents, not torch.float64"):
            _call(op, backend, x, v, xs.clone(), vs.clone(), 9, 4, monkeypatch)
        return
    a, b = xs.clone(), vs.clone()
    out = _call(op, "torch", x, v, a, b, 9, 4, monkeypatch)
    truth, xs_t, vs_t = formula(op, x, v, xs, vs, 9, 4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, vs_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_estimate_of_a_float32_latent(backend, monkeypatch):
    # the kernels store 16/32-bit outputs only, so a float64 out_dtype is served by the reference
    x, v, xs, vs = _inputs((3, 257), torch.float32, seed=7)
    a, b = xs.clone(), vs.clone()
    out = _call("estimate", backend, x, v, a, b, 9, 4, monkeypatch, out_dtype=torch.float64)
    truth, _, _ = formula("estimate", x, v, xs, vs, 9, 4)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_auto_backend_on_cuda(dtype, monkeypatch):
    monkeypatch.delenv("MEANCACHE_BACKEND", raising=False)
    states = _backend.available_backends()
    if os.environ.get("GPU_CHECK_EXPECT_EXTENSION") == "1":
        assert _backend.cuda_ops() is not None, f"meancache._C was built but does not load: {states['cuda']}"
    want = "cuda" if _backend.cuda_ops() is not None else ("triton" if _backend.triton_kernels() else "torch")
    assert _backend.select_backend(torch.zeros(3, device="cuda", dtype=dtype)) == want, states
    assert _backend.select_backend(torch.zeros(3, device="cuda", dtype=torch.float64)) == "torch"


# -- sampling loops: CUDA graph, side stream, torch.compile ------------------------------------------------------


class _ElementwiseField:
    """``v = tanh(x w + sigma b) (1 + sigma) - sigma x``, element-wise only: bit-reproducible between eager, graph
    replay and other streams (no reduction whose order could change)."""

    def __init__(self, dim: int, dtype: torch.dtype):
        g = _generator(11)
        self.w = torch.randn(dim, generator=g, device="cuda").to(dtype)
        self.b = torch.randn(dim, generator=g, device="cuda").to(dtype)

    def __call__(self, x, sigma):
        return torch.tanh(x * self.w + sigma * self.b) * (1.0 + sigma) - sigma * x


SIGMAS_50 = shifted_sigmas(50).tolist()
SCHEDULE_50 = meancache.Schedule.preset("qwen-image", 10)  # 10 computed of 50: chains, reuse and JVP windows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_50_step_loop(backend, dtype, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    field = _ElementwiseField(64, dtype)

    def run(x):
        return meancache.sample(field, x, SIGMAS_50, SCHEDULE_50)

    g = _generator(12)
    static_x = torch.randn(2, 256, 64, generator=g, device="cuda").to(dtype)
    first = run(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (kernel compilation, SM count), as capture requires
        run(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    for _ in range(2):  # replays on fresh inputs equal eager runs on them, bit for bit
        new_x = torch.randn(2, 256, 64, generator=g, device="cuda").to(dtype)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, run(new_x))
    assert not torch.equal(static_out, first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_op_runs_on_the_current_stream(op, backend, monkeypatch):
    # The inputs are written on a side stream behind a 25 ms spin. An op launched on any other stream would read
    # them before they are written (NaN there) instead of after.
    x_src, v_src, xs_src, vs_src = _inputs((8, 4099), torch.bfloat16, seed=13)
    expected = _call(op, "torch", x_src, v_src, xs_src.clone(), vs_src.clone(), 9, 4, monkeypatch)
    x, v, xs, vs = (torch.full_like(t, float("nan")) for t in (x_src, v_src, xs_src, vs_src))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for dst, src in ((x, x_src), (v, v_src), (xs, xs_src), (vs, vs_src)):
            dst.copy_(src)
        out = _call(op, backend, x, v, xs, vs, 9, 4, monkeypatch)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_loop_on_a_side_stream(backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    field = _ElementwiseField(64, torch.float32)
    x = torch.randn(4, 128, 64, generator=_generator(14), device="cuda")
    expected = meancache.sample(field, x, SIGMAS_50, SCHEDULE_50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = meancache.sample(field, x, SIGMAS_50, SCHEDULE_50)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


N_COMPILE = 12
SIGMAS_12 = shifted_sigmas(N_COMPILE).tolist()
SCHEDULE_12 = meancache.Schedule([0, 1, 4, 8, 11], [0, 2, 1, 4], N_COMPILE)


@functools.lru_cache(maxsize=None)
def _compiled_loop():
    """One compiled loop for every backend: the op is opaque to Dynamo and picks its backend when it runs, so the
    backend under test changes nothing in the graph (and Inductor compiles once)."""
    field = _ElementwiseField(64, torch.float32)

    def loop(x):
        return meancache.sample(field, x, SIGMAS_12, SCHEDULE_12)

    return loop, torch.compile(loop, fullgraph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_loop(backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    eager_loop, compiled_loop = _compiled_loop()
    x = torch.randn(2, 96, 64, generator=_generator(15), device="cuda")
    # Inductor fuses the field's element-wise ops (other rounding); the MeanCache ops run as they do eagerly
    torch.testing.assert_close(compiled_loop(x), eager_loop(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_sampling_loop_matches_reference(backend, dtype, monkeypatch):
    field = _ElementwiseField(64, dtype)
    x = torch.randn(2, 333, 64, generator=_generator(16), device="cuda").to(dtype)
    monkeypatch.setenv("MEANCACHE_BACKEND", "torch")
    ref = meancache.sample(field, x, SIGMAS_50, SCHEDULE_50).float()
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    out = meancache.sample(field, x, SIGMAS_50, SCHEDULE_50)
    assert out.dtype == dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel <= (1e-5 if dtype == torch.float32 else 2e-2), rel


# -- weighted_step: every backend x dtype x form against the reference -------------------------------------------

W_INV_D, W_DT = step_scalars(*SIGMAS)
W_COMPUTED = 4  # rows of the computed-velocity stack vc
_W_NODES = (1.0, 0.95, 0.86, 0.78)  # sigmas of the computed steps before SIGMAS[1] -> SIGMAS[2]


def _w_extrapolation(order):
    q, weights = extrapolation_weights(_W_NODES, SIGMAS[1], SIGMAS[2], order)
    assert q == order
    return list(weights)


# form: (reads vc, v_slots, v_weights, x_slot, x_weight) for step 9 of a 6-slot ring (writes slot 3; with K = 4 the
# window starts at slot 5 and the newest entry is slot 2)
_W_START, _W_LAST, _W_X = meancache_weights(W_INV_D, W_DT)
WEIGHTED_FORMS = {
    "published": (False, [5, 2], [_W_START, _W_LAST], 5, _W_X),   # 2 ring terms + the latent term: skip_step's work
    "e2-vc": (True, [2, 3], _w_extrapolation(1), 4, 0.0),         # a line through the newest 2 computed velocities
    "e4-vc": (True, [0, 1, 2, 3], _w_extrapolation(3), 4, 0.0),   # a cubic through 4, no latent term
    "e4-vs-latent": (False, [0, 1, 5, 2], _w_extrapolation(3), 4, _W_X),  # 4 ring terms and a latent term
}


def _w_call(backend, x, xs, vs, vc, form, monkeypatch, step=9, euler=True, out_dtype=None):
    uses_vc, v_slots, v_weights, x_slot, x_weight = WEIGHTED_FORMS[form]
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    return ops.weighted_step(x, xs, vs, vc if uses_vc else None, step, v_slots, v_weights, x_slot, x_weight, W_DT,
                             out_scale=-1.0, out_dtype=out_dtype, euler=euler)


def _w_check(form, backend, x, xs, vs, vc, monkeypatch, euler=True, out_dtype=None, step=9):
    """weighted_step ``form`` under ``backend`` against the reference and float64 (tests/test_weighted_step.py), on
    copies of the ring that keep its storage offset: the written row poisoned when nothing reads it, the latent row
    poisoned when its term is left out (it must then be neither read nor written)."""
    uses_vc, v_slots, v_weights, x_slot, x_weight = WEIGHTED_FORMS[form]
    vc = vc if uses_vc else None
    c = xs.shape[0]
    write = step % c
    xs, vs = _copy_keeping_offset(xs), _copy_keeping_offset(vs)
    unread = x_slot if x_weight == 0.0 and x_slot != write else None
    if unread is not None:
        xs[unread] = float("nan")
    if (uses_vc or write not in v_slots) and (x_weight == 0.0 or x_slot != write):
        xs[write], vs[write] = float("nan"), float("nan")
    x_before, vc_before = x.clone(), None if vc is None else vc.clone()
    runs = []
    for which in (backend, "torch"):
        a, b = _copy_keeping_offset(xs), _copy_keeping_offset(vs)
        runs.append((_w_call(which, x, a, b, vc, form, monkeypatch, step, euler, out_dtype), a, b))
    (out, xs_b, vs_b), (ref, xs_r, vs_r) = runs
    want = x.dtype if euler or out_dtype is None else out_dtype
    assert out.shape == x.shape and out.dtype == want and out.device == x.device
    assert torch.equal(x, x_before), "the op wrote into its input latent"
    assert vc is None or torch.equal(vc, vc_before), "the op wrote into vc"
    keep = [r for r in range(c) if r != unread]
    assert torch.isfinite(out).all() and torch.isfinite(vs_b).all() and torch.isfinite(xs_b[keep]).all(), \
        "an element was left unwritten (NaN poison), read from an unread row, or overflowed"
    if unread is not None:
        assert torch.isnan(xs_b[unread]).all(), "the unread latent row was written"
    torch.testing.assert_close(out, ref, **TOL[want])
    torch.testing.assert_close(xs_b, xs_r, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vs_b, vs_r, rtol=1e-5, atol=1e-5)
    args = (vc, v_slots, v_weights, x_slot, x_weight, write, W_DT, -1.0, euler)
    truth, _, vs_t = weighted_truth(x, xs, vs, *args)
    eager, _, _ = weighted_truth(x, xs, vs, *args, math_dtype=x.dtype)
    err = (out.double() - truth).abs().max().item()
    err_eager = (eager.to(want).double() - truth).abs().max().item()
    assert err <= 2 * err_eager + 1e-6, (err, err_eager)
    assert (vs_b.double() - vs_t).abs().max().item() <= 1e-4


def _w_inputs(shape, dtype, seed, capacity=6, x_offset=0, ring_offset=0, vc_offset=0):
    g = _generator(seed)
    x = _rand(shape, dtype, g, x_offset)
    xs = _rand((capacity, *shape), torch.float32, g, ring_offset)
    vs = _rand((capacity, *shape), torch.float32, g, ring_offset)
    vc = _rand((W_COMPUTED, *shape), torch.float32, g, vc_offset)
    return x, xs, vs, vc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", list(BENCH_SHAPES.values()), ids=list(BENCH_SHAPES))
@pytest.mark.parametrize("form", list(WEIGHTED_FORMS))
def test_weighted_bench_shapes(form, shape, dtype, backend, monkeypatch):
    _w_check(form, backend, *_w_inputs(shape, dtype, seed=20), monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n", TAIL_SIZES)
@pytest.mark.parametrize("form", ["published", "e4-vc"])
def test_weighted_tail_sizes(form, n, dtype, backend, monkeypatch):
    _w_check(form, backend, *_w_inputs((n,), dtype, seed=n + 1), monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("form, where", [(f, w) for f in ("published", "e4-vc", "e4-vs-latent")
                                         for w in ("x", "ring", "vc", "all") if w != "vc" or f == "e4-vc"])
def test_weighted_misaligned_storage(form, where, dtype, backend, monkeypatch):
    # (4, 1024): whole 16-byte groups, so only the storage offset keeps the kernels off the vector path
    offsets = dict(x_offset=int(where in ("x", "all")), ring_offset=int(where in ("ring", "all")),
                   vc_offset=int(where in ("vc", "all")))
    x, xs, vs, vc = _w_inputs((4, 1024), dtype, seed=21, **offsets)
    if offsets["vc_offset"]:
        assert vc.data_ptr() % 16 != 0
    _w_check(form, backend, x, xs, vs, vc, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("form", ["published", "e2-vc"])
def test_weighted_estimate_output_dtypes(form, dtype, out_dtype, backend, monkeypatch):
    x, xs, vs, vc = _w_inputs((3, 4099), dtype, seed=22)
    _w_check(form, backend, x, xs, vs, vc, monkeypatch, euler=False, out_dtype=out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_weighted_non_contiguous_latent(layout, dtype, backend, monkeypatch):
    g = _generator(23)
    x = _layout(_rand((2145,), dtype, g), layout)
    assert not x.is_contiguous()
    xs, vs = _rand((6, *x.shape), torch.float32, g), _rand((6, *x.shape), torch.float32, g)
    vc = _rand((W_COMPUTED, *x.shape), torch.float32, g)
    _w_check("e4-vs-latent", backend, x, xs, vs, vc, monkeypatch)
    _w_check("e2-vc", backend, x, xs, vs, vc, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("euler", [True, False], ids=["euler", "estimate"])
@pytest.mark.parametrize("capacity, n_terms", [(c, t) for c in range(1, 7) for t in range(1, 5)])
def test_weighted_aliased_ring_slots(capacity, n_terms, euler, backend, monkeypatch):
    # step 2C writes slot 0, which is also the first term's row and the latent row: every input of an element must
    # be read before its row is overwritten
    step = 2 * capacity
    v_slots = [t % capacity for t in range(n_terms)]
    weights = [0.75, -1.3, 2.1, -0.55][:n_terms]
    g = _generator(24 + capacity)
    x = _rand((5, 1031), torch.float32, g)
    xs, vs = _rand((capacity, 5, 1031), torch.float32, g), _rand((capacity, 5, 1031), torch.float32, g)
    truth, xs_t, vs_t = weighted_truth(x, xs, vs, None, v_slots, weights, 0, _W_X, 0, W_DT, -1.0, euler)
    a, b = xs.clone(), vs.clone()
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    out = ops.weighted_step(x, a, b, None, step, v_slots, weights, 0, _W_X, W_DT, out_scale=-1.0, euler=euler)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), xs_t, rtol=0, atol=0)
    torch.testing.assert_close(b.double(), vs_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_weighted_published_form_matches_skip_step(dtype, backend, monkeypatch):
    # the published estimator through weighted_step against skip_step on the same backend (float32 rounding order
    # apart: tests/test_weighted_step.py states the tolerance)
    x, xs, vs, _ = _w_inputs((8, 4099), dtype, seed=25)
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    a, b = xs.clone(), vs.clone()
    published = ops.skip_step(x, a, b, 9, 4, *SIGMAS)
    c, d = xs.clone(), vs.clone()
    weighted = _w_call(backend, x, c, d, None, "published", monkeypatch)
    torch.testing.assert_close(weighted, published, **TOL[dtype])
    assert torch.equal(c, a)
    torch.testing.assert_close(d, b, rtol=1e-5, atol=1e-5)


def _w_loop(x, xs, vs, vc, steps=8):
    """A few weighted steps reading vc and the ring (published form once the window is there): graph material."""
    # from step 4 on: the vc form reads rows 0..3, which only a step >= 4 may (weighted_step's written-rows rule)
    for i in range(4, 4 + steps):
        if i >= 8:
            start, last = (i - 4) % xs.shape[0], (i - 1) % xs.shape[0]
            x = ops.weighted_step(x, xs, vs, None, i, [start, last], [_W_START, _W_LAST], start, _W_X, W_DT)
        else:
            x = ops.weighted_step(x, xs, vs, vc, i, [0, 1, 2, 3], WEIGHTED_FORMS["e4-vc"][2], 0, 0.0, W_DT)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_cuda_graph_replay(backend, monkeypatch):
    monkeypatch.setenv("MEANCACHE_BACKEND", backend)
    g = _generator(26)
    static = [_rand(s, torch.float32, g) for s in ((2, 4096), (6, 2, 4096), (6, 2, 4096), (W_COMPUTED, 2, 4096))]
    initial = [t.clone() for t in static]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (kernel compilation, SM count), as capture requires
        _w_loop(*[t.clone() for t in static])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _w_loop(*static)
    for _ in range(2):  # replays on fresh inputs equal eager runs on them, bit for bit
        fresh = [torch.randn(t.shape, generator=g, device="cuda") for t in initial]
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = _w_loop(*[t.clone() for t in fresh])
        assert torch.equal(static_out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_runs_on_the_current_stream(backend, monkeypatch):
    # the inputs are written on a side stream behind a 25 ms spin: launched on any other stream, the op would read
    # them (NaN) before they are written
    src = _w_inputs((8, 4099), torch.bfloat16, seed=27)
    expected = _w_call("torch", src[0], src[1].clone(), src[2].clone(), src[3], "e4-vs-latent", monkeypatch)
    x, xs, vs, vc = (torch.full_like(t, float("nan")) for t in src)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for dst, s in zip((x, xs, vs, vc), src):
            dst.copy_(s)
        out = _w_call(backend, x, xs, vs, vc, "e4-vs-latent", monkeypatch)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])
