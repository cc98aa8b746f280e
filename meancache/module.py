"""``meancache.accelerate(module)``: MeanCache for a bare ``torch.nn.Module`` driven by the caller's own Euler loop.

The module's ``forward`` is replaced on this instance only (never on the class). On compute steps the original
forward runs and its output is returned untouched; on skipped steps the model does not run and the call returns
MeanCache's average-velocity estimate in the same output structure. :func:`disable` puts the original ``forward``
back.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from typing import Callable
from typing import Hashable

import torch

from .history import History
from .history import history_dtype
from .online import OnlinePlan
from . import ops
from .sampler import check_latents
from .sampler import check_velocity
from .schedule import Schedule
from .schedule import StepPlan
from .schedule import fit_steps
from .sigmas import as_sigma_list

__all__ = ["MeanCacheController", "install", "is_accelerated", "disable_module", "ATTRIBUTE"]

#: Name of the attribute an accelerated module carries (``module.meancache``).
ATTRIBUTE = "meancache"


@dataclass
class _Branch:
    """History and output template of one guidance branch within a trajectory."""

    history: History
    rebuild: Callable[[torch.Tensor], Any] | None = None
    out_dtype: torch.dtype | None = None


@dataclass
class RunStats:
    """Counts for the current (or last) trajectory of an accelerated module."""

    steps: int = 0
    model_calls: int = 0
    skipped_calls: int = 0
    branches: int = 0
    history_bytes: int = 0


def _split_output(out) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The velocity tensor in a model output, and a function that puts a new velocity in its place.

    Supported: a tensor; a tuple or list whose first item is the tensor (diffusers' ``return_dict=False``); a
    mapping whose first value is the tensor (diffusers' ``Transformer2DModelOutput``). Other items of a tuple or
    mapping are carried over from the last computed step.
    """
    if isinstance(out, torch.Tensor):
        return out, lambda v: v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        rest = tuple(out[1:])
        kind = type(out)
        if kind in (tuple, list):
            return out[0], lambda v: kind((v, *rest))
        if hasattr(out, "_fields"):  # namedtuple
            return out[0], lambda v: kind(v, *rest)
        return out[0], lambda v: kind((v, *rest))
    if isinstance(out, Mapping) and out:
        key = next(iter(out))
        if isinstance(out[key], torch.Tensor):
            items = dict(out)
            kind = type(out)
            return out[key], lambda v: kind(**{**items, key: v})
    raise ValueError(
        f"the model returned a {type(out).__name__}: meancache needs a tensor, a tuple/list whose first item is "
        "the velocity tensor, or a mapping whose first value is it"
    )


def _fit(schedule: Schedule | None, budget: int | None, n: int) -> tuple[Schedule, list[StepPlan]]:
    """The schedule and per-step plan of an ``n``-step trajectory: ``schedule`` fitted to ``n`` steps, or the
    default schedule at ``budget``; every step computed (with a log line) when there is nothing to skip."""
    wanted = schedule.budget if schedule is not None else budget
    if n < 2 or wanted >= n:
        logging.getLogger("meancache").info(
            "meancache: %d step(s) and a budget of %d: nothing to skip, every step is computed", n, wanted
        )
        return (Schedule.full(n) if n >= 2 else None), [StepPlan(True, 0)] * n
    fitted = fit_steps(schedule, n) if schedule is not None else Schedule.default(budget, n)
    return fitted, fitted.expand()


class MeanCacheController:
    """Per-module MeanCache state, reachable as ``module.meancache`` after :func:`meancache.accelerate`.

    It follows the caller's sampling loop from the sigma of each call: a call at the current step's sigma is
    another guidance branch of that step, a call at the next sigma of the grid starts the next step, and a call at
    ``sigmas[0]`` starts a new trajectory (all history is dropped). Any other sigma raises ValueError and resets.

    Branches: by default the k-th call made at one step is branch k (call order, as cond/uncond pairs are made in
    a fixed order); ``branch_fn(args, kwargs) -> key`` overrides this. Each branch has its own history ring.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        schedule: Schedule,
        sigmas,
        *,
        sigma_fn: Callable[..., float] | None,
        timestep_scale: float,
        latent_arg: str | None,
        timestep_arg: str,
        output_sign: float,
        branch_fn: Callable[[tuple, dict], Hashable] | None,
        online: tuple[int, float] | None = None,
        budget: int | None = None,
    ):
        self.base_schedule = schedule
        self.budget = budget
        self.online = online
        self.sigma_fn = sigma_fn
        self.timestep_scale = timestep_scale
        self.output_sign = output_sign
        self.branch_fn = branch_fn
        self._signature = inspect.signature(module.forward)
        params = list(self._signature.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = {p.name for p in params}
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
        if sigma_fn is None and timestep_arg not in names:
            raise ValueError(
                f"timestep_arg={timestep_arg!r} is not a parameter of {type(module).__name__}.forward"
                f"{self._signature}: pass timestep_arg='<name>' or sigma_fn=<callable returning sigma>"
            )
        self.latent_arg = latent_arg
        self.timestep_arg = timestep_arg
        self.sigmas: list[float] = []
        self.schedule = schedule
        self.stats = RunStats()
        self._plan = ()
        self._pending: dict = {}
        self._branches: dict[Hashable, _Branch] = {}
        self._step = -1
        self._calls_in_step = 0
        self._branches_per_step: int | None = None
        self.set_sigmas(sigmas)

    # -- configuration --------------------------------------------------------------------------------------------
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
        self.sigmas = grid
        if self.online is None:
            self.schedule, self._plan = _fit(self.base_schedule, self.budget, n)
        # half the distance to the nearest other sigma: the widest error a timestep may carry (bf16 rounding)
        self._tol = []
        for i in range(n):
            gaps = [abs(grid[i] - grid[j]) for j in (i - 1, i + 1) if 0 <= j < n]
            self._tol.append(0.5 * min(gaps) if gaps else math.inf)
        self.reset()

    def reset(self) -> None:
        """Forget the current trajectory; the next call must be at ``sigmas[0]``. Storage is kept for reuse."""
        for branch in self._branches.values():
            branch.history.clear()
        if self.online is not None:
            # the online plan is decided afresh for every trajectory
            n, budget = len(self.sigmas) - 1, self.online[0]
            if n >= 2 and budget < n:
                self._plan = OnlinePlan(budget, n, self.online[1])
                self.schedule = None
            else:
                self.schedule, self._plan = _fit(None, budget, n)
        self._pending = {}
        self._branches_active = set()
        self._step = -1
        self._calls_in_step = 0
        self._branches_per_step = None

    # -- per call -------------------------------------------------------------------------------------------------
    def _sigma_of(self, args: tuple, kwargs: dict, bound) -> float:
        if self.sigma_fn is not None:
            value = self.sigma_fn(*args, **kwargs)
        else:
            t = bound.arguments.get(self.timestep_arg)
            if t is None:
                raise ValueError(
                    f"the call passed no {self.timestep_arg!r}: meancache reads each call's sigma from it "
                    "(or pass sigma_fn= to accelerate())"
                )
            if isinstance(t, torch.Tensor):
                # one host read per model call; the whole batch must share one sigma
                lo, hi = torch.stack([t.detach().min(), t.detach().max()]).double().tolist()
                if lo != hi:
                    raise ValueError(
                        f"{self.timestep_arg} holds different values ({lo}..{hi}) across the batch: meancache "
                        "uses one schedule per batch, so every sample must be at the same step"
                    )
                value = lo / self.timestep_scale
            else:
                value = float(t) / self.timestep_scale
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"sigma={value} read from the call is not finite")
        return value

    def _near(self, sigma: float, i: int) -> bool:
        return abs(sigma - self.sigmas[i]) <= self._tol[i]

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
            if self._pending:
                # every branch of step i has run: the online plan decides the steps after it from all of them
                self._plan.observe(i, self._pending)
                self._pending = {}
                if self._plan.known == n - 1:
                    self.schedule = self._plan.schedule()
            self._step = i + 1
            self._calls_in_step = 1
            return i + 1, 0
        if self._near(sigma, 0):
            self.reset()
            self.stats = RunStats()
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
        key = self.branch_fn(args, kwargs) if self.branch_fn is not None else call_index
        try:
            return self._run(original, args, kwargs, x, step, key)
        except BaseException:
            # an interrupted step leaves a half-logged history: drop it so the next call starts clean
            self.reset()
            raise

    def _run(self, original, args, kwargs, x, step, key):
        plan = self._plan[step]
        branch = self._branches.get(key)
        if step == 0 and key not in self._branches_active:
            if isinstance(self._plan, OnlinePlan):
                window = self._plan.window
            else:
                window = self.schedule.window if self.schedule is not None else 1
            if branch is None:
                branch = _Branch(History(window))
                self._branches[key] = branch
            elif branch.history.capacity < window:
                branch.history = History(window)
            branch.history.clear()
            self._branches_active.add(key)
            self.stats.branches = len(self._branches_active)
        elif branch is None or key not in self._branches_active:
            raise ValueError(f"branch {key!r} first appeared at step {step}: every branch must be called at step 0")
        if branch.history.count != step:
            raise ValueError(
                f"branch {key!r} was called twice at step {step} or skipped a step (history at step "
                f"{branch.history.count}); each branch must be called once per step"
            )
        dtype = history_dtype(x.dtype)
        if plan.computed:
            out = original(*args, **kwargs)
            v_out, branch.rebuild = _split_output(out)
            check_velocity(v_out, x, f"model call at step {step}")
            branch.out_dtype = v_out.dtype
            branch.history.push(x, v_out.to(dtype) * self.output_sign)
            if self.online is not None:
                self._pending[key] = v_out
            self.stats.model_calls += 1
            result = out
        else:
            xs, vs = branch.history.prepare(x)
            k = min(plan.order, len(branch.history))
            sig = self.sigmas
            v_out = ops.estimate(
                x, xs, vs, step, k, sig[step - k], sig[step], sig[step + 1], self.output_sign, branch.out_dtype
            )
            branch.history.advance()
            self.stats.skipped_calls += 1
            result = branch.rebuild(v_out)
        self.stats.steps = step + 1
        self.stats.history_bytes = sum(b.history.nbytes for b in self._branches.values())
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
