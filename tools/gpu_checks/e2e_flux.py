"""End to end on a FLUX.1 transformer at real size with random weights: the full 50-step run against MeanCache at
budgets 10, 17 and 25 (stage `e2e` of tools/gpu_check.py).

The transformer has FLUX.1-dev's configuration (19 double-stream and 38 single-stream blocks, 24 heads of 128,
11.9 B parameters) with randomly initialised weights in bfloat16: no checkpoint is needed, and the time of a step
depends on the shapes, not on the weights. The prompt embeddings are random too (512 T5 tokens, a pooled CLIP
vector), so no text encoder runs. Timed: one whole sampling call per row after a short warm-up, with the device
synchronised before the clock is read. Reported per row: transformer calls, seconds, speedup over the full run,
and the ideal speedup 50/B that a model-bound sampler approaches.

Two paths, the first that can run:
* ``pipeline``: diffusers' ``FluxPipeline`` (it imports transformers for its text-encoder classes) with
  ``meancache.accelerate(pipe, budget=B)``: what a user runs;
* ``sampler``: ``FluxTransformer2DModel`` alone inside ``meancache.sample``: needs diffusers only.

Without diffusers the script writes ``{"status": "skipped", ...}`` and exits 0. ``--size tiny`` runs the same code on
a two-block transformer at 32x32 (a few seconds on a CPU): tests/test_gpu_check.py uses it.

Example:
    $ python tools/gpu_checks/e2e_flux.py --json /tmp/e2e.json            # on a GPU machine with diffusers
    $ python tools/gpu_checks/e2e_flux.py --size tiny --device cpu --steps 6 --budgets 3
    $ python tools/gpu_checks/e2e_flux.py --dry-run                       # the plan only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

# FLUX.1-dev (black-forest-labs/FLUX.1-dev, transformer/config.json), and a two-block stand-in for tests.
SIZES = {
    "real": dict(
        transformer=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        text_tokens=512, resolution=1024),
    "tiny": dict(
        transformer=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        text_tokens=8, resolution=32),
}
# FLUX.1-dev's scheduler (scheduler/scheduler_config.json): resolution-dependent shift.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
GUIDANCE = 3.5


def plan(args) -> dict:
    """What the run would do, as recorded in the JSON (also the whole output of ``--dry-run``)."""
    size = SIZES[args.size]
    return {
        "size": args.size,
        "transformer": size["transformer"],
        "resolution": size["resolution"],
        "text_tokens": size["text_tokens"],
        "steps": args.steps,
        "budgets": args.budgets,
        "dtype": args.dtype,
        "path": args.path,
        "runs": ["warm-up (2 steps)", f"full ({args.steps} steps)"] + [f"meancache B={b}" for b in args.budgets],
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _inputs(args, device, dtype):
    import torch

    size = SIZES[args.size]
    cfg = size["transformer"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, size["text_tokens"], cfg["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
    return prompt, pooled


def _build_transformer(args, device, dtype):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    # Built on the device: 11.9 B parameters initialise in seconds there, in minutes on the host.
    with torch.device(device):
        model = FluxTransformer2DModel(**SIZES[args.size]["transformer"])
    return model.to(dtype).eval().requires_grad_(False)


def run_pipeline(args, device, dtype) -> dict:
    """The ``pipeline`` path: FluxPipeline, accelerated and disabled per budget."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import FluxPipeline

    import meancache

    transformer = _build_transformer(args, device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    prompt, pooled = _inputs(args, device, dtype)
    res = SIZES[args.size]["resolution"]

    def call(steps):
        kw = dict(prompt_embeds=prompt, pooled_prompt_embeds=pooled, guidance_scale=GUIDANCE, height=res, width=res,
                  num_inference_steps=steps, output_type="latent", generator=torch.Generator(device).manual_seed(0))
        # no_grad as the pipeline itself uses, not inference_mode: meancache's scheduler hook reads the latent's
        # version counter, which inference tensors do not have
        with torch.no_grad():
            return pipe(**kw).images

    call(2)  # warm-up: kernels, cuBLAS handles, attention backends
    rows = []
    full, seconds = _timed(lambda: call(args.steps), device)
    rows.append(dict(label="full", budget=args.steps, transformer_calls=args.steps, seconds=seconds))
    outputs = {"full": full}
    for budget in args.budgets:
        meancache.accelerate(pipe, budget=budget)
        try:
            out, seconds = _timed(lambda: call(args.steps), device)
            done = meancache.summary(pipe)
            # model_calls is the current name; transformer_calls the name before meancache's Stats rename
            calls = getattr(done, "model_calls", None)
            calls = done.transformer_calls if calls is None else calls
            schedule = done.schedule.pattern()[0]
        finally:
            meancache.disable(pipe)
        rows.append(dict(label=f"B={budget}", budget=budget, transformer_calls=calls, seconds=seconds,
                         schedule=schedule))
        outputs[f"B={budget}"] = out
    return {"rows": rows, "outputs": outputs, "params": sum(p.numel() for p in transformer.parameters())}


def run_sampler(args, device, dtype) -> dict:
    """The ``sampler`` path: the transformer as ``velocity_fn`` of ``meancache.sample`` on FLUX's packed latents."""
    import torch

    import meancache
    from meancache.flows import shifted_sigmas

    transformer = _build_transformer(args, device, dtype)
    prompt, pooled = _inputs(args, device, dtype)
    side = SIZES[args.size]["resolution"] // 16  # VAE factor 8, then 2x2 patches packed into tokens
    rows_ids = torch.arange(side).repeat_interleave(side)
    cols_ids = torch.arange(side).repeat(side)
    img_ids = torch.stack([torch.zeros_like(rows_ids), rows_ids, cols_ids], dim=1).to(device, dtype)
    txt_ids = torch.zeros(prompt.shape[1], 3, device=device, dtype=dtype)
    guidance = torch.full((1,), GUIDANCE, device=device, dtype=torch.float32)
    calls = [0]

    def velocity(x, sigma):
        calls[0] += 1
        t = torch.full((1,), sigma, device=device, dtype=x.dtype)
        return transformer(hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t,
                           guidance=guidance, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, side * side, SIZES[args.size]["transformer"]["in_channels"], generator=g).to(device, dtype)
    sigmas = shifted_sigmas(args.steps, shift=SCHEDULER["shift"])

    def call(schedule):
        calls[0] = 0
        with torch.no_grad():
            return meancache.sample(velocity, x0, sigmas, schedule)

    call(meancache.Schedule.default(2, args.steps))  # warm-up: two transformer calls and the skipped-step op
    rows = []
    full, seconds = _timed(lambda: call(meancache.Schedule.full(args.steps)), device)
    rows.append(dict(label="full", budget=args.steps, transformer_calls=calls[0], seconds=seconds))
    outputs = {"full": full}
    for budget in args.budgets:
        schedule = meancache.Schedule.default(budget, args.steps)
        out, seconds = _timed(lambda: call(schedule), device)
        rows.append(dict(label=f"B={budget}", budget=budget, transformer_calls=calls[0], seconds=seconds,
                         schedule=schedule.pattern()[0]))
        outputs[f"B={budget}"] = out
    return {"rows": rows, "outputs": outputs, "params": sum(p.numel() for p in transformer.parameters())}


def pipeline_importable() -> str | None:
    """None when FluxPipeline imports, else why not (it needs transformers besides diffusers)."""
    try:
        from diffusers import FluxPipeline  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 17, 25])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--path", choices=["auto", "pipeline", "sampler"], default="auto")
    parser.add_argument("--json", type=pathlib.Path, help="write the result here as JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and whether diffusers is there")
    args = parser.parse_args(argv)
    if any(not 2 <= b <= args.steps for b in args.budgets):
        parser.error(f"--budgets {args.budgets}: each must be in 2..{args.steps}")

    result: dict = {"plan": plan(args)}
    have_diffusers = importlib.util.find_spec("diffusers") is not None
    if args.dry_run:
        result.update(status="dry-run", diffusers_found=have_diffusers)
    elif not have_diffusers:
        result.update(status="skipped", reason="diffusers is not installed (carry its wheel: docs/kernels.md, 'The GPU check')")
    else:
        try:
            result.update(_run(args))
        except Exception as exc:  # reported in the JSON, so the driver states why instead of only a log tail
            traceback.print_exc()
            result.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    printable = {k: v for k, v in result.items() if k != "plan"}
    print(f"e2e_flux: plan {json.dumps(result['plan'], default=str)}")
    print(f"e2e_flux: {json.dumps(printable, default=str)}")
    return 1 if result["status"] == "failed" else 0


def _run(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.size == "real":
        # 11.9 B parameters are 48 GB in float32 while they are made: more than a CPU machine should be asked for
        raise RuntimeError("the real-size FLUX transformer needs a CUDA device; use --size tiny on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    path = args.path
    why_not_pipeline = None
    if path == "auto":
        why_not_pipeline = pipeline_importable()
        path = "pipeline" if why_not_pipeline is None else "sampler"
    t0 = time.perf_counter()
    done = (run_pipeline if path == "pipeline" else run_sampler)(args, device, dtype)
    rows, outputs = done["rows"], done.pop("outputs")
    full = outputs["full"].float()
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["ideal_speedup"] = args.steps / row["budget"]
        out = outputs[row["label"]].float()
        # random weights: the deviation from the full run says the runs are comparable, not how good images are
        row["rel_diff_vs_full"] = float((out - full).norm() / full.norm().clamp_min(1e-30))
        row["finite"] = bool(torch.isfinite(out).all())
    result = dict(status="ok", path=path, device=device, rows=rows, params=done["params"],
                  seconds_total=time.perf_counter() - t0)
    if why_not_pipeline is not None:
        result["pipeline_unavailable"] = why_not_pipeline
    if device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
