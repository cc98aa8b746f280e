"""The one-line entry points: ``meancache.accelerate``, ``meancache.disable``, ``meancache.reset`` and
``meancache.summary``. Options are validated once, here, as a :class:`~meancache.config.MeanCacheConfig`."""

from __future__ import annotations

import torch

from .config import MeanCacheConfig
from .engine import Stats
from .module import ATTRIBUTE
from .module import MeanCacheController
from .module import disable_module
from .module import install
from .module import is_accelerated
from .pipeline import STATE
from .pipeline import accelerate_pipeline
from .pipeline import disable_pipeline
from .pipeline import is_pipeline
from .schedule import Schedule

__all__ = ["accelerate", "disable", "reset", "summary"]


def accelerate(model, config: MeanCacheConfig | Schedule | None = None, **options):
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
        model: a diffusers pipeline, or a ``torch.nn.Module`` whose output is the flow velocity (or its negative,
            see ``output_sign``).
        config: a :class:`~meancache.MeanCacheConfig`, or a :class:`~meancache.Schedule` (short for
            ``schedule=``). ``options`` override its fields.
        **options: the fields of :class:`~meancache.MeanCacheConfig`: ``schedule``, ``budget``, ``mode``,
            ``tolerance`` (pipelines and modules); ``sigmas`` (required for modules; change it later with
            ``model.meancache.set_sigmas(...)``), ``timestep_scale``, ``sigma_fn``, ``latent_arg``,
            ``timestep_arg``, ``output_sign``, ``branch_fn`` (modules only).

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
    if isinstance(config, Schedule):
        if "schedule" in options:
            raise ValueError("schedule given twice: positionally and as schedule=")
        config, options = None, {**options, "schedule": config}
    elif config is not None and not isinstance(config, MeanCacheConfig):
        raise ValueError(f"config is a {type(config).__name__}: must be a meancache.MeanCacheConfig or a Schedule")
    cfg = (config or MeanCacheConfig()).replace(**options)
    pipeline = is_pipeline(model)
    if not pipeline and not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"model is a {type(model).__name__}: accelerate() takes a diffusers pipeline or a torch.nn.Module"
        )
    if _accelerated(model):
        raise RuntimeError(
            f"{type(model).__name__} is already accelerated by meancache; call meancache.disable(model) first"
        )
    cfg.validate(for_pipeline=pipeline)
    if pipeline:
        return accelerate_pipeline(model, cfg)
    return install(model, MeanCacheController(model, cfg))


def _accelerated(model) -> bool:
    return is_accelerated(model) or STATE in getattr(model, "__dict__", {})


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


def reset(model) -> None:
    """Start afresh on an accelerated ``model``: a module or a pipeline.

    **Modules:** start a new trajectory (same as ``model.meancache.reset()``), for a loop that stops early or
    starts again from a sigma other than ``sigmas[0]``.

    **Pipelines:** every call already starts a fresh trajectory, so there is no trajectory to reset. Between calls
    the pipeline keeps the history rings for the next call to reuse (a few latents of memory), the static plan
    placed for each step count, and the last call's stats; reset drops all three: the rings' memory is released,
    the next call places (and logs) its plan again, and :func:`summary` is empty until that call. The next call's
    output is the same as without the reset.

    Raises:
        ValueError: ``model`` is not accelerated.
        RuntimeError: the pipeline is running a call (from a step-end callback, or another thread).

    Example:
        >>> import torch, meancache
        >>> m = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0], sigma_fn=lambda x: 1.0)
        >>> meancache.reset(m)
        >>> from meancache.examples.tiny_pipelines import build
        >>> pipe, kw, info = build("flux")
        >>> _ = meancache.accelerate(pipe, budget=4)
        >>> _ = pipe(**kw)
        >>> meancache.summary(pipe).history_bytes > 0
        True
        >>> meancache.reset(pipe)
        >>> meancache.summary(pipe).history_bytes
        0
    """
    if is_pipeline(model) and STATE in model.__dict__:
        model.__dict__[STATE].reset(type(model).__name__)
        return
    if not is_accelerated(model):
        raise ValueError(f"{type(model).__name__} is not accelerated by meancache (call meancache.accelerate first)")
    model.__dict__[ATTRIBUTE].reset()


def summary(model) -> Stats:
    """What MeanCache did in the last call of an accelerated pipeline, or the current trajectory of an accelerated
    module: a :class:`~meancache.engine.Stats`.

    Raises:
        ValueError: ``model`` is not accelerated.

    Example:
        >>> import torch, meancache
        >>> m = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0], sigma_fn=lambda x: 1.0)
        >>> meancache.summary(m).model_calls
        0
    """
    if is_pipeline(model) and STATE in model.__dict__:
        return model.__dict__[STATE].last
    if is_accelerated(model):
        return model.__dict__[ATTRIBUTE].stats
    raise ValueError(f"{type(model).__name__} is not accelerated by meancache (call meancache.accelerate first)")
