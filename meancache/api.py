"""The one-line entry points: ``meancache.accelerate``, ``meancache.disable`` and ``meancache.reset``."""

from __future__ import annotations

import math
from typing import Callable
from typing import Hashable
from typing import Sequence

import torch

from .module import ATTRIBUTE
from .module import MeanCacheController
from .module import disable_module
from .module import install
from .module import is_accelerated
from .online import DEFAULT_TOLERANCE
from .online import OnlinePlan
from .pipeline import accelerate_pipeline
from .pipeline import default_budget
from .pipeline import disable_pipeline
from .pipeline import is_pipeline
from .schedule import Schedule
from .sigmas import as_sigma_list

__all__ = ["accelerate", "disable", "reset"]


def accelerate(
    model: torch.nn.Module,
    schedule: Schedule | None = None,
    *,
    budget: int | None = None,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    timestep_scale: float = 1000.0,
    sigma_fn: Callable[..., float] | None = None,
    latent_arg: str | None = None,
    timestep_arg: str = "timestep",
    output_sign: float = 1.0,
    branch_fn: Callable[[tuple, dict], Hashable] | None = None,
    mode: str = "schedule",
    tolerance: float | None = None,
) -> torch.nn.Module:
    """Make ``model`` skip the model evaluation on MeanCache's skipped steps.

    **Diffusers pipelines** (``accelerate(pipe, budget=10)``): any pipeline whose scheduler is
    ``FlowMatchEulerDiscreteScheduler``. Every ``pipe(...)`` call then runs the transformer only at the schedule's
    compute steps (all guidance branches of a skipped step are skipped) and takes MeanCache's estimate on the other
    steps, at the point where the pipeline hands the guided velocity to the scheduler. The schedule is ``schedule``
    if given, else the published preset of the model family (Qwen-Image, Z-Image) at ``budget``, else
    ``Schedule.default(budget, N)``; it is resampled (with a log line) to each call's ``num_inference_steps``.
    Without ``budget`` and ``schedule`` the budget is about a third of the steps. Each call starts fresh;
    :func:`meancache.summary` reports the last one. Only ``budget``, ``schedule``, ``mode`` and ``tolerance``
    apply to pipelines. ``mode="online"`` needs no schedule: the compute steps are decided during each call from
    the measured stability of the trajectory, within ``budget`` (:mod:`meancache.online` states the rule;
    ``tolerance`` tunes it).

    **Modules**, inside your own Euler loop:

    ``model.forward`` is replaced on this instance (other instances and the class are untouched) and ``model`` is
    returned, with the same call signature. On compute steps the original forward runs and its output is returned
    as is. On skipped steps the model does not run; the call returns MeanCache's estimated average velocity over the
    step, in the same structure as the model's output (tensor, tuple, or diffusers output object).

    ``mode="online"`` (with ``budget``, default about a third of the steps, and optionally ``tolerance``) decides
    each trajectory's compute steps during the run, as for pipelines; with separate guidance calls every branch
    is measured and the least stable one decides, so all branches follow one plan. ``model.meancache.schedule``
    is then the schedule the last trajectory followed (None until it is planned to its last step).

    Each call's sigma comes from ``sigma_fn(*args, **kwargs)`` when given, else from the ``timestep_arg`` argument
    divided by ``timestep_scale`` (diffusers flow-matching transformers take ``timestep = 1000 * sigma``). Calls are
    mapped onto ``sigmas``: the current step's sigma again means another guidance branch of the same step, the next
    sigma the next step, ``sigmas[0]`` a new trajectory. Branches are told apart by call order within a step (the
    k-th call of a step is branch k), or by ``branch_fn(args, kwargs) -> key``; each has its own history.

    Args:
        model: a ``torch.nn.Module`` whose output is the flow velocity (or its negative, see ``output_sign``).
        schedule: a :class:`~meancache.Schedule`; resampled (with a log line) when its step count differs from the
            grid's.
        budget: instead of ``schedule``: use ``Schedule.default(budget, len(sigmas) - 1)``.
        sigmas: the sampler's grid, ``num_steps + 1`` decreasing floats. Required; change it later with
            ``model.meancache.set_sigmas(...)``.
        timestep_scale: ``sigma = timestep / timestep_scale``.
        sigma_fn: ``sigma_fn(*args, **kwargs) -> float``, overriding the timestep rule (e.g. Z-Image's transformer
            takes ``1 - sigma``).
        latent_arg: name of the forward parameter holding the latent x_i (default: the first parameter). It must
            be the sampler's latent itself, not a rescaled copy.
        timestep_arg: name of the forward parameter holding the timestep.
        output_sign: ``-1`` when the model predicts ``-dx/dsigma`` (Z-Image), else ``1``.
        branch_fn: ``branch_fn(args, kwargs) -> hashable`` naming the guidance branch of a call.
        mode: ``"schedule"`` (default) or ``"online"``.
        tolerance: online mode only: relative velocity change tolerated per skipped segment
            (:data:`meancache.online.DEFAULT_TOLERANCE` by default).

    Returns:
        ``model`` itself, patched. ``model.meancache`` holds the state: ``reset()``, ``set_sigmas()``, ``stats``,
        ``schedule``.

    Raises:
        RuntimeError: ``model`` is already accelerated.
        ValueError: for a missing or invalid ``sigmas``/``schedule``/``budget``, or a forward without the named
            parameters.

    Example:
        >>> import torch, meancache
        >>> class Flow(torch.nn.Module):
        ...     def forward(self, x, timestep):
        ...         return x - 1.0
        >>> sigmas = torch.linspace(1, 0, 21)
        >>> model = meancache.accelerate(Flow(), budget=8, sigmas=sigmas)
        >>> x = torch.randn(2, 4)
        >>> for i in range(20):
        ...     v = model(x, timestep=1000 * sigmas[i])
        ...     x = x + (sigmas[i + 1] - sigmas[i]) * v
        >>> model.meancache.stats.model_calls
        8
        >>> _ = meancache.disable(model)
    """
    if is_pipeline(model):
        extra = {
            name: value
            for name, value in dict(
                sigmas=sigmas, sigma_fn=sigma_fn, latent_arg=latent_arg, branch_fn=branch_fn
            ).items()
            if value is not None
        }
        if extra:
            raise ValueError(
                f"{sorted(extra)} apply to accelerate(module) only: a pipeline's sigmas, latents and branches come "
                "from its scheduler and its own calls"
            )
        return accelerate_pipeline(model, budget=budget, schedule=schedule, mode=mode, tolerance=tolerance)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model is a {type(model).__name__}: accelerate() takes a diffusers pipeline or a torch.nn.Module"
        )
    if mode not in ("schedule", "online"):
        raise ValueError(f"mode={mode!r}: must be 'schedule' (static schedule) or 'online' (decided during the run)")
    if is_accelerated(model):
        raise RuntimeError(
            f"{type(model).__name__} is already accelerated by meancache; call meancache.disable(model) first"
        )
    if sigmas is None:
        raise ValueError(
            "sigmas=None: accelerate(module) needs the sampler's sigma grid (num_steps + 1 values) to know each "
            "skipped step's size"
        )
    num_steps = len(as_sigma_list(sigmas)) - 1
    online = None
    if mode == "online":
        if schedule is not None:
            raise ValueError("mode='online' decides the compute steps itself: pass budget=, not schedule=")
        online = (default_budget(num_steps) if budget is None else budget,
                  DEFAULT_TOLERANCE if tolerance is None else tolerance)
        OnlinePlan(online[0], 2, online[1])  # validates budget and tolerance before anything is installed
    elif tolerance is not None:
        raise ValueError("tolerance= applies to mode='online' only")
    elif schedule is None:
        if budget is None:
            raise ValueError("pass schedule=<meancache.Schedule> or budget=<int>")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
            raise ValueError(f"budget={budget!r}: must be an int >= 2")
    elif not isinstance(schedule, Schedule):
        raise ValueError(f"schedule is a {type(schedule).__name__}: must be a meancache.Schedule")
    elif budget is not None and budget != schedule.budget:
        raise ValueError(f"budget={budget} contradicts schedule.budget={schedule.budget}: pass one of them")
    if output_sign not in (1, -1):
        raise ValueError(f"output_sign={output_sign!r}: must be 1 or -1")
    if not (isinstance(timestep_scale, (int, float)) and math.isfinite(timestep_scale) and timestep_scale > 0):
        raise ValueError(f"timestep_scale={timestep_scale!r}: must be a finite number > 0")
    for name, fn in (("sigma_fn", sigma_fn), ("branch_fn", branch_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name}={fn!r}: must be callable")
    controller = MeanCacheController(
        model,
        schedule,
        sigmas,
        sigma_fn=sigma_fn,
        timestep_scale=float(timestep_scale),
        latent_arg=latent_arg,
        timestep_arg=timestep_arg,
        output_sign=float(output_sign),
        branch_fn=branch_fn,
        online=online,
        budget=budget,
    )
    return install(model, controller)


def disable(model):
    """Remove MeanCache from ``model`` (a module or a pipeline): the original ``forward`` (module) or class
    (pipeline) is restored, so calls are bit-identical again.

    Calling it on a model that is not accelerated does nothing (safe in ``finally`` blocks). Returns ``model``.

    Example:
        >>> import torch, meancache
        >>> m = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0], sigma_fn=lambda x: 1.0)
        >>> meancache.disable(m) is m, hasattr(m, "meancache")
        (True, False)
    """
    if is_pipeline(model):
        return disable_pipeline(model)
    return disable_module(model)


def reset(model: torch.nn.Module) -> None:
    """Start a new trajectory on an accelerated ``model`` (same as ``model.meancache.reset()``).

    Example:
        >>> import torch, meancache
        >>> m = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0], sigma_fn=lambda x: 1.0)
        >>> meancache.reset(m)
    """
    if not is_accelerated(model):
        raise ValueError(f"{type(model).__name__} is not accelerated by meancache")
    model.__dict__[ATTRIBUTE].reset()
