"""Pipeline faults of issue 18, each pinned by a test that failed before its fix.

In-place latent edits under ``torch.inference_mode`` (2), ``meancache.reset(pipe)`` (10), the accelerated
``__call__``'s signature and docstring (16), diffusers' own cache hooks stacked under meancache (17), and what a
step-end callback sees as ``pipe.transformer`` (18).
"""

from __future__ import annotations

import inspect
import logging

import pytest
from meancache.examples import tiny_pipelines
import torch
from fields import rel_err

import meancache
from meancache.engine import Stats

N = tiny_pipelines.NUM_INFERENCE_STEPS


def _latents(pipe, kw, info):
    return getattr(pipe(**kw), info["output_attr"])


def _assert_clean(pipe):
    """Nothing of meancache left on the scheduler or the transformer module."""
    assert "step" not in pipe.scheduler.__dict__
    assert "_compiled_call_impl" not in pipe.transformer.__dict__


# -- 2. in-place latent edits under inference mode -------------------------------------------------------------------


def _halve_run(how, accelerated, steps=20, budget=8):
    """The tiny FLUX run whose step-end callback halves the latents once (at i == 6)."""
    pipe, kw, info = tiny_pipelines.build("flux")
    if accelerated:
        meancache.accelerate(pipe, budget=budget)

    def callback(p, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if how == "in_place" and i == 6:
            latents.mul_(0.5)
        elif how == "new_tensor" and i == 6:
            latents = latents * 0.5
        return {"latents": latents}

    out = _latents(pipe, dict(kw, num_inference_steps=steps, callback_on_step_end=callback if how else None), info)
    return out, (meancache.summary(pipe) if accelerated else None)


def test_an_in_place_edit_under_inference_mode_is_followed():
    with torch.no_grad():
        usual = rel_err(_halve_run(None, True)[0], _halve_run(None, False)[0])
        uncached, _ = _halve_run("in_place", False)
        no_grad, no_grad_summary = _halve_run("in_place", True)
    with torch.inference_mode():
        in_place, summary = _halve_run("in_place", True)
        new_tensor, _ = _halve_run("new_tensor", True)
        plain, plain_summary = _halve_run(None, True)
    assert summary.latent_edits == 1 and no_grad_summary.latent_edits == 1
    assert plain_summary.latent_edits == 0
    # Measured before the fix: 0.113 (the edit went unnoticed), against 0.023 under no_grad; usual 0.0105.
    assert rel_err(in_place, uncached) <= 3 * usual
    # the kept copy holds the exact values before the edit: the same run as an edit that returns a new tensor
    assert torch.equal(in_place, new_tensor)
    # under no_grad they are rebuilt from the ring (x_5 + dt * v_5): the same up to rounding
    assert rel_err(in_place, no_grad) <= 1e-6


def test_the_inference_mode_copy_is_taken_only_for_inference_tensors():
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, budget=4)
    state = pipe.__dict__["_meancache"]
    kept = []

    def callback(p, i, t, callback_kwargs):
        kept.append(state.produced_copy)
        return callback_kwargs

    with torch.no_grad():
        _latents(pipe, dict(kw, callback_on_step_end=callback), info)
    assert kept == [None] * N
    kept.clear()
    with torch.inference_mode():
        _latents(pipe, dict(tiny_pipelines.fresh_kwargs(kw), callback_on_step_end=callback), info)
    # one latent-sized copy between steps, none after the last step (nothing reads it)
    assert all(c is not None and c.shape == (1, 4, 64) for c in kept[:-1]) and kept[-1] is None
    assert state.produced_copy is None


# -- 10. meancache.reset(pipe) ---------------------------------------------------------------------------------------


def test_reset_on_a_pipeline_frees_the_rings_and_replaces_the_plans(caplog):
    pipe, kw, info = tiny_pipelines.build("qwen-image")
    kw = dict(kw, num_inference_steps=20)
    meancache.accelerate(pipe, budget=10)
    state = pipe.__dict__["_meancache"]
    resampled = "qwen-image preset (budget 10, 50 steps) resampled to this call's 20 steps"
    with caplog.at_level(logging.INFO, logger="meancache"):
        first = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
        _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    assert caplog.text.count(resampled) == 1  # placed once per step count, then reused
    held = meancache.summary(pipe).history_bytes
    assert held > 0 and state.traj is not None and state.static_plans

    meancache.reset(pipe)
    assert meancache.summary(pipe) == Stats()
    assert state.traj is None and not state.static_plans  # the rings' memory is released

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meancache"):
        again = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    assert resampled in caplog.text
    assert torch.equal(again, first)
    assert meancache.summary(pipe).history_bytes == held and meancache.summary(pipe).completed


def test_reset_during_a_call_is_refused_and_reset_of_a_plain_pipeline_says_so():
    pipe, kw, info = tiny_pipelines.build("flux")
    with pytest.raises(ValueError, match="FluxPipeline is not accelerated by meancache"):
        meancache.reset(pipe)
    meancache.accelerate(pipe, budget=4)
    expected = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    errors = []

    def callback(p, i, t, callback_kwargs):
        try:
            meancache.reset(p)
        except RuntimeError as e:
            errors.append(str(e))
        return callback_kwargs

    out = _latents(pipe, dict(tiny_pipelines.fresh_kwargs(kw), callback_on_step_end=callback), info)
    assert len(errors) == N and "is running a call: reset it after the call returns" in errors[0]
    assert torch.equal(out, expected)


# -- 16. the accelerated __call__'s signature and docstring ----------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_the_accelerated_call_keeps_the_signature_and_docstring(name):
    pipe, kw, info = tiny_pipelines.build(name)
    plain, _, _ = tiny_pipelines.build(name)
    meancache.accelerate(pipe, budget=4)
    original = plain.__call__
    assert inspect.signature(pipe.__call__) == inspect.signature(original)
    assert "prompt" in inspect.signature(pipe.__call__).parameters
    assert pipe.__call__.__doc__ == original.__doc__ and "the pipeline for generation" in (
        pipe.__call__.__doc__
    )
    assert pipe.__call__.__name__ == "__call__" and type(pipe).__call__.__qualname__ == original.__qualname__
    # and the wrapper still is the accelerated call
    _latents(pipe, kw, info)
    assert meancache.summary(pipe).model_calls == 4 * info["calls_per_step"]


# -- 17. diffusers' own cache hooks ----------------------------------------------------------------------------------


def _cache_configs(pipe):
    from diffusers import FasterCacheConfig
    from diffusers import FirstBlockCacheConfig
    from diffusers import MagCacheConfig
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers import TaylorSeerCacheConfig

    return {
        "FirstBlockCacheConfig": FirstBlockCacheConfig(threshold=0.2),
        "PyramidAttentionBroadcastConfig": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep
        ),
        "FasterCacheConfig": FasterCacheConfig(
            current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.3,
            is_guidance_distilled=True, tensor_format="BCHW",
        ),
        "TaylorSeerCacheConfig": TaylorSeerCacheConfig(cache_interval=2, taylor_factors_dtype=torch.float32),
        "MagCacheConfig": MagCacheConfig(mag_ratios=[1.0] * N, num_inference_steps=N),
    }


@pytest.mark.parametrize(
    "config", ["FirstBlockCacheConfig", "PyramidAttentionBroadcastConfig", "FasterCacheConfig",
               "TaylorSeerCacheConfig", "MagCacheConfig"]
)
def test_a_diffusers_step_cache_is_refused_at_accelerate_and_at_call_time(config):
    pipe, kw, info = tiny_pipelines.build("flux")
    pipe.transformer.enable_cache(_cache_configs(pipe)[config])
    with pytest.raises(ValueError, match=rf"pipe.transformer has diffusers' {config} enabled .*counts calls"):
        meancache.accelerate(pipe, budget=4)
    assert "_meancache" not in pipe.__dict__
    pipe.transformer.disable_cache()
    meancache.accelerate(pipe, budget=4)

    # enabled after accelerate(): refused when called, before any transformer call
    pipe.transformer.enable_cache(_cache_configs(pipe)[config])
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=rf"pipe.transformer has diffusers' {config} enabled .*disable_cache\(\)"):
        _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    handle.remove()
    assert calls == []
    _assert_clean(pipe)
    pipe.transformer.disable_cache()
    _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    assert meancache.summary(pipe).model_calls == 4


def test_a_cache_hook_applied_directly_is_named_and_an_exact_cache_stacks():
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import TaylorSeerCacheConfig
    from diffusers.hooks import TextKVCacheConfig
    from diffusers.hooks import apply_taylorseer_cache

    pipe, kw, info = tiny_pipelines.build("wan")
    meancache.accelerate(pipe, budget=4)
    expected = _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    # apply_* leaves transformer.is_cache_enabled False: the hook itself is found
    apply_taylorseer_cache(pipe.transformer, TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32,
                                                                  use_lite_mode=True))
    assert not pipe.transformer.is_cache_enabled
    with pytest.raises(ValueError, match=r"pipe.transformer has diffusers' cache hook 'taylorseer_cache' "
                                         r"\(TaylorSeerCacheConfig\) on blocks.0: .*counts calls, not steps"):
        _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("taylorseer_cache", recurse=True)

    # TextKVCache is exact (the text K/V projections do not change across steps): it stacks
    pipe.transformer.enable_cache(TextKVCacheConfig())
    assert torch.equal(_latents(pipe, tiny_pipelines.fresh_kwargs(kw), info), expected)


# -- 18. pipe.transformer inside a callback ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_a_callback_sees_the_real_transformer(name):
    pipe, kw, info = tiny_pipelines.build(name)
    real = pipe.transformer
    cls = type(real)
    meancache.accelerate(pipe, budget=4)
    seen = []

    def callback(p, i, t, callback_kwargs):
        module = p.transformer
        seen.append((type(module), module is real, isinstance(module, torch.nn.Module), module.config is real.config,
                     module.dtype, module.device, module.eval() is module))
        module.mc_note = i  # an attribute write
        module.requires_grad_(False)  # a method that changes the module, as set_adapters does
        return callback_kwargs

    out = _latents(pipe, dict(kw, callback_on_step_end=callback), info)
    assert seen == [(cls, True, True, True, torch.float32, torch.device("cpu"), True)] * N
    assert real.mc_note == N - 1 and not any(p.requires_grad for p in real.parameters())
    assert meancache.summary(pipe).model_calls == 4 * info["calls_per_step"]
    _assert_clean(pipe)
    plain, kw2, _ = tiny_pipelines.build(name)
    meancache.accelerate(plain, budget=4)
    assert torch.equal(out, _latents(plain, kw2, info))


def test_the_transformer_hook_leaves_outside_calls_and_a_compiled_transformer_alone():
    pipe, kw, info = tiny_pipelines.build("flux")
    meancache.accelerate(pipe, budget=4)
    args = dict(hidden_states=torch.randn(1, 4, 64), encoder_hidden_states=kw["prompt_embeds"],
                pooled_projections=kw["pooled_prompt_embeds"], timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
                txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    direct = pipe.transformer(**args)[0]
    _latents(pipe, kw, info)
    _assert_clean(pipe)
    assert torch.equal(pipe.transformer(**args)[0], direct)

    pipe.transformer.compile(fullgraph=True, backend="aot_eager")
    compiled = pipe.transformer.__dict__["_compiled_call_impl"]
    _latents(pipe, tiny_pipelines.fresh_kwargs(kw), info)
    assert pipe.transformer.__dict__["_compiled_call_impl"] is compiled
    assert meancache.summary(pipe).model_calls == 4


def test_pipelines_sharing_one_transformer_run_in_parallel_threads():
    import threading

    from diffusers import FlowMatchEulerDiscreteScheduler

    a, kw, info = tiny_pipelines.build("flux")
    b, _, _ = tiny_pipelines.build("flux")
    b.transformer = a.transformer  # one model, two pipelines with their own schedulers
    b.scheduler = FlowMatchEulerDiscreteScheduler.from_config(a.scheduler.config)
    meancache.accelerate(a, budget=4)
    meancache.accelerate(b, budget=6)
    expected_a = _latents(a, tiny_pipelines.fresh_kwargs(kw), info)
    expected_b = _latents(b, tiny_pipelines.fresh_kwargs(kw), info)

    in_a, release = threading.Event(), threading.Event()

    def hold(p, i, t, callback_kwargs):
        if i == 2:
            in_a.set()
            assert release.wait(20)
        return callback_kwargs

    results = {}
    thread = threading.Thread(target=lambda: results.__setitem__(
        "a", _latents(a, dict(tiny_pipelines.fresh_kwargs(kw), callback_on_step_end=hold), info)))
    thread.start()
    assert in_a.wait(20)
    # b runs whole while a is parked in the middle of its call, on the same transformer module
    results["b"] = _latents(b, tiny_pipelines.fresh_kwargs(kw), info)
    release.set()
    thread.join(20)
    assert torch.equal(results["a"], expected_a) and torch.equal(results["b"], expected_b)
    assert meancache.summary(a).model_calls == 4 and meancache.summary(b).model_calls == 6
    _assert_clean(a)
