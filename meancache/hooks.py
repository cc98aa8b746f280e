"""Glue to diffusers' pipelines and schedulers, shared by acceleration and calibration recording: recognise a
pipeline, check its scheduler, and hook ``scheduler.step`` for the duration of one call.

diffusers stays optional: nothing here imports it at module level.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

from .sigmas import as_sigma_list

__all__ = ["is_pipeline", "check_scheduler", "hooked_step", "sigma_grid", "context_parallel_group"]

#: Guards the check-and-install of scheduler hooks: two calls on pipelines that share one scheduler object must
#: not both patch it.
_LOCK = threading.Lock()
_MARK = "_meancache_original"


def is_pipeline(obj) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (checked by type name, so diffusers stays optional).

    Example:
        >>> is_pipeline(object())
        False
    """
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def check_scheduler(scheduler) -> None:
    """Raise ValueError unless ``scheduler`` is a deterministic ``FlowMatchEulerDiscreteScheduler``.

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> check_scheduler(FlowMatchEulerDiscreteScheduler())
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"pipe.scheduler is a {type(scheduler).__name__}: meancache supports pipelines whose scheduler is "
            "FlowMatchEulerDiscreteScheduler (FLUX, Qwen-Image, Z-Image, SD3, Wan, HunyuanVideo, ...)"
        )
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError(
            "pipe.scheduler has stochastic_sampling=True: meancache supports the deterministic Euler step only"
        )


def sigma_grid(scheduler, start: int = 0) -> list[float]:
    """The scheduler's sigma grid from step ``start`` on, as Python floats (one host read), checked as any grid
    is (:func:`meancache.sigmas.as_sigma_list`: a CPU or CUDA tensor, finite, decreasing).

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> s = FlowMatchEulerDiscreteScheduler(); s.set_timesteps(4)
        >>> len(sigma_grid(s)), sigma_grid(s)[-1]
        (5, 0.0)
    """
    return as_sigma_list(scheduler.sigmas)[start:]


def context_parallel_group(model):
    """The process group of ``model``'s context parallelism (diffusers' ``enable_parallelism``), or None.

    The ranks of that group compute one trajectory together, so an online plan must decide the same on all of
    them. Read from diffusers' private ``_parallel_config`` (0.42): None whenever it is absent or shaped otherwise.

    Example:
        >>> import torch
        >>> context_parallel_group(torch.nn.Linear(2, 2)) is None
        True
    """
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return mesh.get_group() if mesh is not None else None


@contextlib.contextmanager
def hooked_step(scheduler, make_hook: Callable[[Callable], Callable]):
    """Replace ``scheduler.step`` by ``make_hook(original_step)`` inside the ``with`` block, then restore exactly
    what the instance had before (its own patch, or nothing), also when the block raises.

    Raises:
        RuntimeError: the scheduler is already hooked by another meancache call (pipelines sharing one scheduler
            object cannot run at the same time).

    Example:
        >>> class Sched:
        ...     def step(self, v):
        ...         return v
        >>> s = Sched()
        >>> with hooked_step(s, lambda original: lambda v: original(v) + 1):
        ...     s.step(1)
        2
        >>> "step" in vars(s)
        False
    """
    with _LOCK:
        own = scheduler.__dict__.get("step")
        if hasattr(own, _MARK):
            raise RuntimeError(
                "the pipeline's scheduler is in use by another accelerated call right now (pipelines that share "
                "one scheduler object cannot run at the same time): give each pipeline its own scheduler"
            )
        original = scheduler.step
        hook = make_hook(original)
        setattr(hook, _MARK, original)
        scheduler.step = hook
    try:
        yield
    finally:
        with _LOCK:
            if own is None:
                scheduler.__dict__.pop("step", None)
            else:
                scheduler.__dict__["step"] = own
