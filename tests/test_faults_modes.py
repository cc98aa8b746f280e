"""Issue 18, serious faults: grad modes across calls, reused online plans, aliased recordings, module stats.

Every test here failed on the code before the fix (see the issue's items 1, 3, 4, 5 and 14).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import meancache
from meancache import History
from meancache import Schedule
from meancache.examples import tiny_pipelines
from meancache.online import OnlinePlan

N = 12
SIGMAS = torch.linspace(1, 0, N + 1)
MODES = {
    "inference": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad": contextlib.nullcontext,
}


class Flow(torch.nn.Module):
    """A small learned velocity field (parameters, so grad mode builds a real graph)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        return torch.tanh(self.lin(x)) + 0.01 * timestep * x


def _trajectory(model, x):
    for i in range(N):
        v = model(x, timestep=1000 * SIGMAS[i])
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    return x


def _noise(seed: int = 1):
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))


def _reference():
    model = meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS)
    with torch.no_grad():
        return _trajectory(model, _noise())


@pytest.mark.parametrize("order", list(itertools.permutations(MODES)), ids="-".join)
def test_module_calls_work_in_any_order_of_grad_modes(order):
    """Item 1: a first trajectory under inference_mode left an inference-tensor ring that broke later calls."""
    expected = _reference()
    model = meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS)
    for mode in order + order:
        with MODES[mode]():
            out = _trajectory(model, _noise())
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
        assert model.meancache.stats.model_calls == 5


@pytest.mark.parametrize("first,then", [("inference", "no_grad"), ("inference", "grad"), ("grad", "inference")])
def test_sample_with_a_reused_history_works_across_grad_modes(first, then):
    """Item 1 for ``sample(..., history=h)``: the caller's ring outlives the mode it was filled in."""
    schedule = Schedule.default(5, N)
    with torch.no_grad():
        expected = meancache.sample(lambda x, s: x * s - 1.0, _noise(), SIGMAS, schedule)
    ring = History(schedule.window, schedule.depth)
    for mode in (first, then, first):
        with MODES[mode]():
            out = meancache.sample(lambda x, s: x * s - 1.0, _noise(), SIGMAS, schedule, history=ring)
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


def test_pipeline_warmed_up_under_inference_mode_serves_ordinary_calls():
    """Item 1 for pipelines: serving code warms up under inference_mode, then calls normally."""
    pipe, kw, _ = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, budget=4)
    with torch.inference_mode():  # the warm-up makes the rings
        expected = pipe(**tiny_pipelines.fresh_kwargs(kw)).images.clone()
    for mode in ("no_grad", "inference", "grad", "no_grad"):
        with MODES[mode]():
            out = pipe(**tiny_pipelines.fresh_kwargs(kw)).images
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _graph_size(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_grad_mode_trajectories_do_not_chain_their_graphs():
    """Item 3: the reused ring chained each trajectory's graph onto the previous one's (239, 481, 723 nodes...)."""
    model = meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS)
    sizes = [_graph_size(_trajectory(model, _noise())) for _ in range(4)]
    assert sizes[0] > 0
    assert sizes == [sizes[0]] * 4


def test_grad_mode_keeps_gradients_exact_across_trajectories():
    """Item 3: gradients through a later trajectory equal those of a first trajectory on a fresh module."""

    def grads(model, trajectories):
        for _ in range(trajectories):
            model.zero_grad()
            _trajectory(model, _noise()).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    fresh = grads(meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS), 1)
    reused = grads(meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS), 3)
    for a, b in zip(fresh, reused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_earlier_trajectory_can_still_be_backpropagated():
    """A graph kept by the caller stays valid after the next trajectory runs (its ring storage is not reused)."""
    model = meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS)
    first = _trajectory(model, _noise()).square().sum()
    _trajectory(model, _noise(2))
    first.backward()  # raised "modified by an inplace operation" if the ring were rewritten under the graph
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_reused_online_plan_decides_each_run_afresh():
    """Item 4: a plan passed to sample() twice replayed the first run's decisions on the second."""

    def velocity(x, s):
        return torch.sin(3 * x) * (1 + 4 * s) - x

    sigmas = torch.linspace(1, 0, 41)
    a = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    b = 3 * torch.randn(64, 6, generator=torch.Generator().manual_seed(4))
    reused = OnlinePlan(10, 40)
    meancache.sample(velocity, a, sigmas, reused)
    first_measures = len(reused.instability)
    out = meancache.sample(velocity, b, sigmas, reused)
    fresh = OnlinePlan(10, 40)
    expected = meancache.sample(velocity, b, sigmas, fresh)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert reused.schedule() == fresh.schedule()
    assert len(reused.instability) == first_measures == len(fresh.instability)


def test_record_copies_a_velocity_written_into_a_reused_buffer():
    """Item 5: record() kept the returned tensor itself, so a reused output buffer held the last step everywhere."""
    buffer = torch.empty(2, 4)

    def velocity(x, sigma):
        torch.mul(x, sigma, out=buffer)
        buffer.sub_(1.0)
        return buffer

    sigmas = torch.linspace(1, 0, 7)
    rec = meancache.record(velocity, torch.ones(2, 4), sigmas, progress=False)
    x = torch.ones(2, 4)
    for i in range(6):
        v = x * float(sigmas[i]) - 1.0
        torch.testing.assert_close(rec.velocities[:, i], v)
        torch.testing.assert_close(rec.latents[:, i], x)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(rec.latents[:, -1], x)


def test_module_stats_say_completed_after_the_last_step():
    """Item 14: a module's finished trajectory printed "(not completed)"."""
    model = meancache.accelerate(Flow(), budget=5, sigmas=SIGMAS)
    with torch.no_grad():
        x = _noise()
        for i in range(N - 1):
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * model(x, timestep=1000 * SIGMAS[i])
        assert not model.meancache.stats.completed
        model(x, timestep=1000 * SIGMAS[N - 1])
    assert model.meancache.stats.completed
    assert "not completed" not in str(model.meancache.stats)


def _velocity_fn(flow):
    """``flow`` as a ``velocity_fn(x, sigma)``; its parameters require grad, so grad mode could build a graph."""
    return lambda x, sigma: flow(x, timestep=1000 * torch.as_tensor(sigma, dtype=x.dtype))


@pytest.mark.parametrize("order", [("grad", "inference", "no_grad"), ("inference", "grad", "inference")],
                         ids="-".join)
def test_calibrate_gives_the_same_answer_in_every_grad_mode(order):
    """``calibrate`` with a model (the draws' probe, the recording, the candidates' real runs) and from a recording
    made in another mode: the same schedules and scores whatever the mode of this call or an earlier one, and no
    graph kept (the model has parameters that require grad)."""
    flow = Flow()
    noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    answers = []
    for mode in order:
        report: list = []
        with MODES[mode]():
            schedules = meancache.calibrate(_velocity_fn(flow), noise, sigmas=SIGMAS, budget=[4, 6], report=report,
                                            progress=False)
            recording = meancache.record(_velocity_fn(flow), noise, SIGMAS, progress=False)
        assert not recording.velocities.requires_grad and not recording.latents.requires_grad
        rows = {len(e) for e in report[0]["errors"].values()}
        assert rows == {1024}  # the default's draws ran (6 inputs + 1,018 rows), so their probe and runs are covered
        answers.append((schedules, [(e["scores"], e["score"]) for e in report], recording))  # score: the refined
    for schedules, scores, recording in answers[1:]:
        assert schedules == answers[0][0] and scores == answers[0][1]
        torch.testing.assert_close(recording.velocities, answers[0][2].velocities, rtol=0, atol=0)
    replayed = []
    for mode in order:  # a recording made under inference mode, then calibrated in each mode
        with MODES[mode]():
            replayed.append(meancache.calibrate(answers[order.index("inference")][2], budget=[4, 6], progress=False))
    assert replayed[1:] == replayed[:-1]
