"""The tiny pipelines the other tests rely on are what ``meancache.examples.tiny_pipelines`` says they are: real
diffusers pipelines, deterministic per seed, with the stated transformer calls per step and guidance modes."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from meancache.examples import tiny_pipelines as tp

CONTEXTS = {"distilled": ("cond",), "sequential": ("cond", "uncond"), "batched": (None,)}


@pytest.mark.parametrize("name", tp.PIPELINES)
def test_builder_matches_its_description(name):
    pipe, kw, info = tp.build(name, seed=0)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert type(pipe).__name__ == info["pipeline_class"]
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())

    calls, n_step, out = tp.trace_calls(pipe, tp.fresh_kwargs(kw, 0))
    latents = getattr(out, info["output_attr"])
    assert n_step == tp.NUM_INFERENCE_STEPS
    assert tuple(latents.shape) == info["latent_shape"] and torch.isfinite(latents).all()
    contexts = CONTEXTS[info["cfg_mode"]] if info["uses_cache_context"] else (None,) * info["calls_per_step"]
    batch = 2 if info["cfg_mode"] == "batched" else 1
    assert calls == [(c, batch) for c in contexts] * tp.NUM_INFERENCE_STEPS

    # the same kwargs (their own generator) and a fresh build of the same seed give the same latents
    assert torch.equal(getattr(pipe(**kw), info["output_attr"]), latents)
    again, kw_again, _ = tp.build(name, seed=0)
    assert torch.equal(getattr(again(**kw_again), info["output_attr"]), latents)

    calls0, _, out0 = tp.trace_calls(pipe, tp.without_cfg(name, tp.fresh_kwargs(kw, 0)))
    assert len(calls0) == info["calls_per_step_without_cfg"] * tp.NUM_INFERENCE_STEPS
    assert all(b == 1 for _, b in calls0)
    assert not torch.equal(getattr(out0, info["output_attr"]), latents)  # guidance changes the result

    other, kw_other, _ = tp.build(name, seed=1)
    assert not torch.equal(getattr(other(**kw_other), info["output_attr"]), latents)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown pipeline 'flux2'"):
        tp.build("flux2")
