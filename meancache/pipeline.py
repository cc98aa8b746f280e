"""``meancache.accelerate(pipe)``: MeanCache for diffusers flow-matching pipelines.

Where it hooks (algorithm.md §7: cache the guided velocity where the pipeline hands it to the scheduler):

* ``pipe.scheduler.step`` sees the post-CFG velocity of every step. On compute steps the scheduler's own Euler step
  runs and ``(x_i, v_i)`` is logged into the history ring; on skipped steps the fused ``meancache::skip_step`` op
  estimates the average velocity, logs it and takes the step, and the scheduler's step counter is advanced.
* Calls of ``pipe.transformer`` (and ``pipe.transformer_2``) are decided by an instance-level call hook during a
  pipeline call (the module's ``_compiled_call_impl``, the slot ``torch.nn.Module.__call__`` dispatches through).
  On skipped steps it returns the previous output of the same call slot without running the transformer (nor its
  forward hooks), so every guidance branch is skipped, whether the pipeline makes separate calls (Qwen-Image's true
  CFG) or one batched call. The stale value only feeds guidance arithmetic whose result the scheduler hook then
  ignores. ``pipe.transformer`` stays the module itself: a step-end callback sees its real type, config, dtype
  and methods.

Nothing of meancache runs inside the transformer, so ``torch.compile(pipe.transformer, fullgraph=True)`` is
unaffected. The pipeline object itself is switched to a per-instance subclass whose ``__call__`` (same signature
and docstring as the original) sets the hooks up and tears them down (also when the call raises), so every call
starts from a fresh state, other instances are untouched, and :func:`meancache.disable` restores the original
class.

diffusers' own step caches (``transformer.enable_cache(...)``: FirstBlockCache, FasterCache, Pyramid Attention
Broadcast, TaylorSeer, MagCache, SeaCache) are refused, when accelerating and when calling: see
:func:`check_no_step_cache`.
"""

from __future__ import annotations

import functools
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

__all__ = ["PipelineSummary", "accelerate_pipeline", "check_no_step_cache", "disable_pipeline", "is_pipeline",
           "STATE"]

logger = logging.getLogger("meancache")

STATE = "_meancache"
TRANSFORMER_NAMES = ("transformer", "transformer_2")
#: The former name of :class:`meancache.engine.Stats` for pipelines (one stats type now).
PipelineSummary = Stats


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
        self.produced_copy: torch.Tensor | None = None
        self.last = Stats()

    def reset(self, name: str) -> None:
        """Forget what earlier calls left behind (``name``: the pipeline's class name, for the error).

        Each call already starts a fresh trajectory; between calls the state keeps the history rings for the next
        call to reuse, the static plan placed for each step count, and the last call's :class:`Stats`. All three
        are dropped: the rings' memory is released, the next call places (and logs) its plan again, and
        :func:`meancache.summary` is empty until then.
        """
        if not self.busy.acquire(blocking=False):
            raise RuntimeError(f"this {name} is running a call: reset it after the call returns")
        try:
            self.traj = None
            self.static_plans.clear()
            self.begin()
        finally:
            self.busy.release()

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
            extra = traj.log(i, sample, model_output)
            if extra is not None:  # the schedule's corrector, carried by the velocity the scheduler steps with
                model_output = (model_output + extra).to(model_output.dtype)
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
        # An inference tensor has no version counter, so only its values can show an in-place edit; no copy
        # after the last step, which nothing follows.
        last = i == traj.plan.num_steps - 1
        self.produced_copy = produced.clone() if produced.is_inference() and not last else None
        return result

    def _follow_edits(self, sample: torch.Tensor, i: int) -> None:
        """Re-anchor the history when the latent reaching step ``i`` is not the one step ``i - 1`` produced.

        A ``callback_on_step_end`` may clamp, rescale or blend the latents between steps. The estimator reads the
        trajectory from latent differences ``x_i - x_j`` (algorithm.md §2.2), so an edit would enter it as a
        velocity. Shifting every logged latent by the edit ``d = x_i' - x_i`` keeps those differences what the
        sampler's own steps made them, while the run carries on from the edited latent.

        How an edit is seen, and what it costs:

        * Ordinary tensors (``no_grad``, or autograd on): metadata only (same tensor, same in-place version
          counter); a different tensor object is compared by value with the produced one. An in-place edit leaves
          no pre-edit values, so they are rebuilt from the ring (``x_{i-1} + dt * v_{i-1}``, exact up to rounding).
        * Inference tensors (``torch.inference_mode``) keep no version counter, so each step's produced latent is
          copied (``clone``) and the next step's latent compared with the copy by value (``torch.equal``, one
          device-to-host sync on an accelerator); the copy is also the exact pre-edit value. Measured on one CPU
          thread for a FLUX-sized latent (1 x 4096 x 64), clone plus compare per step: bfloat16 0.3-0.5 ms,
          float32 0.2 ms (the metadata check above: under 1 us); extra memory one latent in its own dtype
          (512 KiB bfloat16, 1 MiB float32), held from one step to the next; none after the last step.
        """
        produced, self.produced = self.produced, None
        copy, self.produced_copy = self.produced_copy, None
        history = self.traj.branches[0].history if 0 in self.traj.branches else None
        if produced is None or history is None or len(history) == 0:
            return
        if sample.shape != produced.shape:
            raise ValueError(
                f"the latent reaching step {i} has shape {tuple(sample.shape)}, step {i - 1} produced "
                f"{tuple(produced.shape)}: a callback may edit the latents' values, not their shape"
            )
        if copy is not None:
            before = copy
        elif sample is produced:
            if _version(sample) == self.produced_version:
                return
            # edited in place: the values before the edit are gone, but the ring holds x_{i-1} and v_{i-1}
            prev = history.count - 1
            g = self.traj.sigmas
            before = history.x(prev) + (g[i] - g[i - 1]) * history.v(prev)
        else:
            before = produced
        if copy is not None or sample is not produced:
            # the same values (a copy or a cast of the produced latent) are no edit: a host read, made only when
            # the tensor itself cannot tell
            if sample.device == before.device and torch.equal(sample, before.to(sample.dtype)):
                return
        self.traj.shift(sample.to(history.xs.dtype) - before.to(history.xs.dtype))
        if self.last.latent_edits == 1:
            logger.info("meancache: the latents were changed between steps %d and %d (a step-end callback?); "
                        "the history is re-anchored at the changed latent", i - 1, i)


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter of ``t``; None for inference tensors (``torch.inference_mode``), which keep
    none: their edits are found by value (:meth:`_PipelineState._follow_edits`)."""
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
        # a cache may have been enabled since accelerate()
        check_no_step_cache(pipe)
        state.begin()
        state.cp_group = context_parallel_group(pipe.__dict__.get("transformer"))

        def make_hook(original_step):
            def step(model_output, timestep, sample, *a, **kw):
                return state.scheduler_step(scheduler, original_step, model_output, timestep, sample, *a, **kw)

            return step

        t0 = time.perf_counter()
        with hooked_step(scheduler, make_hook), _transformers_hooked(pipe, state):
            try:
                result = super(type(pipe), pipe).__call__(*args, **kwargs)
                state.last.completed = True
                return result
            finally:
                state.last.wall_time_s = time.perf_counter() - t0
                state.active = False
                state.produced = state.produced_copy = None
    finally:
        state.busy.release()


# -- the transformer call hook ----------------------------------------------------------------------------------------

#: The per-instance slot ``torch.nn.Module.__call__`` (``_wrapped_call_impl``) calls when it is set; ``.compile()``
#: sets it to the compiled ``_call_impl``. Hooking it leaves the module's type, attributes, forward and hooks alone.
_CALL_SLOT = "_compiled_call_impl"
#: Guards installing and removing the call hooks: two pipelines may share one transformer module.
_CALL_HOOK_LOCK = threading.Lock()


class _CallHook:
    """Decides the calls of one transformer module made by the accelerated pipeline calls in progress.

    Installed on the module for as long as one such call runs. The call belongs to the pipeline call running in
    the calling thread (the innermost one, should a callback run another accelerated pipeline on the same module);
    calls from any other thread run the module as usual, so pipelines sharing one transformer run in parallel.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.inner = module.__dict__.get(_CALL_SLOT)  # the compiled call, when the module was compiled in place
        self.calls: dict[int, list[_PipelineState]] = {}

    def __call__(self, *args, **kwargs):
        run = self.inner if self.inner is not None else self.module._call_impl
        states = self.calls.get(threading.get_ident())
        if not states:
            return run(*args, **kwargs)
        return states[-1].transformer_call(run, args, kwargs)


class _transformers_hooked:
    """Hooks the calls of the pipeline's transformer modules for one pipeline call, and unhooks them after it."""

    def __init__(self, pipe, state: _PipelineState):
        self.pipe, self.state, self.hooks = pipe, state, []

    def __enter__(self):
        thread = threading.get_ident()
        with _CALL_HOOK_LOCK:
            for name in TRANSFORMER_NAMES:
                module = self.pipe.__dict__.get(name)
                if not isinstance(module, torch.nn.Module):
                    continue
                hook = module.__dict__.get(_CALL_SLOT)
                if not isinstance(hook, _CallHook):
                    hook = _CallHook(module)
                    module.__dict__[_CALL_SLOT] = hook
                hook.calls.setdefault(thread, []).append(self.state)
                self.hooks.append((module, hook))
        return self

    def __exit__(self, *exc):
        thread = threading.get_ident()
        with _CALL_HOOK_LOCK:
            for module, hook in reversed(self.hooks):
                states = hook.calls[thread]
                states.pop(len(states) - 1 - states[::-1].index(self.state))
                if not states:
                    del hook.calls[thread]
                # a module compiled in place during the call keeps its new compiled call
                if not hook.calls and module.__dict__.get(_CALL_SLOT) is hook:
                    if hook.inner is None:
                        del module.__dict__[_CALL_SLOT]
                    else:
                        module.__dict__[_CALL_SLOT] = hook.inner
        return False


# -- diffusers' own caches -------------------------------------------------------------------------------------------

#: diffusers (0.42) cache hooks that skip transformer work from one denoising call to the next, by the name they are
#: registered under, with the config that installs them.
STEP_CACHE_HOOKS = {
    "faster_cache_denoiser": "FasterCacheConfig",
    "faster_cache_block": "FasterCacheConfig",
    "fbc_leader_block_hook": "FirstBlockCacheConfig",
    "fbc_block_hook": "FirstBlockCacheConfig",
    "mag_cache_leader_block_hook": "MagCacheConfig",
    "mag_cache_block_hook": "MagCacheConfig",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
    "sea_cache_root": "SeaCacheConfig",
    "sea_cache_leader_block": "SeaCacheConfig",
    "sea_cache_block": "SeaCacheConfig",
    "sea_cache_post_norm": "SeaCacheConfig",
    "taylorseer_cache": "TaylorSeerCacheConfig",
}
#: Caches that give the same output on every call (the text K/V projections do not change across steps): they stack.
EXACT_CACHES = ("TextKVCacheConfig",)


def _step_cache(module) -> str | None:
    """What step cache of diffusers ``module`` carries, in words, or None."""
    config = getattr(module, "_cache_config", None)
    if config is not None and type(config).__name__ not in EXACT_CACHES:
        return f"{type(config).__name__} enabled (transformer.enable_cache)"
    for path, sub in module.named_modules():
        registry = sub.__dict__.get("_diffusers_hook")
        for hook in getattr(registry, "hooks", None) or ():
            if hook in STEP_CACHE_HOOKS:
                return f"cache hook {hook!r} ({STEP_CACHE_HOOKS[hook]}) on {path or 'the module itself'}"
    return None


def check_no_step_cache(pipe) -> None:
    """Raise ValueError when a transformer of ``pipe`` has one of diffusers' step caches.

    meancache decides which steps run the transformer. A diffusers cache (FirstBlockCache, FasterCache, Pyramid
    Attention Broadcast, TaylorSeer, MagCache, SeaCache) stacked under it sees only the computed steps' calls: its
    schedule (an interval, ``disable_cache_before_step``, ``retention_ratio``, its step index into ``mag_ratios``)
    counts calls rather than steps, and it skips part of meancache's budget on top. Measured on the tiny FLUX
    pipeline (20 steps, meancache budget 8, relative error against the uncached run; each cache alone / stacked):
    TaylorSeer (lite, interval 3) 8 evaluations, 0.0072 / 4 evaluations, 0.040; MagCache 8, 0.0026 / 5, 0.012;
    FirstBlockCache (threshold 0.6) 0.0048 / 0.0088; Pyramid Attention Broadcast (attention recomputed every 3rd
    call) 0.0007 / 0.0071; meancache alone 8 evaluations, 0.0069. On the tiny Wan pipeline (meancache alone 0.042):
    TaylorSeer 0.020 / 0.114, MagCache 0.008 / 0.050. So stacking is refused, naming the cache, before any work;
    ``TextKVCacheConfig`` (exact) stacks. The check walks the transformer's modules on every call: about 1 ms for
    FLUX.1-dev's 1279.

    Example:
        >>> from meancache.examples.tiny_pipelines import build
        >>> from diffusers import FirstBlockCacheConfig
        >>> pipe, kw, info = build("flux")
        >>> pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        >>> check_no_step_cache(pipe)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pipe.transformer has diffusers' FirstBlockCacheConfig enabled (transformer.enable_cache): ...
    """
    for name in TRANSFORMER_NAMES:
        module = pipe.__dict__.get(name)
        found = _step_cache(module) if isinstance(module, torch.nn.Module) else None
        if found is not None:
            raise ValueError(
                f"pipe.{name} has diffusers' {found}: stacked under meancache, which decides the steps that run "
                "the transformer, a step cache sees only the computed steps' calls, so its schedule counts calls, "
                "not steps, and it skips part of the budget again; use one cache: "
                f"pipe.{name}.disable_cache() (or remove the hook), or meancache.disable(pipe)"
            )


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
        # inspect.signature and help() see the original call's parameters and docstring (through __wrapped__)
        @functools.wraps(cls.__call__)
        def __call__(pipe, *args, **kwargs):
            return _call(pipe, *args, **kwargs)

        _SUBCLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {"__call__": __call__, "__reduce_ex__": _reduce_ex, "__module__": cls.__module__,
             "__qualname__": cls.__qualname__},
        )
    return _SUBCLASSES[cls]


def accelerate_pipeline(pipe, config: MeanCacheConfig):
    """Install MeanCache on a diffusers pipeline with a validated ``config``; see :func:`meancache.accelerate`."""
    check_scheduler(pipe.scheduler)
    if not any(pipe.__dict__.get(name) is not None for name in TRANSFORMER_NAMES):
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: meancache accelerates transformer pipelines")
    for name in TRANSFORMER_NAMES:
        module = pipe.__dict__.get(name)
        if module is not None and not isinstance(module, torch.nn.Module):
            raise ValueError(
                f"pipe.{name} is a {type(module).__name__}: meancache hooks the calls of a torch.nn.Module"
            )
    check_no_step_cache(pipe)
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
