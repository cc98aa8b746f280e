"""meancache.accelerate(pipe) on real diffusers pipelines built from tiny configurations (no downloads).

The reference is an independent loop: the same, never-accelerated pipeline with a scheduler that applies the
published rule with its full history (tests/restatement.py) on the guided velocity the pipeline hands it. That
pipeline still runs the transformer on every step; the rule ignores the velocity of skipped steps, as the official
release's would be never computed.
"""

from __future__ import annotations

import copy
import logging

import pytest
import restatement
from meancache.examples import tiny_pipelines
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from fields import rel_err

import meancache
from meancache import Schedule

N = 8
SCHEDULE = Schedule([0, 1, 4, 7], [0, 3, 2], N)  # a chain, a K=3 segment and a K=2 segment


class OfficialRuleScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler scheduler that replaces the velocity of skipped steps by the official estimate (full history)."""

    def use_schedule(self, schedule):
        self._rule = restatement.expand_official(list(schedule.compute_steps), list(schedule.orders), N)
        self._log = []
        return self

    def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigmas = [float(s) for s in self.sigmas]
        i = self.step_index
        compute, k_at = self._rule
        v = model_output.to(torch.float32) if compute[i] else restatement._estimate_from_log(self._log, sigmas, i, k_at[i])
        x = sample.to(torch.float32)
        x_next = x + (sigmas[i + 1] - sigmas[i]) * v
        self._log.append({"x_pre": x, "x_post": x_next.clone(), "v": v})
        self._step_index += 1
        x_next = x_next.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=x_next) if return_dict else (x_next,)


def _counting(pipe):
    counts = {"calls": 0}
    handles = []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            handles.append(module.register_forward_pre_hook(lambda *a: counts.__setitem__("calls", counts["calls"] + 1)))
    return counts, handles


def _latents(pipe, kw, info):
    return getattr(pipe(**kw), info["output_attr"])


def _official(name, schedule=SCHEDULE, cfg=True):
    pipe, kw, info = tiny_pipelines.build(name)
    if not cfg:
        kw = tiny_pipelines.without_cfg(name, kw)
    pipe.scheduler = OfficialRuleScheduler.from_config(pipe.scheduler.config).use_schedule(schedule)
    return _latents(pipe, kw, info)


@pytest.mark.parametrize("name", tiny_pipelines.PIPELINES)
def test_matches_independent_loop_and_counts_calls(name):
    expected = _official(name)
    pipe, kw, info = tiny_pipelines.build(name)
    meancache.accelerate(pipe, schedule=SCHEDULE)
    counts, _ = _counting(pipe)
    out = _latents(pipe, kw, info)
    assert counts["calls"] == SCHEDULE.budget * info["calls_per_step"]
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) <= 1e-5
    s = meancache.summary(pipe)
    assert (s.computed_steps, s.skipped_steps, s.num_steps) == (SCHEDULE.budget, N - SCHEDULE.budget, N)
    assert s.model_calls == counts["calls"]
    assert s.calls_saved == (N - SCHEDULE.budget) * info["calls_per_step"]
    assert s.schedule == SCHEDULE and s.completed and s.wall_time_s > 0
    # and the cache really changed the result compared with the uncached pipeline
    plain, kw2, _ = tiny_pipelines.build(name)
    assert rel_err(out, _latents(plain, kw2, info)) > 1e-7


TAIL = Schedule([0, 1, 4], [0, 3, 2], N)  # an open tail: steps 5..7 estimated with K = 2, never evaluated


@pytest.mark.parametrize("name", tiny_pipelines.PIPELINES)
def test_open_tail_in_a_pipeline_matches_the_official_rule_per_step(name):
    """The last steps of an open tail run on the published estimate inside the pipeline too: the result equals a
    scheduler that applies the official estimate at each skipped step (the per-step rule read from the schedule,
    the tail included), with B transformer calls per branch."""
    pipe, kw, info = tiny_pipelines.build(name)
    rule = OfficialRuleScheduler.from_config(pipe.scheduler.config)
    rule._rule = ([p.computed for p in TAIL.expand()], [p.order for p in TAIL.expand()])
    rule._log = []
    pipe.scheduler = rule
    expected = _latents(pipe, kw, info)
    pipe, kw, info = tiny_pipelines.build(name)
    meancache.accelerate(pipe, schedule=TAIL)
    counts, _ = _counting(pipe)
    out = _latents(pipe, kw, info)
    assert counts["calls"] == TAIL.budget * info["calls_per_step"]
    assert rel_err(out, expected) <= 1e-5
    s = meancache.summary(pipe)
    assert (s.computed_steps, s.skipped_steps) == (3, N - 3) and s.completed and s.schedule == TAIL


@pytest.mark.parametrize("name", tiny_pipelines.PIPELINES)
def test_without_guidance(name):
    expected = _official(name, cfg=False)
    pipe, kw, info = tiny_pipelines.build(name)
    kw = tiny_pipelines.without_cfg(name, kw)
    meancache.accelerate(pipe, schedule=SCHEDULE)
    counts, _ = _counting(pipe)
    out = _latents(pipe, kw, info)
    assert counts["calls"] == SCHEDULE.budget * info["calls_per_step_without_cfg"]
    assert rel_err(out, expected) <= 1e-5


def test_schedule_resolution_preset_default_and_resampling(caplog):
    pipe, kw, info = tiny_pipelines.build("qwen-image")
    meancache.accelerate(pipe, budget=10)
    with caplog.at_level(logging.INFO, logger="meancache"):
        _latents(pipe, kw, info)
    # budget 10 of 8 steps: every step computed, said in the log
    assert "every step is computed" in caplog.text
    assert meancache.summary(pipe).schedule == Schedule.full(N)
    kw20 = tiny_pipelines.fresh_kwargs(dict(kw, num_inference_steps=20))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meancache"):
        _latents(pipe, kw20, info)
    assert "qwen-image preset (budget 10, 50 steps) resampled to this call's 20 steps" in caplog.text
    assert meancache.summary(pipe).schedule == Schedule.preset("qwen-image", 10, num_steps=20)
    meancache.disable(pipe)

    flux, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(flux, budget=5)
    _latents(flux, tiny_pipelines.fresh_kwargs(dict(kw, num_inference_steps=20)), info)
    assert meancache.summary(flux).schedule == Schedule.default(5, 20)
    meancache.disable(flux)
    meancache.accelerate(flux)
    _latents(flux, tiny_pipelines.fresh_kwargs(kw), info)
    assert meancache.summary(flux).schedule.budget == 3  # ceil(0.34 * 8)


def test_every_call_is_fresh_and_an_exception_leaves_nothing_stale():
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, schedule=SCHEDULE)
    first = _latents(pipe, kw, info)

    def boom(pipeline, i, t, callback_kwargs):
        if i == 3:
            raise KeyboardInterrupt("stop")
        return callback_kwargs

    with pytest.raises(KeyboardInterrupt):
        pipe(**kw, callback_on_step_end=boom)
    assert not meancache.summary(pipe).completed
    assert "step" not in pipe.scheduler.__dict__
    assert type(pipe.__dict__["transformer"]).__name__ != "_TransformerStandIn"
    kw_again = tiny_pipelines.fresh_kwargs(kw, 0)
    assert torch.equal(_latents(pipe, kw_again, info), first)


def test_two_pipelines_do_not_share_state():
    a, kw_a, info = tiny_pipelines.build("flux", seed=0)
    b, kw_b, _ = tiny_pipelines.build("qwen-image", seed=1)
    expected_a = _official("flux")
    plain_b, kw_plain_b, info_b = tiny_pipelines.build("qwen-image", seed=1)
    expected_b = _latents(plain_b, kw_plain_b, info_b)
    meancache.accelerate(a, schedule=SCHEDULE)
    meancache.accelerate(b, schedule=Schedule.full(N))
    # interleave the calls: each pipeline must see only its own state
    out_b = _latents(b, tiny_pipelines.fresh_kwargs(kw_b, 1), info_b)
    out_a = _latents(a, tiny_pipelines.fresh_kwargs(kw_a, 0), info)
    out_b2 = _latents(b, tiny_pipelines.fresh_kwargs(kw_b, 1), info_b)
    assert torch.equal(out_b, expected_b) and torch.equal(out_b2, expected_b)  # the full schedule changes nothing
    assert rel_err(out_a, expected_a) <= 1e-5
    assert meancache.summary(a).skipped_steps == N - SCHEDULE.budget
    assert meancache.summary(b).skipped_steps == 0


def _initial_latents(name, kw):
    """The x_0 the pipeline hands the scheduler at step 0, from a never-accelerated twin."""
    twin, _, info = tiny_pipelines.build(name)
    seen = []
    original = twin.scheduler.step

    def step(model_output, timestep, sample, *a, **k):
        seen.append(sample.clone())
        return original(model_output, timestep, sample, *a, **k)

    twin.scheduler.step = step
    _latents(twin, kw, info)
    return seen[0]


def test_batch_and_images_per_prompt_are_independent():
    pipe, kw, info = tiny_pipelines.build("flux")
    kw2 = dict(kw, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5))
    x0 = _initial_latents("flux", kw2)
    assert x0.shape[0] == 2
    meancache.accelerate(pipe, schedule=SCHEDULE)
    both = _latents(pipe, dict(kw2, latents=x0), info)
    for j in range(2):
        alone = _latents(pipe, dict(kw, num_images_per_prompt=1, latents=x0[j : j + 1]), info)
        torch.testing.assert_close(both[j : j + 1], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_disable_restores_bit_identical_behaviour():
    pipe, kw, info = tiny_pipelines.build("qwen-image")
    twin, kw_twin, _ = tiny_pipelines.build("qwen-image")
    cls = type(pipe)
    meancache.accelerate(pipe, schedule=SCHEDULE)
    assert type(pipe) is not cls and isinstance(pipe, cls)
    with pytest.raises(RuntimeError, match="already accelerated"):
        meancache.accelerate(pipe, budget=4)
    cached = _latents(pipe, kw, info)
    meancache.disable(pipe)
    assert type(pipe) is cls and "_meancache" not in pipe.__dict__
    kw = dict(kw, generator=torch.Generator().manual_seed(0))
    restored = _latents(pipe, kw, info)
    assert torch.equal(restored, _latents(twin, kw_twin, info))
    assert not torch.equal(cached, restored)


def test_compiled_transformer_keeps_working():
    pipe, kw, info = tiny_pipelines.build("flux")
    expected = _official("flux")
    pipe.transformer.compile(fullgraph=True, backend="aot_eager")
    meancache.accelerate(pipe, schedule=SCHEDULE)
    out = _latents(pipe, kw, info)
    assert rel_err(out, expected) <= 1e-5


def test_bad_pipelines_and_arguments_are_rejected():
    from diffusers import DDIMScheduler

    pipe, kw, info = tiny_pipelines.build("flux")
    bad = copy.copy(pipe)
    bad.__dict__["scheduler"] = DDIMScheduler()
    with pytest.raises(ValueError, match="pipe.scheduler is a DDIMScheduler: .*FlowMatchEulerDiscreteScheduler"):
        meancache.accelerate(bad, budget=4)
    with pytest.raises(ValueError, match=r"\['sigmas'\] apply to accelerate\(module\) only"):
        meancache.accelerate(pipe, budget=4, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="budget=1"):
        meancache.accelerate(pipe, budget=1)
    with pytest.raises(ValueError, match="budget=5 contradicts schedule.budget=4"):
        meancache.accelerate(pipe, budget=5, schedule=SCHEDULE)
    assert "_meancache" not in pipe.__dict__
    with pytest.raises(ValueError, match="is not accelerated by meancache"):
        meancache.summary(pipe)
