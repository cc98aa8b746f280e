"""meancache.accelerate(module) inside a hand-written Euler loop, against meancache.sample and the restatement."""

from __future__ import annotations

import logging

import pytest
import restatement
import torch
from fields import SmoothField
from fields import rel_err

import meancache
from meancache.plans import default_budget
from meancache import Schedule
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas

N = 50
SIGMAS = shifted_sigmas(N, shift=3.0).tolist()
DIM = 16
GUIDANCE = 4.0


class FlowModel(torch.nn.Module):
    """A 'transformer' whose output is an analytic velocity; ``cond`` selects the guidance branch."""

    def __init__(self, out: str = "tensor"):
        super().__init__()
        self.cond_field = GaussianMixtureFlow(dim=DIM, components=5, seed=0)
        self.uncond_field = GaussianMixtureFlow(dim=DIM, components=5, seed=1)
        self.out = out
        self.calls = 0

    def forward(self, hidden_states, timestep, cond=True):
        self.calls += 1
        sigma = float(timestep.reshape(-1)[0]) / 1000.0
        v = (self.cond_field if cond else self.uncond_field)(hidden_states, sigma)
        if self.out == "tuple":
            return (v, "extra")
        if self.out == "dict":
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=v)
        return v


def _noise(seed=0, shape=(3, 4, DIM)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _t(sigma, x):
    return torch.full((x.shape[0],), 1000.0 * sigma, dtype=torch.float64)


def euler_loop(model, x, sigmas=SIGMAS, guidance=None, stop_at=None, order=("cond", "uncond")):
    """The caller's own loop: one call per step, or a cond and an uncond call combined with CFG."""
    for i in range(len(sigmas) - 1):
        if stop_at is not None and i == stop_at:
            return x
        t = _t(sigmas[i], x)
        if guidance is None:
            v = model(x, t)
        else:
            out = {name: model(x, t, cond=(name == "cond")) for name in order}
            v = out["uncond"] + guidance * (out["cond"] - out["uncond"])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def guided(model, guidance=GUIDANCE):
    def velocity(x, sigma):
        u = model.uncond_field(x, sigma)
        return u + guidance * (model.cond_field(x, sigma) - u)

    return velocity


def guided_module_run(schedule, seed):
    """``(out, expected)``: the caller's CFG loop on a fresh :class:`FlowModel` accelerated with ``schedule``, and
    :func:`meancache.sample` of the guided velocity; checks that each computed step called both branches once."""
    model = FlowModel()
    x0 = _noise(seed)
    expected = meancache.sample(guided(model), x0, SIGMAS, schedule)
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    out = euler_loop(model, x0, guidance=GUIDANCE)
    assert model.calls == 2 * schedule.budget
    return out, expected


@pytest.mark.parametrize("name,budget", [("qwen-image", 10), ("z-image", 20), ("qwen-image-2512", 17)])
def test_single_branch_matches_sample_and_official_loop(name, budget):
    schedule = Schedule.preset(name, budget)
    model = FlowModel()
    x0 = _noise(budget)
    expected = meancache.sample(model.cond_field, x0, SIGMAS, schedule)
    official = restatement.official_loop(
        model.cond_field, x0, SIGMAS, list(schedule.compute_steps), list(schedule.orders)
    )
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    out = euler_loop(model, x0)
    assert model.calls == budget
    assert model.meancache.stats.model_calls == budget
    assert model.meancache.stats.calls_saved == N - budget
    assert rel_err(out, expected) <= 1e-12
    assert rel_err(out, official) <= 1e-12


def _guided_and_accelerated(seed, schedule):
    """A fresh FlowModel, noise of ``seed``, ``sample`` on the guided velocity (the expectation), then the model
    accelerated with ``schedule`` for the caller's own guided loop."""
    model = FlowModel()
    x0 = _noise(seed)
    expected = meancache.sample(guided(model), x0, SIGMAS, schedule)
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    return model, x0, expected


def test_two_branch_guidance_matches_sample_on_guided_velocity():
    schedule = Schedule.preset("qwen-image", 10)
    model, x0, expected = _guided_and_accelerated(1, schedule)
    out = euler_loop(model, x0, guidance=GUIDANCE)
    assert model.calls == 2 * schedule.budget
    assert model.meancache.stats.branches == 2
    # CFG is linear, so per-branch estimates combine into the estimate on the guided velocity (up to rounding)
    assert rel_err(out, expected) <= 1e-12
    # and the branches really do differ, so keeping them apart matters
    uncached = meancache.sample(guided(model), x0, SIGMAS, Schedule.full(N))
    assert rel_err(out, uncached) > 1e-4


@pytest.mark.parametrize("estimator", ["meancache", "extrapolate", "predict"])
def test_open_tail_on_a_module_matches_sample(estimator):
    """A schedule whose last steps are an open tail: the module estimates them on every guidance branch, as
    sample() does on the guided velocity, and never calls the model there."""
    steps = [0, 1, 3, 6, 10, 15, 21, 28, 36, 44]  # 44 < N - 1: steps 45..49 are the tail
    names = ["meancache", "meancache"] + [estimator] * 8
    schedule = Schedule(steps, [0] + [2] * 9, N, names)
    assert schedule.open_tail
    model, x0, expected = _guided_and_accelerated(3, schedule)
    out = euler_loop(model, x0, guidance=GUIDANCE)
    assert model.calls == 2 * schedule.budget
    assert model.meancache.stats.calls_saved == 2 * (N - schedule.budget) and model.meancache.stats.completed
    assert rel_err(out, expected) <= 1e-12


def test_branch_fn_names_branches_whatever_the_call_order():
    schedule = Schedule.preset("z-image", 13)
    model = FlowModel()
    x0 = _noise(2)
    expected = meancache.sample(guided(model), x0, SIGMAS, schedule)
    meancache.accelerate(model, schedule, sigmas=SIGMAS, branch_fn=lambda args, kwargs: kwargs["cond"])
    # alternate the call order every step: call order alone would mix the branches up
    x = x0
    for i in range(N):
        t = _t(SIGMAS[i], x)
        names = ("cond", "uncond") if i % 2 == 0 else ("uncond", "cond")
        out = {n: model(x, t, cond=(n == "cond")) for n in names}
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * (out["uncond"] + GUIDANCE * (out["cond"] - out["uncond"]))
    assert rel_err(x, expected) <= 1e-12


def test_restarts_by_itself_and_after_an_aborted_run():
    schedule = Schedule.preset("qwen-image", 17)
    model = FlowModel()
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    first = euler_loop(model, _noise(3), guidance=GUIDANCE)
    second = euler_loop(model, _noise(3), guidance=GUIDANCE)
    assert torch.equal(first, second)
    euler_loop(model, _noise(4), guidance=GUIDANCE, stop_at=23)  # interrupted mid-way
    third = euler_loop(model, _noise(3), guidance=GUIDANCE)
    assert torch.equal(first, third)


def test_reset_requires_a_new_trajectory():
    model = FlowModel()
    meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    x = _noise()
    model(x, _t(SIGMAS[0], x))
    model(x, _t(SIGMAS[1], x))
    meancache.reset(model)
    with pytest.raises(ValueError, match=r"sigma=.* not on the grid .* before the first step"):
        model(x, _t(SIGMAS[2], x))
    model(x, _t(SIGMAS[0], x))  # a restart is always accepted
    assert model.meancache.stats.steps == 1


def test_exception_in_model_leaves_no_stale_state():
    model, x0, clean = _guided_and_accelerated(5, Schedule.preset("qwen-image", 10))
    original_cond = model.cond_field
    boom = {"at": 7}

    class Exploding:
        def __call__(self, x, sigma):
            if abs(sigma - SIGMAS[boom["at"]]) < 1e-12:
                raise RuntimeError("interrupted")
            return original_cond(x, sigma)

    model.cond_field = Exploding()
    with pytest.raises(RuntimeError, match="interrupted"):
        euler_loop(model, x0, guidance=GUIDANCE)
    model.cond_field = original_cond
    assert model.meancache._step == -1
    assert not model.meancache._traj.branches  # a fresh trajectory: no branch, no logged step
    assert rel_err(euler_loop(model, x0, guidance=GUIDANCE), clean) <= 1e-12


def test_off_grid_sigma_raises_and_resets():
    model = FlowModel()
    meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    x = _noise()
    model(x, _t(SIGMAS[0], x))
    with pytest.raises(ValueError, match=r"sigma=0\.5.*expected the same step, the next one"):
        model(x, _t(0.5, x))
    assert model.meancache._step == -1


def test_second_accelerate_raises_and_disable_restores_bit_identical():
    twin = FlowModel()
    model = FlowModel()
    x = _noise(6)
    meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    with pytest.raises(RuntimeError, match="already accelerated"):
        meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    accelerated = euler_loop(model, x)
    assert meancache.disable(model) is model
    assert "forward" not in model.__dict__ and not hasattr(model, "meancache")
    restored = euler_loop(model, x)
    reference = euler_loop(twin, x)
    assert torch.equal(restored, reference)
    assert not torch.equal(accelerated, reference)
    meancache.disable(model)  # idempotent
    meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)  # allowed again
    assert torch.equal(euler_loop(model, x), accelerated)


def test_disable_restores_an_instance_level_forward():
    model = FlowModel()
    marker = []

    def own_forward(hidden_states, timestep, cond=True):
        marker.append(1)
        return FlowModel.forward(model, hidden_states, timestep, cond)

    model.forward = own_forward
    meancache.accelerate(model, budget=10, sigmas=SIGMAS)
    meancache.disable(model)
    assert model.__dict__["forward"] is own_forward


def test_other_instances_are_untouched():
    a, b = FlowModel(), FlowModel()
    meancache.accelerate(a, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    assert "forward" not in b.__dict__ and not hasattr(b, "meancache")
    x = _noise(7)
    euler_loop(b, x)
    assert b.calls == N


@pytest.mark.parametrize("out", ["tuple", "dict"])
def test_output_structure_is_kept_on_skipped_steps(out):
    schedule = Schedule.preset("qwen-image", 10)
    model = FlowModel(out=out)
    x0 = _noise(8)
    expected = meancache.sample(model.cond_field, x0, SIGMAS, schedule)
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    x = x0
    for i in range(N):
        res = model(x, _t(SIGMAS[i], x))
        if out == "tuple":
            assert isinstance(res, tuple) and res[1] == "extra"
            v = res[0]
        else:
            assert type(res).__name__ == "Transformer2DModelOutput"
            v = res.sample
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    assert rel_err(x, expected) <= 1e-12


def test_negated_velocity_and_custom_sigma_fn():
    """Z-Image style: the model takes t = 1 - sigma and predicts -dx/dsigma."""
    field = SmoothField(DIM, seed=3)

    class Reversed(torch.nn.Module):
        def forward(self, x, t):
            return -field(x, 1.0 - t)

    schedule = Schedule.preset("z-image", 15)
    x0 = _noise(9)
    expected = meancache.sample(field, x0, SIGMAS, schedule)
    model = meancache.accelerate(
        Reversed(), schedule, sigmas=SIGMAS, sigma_fn=lambda x, t: 1.0 - t, output_sign=-1
    )
    x = x0
    for i in range(N):
        x = x - (SIGMAS[i + 1] - SIGMAS[i]) * model(x, 1.0 - SIGMAS[i])
    assert rel_err(x, expected) <= 1e-12


def test_low_precision_model_output_dtype_is_kept():
    schedule = Schedule.preset("qwen-image", 10)
    model = FlowModel()
    meancache.accelerate(model, schedule, sigmas=SIGMAS)
    x = _noise(10).to(torch.bfloat16)
    for i in range(N):
        v = model(x, _t(SIGMAS[i], x))
        assert v.dtype == torch.bfloat16
        x = (x.float() + (SIGMAS[i + 1] - SIGMAS[i]) * v.float()).to(torch.bfloat16)
    ring = model.meancache._traj.branches[0].history
    assert ring.xs.dtype == torch.float32 and len(ring) <= 6
    expected = meancache.sample(model.cond_field, _noise(10).to(torch.bfloat16), SIGMAS, schedule)
    assert rel_err(x, expected) <= 2e-2


def test_schedule_resampled_to_grid_with_a_log_line(caplog):
    model = FlowModel()
    sigmas = shifted_sigmas(28).tolist()
    with caplog.at_level(logging.INFO, logger="meancache"):
        meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=sigmas)
    assert "resampling the schedule" in caplog.text
    assert model.meancache.schedule == Schedule.preset("qwen-image", 10, num_steps=28)
    euler_loop(model, _noise(), sigmas=sigmas)
    assert model.calls == 10


def test_budget_uses_default_schedule_and_set_sigmas_changes_grid():
    model = FlowModel()
    meancache.accelerate(model, budget=8, sigmas=SIGMAS)
    assert model.meancache.schedule == Schedule.default(8, N)
    grid = shifted_sigmas(20).tolist()
    model.meancache.set_sigmas(grid)
    euler_loop(model, _noise(), sigmas=grid)
    assert model.calls == 8 and model.meancache.stats.steps == 20


def test_history_memory_is_bounded():
    model = FlowModel()
    meancache.accelerate(model, Schedule.preset("qwen-image", 25), sigmas=SIGMAS)
    euler_loop(model, _noise(), guidance=GUIDANCE)
    per_ring = 2 * model.meancache.schedule.window * _noise().numel() * 8
    assert model.meancache.stats.history_bytes == 2 * per_ring


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_arguments_rejected_before_patching():
    model = FlowModel()
    with pytest.raises(ValueError, match="sigmas=None"):
        meancache.accelerate(model, budget=10)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['budgte'\]"):
        meancache.accelerate(model, budgte=10, sigmas=SIGMAS)
    with pytest.raises(ValueError, match="budget=12 contradicts schedule.budget=10"):
        meancache.accelerate(model, Schedule.preset("qwen-image", 10), budget=12, sigmas=SIGMAS)
    with pytest.raises(ValueError, match="output_sign=2"):
        meancache.accelerate(model, budget=10, sigmas=SIGMAS, output_sign=2)
    with pytest.raises(ValueError, match="timestep_scale=0"):
        meancache.accelerate(model, budget=10, sigmas=SIGMAS, timestep_scale=0)
    with pytest.raises(ValueError, match="latent_arg='latents' is not a parameter"):
        meancache.accelerate(model, budget=10, sigmas=SIGMAS, latent_arg="latents")
    with pytest.raises(ValueError, match="timestep_arg='t' is not a parameter"):
        meancache.accelerate(model, budget=10, sigmas=SIGMAS, timestep_arg="t")
    with pytest.raises(ValueError, match=r"sigmas are all 0.0"):
        meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=torch.zeros(51))
    with pytest.raises(ValueError, match=r"sigmas\[2\] == sigmas\[3\] = 0.5: .* must be distinct"):
        meancache.accelerate(model, budget=3, sigmas=[1.0, 0.75, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="model is a str"):
        meancache.accelerate("transformer", budget=10, sigmas=SIGMAS)
    assert "forward" not in model.__dict__ and not hasattr(model, "meancache")
    with pytest.raises(ValueError, match="is not accelerated"):
        meancache.reset(model)


def test_bad_calls_rejected():
    model = FlowModel()
    meancache.accelerate(model, Schedule.preset("qwen-image", 10), sigmas=SIGMAS)
    x = _noise()
    t = _t(SIGMAS[0], x)
    t[1] = 500.0
    with pytest.raises(ValueError, match="different values .* across the batch"):
        model(x, t)
    with pytest.raises(ValueError, match="latent argument 'hidden_states' dtype=torch.int64"):
        model(torch.zeros(3, DIM, dtype=torch.int64), _t(SIGMAS[0], x))
    # two calls at step 0, then a third call at step 1: steps must keep the same number of calls
    model(x, _t(SIGMAS[0], x))
    model(x, _t(SIGMAS[0], x), cond=False)
    model(x, _t(SIGMAS[1], x))
    model(x, _t(SIGMAS[1], x), cond=False)
    with pytest.raises(ValueError, match="call 3 at step 1 .* step 0 made 2 call"):
        model(x, _t(SIGMAS[1], x))


def test_without_budget_or_schedule_a_module_gets_the_default_budget_like_a_pipeline():
    # the bare-module path used to raise here while pipelines fell back to about a third of the steps
    model = meancache.accelerate(FlowModel(), sigmas=SIGMAS)
    assert model.meancache.schedule == Schedule.default(default_budget(N), N)
    assert default_budget(N) == 17


def test_a_module_of_a_preset_family_gets_the_published_preset():
    class QwenImageTransformer2DModel(FlowModel):
        pass

    model = meancache.accelerate(QwenImageTransformer2DModel(), budget=10, sigmas=SIGMAS)
    assert model.meancache.schedule == Schedule.preset("qwen-image", 10)


def test_summary_works_on_a_module_and_on_a_pipeline_alike():
    model = meancache.accelerate(FlowModel(), budget=10, sigmas=SIGMAS)
    x = _noise()
    for i in range(N):
        v = model(x, _t(SIGMAS[i], x))
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    s = meancache.summary(model)
    assert isinstance(s, meancache.Stats) and s is model.meancache.stats
    assert (s.model_calls, s.calls_saved, s.computed_steps, s.skipped_steps) == (10, 40, 10, 40)
    with pytest.warns(DeprecationWarning, match="skipped_calls is deprecated"):
        assert s.skipped_calls == 40

