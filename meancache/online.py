"""Calibration-free MeanCache: decide during the run which steps to compute, within a budget.

Rule (our own, documented here; the paper's schedules are offline):

1. Steps 0 and 1 are computed (the second gives the first measure of how fast the velocity changes), and so is
   the last step. With a budget of 2 only the first and last steps are computed.
2. After each computed step ``c`` (previous computed step ``p``), the *instability*
   ``s = ||v_c - v_p|| / (||v_c|| * (c - p))`` is measured: the relative change of the guided velocity per step.
   With a ``group`` (a process group whose ranks compute one trajectory together), ``s`` is all-reduced with MAX
   over it, so those ranks take the same decision. Independent requests (data-parallel serving) pass no group and
   stay independent; an accelerated pipeline passes its transformer's context-parallel group itself.
3. The next segment length is ``L = floor(tolerance / s)`` clamped to ``1 .. max_segment`` (a stable
   trajectory takes long segments, a changing one short ones), but never shorter than what the remaining budget
   needs to reach the last step: with ``R`` evaluations left after ``c`` and ``M`` steps to go,
   ``L >= ceil(M / R)``. The next computed step is ``c + L`` (the last step at the latest).
4. Skipped steps predict the velocity: the parabola in sigma through the last three computed velocities,
   evaluated at the step's start (``predict`` of order 2, :mod:`meancache.estimators`). Measured at budgets
   10/17/25 of 50 steps against the former rule (MeanCache window ``K = 2``, a damped first-order extrapolation,
   algorithm.md §2.3) and the other candidates:

   ==================================  ================  ===================  ===============  ===============
   held-out case                       meancache K = 2   extrapolate p = 1    predict p = 1    predict p = 2
   ==================================  ================  ===================  ===============  ===============
   digits model, PSNR dB (B=10/17/25)  35.1/42.1/48.6    36.7/45.2/49.0       37.4/46.6/53.2   37.0/47.4/53.7
   3 mixture flows, geo-mean rel L2    0.148             0.118                0.079            0.030
   ==================================  ================  ===================  ===============  ===============

   (digits: 100 samples of the demo's noise against the full run; mixtures: Gaussian-mixture flows of 24-32
   dimensions on grids of shift 1, 2 and 3, 2048 samples each, none of them used to design anything else; predict
   p = 2 is the best in all 9 mixture cases.) ``estimator="meancache"`` keeps the former rule.

So the run never makes more than ``budget`` model evaluations, and uses fewer when the trajectory is unstable
only where the budget allows. One host read of ``s`` per computed step (a sync, unavoidable for a data-dependent
decision).
"""

from __future__ import annotations

import math

import torch

from ._limits import MAX_ORDER
from .estimators import ESTIMATORS
from .estimators import MAX_EXTRAPOLATION_ORDER
from .schedule import Schedule
from .schedule import StepPlan
from .validation import is_int
from .validation import is_real

__all__ = ["OnlinePlan", "DEFAULT_TOLERANCE"]

#: Relative velocity change tolerated over one skipped segment (rule 3). Chosen on the analytic Gaussian-mixture
#: flow (shift-3 grid, 50 steps): it spends about the whole budget and beat Schedule.default at budgets 17 and 25.
DEFAULT_TOLERANCE = 0.02
ONLINE_ORDER = 2
#: Polynomial order of online plans with a polynomial estimator (``"predict"``, the default, or ``"extrapolate"``).
ONLINE_POLYNOMIAL_ORDER = 2
MAX_SEGMENT = 8


def _reduce_max(value: float, device: torch.device, group) -> float:
    """All-reduce a float with MAX over ``group`` (a ``torch.distributed`` process group); None: no reduction."""
    if group is None:
        return value
    import torch.distributed as dist

    dev = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


class OnlinePlan:
    """A step plan that grows during the run (rule in the module docstring).

    Indexing ``plan[i]`` gives the :class:`StepPlan` of step ``i``; steps up to the next computed step are known
    after each :meth:`observe`. ``schedule()`` gives the realised :class:`Schedule` once the run is over.

    Args:
        budget: the most model evaluations the run may make (>= 2).
        num_steps: steps N of the run.
        tolerance: relative velocity change tolerated per skipped segment.
        group: ``torch.distributed`` process group whose ranks must take identical decisions (they compute one
            trajectory together, e.g. context parallelism), or None.
        estimator: the skipped steps' estimator, ``"predict"`` (default), ``"extrapolate"`` or ``"meancache"``
            (rule 4).
        order: its window K (meancache, 1..6) or polynomial order p (1..3); default :data:`ONLINE_ORDER` for
            meancache and :data:`ONLINE_POLYNOMIAL_ORDER` otherwise.

    Example:
        >>> import torch
        >>> plan = OnlinePlan(budget=4, num_steps=10)
        >>> plan[0].computed, plan[1].computed
        (True, True)
        >>> plan.observe(0, torch.ones(3)); plan.observe(1, torch.ones(3) * 1.01)
        >>> plan.known  # the next computed step: 4 steps later, as the remaining budget requires
        5
        >>> plan[3]
        StepPlan(computed=False, order=2, estimator='predict')
    """

    def __init__(self, budget: int, num_steps: int, tolerance: float = DEFAULT_TOLERANCE, group=None,
                 estimator: str = "predict", order: int | None = None):
        if not is_int(num_steps) or num_steps < 2:
            raise ValueError(f"num_steps={num_steps!r}: must be an int >= 2")
        if not is_int(budget) or not 2 <= budget:
            raise ValueError(f"budget={budget!r}: must be an int >= 2")
        if not (is_real(tolerance) and math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance={tolerance!r}: must be a finite number > 0")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: must be one of {', '.join(ESTIMATORS)}")
        if order is None:
            order = ONLINE_ORDER if estimator == "meancache" else ONLINE_POLYNOMIAL_ORDER
        top = MAX_ORDER if estimator == "meancache" else MAX_EXTRAPOLATION_ORDER  # predict: as extrapolate
        if not is_int(order) or not 1 <= order <= top:
            raise ValueError(f"order={order!r}: the {estimator} estimator takes an int in 1..{top}")
        num_steps, budget, order = int(num_steps), int(budget), int(order)  # numpy integers as Python ints
        self.estimator = estimator
        self.order = order
        self.budget = min(budget, num_steps)
        self.num_steps = num_steps
        self.tolerance = float(tolerance)
        self.group = group
        self.restart()

    def restart(self) -> None:
        """Forget every decision and measurement: the plan is undecided again, for a new trajectory.

        :func:`meancache.sample` calls it at the start of each run, so a plan passed to several runs decides each
        one afresh (and afterwards holds the decisions of the last one).

        Example:
            >>> import torch
            >>> plan = OnlinePlan(budget=4, num_steps=10)
            >>> plan.observe(0, torch.ones(3)); plan.observe(1, torch.ones(3) * 1.01)
            >>> plan.restart(); plan.known, plan.instability
            (1, [])
        """
        num_steps = self.num_steps
        self.computed = [0]
        if self.budget >= 3 and num_steps > 2:
            self.computed.append(1)
        elif num_steps > 1:
            self.computed.append(num_steps - 1)
        self.known = self.computed[-1]  # plans for steps 0..known are decided
        self._last_v: dict | None = None
        self._last_step: int | None = None
        self.instability: list[tuple[int, float]] = []

    #: An online plan has no schedule before the run (the :mod:`meancache.plans` interface).
    static_schedule = None
    #: Nor a corrector: its compute steps are decided one at a time.
    corrector = 0

    def __len__(self) -> int:
        return self.num_steps

    def fresh(self) -> "OnlinePlan":
        """An undecided plan with the same settings, for another trajectory."""
        return OnlinePlan(self.budget, self.num_steps, self.tolerance, self.group, self.estimator, self.order)

    def decided(self) -> bool:
        """Whether the plan reaches the last step, so :meth:`schedule` is complete."""
        return self.known == self.num_steps - 1

    @property
    def window(self) -> int:
        """History entries a run needs (the window K of skipped steps; 1 when they extrapolate)."""
        return self.order if self.estimator == "meancache" else 1

    @property
    def depth(self) -> int:
        """Computed velocities kept for extrapolation (p + 1), 0 with the published estimator."""
        return 0 if self.estimator == "meancache" else self.order + 1

    def __getitem__(self, i: int) -> StepPlan:
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} is outside 0..{self.num_steps - 1}")
        if i > self.known:
            raise ValueError(f"step {i} is not planned yet (planned up to step {self.known}); observe() first")
        if i in self.computed:
            return StepPlan(True, 0)
        return StepPlan(False, self.order, self.estimator)

    def observe(self, step: int, v) -> None:
        """Record the velocity of computed ``step`` and plan the next segment when it is the latest one.

        ``v`` is the guided velocity (a tensor), or, when the guidance branches are separate model calls, a mapping
        ``{branch: velocity}``: each branch is compared with its own previous velocity and the largest instability
        decides, so every branch follows one plan.
        """
        current = {0: v.detach()} if isinstance(v, torch.Tensor) else {k: t.detach() for k, t in v.items()}
        if not current:
            raise ValueError(f"observe(step={step}) got no velocity")
        if self._last_v is not None and step > self._last_step:
            if set(current) != set(self._last_v):
                raise ValueError(
                    f"observe(step={step}) got branches {sorted(map(repr, current))}, the previous computed step "
                    f"{sorted(map(repr, self._last_v))}: every computed step must report the same branches"
                )
            per_branch = [
                torch.linalg.vector_norm((vb - self._last_v[key]).float())
                / (torch.linalg.vector_norm(vb.float()) * (step - self._last_step) + 1e-12)
                for key, vb in current.items()
            ]
            # one host read per computed step, however many branches
            s = float(torch.stack(per_branch).max().item())
            if not math.isfinite(s):
                # a non-finite velocity (NaN/Inf, as the model gave it) counts as the least stable trajectory: the
                # next step is computed, as the uncached run would, and the NaN propagates exactly as it does there.
                # inf, not NaN, enters the all-reduce, whose MAX is undefined for NaN.
                s = math.inf
            s = _reduce_max(s, next(iter(current.values())).device, self.group)
            self.instability.append((step, s))
            if step == self.known and step < self.num_steps - 1:
                self._plan_after(step, s)
        self._last_v = {k: t.clone() for k, t in current.items()}
        self._last_step = step

    def _plan_after(self, c: int, s: float) -> None:
        remaining_steps = self.num_steps - 1 - c
        left = self.budget - len(self.computed)  # evaluations still allowed, the last step's included
        if left <= 0:
            raise RuntimeError("online plan exhausted its budget before the last step")  # guarded by rule 3
        need = math.ceil(remaining_steps / left)
        prefer = MAX_SEGMENT if s <= 0 else max(1, min(MAX_SEGMENT, int(self.tolerance / s)))  # tol/inf = 0
        length = min(remaining_steps, max(prefer, need))
        nxt = c + length
        if left == 1:
            nxt = self.num_steps - 1
        self.computed.append(nxt)
        self.known = nxt

    def schedule(self) -> Schedule:
        """The schedule this run followed (complete once the last step is planned)."""
        steps = list(self.computed)
        if steps[-1] != self.num_steps - 1:
            raise ValueError(f"the run is not planned to its last step yet (planned up to {self.known})")
        multi = [b - a > 1 for a, b in zip(steps, steps[1:])]
        orders = [self.order if m else 0 for m in multi]
        estimators = [self.estimator if m else "meancache" for m in multi]
        return Schedule(steps, orders, self.num_steps, estimators)
