"""Calibrating a schedule for a diffusers pipeline: record the uncached pipeline, search, run the result."""

from __future__ import annotations

import pytest
from meancache.examples import tiny_pipelines
import torch

import meancache
from meancache import Recording


def _inputs(kw, seeds):
    return [dict(generator=torch.Generator().manual_seed(s)) for s in seeds], {
        k: v for k, v in kw.items() if k != "generator"
    }


@pytest.mark.parametrize("name", ["flux", "qwen-image"])
def test_record_then_calibrate_a_pipeline(name, tmp_path):
    pipe, kw, info = tiny_pipelines.build(name)
    inputs, common = _inputs(dict(kw, num_inference_steps=12), seeds=[1, 2, 3])
    rec = meancache.record(pipe, inputs, progress=False, **common)
    assert rec.num_inputs == 3 and rec.num_steps == 12
    # the recording is the uncached run: its last latent is what the pipeline returns
    plain = getattr(pipe(**dict(common, generator=torch.Generator().manual_seed(2))), info["output_attr"])
    torch.testing.assert_close(rec.latents[1, -1], plain.float(), rtol=0, atol=0)
    assert rec.meta["pipeline"] == type(pipe).__name__

    rec.save(tmp_path / "rec.pt")
    schedules = meancache.calibrate(Recording.load(tmp_path / "rec.pt"), budget=[5, 7], max_len=6)
    assert [s.budget for s in schedules] == [5, 7] and all(s.num_steps == 12 for s in schedules)
    direct = meancache.calibrate(pipe, inputs=[dict(i) for i in _inputs(kw, [1, 2, 3])[0]], budget=5, max_len=6,
                                 progress=False, **common)
    assert direct == schedules[0]  # deterministic: same inputs, same schedule

    meancache.accelerate(pipe, schedule=schedules[0])
    out = getattr(pipe(**dict(common, generator=torch.Generator().manual_seed(9))), info["output_attr"])
    assert torch.isfinite(out).all()
    assert meancache.summary(pipe).computed_steps == 5
    with pytest.raises(ValueError, match="is accelerated by meancache: record the uncached pipeline"):
        meancache.record(pipe, inputs, progress=False, **common)


def test_pipeline_calibration_rejects_bad_arguments():
    pipe, kw, info = tiny_pipelines.build("flux")
    with pytest.raises(ValueError, match="sigmas given with a pipeline"):
        meancache.calibrate(pipe, ["a cat"], budget=4, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError, match="non-empty list of prompts or dicts"):
        meancache.calibrate(pipe, [], budget=4)
    with pytest.raises(ValueError, match=r"\['guidance_scale'\]: extra keyword arguments apply to pipeline"):
        meancache.calibrate(lambda x, s: x, torch.zeros(2, 3), budget=2, sigmas=[1.0, 0.5, 0.0], guidance_scale=2.0)


def test_a_pipeline_recording_streamed_to_disk(tmp_path):
    """Each input's rows go to the file once its run ends: the same recording as in memory, no part file left."""
    pipe, kw, _ = tiny_pipelines.build("flux")
    inputs, common = _inputs(dict(kw, num_inference_steps=8), seeds=[1, 2])
    held = meancache.record(pipe, inputs, progress=False, elements=50, **common)
    inputs, _ = _inputs(kw, seeds=[1, 2])
    streamed = meancache.record(pipe, inputs, progress=False, elements=50, out=tmp_path / "rec.pt", **common)
    assert torch.equal(streamed.latents, held.latents) and torch.equal(streamed.velocities, held.velocities)
    assert streamed.meta == held.meta and [p.name for p in tmp_path.iterdir()] == ["rec.pt"]
    assert torch.equal(Recording.load(tmp_path / "rec.pt").latents, held.latents)


def _relative(out, ref):
    d, r = (out.double() - ref.double()).flatten(), ref.double().flatten()
    return float(d.norm() / r.norm())


@pytest.mark.parametrize("elements", [None, 40])
def test_real_pipeline_runs_choose_and_refine(elements):
    """validate="runs" with a pipeline: every candidate is run for real from each input's recorded noise (its
    generator restored), and its score is the mean relative error of those runs against the uncached outputs;
    refine= scores its moves by such runs and never ends worse than its start. The pipeline is left as it was."""
    pipe, kw, info = tiny_pipelines.build("flux")
    seeds = [1, 2, 3, 4]
    inputs, common = _inputs(dict(kw, num_inference_steps=12), seeds=seeds)
    config = getattr(pipe, "_progress_bar_config", None)
    report = []
    got = meancache.calibrate(pipe, inputs, budget=6, validate="runs", refine=300, report=report,
                              elements=elements, progress=False, **common)
    entry = report[0]
    assert entry["measure"] == "runs" and got.budget == 6
    assert not meancache.api._accelerated(pipe) and getattr(pipe, "_progress_bar_config", None) == config

    def mean_error(schedule):
        errs = []
        for s in seeds:
            plain = getattr(pipe(**dict(common, generator=torch.Generator().manual_seed(s))), info["output_attr"])
            meancache.accelerate(pipe, schedule=schedule)
            try:
                fast = getattr(pipe(**dict(common, generator=torch.Generator().manual_seed(s))), info["output_attr"])
            finally:
                meancache.disable(pipe)
            errs.append(_relative(fast, plain))
        return sum(errs) / len(errs)

    if elements is None:  # on every element the score is exactly the mean error of independent accelerated runs
        for name in ("default", entry["chosen"]):
            if name in entry.get("stopped", {}):  # stopped once it could not win: its bound is below its score
                assert entry["scores"][name] is None
                assert entry["stopped"][name] <= mean_error(entry["candidates"][name]) * (1 + 1e-6)
                continue
            assert mean_error(entry["candidates"][name]) == pytest.approx(entry["scores"][name], rel=1e-5,
                                                                          abs=1e-9)
    least = min(v for v in entry["scores"].values() if v is not None)
    assert entry["scores"][entry["chosen"]] <= least * (1 + 1e-6)
    assert entry["score"] is not None  # refined by runs: its score is the refined schedule's on validation
    from meancache.calibration.runs import generator_states, pipeline_runs
    fresh, _ = _inputs(kw, seeds=seeds)
    states = generator_states(fresh, "test")
    rec = meancache.record(pipe, fresh, progress=False, elements=elements, **common)
    errors, _, _ = pipeline_runs(pipe, fresh, states, rec, common)
    assert float(errors(got).mean()) <= float(errors(entry["start"]).mean()) * (1 + 1e-9)


def test_pipeline_runs_need_seeded_generators_before_any_call():
    pipe, kw, _ = tiny_pipelines.build("flux")
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    common = {k: v for k, v in kw.items() if k != "generator"}
    for setting in ({"validate": "runs"}, {"refine": 100}):
        with pytest.raises(ValueError, match=r"inputs\[1\] has generator=None: .* needs a seeded torch.Generator"):
            meancache.calibrate(pipe, [dict(generator=torch.Generator().manual_seed(0)), {}], budget=4,
                                progress=False, **setting, **common)
    assert calls == []
    with pytest.raises(ValueError, match="validate='runs' with a Recording target"):
        meancache.calibrate(meancache.Recording([1.0, 0.5, 0.0], torch.zeros(1, 3, 2), torch.zeros(1, 2, 2)),
                            budget=2, validate="runs")


def test_pipeline_runs_refuse_an_output_that_is_not_the_schedulers_latents():
    """A pipeline whose output_type='latent' has another layout than the latents it steps (a subset would then
    pick unrelated elements) is refused by name, not scored."""
    from meancache.calibration.runs import generator_states, pipeline_runs
    pipe, kw, _ = tiny_pipelines.build("flux")
    inputs, common = _inputs(dict(kw, num_inference_steps=6), seeds=[1, 2])
    states = generator_states(inputs, "test")
    rec = meancache.record(pipe, inputs, progress=False, elements=30, **common)
    assert rec.meta["elements"]["of_shape"] == list(getattr(pipe(**dict(common, generator=torch.Generator()
                                                                          .manual_seed(1))), "images").shape)
    original = type(pipe).__call__

    def flattened(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.images = out.images.reshape(-1)
        return out

    errors, _, _ = pipeline_runs(pipe, inputs, states, rec, common, every=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(pipe), "__call__", flattened)
        with pytest.raises(ValueError, match=r"returned shape \(\d+,\), but the scheduler's latents were"):
            errors(meancache.Schedule.default(4, 6))
    assert not meancache.api._accelerated(pipe)


def test_real_runs_of_inputs_that_give_their_latents():
    """Inputs that carry their noise as latents (no generator) are run again from a copy of those latents: the
    runs score each candidate as independent accelerated calls from the same latents would, and leave the
    caller's tensors as they were."""
    from meancache.calibration.runs import generator_states
    from meancache.examples.digits import load_pipeline
    from meancache.examples.digits.calibration import calibration_inputs

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inputs = calibration_inputs(2)
    kept = [i["latents"].clone() for i in inputs]
    assert generator_states(inputs, "test") == [[], []]
    report: list = []
    got = meancache.calibrate(pipe, inputs, budget=4, validate="runs", report=report, progress=False,
                              num_inference_steps=10)
    assert got.budget == 4 and report[0]["measure"] == "runs"
    assert all(torch.equal(i["latents"], k) for i, k in zip(inputs, kept))
    chosen = report[0]["candidates"][report[0]["chosen"]]
    errs = []
    for i in inputs:
        plain = pipe(class_labels=i["class_labels"], latents=i["latents"].clone(), num_inference_steps=10,
                     output_type="latent")
        meancache.accelerate(pipe, schedule=chosen)
        try:
            fast = pipe(class_labels=i["class_labels"], latents=i["latents"].clone(), num_inference_steps=10,
                        output_type="latent")
        finally:
            meancache.disable(pipe)
        a, b = (fast if isinstance(fast, torch.Tensor) else fast[0]), (plain if isinstance(plain, torch.Tensor)
                                                                       else plain[0])
        errs.append(((a - b).double().norm() / b.double().norm()).item())
    assert report[0]["scores"][report[0]["chosen"]] == pytest.approx(sum(errs) / len(errs), rel=1e-4, abs=1e-9)
    with pytest.raises(ValueError, match=r"inputs\[0\] has generator=None: .* or its noise as a latents tensor"):
        generator_states([{"class_labels": [1]}], "validate='runs'")
