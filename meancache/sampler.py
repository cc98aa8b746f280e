"""``meancache.sample``: an Euler flow-matching sampler that evaluates the model only at the schedule's steps."""

from __future__ import annotations

from typing import Callable
from typing import Sequence

import torch

from . import ops
from .history import History
from .online import OnlinePlan
from .schedule import Schedule
from .sigmas import as_sigma_list

__all__ = ["sample", "check_latents", "check_velocity"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_latents(latents, name: str = "latents") -> None:
    """Raise ValueError unless ``latents`` is a tensor of a supported float dtype (fp16, bf16, fp32, fp64)."""
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"{name} is a {type(latents).__name__}: must be a torch.Tensor")
    if latents.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} dtype={latents.dtype}: must be one of float16, bfloat16, float32, float64"
        )


def check_velocity(v, x: torch.Tensor, where: str) -> None:
    """Raise ValueError unless the model's velocity ``v`` is a float tensor shaped and placed like ``x``."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{where} returned a {type(v).__name__}: the velocity must be a torch.Tensor")
    if v.shape != x.shape:
        raise ValueError(
            f"{where} returned velocity of shape {tuple(v.shape)} for latents of shape {tuple(x.shape)}: "
            "they must match"
        )
    if v.device != x.device:
        raise ValueError(f"{where} returned velocity on {v.device} for latents on {x.device}: they must match")
    if not v.dtype.is_floating_point:
        raise ValueError(f"{where} returned velocity of dtype {v.dtype}: must be floating point")


def sample(
    velocity_fn: Callable[[torch.Tensor, float], torch.Tensor],
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    schedule: Schedule,
    *,
    history: History | None = None,
) -> torch.Tensor:
    """Run an Euler flow-matching sampler with MeanCache.

    Step ``i`` moves ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``. On the schedule's compute steps
    ``v = velocity_fn(x_i, sigma_i)``; on the others ``v`` is MeanCache's average-velocity estimate from the last
    ``K`` logged steps (algorithm.md §2.2), and the model is not called. ``velocity_fn`` is therefore called exactly
    ``schedule.budget`` times. The estimate and the Euler update are computed in float32 (float64 for float64
    latents) and the latent is stored back in its own dtype after each step; each step is one fused op
    (:mod:`meancache.ops`), run by the fastest available backend. The history is a ring of at most
    ``schedule.window <= 6`` entries, so memory does not grow with the number of steps.

    Args:
        velocity_fn: ``velocity_fn(x, sigma) -> v``; ``x`` has the shape and dtype of ``latents``, ``sigma`` is a
            Python float, and ``v`` (any float dtype, same shape and device) is ``dx/dsigma`` (for rectified flow
            ``noise - data``). Use guided (post-CFG) velocities here.
        latents: initial latent x_0 at ``sigmas[0]``; any shape and batch size; float16, bfloat16, float32 or
            float64; CPU or CUDA.
        sigmas: ``schedule.num_steps + 1`` decreasing floats (1-D tensor or sequence), normally ending at 0.
        schedule: a :class:`~meancache.Schedule`, or an :class:`~meancache.online.OnlinePlan` that decides the
            compute steps during the run (calibration-free mode).
        history: optional :class:`~meancache.History` to log into (it is cleared first). Pass one to inspect the
            ring after the run or to reuse its storage across runs; its capacity must be at least
            ``schedule.window``.

    Returns:
        The final latent, same shape, dtype and device as ``latents``.

    Raises:
        ValueError: on a wrong sigma count (both numbers stated), non-decreasing or non-finite sigmas, an
            unsupported latent dtype, a non-Schedule ``schedule``, or a velocity of the wrong shape or device.

    Example:
        >>> import torch, meancache
        >>> sched = meancache.Schedule.preset("qwen-image", 10)
        >>> sigmas = torch.linspace(1, 0, 51)
        >>> x = meancache.sample(lambda x, s: x * 0.1 - 1.0, torch.randn(2, 8), sigmas, sched)
        >>> x.shape
        torch.Size([2, 8])
    """
    if not isinstance(schedule, (Schedule, OnlinePlan)):
        raise ValueError(f"schedule is a {type(schedule).__name__}: must be a meancache.Schedule")
    if not callable(velocity_fn):
        raise ValueError(f"velocity_fn={velocity_fn!r}: must be callable as velocity_fn(x, sigma)")
    check_latents(latents)
    sig = as_sigma_list(sigmas, schedule.num_steps)
    if history is None:
        history = History(schedule.window)
    elif not isinstance(history, History):
        raise ValueError(f"history is a {type(history).__name__}: must be a meancache.History")
    elif history.capacity < schedule.window:
        raise ValueError(
            f"history.capacity={history.capacity} < schedule.window={schedule.window}: the ring must hold the "
            "largest window K the schedule uses"
        )
    history.clear()
    online = isinstance(schedule, OnlinePlan)
    steps = schedule if online else schedule.expand()
    x = latents
    for i in range(schedule.num_steps):
        plan = steps[i]
        xs, vs = history.prepare(x)
        if plan.computed:
            v = velocity_fn(x, sig[i])
            check_velocity(v, x, f"velocity_fn at step {i}")
            x = ops.compute_step(x, v, xs, vs, i, sig[i], sig[i + 1])
            if online:
                schedule.observe(i, v)
        else:
            # the window is truncated to what has been logged, as the official full-history loop does
            k = min(plan.order, len(history))
            x = ops.skip_step(x, xs, vs, i, k, sig[i - k], sig[i], sig[i + 1])
        history.advance()
    return x
