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
