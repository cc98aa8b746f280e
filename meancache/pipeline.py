"""``meancache.accelerate(pipe)``: MeanCache for diffusers flow-matching pipelines.

Where it hooks (algorithm.md §7: cache the guided velocity where the pipeline hands it to the scheduler):

* ``pipe.scheduler.step`` sees the post-CFG velocity of every step. On compute steps the scheduler's own Euler step
  runs and ``(x_i, v_i)`` is logged into the history ring; on skipped steps the fused ``meancache::skip_step`` op
  estimates the average velocity, logs it and takes the step, and the scheduler's step counter is advanced.
* Calls of ``pipe.transformer`` (and ``pipe.transformer_2``) go through a thin stand-in during a pipeline call. On
  skipped steps it returns the previous output of the same call slot without running the transformer, so every
  guidance branch is skipped, whether the pipeline makes separate calls (Qwen-Image's true CFG) or one batched call.
  The stale value only feeds guidance arithmetic whose result the scheduler hook then ignores.

Nothing of meancache runs inside the transformer, so ``torch.compile(pipe.transformer, fullgraph=True)`` is
unaffected. The pipeline object itself is switched to a per-instance subclass whose ``__call__`` sets the hooks up
and tears them down (also when the call raises), so every call starts from a fresh state, other instances are
untouched, and :func:`meancache.disable` restores the original class.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from dataclasses import field

import torch

from . import ops
from .history import History
from .module import _split_output
from .online import DEFAULT_TOLERANCE
from .online import OnlinePlan
from .sampler import check_velocity
from .schedule import Schedule
from .schedule import StepPlan
from .schedule import fit_steps
from .schedule import preset_names

__all__ = ["PipelineSummary", "accelerate_pipeline", "disable_pipeline", "is_pipeline", "summary"]

logger = logging.getLogger("meancache")

STATE = "_meancache"
TRANSFORMER_NAMES = ("transformer", "transformer_2")
#: Pipeline class-name prefixes and the preset family whose published schedules they use.
FAMILIES = {"QwenImage": "qwen-image", "ZImage": "z-image", "Digits": "digits"}
#: Budget used when neither ``budget`` nor ``schedule`` is given: about a third of the steps, like the middle
#: published budget (17 of 50).
DEFAULT_BUDGET_FRACTION = 0.34


def default_budget(num_steps: int) -> int:
    """The budget used when none is given: about a third of ``num_steps``, at least 2.

    >>> default_budget(50), default_budget(3)
    (17, 2)
    """
    return max(2, math.ceil(DEFAULT_BUDGET_FRACTION * num_steps))
#: Step count the published presets were calibrated at.
PRESET_STEPS = 50


def is_pipeline(obj) -> bool:
    """True for a diffusers ``DiffusionPipeline`` (checked by type name, so diffusers stays optional)."""
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


@dataclass
class PipelineSummary:
    """What MeanCache did during the last call of an accelerated pipeline (:func:`meancache.summary`)."""

    num_steps: int = 0
    computed_steps: int = 0
    skipped_steps: int = 0
    transformer_calls: int = 0
    transformer_calls_saved: int = 0
    schedule: Schedule | None = None
    wall_time_s: float = 0.0
    history_bytes: int = 0
    latent_edits: int = 0
    completed: bool = False

    def __str__(self) -> str:
        total = self.transformer_calls + self.transformer_calls_saved
        lines = [
            f"meancache: {self.computed_steps} computed + {self.skipped_steps} skipped of {self.num_steps} steps"
            + ("" if self.completed else " (call did not complete)"),
            f"  transformer calls: {self.transformer_calls} made, {self.transformer_calls_saved} saved of {total}",
            f"  wall time: {self.wall_time_s:.3f} s, history: {self.history_bytes / 1e6:.2f} MB",
        ]
        if self.schedule is not None:
            lines.append(f"  schedule: {self.schedule.pattern()[0]}  (K: {self.schedule.pattern()[1]})")
        return "\n".join(lines)


class _TransformerStandIn:
    """Stands in for ``pipe.transformer`` during a call: forwards every attribute, decides every call."""

    __slots__ = ("_mc_target", "_mc_state")

    def __init__(self, target, state):
        object.__setattr__(self, "_mc_target", target)
        object.__setattr__(self, "_mc_state", state)

    # isinstance(pipe.transformer, torch.nn.Module) and similar checks in the pipeline keep working
    @property
    def __class__(self):
        return type(self._mc_target)

    def __getattr__(self, name):
        return getattr(self._mc_target, name)

    def __setattr__(self, name, value):
        setattr(self._mc_target, name, value)

    def __call__(self, *args, **kwargs):
        return self._mc_state.transformer_call(self._mc_target, args, kwargs)


@dataclass
class _PipelineState:
    """Per-pipeline MeanCache configuration and the state of the call in progress."""

    schedule: Schedule | None
    budget: int | None
    family: str | None
    tolerance: float | None = None
    history: History = field(default_factory=lambda: History(6))
    plan: tuple | None = None
    grid: list | None = None
    start: int = 0
    step: int = 0
    calls_in_step: int = 0
    outputs: dict = field(default_factory=dict)
    last: PipelineSummary = field(default_factory=PipelineSummary)
    original_class: type | None = None
    # one call at a time per pipeline: a second concurrent call would share this state and the hooks
    busy: threading.Lock = field(default_factory=threading.Lock)
    produced: torch.Tensor | None = None
    produced_version: int = -1

    def config(self) -> dict:
        """The keyword arguments of :func:`accelerate_pipeline` that recreate this configuration."""
        if self.tolerance is not None:
            return dict(budget=self.budget, mode="online", tolerance=self.tolerance)
        return dict(budget=self.budget, schedule=self.schedule)

    # -- per call -------------------------------------------------------------------------------------------------
    def begin(self) -> None:
        self.plan = None
        self.grid = None
        self.step = 0
        self.calls_in_step = 0
        self.outputs = {}
        self.history.clear()
        self.last = PipelineSummary()
        self.produced = None
        self.produced_version = -1

    def resolve(self, scheduler) -> None:
        """Read the call's sigma grid once (one host read per call) and fit the schedule to its step count."""
        start = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        sigmas = scheduler.sigmas
        if not isinstance(sigmas, torch.Tensor) or sigmas.device.type not in ("cpu", "cuda"):
            where = sigmas.device if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__
            raise ValueError(
                f"pipe.scheduler.sigmas is on {where}: meancache reads the sigma grid from a CPU or CUDA tensor"
            )
        grid = [float(s) for s in sigmas.detach().to("cpu", torch.float64).tolist()][start:]
        n = len(grid) - 1
        if n < 1:
            raise ValueError(f"the scheduler's sigma grid has {len(grid)} value(s) from step {start}: nothing to do")
        self.grid, self.start = grid, start
        self.last.num_steps = n
        if self.tolerance is not None:
            budget = self.budget if self.budget is not None else default_budget(n)
            if n >= 2 and budget < n:
                plan = OnlinePlan(budget, n, self.tolerance)
                if self.history.capacity < plan.window:
                    self.history = History(plan.window)
                self.plan = plan
                return
            schedule = None
        else:
            schedule = self.schedule_for(n)
        if schedule is None or schedule.budget == n:
            logger.info("meancache: %d step(s) and a budget of %s: nothing to skip, every step is computed", n,
                        self.budget if schedule is None else schedule.budget)
            self.plan = [StepPlan(True, 0)] * n
            self.last.schedule = Schedule.full(n) if n >= 2 else None
            return
        if self.history.capacity < schedule.window:
            self.history = History(schedule.window)
        self.plan = schedule.expand()
        self.last.schedule = schedule

    def schedule_for(self, n: int) -> Schedule | None:
        """The schedule of a call with ``n`` steps; None when there is nothing to skip (fewer than 2 steps)."""
        if n < 2:
            return None
        if self.schedule is not None:
            if self.schedule.budget >= n:
                return Schedule.full(n)
            return fit_steps(self.schedule, n)
        budget = self.budget if self.budget is not None else default_budget(n)
        if budget >= n:
            return Schedule.full(n)
        if self.family is not None and budget in preset_names().get(self.family, ()):
            if n != PRESET_STEPS:
                logger.info(
                    "meancache: %s preset (budget %d, %d steps) resampled to this call's %d steps",
                    self.family,
                    budget,
                    PRESET_STEPS,
                    n,
                )
            return Schedule.preset(self.family, budget, num_steps=n)
        return Schedule.default(budget, n)

    def transformer_call(self, target, args, kwargs):
        if self.plan is None or self.plan[self.step].computed:
            out = target(*args, **kwargs)
            self.outputs[self.calls_in_step] = out
            self.calls_in_step += 1
            self.last.transformer_calls += 1
            return out
        slot = self.calls_in_step
        self.calls_in_step += 1
        self.last.transformer_calls_saved += 1
        if slot in self.outputs:
            return self.outputs[slot]
        # A call no compute step has made yet (SD3's skip-layer guidance starts after a few steps, a callback can
        # add a branch): it is skipped too. Its value only feeds guidance arithmetic whose result the scheduler
        # hook ignores on this step, so a zero velocity shaped like the call's latent stands in for it.
        return _placeholder_output(self.outputs[0], args, kwargs)

    def scheduler_step(self, scheduler, original_step, model_output, timestep, sample, *args, **kwargs):
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("per_token_timesteps is not supported by meancache: the schedule needs one sigma per step")
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        if self.plan is None:
            self.resolve(scheduler)
        i = scheduler.step_index - self.start
        if not 0 <= i < len(self.plan):
            raise ValueError(f"scheduler step {scheduler.step_index} is outside this call's {len(self.plan)} steps")
        if i != self.step:
            raise ValueError(f"scheduler is at step {i} but meancache expected step {self.step}")
        self._follow_edits(sample, i)
        plan = self.plan[i]
        if plan.computed:
            check_velocity(model_output, sample, f"the pipeline's velocity at step {i}")
            self.history.push(sample, model_output)
            result = original_step(model_output, timestep, sample, *args, **kwargs)
            self.last.computed_steps += 1
            if isinstance(self.plan, OnlinePlan):
                self.plan.observe(i, model_output)
                if self.plan.known == len(self.plan) - 1:
                    self.last.schedule = self.plan.schedule()
        else:
            xs, vs = self.history.prepare(sample)
            k = min(plan.order, len(self.history))
            g = self.grid
            x_next = ops.skip_step(sample, xs, vs, i, k, g[i - k], g[i], g[i + 1])
            self.history.advance()
            scheduler._step_index += 1
            # the scheduler returns its sample in the velocity's dtype; so do we
            x_next = x_next.to(model_output.dtype)
            if kwargs.get("return_dict", True):
                from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
                    FlowMatchEulerDiscreteSchedulerOutput,
                )

                result = FlowMatchEulerDiscreteSchedulerOutput(prev_sample=x_next)
            else:
                result = (x_next,)
            self.last.skipped_steps += 1
        self.step += 1
        self.calls_in_step = 0
        self.last.history_bytes = self.history.nbytes
        produced = result[0] if isinstance(result, tuple) else result.prev_sample
        self.produced, self.produced_version = produced, produced._version
        return result

    def _follow_edits(self, sample: torch.Tensor, i: int) -> None:
        """Re-anchor the history when the latent reaching step ``i`` is not the one step ``i - 1`` produced.

        A ``callback_on_step_end`` may clamp, rescale or blend the latents between steps. The estimator reads the
        trajectory from latent differences ``x_i - x_j`` (algorithm.md §2.2), so an edit would enter it as a
        velocity. Shifting every logged latent by the edit ``d = x_i' - x_i`` keeps those differences what the
        sampler's own steps made them, while the run carries on from the edited latent. The check is metadata
        only (same tensor, same in-place version counter); only a different tensor object is compared by value.
        """
        produced, self.produced = self.produced, None
        if produced is None or len(self.history) == 0:
            return
        if sample is produced and sample._version == self.produced_version:
            return
        if sample is not produced and sample.shape == produced.shape and sample.device == produced.device:
            # a copy or a cast of the produced latent (a host read, only when the pipeline swapped the tensor)
            if torch.equal(sample, produced.to(sample.dtype)):
                return
        if sample.shape != produced.shape:
            raise ValueError(
                f"the latent reaching step {i} has shape {tuple(sample.shape)}, step {i - 1} produced "
                f"{tuple(produced.shape)}: a callback may edit the latents' values, not their shape"
            )
        if sample is produced:
            # edited in place: the values before the edit are gone, but the ring holds x_{i-1} and v_{i-1}
            prev = self.history.count - 1
            before = self.history.x(prev) + (self.grid[i] - self.grid[i - 1]) * self.history.v(prev)
        else:
            before = produced
        self.history.shift(sample.to(self.history.xs.dtype) - before.to(self.history.xs.dtype))
        self.last.latent_edits += 1
        if self.last.latent_edits == 1:
            logger.info("meancache: the latents were changed between steps %d and %d (a step-end callback?); "
                        "the history is re-anchored at the changed latent", i - 1, i)


def _placeholder_output(template, args: tuple, kwargs: dict):
    """A stand-in output for a transformer call that no compute step has made: ``template``'s structure with a
    zero velocity shaped like the call's latent (``hidden_states`` or the first argument), or ``template`` itself
    when the latent is not one tensor."""
    latent = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(latent, torch.Tensor):
        return template
    _, rebuild = _split_output(template)
    return rebuild(torch.zeros_like(latent))


#: Guards the check-and-install of hooks, so two calls on pipelines that share one scheduler cannot both patch it.
_HOOKS_LOCK = threading.Lock()


def _step_hook(state: _PipelineState, scheduler, original_step):
    def step(model_output, timestep, sample, *a, **kw):
        return state.scheduler_step(scheduler, original_step, model_output, timestep, sample, *a, **kw)

    step._meancache_original = original_step
    return step


def _install_hooks(pipe, state: _PipelineState) -> tuple:
    """Put the scheduler hook and the transformer stand-ins in place; returns what :func:`_remove_hooks` restores."""
    scheduler = pipe.scheduler
    with _HOOKS_LOCK:
        own_step = scheduler.__dict__.get("step")
        if hasattr(own_step, "_meancache_original"):
            raise RuntimeError(
                f"{type(pipe).__name__}.scheduler is in use by another accelerated call right now (pipelines that "
                "share one scheduler object cannot run at the same time): give each pipeline its own scheduler"
            )
        swapped = {}
        for name in TRANSFORMER_NAMES:
            target = pipe.__dict__.get(name)
            if type(target) is _TransformerStandIn:  # never treat a stand-in as the original
                target = target._mc_target
            if target is not None:
                swapped[name] = target
                pipe.__dict__[name] = _TransformerStandIn(target, state)
        scheduler.step = _step_hook(state, scheduler, scheduler.step)
    return scheduler, own_step, swapped


def _remove_hooks(pipe, saved: tuple) -> None:
    scheduler, own_step, swapped = saved
    with _HOOKS_LOCK:
        if own_step is None:
            scheduler.__dict__.pop("step", None)
        else:
            scheduler.__dict__["step"] = own_step
        pipe.__dict__.update(swapped)


def _call(pipe, *args, **kwargs):
    """The accelerated pipeline's ``__call__``: hooks in, the original call, hooks out."""
    state: _PipelineState = pipe.__dict__[STATE]
    # refused before any work: a second call would share the hooks and the history of the running one
    if not state.busy.acquire(blocking=False):
        raise RuntimeError(
            f"this {type(pipe).__name__} is already running a call (in another thread, or a callback calling the "
            "pipeline again): an accelerated pipeline runs one call at a time; use one pipeline per thread"
        )
    try:
        _check_scheduler(pipe.scheduler)
        state.begin()
        saved = _install_hooks(pipe, state)
        t0 = time.perf_counter()
        try:
            result = super(type(pipe), pipe).__call__(*args, **kwargs)
            state.last.completed = True
            return result
        finally:
            # restore even when the call raised, so nothing stale reaches the next call
            _remove_hooks(pipe, saved)
            state.last.wall_time_s = time.perf_counter() - t0
            state.plan = None
            state.produced = None
    finally:
        state.busy.release()


def _reduce_ex(pipe, protocol):
    """Pickle and deep-copy an accelerated pipeline as its original class, accelerated again when loaded."""
    state: _PipelineState = pipe.__dict__[STATE]
    if state.busy.locked():
        raise RuntimeError(f"this {type(pipe).__name__} is running a call: copy or pickle it between calls")
    plain = {k: v for k, v in pipe.__dict__.items() if k != STATE}
    return _rebuild, (state.original_class, plain, state.config())


def _rebuild(cls, attributes: dict, config: dict):
    pipe = cls.__new__(cls)
    pipe.__dict__.update(attributes)
    return accelerate_pipeline(pipe, **config)


_SUBCLASSES: dict[type, type] = {}


def _accelerated_class(cls: type) -> type:
    # The subclass carries the original's names: diffusers writes ``type(pipe).__name__`` into model_index.json
    # (save_pretrained), and from_pretrained must find the original class there.
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {"__call__": _call, "__reduce_ex__": _reduce_ex, "__module__": cls.__module__,
             "__qualname__": cls.__qualname__},
        )
    return _SUBCLASSES[cls]


def _check_scheduler(scheduler) -> None:
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


def accelerate_pipeline(
    pipe, *, budget: int | None = None, schedule: Schedule | None = None, mode: str = "schedule",
    tolerance: float | None = None,
):
    """Install MeanCache on a diffusers pipeline; see :func:`meancache.accelerate`."""
    if STATE in pipe.__dict__:
        raise RuntimeError(f"{type(pipe).__name__} is already accelerated by meancache; call meancache.disable first")
    _check_scheduler(pipe.scheduler)
    if not any(pipe.__dict__.get(name) is not None for name in TRANSFORMER_NAMES):
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: meancache accelerates transformer pipelines")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise ValueError(f"schedule is a {type(schedule).__name__}: must be a meancache.Schedule")
    if schedule is not None and budget is not None and budget != schedule.budget:
        raise ValueError(f"budget={budget} contradicts schedule.budget={schedule.budget}: pass one of them")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 2):
        raise ValueError(f"budget={budget!r}: must be an int >= 2")
    if mode not in ("schedule", "online"):
        raise ValueError(f"mode={mode!r}: must be 'schedule' (static schedule) or 'online' (decided during the run)")
    if mode == "online" and schedule is not None:
        raise ValueError("mode='online' decides the compute steps itself: pass budget=, not schedule=")
    if mode == "online":
        tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
        OnlinePlan(budget or 2, 2, tolerance)  # validates tolerance and budget before anything is installed
    elif tolerance is not None:
        raise ValueError("tolerance= applies to mode='online' only")
    family = next((fam for prefix, fam in FAMILIES.items() if type(pipe).__name__.startswith(prefix)), None)
    state = _PipelineState(
        schedule=schedule, budget=budget, family=family, tolerance=tolerance, original_class=type(pipe)
    )
    pipe.__dict__[STATE] = state
    pipe.__class__ = _accelerated_class(type(pipe))
    return pipe


def disable_pipeline(pipe):
    """Restore the pipeline's original class; a pipeline that is not accelerated is returned unchanged."""
    state = pipe.__dict__.get(STATE)
    if state is None:
        return pipe
    if not state.busy.acquire(blocking=False):
        raise RuntimeError(f"this {type(pipe).__name__} is running a call: disable it after the call returns")
    try:
        del pipe.__dict__[STATE]
        pipe.__class__ = state.original_class
    finally:
        state.busy.release()
    return pipe


def summary(pipe) -> PipelineSummary:
    """The :class:`PipelineSummary` of the last call of an accelerated pipeline (or module)."""
    state = pipe.__dict__.get(STATE) if hasattr(pipe, "__dict__") else None
    if state is None:
        raise ValueError(f"{type(pipe).__name__} is not an accelerated pipeline")
    return state.last
