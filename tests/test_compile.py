"""torch.compile(fullgraph=True) of a whole sampling loop, and (on a GPU) CUDA-graph capture and side streams."""

from __future__ import annotations

import pytest
import torch

import meancache
from meancache.flows import shifted_sigmas

HAS_GPU = torch.cuda.is_available()
N = 12
SIGMAS = shifted_sigmas(N).tolist()
SCHEDULE = meancache.Schedule([0, 1, 4, 8, 11], [0, 2, 1, 4], N)  # chains, reuse and JVP windows


def _velocity(device):
    w = (torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 4).to(device)

    def velocity(x, sigma):
        return torch.tanh(x @ w) * (1.0 + sigma) - sigma * x

    return velocity


def _loop(velocity):
    def run(x):
        return meancache.sample(velocity, x, SIGMAS, SCHEDULE)

    return run


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sampling_loop_equals_eager(backend):
    torch._dynamo.reset()
    run = _loop(_velocity("cpu"))
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    eager = run(x)
    compiled = torch.compile(run, fullgraph=True, backend=backend)(x)
    if backend == "aot_eager":
        assert torch.equal(compiled, eager)
    else:
        # Inductor fuses the velocity's own ops; the MeanCache ops run as they do eagerly
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_compiled_loop_has_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_loop(_velocity("cpu")))(torch.randn(2, 16))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay_of_a_sampling_loop():
    run = _loop(_velocity("cuda"))
    static_x = torch.randn(2, 64, 16, device="cuda")
    eager = run(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
        run(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    new_x = torch.randn(2, 64, 16, device="cuda")
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, run(new_x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(static_out, eager)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_non_default_stream():
    run = _loop(_velocity("cuda"))
    x = torch.randn(4, 32, 16, device="cuda")
    expected = run(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = run(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# -- bad input and autograd under torch.compile (issue 10, fault 2) -----------------------------------------------

_SIG = (0.92, 0.71, 0.66)


def _compiled_error(fn, *args):
    """The message torch.compile(fullgraph=True) raises for ``fn(*args)``; the checks must run at trace time."""
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    return str(info.value)


def test_bad_ring_under_compile_fails_at_trace_time_with_the_rule():
    def skip(x, xs, vs):
        return meancache.ops.skip_step(x, xs, vs, 5, 2, *_SIG)

    def skip_from_the_slot_it_writes(ring, vs):
        return meancache.ops.skip_step(ring[5], ring, vs, 5, 2, *_SIG)

    message = _compiled_error(skip, torch.randn(2, 8), torch.randn(3, 2, 8), torch.randn(2, 2, 8))
    assert "skip_step: xs has shape (3, 2, 8) but vs has shape (2, 2, 8): xs and vs must have the same capacity C" \
        in message, message
    message = _compiled_error(skip_from_the_slot_it_writes, torch.randn(6, 2, 8), torch.randn(6, 2, 8))
    assert "skip_step: x shares memory with xs[5], the ring slot this call writes" in message, message


def test_bad_step_under_compile_fails_with_the_rule():
    v = torch.randn(2, 8)

    def step_true(x, xs, vs):
        return meancache.ops.compute_step(x, v, xs, vs, True, *_SIG[1:])

    def step_negative(x, xs, vs):
        return meancache.ops.compute_step(x, v, xs, vs, -3, *_SIG[1:])

    message = _compiled_error(step_true, torch.randn(2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8))
    assert "compute_step: step=True: must be a Python int, not a bool" in message, message
    message = _compiled_error(step_negative, torch.randn(2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8))
    assert "compute_step: step=-3: must be >= 0" in message, message


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sampling_loop_is_differentiable_like_eager(backend):
    # with autograd recording, the ops are the reference's torch ops: compiled and eager gradients agree
    run = _loop(_velocity("cpu"))
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    eager_out = run(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    torch._dynamo.reset()
    compiled_out = torch.compile(run, fullgraph=True, backend=backend)(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out.square().sum(), x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-5)
    assert eager_grad.abs().sum() > 0
