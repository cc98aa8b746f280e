"""Plans, and the one rule that picks the plan of a trajectory.

A *plan* answers, step by step, whether the model runs and with which window K the others are estimated. Two kinds
share one interface (``plan[i]``, ``num_steps``, ``window``, ``observe(i, v)``, ``decided()``, ``schedule()``,
``static_schedule``):

* :class:`StaticPlan`: a :class:`~meancache.schedule.Schedule` expanded per step (or every step computed);
* :class:`~meancache.online.OnlinePlan`: compute steps decided during the run from the measured velocity change.

:func:`plan_for` is the policy every front-end uses for "which plan for this call":

1. fewer than 2 steps, or a budget that covers every step: every step is computed (log line);
2. ``mode="online"``: an online plan within the budget;
3. an explicit schedule: itself, resampled (log line) to the call's step count;
4. the model family's published preset at the budget (resampled from 50 steps, log line);
5. otherwise ``Schedule.default(budget, N)``; without a budget, :func:`default_budget` (about a third of N).
"""

from __future__ import annotations

import logging
import math

from .online import DEFAULT_TOLERANCE
from .online import OnlinePlan
from .schedule import Schedule
from .schedule import StepPlan
from .schedule import fit_steps
from .schedule import preset_names
from .validation import is_int

__all__ = ["StaticPlan", "plan_for", "default_budget", "family_of", "FAMILIES", "PRESET_STEPS"]

logger = logging.getLogger("meancache")

#: Class-name prefixes (of a pipeline or its transformer) and the preset family whose schedules they use by
#: default. Qwen-Image and Z-Image: the published tables, the only ones calibrated on those models. The digits
#: model: ``digits-joint`` (every estimator), 9.2 / 9.0 dB above the published-estimator ``digits`` preset at
#: B = 17 / 25 on the demo (bench/RESULTS.md); ``digits`` stays available by name.
FAMILIES = {"QwenImage": "qwen-image", "ZImage": "z-image", "Digits": "digits-joint"}
#: Step count the published presets were calibrated at.
PRESET_STEPS = 50
#: Budget used when neither ``budget`` nor ``schedule`` is given: about a third of the steps, like the middle
#: published budget (17 of 50).
DEFAULT_BUDGET_FRACTION = 0.34


def default_budget(num_steps: int) -> int:
    """The budget used when none is given: about a third of ``num_steps``, at least 2.

    >>> default_budget(50), default_budget(3)
    (17, 2)
    """
    return max(2, math.ceil(DEFAULT_BUDGET_FRACTION * num_steps))


def family_of(obj) -> str | None:
    """The preset family of a pipeline or model, from its class name (None when it has no published preset).

    >>> class QwenImageTransformer2DModel: ...
    >>> family_of(QwenImageTransformer2DModel())
    'qwen-image'
    """
    name = type(obj).__name__
    return next((fam for prefix, fam in FAMILIES.items() if name.startswith(prefix)), None)


class StaticPlan:
    """A plan fixed before the run: ``schedule`` expanded per step, or every one of ``num_steps`` steps computed
    when ``schedule`` is None (a Schedule needs 2 steps; a 1-step run has nothing to skip).

    Example:
        >>> plan = StaticPlan(Schedule([0, 3], [2], 4))
        >>> plan[1], plan.window, plan.decided()
        (StepPlan(computed=False, order=2, estimator='meancache'), 2, True)
        >>> StaticPlan(None, 1)[0]
        StepPlan(computed=True, order=0, estimator='meancache')
    """

    def __init__(self, schedule: Schedule | None, num_steps: int | None = None):
        self.static_schedule = schedule
        if schedule is not None:
            self.num_steps = schedule.num_steps
            self._steps = schedule.expand()
            self.window = schedule.window
            self.depth = schedule.depth
            self.corrector = schedule.corrector
        else:
            if not is_int(num_steps) or num_steps < 1:
                raise ValueError(f"num_steps={num_steps!r}: must be an int >= 1")
            self.num_steps = int(num_steps)
            self._steps = (StepPlan(True, 0),) * self.num_steps
            self.window = 1
            self.depth = 0
            self.corrector = 0

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, i: int) -> StepPlan:
        return self._steps[i]

    def observe(self, step: int, v) -> None:
        """Nothing to decide: a static plan ignores the measured velocities."""

    def fresh(self) -> "StaticPlan":
        """The plan for another trajectory: itself (nothing in it changes during a run)."""
        return self

    def decided(self) -> bool:
        return True

    def schedule(self) -> Schedule | None:
        return self.static_schedule


def plan_for(
    num_steps: int,
    *,
    schedule: Schedule | None = None,
    budget: int | None = None,
    mode: str = "schedule",
    tolerance: float | None = None,
    family: str | None = None,
    group=None,
):
    """The plan of one trajectory of ``num_steps`` steps (the rule in the module docstring).

    Args:
        num_steps: steps N of the call (>= 1).
        schedule: an explicit schedule (schedule mode).
        budget: model evaluations; default :func:`default_budget`.
        mode: ``"schedule"`` or ``"online"``.
        tolerance: online mode's tolerance (default :data:`~meancache.online.DEFAULT_TOLERANCE`).
        family: preset family (:func:`family_of`), for presets at the budget.
        group: online mode: the process group whose ranks share one trajectory (see :class:`OnlinePlan`).

    Returns:
        A :class:`StaticPlan` or an :class:`~meancache.online.OnlinePlan`.

    Example:
        >>> plan_for(50, budget=10, family="qwen-image").schedule() == Schedule.preset("qwen-image", 10)
        True
        >>> plan_for(1, budget=4)[0].computed
        True
    """
    wanted = schedule.budget if schedule is not None else (budget if budget is not None else default_budget(num_steps))
    if num_steps < 2 or wanted >= num_steps:
        logger.info("meancache: %d step(s) and a budget of %d: nothing to skip, every step is computed",
                    num_steps, wanted)
        return StaticPlan(Schedule.full(num_steps) if num_steps >= 2 else None, num_steps)
    if mode == "online":
        return OnlinePlan(wanted, num_steps, DEFAULT_TOLERANCE if tolerance is None else tolerance, group)
    if schedule is not None:
        return StaticPlan(fit_steps(schedule, num_steps))
    if family is not None and wanted in preset_names().get(family, ()):
        if num_steps != PRESET_STEPS:
            logger.info("meancache: %s preset (budget %d, %d steps) resampled to this call's %d steps",
                        family, wanted, PRESET_STEPS, num_steps)
        return StaticPlan(Schedule.preset(family, wanted, num_steps=num_steps))
    return StaticPlan(Schedule.default(wanted, num_steps))
