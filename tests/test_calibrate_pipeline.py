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
