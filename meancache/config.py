"""``MeanCacheConfig``: every option of :func:`meancache.accelerate` in one validated dataclass, in the style of
diffusers' cache configs (``FirstBlockCacheConfig``, ``MagCacheConfig``, ...)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable
from typing import Hashable

from .schedule import Schedule
from .validation import is_int
from .validation import is_real

__all__ = ["MeanCacheConfig"]

#: Options that only a bare module's own sampling loop needs: a pipeline takes them from its scheduler and calls.
MODULE_ONLY = ("sigmas", "sigma_fn", "latent_arg", "branch_fn")


@dataclass(frozen=True)
class MeanCacheConfig:
    """How MeanCache accelerates a pipeline or a module.

    Attributes:
        schedule: the :class:`~meancache.Schedule` to follow (resampled to each call's step count).
        budget: model evaluations per trajectory, instead of ``schedule``: the family preset at that budget, else
            ``Schedule.default``. Neither given: about a third of the steps.
        mode: ``"schedule"`` (a static schedule) or ``"online"`` (compute steps decided during the run).
        tolerance: online mode only: relative velocity change tolerated per skipped segment.
        group: online mode only: the ``torch.distributed`` process group whose ranks compute one trajectory
            together and must take identical decisions. Default: the transformer's context-parallel group when
            diffusers' ``enable_parallelism`` is on, else none (data-parallel requests stay independent).
        sigmas: modules only, required there: the sampler's grid, ``N + 1`` decreasing floats.
        timestep_scale: modules: ``sigma = timestep / timestep_scale`` (diffusers transformers take ``1000 sigma``).
        sigma_fn: modules: ``sigma_fn(*args, **kwargs) -> float``, overriding the timestep rule.
        latent_arg: modules: the forward parameter holding the latent (default: the first one).
        timestep_arg: modules: the forward parameter holding the timestep.
        output_sign: modules: ``-1`` when the model predicts ``-dx/dsigma`` (Z-Image).
        branch_fn: modules: ``branch_fn(args, kwargs) -> key`` naming the guidance branch of a call.

    Integer fields take any integer (numpy integers too, ``bool`` not), real fields any real number (``bool`` not):
    the rule of :func:`meancache.validation.is_int` / :func:`~meancache.validation.is_real`, as everywhere in the
    package. Valid numpy scalars are stored as Python ``int`` / ``float``.

    Raises:
        ValueError: from :meth:`validate`, naming the field, the value and the rule.

    Example:
        >>> cfg = MeanCacheConfig(budget=10)
        >>> cfg.validate(for_pipeline=True).budget
        10
        >>> MeanCacheConfig(budget=1).validate(for_pipeline=True)
        Traceback (most recent call last):
        ...
        ValueError: budget=1: must be an int >= 2
    """

    schedule: Schedule | None = None
    budget: int | None = None
    mode: str = "schedule"
    tolerance: float | None = None
    group: object = None
    sigmas: object = None
    timestep_scale: float = 1000.0
    sigma_fn: Callable[..., float] | None = None
    latent_arg: str | None = None
    timestep_arg: str = "timestep"
    output_sign: float = 1.0
    branch_fn: Callable[[tuple, dict], Hashable] | None = None

    def __post_init__(self):
        # Numpy scalars pass the checks; storing them as Python numbers keeps every consumer downstream (the online
        # plan, the schedule constructors, log lines) from having to accept them again. Invalid values are left as
        # they are, for validate() to name.
        for name, ok, cast in (("budget", is_int, int), ("tolerance", is_real, float),
                               ("timestep_scale", is_real, float), ("output_sign", is_real, float)):
            value = getattr(self, name)
            if ok(value) and type(value) is not cast:
                object.__setattr__(self, name, cast(value))

    def replace(self, **changes) -> "MeanCacheConfig":
        """A copy with ``changes``; unknown names raise ``TypeError`` naming them."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"accelerate() got unknown option(s) {unknown}; see meancache.MeanCacheConfig")
        return dataclasses.replace(self, **changes)

    def validate(self, *, for_pipeline: bool) -> "MeanCacheConfig":
        """Check every field (and the module-only ones against ``for_pipeline``); returns ``self``."""
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(f"schedule is a {type(self.schedule).__name__}: must be a meancache.Schedule")
        if self.budget is not None and (not is_int(self.budget) or self.budget < 2):
            raise ValueError(f"budget={self.budget!r}: must be an int >= 2")
        if self.schedule is not None and self.budget is not None and self.budget != self.schedule.budget:
            raise ValueError(
                f"budget={self.budget} contradicts schedule.budget={self.schedule.budget}: pass one of them"
            )
        if self.mode not in ("schedule", "online"):
            raise ValueError(
                f"mode={self.mode!r}: must be 'schedule' (static schedule) or 'online' (decided during the run)"
            )
        if self.mode == "online":
            if self.schedule is not None:
                raise ValueError("mode='online' decides the compute steps itself: pass budget=, not schedule=")
            tol = self.tolerance
            if tol is not None and (not is_real(tol) or not math.isfinite(tol) or tol <= 0):
                raise ValueError(f"tolerance={tol!r}: must be a finite real number > 0 (not a bool)")
        elif self.tolerance is not None:
            raise ValueError("tolerance= applies to mode='online' only")
        elif self.group is not None:
            raise ValueError("group= applies to mode='online' only: a static schedule needs no communication")
        if for_pipeline:
            extra = sorted(name for name in MODULE_ONLY if getattr(self, name) is not None)
            if extra:
                raise ValueError(
                    f"{extra} apply to accelerate(module) only: a pipeline's sigmas, latents and branches come "
                    "from its scheduler and its own calls"
                )
            return self
        if self.sigmas is None:
            raise ValueError(
                "sigmas=None: accelerate(module) needs the sampler's sigma grid (num_steps + 1 values) to know each "
                "skipped step's size"
            )
        if not is_real(self.output_sign) or self.output_sign not in (1, -1):
            raise ValueError(f"output_sign={self.output_sign!r}: must be the number 1 or -1 (not a bool)")
        scale = self.timestep_scale
        if not is_real(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"timestep_scale={scale!r}: must be a finite real number > 0 (not a bool)")
        for name in ("sigma_fn", "branch_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ValueError(f"{name}={fn!r}: must be callable")
        for name in ("latent_arg", "timestep_arg"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r}: must be the name (str) of a forward parameter")
        return self
