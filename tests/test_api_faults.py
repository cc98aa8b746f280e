"""Faults found by probing the public API (issue 10, part 2), each pinned by a test that failed before its fix.

Pipelines: concurrent calls (1), save_pretrained/pickle/deepcopy (4), fewer steps than the schedule can express (5),
SD3 skip-layer guidance (6), latents edited by a step-end callback (7). Modules: deepcopy and pickle (3), one-step
grids (5). Online mode with non-finite velocities (10). Sigma grids on the meta device (11).
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import threading

import pytest
from meancache.examples import tiny_pipelines
import torch
from fields import rel_err
from test_pipeline import OfficialRuleScheduler

import meancache
from meancache import Schedule
from meancache.online import OnlinePlan

N = tiny_pipelines.NUM_INFERENCE_STEPS
SCHEDULE = Schedule([0, 1, 4, 7], [0, 3, 2], N)


def _latents(pipe, kw, info):
    return getattr(pipe(**kw), info["output_attr"])


def _assert_clean(pipe):
    """No hook left behind: the scheduler's class step and the real transformer module."""
    assert "step" not in pipe.scheduler.__dict__
    assert isinstance(pipe.__dict__["transformer"], torch.nn.Module)
    assert type(pipe.__dict__["transformer"]).__name__ != "_TransformerStandIn"


# -- 1. concurrent calls ---------------------------------------------------------------------------------------------


def test_a_second_concurrent_call_is_refused_and_the_running_call_stays_correct():
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, schedule=SCHEDULE)
    expected = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)

    entered, release = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        assert release.wait(20), "the test never released the first call"

    handle = pipe.transformer.register_forward_pre_hook(hold)
    results, errors = {}, []

    def first():
        try:
            results["first"] = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert entered.wait(20)
        with pytest.raises(RuntimeError, match="already running a call"):
            pipe(**tiny_pipelines.fresh_kwargs(kw))
        with pytest.raises(RuntimeError, match="running a call"):
            meancache.disable(pipe)
    finally:
        release.set()
        worker.join(30)
        handle.remove()
    assert not worker.is_alive() and not errors
    assert torch.equal(results["first"], expected)
    _assert_clean(pipe)
    assert meancache.summary(pipe).completed
    meancache.disable(pipe)
    _assert_clean(pipe)
    assert "_meancache" not in pipe.__dict__


def test_two_pipelines_in_two_threads_keep_working():
    pipes = [tiny_pipelines.build(name, seed=s) for name, s in (("flux", 0), ("qwen-image", 1))]
    expected = []
    for pipe, kw, info in pipes:
        meancache.accelerate(pipe, schedule=SCHEDULE)
        expected.append(_latents(pipe, tiny_pipelines.fresh_kwargs(kw, info["seed"]), info))
    outputs = [[] for _ in pipes]

    def work(j):
        pipe, kw, info = pipes[j]
        for _ in range(3):
            outputs[j].append(_latents(pipe, tiny_pipelines.fresh_kwargs(kw, info["seed"]), info))

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(pipes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for j, (pipe, _, _) in enumerate(pipes):
        assert len(outputs[j]) == 3 and all(torch.equal(o, expected[j]) for o in outputs[j])
        _assert_clean(pipe)


def test_pipelines_sharing_one_scheduler_cannot_run_at_the_same_time():
    pipe, kw, info = tiny_pipelines.build("flux")
    twin = copy.copy(pipe)  # shares the scheduler and transformer objects
    meancache.accelerate(pipe, schedule=SCHEDULE)
    meancache.accelerate(twin, schedule=SCHEDULE)
    seen = []

    def nested(p, i, t, callback_kwargs):
        if i == 1 and not seen:
            with pytest.raises(RuntimeError, match="scheduler is in use by another accelerated call"):
                twin(**tiny_pipelines.fresh_kwargs(kw))
            seen.append(i)
        return callback_kwargs

    out = _latents(pipe, dict(tiny_pipelines.fresh_kwargs(kw), callback_on_step_end=nested), info)
    assert seen == [1]
    assert torch.equal(out, _latents(twin, tiny_pipelines.fresh_kwargs(kw), info))
    _assert_clean(pipe)


# -- 4. save_pretrained, pickle and deepcopy of a pipeline -----------------------------------------------------------


def test_saved_config_names_the_original_class(tmp_path):
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, schedule=SCHEDULE)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert json.loads(pipe.to_json_string())["_class_name"] == "FluxPipeline"


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickled_or_copied_pipeline_is_accelerated_with_its_own_state(how):
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, schedule=SCHEDULE)
    expected = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    other = pickle.loads(pickle.dumps(pipe)) if how == "pickle" else copy.deepcopy(pipe)
    assert type(other).__name__ == "FluxPipeline"
    assert other.__dict__["_meancache"] is not pipe.__dict__["_meancache"]
    assert torch.equal(_latents(other, tiny_pipelines.fresh_kwargs(kw), info), expected)
    assert meancache.summary(other).skipped_steps == N - SCHEDULE.budget
    meancache.disable(other)
    from diffusers import FluxPipeline

    assert type(other) is FluxPipeline


# -- 5. fewer steps than the schedule can express --------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", [dict(schedule=SCHEDULE), dict(budget=4), dict(budget=4, mode="online"), dict(mode="online")]
)
@pytest.mark.parametrize("steps", [1, 2])
def test_one_or_two_steps_compute_every_step(how, steps, caplog):
    plain, kw, info = tiny_pipelines.build("flux")
    kw = dict(kw, num_inference_steps=steps)
    expected = _latents(plain, tiny_pipelines.fresh_kwargs(kw), info)
    pipe, _, _ = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, **how)
    with caplog.at_level(logging.INFO, logger="meancache"):
        out = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    assert torch.equal(out, expected)
    assert "every step is computed" in caplog.text
    s = meancache.summary(pipe)
    assert (s.computed_steps, s.skipped_steps, s.model_calls) == (steps, 0, steps)


def test_module_with_a_one_step_grid_computes_it(caplog):
    class Flow(torch.nn.Module):
        def forward(self, x, timestep):
            return x - 1.0

    with caplog.at_level(logging.INFO, logger="meancache"):
        model = meancache.accelerate(Flow(), budget=5, sigmas=[1.0, 0.0])
    x = torch.randn(3)
    assert torch.equal(model(x, timestep=1000.0), x - 1.0)
    assert model.meancache.stats.model_calls == 1
    assert "every step is computed" in caplog.text
    online = meancache.accelerate(Flow(), mode="online", budget=3, sigmas=[1.0, 0.0])
    assert torch.equal(online(x, timestep=1000.0), x - 1.0)


# -- 6. SD3 skip-layer guidance --------------------------------------------------------------------------------------


def test_sd3_skip_layer_guidance_skips_every_call_of_a_skipped_step():
    # step 1 is skipped and is the step where SD3's skip-layer guidance makes its extra call (0.01 N < i < 0.2 N)
    schedule = Schedule([0, 4, 7], [1, 2], N)
    plain, kw, info = tiny_pipelines.build("sd3")
    kw = dict(kw, skip_guidance_layers=[1])
    calls, _, _ = tiny_pipelines.trace_calls(plain, tiny_pipelines.fresh_kwargs(kw))
    assert len(calls) == N + 1  # the extra call exists

    reference, _, _ = tiny_pipelines.build("sd3")
    reference.scheduler = OfficialRuleScheduler.from_config(reference.scheduler.config).use_schedule(schedule)
    expected = _latents(reference, tiny_pipelines.fresh_kwargs(kw), info)

    pipe, _, _ = tiny_pipelines.build("sd3")
    meancache.accelerate(pipe, schedule=schedule)
    out = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    s = meancache.summary(pipe)
    assert s.model_calls == schedule.budget and s.calls_saved == N + 1 - schedule.budget
    assert rel_err(out, expected) <= 1e-5


# -- 7. a callback that edits the latents ----------------------------------------------------------------------------


def _edit_run(edit, accelerated, steps=20, budget=8):
    pipe, kw, info = tiny_pipelines.build("flux")
    kw = dict(kw, num_inference_steps=steps)
    if accelerated:
        meancache.accelerate(pipe, budget=budget)

    def callback(p, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if edit == "halve" and i == 6:
            latents = latents * 0.5
        elif edit == "blend" and i % 3 == 0:
            latents = 0.9 * latents + 0.1
        elif edit == "clamp_in_place":
            latents.clamp_(-0.8, 0.8)
        return {"latents": latents}

    out = _latents(pipe, dict(kw, callback_on_step_end=callback if edit else None), info)
    return out, (meancache.summary(pipe) if accelerated else None)


@pytest.mark.parametrize("edit", ["halve", "blend", "clamp_in_place"])
def test_latents_edited_by_a_callback_keep_the_usual_error(edit):
    # the usual error of this cached run (budget 8 of 20 steps) against the uncached one, without any edit
    usual = rel_err(_edit_run(None, True)[0], _edit_run(None, False)[0])
    cached, summary = _edit_run(edit, True)
    uncached, _ = _edit_run(edit, False)
    assert summary.latent_edits > 0 and summary.model_calls == 8
    # Measured: usual 0.0105; with the edit 0.022-0.026 (before the re-anchoring: halve 0.113, blend 0.308). The
    # edited trajectories differ from the unedited one, so allow 3x the usual error, far below the unhandled case.
    assert rel_err(cached, uncached) <= 3 * usual


def test_inference_mode_calls_work_and_see_edits_that_return_a_new_tensor():
    # inference tensors keep no version counter: the edit check must not read one
    with torch.inference_mode():
        plain, _ = _edit_run(None, True)
        edited, summary = _edit_run("halve", True)
    with torch.no_grad():
        expected, _ = _edit_run(None, True)
        expected_edit, _ = _edit_run("halve", True)
    assert torch.equal(plain, expected) and torch.equal(edited, expected_edit)
    assert summary.latent_edits == 1


def test_unedited_latents_are_not_counted_as_edits():
    _, summary = _edit_run(None, True)
    assert summary.latent_edits == 0


# -- 3. deepcopy and pickle of an accelerated module -----------------------------------------------------------------


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x, timestep):
        return x * self.w


def test_a_deep_copy_of_an_accelerated_module_runs_its_own_weights():
    sigmas = torch.linspace(1, 0, 11)
    model = meancache.accelerate(_Scaled(), budget=4, sigmas=sigmas)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.w.mul_(2.0)
    x = torch.ones(2, 4)
    assert torch.equal(model(x, timestep=1000 * sigmas[0]), x)
    assert torch.equal(twin(x, timestep=1000 * sigmas[0]), 2 * x)
    assert twin.meancache is not model.meancache
    assert twin.meancache.stats.model_calls == 1 and model.meancache.stats.model_calls == 1
    meancache.disable(twin)
    assert torch.equal(twin(x, timestep=0.0), 2 * x)


def test_pickling_an_accelerated_module_says_how():
    model = meancache.accelerate(_Scaled(), budget=4, sigmas=torch.linspace(1, 0, 11))
    with pytest.raises(TypeError, match=r"call meancache.disable\(model\) first"):
        pickle.dumps(model)
    meancache.disable(model)
    assert torch.equal(pickle.loads(pickle.dumps(model)).w, model.w)


# -- 10. online mode with a non-finite velocity ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_online_mode_follows_a_non_finite_velocity_like_the_uncached_run(bad):
    sigmas = torch.linspace(1, 0, 21)

    def velocity(x, sigma):
        v = x - 1.0
        return v * bad if sigma < 0.6 else v

    out = meancache.sample(velocity, torch.randn(2, 4), sigmas, OnlinePlan(8, 20))
    full = meancache.sample(velocity, torch.randn(2, 4), sigmas, Schedule.full(20))
    assert torch.isnan(out).all() == torch.isnan(full).all()
    assert not torch.isfinite(out).any()


# -- 11. sigmas on the meta device -----------------------------------------------------------------------------------


def test_meta_sigmas_get_a_clear_error():
    meta = torch.linspace(1, 0, 11, device="meta")
    with pytest.raises(ValueError, match="sigmas is on the meta device"):
        meancache.sample(lambda x, s: x, torch.randn(2), meta, Schedule.default(4, 10))
    with pytest.raises(ValueError, match="sigmas is on the meta device"):
        meancache.accelerate(_Scaled(), budget=4, sigmas=meta)
