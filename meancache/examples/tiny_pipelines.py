"""Tiny, offline, randomly initialised diffusers pipelines for tests and benchmarks.

Each pipeline is a *real* diffusers pipeline object (``FluxPipeline``,
``QwenImagePipeline``, ``ZImagePipeline``, ``StableDiffusion3Pipeline``,
``WanPipeline``, ``HunyuanVideoPipeline``) whose transformer is built from a
tiny configuration written here, with a ``FlowMatchEulerDiscreteScheduler``.
Text encoders, tokenizers and VAEs are ``None``: the pipelines run from
precomputed (random) prompt embeddings with ``output_type="latent"``, and
without a VAE every pipeline falls back to its default scale factors
(8 spatial, 4 temporal).  Nothing is downloaded or loaded with
``from_pretrained``.

Used by the test suite and the pipeline benchmarks; needs diffusers (the ``examples`` extra). Usage:

    >>> from meancache.examples.tiny_pipelines import build, without_cfg
    >>> pipe, kw, info = build("qwen-image", seed=0)
    >>> latents = getattr(pipe(**kw), info["output_attr"])
    >>> tuple(latents.shape) == info["latent_shape"]
    True

``info`` keys:

* ``family``: the pipeline name (one of ``PIPELINES``).
* ``output_attr``: attribute of the pipeline output holding the final latents
  (``"images"`` or ``"frames"``).
* ``calls_per_step`` / ``calls_per_step_without_cfg``: transformer forward
  calls per denoising step for ``call_kwargs`` / ``without_cfg(call_kwargs)``.
  These were measured with a forward hook (see ``count_calls_per_step`` and the
  self-check at the bottom, which re-verifies them on every run).
* ``cfg_mode``: how guidance is done with ``call_kwargs``:
  ``"distilled"`` (guidance embedded in the transformer, one call),
  ``"sequential"`` (two calls per step, cond then uncond, each inside
  ``transformer.cache_context("cond"/"uncond")``) or ``"batched"`` (one call
  per step on a batch of 2).
* ``cfg_batch_order``: for ``"batched"``, the order of the halves of the batch
  (``("cond", "uncond")`` for Z-Image, ``("uncond", "cond")`` for SD3).
* ``uses_cache_context``: whether the pipeline wraps its transformer calls in
  ``transformer.cache_context(...)``.  (Z-Image's and SD3's transformers are
  not ``CacheMixin`` models: they have no ``cache_context`` at all.)
* ``num_inference_steps``, ``latent_shape`` (shape of the output tensor),
  ``transformer_class``, ``pipeline_class``.

Threads: ``build`` sets ``torch.set_num_threads(1)`` by default (see its
docstring): with torch's default 2 threads on the 2-core sandbox CPU these tiny
runs stall erratically and take 1-5 s instead of ~0.05 s.

tests/test_tiny_pipelines.py checks every claim above (call counts, determinism, guidance on and off) on every
run of the test suite.
"""

from __future__ import annotations


import torch

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

PIPELINES = ["flux", "qwen-image", "z-image", "sd3", "wan", "hunyuan-video"]

NUM_INFERENCE_STEPS = 8

# Transformer calls per denoising step, measured with a forward hook by
# ``count_calls_per_step`` (re-checked by the self-check below).
#   name: (with call_kwargs, with without_cfg(call_kwargs), cfg_mode, batch order)
_CALLS = {
    "flux": (1, 1, "distilled", None),
    "qwen-image": (2, 1, "sequential", None),
    "z-image": (1, 1, "batched", ("cond", "uncond")),
    "sd3": (1, 1, "batched", ("uncond", "cond")),
    "wan": (2, 1, "sequential", None),
    "hunyuan-video": (2, 1, "sequential", None),
}

_USES_CACHE_CONTEXT = {
    "flux": True,
    "qwen-image": True,
    "z-image": False,
    "sd3": False,
    "wan": True,
    "hunyuan-video": True,
}

_OUTPUT_ATTR = {
    "flux": "images",
    "qwen-image": "images",
    "z-image": "images",
    "sd3": "images",
    "wan": "frames",
    "hunyuan-video": "frames",
}

# Expected shapes of the returned latents for the sizes used below
# (height = width = 32, i.e. a 4x4 latent; video: 5 frames -> 2 latent frames).
_LATENT_SHAPE = {
    "flux": (1, 4, 64),  # packed 2x2 patches of 16 channels
    "qwen-image": (1, 4, 64),  # packed 2x2 patches of 16 channels
    "z-image": (1, 16, 4, 4),
    "sd3": (1, 16, 4, 4),
    "wan": (1, 16, 2, 4, 4),
    "hunyuan-video": (1, 16, 2, 4, 4),
}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_name(name: str) -> None:
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; expected one of {PIPELINES}")


# --------------------------------------------------------------------------
# builders: each returns (pipe, call_kwargs)
# --------------------------------------------------------------------------


def _build_flux(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        out_channels=None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,  # FLUX.1-dev style guidance distillation
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # FLUX.1-dev scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_randn(gen, 1, 8, 32),
        pooled_prompt_embeds=_randn(gen, 1, 16),
        guidance_scale=3.5,
        height=32,
        width=32,
    )
    return pipe, kwargs


def _build_qwen(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels, packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # Qwen/Qwen-Image scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_randn(gen, 1, 7, 32),
        prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long),
        negative_prompt_embeds=_randn(gen, 1, 5, 32),
        negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
        true_cfg_scale=4.0,
        height=32,
        width=32,
    )
    return pipe, kwargs


def _build_zimage(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[4, 6, 6],  # sums to dim // n_heads
        axes_lens=[256, 32, 32],
    )
    # Tongyi-MAI/Z-Image(-Turbo) scheduler config: fixed shift, no dynamic
    # shifting (the pipeline computes ``mu`` but the scheduler ignores it).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=False,
    )
    pipe = ZImagePipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    # Z-Image takes *lists* of per-sample (seq_len, cap_feat_dim) embeddings.
    kwargs = dict(
        prompt_embeds=[_randn(gen, 7, 32)],
        negative_prompt_embeds=[_randn(gen, 5, 32)],
        guidance_scale=4.0,  # CFG is on whenever guidance_scale > 0
        height=32,
        width=32,
    )
    return pipe, kwargs


def _build_sd3(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,  # == num_attention_heads * attention_head_dim
        pooled_projection_dim=16,
        out_channels=16,
        pos_embed_max_size=8,
    )
    # stabilityai/stable-diffusion-3-medium scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    kwargs = dict(
        prompt_embeds=_randn(gen, 1, 8, 32),
        pooled_prompt_embeds=_randn(gen, 1, 16),
        negative_prompt_embeds=_randn(gen, 1, 8, 32),
        negative_pooled_prompt_embeds=_randn(gen, 1, 16),
        guidance_scale=5.0,
        height=32,
        width=32,
    )
    return pipe, kwargs


def _build_wan(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )
    # The released Wan2.1 checkpoints ship a UniPCMultistepScheduler
    # (flow_prediction, flow_shift=3.0 for 480p); here the flow-matching Euler
    # scheduler with the same shift.  WanPipeline calls
    # ``scheduler.set_timesteps(n)`` without ``mu``, so dynamic shifting must
    # stay off.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=scheduler,
        transformer=transformer,
    )
    kwargs = dict(
        prompt_embeds=_randn(gen, 1, 8, 32),
        negative_prompt_embeds=_randn(gen, 1, 8, 32),
        guidance_scale=5.0,
        height=32,
        width=32,
        num_frames=5,
    )
    return pipe, kwargs


def _build_hunyuan(seed: int, gen: torch.Generator):
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,  # HunyuanVideo is guidance-distilled
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_theta=256.0,
        rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
    )
    # hunyuanvideo-community/HunyuanVideo scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    kwargs = dict(
        prompt_embeds=_randn(gen, 1, 8, 32),
        prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        pooled_prompt_embeds=_randn(gen, 1, 16),
        # True CFG on top of the embedded (distilled) guidance: two calls per
        # step, in cache_context("cond") then cache_context("uncond").
        negative_prompt_embeds=_randn(gen, 1, 8, 32),
        negative_prompt_attention_mask=torch.ones(1, 8, dtype=torch.long),
        negative_pooled_prompt_embeds=_randn(gen, 1, 16),
        true_cfg_scale=3.0,
        guidance_scale=6.0,  # embedded guidance (always used)
        height=32,
        width=32,
        num_frames=5,
    )
    return pipe, kwargs


_BUILDERS = {
    "flux": _build_flux,
    "qwen-image": _build_qwen,
    "z-image": _build_zimage,
    "sd3": _build_sd3,
    "wan": _build_wan,
    "hunyuan-video": _build_hunyuan,
}


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def build(name: str, *, seed: int = 0, num_threads: int | None = 1):
    """Build a tiny pipeline.  Returns ``(pipe, call_kwargs, info)``.

    ``num_threads``: unless ``None``, calls ``torch.set_num_threads(num_threads)``
    when torch currently uses more threads (a process-wide setting).  On the
    2-core CI/sandbox CPU, torch's 2-thread OpenMP regions on these tiny
    tensors stall erratically (single ops taking 2-10 ms instead of ~10 us), so
    a run of 8 steps takes 1-5 s instead of 0.02-0.07 s; one thread avoids
    that.  Pass ``num_threads=None`` to leave torch's setting alone.

    The transformer is initialised right after ``torch.manual_seed(seed)``;
    the prompt embeddings come from a private ``torch.Generator`` seeded with
    ``seed`` and the latents from ``call_kwargs["generator"]``
    (``torch.Generator().manual_seed(seed)``).

    Note: ``call_kwargs["generator"]`` is consumed by a run.  To run the same
    kwargs twice with identical results, pass a fresh generator each time, e.g.
    via ``fresh_kwargs(call_kwargs, seed)``.
    """
    _check_name(name)
    if num_threads is not None and torch.get_num_threads() > num_threads:
        torch.set_num_threads(num_threads)
    emb_gen = torch.Generator().manual_seed(seed)
    pipe, kwargs = _BUILDERS[name](seed, emb_gen)
    _finish(pipe)
    kwargs.update(
        num_inference_steps=NUM_INFERENCE_STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )
    calls, calls_nocfg, cfg_mode, order = _CALLS[name]
    info = {
        "family": name,
        "output_attr": _OUTPUT_ATTR[name],
        "calls_per_step": calls,
        "calls_per_step_without_cfg": calls_nocfg,
        "cfg_mode": cfg_mode,
        "cfg_batch_order": order,
        "uses_cache_context": _USES_CACHE_CONTEXT[name],
        "num_inference_steps": NUM_INFERENCE_STEPS,
        "latent_shape": _LATENT_SHAPE[name],
        "seed": seed,
        "pipeline_class": type(pipe).__name__,
        "transformer_class": type(pipe.transformer).__name__,
    }
    return pipe, kwargs, info


def without_cfg(name: str, call_kwargs: dict) -> dict:
    """The same call with guidance turned off (one transformer call per step,
    batch 1).  Returns a new dict; ``call_kwargs`` is not modified.  The
    generator is copied (same state), so the two dicts do not share one."""
    _check_name(name)
    kw = dict(call_kwargs)
    for k in (
        "negative_prompt",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "negative_prompt_embeds_mask",
        "negative_prompt_attention_mask",
    ):
        kw.pop(k, None)
    if name == "flux":
        # Guidance-distilled: guidance is an input of the single call; 1.0
        # means "no guidance".  (No true CFG either.)
        kw["guidance_scale"] = 1.0
        kw.pop("true_cfg_scale", None)
    elif name == "qwen-image":
        kw["true_cfg_scale"] = 1.0
    elif name == "z-image":
        kw["guidance_scale"] = 0.0  # ZImagePipeline: CFG iff guidance_scale > 0
    elif name in ("sd3", "wan"):
        kw["guidance_scale"] = 1.0  # CFG iff guidance_scale > 1
    elif name == "hunyuan-video":
        kw["true_cfg_scale"] = 1.0  # embedded guidance_scale stays as is
    if isinstance(kw.get("generator"), torch.Generator):
        g = torch.Generator()
        g.set_state(kw["generator"].get_state())
        kw["generator"] = g
    return kw


def fresh_kwargs(call_kwargs: dict, seed: int = 0) -> dict:
    """Copy of ``call_kwargs`` with a new ``torch.Generator().manual_seed(seed)``."""
    kw = dict(call_kwargs)
    kw["generator"] = torch.Generator().manual_seed(seed)
    return kw


def trace_calls(pipe, call_kwargs: dict):
    """Run ``pipe(**call_kwargs)`` and record every transformer forward call.

    Returns ``(calls, n_steps, output)``: ``calls`` is a list with one
    ``(cache_context_name_or_None, batch_size)`` per forward call, in order;
    ``n_steps`` is the number of ``scheduler.step`` calls.  Uses a forward hook
    on ``pipe.transformer`` and temporary instance-level wrappers around
    ``pipe.transformer.cache_context`` and ``pipe.scheduler.step`` (restored
    afterwards, including any instance-level patches that were already there).
    """
    import contextlib

    calls = []
    n_step = 0
    current = [None]

    def _batch(args, kwargs):
        x = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
        if isinstance(x, (list, tuple)):
            return len(x)
        return int(x.shape[0]) if isinstance(x, torch.Tensor) else None

    def hook(module, args, kwargs, output):
        calls.append((current[0], _batch(args, kwargs)))

    transformer, sched = pipe.transformer, pipe.scheduler
    # Z-Image's and SD3's transformers have no ``cache_context`` (they are not
    # CacheMixin models) and their pipelines never enter one.
    has_ctx = hasattr(transformer, "cache_context")
    saved = {(sched, "step"): vars(sched).get("step")}
    if has_ctx:
        saved[(transformer, "cache_context")] = vars(transformer).get("cache_context")
        orig_ctx = transformer.cache_context
    orig_step = sched.step

    @contextlib.contextmanager
    def recording_ctx(name, *a, **k):
        prev, current[0] = current[0], name
        try:
            with orig_ctx(name, *a, **k):
                yield
        finally:
            current[0] = prev

    def counting_step(*a, **k):
        nonlocal n_step
        n_step += 1
        return orig_step(*a, **k)

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    if has_ctx:
        transformer.cache_context = recording_ctx
    sched.step = counting_step
    try:
        out = pipe(**call_kwargs)
    finally:
        handle.remove()
        for (obj, attr), val in saved.items():
            if val is None:
                obj.__dict__.pop(attr, None)
            else:
                object.__setattr__(obj, attr, val)
    return calls, n_step, out


def count_calls_per_step(pipe, call_kwargs: dict):
    """Run ``pipe(**call_kwargs)`` and return ``(calls_per_step, output)``,
    counting transformer forward calls (forward hook) per ``scheduler.step``."""
    calls, n_step, out = trace_calls(pipe, call_kwargs)
    if n_step == 0 or len(calls) % n_step:
        raise RuntimeError(f"{len(calls)} transformer calls for {n_step} scheduler steps")
    return len(calls) // n_step, out
