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
import threading
import time

import torch

from .config import MeanCacheConfig
from .engine import Stats
from .engine import Trajectory
from .hooks import check_scheduler
from .hooks import context_parallel_group
from .hooks import hooked_step
from .hooks import is_pipeline
from .hooks import sigma_grid
from .outputs import split_output
from .plans import family_of
from .plans import plan_for
from .validation import check_velocity

__all__ = ["PipelineSummary", "accelerate_pipeline", "disable_pipeline", "is_pipeline", "STATE"]

logger = logging.getLogger("meancache")

STATE = "_meancache"
TRANSFORMER_NAMES = ("transformer", "transformer_2")
#: The former name of :class:`meancache.engine.Stats` for pipelines (one stats type now).
PipelineSummary = Stats


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


class _PipelineState:
    """Per-pipeline MeanCache configuration, and the adapter state of the call in progress: which step the
    scheduler is at, which transformer call of the step this is, and the latent the last step produced. The
    trajectory itself is a :class:`~meancache.engine.Trajectory`."""

    def __init__(self, config: MeanCacheConfig, family: str | None, original_class: type):
        self.config = config
        self.family = family
        self.original_class = original_class
        # one call at a time per pipeline: a second concurrent call would share this state and the hooks
        self.busy = threading.Lock()
        self.traj: Trajectory | None = None
        self.last = Stats()
        self.cp_group = None
        self.static_plans: dict = {}
        self.begin()

    def begin(self) -> None:
        """Start a call: nothing is planned until the first ``scheduler.step`` shows the call's grid."""
        self.active = False
        self.start = 0
        self.step = 0
        self.calls_in_step = 0
        self.outputs = {}
        self.produced: torch.Tensor | None = None
        self.produced_version = -1
        self.last = Stats()

    def resolve(self, scheduler) -> None:
        """Read the call's sigma grid once (one host read per call) and plan the trajectory."""
        start = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
        grid = sigma_grid(scheduler, start)
        n = len(grid) - 1
        if n < 1:
            raise ValueError(f"the scheduler's sigma grid has {len(grid)} value(s) from step {start}: nothing to do")
        cfg = self.config
        plan = self.static_plans.get(n)
        if plan is None:
            plan = plan_for(n, schedule=cfg.schedule, budget=cfg.budget, mode=cfg.mode, tolerance=cfg.tolerance,
                            family=self.family, group=cfg.group if cfg.group is not None else self.cp_group)
            if cfg.mode != "online":
                # a static plan depends on the step count alone: placed (and logged) once per count, not per call
                self.static_plans[n] = plan
        self.traj = Trajectory(plan, grid) if self.traj is None else self.traj.renew(plan, grid)
        # the transformer calls of step 0 ran before the grid was known
        self.traj.stats.model_calls = self.last.model_calls
        self.last = self.traj.stats
        self.start, self.active = start, True

    def transformer_call(self, target, args, kwargs):
        if not self.active or self.traj.computed(self.step):
            out = target(*args, **kwargs)
            self.outputs[self.calls_in_step] = out
            self.calls_in_step += 1
            self.last.model_calls += 1
            return out
        slot = self.calls_in_step
        self.calls_in_step += 1
        self.last.calls_saved += 1
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
        if not self.active:
            self.resolve(scheduler)
        traj = self.traj
        i = scheduler.step_index - self.start
        if not 0 <= i < traj.plan.num_steps:
            raise ValueError(
                f"scheduler step {scheduler.step_index} is outside this call's {traj.plan.num_steps} steps"
            )
        if i != self.step:
            raise ValueError(f"scheduler is at step {i} but meancache expected step {self.step}")
        self._follow_edits(sample, i)
        if traj.computed(i):
            check_velocity(model_output, sample, f"the pipeline's velocity at step {i}")
            traj.log(i, sample, model_output)
            result = original_step(model_output, timestep, sample, *args, **kwargs)
        else:
            x_next = traj.skip(i, sample)
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
        traj.end_step(i)
        self.step += 1
        self.calls_in_step = 0
        produced = result[0] if isinstance(result, tuple) else result.prev_sample
        self.produced, self.produced_version = produced, _version(produced)
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
        history = self.traj.branches[0].history if 0 in self.traj.branches else None
        if produced is None or history is None or len(history) == 0:
            return
        if sample is produced and _version(sample) == self.produced_version:
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
            prev = history.count - 1
            g = self.traj.sigmas
            before = history.x(prev) + (g[i] - g[i - 1]) * history.v(prev)
        else:
            before = produced
        self.traj.shift(sample.to(history.xs.dtype) - before.to(history.xs.dtype))
        if self.last.latent_edits == 1:
            logger.info("meancache: the latents were changed between steps %d and %d (a step-end callback?); "
                        "the history is re-anchored at the changed latent", i - 1, i)



def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of ``t``; None for inference tensors (``torch.inference_mode``), which keep
    none, so an in-place edit of one goes unnoticed: a callback there should return a new tensor."""
    return None if t.is_inference() else t._version


def _placeholder_output(template, args: tuple, kwargs: dict):
    """A stand-in output for a transformer call that no compute step has made: ``template``'s structure with a
    zero velocity shaped like the call's latent (``hidden_states`` or the first argument), or ``template`` itself
    when the latent is not one tensor."""
    latent = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(latent, torch.Tensor):
        return template
    _, rebuild = split_output(template)
    return rebuild(torch.zeros_like(latent))


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
        scheduler = pipe.scheduler
        check_scheduler(scheduler)
        state.begin()
        state.cp_group = context_parallel_group(pipe.__dict__.get("transformer"))

        def make_hook(original_step):
            def step(model_output, timestep, sample, *a, **kw):
                return state.scheduler_step(scheduler, original_step, model_output, timestep, sample, *a, **kw)

            return step

        t0 = time.perf_counter()
        with hooked_step(scheduler, make_hook), _transformers_swapped(pipe, state):
            try:
                result = super(type(pipe), pipe).__call__(*args, **kwargs)
                state.last.completed = True
                return result
            finally:
                state.last.wall_time_s = time.perf_counter() - t0
                state.active = False
                state.produced = None
    finally:
        state.busy.release()


class _transformers_swapped:
    """Puts the transformer stand-ins in place for one call and restores the saved originals afterwards."""

    def __init__(self, pipe, state: _PipelineState):
        self.pipe, self.state, self.saved = pipe, state, {}

    def __enter__(self):
        for name in TRANSFORMER_NAMES:
            target = self.pipe.__dict__.get(name)
            if type(target) is _TransformerStandIn:  # never treat a stand-in as the original
                target = target._mc_target
            if target is not None:
                self.saved[name] = target
                self.pipe.__dict__[name] = _TransformerStandIn(target, self.state)
        return self

    def __exit__(self, *exc):
        self.pipe.__dict__.update(self.saved)
        return False


def _reduce_ex(pipe, protocol):
    """Pickle and deep-copy an accelerated pipeline as its original class, accelerated again when loaded."""
    state: _PipelineState = pipe.__dict__[STATE]
    if state.busy.locked():
        raise RuntimeError(f"this {type(pipe).__name__} is running a call: copy or pickle it between calls")
    plain = {k: v for k, v in pipe.__dict__.items() if k != STATE}
    # a process group belongs to this process: a copy elsewhere finds its own (its transformer's context-parallel
    # group) or passes group= again
    config = state.config if state.config.group is None else state.config.replace(group=None)
    return _rebuild, (state.original_class, plain, config)


def _rebuild(cls, attributes: dict, config: MeanCacheConfig):
    pipe = cls.__new__(cls)
    pipe.__dict__.update(attributes)
    return accelerate_pipeline(pipe, config)


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


def accelerate_pipeline(pipe, config: MeanCacheConfig):
    """Install MeanCache on a diffusers pipeline with a validated ``config``; see :func:`meancache.accelerate`."""
    check_scheduler(pipe.scheduler)
    if not any(pipe.__dict__.get(name) is not None for name in TRANSFORMER_NAMES):
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: meancache accelerates transformer pipelines")
    pipe.__dict__[STATE] = _PipelineState(config, family_of(pipe), type(pipe))
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
