"""``meancache.sample``: an Euler flow-matching sampler that evaluates the model only at the schedule's steps."""

from __future__ import annotations

from typing import Callable
from typing import Sequence

import torch

from .engine import Trajectory
from .history import History
from .online import OnlinePlan
from .plans import StaticPlan
from .validation import check_latents
from .validation import check_velocity
from .schedule import Schedule
from .sigmas import as_sigma_list

__all__ = ["sample", "check_latents", "check_velocity"]  # the checks live in meancache.validation

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
            compute steps during the run (calibration-free mode), or any plan of :mod:`meancache.plans`. An online
            plan is restarted at the start of every call (:meth:`~meancache.online.OnlinePlan.restart`), so each
            run decides afresh; after the call it holds that run's decisions (``plan.schedule()``).
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
    if not isinstance(schedule, (Schedule, OnlinePlan, StaticPlan)):
        raise ValueError(f"schedule is a {type(schedule).__name__}: must be a meancache.Schedule")
    if not callable(velocity_fn):
        raise ValueError(f"velocity_fn={velocity_fn!r}: must be callable as velocity_fn(x, sigma)")
    check_latents(latents)
    sig = as_sigma_list(sigmas, schedule.num_steps)
    if history is not None and not isinstance(history, History):
        raise ValueError(f"history is a {type(history).__name__}: must be a meancache.History")
    plan = StaticPlan(schedule) if isinstance(schedule, Schedule) else schedule
    if isinstance(plan, OnlinePlan):
        plan.restart()  # each run decides afresh: a plan reused from an earlier run must not replay its decisions
    traj = Trajectory(plan, sig, history=history)
    x = latents
    for i in range(plan.num_steps):
        if traj.computed(i):
            v = velocity_fn(x, sig[i])
            check_velocity(v, x, f"velocity_fn at step {i}")
            x = traj.compute(i, x, v)
        else:
            x = traj.skip(i, x)
        traj.end_step(i)
    return x
