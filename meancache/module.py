"""``meancache.accelerate(module)``: MeanCache for a bare ``torch.nn.Module`` driven by the caller's own Euler loop.

The module's ``forward`` is replaced on this instance only (never on the class). On compute steps the original
forward runs and its output is returned untouched; on skipped steps the model does not run and the call returns
MeanCache's average-velocity estimate in the same output structure. :func:`disable` puts the original ``forward``
back.

This adapter only works out which step and which guidance branch a call belongs to (from the call's sigma and the
call order); the trajectory itself, its plan, rings and stats, is a :class:`meancache.engine.Trajectory`.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch

from .config import MeanCacheConfig
from .engine import Stats
from .engine import Trajectory
from .history import history_dtype
from .hooks import context_parallel_group
from .outputs import split_output
from .plans import family_of
from .plans import plan_for
from .schedule import Schedule
from .sigmas import as_sigma_list
from .validation import check_latents
from .validation import check_velocity
from .validation import is_real

__all__ = ["MeanCacheController", "RunStats", "install", "is_accelerated", "disable_module", "ATTRIBUTE"]

#: Name of the attribute an accelerated module carries (``module.meancache``).
ATTRIBUTE = "meancache"
#: The former name of :class:`meancache.engine.Stats` for modules (one stats type now).
RunStats = Stats


class MeanCacheController:
    """Per-module MeanCache state, reachable as ``module.meancache`` after :func:`meancache.accelerate`.

    It follows the caller's sampling loop from the sigma of each call: a call at the current step's sigma is
    another guidance branch of that step, a call at the next sigma of the grid starts the next step, and a call at
    ``sigmas[0]`` starts a new trajectory (all history is dropped). Any other sigma raises ValueError and resets.

    Branches: by default the k-th call made at one step is branch k (call order, as cond/uncond pairs are made in
    a fixed order); ``branch_fn(args, kwargs) -> key`` overrides this. Each branch has its own history ring.

    Example:
        >>> import torch, meancache
        >>> model = meancache.accelerate(torch.nn.Identity(), budget=2, sigmas=[1.0, 0.5, 0.0],
        ...                              sigma_fn=lambda x: 1.0)
        >>> model.meancache.schedule.pattern()
        ('CC', '--')
    """

    def __init__(self, module: torch.nn.Module, config: MeanCacheConfig):
        self.config = config
        self.family = family_of(module)
        self._cp_group = context_parallel_group(module)
        self._signature = inspect.signature(module.forward)
        params = list(self._signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = {p.name for p in params}
        latent_arg = config.latent_arg
        if latent_arg is None:
            if not positional:
                raise ValueError(
                    f"{type(module).__name__}.forward{self._signature} has no positional parameter to read the "
                    "latent from: pass latent_arg='<name>'"
                )
            latent_arg = positional[0].name
        elif latent_arg not in names:
            raise ValueError(
                f"latent_arg={latent_arg!r} is not a parameter of {type(module).__name__}.forward{self._signature}"
            )
        if config.sigma_fn is None and config.timestep_arg not in names:
            raise ValueError(
                f"timestep_arg={config.timestep_arg!r} is not a parameter of {type(module).__name__}.forward"
                f"{self._signature}: pass timestep_arg='<name>' or sigma_fn=<callable returning sigma>"
            )
        self.latent_arg = latent_arg
        self.sigmas: list[float] = []
        self._traj: Trajectory | None = None
        self.set_sigmas(config.sigmas)

    # -- configuration --------------------------------------------------------------------------------------------
    @property
    def stats(self) -> Stats:
        """The :class:`~meancache.engine.Stats` of the current (or last) trajectory."""
        return self._traj.stats

    @property
    def schedule(self) -> Schedule | None:
        """The schedule being followed; in online mode the one the last trajectory followed (None until planned
        to its last step)."""
        return self._traj.stats.schedule

    def set_sigmas(self, sigmas) -> None:
        """Use a new sigma grid (``num_steps + 1`` values) from the next call on; resets the trajectory.

        The schedule is resampled to the grid's step count when they differ (see :meth:`Schedule.resample`).
        """
        grid = as_sigma_list(sigmas)
        n = len(grid) - 1
        for i in range(n - 1):
            if grid[i + 1] == grid[i]:
                raise ValueError(
                    f"sigmas[{i}] == sigmas[{i + 1}] = {grid[i]}: accelerate() tells steps apart by sigma, so the "
                    "sigmas the model is called at must be distinct"
                )
        cfg = self.config
        group = cfg.group if cfg.group is not None else self._cp_group
        plan = plan_for(n, schedule=cfg.schedule, budget=cfg.budget, mode=cfg.mode, tolerance=cfg.tolerance,
                        family=self.family, group=group)
        self.sigmas = grid
        self._plan = plan
        # half the distance to the nearest other sigma: the widest error a timestep may carry (bf16 rounding)
        self._tol = []
        for i in range(n):
            gaps = [abs(grid[i] - grid[j]) for j in (i - 1, i + 1) if 0 <= j < n]
            self._tol.append(0.5 * min(gaps) if gaps else math.inf)
        self._traj = None
        self.reset()

    def reset(self) -> None:
        """Forget the current trajectory; the next call must be at ``sigmas[0]``. Storage is kept for reuse."""
        # an online plan is decided afresh for every trajectory; a static one is reused
        plan = self._plan.fresh()
        self._traj = Trajectory(plan, self.sigmas) if self._traj is None else self._traj.renew(plan, self.sigmas)
        self._step = -1
        self._closed = -1
        self._calls_in_step = 0
        self._branches_per_step: int | None = None

    # -- per call -------------------------------------------------------------------------------------------------
    def _sigma_of(self, args: tuple, kwargs: dict, bound) -> float:
        cfg = self.config
        if cfg.sigma_fn is not None:
            value = cfg.sigma_fn(*args, **kwargs)
        else:
            t = bound.arguments.get(cfg.timestep_arg)
            if t is None:
                raise ValueError(
                    f"the call passed no {cfg.timestep_arg!r}: meancache reads each call's sigma from it "
                    "(or pass sigma_fn= to accelerate())"
                )
            if isinstance(t, torch.Tensor):
                # one host read per model call; the whole batch must share one sigma
                lo, hi = torch.stack([t.detach().min(), t.detach().max()]).double().tolist()
                if lo != hi:
                    raise ValueError(
                        f"{cfg.timestep_arg} holds different values ({lo}..{hi}) across the batch: meancache "
                        "uses one schedule per batch, so every sample must be at the same step"
                    )
                value = lo / cfg.timestep_scale
            else:
                if not is_real(t):
                    raise ValueError(f"{cfg.timestep_arg}={t!r}: must be a tensor or a real number (bool excluded)")
                value = float(t) / cfg.timestep_scale
        if not isinstance(value, torch.Tensor) and not is_real(value):
            raise ValueError(f"sigma={value!r} read from the call: must be a real number (bool excluded)")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"sigma={value} read from the call is not finite")
        return value

    def _near(self, sigma: float, i: int) -> bool:
        return abs(sigma - self.sigmas[i]) <= self._tol[i]

    def _close(self, i: int) -> None:
        if self._closed < i:
            self._traj.end_step(i)
            self._closed = i
            if i == len(self.sigmas) - 2:
                self._traj.stats.completed = True

    def _locate(self, sigma: float) -> tuple[int, int]:
        """(step, index of this call within the step); starts a new trajectory at sigmas[0]."""
        n = len(self.sigmas) - 1
        i = self._step
        if i >= 0 and self._near(sigma, i):
            if self._branches_per_step is not None and self._calls_in_step >= self._branches_per_step:
                raise ValueError(
                    f"call {self._calls_in_step + 1} at step {i} (sigma={sigma:.6g}), but step 0 made "
                    f"{self._branches_per_step} call(s): every step must make the same number of model calls"
                )
            self._calls_in_step += 1
            return i, self._calls_in_step - 1
        if i >= 0 and i + 1 < n and self._near(sigma, i + 1):
            if self._branches_per_step is None:
                self._branches_per_step = self._calls_in_step
            # every branch of step i has run: the online plan decides the steps after it from all of them
            self._close(i)
            self._step = i + 1
            self._calls_in_step = 1
            return i + 1, 0
        if self._near(sigma, 0):
            self.reset()
            self._step = 0
            self._calls_in_step = 1
            return 0, 0
        expected = f"sigmas[{i + 1}]={self.sigmas[i + 1]:.6g}" if 0 <= i < n - 1 else "none (trajectory ended)"
        state = f"after step {i}" if i >= 0 else "before the first step"
        self.reset()
        raise ValueError(
            f"sigma={sigma:.6g} read from the call is not on the grid where the sampler should be {state}: "
            f"expected the same step, the next one ({expected}) or a restart at sigmas[0]={self.sigmas[0]:.6g}. "
            "Pass the sampler's sigmas to accelerate(sigmas=...) or module.meancache.set_sigmas(...)"
        )

    def __call__(self, original: Callable, args: tuple, kwargs: dict):
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{exc} (while meancache read the call's arguments)") from None
        x = bound.arguments.get(self.latent_arg)
        check_latents(x, name=f"latent argument {self.latent_arg!r}")
        sigma = self._sigma_of(args, kwargs, bound)
        step, call_index = self._locate(sigma)
        cfg = self.config
        key = cfg.branch_fn(args, kwargs) if cfg.branch_fn is not None else call_index
        try:
            result = self._run(original, args, kwargs, x, step, key)
        except BaseException:
            # an interrupted step leaves a half-logged history: drop it so the next call starts clean
            self.reset()
            raise
        if self._branches_per_step is not None and self._calls_in_step == self._branches_per_step:
            self._close(step)
        return result

    def _run(self, original, args, kwargs, x, step, key):
        traj, sign = self._traj, self.config.output_sign
        branch = traj.branch(step, key)
        if traj.computed(step):
            out = original(*args, **kwargs)
            v_out, branch.rebuild = split_output(out)
            check_velocity(v_out, x, f"model call at step {step}")
            branch.out_dtype = v_out.dtype
            extra = traj.log(step, x, v_out.to(history_dtype(x.dtype)) * sign, key, observed=v_out)
            traj.stats.model_calls += 1
            # the schedule's corrector: the caller steps with the returned velocity, so the correction rides on it
            result = out if extra is None else branch.rebuild((v_out + extra * sign).to(v_out.dtype))
        else:
            v_out = traj.estimate(step, x, key, sign, branch.out_dtype)
            traj.stats.calls_saved += 1
            result = branch.rebuild(v_out)
        traj.stats.steps = step + 1
        return result


class _AcceleratedForward:
    """The ``forward`` an accelerated module carries: routes each call through its controller.

    It holds the module itself, not a bound method of it, so ``copy.deepcopy(module)`` gives a copy whose forward
    runs the *copy's* weights through the copy's own controller (the memo maps the module to its copy).
    Pickling (``pickle``, ``torch.save(module)``) is refused with a way out: a controller holds user callables and
    live trajectory state, which have no stable pickled form.
    """

    def __init__(self, module: torch.nn.Module, controller: "MeanCacheController", own_forward):
        self.module = module
        self.controller = controller
        self.own_forward = own_forward
        functools.update_wrapper(self, own_forward if own_forward is not None else type(module).forward)

    def original(self) -> Callable:
        if self.own_forward is not None:
            return self.own_forward
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args, **kwargs):
        return self.controller(self.original(), args, kwargs)

    def __deepcopy__(self, memo):
        import copy

        module = copy.deepcopy(self.module, memo)
        return _AcceleratedForward(module, copy.deepcopy(self.controller, memo), copy.deepcopy(self.own_forward, memo))

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"an accelerated {type(self.module).__name__} cannot be pickled: call meancache.disable(model) first, "
            "save it (or its state_dict), and accelerate it again after loading"
        )


def install(module: torch.nn.Module, controller: MeanCacheController) -> torch.nn.Module:
    """Route ``module``'s calls through ``controller`` by replacing ``forward`` on this instance only."""
    existing = module.__dict__.get(ATTRIBUTE)
    if isinstance(existing, MeanCacheController):
        raise RuntimeError(
            f"{type(module).__name__} is already accelerated by meancache; call meancache.disable(module) first"
        )
    if ATTRIBUTE in module.__dict__ or hasattr(type(module), ATTRIBUTE):
        raise RuntimeError(f"{type(module).__name__} already has an attribute {ATTRIBUTE!r}; meancache needs it")
    own_forward = module.__dict__.get("forward")
    controller._own_forward = own_forward
    module.forward = _AcceleratedForward(module, controller, own_forward)
    module.__dict__[ATTRIBUTE] = controller
    return module


def is_accelerated(module) -> bool:
    """True when ``module`` carries a meancache controller."""
    return isinstance(getattr(module, "__dict__", {}).get(ATTRIBUTE), MeanCacheController)


def disable_module(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`install`; a module that is not accelerated is returned unchanged."""
    controller = module.__dict__.get(ATTRIBUTE)
    if not isinstance(controller, MeanCacheController):
        return module
    if controller._own_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = controller._own_forward
    del module.__dict__[ATTRIBUTE]
    return module
