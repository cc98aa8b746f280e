"""The one MeanCache trajectory engine: every front-end (``sample``, ``accelerate(module)``, ``accelerate(pipe)``)
drives a :class:`Trajectory` and nothing else touches the history ring or the fused ops.

A trajectory owns:

* the **plan** (:class:`~meancache.plans.StaticPlan` from a Schedule, or :class:`~meancache.online.OnlinePlan`),
  one interface: ``plan[i]`` is step i's :class:`~meancache.schedule.StepPlan`, ``plan.observe(i, v)`` after a
  computed step, ``plan.window`` entries of history, ``plan.schedule()`` once it is decided;
* the **sigma grid** ``sigmas[0..N]`` as Python floats (no device sync per step);
* one **history ring per guidance branch** (:class:`~meancache.history.History`, at most 6 entries, plus the last
  ``plan.depth <= 4`` computed velocities when the plan has ``extrapolate`` segments);
* the **stats** of the trajectory (:class:`Stats`);
* the three **steps** through the fused ops: :meth:`compute` (log + Euler), :meth:`skip` (estimate + log + Euler),
  :meth:`estimate` (estimate + log, the caller steps), plus :meth:`log` for a computed step whose Euler step
  somebody else takes (the diffusers scheduler);
* the schedule's **corrector** (:func:`~meancache.estimators.correction_weights`): at a computed step that ends a
  segment of a node estimator, :meth:`compute` adds the correction to the latent it returns, and :meth:`log`
  returns it as a velocity term for the caller to add to the velocity it steps with (a few tensor ops, once per
  such step; not fused).

Invariant: after step ``i`` of a branch, its ring holds steps ``max(0, i + 1 - C) .. i`` (``history.count == i + 1``),
so a skipped step's window ``k = min(K, logged)`` always finds its entries. The adapters only work out which step
and which branch a call belongs to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Hashable

import torch

from . import ops
from .estimators import FITTED
from .estimators import NODE_ESTIMATORS
from .estimators import correction_weights
from .estimators import polynomial_weights
from .history import History
from .schedule import Schedule

__all__ = ["Stats", "Trajectory"]

_RENAMED = {"transformer_calls": "model_calls", "transformer_calls_saved": "calls_saved", "skipped_calls": "calls_saved"}


@dataclass
class Stats:
    """What MeanCache did in the current (or last) trajectory: the one stats type of every front-end
    (:func:`meancache.summary`, ``module.meancache.stats``).

    Attributes:
        num_steps: steps N of the trajectory.
        steps: steps reached so far.
        computed_steps, skipped_steps: steps that ran the model, and steps that took the estimate.
        model_calls, calls_saved: model calls made, and calls skipped (every guidance branch counts).
        branches: guidance branches with their own history (separate model calls per step).
        schedule: the schedule followed (an online plan's once it is decided to the last step).
        history_bytes: bytes held by the history rings.
        latent_edits: steps whose incoming latent was changed from outside (a pipeline's step-end callback).
        wall_time_s: wall time of the last pipeline call (0 for modules).
        completed: the trajectory ran to its last step (a module's, when that step's last branch returned;
            a pipeline's, when the whole call returned normally, decoding included).

    Example:
        >>> s = Stats(num_steps=4, computed_steps=2, skipped_steps=2, model_calls=2, calls_saved=2)
        >>> print(s)  # doctest: +NORMALIZE_WHITESPACE
        meancache: 2 computed + 2 skipped of 4 steps (not completed)
          model calls: 2 made, 2 saved of 4
          history: 0.00 MB
    """

    num_steps: int = 0
    steps: int = 0
    computed_steps: int = 0
    skipped_steps: int = 0
    model_calls: int = 0
    calls_saved: int = 0
    branches: int = 0
    schedule: Schedule | None = None
    history_bytes: int = 0
    latent_edits: int = 0
    wall_time_s: float = 0.0
    completed: bool = False

    def __getattr__(self, name: str):
        # the fields of the former RunStats / PipelineSummary, kept for one release
        if name in _RENAMED:
            new = _RENAMED[name]
            warnings.warn(f"Stats.{name} is deprecated; use Stats.{new}", DeprecationWarning, stacklevel=2)
            return getattr(self, new)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __str__(self) -> str:
        total = self.model_calls + self.calls_saved
        lines = [
            f"meancache: {self.computed_steps} computed + {self.skipped_steps} skipped of {self.num_steps} steps"
            + ("" if self.completed else " (not completed)"),
            f"  model calls: {self.model_calls} made, {self.calls_saved} saved of {total}",
            (f"  wall time: {self.wall_time_s:.3f} s, " if self.wall_time_s else "  ")
            + f"history: {self.history_bytes / 1e6:.2f} MB",
        ]
        if self.latent_edits:
            lines.append(f"  latents changed from outside at {self.latent_edits} step(s); history re-anchored")
        if self.schedule is not None:
            steps, marks = self.schedule.pattern()
            what = "K" if self.schedule.published else "K; l/q/c: extrapolate, L/Q/C: predict, f/g/h: fitted, order 1/2/3"
            lines.append(f"  schedule: {steps}  ({what}: {marks})")
            if self.schedule.corrector:
                lines.append(f"  corrector: order {self.schedule.corrector}")
        return "\n".join(lines)


@dataclass
class Branch:
    """One guidance branch of a trajectory: its history ring, plus what its adapter needs to rebuild outputs."""

    history: History
    out_dtype: torch.dtype | None = None
    rebuild: Any = None
    pending: torch.Tensor | None = field(default=None, repr=False)


class Trajectory:
    """One MeanCache trajectory: plan, sigma grid, per-branch rings, stats and the fused steps.

    Args:
        plan: a :class:`~meancache.plans.StaticPlan` or an :class:`~meancache.online.OnlinePlan` for N steps.
        sigmas: ``N + 1`` Python floats, decreasing.
        history: optional ring for branch 0 (``sample(..., history=)``); it is cleared, and must hold
            ``plan.window`` entries.

    Example:
        >>> import torch
        >>> from meancache.plans import StaticPlan
        >>> from meancache.schedule import Schedule
        >>> traj = Trajectory(StaticPlan(Schedule([0, 3], [2], 4)), [1.0, 0.75, 0.5, 0.25, 0.0])
        >>> x = torch.ones(2)
        >>> for i in range(4):
        ...     x = traj.compute(i, x, -x) if traj.computed(i) else traj.skip(i, x)
        ...     traj.end_step(i)
        >>> traj.stats.computed_steps, traj.stats.skipped_steps
        (2, 2)
    """

    def __init__(self, plan, sigmas: list[float], history: History | None = None):
        if len(sigmas) != plan.num_steps + 1:
            raise ValueError(f"sigmas has {len(sigmas)} values for a plan of {plan.num_steps} steps: need N + 1")
        schedule = getattr(plan, "static_schedule", None)
        if schedule is not None and schedule.fitted:  # fitted weights hold on their own grid only
            used = schedule.for_grid(sigmas)
            if used is not schedule:
                plan = type(plan)(used)
        self.plan = plan
        self.sigmas = sigmas
        # computed velocities each branch keeps for extrapolate segments (0: the published estimator only)
        self.depth = plan.depth
        self.corrector = plan.corrector
        self.branches: dict[Hashable, Branch] = {}
        self._spare: dict[Hashable, History] = {}
        self.stats = Stats(num_steps=plan.num_steps, schedule=plan.static_schedule)
        if history is not None:
            if history.capacity < plan.window:
                raise ValueError(
                    f"history.capacity={history.capacity} < schedule.window={plan.window}: the ring must hold the "
                    "largest window K the schedule uses"
                )
            history.ensure_depth(self.depth)
            history.clear()
            self.branches[0] = Branch(history)

    def renew(self, plan, sigmas: list[float]) -> "Trajectory":
        """A new trajectory that reuses this one's ring storage (same branches, same latent shape)."""
        fresh = Trajectory(plan, sigmas)
        fresh._spare = {key: b.history for key, b in self.branches.items()}
        return fresh

    # -- plan -----------------------------------------------------------------------------------------------------
    def computed(self, i: int) -> bool:
        """Whether step ``i`` runs the model."""
        return self.plan[i].computed

    def branch(self, i: int, key: Hashable = 0) -> Branch:
        """The branch ``key`` at step ``i``: created at step 0, checked to be called once per step afterwards."""
        found = self.branches.get(key)
        if found is None:
            if i != 0:
                raise ValueError(f"branch {key!r} first appeared at step {i}: every branch must be called at step 0")
            ring = self._spare.pop(key, None)
            if ring is None or ring.capacity < self.plan.window:
                ring = History(max(1, self.plan.window), self.depth)
            ring.ensure_depth(self.depth)
            ring.clear()
            found = self.branches[key] = Branch(ring)
            self.stats.branches = len(self.branches)
        if found.history.count != i:
            raise ValueError(
                f"branch {key!r} was called twice at step {i} or skipped a step (history at step "
                f"{found.history.count}); each branch must be called once per step"
            )
        return found

    def _window(self, i: int, branch: Branch) -> tuple[int, float, float, float]:
        # the window is truncated to what has been logged, as the official full-history loop does
        k = min(self.plan[i].order, len(branch.history))
        g = self.sigmas
        return k, g[i - k], g[i], g[i + 1]

    def _extrapolation(self, i: int, branch: Branch, nodes=None) -> tuple[list[int], tuple[float, ...]]:
        """Slots in ``vc`` and weights of step ``i``'s polynomial estimate through the branch's kept computed
        steps (``nodes``, default the branch's current ones)."""
        nodes = branch.history.nodes if nodes is None else nodes
        step = self.plan[i]
        if step.estimator == FITTED:  # the schedule's own weights, on the same nodes the fit read
            return [slot for slot, _ in nodes[-len(step.weights):]], step.weights
        q, weights = polynomial_weights(step.estimator, [s for _, s in nodes], self.sigmas[i], self.sigmas[i + 1],
                                        step.order)
        return [slot for slot, _ in nodes[-q - 1 :]], weights

    def _correction(self, i: int, branch: Branch, v: torch.Tensor) -> torch.Tensor | None:
        """The corrector's latent correction at computed step ``i`` with velocity ``v`` (before ``v`` is kept), or
        None where there is none: no corrector, or the segment before ``i`` skipped nothing or is meancache."""
        if not self.corrector or i == 0:
            return None
        a = i - 1
        while not self.plan[a].computed:
            a -= 1
        if a == i - 1 or self.plan[i - 1].estimator not in NODE_ESTIMATORS:
            return None
        nodes = branch.history.nodes
        g = self.sigmas
        rows = []
        for j in range(a + 1, i):
            _, weights = self._extrapolation(j, branch, nodes)
            rows.append((g[j], g[j + 1] - g[j], weights))
        old, new = correction_weights([s for _, s in nodes], g[i], rows, self.corrector)
        # at least float32: with half-precision latents the terms nearly cancel
        out = v.to(torch.promote_types(v.dtype, torch.float32)) * new
        for (slot, _), w in zip(nodes[-len(old):], old):
            out = out.add(branch.history.vc[slot].to(out.dtype), alpha=w)
        return out

    # -- the steps ------------------------------------------------------------------------------------------------
    def compute(self, i: int, x: torch.Tensor, v: torch.Tensor, key: Hashable = 0) -> torch.Tensor:
        """Computed step ``i``: log the model's ``(x_i, v_i)`` and return ``x_{i+1} = x_i + dt * v_i`` (one op),
        plus the corrector's correction where the schedule has one."""
        b = self.branch(i, key)
        xs, vs = b.history.prepare(x)
        out = ops.compute_step(x, v, xs, vs, i, self.sigmas[i], self.sigmas[i + 1])
        b.history.advance()
        delta = self._correction(i, b, v)
        if delta is not None:
            out = out + delta.to(out.dtype)
        b.history.keep(self.sigmas[i], v)
        b.pending = v
        return out

    def log(self, i: int, x: torch.Tensor, v: torch.Tensor, key: Hashable = 0, observed=None):
        """Computed step ``i`` whose Euler step the caller takes: log ``(x_i, v_i)``; ``observed`` (default ``v``)
        is what an online plan measures.

        Returns:
            None, or with a corrector the velocity term ``u`` (``v``'s shape; float32, or ``v``'s dtype when wider)
            the caller adds to the velocity it steps with, ``x_{i+1} = x_i + dt * (v_i + u)`` (the latent correction
            divided by ``dt``).
        """
        b = self.branch(i, key)
        b.history.push(x, v)
        delta = self._correction(i, b, v)
        b.history.keep(self.sigmas[i], v)
        b.pending = v if observed is None else observed
        if delta is None:
            return None
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return delta / dt if dt else torch.zeros_like(delta)

    def skip(self, i: int, x: torch.Tensor, key: Hashable = 0) -> torch.Tensor:
        """Skipped step ``i``: estimate the average velocity, log it, return ``x_{i+1}`` (one op)."""
        b = self.branch(i, key)
        xs, vs = b.history.prepare(x)
        if self.plan[i].estimator in NODE_ESTIMATORS:
            slots, weights = self._extrapolation(i, b)
            out = ops.weighted_step(x, xs, vs, b.history.vc, i, slots, weights, dt=self.sigmas[i + 1] - self.sigmas[i])
        else:
            out = ops.skip_step(x, xs, vs, i, *self._window(i, b))
        b.history.advance()
        return out

    def estimate(self, i: int, x: torch.Tensor, key: Hashable = 0, out_scale: float = 1.0, out_dtype=None):
        """Skipped step ``i`` for a caller that steps itself: log and return ``v_hat * out_scale`` (one op)."""
        b = self.branch(i, key)
        xs, vs = b.history.prepare(x)
        dtype = out_dtype or b.out_dtype or x.dtype
        if self.plan[i].estimator in NODE_ESTIMATORS:
            slots, weights = self._extrapolation(i, b)
            out = ops.weighted_step(x, xs, vs, b.history.vc, i, slots, weights, dt=self.sigmas[i + 1] - self.sigmas[i],
                                    out_scale=out_scale, out_dtype=dtype, euler=False)
        else:
            out = ops.estimate(x, xs, vs, i, *self._window(i, b), out_scale, dtype)
        b.history.advance()
        return out

    def end_step(self, i: int) -> None:
        """Close step ``i`` once every branch ran it: counts, and the online plan's measurement."""
        computed = self.plan[i].computed
        if computed:
            pending = {k: b.pending for k, b in self.branches.items() if b.pending is not None}
            if pending:
                self.plan.observe(i, pending[0] if list(pending) == [0] else pending)
            for b in self.branches.values():
                b.pending = None
            self.stats.computed_steps += 1
        else:
            self.stats.skipped_steps += 1
        self.stats.steps = i + 1
        self.stats.history_bytes = sum(b.history.nbytes for b in self.branches.values())
        if self.stats.schedule is None and self.plan.decided():
            self.stats.schedule = self.plan.schedule()

    def shift(self, delta: torch.Tensor, key: Hashable = 0) -> None:
        """Re-anchor branch ``key``'s logged latents by ``delta`` (see :meth:`History.shift`)."""
        self.branches[key].history.shift(delta)
        self.stats.latent_edits += 1
