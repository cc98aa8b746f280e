"""Recording reference trajectories from a diffusers pipeline, for :func:`meancache.calibrate`.

The uncached pipeline runs once per calibration input. A temporary hook on ``pipe.scheduler.step`` (the place
MeanCache caches, algorithm.md §7) logs the latent and the guided velocity of every step, so the recording holds
exactly what a MeanCache run of that pipeline would see.
"""

from __future__ import annotations

import torch

from .calibrate import Recording
from .hooks import check_scheduler
from .hooks import hooked_step
from .hooks import sigma_grid
from .pipeline import STATE

__all__ = ["record_pipeline"]


def record_pipeline(pipe, inputs, *, progress: bool = True, **call_kwargs) -> Recording:
    """Run the uncached ``pipe`` once per input and record ``x_i`` and the guided velocity at every step.

    Args:
        pipe: a diffusers pipeline whose scheduler is ``FlowMatchEulerDiscreteScheduler``, not accelerated.
        inputs: a non-empty list of dicts, one per calibration input, merged over ``call_kwargs`` (for example
            ``{"prompt": "...", "generator": torch.Generator().manual_seed(i)}`` or precomputed prompt embeddings).
            Every input must give latents of one shape and the same sigma grid.
        progress: tqdm progress bar over the inputs.
        call_kwargs: keyword arguments shared by every call (``num_inference_steps``, ``guidance_scale``, sizes).
            ``output_type`` defaults to ``"latent"`` so nothing is decoded.

    Returns:
        A :class:`~meancache.Recording`: ``latents`` ``(P, N + 1, *latent_shape)`` and ``velocities``
        ``(P, N, *latent_shape)``, float32 on the CPU, where ``latent_shape`` is the shape the pipeline hands the
        scheduler (batch dimension included).

    Raises:
        ValueError: for an accelerated pipeline, another scheduler, empty or non-dict inputs, or inputs whose
            latents or sigma grids differ.

    Example (with a loaded pipeline ``pipe``; tests/test_calibrate_pipeline.py runs it on tiny pipelines)::

        rec = meancache.record(pipe, [{"prompt": "a cat"}, {"prompt": "a dog"}], num_inference_steps=28)
        rec.save("flux-28.pt")
        schedules = meancache.calibrate(meancache.Recording.load("flux-28.pt"), budget=[10, 14])
    """
    if STATE in getattr(pipe, "__dict__", {}):
        raise ValueError(
            f"{type(pipe).__name__} is accelerated by meancache: record the uncached pipeline (meancache.disable)"
        )
    check_scheduler(pipe.scheduler)
    if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(i, dict) for i in inputs):
        raise ValueError(
            f"inputs={type(inputs).__name__}: must be a non-empty list of dicts of call arguments, one per input"
        )
    call_kwargs.setdefault("output_type", "latent")
    scheduler = pipe.scheduler
    runs, grids = [], []
    iterator = inputs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(inputs, desc="meancache: recording", unit="input")
    for n, extra in enumerate(iterator):
        xs, vs, final = [], [], []

        def make_hook(original):
            def step(model_output, timestep, sample, *args, **kwargs):
                xs.append(sample.detach().to("cpu", torch.float32))
                vs.append(model_output.detach().to("cpu", torch.float32))
                out = original(model_output, timestep, sample, *args, **kwargs)
                prev = out[0] if isinstance(out, tuple) else out.prev_sample
                final[:] = [prev.detach().to("cpu", torch.float32)]
                return out

            return step

        with hooked_step(scheduler, make_hook):
            pipe(**{**call_kwargs, **extra})
        if not xs:
            raise ValueError(f"input {n}: the pipeline never called scheduler.step")
        start = scheduler.step_index - len(xs) if scheduler.step_index is not None else 0
        grid = sigma_grid(scheduler, start)
        grid = grid[: len(xs) + 1]
        if runs and (grid != grids[0] or xs[0].shape != runs[0][0][0].shape):
            raise ValueError(
                f"input {n}: latents of shape {tuple(xs[0].shape)} on a {len(grid) - 1}-step grid differ from input "
                f"0 ({tuple(runs[0][0][0].shape)}, {len(grids[0]) - 1} steps): one recording needs one shape and "
                "one grid"
            )
        runs.append((xs + final, vs))
        grids.append(grid)
    latents = torch.stack([torch.stack(x) for x, _ in runs])
    velocities = torch.stack([torch.stack(v) for _, v in runs])
    meta = {"pipeline": type(pipe).__name__, "scheduler": type(scheduler).__name__, "inputs": len(inputs)}
    return Recording(grids[0], latents, velocities, meta)
