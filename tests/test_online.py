"""The calibration-free online mode: within budget, sensible, and identical decisions across ranks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
from meancache.examples import tiny_pipelines
import torch
from fields import rel_err

import meancache
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas
from meancache.online import OnlinePlan

SIGMAS = shifted_sigmas(50).tolist()


@pytest.mark.parametrize("budget", [2, 3, 5, 10, 17, 25, 50])
@pytest.mark.parametrize("tolerance", [0.005, 0.02, 0.3])
def test_stays_within_budget_and_plans_a_valid_schedule(budget, tolerance):
    flow = GaussianMixtureFlow(dim=16, components=6, seed=budget)
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    plan = OnlinePlan(budget, 50, tolerance)
    flow.calls = 0
    out = meancache.sample(flow, x0, SIGMAS, plan)
    schedule = plan.schedule()
    assert flow.calls == schedule.budget <= budget
    assert schedule.compute_steps[0] == 0 and schedule.compute_steps[-1] == 49
    assert torch.isfinite(out).all()
    # replaying the realised schedule statically gives the same result: the plan is what ran
    assert torch.equal(meancache.sample(flow, x0, SIGMAS, schedule), out)


def test_tight_tolerance_spends_the_budget_and_beats_uniform_reuse():
    flow = GaussianMixtureFlow(dim=32, components=8, seed=3)
    x0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = meancache.sample(flow, x0, SIGMAS, meancache.Schedule.full(50))
    plan = OnlinePlan(17, 50, 0.005)
    online = meancache.sample(flow, x0, SIGMAS, plan)
    assert plan.schedule().budget == 17
    steps = [round(i * 49 / 16) for i in range(17)]
    uniform = meancache.Schedule(steps, [0 if b - a == 1 else 1 for a, b in zip(steps, steps[1:])], 50)
    err_online = rel_err(online, full)
    err_uniform = rel_err(meancache.sample(flow, x0, SIGMAS, uniform), full)
    print(f"online B=17: rel. error {err_online:.3e}; uniform reuse: {err_uniform:.3e}")
    assert err_online < err_uniform


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget=1"):
        OnlinePlan(1, 10)
    with pytest.raises(ValueError, match="tolerance=0"):
        OnlinePlan(4, 10, 0)
    with pytest.raises(ValueError, match="num_steps=1"):
        OnlinePlan(4, 1)
    plan = OnlinePlan(4, 10)
    with pytest.raises(ValueError, match="step 5 is not planned yet"):
        plan[5]


def test_pipeline_online_mode_stays_within_budget():
    pipe, kw, info = tiny_pipelines.build("qwen-image")
    kw = dict(kw, num_inference_steps=20)
    meancache.accelerate(pipe, budget=6, mode="online")
    out = getattr(pipe(**kw), info["output_attr"])
    s = meancache.summary(pipe)
    assert torch.isfinite(out).all()
    assert s.computed_steps <= 6 and s.computed_steps + s.skipped_steps == 20
    assert s.model_calls == s.computed_steps * info["calls_per_step"]
    assert s.schedule is not None and s.schedule.budget == s.computed_steps
    with pytest.raises(ValueError, match="mode='fast'"):
        meancache.accelerate(tiny_pipelines.build("flux")[0], budget=6, mode="fast")
    with pytest.raises(ValueError, match="pass budget=, not schedule="):
        meancache.accelerate(tiny_pipelines.build("flux")[0], schedule=meancache.Schedule.full(8), mode="online")


class _Velocity(torch.nn.Module):
    """A module returning a flow's velocity; ``timestep = 1000 * sigma``, as diffusers transformers take it."""

    def __init__(self, flow, scale=1.0):
        super().__init__()
        self.flow, self.scale, self.calls = flow, scale, 0

    def forward(self, x, timestep):
        self.calls += 1
        return self.scale * self.flow(x, float(timestep) / 1000)


def _loop(model, x, branches=1, guidance=2.0):
    for i in range(50):
        vs = [model(x, timestep=1000 * SIGMAS[i]) for _ in range(branches)]
        v = vs[0] if branches == 1 else vs[1] + guidance * (vs[0] - vs[1])
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    return x


def test_module_online_mode_matches_sample_with_an_online_plan():
    flow = GaussianMixtureFlow(dim=16, components=6, seed=4)
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = meancache.accelerate(_Velocity(flow), mode="online", budget=12, tolerance=0.01, sigmas=SIGMAS)
    try:
        out = _loop(model, x0)
        realised = model.meancache.schedule
        assert model.calls == realised.budget <= 12
        plan = OnlinePlan(12, 50, 0.01)
        expected = meancache.sample(flow, x0, SIGMAS, plan)
        assert realised == plan.schedule()
        assert rel_err(out, expected) < 1e-12
        # a second trajectory is planned afresh (same input: same decisions, same calls again)
        model.calls = 0
        assert torch.equal(_loop(model, x0), out) and model.calls == realised.budget
    finally:
        meancache.disable(model)


def test_module_online_mode_with_two_branches_follows_the_least_stable_one():
    flow = GaussianMixtureFlow(dim=16, components=6, seed=6)
    x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    class TwoBranch(_Velocity):
        # branch 0 (conditional) is the flow; branch 1 (unconditional) is a smooth, nearly constant field
        def forward(self, x, timestep):
            self.calls += 1
            if self.calls % 2:
                return self.flow(x, float(timestep) / 1000)
            return torch.ones_like(x) * (1 + 1e-4 * float(timestep) / 1000)

    model = meancache.accelerate(TwoBranch(flow), mode="online", budget=30, tolerance=0.01, sigmas=SIGMAS)
    try:
        _loop(model, x0, branches=2)
        both = model.meancache.schedule
        assert model.calls == 2 * both.budget and both.budget <= 30
    finally:
        meancache.disable(model)
    # the unstable branch alone asks for the same plan: the stable one does not lengthen its segments
    alone = OnlinePlan(30, 50, 0.01)
    meancache.sample(flow, x0, SIGMAS, alone)
    assert both == alone.schedule()
    # and the stable branch alone would plan the longest segments the budget allows
    stable = meancache.accelerate(_Velocity(lambda x, s: torch.ones_like(x)), mode="online", budget=30, sigmas=SIGMAS)
    try:
        _loop(stable, x0)
        assert stable.meancache.schedule.budget < both.budget
    finally:
        meancache.disable(stable)


def test_module_online_mode_bad_arguments_leave_the_module_untouched():
    model = _Velocity(GaussianMixtureFlow(dim=4, components=2))
    cases = [
        (dict(mode="online", schedule=meancache.Schedule.full(50)), "pass budget=, not schedule="),
        (dict(mode="online", budget=1), "budget=1"),
        (dict(mode="online", budget=5, tolerance=-1.0), "tolerance=-1.0"),
        (dict(budget=5, tolerance=0.1), "tolerance= applies to mode='online' only"),
        (dict(budget=5, mode="fast"), "mode='fast'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=re.escape(match)):
            meancache.accelerate(model, sigmas=SIGMAS, **kwargs)
        assert not hasattr(model, "meancache") and "forward" not in model.__dict__
    # without budget the online mode takes about a third of the steps, like pipelines
    meancache.accelerate(model, mode="online", sigmas=SIGMAS)
    try:
        plan = model.meancache._traj.plan
        assert (plan.budget, plan.tolerance) == (17, meancache.online.DEFAULT_TOLERANCE)
    finally:
        meancache.disable(model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_of_one_group_take_identical_decisions():
    # two gloo ranks on this machine, each sampling different noise: with the group the plan is the same on both
    script = textwrap.dedent(
        """
        import json, os, torch, torch.distributed as dist, meancache
        from meancache.flows import GaussianMixtureFlow, shifted_sigmas
        from meancache.online import OnlinePlan
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        flow = GaussianMixtureFlow(dim=16, components=6, seed=0)
        x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
        plan = OnlinePlan(12, 40, 0.02, group=dist.group.WORLD)  # the ranks share one trajectory
        meancache.sample(flow, x0, shifted_sigmas(40).tolist(), plan)
        alone = OnlinePlan(12, 40, 0.02)  # no group: an independent request, no collective call
        meancache.sample(flow, x0, shifted_sigmas(40).tolist(), alone)
        print(json.dumps({"rank": rank, "steps": plan.schedule().compute_steps, "measures": plan.instability,
                          "alone": alone.instability}))
        dist.destroy_process_group()
        """
    )
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["steps"] == results[1]["steps"]
    assert len(results[0]["steps"]) <= 12
    # the ranks measured different trajectories, so the agreement comes from the all-reduce over the group
    assert results[0]["measures"] == results[1]["measures"]
    # without a group each rank decides alone (data-parallel requests must not couple)
    assert results[0]["alone"] != results[1]["alone"]

    # without the process group, the same two inputs lead to different plans
    plans = []
    for rank in range(2):
        flow = GaussianMixtureFlow(dim=16, components=6, seed=0)
        x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
        plan = OnlinePlan(12, 40, 0.02)
        meancache.sample(flow, x0, shifted_sigmas(40).tolist(), plan)
        plans.append(plan.instability)
    assert plans[0] != plans[1]
