"""The calibration-free online mode: within budget, sensible, and identical decisions across ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import tiny_pipelines
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
    assert s.transformer_calls == s.computed_steps * info["calls_per_step"]
    assert s.schedule is not None and s.schedule.budget == s.computed_steps
    with pytest.raises(ValueError, match="mode='fast'"):
        meancache.accelerate(tiny_pipelines.build("flux")[0], budget=6, mode="fast")
    with pytest.raises(ValueError, match="pass budget=, not schedule="):
        meancache.accelerate(tiny_pipelines.build("flux")[0], schedule=meancache.Schedule.full(8), mode="online")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_take_identical_decisions():
    # two gloo ranks on this machine, each sampling different noise: the plan must be the same on both
    script = textwrap.dedent(
        """
        import json, os, torch, torch.distributed as dist, meancache
        from meancache.flows import GaussianMixtureFlow, shifted_sigmas
        from meancache.online import OnlinePlan
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        flow = GaussianMixtureFlow(dim=16, components=6, seed=0)
        x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
        plan = OnlinePlan(12, 40, 0.02)
        meancache.sample(flow, x0, shifted_sigmas(40).tolist(), plan)
        print(json.dumps({"rank": rank, "steps": plan.schedule().compute_steps, "measures": plan.instability}))
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
    # the ranks measured different trajectories, so the agreement comes from the all-reduce
    assert results[0]["measures"] == results[1]["measures"]

    # without the process group, the same two inputs lead to different plans
    plans = []
    for rank in range(2):
        flow = GaussianMixtureFlow(dim=16, components=6, seed=0)
        x0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
        plan = OnlinePlan(12, 40, 0.02)
        meancache.sample(flow, x0, shifted_sigmas(40).tolist(), plan)
        plans.append(plan.instability)
    assert plans[0] != plans[1]
